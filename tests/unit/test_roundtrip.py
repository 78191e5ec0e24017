"""record -> FHIR -> record is lossless, for the samples and for generated records, in R4 and R5."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhir_kap.config import Release
from fhir_kap.fhir.release import parse_model
from fhir_kap.records.inputs import load_input_schemas
from fhir_kap.records.mapping import Mapper

ROOT = Path(__file__).resolve().parents[2]
RECORDS = sorted((ROOT / "profiles" / "examples" / "records").glob("*.json"))
MAPPER = Mapper.load(ROOT / "mappings")
SCHEMAS = load_input_schemas(ROOT / "profiles" / "input")


@pytest.mark.parametrize("release", list(Release), ids=lambda r: r.short)
@pytest.mark.parametrize("path", RECORDS, ids=lambda p: p.name)
def test_sample_record__survives_the_round_trip(path, release):
    record = json.loads(path.read_text())
    resource = MAPPER.to_fhir(record, release)
    assert MAPPER.from_fhir(resource, release) == record
    assert MAPPER.from_fhir(resource) == record  # release detected from the shape


# -- strategies: one per record type, drawing only values the input schemas accept ----------------

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9\-\.]{0,20}", fullmatch=True)
words = (
    st.text(st.characters(codec="utf-8", categories=("L", "N", "P", "Zs")), min_size=1, max_size=40)
    .map(str.strip)
    .filter(bool)
)
texts = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")) | st.sampled_from("\n\t"),
    min_size=1,
    max_size=200,
).filter(lambda s: s.strip() and ":" not in s)
dates = st.dates().map(lambda d: d.isoformat()).filter(lambda s: len(s) == 10)
datetimes = st.builds(
    lambda d, h, m, s, z: f"{d}T{h:02d}:{m:02d}:{s:02d}{z}",
    dates,
    st.integers(0, 23),
    st.integers(0, 59),
    st.integers(0, 59),
    st.sampled_from(["Z", "+00:00", "-05:00", "+05:30", "+14:00"]),
)
identifiers = st.fixed_dictionaries(
    {
        "system": st.sampled_from(
            [
                "http://hl7.org/fhir/sid/us-npi",
                "http://practice.example/sid/mrn",
                "urn:oid:2.16.840.1.113883.4.6",
            ]
        ),
        "value": st.from_regex(r"[A-Za-z0-9]{1,12}", fullmatch=True),
    }
)
party_refs = st.one_of(
    st.builds(
        lambda k, v: {k: v}, st.sampled_from(["practitioner", "practitioner_role", "organization"]), ids
    ),
    st.builds(lambda i: {"identifier": i}, identifiers),
    st.builds(lambda v, i: {"organization": v, "identifier": i}, ids, identifiers),
)
names = st.fixed_dictionaries(
    {"family": words},
    optional={
        "given": st.lists(words, min_size=1, max_size=3),
        "prefix": st.lists(words, min_size=1, max_size=2),
    },
)
telecoms = st.lists(
    st.fixed_dictionaries({"system": st.sampled_from(["phone", "email", "fax", "url"]), "value": words}),
    min_size=1,
    max_size=3,
)
categories = [
    "session-dates",
    "response-themes",
    "safety",
    "care-coordination",
    "treatment-history",
    "risk-considerations",
    "contraindications",
]


def rec(kind, required, optional=None):
    return st.fixed_dictionaries({"record": st.just(kind), "id": ids, **required}, optional=optional or {})


clients = rec(
    "client",
    {"name": names},
    {
        "gender": st.sampled_from(["male", "female", "other", "unknown"]),
        "birth_date": dates,
        "telecom": telecoms,
        "other_identifiers": st.lists(identifiers, min_size=1, max_size=2),
    },
)
practitioners = rec(
    "practitioner",
    {"name": names},
    {"npi": st.from_regex(r"\d{10}", fullmatch=True), "qualification": words, "telecom": telecoms},
)
roles = rec(
    "practitioner-role",
    {
        "practitioner": ids,
        "organization": ids,
        "role": st.sampled_from(["referring-therapist", "prescriber", "clinic-therapist"]),
    },
    {"active": st.booleans(), "telecom": telecoms},
)
organizations = rec(
    "organization",
    {"kind": st.sampled_from(["practice", "clinic"]), "name": words},
    {
        "npi": st.from_regex(r"\d{10}", fullmatch=True),
        "telecom": telecoms,
        "other_identifiers": st.lists(
            identifiers.filter(lambda i: i["system"] != "http://hl7.org/fhir/sid/us-npi"),
            min_size=1,
            max_size=2,
        ),
    },
)
contexts = st.lists(
    st.fixed_dictionaries(
        {
            "category": st.sampled_from(["treatment-history", "risk-considerations", "contraindications"]),
            "summary": texts,
        }
    ),
    min_size=1,
    max_size=3,
)
referrals = rec(
    "referral",
    {
        "status": st.sampled_from(["draft", "active", "on-hold", "revoked", "completed", "entered-in-error"]),
        "client": ids,
        "referrer": party_refs,
        "clinic": ids,
        "authored": datetimes,
        "reason": texts,
        "collaboration_model": st.sampled_from(["dosing-only", "clinic-prep-integration", "shared"]),
    },
    {
        "goals": st.lists(texts, min_size=1, max_size=3),
        "readiness": st.sampled_from(["ready", "needs-preparation", "not-ready"]),
        "anticipated_dosing_sessions": st.integers(1, 50),
        "clinical_context": contexts,
        "consent": ids,
    },
).map(lambda r: r if "clinical_context" not in r or "consent" in r else {**r, "consent": "consent-1"})
readings = st.fixed_dictionaries(
    {"time": datetimes},
    optional={
        "systolic": st.integers(40, 300),
        "diastolic": st.integers(20, 200),
        "heart_rate": st.integers(20, 250),
        "spo2": st.integers(50, 100),
    },
).filter(lambda m: len(m) >= 2)
dosings = st.fixed_dictionaries(
    {
        "medication": st.just("ketamine"),
        "route": st.sampled_from(["im", "sublingual", "iv", "nasal"]),
        "dose_mg": st.one_of(st.integers(1, 1000), st.decimals(1, 500, places=2).map(float)),
        "support_person": st.booleans(),
    }
)
effects = st.lists(
    st.fixed_dictionaries(
        {
            "effect": st.sampled_from(
                ["nausea", "vomiting", "dizziness", "headache", "anxiety", "elevated-blood-pressure"]
            ),
            "management": texts,
        }
    ),
    min_size=1,
    max_size=3,
)
session_base = {
    "status": st.sampled_from(
        ["preparation", "in-progress", "not-done", "on-hold", "stopped", "completed", "entered-in-error"]
    ),
    "client": ids,
    "referral": ids,
    "start": datetimes,
    "performers": st.lists(ids, min_size=1, max_size=3),
}
sessions = st.one_of(
    rec(
        "session",
        {**session_base, "kind": st.just("dosing"), "dosing": dosings},
        {
            "end": datetimes,
            "monitoring": st.lists(readings, min_size=1, max_size=4),
            "adverse_effects": effects,
        },
    ),
    rec(
        "session",
        {
            **session_base,
            "kind": st.just("screening"),
            "clearance": st.fixed_dictionaries(
                {"outcome": st.sampled_from(["eligible", "not-eligible", "deferred"])},
                optional={
                    "contraindications": st.lists(
                        st.sampled_from(["uncontrolled-hypertension", "psychosis-history", "pregnancy"]),
                        min_size=1,
                        max_size=3,
                    )
                },
            ),
        },
        {"end": datetimes},
    ),
    rec(
        "session",
        {**session_base, "kind": st.sampled_from(["intake", "preparation", "integration"])},
        {"end": datetimes},
    ),
)
consents = rec(
    "consent",
    {
        "status": st.sampled_from(["draft", "active", "inactive", "rejected", "entered-in-error"]),
        "client": ids,
        "signed": dates,
        "clinic": ids,
        "recipients": st.lists(party_refs, min_size=1, max_size=3),
        "categories": st.lists(st.sampled_from(categories), min_size=1, max_size=4, unique=True),
        "purposes": st.lists(
            st.sampled_from(["TREAT", "COC", "ETREAT", "PATRQT"]), min_size=1, max_size=3, unique=True
        ),
        "period": st.fixed_dictionaries({"start": dates}, optional={"end": dates}),
    },
    {"excluded_categories": st.lists(st.sampled_from(categories), min_size=1, max_size=2, unique=True)},
)
attachments = st.lists(
    st.fixed_dictionaries(
        {
            "content_type": st.sampled_from(["application/pdf", "text/plain; charset=utf-8"]),
            "data": st.binary(min_size=1, max_size=40).map(lambda b: base64.b64encode(b).decode()),
        },
        optional={"title": words},
    ),
    min_size=1,
    max_size=2,
)
notes = rec(
    "note",
    {
        "status": st.sampled_from(["completed", "in-progress", "entered-in-error"]),
        "category": st.sampled_from(categories),
        "client": ids,
        "sender": party_refs,
        "recipients": st.lists(party_refs, min_size=1, max_size=3),
        "text": texts,
    },
    {
        "referral": ids,
        "about_sessions": st.lists(ids, min_size=1, max_size=3),
        "sent": datetimes,
        "in_reply_to": ids,
        "attachments": attachments,
        "note_type": st.sampled_from(["progress-note", "consult-note", "referral-note"]),
    },
)

STRATEGIES = {
    "client": clients,
    "practitioner": practitioners,
    "practitioner-role": roles,
    "organization": organizations,
    "referral": referrals,
    "session": sessions,
    "consent": consents,
    "note": notes,
}


def test_strategies__cover_every_record_type():
    assert set(STRATEGIES) == set(MAPPER.record_types())


@pytest.mark.parametrize("release", list(Release), ids=lambda r: r.short)
@pytest.mark.parametrize("kind", sorted(STRATEGIES))
def test_generated_record__survives_the_round_trip(kind, release):
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(STRATEGIES[kind])
    def check(record):
        SCHEMAS.check(record)  # the strategy only draws valid records
        resource = MAPPER.to_fhir(record, release)
        assert MAPPER.from_fhir(resource, release) == record

    check()


@pytest.mark.parametrize("release", list(Release), ids=lambda r: r.short)
@pytest.mark.parametrize("kind", ["session", "consent", "note", "referral"])
def test_generated_record__maps_to_valid_base_fhir(kind, release):
    @settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(STRATEGIES[kind])
    def check(record):
        parse_model(MAPPER.to_fhir(record, release), release)

    check()
