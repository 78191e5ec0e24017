"""Issue 15, REST: `$validate` (type and instance level, a resource or a Parameters body with
`mode` and `profile`) answers the validator's OperationOutcome and stores nothing; the
CapabilityStatement says exactly what the bridge does (update, conditional update, versioning,
$validate)."""

from __future__ import annotations

import pytest

from testkit.bridge import is_outcome, load

KAP_REFERRAL = "http://fhir-kap.example/StructureDefinition/kap-referral"


def _params(resource=None, mode=None, profile=None) -> dict:
    parameter = []
    if resource is not None:
        parameter.append({"name": "resource", "resource": resource})
    if mode is not None:
        parameter.append({"name": "mode", "valueCode": mode})
    if profile is not None:
        parameter.append({"name": "profile", "valueUri": profile})
    return {"resourceType": "Parameters", "parameter": parameter}


def _issues(resp) -> list[tuple[str, str]]:
    assert resp.status_code == 200 and is_outcome(resp), resp.get_data(as_text=True)
    out = []
    for i in resp.get_json(force=True)["issue"]:
        rule = next((e["valueString"] for e in i.get("extension", []) if e["url"].endswith("/rule")), "")
        out.append((i["severity"], rule))
    return out


def _errors(resp) -> set[str]:
    return {rule for severity, rule in _issues(resp) if severity in ("error", "fatal")}


def _count(bridge, rtype: str) -> int:
    return bridge.get("clinic", f"/fhir/{rtype}?_count=0").get_json(force=True)["total"]


@pytest.mark.parametrize("as_parameters", [False, True])
def test_a_valid_referral_validates_with_no_error_and_nothing_is_stored(bridge, as_parameters):
    sr = load("Example-ServiceRequest-referral-1.json")
    before = _count(bridge, "ServiceRequest")
    body = _params(sr, mode="create") if as_parameters else sr
    resp = bridge.post("a", "/fhir/ServiceRequest/$validate", body)
    assert _errors(resp) == set()
    assert _count(bridge, "ServiceRequest") == before


def test_errors_are_issues_of_a_200_not_http_errors(bridge):
    sr = dict(load("Example-ServiceRequest-referral-1.json"), status="bogus")
    assert "binding:required" in _errors(bridge.post("a", "/fhir/ServiceRequest/$validate", sr))


def test_a_kap_profile_asked_for_is_checked_and_an_unknown_one_is_a_clear_issue(bridge):
    sr = load("Example-ServiceRequest-referral-1.json")
    sr["meta"] = {k: v for k, v in sr["meta"].items() if k != "profile"}
    del sr["subject"]  # the KAP referral needs a subject (cardinality in the profile)
    plain = bridge.post("a", "/fhir/ServiceRequest/$validate", sr)
    profiled = bridge.post("a", "/fhir/ServiceRequest/$validate", _params(sr, profile=KAP_REFERRAL))
    assert len(_errors(profiled)) > len(_errors(plain))
    unknown = bridge.post("a", "/fhir/ServiceRequest/$validate", _params(sr, profile="http://example.org/x"))
    assert "validate:profile" in _errors(unknown)
    other_type = bridge.post(
        "a",
        "/fhir/ServiceRequest/$validate",
        _params(sr, profile="http://fhir-kap.example/StructureDefinition/kap-session"),
    )
    assert "validate:profile" in _errors(other_type)
    base = bridge.post(
        "a",
        "/fhir/ServiceRequest/$validate?profile=http://hl7.org/fhir/StructureDefinition/ServiceRequest",
        load("Example-ServiceRequest-referral-1.json"),
    )
    assert _errors(base) == set()


def test_mode_create_adds_the_bridges_inbound_rules(bridge):
    # valid FHIR, but practice-a cannot name another practitioner as the referral's requester
    sr = dict(
        load("Example-ServiceRequest-referral-1.json"),
        requester={"reference": "Practitioner/other-therapist"},
    )
    assert _errors(bridge.post("a", "/fhir/ServiceRequest/$validate", sr)) == set()
    assert _errors(bridge.post("a", "/fhir/ServiceRequest/$validate", _params(sr, mode="create")))


def test_mode_update_and_delete_at_instance_level(bridge):
    posted = bridge.post("a", "/fhir/ServiceRequest", load("Example-ServiceRequest-referral-1.json"))
    sr = posted.get_json(force=True)
    path = f"/fhir/ServiceRequest/{sr['id']}/$validate"
    assert _errors(bridge.post("a", path, _params(sr, mode="update"))) == set()
    # practice-b's view: the same referral is not one it may update
    as_b = dict(sr, requester={"reference": "Practitioner/other-therapist"})
    assert "fhir:not-found" in _errors(bridge.post("b", path, _params(as_b, mode="update")))
    assert "http:id-mismatch" in _errors(bridge.post("a", path, _params(dict(sr, id="other"), mode="update")))
    condition = {"resourceType": "Condition", "id": "x", "subject": {"reference": "Patient/client-1"}}
    assert "validate:update-type" in _errors(
        bridge.post("a", "/fhir/Condition/x/$validate", _params(condition, mode="update"))
    )
    assert "validate:delete" in _errors(bridge.post("a", path, _params(mode="delete")))


