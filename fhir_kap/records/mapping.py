"""The mapping engine: KAP records <-> FHIR R4/R5 resources, driven by the data in `mappings/`.

One YAML file per record type lists rules; the same rules run both ways:

    - field: dosing.route            # record field (dotted); omitted in `items` = the item itself
      path: extension[url={C}/StructureDefinition/kap-dose].extension[url=route].valueCodeableConcept
      transform: concept             # a name in fhir_kap.records.transforms.TRANSFORMS (with its inverse)
      args: {table: route}
      only: r4 | r5                  # optional: the rule applies to one release
    - path: intent                   # a constant (written, not read back)
      value: order
    - field: goals                   # a group: one FHIR element per list item
      path: extension[url={C}/StructureDefinition/kap-goal]
      items: [{path: valueString}]

FHIR paths: `a.b` walks objects; `a[0]` an index; `a[1:]` a slice (groups); `a[k=v]` /
`a[k!=v]` select list elements by a key (find-or-create when writing). Strings `{C}` and
`cs:NAME` in the data resolve to config.CANONICAL and config.CS.NAME at load. Output is
plain dicts built in rule order, so it is deterministic (no key sorting needed).

Room: records/ (layer 1, pure core: no IO): may import the base rooms and validation/.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from ..config import CANONICAL, CS, Release, data_path
from ..errors import Issue, MappingError
from ..fhir.release import detect_release as _detect_release
from .paths import Seg, append_at, get_all, get_field, get_first, parse_path, path_str, set_at, set_field
from .transforms import TRANSFORMS, CodeTable, CodeTables, Transform, TransformError

__all__ = ["Mapper", "detect_release", "load_mapping_schema"]


@dataclass(frozen=True)
class _Rule:
    field: tuple[str, ...]  # () = the item itself (inside items)
    segs: tuple[Seg, ...]
    read_also: tuple[tuple[Seg, ...], ...]
    transform: Transform | None
    args: Mapping[str, Any]
    value: Any
    has_value: bool
    write_only: bool
    read_only: bool  # another way to read a field, never written (e.g. R4 note text from an attachment)
    items: tuple[_Rule, ...] | None
    value_json: bytes  # containers are copied per record by parsing this (C speed)
    single: bool  # group over one object (not a list)
    unique: bool  # group: skip elements equal to one already there (derived tags)
    where: str  # "<file>#/rules/3" for error messages


def _resolve(obj: Any) -> Any:
    if isinstance(obj, str):
        if obj.startswith("cs:"):
            return getattr(CS, obj[3:])
        return obj.replace("{C}", CANONICAL)
    if isinstance(obj, list):
        return [_resolve(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _resolve(v) for k, v in obj.items()}
    return obj


def _resolve_path(path: str) -> str:
    # selectors may name a code system constant: [system=cs:ID_SESSION]
    path = re.sub(r"(=)cs:([A-Z0-9_]+)", lambda m: m.group(1) + getattr(CS, m.group(2)), path)
    return path.replace("{C}", CANONICAL)


def detect_release(resource: Mapping[str, Any]) -> Release:
    """A resource's release by `fhirmodel.detect_release`; R4 when its shape does not tell.

    >>> detect_release({"resourceType": "Procedure", "occurrencePeriod": {}}).value
    '5.0.0'
    """
    return _detect_release(resource) or Release.R4


def load_mapping_schema(path: Path | None = None) -> dict[str, Any]:
    """The JSON Schema mapping files must satisfy (`mappings/schema/mapping.schema.json`)."""
    import json

    path = path or data_path("mappings") / "schema" / "mapping.schema.json"
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class _Mapping:
    record: str
    resource_type: str
    rules: Mapping[Release, tuple[_Rule, ...]]


class Mapper:
    """Maps checked KAP records to FHIR (R4 or R5) and FHIR resources back to records.

    Build once with `Mapper.load()`; the object is immutable and thread-safe.
    """

    def __init__(self, mappings: Mapping[str, _Mapping], tables: CodeTables) -> None:
        self._by_record = dict(mappings)
        self._by_resource = {m.resource_type: m for m in mappings.values()}
        self._tables = tables

    @classmethod
    def load(cls, path: Path | None = None) -> Mapper:
        """Read and schema-check every mapping file (`*.yaml`) and code table (`codes/*.yaml`)."""
        import jsonschema
        import yaml

        root = Path(path) if path is not None else data_path("mappings")
        validator = jsonschema.Draft202012Validator(
            load_mapping_schema(root / "schema" / "mapping.schema.json")
        )
        tables: dict[str, CodeTable] = {}
        for f in sorted((root / "codes").glob("*.yaml")):
            doc = _read_yaml(f, yaml)
            _check_doc(validator, doc, f, "#/$defs/codeTable")
            concepts = {k: tuple(_resolve(c) for c in v["coding"]) for k, v in doc["concepts"].items()}
            displays = {k: v["display"] for k, v in doc["concepts"].items() if "display" in v}
            tables[doc["table"]] = CodeTable.build(doc["table"], concepts, displays)
        mappings: dict[str, _Mapping] = {}
        for f in sorted(root.glob("*.yaml")):
            doc = _read_yaml(f, yaml)
            _check_doc(validator, doc, f, None)
            mappings[doc["record"]] = _compile(doc, f, tables)
        if not mappings:
            raise MappingError(f"No mapping files found in {root.name}/", rule="mapping:load")
        return cls(mappings, CodeTables(tables))

    def record_types(self) -> list[str]:
        """The KAP record types this mapper knows, e.g. ['client', 'consent', ...]."""
        return sorted(self._by_record)

    def resource_type(self, record_type: str) -> str:
        """The FHIR resource type a record type maps to."""
        return self._by_record[record_type].resource_type

    def to_fhir(self, record: dict[str, Any], release: Release) -> dict[str, Any]:
        """KAP record (already checked by `inputs`) -> FHIR resource dict for `release`."""
        rtype = record.get("record") if isinstance(record, dict) else None
        m = self._by_record.get(rtype)  # type: ignore[arg-type]
        if m is None:
            raise MappingError(
                f"No mapping for record type '{rtype}'",
                pointer="/record",
                expression="record",
                rule="mapping:record-type",
            )
        out: dict[str, Any] = {"resourceType": m.resource_type}
        issues: list[Issue] = []
        self._write(m.rules[release], record, out, "", str(rtype), issues)
        if issues:
            raise MappingError(issues)
        return out

    def _write(
        self,
        rules: tuple[_Rule, ...],
        src: Any,
        out: dict[str, Any],
        ptr: str,
        expr: str,
        issues: list[Issue],
    ) -> None:
        for r in rules:
            if r.read_only:
                continue
            if r.has_value:
                set_at(out, r.segs, orjson.loads(r.value_json) if r.value_json else r.value)
                continue
            value = get_field(src, r.field) if r.field else src
            if value is None:
                continue
            if r.items is not None:
                fptr = ptr + "".join("/" + f for f in r.field)
                fexpr = ".".join((expr,) + r.field)
                for i, item in enumerate(value if isinstance(value, list) else [value]):
                    elem: dict[str, Any] = {}
                    iptr, iexpr = (
                        (f"{fptr}/{i}", f"{fexpr}[{i}]") if isinstance(value, list) else (fptr, fexpr)
                    )
                    self._write(r.items, item, elem, iptr, iexpr, issues)
                    if elem:
                        append_at(out, r.segs, elem, r.unique)
                continue
            try:
                if r.transform is not None:
                    value = r.transform.forward(value, r.args, self._tables)  # fresh objects
                elif isinstance(value, (dict, list)):
                    value = _copy(value)
                set_at(out, r.segs, value)
            except TransformError as exc:
                issues.append(
                    _issue(exc, ptr + "".join("/" + f for f in r.field), ".".join((expr,) + r.field), r)
                )
            except ValueError as exc:
                issues.append(
                    Issue(
                        "error",
                        "exception",
                        f"Mapping {r.where} failed: {exc}",
                        ".".join((expr,) + r.field),
                        ptr + "".join("/" + f for f in r.field),
                        "mapping:rule",
                    )
                )

    def from_fhir(self, resource: dict[str, Any], release: Release | None = None) -> dict[str, Any]:
        """FHIR resource -> KAP record. `release` None: detected from R5-only elements."""
        record, issues = self.read(resource, release, lenient=False)
        errors = [i for i in issues if i.is_error]
        if errors:
            raise MappingError(errors)
        return record

    def read(
        self, resource: dict[str, Any], release: Release | None = None, *, lenient: bool = True
    ) -> tuple[dict[str, Any], list[Issue]]:
        """FHIR resource -> (KAP record, issues). `lenient`: a coding no code table knows and a
        reference to another type than the field's are information issues (the field stays
        empty; the caller keeps the element as given), not errors."""
        rt = resource.get("resourceType") if isinstance(resource, dict) else None
        m = self._by_resource.get(rt)  # type: ignore[arg-type]
        if m is None:
            raise MappingError(
                f"No KAP record type for FHIR resource type '{rt}'",
                pointer="/resourceType",
                expression="resourceType",
                rule="mapping:resource-type",
            )
        release = release or detect_release(resource)
        record: dict[str, Any] = {"record": m.record}
        issues: list[Issue] = []
        self._read(m.rules[release], resource, record, str(rt), issues, lenient)
        return record, issues

    def table(self, name: str) -> CodeTable:
        """The code table `name` (MappingError-free KeyError-free: TransformError when unknown)."""
        return self._tables.get(name)

    def _read(
        self,
        rules: tuple[_Rule, ...],
        src: Any,
        record: dict[str, Any],
        expr: str,
        issues: list[Issue],
        lenient: bool = False,
    ) -> Any:
        """Fill `record` from `src`; for item rules without a field, return the item value."""
        item_value: Any = None
        for r in rules:
            if r.has_value or r.write_only:
                continue
            if r.items is not None:
                elems = get_all(src, r.segs)
                got = []
                for elem in elems:
                    sub: dict[str, Any] = {}
                    v = self._read(r.items, elem, sub, expr, issues, lenient)
                    item = v if v is not None else sub
                    if item not in (None, {}):
                        got.append(item)
                if not got:
                    continue
                if r.field:
                    existing = get_field(record, r.field)
                    if isinstance(existing, list) and r.single is False:
                        for i, item in enumerate(got):
                            if i < len(existing) and isinstance(existing[i], dict) and isinstance(item, dict):
                                existing[i].update(item)
                    else:
                        set_field(record, r.field, got if not r.single else got[0])
                else:
                    item_value = got
                continue
            failure: TransformError | None = None
            got_value = False
            value = None
            for segs in (r.segs,) + r.read_also:
                found = get_first(src, segs)
                if found is None:
                    continue
                try:
                    value = r.transform.inverse(found, r.args, self._tables) if r.transform else _copy(found)
                except TransformError as exc:
                    failure = failure or exc  # the next path may hold what this rule reads
                    continue
                got_value = True
                break
            if not got_value:
                if failure is not None:
                    issue = _issue(
                        failure, None, expr + "." + ".".join(path_str(s) for s in r.segs), r, reading=True
                    )
                    if lenient and (failure.table or failure.soft):
                        # someone else's code or reference: not an error in their data; kept as given
                        issue = replace(
                            issue,
                            severity="information",
                            message=f"{issue.message}; kept as given, not mapped to a record field",
                        )
                    issues.append(issue)
                continue
            if r.field:
                if get_field(record, r.field) is None:
                    set_field(record, r.field, value)
            elif item_value is None:
                item_value = value
        return item_value


def _issue(exc: TransformError, ptr: str | None, expr: str, r: _Rule, reading: bool = False) -> Issue:
    rule = f"code-table:{exc.table}" if exc.table else f"transform:{r.transform.name if r.transform else ''}"
    code = "code-invalid" if exc.table else "value"
    return Issue("error", code, str(exc), expr, ptr, rule)


def _copy(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _copy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_copy(x) for x in v]
    return v


def _read_yaml(f: Path, yaml: Any) -> Any:
    try:
        return yaml.safe_load(f.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise MappingError(
            f"Mapping file {f.name} cannot be read: {str(exc).splitlines()[0]}",
            rule="mapping:yaml",
            code="structure",
        ) from None


def _check_doc(validator: Any, doc: Any, f: Path, sub: str | None) -> None:
    schema = validator.schema
    if sub is not None:
        v = validator.evolve(schema={"$ref": sub, "$defs": schema.get("$defs", {})})
    else:
        v = validator
    errors = sorted(v.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        issues = [
            Issue(
                "error",
                "structure",
                f"Mapping file {f.parent.name}/{f.name}: {_schema_message(e)}",
                None,
                "/" + "/".join(str(p) for p in e.absolute_path),
                f"mapping-schema:{e.validator}",
            )
            for e in errors
        ]
        raise MappingError(issues)


def _schema_message(e: Any) -> str:
    where = "/" + "/".join(str(p) for p in e.absolute_path)
    return f"at {where}: {e.message}"


def _compile(doc: dict[str, Any], f: Path, tables: Mapping[str, CodeTable]) -> _Mapping:
    def rule(raw: dict[str, Any], where: str, rel: Release) -> _Rule:
        try:
            segs = parse_path(_resolve_path(raw["path"]))
            read_also = tuple(parse_path(_resolve_path(p)) for p in raw.get("read_also", []))
        except (ValueError, AttributeError) as exc:
            raise MappingError(
                f"Mapping file {f.name} {where}/path: {exc}", pointer=f"{where}/path", rule="mapping:path"
            ) from None
        t = None
        if "transform" in raw:
            t = TRANSFORMS.get(raw["transform"])
            if t is None:
                raise MappingError(
                    f"Mapping file {f.name} {where}/transform: unknown transform '{raw['transform']}'",
                    pointer=f"{where}/transform",
                    rule="mapping:transform",
                )
        args = _resolve(raw.get("args", {}))
        if t is not None:
            missing = [a for a in t.required_args if a not in args]
            if missing:
                raise MappingError(
                    f"Mapping file {f.name} {where}/args: transform '{t.name}' needs {', '.join(missing)}",
                    pointer=f"{where}/args",
                    rule="mapping:args",
                )
        if "table" in args and args["table"] not in tables:
            raise MappingError(
                f"Mapping file {f.name} {where}/args/table: code table '{args['table']}' "
                f"does not exist in codes/",
                pointer=f"{where}/args/table",
                rule="mapping:code-table",
            )
        items = None
        if "items" in raw:
            if not segs:
                raise MappingError(
                    f"Mapping file {f.name} {where}/path: a group needs a path",
                    pointer=f"{where}/path",
                    rule="mapping:path",
                )
            items = tuple(
                rule(x, f"{where}/items/{i}", rel)
                for i, x in enumerate(raw["items"])
                if x.get("only") in (None, rel.short)
            )
        value = _resolve(raw.get("value"))
        value_json = orjson.dumps(value) if isinstance(value, (dict, list)) else b""
        return _Rule(
            tuple(raw["field"].split(".")) if raw.get("field") else (),
            segs,
            read_also,
            t,
            args,
            value,
            "value" in raw,
            bool(raw.get("write_only")),
            bool(raw.get("read_only")),
            items,
            value_json,
            bool(raw.get("single")),
            bool(raw.get("unique")),
            f"{f.name}#{where}",
        )

    per_release: dict[Release, tuple[_Rule, ...]] = {}
    for rel in Release:
        compiled = []
        for i, raw in enumerate(doc["rules"]):
            if raw.get("only") not in (None, rel.short):
                continue
            compiled.append(rule(raw, f"/rules/{i}", rel))
        per_release[rel] = tuple(compiled)
    return _Mapping(doc["record"], doc["resourceType"], per_release)
