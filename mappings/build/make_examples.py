"""Regenerate the golden FHIR examples from the KAP sample records.

    python3 mappings/build/make_examples.py          # writes profiles/examples/r4/ and r5/
    python3 mappings/build/make_examples.py --check  # exit 1 if any golden file is stale

Each record in profiles/examples/records/*.json is checked against its input schema, mapped
with the mappings in mappings/, and written as `<ResourceType>-<id>.json` (orjson, 2-space
indent, keys in mapping order: the mapper is deterministic, so no key sorting is needed).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fhir_kap import jsonio
from fhir_kap.config import Release
from fhir_kap.records.inputs import load_input_schemas
from fhir_kap.records.mapping import Mapper

RECORDS = ROOT / "profiles" / "examples" / "records"


def golden_files() -> dict[Path, bytes]:
    """Every golden file path -> its expected bytes."""
    schemas = load_input_schemas(ROOT / "profiles" / "input")
    mapper = Mapper.load(ROOT / "mappings")
    out: dict[Path, bytes] = {}
    for f in sorted(RECORDS.glob("*.json")):
        record = schemas.check(jsonio.loads(f.read_bytes(), source=f.name))
        for release in Release:
            resource = mapper.to_fhir(record, release)
            path = (
                ROOT
                / "profiles"
                / "examples"
                / release.short
                / f"{resource['resourceType']}-{resource['id']}.json"
            )
            out[path] = jsonio.dumps(resource, pretty=True) + b"\n"
    return out


def main(argv: list[str]) -> int:
    files = golden_files()
    if "--check" in argv:
        stale = [p for p, data in files.items() if not p.exists() or p.read_bytes() != data]
        for p in stale:
            print(f"stale: {p.relative_to(ROOT)}")
        return 1 if stale else 0
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    print(f"wrote {len(files)} files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
