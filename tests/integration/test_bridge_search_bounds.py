"""Searches cost what they return (issue 14, amplification): a partner's search reads, decides and
audits a bounded number of candidates per page, in one commit, whatever another partner posted.

Work is measured, never wall time: rows decoded (`storage.store._row`), consent decisions,
AuditEvents written and durable commits (`Database.write`) per request.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest

from fhir_kap.bridge.access import scan_budget
from testkit.bridge import load, make_bridge

_SERIAL = itertools.count()
_NOTE = load("Example-Communication-note-1.json")


def _note(recipient: str, category: str) -> dict[str, Any]:
    note = copy.deepcopy(_NOTE)
    note["identifier"][0]["value"] = f"bounds-{next(_SERIAL)}"
    note["recipient"] = [{"reference": recipient}]
    note["category"][0]["coding"][0]["code"] = category
    return note


def _store_notes(bridge, n: int, *, source: str, recipient: str, category: str = "safety") -> None:
    """`n` notes written by `source` straight into the store (the set-up; searches go over HTTP).
    The open-ended consent does not permit `safety` to the referring therapist."""
    store = bridge.app.extensions["fhir_kap"].store
    with store.transaction() as tx:
        for _ in range(n):
            store.create(_note(recipient, category), source=source, tx=tx)


def _permitted_note(bridge) -> str:
    resp = bridge.post("clinic", "/fhir/Communication", _note("Practitioner/ref-therapist", "session-dates"))
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return resp.get_json(force=True)["id"]


class Work:
    """Counts what one request costs."""

    def __init__(self, bridge, monkeypatch: pytest.MonkeyPatch) -> None:
        import fhir_kap.storage.store as store_module
        from fhir_kap.consent import ConsentGate

        self.svc = bridge.app.extensions["fhir_kap"]
        self.decoded = self.decisions = self.commits = 0
        row, decide, write = store_module._row, ConsentGate.decide, self.svc.db.write

        def counting_row(*a: Any, **k: Any) -> Any:
            self.decoded += 1
            return row(*a, **k)

        def counting_decide(gate: Any, *a: Any, **k: Any) -> Any:
            self.decisions += 1
            return decide(gate, *a, **k)

        def counting_write(*a: Any, **k: Any) -> Any:
            self.commits += 1
            return write(*a, **k)

        monkeypatch.setattr(store_module, "_row", counting_row)
        monkeypatch.setattr(ConsentGate, "decide", counting_decide)
        monkeypatch.setattr(self.svc.db, "write", counting_write)

    def reset(self) -> int:
        """Zero the counters; the number of AuditEvents stored so far."""
        self.decoded = self.decisions = self.commits = 0
        return self.svc.audit.count()


def _get(bridge, who: str, url: str) -> dict[str, Any]:
    resp = bridge.get(who, url.replace("http://bridge.test", ""))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_json(force=True)


def _next(page: dict[str, Any]) -> str | None:
    return next((link["url"] for link in page["link"] if link["relation"] == "next"), None)


def test_two_thousand_denied_notes__a_count_1_search_does_bounded_work_in_one_commit(tmp_path, monkeypatch):
    bridge = make_bridge(tmp_path, consent="Consent-open-ended.json")
    _store_notes(bridge, 2000, source="practice-b", recipient="Practitioner/ref-therapist")
    work = Work(bridge, monkeypatch)
    before = work.reset()
    page = _get(bridge, "a", "/fhir/Communication?_count=1")
    written = work.svc.audit.count() - before
    bound = scan_budget(1)
    assert page.get("entry", []) == [] and "total" not in page  # not every candidate was decided
    assert work.decoded <= bound and work.decisions <= bound
    assert 0 < written <= bound  # the denials decided, all audited ...
    assert work.commits == 1  # ... in one commit
    assert _next(page) is not None  # fewer than _count on this page: more may follow
    # the same search again costs the same, not more
    before = work.reset()
    _get(bridge, "a", "/fhir/Communication?_count=1")
    assert work.decoded <= bound and work.commits == 1 and work.svc.audit.count() - before <= bound


def test_notes_never_addressed_to_the_partner_are_not_read_decided_or_audited(tmp_path, monkeypatch):
    bridge = make_bridge(tmp_path, consent="Consent-open-ended.json")
    _store_notes(bridge, 500, source="practice-b", recipient="Practitioner/other-therapist")
    work = Work(bridge, monkeypatch)
    before = work.reset()
    page = _get(bridge, "a", "/fhir/Communication?_count=1")
    assert page["total"] == 0 and not page.get("entry") and _next(page) is None
    assert (work.decoded, work.decisions, work.commits, work.svc.audit.count() - before) == (0, 0, 0, 0)


def test_following_next_links_past_denied_notes_reaches_each_permitted_note_once(tmp_path, monkeypatch):
    bridge = make_bridge(tmp_path, consent="Consent-open-ended.json")
    first = _permitted_note(bridge)
    _store_notes(bridge, 3 * scan_budget(2) + 5, source="practice-b", recipient="Practitioner/ref-therapist")
    last = _permitted_note(bridge)
    work = Work(bridge, monkeypatch)
    seen: list[str] = []
    url: str | None = "/fhir/Communication?_count=2"
    pages = 0
    while url is not None:
        before = work.reset()
        page = _get(bridge, "a", url)
        pages += 1
        assert work.decoded <= scan_budget(2) and work.commits <= 1
        assert work.svc.audit.count() - before <= scan_budget(2)
        seen += [e["resource"]["id"] for e in page.get("entry", [])]
        url = _next(page)
        assert pages < 20
    assert seen == [first, last]


def test_totals_are_exact_when_one_page_decides_every_candidate(bridge_with_consent):
    bridge = bridge_with_consent
    permitted = [_permitted_note(bridge) for _ in range(2)]
    _store_notes(bridge, 3, source="practice-b", recipient="Practitioner/ref-therapist")
    _store_notes(bridge, 1, source="practice-a", recipient="Practitioner/other-therapist")  # its own
    page = _get(bridge, "a", "/fhir/Communication?_count=1")
    assert page["total"] == 3 and [e["resource"]["id"] for e in page["entry"]] == permitted[:1]
    rest = _get(bridge, "a", _next(page) or "")
    # a later page cannot see the decisions before it: its total, when given, is still exact
    assert rest.get("total", 3) == 3 and [e["resource"]["id"] for e in rest["entry"]] == permitted[1:]
    own = _get(bridge, "a", _next(rest) or "")
    assert own.get("total", 3) == 3 and len(own["entry"]) == 1 and _next(own) is None
    events = bridge.app.extensions["fhir_kap"].audit.query("AuditEvent", limit=100)
    permits = [e for e in events if e["outcome"] == "0"]
    assert len(permits) == 2  # one per note returned, never one per note counted


@pytest.fixture
def bridge_with_consent(tmp_path):
    return make_bridge(tmp_path, consent="Consent-open-ended.json")


def test_store_scan_reads_a_bounded_window_and_counts_in_sql(db):
    from fhir_kap.storage.auditlog import AuditLog
    from fhir_kap.storage.store import Store

    store = Store(db)
    with store.transaction() as tx:
        for n in range(30):
            source = "practice-a" if n % 10 == 0 else "practice-b"
            recipient = "Practitioner/ref-therapist" if n % 2 == 0 else "Practitioner/other-therapist"
            store.create(_note(recipient, "safety"), source=source, tx=tx)
    window = store.scan(
        "Communication",
        {},
        audience=("practice-a", ["Practitioner/ref-therapist"]),
        offset=2,
        limit=5,
    )
    # practice-a wrote notes 0, 10, 20 (all to ref-therapist); 15 notes name ref-therapist
    assert (window.total, window.own, window.offset, len(window.rows)) == (15, 3, 2, 5)
    assert [r.own for r in window.rows] == [False, False, False, True, False]
    assert store.decode(window.rows[3]).resource["recipient"] == [{"reference": "Practitioner/ref-therapist"}]
    log = AuditLog(db)
    batch = log.batch(2)
    event = {"resourceType": "AuditEvent", "recorded": "2026-12-04T10:00:00Z"}
    batch.add(event)
    batch.add(event)
    with pytest.raises(ValueError):
        batch.add(event)  # past the stated bound
    assert len(batch.commit()) == 2 and log.count() == 2 and batch.commit() == []


def test_history_pages_decide_and_audit_a_bounded_number_of_versions_in_one_commit(tmp_path, monkeypatch):
    """`_history` used to read every version and write one AuditEvent per version, each its own
    commit: a partner updating its note to another practice 300 times made each of that
    practice's `_history` reads write 302 AuditEvents. Now a page reads at most `_count` + 1
    versions, decides at most `_count`, and writes their AuditEvents in one commit (plus the one
    decision on the current version every read makes)."""
    bridge = make_bridge(tmp_path, consent="Consent-open-ended.json")
    store = bridge.app.extensions["fhir_kap"].store
    note = _note("Practitioner/ref-therapist", "session-dates")
    first, _ = store.create(note, source="practice-b")
    with store.transaction() as tx:
        for n in range(2, 61):  # versions 2..60: even ones permitted (session-dates), odd ones not
            version = _note("Practitioner/ref-therapist", "session-dates" if n % 2 == 0 else "safety")
            version["identifier"] = note["identifier"]
            store.update("Communication", first.id, dict(version, id=first.id), source="practice-b", tx=tx)
    work = Work(bridge, monkeypatch)
    url, seen, pages = f"/fhir/Communication/{first.id}/_history?_count=10", [], 0
    while url:
        before = work.reset()
        page = _get(bridge, "a", url)
        written = work.svc.audit.count() - before
        pages += 1
        assert page["type"] == "history"
        assert work.decoded <= 10 + 1 + 1  # the page (and one more, to know of a next) and the current
        assert work.decisions <= 10 + 1 and written <= 10 + 1
        assert work.commits <= 2  # the current version's decision, then the page's AuditEvents
        assert all(
            e["resource"]["category"][0]["coding"][0]["code"] == "session-dates" for e in page["entry"]
        )
        seen += [int(e["response"]["etag"].split('"')[1]) for e in page["entry"]]
        url = _next(page)
    assert pages == 6 and seen == [*range(60, 0, -2), 1]  # every permitted version once, newest first
    whole = _get(bridge, "clinic", f"/fhir/Communication/{first.id}/_history?_count=200")
    assert whole["total"] == 60 and len(whole["entry"]) == 60
    assert bridge.get("a", f"/fhir/Communication/{first.id}/_history?_count=201").status_code == 400


def test_history_since_keeps_the_later_versions_and_unknown_parameters_are_said(tmp_path):
    """`_history?_since=` (an instant or a date) keeps the versions written at or after it, and the
    paging links keep it; a parameter `_history` does not know is a 400, as in a search (it used
    to be ignored: `_since` answered every version)."""
    bridge = make_bridge(tmp_path, consent="Consent-open-ended.json")
    store = bridge.app.extensions["fhir_kap"].store
    note = _note("Practitioner/ref-therapist", "session-dates")
    first, _ = store.create(note, source="clinic-ehr")
    for _ in range(3):
        store.update("Communication", first.id, dict(note, id=first.id), source="clinic-ehr")
    versions = store.history("Communication", first.id)
    cut = versions[1].last_updated  # versions 3 and 4 are at or after it
    page = _get(bridge, "clinic", f"/fhir/Communication/{first.id}/_history?_since={cut}&_count=1")
    seen = [page["entry"][0]["response"]["etag"]]
    while (url := _next(page)) is not None:
        assert "_since=" in url
        page = _get(bridge, "clinic", url)
        seen += [e["response"]["etag"] for e in page["entry"]]
    assert seen == ['W/"4"', 'W/"3"']
    assert len(_get(bridge, "clinic", f"/fhir/Communication/{first.id}/_history?_since=1900")["entry"]) == 4
    for query in ("_since=ge2020", "_since=yesterday", "_at=2020", "foo=1"):
        resp = bridge.get("clinic", f"/fhir/Communication/{first.id}/_history?{query}")
        assert resp.status_code == 400, query
