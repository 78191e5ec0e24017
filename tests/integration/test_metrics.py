"""/metrics over the bridge app (issue 16): only on the operator's metrics listener, requests by URL
rule (never an id in a label) with a latency histogram, consent decisions by reason code, and queue
depths read from the database at scrape time. Parsed with prometheus_client's own parser.

In-process the metrics live in this process's registry (no multiprocess directory), so each test
compares a scrape before and after what it does."""

from __future__ import annotations

import itertools

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fhir_kap.bridge.metrics import LOCAL_PORT, METRICS_PORT
from testkit.bridge import is_outcome, load

pytestmark = pytest.mark.bridge(consent="Consent-open-ended.json")

PORT = 9464
_SERIAL = itertools.count()


@pytest.fixture
def metered(bridge):
    bridge.app.config[METRICS_PORT] = PORT
    return bridge


def scrape(bridge) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """The exposition text and its samples as {(name, sorted labels): value}."""
    resp = bridge.client.get("/metrics", environ_overrides={LOCAL_PORT: PORT})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.content_type.startswith("text/plain")
    text = resp.get_data(as_text=True)
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def note(bridge, category: str = "session-dates") -> str:
    body = load("Example-Communication-note-1.json")
    body["identifier"][0]["value"] = f"metrics-note-{next(_SERIAL)}"
    body["recipient"] = [{"reference": "Practitioner/ref-therapist"}]
    body["category"][0]["coding"][0]["code"] = category
    resp = bridge.post("clinic", "/fhir/Communication", body)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return resp.get_json(force=True)["id"]


@pytest.mark.parametrize("who", [None, "clinic", "a"])
def test_the_partner_port_has_no_metrics__the_answer_of_an_unknown_path(metered, who):
    headers = metered.h(who) if who else {}
    resp = metered.client.get("/metrics", headers=headers)
    unknown = metered.client.get("/no-such-thing", headers=headers)
    assert resp.status_code == 404 and is_outcome(resp)
    assert resp.get_json(force=True) == unknown.get_json(force=True)
    assert "fhir_kap" not in resp.get_data(as_text=True)


def test_a_host_header_naming_the_metrics_port_does_not_open_it(metered):
    resp = metered.client.get("/metrics", headers={"Host": f"127.0.0.1:{PORT}"})
    assert resp.status_code == 404


def test_without_a_metrics_listener_no_port_answers_metrics(bridge):
    resp = bridge.client.get("/metrics", environ_overrides={LOCAL_PORT: PORT})
    assert resp.status_code == 404


@pytest.mark.parametrize(
    "path", ["/fhir/metadata", "/fhir/Communication", "/kap/records", "/console", "/console/login"]
)
def test_the_metrics_listener_answers_nothing_but_metrics_and_health(metered, path):
    resp = metered.client.get(path, headers=metered.h("clinic"), environ_overrides={LOCAL_PORT: PORT})
    assert resp.status_code == 404
    assert metered.client.get("/readyz", environ_overrides={LOCAL_PORT: PORT}).status_code == 200


def test_requests_are_counted_by_url_rule_and_status_and_no_id_reaches_a_label(metered):
    rid = note(metered)
    ghost = "f" * 32
    _, before = scrape(metered)
    assert metered.get("a", f"/fhir/Communication/{rid}").status_code == 200
    assert metered.get("b", f"/fhir/Communication/{rid}").status_code == 404  # not addressed to b
    assert metered.get("a", f"/fhir/Communication/{ghost}").status_code == 404
    assert metered.client.get(f"/nowhere/{ghost}").status_code == 404
    text, after = scrape(metered)

    route = "/fhir/<rtype>/<rid>"
    for status, n in (("200", 1), ("404", 2)):
        delta = value(
            after, "fhir_kap_http_requests_total", method="GET", route=route, status=status
        ) - value(before, "fhir_kap_http_requests_total", method="GET", route=route, status=status)
        assert delta == n, (status, delta)
    unmatched = {"method": "GET", "route": "(unmatched)", "status": "404"}
    assert value(after, "fhir_kap_http_requests_total", **unmatched) == (
        value(before, "fhir_kap_http_requests_total", **unmatched) + 1
    )
    assert rid not in text and ghost not in text  # ids never reach a label
    assert "/nowhere" not in text


def test_each_route_has_a_latency_histogram_whose_count_is_its_requests(metered):
    _, before = scrape(metered)
    for _ in range(3):
        assert metered.get("clinic", "/fhir/Communication?patient=client-1").status_code == 200
    _, after = scrape(metered)
    labels = {"method": "GET", "route": "/fhir/<rtype>"}
    name = "fhir_kap_http_request_duration_seconds"
    assert value(after, f"{name}_count", **labels) - value(before, f"{name}_count", **labels) == 3
    buckets = sorted(
        (float(dict(k[1])["le"]), v)
        for k, v in after.items()
        if k[0] == f"{name}_bucket" and {x: y for x, y in k[1] if x != "le"} == labels
    )
    assert buckets[-1][0] == float("inf") and buckets[-1][1] == value(after, f"{name}_count", **labels)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    assert value(after, f"{name}_sum", **labels) > value(before, f"{name}_sum", **labels)


def test_bridge_reads_count_consent_decisions_by_outcome_and_reason_code(metered):
    permitted = note(metered)
    hidden = note(metered, category="safety")  # a category the consent does not permit
    _, before = scrape(metered)
    assert metered.get("a", f"/fhir/Communication/{permitted}").status_code == 200
    assert metered.get("a", f"/fhir/Communication/{hidden}").status_code == 404
    _, after = scrape(metered)
    name = "fhir_kap_consent_decisions_total"

    def delta(**labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    permits = sum(
        v - before.get(k, 0.0)
        for k, v in after.items()
        if k[0] == name and dict(k[1])["stage"] == "read" and dict(k[1])["outcome"] == "permit"
    )
    denies = {
        dict(k[1])["reason"]: v - before.get(k, 0.0)
        for k, v in after.items()
        if k[0] == name and dict(k[1])["stage"] == "read" and dict(k[1])["outcome"] == "deny"
    }
    assert permits == 1
    assert sum(denies.values()) == 1
    assert delta(stage="read", outcome="deny", reason="category-not-permitted") == 1, denies


def test_queue_depths_come_from_the_database_at_scrape_time(metered):
    outbox = metered.app.extensions["fhir_kap"].outbox
    body = load("Example-Communication-note-1.json")
    ids = []
    for i, endpoint in enumerate(["practice-x", "practice-x", "https://u:secret@ehr.example:8443/fhir?x=1"]):
        body["identifier"][0]["value"] = f"depth-{i}"
        item, _ = outbox.enqueue(body, endpoint=endpoint, base_url="http://ehr.example/fhir")
        ids.append(item.id)
    claimed = outbox.claim("w", 1, lease_seconds=60)
    outbox.mark_dead(claimed[0], "400 invalid")
    text, samples = scrape(metered)
    assert value(samples, "fhir_kap_outbox_items", state="dead", endpoint="practice-x") == 1
    assert value(samples, "fhir_kap_outbox_items", state="pending", endpoint="practice-x") == 1
    assert value(samples, "fhir_kap_outbox_items", state="pending", endpoint="https://ehr.example:8443") == 1
    age = ("fhir_kap_outbox_oldest_age_seconds", (("endpoint", "practice-x"), ("state", "pending")))
    assert age in samples and samples[age] >= 0  # exported (value() reads a missing one as 0)
    assert value(samples, "fhir_kap_database_up") == 1
    assert "secret" not in text and "/fhir?x=1" not in text