def test_no_write_scope_is_needed_to_validate(bridge):
    resp = bridge.post(
        "reader", "/fhir/ServiceRequest/$validate", load("Example-ServiceRequest-referral-1.json")
    )
    assert _errors(resp) == set()


@pytest.mark.parametrize(
    ("path", "body", "status", "rule"),
    [
        (
            "/fhir/ServiceRequest/$validate",
            {"resourceType": "Parameters", "parameter": []},
            400,
            "validate:resource",
        ),
        (
            "/fhir/ServiceRequest/$validate",
            _params({"resourceType": "ServiceRequest"}, mode="bogus"),
            400,
            "validate:mode",
        ),
        (
            "/fhir/ServiceRequest/$validate",
            _params({"resourceType": "ServiceRequest"}, mode="update"),
            400,
            "validate:mode",
        ),
        ("/fhir/ServiceRequest/$validate", {"resourceType": "Patient"}, 400, "http:type-mismatch"),
        ("/fhir/NoSuchType/$validate", {"resourceType": "NoSuchType"}, 404, "fhir:resource-type"),
        ("/fhir/ServiceRequest/$validate", [1, 2], 400, "fhir:resource"),
    ],
)
def test_a_request_the_operation_cannot_read_is_4xx(bridge, path, body, status, rule):
    resp = bridge.post("a", path, body)
    assert resp.status_code == status and is_outcome(resp) and rule in resp.get_data(as_text=True)


def test_validate_needs_a_token(bridge):
    resp = bridge.client.post(
        "/fhir/ServiceRequest/$validate", json=load("Example-ServiceRequest-referral-1.json")
    )
    assert resp.status_code == 401


def test_the_capability_statement_says_what_the_bridge_does(bridge):
    cs = bridge.get("a", "/fhir/metadata").get_json(force=True)
    resources = {r["type"]: r for r in cs["rest"][0]["resource"]}
    for rtype in ("ServiceRequest", "Procedure", "Consent", "Communication"):
        r = resources[rtype]
        assert {"create", "update", "read"} <= {i["code"] for i in r["interaction"]}
        assert r["conditionalUpdate"] is True and r["updateCreate"] is False
        assert r["versioning"] == "versioned-update"
    for rtype in ("Condition", "Task"):
        r = resources[rtype]
        assert "update" not in {i["code"] for i in r["interaction"]} and r["conditionalUpdate"] is False
    for r in resources.values():
        if r["type"] in ("ServiceRequest", "Consent", "Communication", "Task"):
            assert "delete" not in {i["code"] for i in r["interaction"]}
            assert (
                r["operation"][0]["definition"] == "http://hl7.org/fhir/OperationDefinition/Resource-validate"
            )


@pytest.mark.parametrize("release", ["R4", "R5"])
def test_the_capability_statement_is_valid_fhir(tmp_path, release):
    from fhir_kap.config import Release
    from fhir_kap.validation import Validator
    from testkit.bridge import make_bridge

    bridge = make_bridge(tmp_path, fhir_version=release)
    cs = bridge.get("a", "/fhir/metadata").get_json(force=True)
    assert Validator.load(Release.parse(release)).validate(cs) == []


def test_a_partner_that_cannot_write_the_type_learns_nothing_from_the_bridges_own_rules(bridge):
    """`reader` may not write Consents: $validate mode=create checks the FHIR and profile rules
    only, so it cannot probe whether another partner's Consent identifier exists."""
    bridge.post("clinic", "/fhir/Consent", load("Example-Consent-consent-1.json"))
    taken = load("Example-Consent-consent-1.json")  # the clinic's identifier
    free = dict(taken, identifier=[{**taken["identifier"][0], "value": "no-such-consent"}])
    answers = [
        _issues(bridge.post("reader", "/fhir/Consent/$validate", _params(c, mode="create")))
        for c in (taken, free)
    ]
    assert answers[0] == answers[1]
    assert ("information", "validate:no-write-scope") in answers[0]
    assert not any(rule == "bridge:identifier-owner" for _, rule in answers[0])
    # nor a partner that may write Consents: ownership is checked by the write alone (no oracle)
    assert "bridge:identifier-owner" not in _errors(
        bridge.post("a", "/fhir/Consent/$validate", _params(taken, mode="create"))
    )


def test_validate_mode_create_checks_the_note_as_the_create_fills_it(bridge):
    """A practice's note without `sender` is filled with the practice on create (201); `$validate`
    in mode create said `profile:cardinality` at /sender for it, an error the create never makes."""
    note = load("Example-Communication-note-1.json")
    note.pop("sender", None)
    note["identifier"][0]["value"] = "validate-fill-1"
    answer = _issues(bridge.post("a", "/fhir/Communication/$validate", _params(note, mode="create")))
    assert not {rule for severity, rule in answer if severity in ("error", "fatal")}, answer
    assert bridge.post("a", "/fhir/Communication", note).status_code == 201
    # without a mode only the FHIR rules and the profiles see it: the missing sender is said
    assert "profile:cardinality" in _errors(bridge.post("a", "/fhir/Communication/$validate", _params(note)))
