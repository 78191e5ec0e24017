"""Named value transforms used by the mappings (`mappings/*.yaml`), each with its inverse.

A mapping rule names a transform (`transform: concept`) and its `args`; `to_fhir` calls
`forward`, `from_fhir` calls `inverse`. The registry is the explicit dict `TRANSFORMS`
(no discovery by reflection). Transforms are pure: code tables are handed in through a
`CodeTables` object, built once by the mapper's loader.

Failures raise `TransformError` (a plain ValueError subclass carrying the code table name);
the mapper turns it into a MappingError naming the record field.

Room: records/ (layer 1, pure core: no IO): may import the base rooms and validation/.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

__all__ = [
    "TRANSFORMS",
    "CodeTable",
    "CodeTables",
    "Transform",
    "TransformError",
    "base64_text",
    "codeable_reference",
    "coding",
    "concept",
    "fhir_date",
    "fhir_datetime",
    "party_reference",
    "quantity",
    "reference",
    "transform_names",
    "value_map",
]


class TransformError(ValueError):
    """A value cannot be transformed. `table` names the code table involved, if any."""

    def __init__(
        self, message: str, *, table: str | None = None, code: str | None = None, soft: bool = False
    ) -> None:
        super().__init__(message)
        self.table = table
        self.code = code
        self.soft = soft  # the value is someone else's valid choice (a reference to another type)


@dataclass(frozen=True)
class CodeTable:
    """One local code table (ConceptMap-like): local code -> codings (first one identifies it)."""

    name: str
    concepts: Mapping[str, tuple[dict[str, str], ...]]
    displays: Mapping[str, str] = field(default_factory=dict)
    reverse: Mapping[tuple[str, str], str] = field(default_factory=dict)

    @classmethod
    def build(
        cls, name: str, concepts: Mapping[str, tuple[dict[str, str], ...]], displays: Mapping[str, str]
    ) -> CodeTable:
        """Index the codings: a (system, code) pair shared by two local codes is not used to read back."""
        seen: dict[tuple[str, str], list[str]] = {}
        for local, codings in concepts.items():
            for c in codings:
                seen.setdefault((c["system"], c["code"]), []).append(local)
        reverse = {k: v[0] for k, v in seen.items() if len(v) == 1}
        return cls(name, dict(concepts), dict(displays), reverse)

    def codings(self, local: Any) -> tuple[dict[str, str], ...]:
        try:
            return self.concepts[local]
        except (KeyError, TypeError):
            raise TransformError(
                f"Unknown local code '{local}' in code table '{self.name}'", table=self.name, code=str(local)
            ) from None

    def local_code(self, codings: Any) -> str:
        if isinstance(codings, list):
            for c in codings:
                if isinstance(c, dict):
                    hit = self.reverse.get((c.get("system"), c.get("code")))  # type: ignore[arg-type]
                    if hit is not None:
                        return hit
        pairs = ", ".join(f"{c.get('system')}|{c.get('code')}" for c in codings or [] if isinstance(c, dict))
        raise TransformError(
            f"No local code in code table '{self.name}' for coding(s) {pairs or '(none)'}", table=self.name
        )


@dataclass(frozen=True)
class CodeTables:
    """The code tables a mapper loaded, by name."""

    tables: Mapping[str, CodeTable] = field(default_factory=dict)

    def get(self, name: str) -> CodeTable:
        try:
            return self.tables[name]
        except KeyError:
            raise TransformError(f"Code table '{name}' is not defined", table=name) from None


Fn = Callable[[Any, Mapping[str, Any], CodeTables], Any]


@dataclass(frozen=True)
class Transform:
    """A named pair of pure functions: record value -> FHIR value, and back."""

    name: str
    forward: Fn
    inverse: Fn
    required_args: tuple[str, ...] = ()


_NO_TABLES = CodeTables()


def _ref_forward(value: Any, args: Mapping[str, Any], tables: CodeTables) -> dict[str, Any]:
    """Record id -> literal relative Reference of type `args.type`.

    >>> _ref_forward("client-001", {"type": "Patient"}, _NO_TABLES)
    {'reference': 'Patient/client-001'}
    """
    return {"reference": f"{args['type']}/{value}"}


def _ref_inverse(value: Any, args: Mapping[str, Any], tables: CodeTables) -> str:
    """Reference -> record id; accepts absolute URLs and `_history` suffixes.

    >>> _ref_inverse({"reference": "https://ehr.example/fhir/Patient/p1/_history/2"}, {"type": "Patient"}, _NO_TABLES)
    'p1'
    """
    rtype, rid = _split_reference(value)
    if rtype != args["type"]:
        raise TransformError(
            f"Expected a reference to {args['type']}, got {rtype or 'no literal reference'}",
            soft=rtype is not None,
        )
    return rid


_REF = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-\.]{1,64})(?:/_history/[A-Za-z0-9\-\.]{1,64})?$")


def _split_reference(value: Any) -> tuple[str | None, str]:
    ref = value.get("reference") if isinstance(value, dict) else None
    if not isinstance(ref, str):
        return None, ""
    got = _split_text(ref) if len(ref) <= 256 else _split_uncached(ref)
    if got is None:
        raise TransformError("Reference is not a literal reference of the form Type/id")
    return got


def _split_uncached(ref: str) -> tuple[str, str] | None:
    m = _REF.search(ref)
    return (m.group(1), m.group(2)) if m else None


#: The same few references (a client, a therapist, a referral) recur on every resource read.
_split_text = lru_cache(maxsize=4096)(_split_uncached)


reference = Transform("reference", _ref_forward, _ref_inverse, ("type",))

_PARTY_TYPES = {
    "practitioner": "Practitioner",
    "practitioner_role": "PractitionerRole",
    "organization": "Organization",
    "patient": "Patient",
}
_PARTY_KEYS = {v: k for k, v in _PARTY_TYPES.items()}


def _party_forward(value: Any, args: Mapping[str, Any], tables: CodeTables) -> dict[str, Any]:
    """A KAP party reference (one of practitioner / practitioner_role / organization / patient
    and/or a business identifier) -> FHIR Reference.

    >>> _party_forward({"organization": "org-1", "identifier": {"system": "http://hl7.org/fhir/sid/us-npi",
    ...                 "value": "1234567893"}}, {}, _NO_TABLES)
    {'reference': 'Organization/org-1', 'identifier': {'system': 'http://hl7.org/fhir/sid/us-npi', 'value': '1234567893'}}
    """
    out: dict[str, Any] = {}
    for key, rtype in _PARTY_TYPES.items():
        if key in value:
            out["reference"] = f"{rtype}/{value[key]}"
            break
    if "identifier" in value:
        out["identifier"] = {"system": value["identifier"]["system"], "value": value["identifier"]["value"]}
    return out


def _party_inverse(value: Any, args: Mapping[str, Any], tables: CodeTables) -> dict[str, Any]:
    """FHIR Reference -> KAP party reference.

    >>> _party_inverse({"reference": "PractitionerRole/role-1"}, {}, _NO_TABLES)
    {'practitioner_role': 'role-1'}
    """
    out: dict[str, Any] = {}
    rtype, rid = _split_reference(value)
    if rtype is not None:
        key = _PARTY_KEYS.get(rtype)
        if key is None:
            raise TransformError(f"A party reference cannot point to a {rtype}")
        out[key] = rid
    ident = value.get("identifier") if isinstance(value, dict) else None
    if isinstance(ident, dict) and "system" in ident and "value" in ident:
        out["identifier"] = {"system": ident["system"], "value": ident["value"]}
    if not out:
        raise TransformError("Reference has neither a literal reference nor a business identifier")
    return out


party_reference = Transform("party-reference", _party_forward, _party_inverse)


def _coding_forward(value: Any, args: Mapping[str, Any], tables: CodeTables) -> dict[str, Any]:
    """Local code -> Coding: the first coding of `args.table`, or `{system: args.system, code}`.

    >>> _coding_forward("TREAT", {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason"}, _NO_TABLES)
    {'system': 'http://terminology.hl7.org/CodeSystem/v3-ActReason', 'code': 'TREAT'}
    """
    if "table" in args:
        return dict(tables.get(args["table"]).codings(value)[0])
    return {"system": args["system"], "code": value}


def _coding_inverse(value: Any, args: Mapping[str, Any], tables: CodeTables) -> str:
    """Coding -> local code.

    >>> _coding_inverse({"system": "urn:x", "code": "a"}, {"system": "urn:x"}, _NO_TABLES)
    'a'
    """
    if "table" in args:
        return tables.get(args["table"]).local_code([value])
    if not isinstance(value, dict) or value.get("system") != args["system"] or "code" not in value:
        raise TransformError(f"Expected a coding from {args['system']}", soft=isinstance(value, dict))
    return value["code"]


coding = Transform("coding", _coding_forward, _coding_inverse)


def _concept_forward(value: Any, args: Mapping[str, Any], tables: CodeTables) -> dict[str, Any]:
    """Local code -> CodeableConcept with every coding of the code table entry and its display as text.

    >>> t = CodeTables({"route": CodeTable.build("route", {"im": ({"system": "http://snomed.info/sct",
    ...     "code": "78421000", "display": "Intramuscular route"},)}, {"im": "Intramuscular"})})
    >>> _concept_forward("im", {"table": "route"}, t)
    {'coding': [{'system': 'http://snomed.info/sct', 'code': '78421000', 'display': 'Intramuscular route'}], 'text': 'Intramuscular'}
    """
    table = tables.get(args["table"])
    out: dict[str, Any] = {"coding": [dict(c) for c in table.codings(value)]}
    if value in table.displays:
        out["text"] = table.displays[value]
    return out


def _concept_inverse(value: Any, args: Mapping[str, Any], tables: CodeTables) -> str:
    """CodeableConcept -> local code (first coding the table knows).

    >>> t = CodeTables({"route": CodeTable.build("route", {"im": ({"system": "http://snomed.info/sct",
    ...     "code": "78421000"},)}, {})})
    >>> _concept_inverse({"coding": [{"system": "http://snomed.info/sct", "code": "78421000"}]}, {"table": "route"}, t)
    'im'
    """
    codings = value.get("coding") if isinstance(value, dict) else None
    return tables.get(args["table"]).local_code(codings or [])


concept = Transform("concept", _concept_forward, _concept_inverse, ("table",))


def _b64_forward(value: Any, args: Mapping[str, Any], tables: CodeTables) -> str:
    """Text -> base64 of its UTF-8 bytes (R5 attachment data).

    >>> _b64_forward("Dosing went well ✓", {}, _NO_TABLES)
    'RG9zaW5nIHdlbnQgd2VsbCDinJM='
    """
    return base64.b64encode(str(value).encode("utf-8")).decode("ascii")


def _b64_inverse(value: Any, args: Mapping[str, Any], tables: CodeTables) -> str:
    """Base64 of UTF-8 text -> text.

    >>> _b64_inverse("RG9zaW5nIHdlbnQgd2VsbCDinJM=", {}, _NO_TABLES)
    'Dosing went well ✓'
    """
    try:
        return base64.b64decode(str(value), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise TransformError("Attachment data is not base64 of UTF-8 text") from None


base64_text = Transform("base64-text", _b64_forward, _b64_inverse)


def _cr_forward(value: Any, args: Mapping[str, Any], tables: CodeTables) -> dict[str, Any]:
    """Wrap the result of inner transform `args.of` in an R5 CodeableReference
    (`concept` for a CodeableConcept, `reference` for a Reference).

    >>> _cr_forward("consent-1", {"of": "reference", "type": "Consent"}, _NO_TABLES)
    {'reference': {'reference': 'Consent/consent-1'}}
    """
    inner = TRANSFORMS[args["of"]].forward(value, args, tables)
    return {"reference": inner} if "reference" in inner or "identifier" in inner else {"concept": inner}


def _cr_inverse(value: Any, args: Mapping[str, Any], tables: CodeTables) -> Any:
    """Unwrap an R5 CodeableReference and apply the inner transform's inverse.

    >>> _cr_inverse({"reference": {"reference": "Consent/consent-1"}}, {"of": "reference", "type": "Consent"}, _NO_TABLES)
    'consent-1'
    """
    if not isinstance(value, dict):
        raise TransformError("Expected a CodeableReference")
    inner = value.get("reference", value.get("concept"))
    return TRANSFORMS[args["of"]].inverse(inner, args, tables)


codeable_reference = Transform("codeable-reference", _cr_forward, _cr_inverse, ("of",))


def _qty_forward(value: Any, args: Mapping[str, Any], tables: CodeTables) -> dict[str, Any]:
    """Number -> UCUM Quantity with the unit of `args` (`unit`, `code`).

    >>> _qty_forward(50, {"unit": "mg", "code": "mg"}, _NO_TABLES)
    {'value': 50, 'unit': 'mg', 'system': 'http://unitsofmeasure.org', 'code': 'mg'}
    """
    return {"value": value, "unit": args["unit"], "system": "http://unitsofmeasure.org", "code": args["code"]}


def _qty_inverse(value: Any, args: Mapping[str, Any], tables: CodeTables) -> Any:
    """Quantity -> number; the unit must be the expected UCUM code.

    >>> _qty_inverse({"value": 118, "system": "http://unitsofmeasure.org", "code": "mm[Hg]"},
    ...              {"unit": "mmHg", "code": "mm[Hg]"}, _NO_TABLES)
    118
    """
    if not isinstance(value, dict) or "value" not in value:
        raise TransformError("Expected a Quantity with a value")
    if value.get("code", args["code"]) != args["code"]:
        raise TransformError(f"Expected a quantity in UCUM '{args['code']}'")
    return value["value"]


quantity = Transform("quantity", _qty_forward, _qty_inverse, ("unit", "code"))


def _vm_forward(value: Any, args: Mapping[str, Any], tables: CodeTables) -> Any:
    """Rename a code (bijective; codes not in `args.map` pass unchanged).

    >>> _vm_forward("rejected", {"map": {"rejected": "not-done"}}, _NO_TABLES)
    'not-done'
    """
    return args["map"].get(value, value)


def _vm_inverse(value: Any, args: Mapping[str, Any], tables: CodeTables) -> Any:
    """The reverse renaming.

    >>> _vm_inverse("not-done", {"map": {"rejected": "not-done"}}, _NO_TABLES)
    'rejected'
    """
    for k, v in args["map"].items():
        if v == value:
            return k
    return value


value_map = Transform("value-map", _vm_forward, _vm_inverse, ("map",))

_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2}))?$", re.ASCII)
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$", re.ASCII)


def _datetime_check(value: Any, args: Mapping[str, Any], tables: CodeTables) -> Any:
    """Pass a date or dateTime through unchanged (both ways), checking it is complete.

    >>> _datetime_check("2024-03-05T10:00:00-05:00", {}, _NO_TABLES)
    '2024-03-05T10:00:00-05:00'
    """
    if not isinstance(value, str) or not _DATETIME.match(value):
        raise TransformError(
            "Expected a full date or date-time with time zone (partial dates are not accepted in KAP records)"
        )
    return value


def _date_check(value: Any, args: Mapping[str, Any], tables: CodeTables) -> Any:
    """Pass a date through unchanged (both ways), checking it is a full YYYY-MM-DD.

    >>> _date_check("2024-03-05", {}, _NO_TABLES)
    '2024-03-05'
    """
    if not isinstance(value, str) or not _DATE.match(value):
        raise TransformError("Expected a full date (YYYY-MM-DD)")
    return value


def _date_part(value: Any, args: Mapping[str, Any], tables: CodeTables) -> Any:
    """The day of a date or dateTime, for FHIR elements of type date (R5 Consent.date).

    >>> _date_part("2024-03-05T10:00:00-05:00", {}, _NO_TABLES), _date_part("2024-03-05", {}, _NO_TABLES)
    ('2024-03-05', '2024-03-05')
    """
    return _datetime_check(value, args, tables)[:10]


fhir_datetime = Transform("datetime", _datetime_check, _datetime_check)
fhir_date = Transform("date", _date_check, _date_check)
date_part = Transform("date-part", _date_part, _date_check)

TRANSFORMS: dict[str, Transform] = {
    t.name: t
    for t in (
        reference,
        party_reference,
        coding,
        concept,
        base64_text,
        codeable_reference,
        quantity,
        value_map,
        fhir_datetime,
        fhir_date,
        date_part,
    )
}


def transform_names() -> list[str]:
    """Names a mapping file may use in `transform:`.

    >>> "concept" in transform_names()
    True
    """
    return sorted(TRANSFORMS)
