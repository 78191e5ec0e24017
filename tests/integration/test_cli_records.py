"""`fhir-kap map | import | validate` as a user runs them (in-process through cli.main)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from fhir_kap.cli import main

ROOT = Path(__file__).resolve().parents[2]
RECORDS = ROOT / "profiles" / "examples" / "records"
GOLDEN = ROOT / "profiles" / "examples"
INVALID = ROOT / "tests" / "data" / "fhir" / "invalid"


def _golden(release: str) -> dict[str, dict]:
    return {
        f"{d['resourceType']}/{d['id']}": d
        for d in (json.loads(p.read_text()) for p in (GOLDEN / release).glob("*.json"))
    }


def test_map__every_sample_record_gives_its_golden_r4_resource(capsys):
    assert main(["map", *map(str, sorted(RECORDS.glob("*.json")))]) == 0
    bundle = json.loads(capsys.readouterr().out)
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "collection"
    got = {f"{e['resource']['resourceType']}/{e['resource']['id']}": e["resource"] for e in bundle["entry"]}
    assert got == _golden("r4")


def test_map__ndjson_r5_from_stdin_gives_the_golden_r5_resources(capsys, monkeypatch):
    data = (RECORDS / "journey.ndjson").read_bytes()
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert main(["map", "--fhir-version", "5.0.0", "--ndjson", "-"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert {f"{d['resourceType']}/{d['id']}": d for d in lines} == _golden("r5")


def test_map__invalid_record_exits_1_with_pointer_and_rule(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(dict(json.loads((RECORDS / "session-ses-dose-01.json").read_text()), status="bogus"))
    )
    assert main(["map", str(bad)]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["entry"] == []
    issue = json.loads(captured.err)["issue"][0]
    assert (
        issue["expression"] == ["session.status"] and "rule schema:enum; at /status" == issue["diagnostics"]
    )


@pytest.mark.parametrize("release", ["r4", "r5"])
def test_import__golden_fhir_comes_back_as_the_original_records(capsys, release):
    files = sorted((GOLDEN / release).glob("*.json"))
    assert main(["import", *map(str, files)]) == 0
    records = {r["id"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    originals = {r["id"]: r for r in (json.loads(p.read_text()) for p in RECORDS.glob("*.json"))}
    assert records == originals


def test_import__a_bundle_is_unpacked_entry_by_entry(capsys, tmp_path):
    entries = [
        {"resource": json.loads(p.read_text())} for p in sorted((GOLDEN / "r4").glob("Procedure-*.json"))
    ]
    bundle = tmp_path / "bundle.json"
    bundle.write_text(json.dumps({"resourceType": "Bundle", "type": "collection", "entry": entries}))
    assert main(["import", str(bundle)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(entries)


def test_validate__valid_examples_exit_0_with_an_informational_outcome(capsys):
    files = sorted((GOLDEN / "r4").glob("*.json"))
    assert main(["validate", "--no-models", "--format", "json", *map(str, files)]) == 0
    out = capsys.readouterr().out
    assert '"severity": "error"' not in out
    # the default: one line per document and a summary
    assert main(["validate", "--no-models", *map(str, files)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(files) + 1 and all(line.startswith("OK ") for line in lines[:-1])
    assert lines[-1] == f"{len(files)} documents: {len(files)} valid, 0 invalid"


def test_validate__invalid_resource_exits_1_naming_the_expression(capsys):
    bad = str(INVALID / "r4" / "procedure-february-30.json")
    assert main(["validate", "--format", "json", bad]) == 1
    outcome = json.loads(capsys.readouterr().out)
    assert outcome["issue"][0]["expression"] == ["Procedure.performedPeriod.start"]
    assert main(["validate", bad]) == 1
    first, detail, *_ = capsys.readouterr().out.splitlines()
    assert first.startswith("INVALID  ") and bad in first
    assert "schema:calendar-date" in detail and "Procedure.performedPeriod.start" in detail


@pytest.mark.parametrize("content", [b"", b"{not json", b"\xff\xfe\x00"])
def test_validate__unreadable_input_exits_2_without_a_traceback(capsys, tmp_path, content):
    path = tmp_path / "x.json"
    path.write_bytes(content)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert json.loads(err)["resourceType"] == "OperationOutcome" and "Traceback" not in err


def test_validate__missing_file_exits_2(capsys, tmp_path):
    assert main(["validate", str(tmp_path / "nope.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_import_and_validate__agree_on_the_release_when_the_shape_does_not_tell(
    capsys, monkeypatch, tmp_path
):
    """A Patient reads the same in R4 and R5: both commands then take the deployment's release."""
    from fhir_kap.config import Release
    from fhir_kap.validation import Validator

    monkeypatch.setenv("FHIR_KAP_FHIR_VERSION", "R5")
    monkeypatch.setenv("FHIR_KAP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("FHIR_KAP_CONFIG", raising=False)
    loaded: list[Release] = []
    real = Validator.load.__func__

    def spy(cls, release, *args, **kwargs):
        loaded.append(release)
        return real(cls, release, *args, **kwargs)

    monkeypatch.setattr(Validator, "load", classmethod(spy))
    patient = str(next((GOLDEN / "r4").glob("Patient-*.json")))
    main(["validate", "--no-models", patient])
    main(["import", patient])
    capsys.readouterr()
    assert loaded[:1] == [Release.R5] and set(loaded) == {Release.R5}


def test_progress_shows_on_a_terminal_only_and_never_with_quiet(capsys, monkeypatch):
    records = str(ROOT / "profiles" / "examples" / "records" / "journey.ndjson")
    assert main(["map", "--ndjson", records]) == 0
    piped = capsys.readouterr()
    assert piped.err == ""  # piped: nothing but what a script reads
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["map", "--ndjson", records]) == 0
    shown = capsys.readouterr()
    assert "record" in shown.err and shown.out == piped.out  # the progress is on stderr only
    assert main(["--quiet", "map", "--ndjson", records]) == 0
    assert capsys.readouterr().err == ""
