"""The one inbound path (records.ingest) and what a record keeps of its FHIR (records.carry):
record ids from business identifiers, references in every form, foreign codes, unknown
extensions, clinical context, and the round trip import -> map."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from fhir_kap.config import Release
from fhir_kap.errors import InputError
from fhir_kap.fhir.references import ResourceIndex
from fhir_kap.records.carry import apply_kept, kept, not_carried
from fhir_kap.records.ingest import record_id
from fhir_kap.records.pipeline import Pipeline

EHR = Path(__file__).resolve().parents[1] / "data" / "ehr"
MRN_SYSTEM = "urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14"


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline.load()


def _load(name: str) -> dict:
    return json.loads((EHR / name).read_text())


def _ingest(pipeline: Pipeline, doc: dict, context=None):
    return pipeline.ingest.document("doc", doc, context=context)


def _rules(outcomes) -> set[str]:
    return {i.rule for o in outcomes for i in o.issues}


def test_record_ids_come_from_business_identifiers_never_from_the_server_id():
    own = {"id": "srv-1", "identifier": [{"system": "http://fhir-kap.example/sid/referral", "value": "r-7"}]}
    assert record_id("ServiceRequest", own) == ("r-7", True)
    other = {"id": "srv-2", "identifier": [{"system": "urn:oid:1.2.3", "value": "REF 9/1"}]}
    rid, from_ident = record_id("ServiceRequest", other)
    assert from_ident and rid.startswith("REF-9-1-") and "srv" not in rid
    # the same value in another system is another record
    assert (
        record_id("ServiceRequest", {"identifier": [{"system": "urn:oid:1.2.4", "value": "REF 9/1"}]})[0]
        != rid
    )
    npi = {"identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1745302814"}]}
    assert record_id("Practitioner", npi) == ("npi-1745302814", True)
    # no identifier: a content hash, the same for the same content whatever the server id
    a, b = {"id": "x", "status": "active"}, {"id": "y", "status": "active"}
    assert record_id("ServiceRequest", a) == record_id("ServiceRequest", b)
    assert record_id("ServiceRequest", a)[1] is False


def test_contained_parties_become_party_records_and_the_referral_names_them(pipeline):
    outs = _ingest(pipeline, _load("01-servicerequest-contained-patient-practitioner.json"))
    assert all(o.ok for o in outs), [o.error for o in outs]
    records = {o.result["record"]: o.result for o in outs if o.result}
    client, referral = records["client"], records["referral"]
    assert referral["client"] == client["id"]
    assert {"system": MRN_SYSTEM, "value": "E4000123"} in client["other_identifiers"]
    assert referral["referrer"] == {"practitioner": records["practitioner"]["id"]}
    assert records["practitioner"]["id"].startswith("npi-")


def test_a_logical_reference_nothing_resolves_is_kept_and_reported_as_a_warning(pipeline):
    doc = _load("02-servicerequest-logical-references.json")
    outs = _ingest(pipeline, doc)
    (referral,) = [o for o in outs if o.result and o.result["record"] == "referral"]
    warnings = [i for i in referral.issues if i.rule == "import:unresolved-reference"]
    assert warnings and all(i.severity == "warning" for i in warnings)
    assert not any(i.is_error for i in referral.issues)
    # the identifier is kept: mapping the record back writes it beside the literal reference
    rec = copy.deepcopy(referral.result)
    rec.setdefault("collaboration_model", "shared")
    out = pipeline.to_fhir(rec, Release.R4, kept=True)
    assert out["subject"]["identifier"] == doc["subject"]["identifier"]


def test_the_context_resolves_a_logical_reference_to_the_party_it_names(pipeline):
    doc = _load("02-servicerequest-logical-references.json")
    mrn = doc["subject"]["identifier"]
    patient = {
        "resourceType": "Patient",
        "id": "p9",
        "identifier": [{"system": "http://fhir-kap.example/sid/clinic-mrn", "value": "kap-mrn-7"}, mrn],
    }
    outs = _ingest(pipeline, doc, ResourceIndex([patient]))
    (referral,) = [o.result for o in outs if o.result and o.result["record"] == "referral"]
    assert referral["client"] == "kap-mrn-7"  # the clinic MRN of the Patient the context holds
    # two Patients carrying the MRN: ambiguous, so unresolved (never a guess)
    twin = dict(patient, id="p10", identifier=[mrn])
    outs = _ingest(pipeline, doc, ResourceIndex([patient, twin]))
    (referral,) = [o.result for o in outs if o.result and o.result["record"] == "referral"]
    assert referral["client"] != "kap-mrn-7"


def test_foreign_codes_are_information_and_kept_as_they_came(pipeline):
    role = _load("13-practitionerrole-nucc.json")
    (out,) = _ingest(pipeline, role)
    assert out.ok
    info = [i for i in out.issues if (i.rule or "").startswith("code-table:")]
    assert info and all(i.severity == "information" for i in info)
    back = pipeline.to_fhir(out.result, Release.R4, kept=True)
    codes = [c["code"] for cc in back.get("code", []) for c in cc.get("coding", [])]
    assert "1041C0700X" in codes


def test_unknown_extensions_and_extensions_on_primitives_come_back_out(pipeline):
    doc = _load("19-servicerequest-primitive-extensions.json")
    outs = _ingest(pipeline, doc)
    (referral,) = [o.result for o in outs if o.result and o.result["record"] == "referral"]
    rec = copy.deepcopy(referral)
    rec.setdefault("collaboration_model", "shared")
    back = pipeline.to_fhir(rec, Release.R4, kept=True)
    assert back["_authoredOn"] == doc["_authoredOn"]
    assert back["_status"] == doc["_status"]
    vendor = [e for e in doc["extension"] if "fhir-kap.example" not in e["url"]]
    assert vendor and all(e in back["extension"] for e in vendor)


def test_clinical_context_is_kept_with_the_referral_tagged_with_its_category(pipeline):
    outs = _ingest(pipeline, _load("03-servicerequest-bser-supportinginfo.json"))
    (referral,) = [o.result for o in outs if o.result and o.result["record"] == "referral"]
    context = referral["fhir"]["context"]
    by_type = {c["resource"]["resourceType"]: c["category"] for c in context}
    assert by_type["AllergyIntolerance"] == "contraindications"  # from the code table
    assert by_type["Condition"] == "treatment-history"
    assert by_type["Observation"] == "treatment-history"  # the PHQ-9 as its sender tagged it
    # untagged, the code table decides: a PHQ-9 total score is a risk consideration
    doc = _load("03-servicerequest-bser-supportinginfo.json")
    for c in doc["contained"]:
        c.pop("meta", None)
    outs = _ingest(pipeline, doc)
    (untagged,) = [o.result for o in outs if o.result and o.result["record"] == "referral"]
    cats = {c["resource"]["resourceType"]: c["category"] for c in untagged["fhir"]["context"]}
    assert cats["Observation"] == "risk-considerations" and cats["AllergyIntolerance"] == "contraindications"
    # party references inside the kept context name the party record, never a dangling '#id'
    assert "#" not in json.dumps([c["resource"].get("subject") for c in context])


def test_a_referral_without_a_collaboration_model_imports_with_a_warning(pipeline):
    outs = _ingest(pipeline, _load("20-servicerequest-foreign-codes.json"))
    assert all(o.ok for o in outs)
    assert "import:collaboration-model" in _rules(outs)


def test_a_contained_reference_to_nothing_is_reported_never_guessed(pipeline):
    doc = _load("01-servicerequest-contained-patient-practitioner.json")
    doc["note"] = [{"authorReference": {"reference": "#nobody"}, "text": "see referral letter"}]
    outs = _ingest(pipeline, doc)
    (referral,) = [o for o in outs if o.result and o.result["record"] == "referral"]
    warned = [i for i in referral.issues if i.rule == "import:unresolved-reference"]
    assert "/note/0/authorReference" in [i.pointer for i in warned]
    # and a contained resource nothing references is invalid FHIR (dom-3): refused, named
    doc = _load("01-servicerequest-contained-patient-practitioner.json")
    doc["requester"] = {"display": "Dr. Whitfield"}
    (bad,) = _ingest(pipeline, doc)
    assert not bad.ok and {i.rule for i in bad.error.issues} >= {"dom-3"}


def test_kept_and_apply_kept_restore_what_the_mapping_lacks():
    original = {
        "resourceType": "ServiceRequest",
        "extension": [{"url": "ours", "valueString": "a"}, {"url": "vendor", "valueString": "b"}],
        "code": {"coding": [{"system": "s", "code": "1"}, {"system": "local", "code": "x"}], "text": "t"},
        "_status": {"extension": [{"url": "e", "valueCode": "c"}]},
        "status": "active",
    }
    mapped = {
        "resourceType": "ServiceRequest",
        "extension": [{"url": "ours", "valueString": "a"}],
        "code": {"coding": [{"system": "s", "code": "1"}], "text": "ours"},
        "status": "active",
    }
    ops = kept(original, mapped)
    assert {"at": "/code/text", "op": "replaced", "value": "t"} in ops
    restored = copy.deepcopy(mapped)
    assert apply_kept(restored, ops) == []
    assert restored["extension"] == original["extension"]
    assert restored["code"]["coding"] == original["code"]["coding"]
    assert restored["_status"] == original["_status"]
    assert restored["code"]["text"] == "ours"  # what the mapping writes is never overwritten
    assert not_carried("ServiceRequest", ops) == [
        "ServiceRequest._status",
        "ServiceRequest.code.coding",
        "ServiceRequest.code.text",
        "ServiceRequest.extension",
    ]


def test_a_type_kap_does_not_map_is_information_not_an_error(pipeline):
    cond = {
        "resourceType": "Condition",
        "subject": {"reference": "Patient/p"},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "35489007"}]},
    }
    (out,) = _ingest(pipeline, cond)
    assert out.ok and out.result is None
    assert {i.rule for i in out.issues} == {"import:not-a-record"}


def test_what_was_kept_comes_back_only_when_asked_and_never_lands_nowhere(pipeline):
    doc = _load("20-servicerequest-foreign-codes.json")
    (referral,) = [o.result for o in _ingest(pipeline, doc) if o.result and o.result["record"] == "referral"]
    rec = dict(referral, collaboration_model="shared")
    plain = pipeline.to_fhir(rec, Release.R4)  # the disclosure path: what the mapping writes only
    assert "note" not in plain and "priority" not in plain
    full = pipeline.to_fhir(rec, Release.R4, kept=True)
    assert full["note"] == doc["note"] and full["priority"] == doc["priority"]
    # a kept item whose place the mapped resource lacks: an error naming fhir.kept, never a silent drop
    lost = dict(rec, fhir={"kept": [{"at": "/reasonCode/3/coding", "op": "set", "value": []}]})
    with pytest.raises(InputError) as err:
        pipeline.to_fhir(lost, Release.R4, kept=True)
    assert [(i.rule, i.pointer) for i in err.value.issues] == [("carry:not-applicable", "/fhir/kept/0")]
    assert apply_kept({"resourceType": "ServiceRequest"}, lost["fhir"]["kept"]) == [
        (0, lost["fhir"]["kept"][0])
    ]


def test_a_patient_without_a_name_is_a_client_known_by_identifiers_with_a_warning(pipeline):
    """Valid FHIR but unusual (an anonymised export, a checker's minimal Patient): kept, said."""
    patient = {"resourceType": "Patient", "identifier": [{"system": MRN_SYSTEM, "value": "E4000999"}]}
    (out,) = _ingest(pipeline, patient)
    assert out.ok and out.result["record"] == "client" and "name" not in out.result
    assert "import:client-name" in {i.rule for i in out.issues}
