"""The mapping engine: golden outputs, base FHIR validity, identifiers/labels, and load-time checks."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from fhir_kap.config import CANONICAL, CS, Release
from fhir_kap.errors import MappingError
from fhir_kap.fhir.release import parse_model
from fhir_kap.records.mapping import Mapper, detect_release

ROOT = Path(__file__).resolve().parents[2]
RECORDS = sorted((ROOT / "profiles" / "examples" / "records").glob("*.json"))
MAPPINGS = ROOT / "mappings"


def _golden():
    spec = importlib.util.spec_from_file_location("make_examples", MAPPINGS / "build" / "make_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.golden_files()


GOLDEN = _golden()


@pytest.fixture(scope="module")
def mapper() -> Mapper:
    return Mapper.load(MAPPINGS)


def _record(name: str) -> dict:
    return json.loads((ROOT / "profiles" / "examples" / "records" / name).read_text())


@pytest.mark.parametrize("path", sorted(GOLDEN), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_mapped_example__matches_golden_file_byte_for_byte(path):
    assert path.exists(), "run python3 mappings/build/make_examples.py"
    assert path.read_bytes() == GOLDEN[path]


def test_golden_folders__hold_no_stale_files():
    for release in Release:
        on_disk = set((ROOT / "profiles" / "examples" / release.short).glob("*.json"))
        assert on_disk == {p for p in GOLDEN if p.parent.name == release.short}


@pytest.mark.parametrize("path", sorted(GOLDEN), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_golden_file__is_valid_base_fhir(path):
    release = Release.R4 if path.parent.name == "r4" else Release.R5
    parse_model(json.loads(path.read_bytes()), release)


@pytest.mark.parametrize("release", list(Release))
@pytest.mark.parametrize("path", RECORDS, ids=lambda p: p.name)
def test_every_resource__has_business_identifier_and_id(mapper, path, release):
    record = json.loads(path.read_text())
    resource = mapper.to_fhir(record, release)
    assert resource["id"] == record["id"]
    assert any(
        i["value"] == record["id"] and i["system"].startswith(f"{CANONICAL}/sid/")
        for i in resource["identifier"]
    )


@pytest.mark.parametrize("release", list(Release))
@pytest.mark.parametrize(
    "name,profile,tags",
    [
        (
            "referral-ref-0001.json",
            "kap-referral",
            {"care-coordination", "treatment-history", "risk-considerations"},
        ),
        ("session-ses-dose-02.json", "kap-session", {"session-dates", "safety"}),
        ("session-ses-screen-01.json", "kap-session", {"session-dates", "care-coordination"}),
        ("session-ses-intake-01.json", "kap-session", {"session-dates"}),
        ("consent-consent-0001.json", "kap-release-of-information", set()),
        ("note-note-0003.json", "kap-continuity-note", set()),
    ],
)
def test_kap_resources__carry_profile_security_labels_and_category_tags(mapper, release, name, profile, tags):
    resource = mapper.to_fhir(_record(name), release)
    meta = resource["meta"]
    assert meta["profile"] == [f"{CANONICAL}/StructureDefinition/{profile}"]
    assert {(s["system"], s["code"]) for s in meta["security"]} == {
        (CS.V3_CONFIDENTIALITY, "R"),
        (CS.V3_ACTCODE, "PSY"),
    }
    assert {t["code"] for t in meta.get("tag", [])} == tags


@pytest.mark.parametrize("release,when", [(Release.R4, "performedPeriod"), (Release.R5, "occurrencePeriod")])
def test_session_time__uses_the_release_specific_element(mapper, release, when):
    resource = mapper.to_fhir(_record("session-ses-dose-01.json"), release)
    assert resource[when] == {"start": "2024-03-18T09:00:00-04:00", "end": "2024-03-18T11:00:00-04:00"}


def test_r5_note__carries_text_as_utf8_base64_attachment(mapper):
    resource = mapper.to_fhir(_record("note-note-0001.json"), Release.R5)
    att = resource["payload"][0]["contentAttachment"]
    assert att["contentType"] == "text/plain; charset=utf-8"
    import base64

    assert base64.b64decode(att["data"]).decode() == _record("note-note-0001.json")["text"]


def test_r5_consent__has_decision_grantee_and_nested_provisions(mapper):
    record = _record("consent-consent-0001.json") | {"excluded_categories": ["safety"]}
    resource = mapper.to_fhir(record, Release.R5)
    # R5: decision is the base rule (deny), provision[0] its exception (the grant), nested = exclusions
    assert resource["decision"] == "deny" and "scope" not in resource
    assert resource["grantee"] == [r["reference"] for r in resource["provision"][0]["actor"]]
    assert resource["provision"][0]["provision"][0]["code"][0]["coding"][0]["code"] == "safety"
    r4 = mapper.to_fhir(record, Release.R4)
    assert r4["provision"]["type"] == "permit" and r4["provision"]["provision"][0]["type"] == "deny"


def test_unknown_local_code__raises_mapping_error_naming_table_and_field(mapper):
    record = _record("session-ses-dose-01.json")
    record["dosing"]["route"] = "rectal"
    record["adverse_effects"] = [{"effect": "hiccups", "management": "None needed."}]
    with pytest.raises(MappingError) as exc:
        mapper.to_fhir(record, Release.R4)
    issues = {(i.rule, i.pointer) for i in exc.value.issues}
    assert issues == {
        ("code-table:route", "/dosing/route"),
        ("code-table:adverse-effect", "/adverse_effects/0/effect"),
    }
    assert "'rectal'" in str(exc.value) and "route" in str(exc.value)


def test_unknown_record_type__raises_mapping_error(mapper):
    with pytest.raises(MappingError, match="No mapping for record type"):
        mapper.to_fhir({"record": "diary", "id": "d"}, Release.R4)


def test_unknown_resource_type__raises_mapping_error(mapper):
    with pytest.raises(MappingError, match="Observation"):
        mapper.from_fhir({"resourceType": "Observation", "id": "o"})


def test_inbound_reference_of_wrong_type__names_the_element(mapper):
    resource = json.loads((ROOT / "profiles/examples/r4/Procedure-ses-dose-01.json").read_text())
    resource["subject"] = {"reference": "Group/g1"}
    with pytest.raises(MappingError) as exc:
        mapper.from_fhir(resource, Release.R4)
    assert exc.value.issues[0].expression == "Procedure.subject"


def test_inbound_r4_procedure_with_performed_datetime__is_read(mapper):
    resource = json.loads((ROOT / "profiles/examples/r4/Procedure-ses-prep-01.json").read_text())
    del resource["performedPeriod"]
    resource["performedDateTime"] = "2024-03-11T10:00:00-05:00"
    record = mapper.from_fhir(resource)
    assert record["start"] == "2024-03-11T10:00:00-05:00" and "end" not in record


@pytest.mark.parametrize("path", sorted(GOLDEN), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_detect_release__recognises_every_golden_resource(path):
    resource = json.loads(path.read_bytes())
    expected = Release.R4 if path.parent.name == "r4" else Release.R5
    if resource["resourceType"] in ("Patient", "Practitioner", "PractitionerRole") or (
        resource["resourceType"] == "Organization" and "contact" not in resource and "telecom" not in resource
    ):
        expected = Release.R4  # identical in both releases
    assert detect_release(resource) is expected


def test_record_types__lists_every_kap_record_type(mapper):
    assert mapper.record_types() == [
        "client",
        "consent",
        "note",
        "organization",
        "practitioner",
        "practitioner-role",
        "referral",
        "session",
    ]


def _copy_mappings(tmp_path: Path) -> Path:
    dest = tmp_path / "mappings"
    shutil.copytree(MAPPINGS, dest, ignore=shutil.ignore_patterns("build", "__pycache__"))
    return dest


@pytest.mark.parametrize(
    "file,old,new,pointer,rule",
    [
        (
            "session.yaml",
            "path: status}",
            "path: status, colour: red}",
            "/rules/10",
            "mapping-schema:additionalProperties",
        ),
        (
            "session.yaml",
            "- {field: status, path: status}",
            "- {field: status}",
            "/rules/10",
            "mapping-schema:required",
        ),
        (
            "referral.yaml",
            "path: intent, value: order",
            "path: intent, value: order, field: status",
            "/rules/9",
            "mapping-schema:not",
        ),
        (
            "codes/route.yaml",
            'code: "78421000"',
            "code: 78421000",
            "/concepts/im/coding/0/code",
            "mapping-schema:type",
        ),
        (
            "note.yaml",
            "resourceType: Communication",
            "resourceType: communication",
            "/resourceType",
            "mapping-schema:pattern",
        ),
        (
            "session.yaml",
            "transform: quantity",
            "transform: no-such-transform",
            "/rules/4/transform",
            "mapping:transform",
        ),
        (
            "session.yaml",
            "args: {table: route}",
            "args: {table: routes}",
            "/rules/3/args/table",
            "mapping:code-table",
        ),
        (
            "session.yaml",
            'path: "basedOn[0]"',
            'path: "basedOn[0"',
            "/rules/9/path",
            "mapping-schema:pattern",
        ),
    ],
)
def test_bad_mapping_file__is_rejected_at_load_naming_file_and_pointer(
    tmp_path, file, old, new, pointer, rule
):
    root = _copy_mappings(tmp_path)
    target = root / file
    text = target.read_text()
    assert old in text
    target.write_text(text.replace(old, new, 1))
    with pytest.raises(MappingError) as exc:
        Mapper.load(root)
    hits = [(i.pointer, i.rule) for i in exc.value.issues]
    assert (pointer, rule) in hits, hits
    assert Path(file).name in str(exc.value)


def test_unparseable_yaml__is_a_clear_mapping_error(tmp_path):
    root = _copy_mappings(tmp_path)
    (root / "note.yaml").write_text("record: note\nrules: [\n")
    with pytest.raises(MappingError, match="note.yaml cannot be read"):
        Mapper.load(root)


def test_r4_consent_signed_with_a_time__imports_and_keeps_the_day_in_r5():
    """EHRs send Consent.dateTime with a time; R5 Consent.date only holds the day."""
    from fhir_kap.records.pipeline import Pipeline

    pipeline = Pipeline.load()
    resource = json.loads((ROOT / "profiles" / "examples" / "r4" / "Consent-consent-0001.json").read_text())
    resource["dateTime"] = "2025-01-10T09:00:00Z"
    record = pipeline.from_fhir(resource, Release.R4)
    assert record["signed"] == "2025-01-10T09:00:00Z"
    assert pipeline.to_fhir(record, Release.R4)["dateTime"] == "2025-01-10T09:00:00Z"
    assert pipeline.to_fhir(record, Release.R5)["date"] == "2025-01-10"


@pytest.mark.parametrize("release", list(Release))
@pytest.mark.parametrize(
    "extra,tags",
    [
        ({}, {"session-dates"}),
        (
            {"dosing": {"medication": "ketamine", "route": "im", "dose_mg": 50, "support_person": True}},
            {"session-dates", "safety"},
        ),
        ({"monitoring": [{"time": "2024-03-18T09:00:00-04:00", "spo2": 98}]}, {"session-dates", "safety"}),
        ({"adverse_effects": [{"effect": "nausea", "management": "rested"}]}, {"session-dates", "safety"}),
        ({"clearance": {"outcome": "eligible"}}, {"session-dates", "care-coordination"}),
        (
            {
                "clearance": {
                    "outcome": "not-eligible",
                    "contraindications": ["uncontrolled-hypertension", "psychosis-history"],
                }
            },
            {"session-dates", "care-coordination", "contraindications"},
        ),
    ],
)
def test_session_tags__name_every_kind_of_information_present(mapper, release, extra, tags):
    base = {
        k: v
        for k, v in _record("session-ses-intake-01.json").items()
        if k not in ("dosing", "monitoring", "adverse_effects", "clearance")
    }
    resource = mapper.to_fhir(base | extra, release)
    codes = [t["code"] for t in resource["meta"]["tag"]]
    assert set(codes) == tags and len(codes) == len(tags)  # one tag per category, however many items
    assert all(t["system"] == CS.INFO_CATEGORY for t in resource["meta"]["tag"])
    assert "meta" not in set(mapper.from_fhir(resource, release))  # tags are derived, never read back


@pytest.mark.parametrize("release", list(Release))
@pytest.mark.parametrize(
    "record,system",
    [
        ("practitioner-prac-ther-01.json", f"{CANONICAL}/sid/practitioner"),
        ("organization-org-practice-01.json", f"{CANONICAL}/sid/organization"),
        ("practitioner-role-role-ther-01.json", f"{CANONICAL}/sid/practitioner-role"),
    ],
)
def test_party_identifier__system_is_per_resource_type(mapper, release, record, system):
    rec = _record(record)
    resource = mapper.to_fhir(rec, release)
    assert {"system": system, "value": rec["id"]} in resource["identifier"]
    assert not any(i["system"] == f"{CANONICAL}/sid/party" for i in resource["identifier"])
    assert mapper.from_fhir(resource, release)["id"] == rec["id"]


def test_r5_consent_with_decision_permit__is_not_imported_as_a_grant():
    """Under decision permit an R5 provision is an exception; reading it as the grant would invert it."""
    from fhir_kap.errors import InputError
    from fhir_kap.records.pipeline import Pipeline

    resource = json.loads((ROOT / "profiles" / "examples" / "r5" / "Consent-consent-0001.json").read_text())
    resource["decision"] = "permit"
    with pytest.raises(InputError) as exc:
        Pipeline.load().from_fhir(resource, Release.R5)
    assert exc.value.issues[0].rule == "consent:r5-decision"
