"""`fhir-kap map | import | validate`: KAP records ⇄ FHIR, and FHIR validation.

Room: cli/ (layer 4, entry point): may import any room (heavy imports inside the handlers); nothing imports it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any

from ._io import open_input, progress, write_json

VERSIONS = ("4.0.1", "5.0.0", "R4", "R5")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "map",
        help="KAP records (JSON or NDJSON) → FHIR JSON",
        description="Check KAP records, map them to FHIR and validate the result. "
        "Writes a collection Bundle (or NDJSON) to stdout; problems go to "
        "stderr as one OperationOutcome. Exit 0 all mapped, 1 any invalid.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="JSON or NDJSON files; - for stdin")
    p.add_argument(
        "--fhir-version",
        choices=VERSIONS,
        default=None,
        help="FHIR release to write (default from settings: 4.0.1)",
    )
    p.add_argument("--ndjson", action="store_true", help="one resource per line instead of a Bundle")
    p.set_defaults(handler=cmd_map)

    p = sub.add_parser(
        "import",
        help="FHIR resources or Bundles (R4 or R5) → KAP records",
        description="Validate FHIR resources (any type, any Bundle type, as EHRs write them) and map "
        "them to KAP records: NDJSON on stdout, each record once (a resource sent twice is "
        "recognised by its business identifier); every issue (errors, warnings, information) "
        "on stderr as one OperationOutcome. Exit 0 all imported, 1 any invalid.",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument(
        "--fhir-version",
        choices=VERSIONS,
        default=None,
        help="release of the input (default: detected per resource)",
    )
    p.add_argument(
        "--context",
        nargs="+",
        default=[],
        metavar="FILE",
        help="FHIR resources or Bundles that references may resolve to (patients, practitioners, ...); "
        "they are not imported themselves",
    )
    p.set_defaults(handler=cmd_import)

    p = sub.add_parser(
        "validate",
        help="validate FHIR resources against base FHIR and the KAP profiles",
        description="Prints one line per document (its errors and warnings indented below it) and a "
        "summary; --format json prints one OperationOutcome per document instead. Exit 0 all valid, "
        "1 any invalid, 2 unreadable input.",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument(
        "--fhir-version",
        choices=VERSIONS,
        default=None,
        help="release to validate against (default: detected per resource, else settings)",
    )
    p.add_argument(
        "--profile",
        choices=("kap", "base"),
        default="kap",
        help="kap: base FHIR + KAP profiles (default); base: base FHIR only",
    )
    p.add_argument(
        "--no-models", action="store_true", help="skip the extra fhir.resources model check (faster)"
    )
    p.add_argument(
        "--format",
        choices=("text", "json"),
        default="text",
        help="text: one line per document (default); json: one OperationOutcome per document",
    )
    p.set_defaults(handler=cmd_validate)


def _documents(paths: list[str]) -> Iterator[tuple[str, Any]]:
    from ..jsonio import iter_documents

    for path in paths:
        with open_input(path) as stream:
            yield from iter_documents(stream, source="stdin" if path == "-" else path)


def _release(args: argparse.Namespace, settings: Any) -> Any:
    from ..config import Release

    return Release.parse(args.fhir_version) if args.fhir_version else settings.fhir_version


def _report(failed: list[Any], more: Any = ()) -> None:
    """One OperationOutcome on stderr for every problem of the run."""
    from ..errors import operation_outcome
    from ..records.pipeline import labelled
    from . import print_outcome

    issues = [i for o in failed for i in labelled(o.label, o.error.issues)] + list(more)
    print_outcome(operation_outcome(issues))


def cmd_map(args: argparse.Namespace, settings: Any) -> int:
    from ..errors import KapError
    from ..jsonio import dumps
    from ..records.pipeline import Pipeline

    release = _release(args, settings)
    pipeline = Pipeline.load()
    out = sys.stdout.buffer
    failed = []
    first = True
    if not args.ndjson:
        out.write(b'{"resourceType":"Bundle","type":"collection","entry":[\n')
    unreadable: KapError | None = None
    try:
        for outcome in progress(
            pipeline.map_documents(_documents(args.files), release, kept=True), args, unit="record"
        ):
            if not outcome.ok:
                failed.append(outcome)
                continue
            if args.ndjson:
                out.write(dumps(outcome.result) + b"\n")
            else:
                out.write((b"" if first else b",\n") + dumps({"resource": outcome.result}))
                first = False
    except KapError as exc:  # unreadable input: stop, but leave stdout a complete document
        unreadable = exc
    if not args.ndjson:
        out.write(b"\n]}\n")
    out.flush()
    if failed or unreadable is not None:
        _report(failed, unreadable.issues if unreadable is not None else ())
    if unreadable is not None:
        return unreadable.exit_code
    return 1 if failed else 0


def cmd_import(args: argparse.Namespace, settings: Any) -> int:
    from ..config import Release
    from ..errors import Issue, operation_outcome
    from ..fhir.references import ResourceIndex
    from ..jsonio import dumps
    from ..records.pipeline import Pipeline, labelled
    from . import print_outcome

    release = Release.parse(args.fhir_version) if args.fhir_version else None
    pipeline = Pipeline.load()
    context = ResourceIndex()
    for _, doc in _documents(args.context):
        entries = doc.get("entry") if isinstance(doc, dict) and doc.get("resourceType") == "Bundle" else None
        if isinstance(entries, list):
            for e in entries:
                if isinstance(e, dict):
                    full = e.get("fullUrl")
                    context.add(e.get("resource"), full_url=full if isinstance(full, str) else None)
        else:
            context.add(doc)
    failed = False
    issues: list[Issue] = []
    seen: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
    imports = pipeline.import_documents(
        _documents(args.files), release, default=settings.fhir_version, context=context
    )
    for outcome in progress(imports, args, unit="record"):
        issues += labelled(outcome.label, outcome.error.issues if outcome.error else outcome.issues)
        if not outcome.ok:
            failed = True
            continue
        record = outcome.result
        if record is None:
            continue
        key = (str(record.get("record")), str(record.get("id")))
        first = seen.get(key)
        if first is not None and first[1] == record:
            issues.append(
                Issue(
                    "information",
                    "duplicate",
                    f"{outcome.label}: same {key[0]} record {key[1]} as {first[0]} (same business "
                    "identifier, same content): written once",
                    rule="import:duplicate",
                )
            )
            continue
        if first is not None:
            issues.append(
                Issue(
                    "information",
                    "duplicate",
                    f"{outcome.label}: {key[0]} record {key[1]} again (same business identifier) with other "
                    f"content than {first[0]}: written again, the later one is current",
                    rule="import:duplicate",
                )
            )
        seen[key] = (outcome.label, record)
        sys.stdout.buffer.write(dumps(record) + b"\n")
    sys.stdout.flush()
    if issues:
        print_outcome(operation_outcome(issues))
    return 1 if failed else 0


def cmd_validate(args: argparse.Namespace, settings: Any) -> int:
    from ..config import Release
    from ..errors import Issue, operation_outcome
    from ..validation import Validator, detect_release

    given = Release.parse(args.fhir_version) if args.fhir_version else None
    any_invalid = False
    counts = {False: 0, True: 0}  # valid, invalid
    for label, doc in _documents(args.files):
        if not isinstance(doc, dict) or not isinstance(doc.get("resourceType"), str):
            issues = [
                Issue(
                    "error",
                    "structure",
                    "not a FHIR resource: a JSON object with a resourceType is expected",
                    expression=None,
                    pointer="",
                    rule="fhir:resourceType",
                )
            ]
            release = given or settings.fhir_version
        else:
            release = given or detect_release(doc) or settings.fhir_version
            issues = Validator.load(release).validate(
                doc, profile=args.profile == "kap", models=not args.no_models
            )
        invalid = any(i.is_error for i in issues)
        any_invalid |= invalid
        counts[invalid] += 1
        if args.format == "json":
            outcome = operation_outcome(issues)
            outcome["extension"] = [
                {
                    "url": "http://fhir-kap.example/StructureDefinition/validated-document",
                    "valueString": label,
                },
                {
                    "url": "http://fhir-kap.example/StructureDefinition/fhir-version",
                    "valueString": release.value,
                },
            ]
            write_json(outcome)
        else:
            _validation_lines(label, release.value, issues)
    if args.format == "text":
        total = counts[False] + counts[True]
        print(f"{total} document{'s' if total != 1 else ''}: {counts[False]} valid, {counts[True]} invalid")
    return 1 if any_invalid else 0


def _validation_lines(label: str, version: str, issues: list[Any]) -> None:
    """`OK  file (4.0.1)` or `INVALID  file (4.0.1): N errors`, then one indented line per issue
    worth reading (errors and warnings): severity, rule, where, and the sentence."""
    errors = [i for i in issues if i.is_error]
    shown = [i for i in issues if i.severity in ("fatal", "error", "warning")]
    if errors:
        head = f"INVALID  {label} ({version}): {len(errors)} error{'s' if len(errors) != 1 else ''}"
    else:
        warnings = len(shown)
        head = f"OK       {label} ({version})" + (
            f": {warnings} warning{'s' if warnings != 1 else ''}" if warnings else ""
        )
    lines = [head]
    for i in shown:
        where = i.expression or i.pointer or ""
        lines.append(f"  {i.severity:<7} {i.rule or '-':<28} {where}  {i.message}")
    sys.stdout.write("\n".join(lines) + "\n")
