"""Input check for KAP records: JSON Schemas in `profiles/input/`, every error with pointer and rule.

    schemas = load_input_schemas()          # once, at start-up
    record = schemas.check(doc)             # returns the record or raises InputError (all issues)

Messages never quote the offending value (it may be patient data): they name the field, the
rule (`schema:<keyword>`) and what the schema expects.

Room: records/ (layer 1, pure core: no IO): may import the base rooms and validation/.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..config import data_path
from ..errors import InputError, Issue, quote
from ..fhir.textscan import looks_like_transcript

__all__ = ["RECORD_TYPES", "InputSchemas", "check_record", "load_input_schemas"]

RECORD_TYPES = (
    "referral",
    "session",
    "consent",
    "note",
    "client",
    "practitioner",
    "practitioner-role",
    "organization",
)

PSYCHOTHERAPY_NOTE_RULE = "kap:psychotherapy-note-never-exchanged"
TRANSCRIPT_RULE = "kap-note-1"


def _is_datetime(value: object) -> bool:
    if not isinstance(value, str):
        return True
    try:
        _dt.datetime.fromisoformat(value)  # 3.11 accepts "Z"
    except ValueError:
        return False
    return "T" in value


@dataclass(frozen=True)
class InputSchemas:
    """The compiled record schemas, one validator per record type. Build with `load_input_schemas`.

    `fast` holds fastjsonschema-compiled twins of the same schemas (~10x faster than jsonschema):
    a record they accept, and no KAP rule objects to, is returned at once; anything else is
    re-checked with jsonschema so every problem is reported with its pointer.
    """

    validators: Mapping[str, Any]
    fast: Mapping[str, Any] = field(default_factory=dict)

    def check(self, record: Any) -> dict[str, Any]:
        """Return `record` if it is a valid KAP record; else raise InputError listing every problem."""
        if not isinstance(record, dict):
            raise InputError(
                "A KAP record must be a JSON object", pointer="", expression="record", rule="schema:type"
            )
        rtype = record.get("record")
        if not isinstance(rtype, str) or rtype not in self.validators:
            raise InputError(
                f"Field 'record' must be one of: {', '.join(RECORD_TYPES)}",
                pointer="/record",
                expression="record",
                rule="schema:enum",
            )
        issues = list(_kap_rules(record))
        fast = self.fast.get(rtype)
        if fast is not None and not issues:
            from fastjsonschema import JsonSchemaValueException

            try:
                fast(record)
                return record
            except JsonSchemaValueException:
                pass
        validator = self.validators[rtype]
        from jsonschema.exceptions import relevance

        errors = sorted(validator.iter_errors(record), key=relevance, reverse=True)
        own = {i.pointer for i in issues}
        said = set()
        for i in (_issue(rtype, e, record) for e in errors):
            if i.pointer not in own and (i.pointer, i.message) not in said:  # pattern + format: once
                said.add((i.pointer, i.message))
                issues.append(i)
        if issues:
            raise InputError(issues)
        return record


def _kap_rules(record: dict[str, Any]) -> Iterable[Issue]:
    """Rules JSON Schema cannot say clearly: psychotherapy notes are never exchanged."""
    if record.get("record") != "note":
        return
    if record.get("category") == "psychotherapy-note":
        yield Issue(
            "error",
            "security",
            "Psychotherapy notes (process notes, transcripts, verbatim content) are never exchanged",
            "note.category",
            "/category",
            PSYCHOTHERAPY_NOTE_RULE,
        )
    text = record.get("text")
    if isinstance(text, str) and looks_like_transcript(text):
        yield Issue(
            "error",
            "security",
            "Note text reads as a session transcript (speaker-turn lines); transcripts are never exchanged",
            "note.text",
            "/text",
            TRANSCRIPT_RULE,
        )


def _expression(rtype: str, path: Iterable[Any]) -> str:
    out = rtype
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def _pointer(path: Iterable[Any]) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


def _issue(rtype: str, e: Any, record: Any) -> Issue:
    path = list(e.absolute_path)
    kw = e.validator
    label: str | None = None  # what the message names, when not the field itself
    if kw is None:  # a `false` subschema: jsonschema leaves the property name off the path
        kw = "false"
        parent: Any = record
        for p in path:
            parent = parent[p]
        if isinstance(parent, dict) and list(e.schema_path)[-1:] == ["properties"]:
            path = path + [k for k, v in parent.items() if v is e.instance][:1]
    if kw == "required":
        missing = e.message.split("'")[1] if "'" in e.message else "?"
        path = path + [missing]
        msg = f"Required field '{missing}' is missing"
        code = "required"
    elif kw == "additionalProperties":
        extra = (
            sorted(set(e.instance) - set(e.schema.get("properties", {})))
            if isinstance(e.instance, dict)
            else []
        )
        known = list(e.schema.get("properties", {})) if isinstance(e.schema, dict) else []
        hints = [m for x in extra[:5] for m in difflib.get_close_matches(str(x), known, n=1, cutoff=0.75)]
        msg = f"Unknown field(s): {', '.join(map(quote, extra[:5]))}{' and more' if len(extra) > 5 else ''}"
        if hints:
            msg += f" (did you mean {', '.join(map(quote, dict.fromkeys(hints)))}?)"
        label = _expression(rtype, path)  # the message names the object; the field is quoted (shortened)
        if len(extra) == 1:
            path = path + extra
        code = "structure"
    elif kw == "dependentRequired":
        quoted = e.message.split("'")
        needed, because = (quoted[1], quoted[3]) if len(quoted) >= 4 else ("?", "?")
        path = path + [needed]
        msg = f"Required field '{needed}' is missing (needed when '{because}' is present)"
        code = "required"
    elif kw in ("pattern", "format") and isinstance(e.schema, dict) and e.schema.get("x-expected"):
        # what is expected, in words (the schema's `x-expected`): never the regex itself
        msg = f"must be {e.schema['x-expected']}"
        code = "value"
    else:
        msg = _describe(kw, e.validator_value, e.instance)
        code = (
            "value"
            if kw
            in (
                "enum",
                "const",
                "pattern",
                "format",
                "minimum",
                "maximum",
                "exclusiveMinimum",
                "exclusiveMaximum",
            )
            else "structure"
        )
    field = _expression(rtype, path)
    return Issue("error", code, f"{label or field}: {msg}", field, _pointer(path), f"schema:{kw}")


def _describe(kw: str, expected: Any, instance: Any) -> str:
    if kw == "type":
        return f"must be of type {expected if isinstance(expected, str) else ' or '.join(expected)}"
    if kw == "enum":
        return "must be one of: " + ", ".join(str(v) for v in expected)
    if kw == "const":
        return f"must be '{expected}'"
    if kw == "pattern":
        return "is not in the expected format"  # the regex itself helps nobody reading an error
    if kw == "format":
        return f"is not a valid {expected} (RFC 3339)"
    if kw in ("minLength", "maxLength"):
        return f"length must be {'at least' if kw == 'minLength' else 'at most'} {expected}"
    if kw in ("minItems", "maxItems"):
        return f"must have {'at least' if kw == 'minItems' else 'at most'} {expected} item(s)"
    if kw in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        words = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
        return f"must be {words[kw]} {expected}"
    if kw == "minProperties":
        return f"must have at least {expected} field(s)"
    if kw == "uniqueItems":
        return "must not repeat items"
    if kw == "false":
        return "is not allowed here (for this kind of record or together with a field already given)"
    return f"breaks schema rule '{kw}'"


def load_input_schemas(path: Path | None = None) -> InputSchemas:
    """Load and compile `profiles/input/*.schema.json` (default: config.data_path('profiles')/input).

    Formats are checked (`date`, `date-time`) with a FormatChecker built here.
    """
    import jsonschema
    from referencing import Registry, Resource

    root = Path(path) if path is not None else data_path("profiles") / "input"
    docs: dict[str, dict[str, Any]] = {}
    for f in sorted(root.glob("*.schema.json")):
        try:
            docs[f.name] = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(
                f"Input schema {f.name} cannot be read: {exc}", rule="schema:load", code="exception"
            ) from None
    registry: Registry = Registry().with_resources(
        (doc["$id"], Resource.from_contents(doc)) for doc in docs.values()
    )
    checker = jsonschema.FormatChecker(formats=("date",))
    checker.checks("date-time")(_is_datetime)
    validators: dict[str, Any] = {}
    for name in RECORD_TYPES:
        doc = docs.get(f"{name}.schema.json")
        if doc is None:
            raise InputError(
                f"Input schema {name}.schema.json is missing in {root.name}/",
                rule="schema:load",
                code="exception",
            )
        jsonschema.Draft202012Validator.check_schema(doc)
        validators[name] = jsonschema.Draft202012Validator(doc, registry=registry, format_checker=checker)
    return InputSchemas(validators, _compile_fast(docs))


def _compile_fast(docs: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """fastjsonschema twins of the record schemas (it speaks draft-07, so translate: cross-file
    `$ref`s are inlined as prefixed local `$defs`; dependentSchemas/dependentRequired become
    `dependencies`). tests/test_inputs.py checks the twins reject the whole invalid corpus."""
    import fastjsonschema

    stems = {doc["$id"]: name.removesuffix(".schema.json").replace("-", "_") for name, doc in docs.items()}
    all_defs: dict[str, Any] = {}
    for doc in docs.values():
        for key, sub in (doc.get("$defs") or {}).items():
            all_defs[f"{stems[doc['$id']]}__{key}"] = _to_draft7(sub, doc["$id"], stems)
    out: dict[str, Any] = {}
    formats = {"date-time": lambda v: _is_datetime(v) is True}
    for name in RECORD_TYPES:
        doc = docs[f"{name}.schema.json"]
        schema = _to_draft7(
            {k: v for k, v in doc.items() if k not in ("$defs", "$id", "$schema")}, doc["$id"], stems
        )
        schema["$schema"] = "http://json-schema.org/draft-07/schema#"
        schema["definitions"] = all_defs
        out[name] = fastjsonschema.compile(schema, formats=formats)
    return out


def _to_draft7(node: Any, base: str, stems: Mapping[str, str]) -> Any:
    if isinstance(node, list):
        return [_to_draft7(x, base, stems) for x in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    deps: dict[str, Any] = {}
    for key, value in node.items():
        if key == "$ref" and isinstance(value, str):
            uri, _, frag = value.partition("#")
            name = frag.rsplit("/", 1)[-1]
            out[key] = f"#/definitions/{stems[uri or base]}__{name}"
        elif key == "dependentSchemas":
            deps.update({k: _to_draft7(v, base, stems) for k, v in value.items()})
        elif key == "dependentRequired":
            deps.update(value)
        else:
            out[key] = _to_draft7(value, base, stems)
    if deps:
        out["dependencies"] = deps
    return out


@lru_cache(maxsize=4)
def _schemas_at(path: Path | None) -> InputSchemas:
    return load_input_schemas(path)


def check_record(record: Any, schemas: InputSchemas | None = None) -> dict[str, Any]:
    """Check one KAP record against the given schemas (default: the shipped ones, loaded once).

    >>> check_record({"record": "organization", "id": "org-1", "kind": "clinic", "name": "Example KAP Clinic"})["id"]
    'org-1'
    """
    return (schemas or _schemas_at(None)).check(record)
