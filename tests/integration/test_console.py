"""The operator console over the bridge app's test client (issue 16): who gets in (operators with a
session; never a partner token, never without a session), CSRF refusal, each action and its entry
in the operator log, the audit search, token rotation, and that no page shows a note's free text."""

from __future__ import annotations

import re
import time

import pytest

from fhir_kap.bridge.app import services
from fhir_kap.storage.operators import MAX_FAILURES, Operators
from fhir_kap.storage.webhooks import WebhookJobs
from testkit.console import PASSWORD, SECRET_TEXT, csrf_of, dead_letter, decision, enqueue, login


def sv(bridge):
    with bridge.app.app_context():
        return services()


def log_entries(bridge, action=None):
    return Operators(sv(bridge).db).entries(action=action)


def page(client, path):
    resp = client.get(path)
    assert resp.status_code == 200, (path, resp.status_code, resp.get_data(as_text=True)[:500])
    return resp.get_data(as_text=True)


def post(client, path, data, referer_page="/console/"):
    token = csrf_of(page(client, referer_page))
    return client.post(path, data={"csrf": token, **data})


# ---- who gets in


@pytest.mark.parametrize(
    "path", ["/console/", "/console/outbox", "/console/audit", "/console/partners", "/console/log"]
)
def test_no_session__every_page_redirects_to_the_login(console, path):
    resp = console.app.test_client().get(path)
    assert resp.status_code == 303 and resp.headers["Location"].endswith("/console/login")


def test_partner_token__does_not_open_the_console_nor_act(console):
    item = dead_letter(sv(console).outbox, "N-partner")
    client = console.app.test_client()
    for who in ("clinic", "a"):
        resp = client.get("/console/outbox", headers=console.h(who))
        assert resp.status_code == 303 and resp.headers["Location"].endswith("/console/login")
        resp = client.post(
            "/console/outbox/action", data={"id": item.id, "action": "retry"}, headers=console.h(who)
        )
        assert resp.status_code == 303 and resp.headers["Location"].endswith("/console/login")
    assert sv(console).outbox.get(item.id).state == "dead"


def test_login__wrong_password_or_unknown_name_refused_and_logged(console):
    client = console.app.test_client()
    assert login(client, password="not the password at all").headers["Location"].endswith("failed=1")
    assert login(client, name="mallory").headers["Location"].endswith("failed=1")
    assert client.get("/console/").status_code == 303
    refused = [(e.operator, e.detail) for e in log_entries(console, "login") if e.outcome == "refused"]
    assert refused == [("mallory", "unknown"), ("alice", "wrong-password")]


def test_login__locked_after_repeated_failures_even_with_the_right_password(console):
    client = console.app.test_client()
    for _ in range(MAX_FAILURES):
        login(client, password="wrong password guess")
    resp = login(client)
    assert resp.headers["Location"].endswith("failed=1")  # answered as any refusal (no name oracle)
    assert client.get("/console/").status_code == 303
    assert ("alice", "locked") in [(e.operator, e.detail) for e in log_entries(console, "login")]


def test_login__without_the_forms_token_is_refused(console):
    client = console.app.test_client()
    resp = client.post("/console/login", data={"name": "alice", "password": PASSWORD})
    assert resp.status_code == 403 and "security token" in resp.get_data(as_text=True)
    assert client.get("/console/").status_code == 303


def test_login__sets_a_secure_httponly_strict_host_cookie_by_default(bridge):
    with bridge.app.app_context():
        Operators(services().db).add("alice", PASSWORD)
    client = bridge.app.test_client()
    page_ = client.get("/console/login", base_url="https://bridge.example")
    resp = client.post(
        "/console/login",
        base_url="https://bridge.example",
        data={"csrf": csrf_of(page_.get_data(as_text=True)), "name": "alice", "password": PASSWORD},
    )
    cookie = next(c for c in resp.headers.getlist("Set-Cookie") if c.startswith("__Host-kap-console="))
    assert {"Secure", "HttpOnly", "SameSite=Strict", "Path=/"} <= {p.strip() for p in cookie.split(";")}
    assert "Domain" not in cookie
    assert client.get("/console/", base_url="https://bridge.example").status_code == 200


def test_insecure_cookie_setting__only_honoured_for_a_loopback_host(console):
    client = console.app.test_client()
    for base, secure in (("http://127.0.0.1", False), ("http://bridge.example", True)):
        resp = client.get("/console/login", base_url=base)
        cookie = resp.headers["Set-Cookie"]
        assert ("Secure" in cookie) is secure, (base, cookie)


def test_security_headers__strict_csp_on_every_console_answer(op):
    for path in ("/console/", "/console/outbox", "/console/login"):
        h = op.get(path).headers
        assert h["Content-Security-Policy"].startswith("default-src 'none'")
        assert "frame-ancestors 'none'" in h["Content-Security-Policy"]
        assert "script-src" not in h["Content-Security-Policy"]
        assert h["X-Frame-Options"] == "DENY" and h["X-Content-Type-Options"] == "nosniff"
        assert h["Cache-Control"] == "no-store" and h["Referrer-Policy"] == "same-origin"


def test_logout__ends_the_session_and_is_logged(console, op):
    resp = post(op, "/console/logout", {})
    assert resp.status_code == 303
    assert op.get("/console/").status_code == 303
    assert [e.action for e in log_entries(console)][:2] == ["logout", "login"]


# ---- CSRF


@pytest.mark.parametrize("token", [None, "", "forged-token-value"])
def test_post_without_the_sessions_csrf_token__403_and_nothing_moves(console, op, token):
    item = dead_letter(sv(console).outbox, "N-csrf")
    data = {"id": item.id, "action": "retry"} | ({} if token is None else {"csrf": token})
    resp = op.post("/console/outbox/action", data=data)
    assert resp.status_code == 403 and "security token" in resp.get_data(as_text=True)
    assert sv(console).outbox.get(item.id).state == "dead"
    assert log_entries(console, "csrf-refused")


def test_post_from_another_origin__403_even_with_the_token(console, op):
    item = dead_letter(sv(console).outbox, "N-origin")
    token = csrf_of(page(op, "/console/"))
    resp = op.post(
        "/console/outbox/action",
        data={"csrf": token, "id": item.id, "action": "retry"},
        headers={"Origin": "https://evil.example"},
    )
    assert resp.status_code == 403
    assert sv(console).outbox.get(item.id).state == "dead"


# ---- the outbox


def test_dead_letters__listed_and_retried_one_and_logged(console, op):
    ob = sv(console).outbox
    item = dead_letter(ob, "N-dead-1")
    html = page(op, "/console/outbox?state=dead")
    assert f'id="item-{item.id}"' in html and "401 Unauthorized" in html
    resp = post(
        op, "/console/outbox/action", {"id": item.id, "action": "retry", "back": "/console/outbox?state=dead"}
    )
    assert resp.status_code == 303 and "msg=retry:1:0" in resp.headers["Location"]
    after = ob.get(item.id)
    assert after.state == "pending" and after.attempts == 0
    entry = log_entries(console, "outbox-retry")[0]
    assert (entry.operator, entry.target, entry.outcome) == ("alice", f"outbox/{item.id}", "ok")
    assert "1 item(s) retried" in page(op, resp.headers["Location"])


def test_bulk_actions__hold_release_retry_many_skipping_wrong_states(console, op):
    ob = sv(console).outbox
    pending = [enqueue(ob, f"N-bulk-{i}") for i in range(3)]
    dead = dead_letter(ob, "N-bulk-dead")
    ids = [i.id for i in pending] + [dead.id]
    resp = post(op, "/console/outbox/action", {"id": ids, "action": "hold", "reason": "partner maintenance"})
    assert "msg=hold:3:1" in resp.headers["Location"]
    assert {ob.get(i.id).hold_reason for i in pending} == {"partner maintenance"}
    resp = post(op, "/console/outbox/action", {"id": [pending[0].id, pending[1].id], "action": "release"})
    assert "msg=release:2:0" in resp.headers["Location"]
    assert [ob.get(i.id).state for i in pending] == ["pending", "pending", "held"]
    resp = post(op, "/console/outbox/action", {"id": [pending[2].id, dead.id], "action": "retry"})
    assert "msg=retry:2:0" in resp.headers["Location"]
    assert ob.counts()["pending"] == 4
    outcomes = [(e.action, e.outcome) for e in log_entries(console) if e.action.startswith("outbox-")]
    assert outcomes.count(("outbox-hold", "skipped")) == 1 and len(outcomes) == 8


def test_retry_all__every_dead_item_of_an_endpoint(console, op):
    ob = sv(console).outbox
    a = [dead_letter(ob, f"N-ra-{i}") for i in range(3)]
    b = dead_letter(ob, "N-rb-0", endpoint="practice-b")
    resp = post(op, "/console/outbox/retry-all", {"state": "dead", "endpoint": "practice-a"})
    assert "msg=retry:3:0" in resp.headers["Location"]
    assert [ob.get(i.id).state for i in a] == ["pending"] * 3 and ob.get(b.id).state == "dead"
    assert log_entries(console, "outbox-retry-all")[0].target == "dead:practice-a"


def test_held_items__show_the_consent_reason(console, op):
    ob = sv(console).outbox
    item = enqueue(ob, "N-held")
    assert ob.hold(item.id, "consent: outside-period")
    html = page(op, "/console/outbox?state=held")
    assert f'id="item-{item.id}"' in html and "consent: outside-period" in html


def test_outbox_filters_and_pages(console, op):
    ob = sv(console).outbox
    for i in range(55):
        enqueue(ob, f"N-page-{i:02d}")
    enqueue(ob, "N-other", endpoint="practice-b")
    first = page(op, "/console/outbox?state=pending&endpoint=practice-a")
    assert first.count('id="item-') == 50 and "practice-b" not in re.sub(
        r"<select.*?</select>", "", first, flags=re.S
    )
    older = re.search(r'href="([^"]+)" id="older"', first).group(1).replace("&amp;", "&")
    second = page(op, older)
    assert second.count('id="item-') == 5 and 'id="newer"' in second


def test_item_detail__ids_codes_states_never_the_resource(console, op):
    item = dead_letter(sv(console).outbox, "N-detail")
    html = page(op, f"/console/outbox/{item.id}")
    for text in (
        "http://fhir-kap.example/sid/note|N-detail",
        "Patient/client-1",
        "Consent/consent-1/_history/1",
        "dead",
    ):
        assert text in html
    assert "contentString" not in html and SECRET_TEXT not in html
    assert op.get("/console/outbox/999999").status_code == 404
    assert op.get("/console/outbox/99999999999999999999999").status_code == 404


def test_bad_filters__400_page_not_500(op):
    for path in (
        "/console/outbox?state=bogus",
        "/console/outbox?endpoint=%3Cscript%3E",
        "/console/audit?since=yesterday",
        "/console/audit?until=2026-13-45",
        "/console/audit?outcome=maybe",
        "/console/audit?patient=Patient/a%20b",
        "/console/webhooks?state=gone",
    ):
        resp = op.get(path)
        assert resp.status_code == 400 and "text/html" in resp.content_type


# ---- consent decisions and the audit trail


def test_audit__denials_with_their_reason_searchable_by_patient_type_outcome_date(console, op):
    audit = sv(console).audit
    decision(audit, permit=True, reason="permitted", patient="Patient/client-1", resource_id="n-ok")
    decision(audit, permit=False, reason="outside-period", patient="Patient/client-2", resource_id="n-late")
    decision(audit, permit=False, reason="recipient-not-permitted", patient="Patient/client-1", release="R5")
    denials = page(op, "/console/audit?type=AuditEvent&outcome=deny")
    assert denials.count('class="outcome-deny"') == 2 and "outside-period" in denials
    assert "recipient-not-permitted" in denials and "n-ok" not in denials
    one = page(op, "/console/audit?patient=Patient/client-2")
    assert "outside-period" in one and "Communication/n-late" in one and "recipient-not-permitted" not in one
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert page(op, f"/console/audit?since={today}&until={today}").count("<tr class=") == 3
    assert page(op, "/console/audit?until=2000-01-01").count("<tr class=") == 0
    assert page(op, "/console/audit?type=Provenance").count("<tr class=") == 0


# ---- partners, tokens, notifications


def test_rotate__shows_the_new_token_once_old_refused_new_accepted_logged(console, op):
    old = console.tokens["a"]
    resp = post(op, "/console/partners/practice-a/rotate", {"grace": "0"}, "/console/partners")
    assert resp.status_code == 200 and resp.headers["Cache-Control"] == "no-store"
    new = re.search(r'id="new-token">([^<]+)<', resp.get_data(as_text=True)).group(1)
    assert new != old and new not in page(op, "/console/partners")
    assert (
        console.app.test_client()
        .get("/fhir/Communication", headers={"Authorization": f"Bearer {old}"})
        .status_code
        == 401
    )
    assert (
        console.app.test_client()
        .get("/fhir/Communication", headers={"Authorization": f"Bearer {new}"})
        .status_code
        == 200
    )
    entry = log_entries(console, "partner-rotate")[0]
    assert (entry.operator, entry.target, entry.outcome) == ("alice", "partner/practice-a", "ok")
    assert new not in (entry.detail or "")


def test_partners_page__scopes_endpoint_and_webhook_health(console, op):
    html = page(op, "/console/partners")
    assert "practice-a" in html and "system/Communication.read" in html and 'id="rotate-reader"' in html


def test_partners_page__the_subscription_origins_in_effect(console, op):
    sv(console).partners.set_subscription_origins("practice-a", ["https://ehr.practice-a.example:8443"])
    html = page(op, "/console/partners")
    row = html[html.index('id="partner-practice-a"') :]
    assert "https://ehr.practice-a.example:8443" in row[: row.index("</tr>")]


def test_webhooks__dead_job_listed_and_sent_again_logged(console, op):
    jobs = WebhookJobs(sv(console).db)
    now = time.time()
    assert jobs.enqueue("practice-a", "create", "Communication/n-1", "1", now=now)
    job = jobs.claim("w", 1, now, 30)[0]
    assert jobs.finish(job, "w", "dead", 500, "HTTP 500", next_at=now, now=now)
    html = page(op, "/console/webhooks?state=dead")
    assert "Communication/n-1" in html
    resp = post(op, "/console/webhooks/retry", {"job": job.id}, "/console/webhooks")
    assert resp.status_code == 303
    assert "1 item(s) sent again" in page(op, resp.headers["Location"])
    assert jobs.jobs("pending")[0].id == job.id
    assert log_entries(console, "webhook-retry")[0].target == f"webhook/{job.id}"


# ---- never free text


def test_no_page_shows_a_notes_free_text(console, op):
    ob = sv(console).outbox
    dead = dead_letter(ob, "N-free-1")
    held = enqueue(ob, "N-free-2")
    ob.hold(held.id, "consent: outside-period")
    decision(sv(console).audit, permit=False, reason="outside-period")
    stored = console.post(
        "clinic", "/fhir/Communication", __import__("testkit.console").console.note("N-free-3")
    )
    assert stored.status_code in (200, 201), stored.get_data(as_text=True)[:300]
    seen = []
    for path in (
        "/console/",
        "/console/outbox",
        "/console/outbox?state=dead",
        "/console/outbox?state=held",
        f"/console/outbox/{dead.id}",
        f"/console/outbox/{held.id}",
        "/console/audit",
        "/console/audit?type=AuditEvent&outcome=deny",
        "/console/partners",
        "/console/webhooks",
        "/console/log",
    ):
        html = page(op, path)
        seen.append(len(html))
        assert SECRET_TEXT not in html and "ZEBRA" not in html, path
    assert all(seen)


def test_operators_cli__password_from_stdin_never_argv(tmp_path, monkeypatch, capsys):
    import io

    from fhir_kap.cli import main

    monkeypatch.setenv("FHIR_KAP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("FHIR_KAP_CONFIG", raising=False)
    monkeypatch.delenv("FHIR_KAP_DATABASE_URL", raising=False)
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main(["operators", "add", "bob", "--password-stdin"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["operators", "add", "carol", "--password-stdin"]) != 0
    capsys.readouterr()
    assert main(["operators", "list"]) == 0
    out = capsys.readouterr().out
    assert '"bob"' in out and "argon2" not in out and "carol" not in out
    with pytest.raises(SystemExit):
        main(["operators", "add", "dave", "--password", PASSWORD])
    from fhir_kap.config import load_settings
    from fhir_kap.storage.db import Database

    ops = Operators(Database(load_settings().db_url))
    assert ops.verify("bob", PASSWORD) == (True, "ok")
    row = ops.db.query("SELECT password_hash FROM operators WHERE name = 'bob'")[0]
    assert row["password_hash"].startswith("$argon2id$") and PASSWORD not in row["password_hash"]


def test_overview__counts_by_state_and_endpoint_and_latest_denial(console, op):
    ob = sv(console).outbox
    dead_letter(ob, "N-ov-1")
    dead_letter(ob, "N-ov-2", endpoint="practice-b")
    enqueue(ob, "N-ov-3")
    decision(sv(console).audit, permit=False, reason="outside-period", patient="Patient/client-3")
    html = page(op, "/console/")
    assert re.search(r'id="count-dead"[^>]*><b>2</b>', html) and re.search(
        r'id="count-pending"[^>]*><b>1</b>', html
    )
    assert "?state=dead&amp;endpoint=practice-b" in html and "outside-period" in html


@pytest.mark.parametrize(
    ("path", "data", "status"),
    [
        ("/console/outbox/action", {"id": "abc", "action": "retry"}, 400),
        ("/console/outbox/action", {"action": "retry"}, 400),
        ("/console/outbox/action", {"id": "1", "action": "delete"}, 400),
        ("/console/outbox/action", {"id": "1", "action": "hold", "reason": "<b>bold</b>"}, 400),
        ("/console/outbox/action", {"id": [str(i) for i in range(1, 502)], "action": "retry"}, 400),
        ("/console/outbox/retry-all", {"state": "delivered"}, 400),
        ("/console/partners/no-such-partner/rotate", {"grace": "0"}, 404),
        ("/console/partners/practice-a/rotate", {"grace": "999"}, 400),
        ("/console/webhooks/retry", {"job": "x1"}, 400),
    ],
)
def test_bad_posts__4xx_page_never_500(console, op, path, data, status):
    resp = post(op, path, data)
    assert resp.status_code == status and "text/html" in resp.content_type


# ---- refused logins: bounded per client address, only account names logged


def test_refused_logins__throttled_per_address_and_logged_boundedly(console):
    from fhir_kap.bridge.console.security import LOGIN_REFUSALS

    client = console.app.test_client()
    before = len(log_entries(console, "login"))
    for i in range(LOGIN_REFUSALS + 5):
        resp = login(client, name=f"mallory{i}", password="wrong")
        if i < LOGIN_REFUSALS:
            assert resp.status_code == 303
        else:
            assert resp.status_code == 429  # tried no more, logged no more
    entries = log_entries(console, "login")[: len(log_entries(console, "login")) - before]
    assert len(entries) == LOGIN_REFUSALS + 1  # each refused try, and "throttled" once
    assert sum(e.detail == "throttled" for e in entries) == 1
    # another address still logs in
    other = console.app.test_client()
    page_ = other.get("/console/login", environ_base={"REMOTE_ADDR": "10.0.0.9"})
    resp = other.post(
        "/console/login",
        environ_base={"REMOTE_ADDR": "10.0.0.9"},
        data={"csrf": csrf_of(page_.get_data(as_text=True)), "name": "alice", "password": PASSWORD},
    )
    assert resp.status_code == 303 and resp.headers["Location"].endswith("/console/")


def _login_through_front(client, address: str, password: str = PASSWORD):
    """A browser's login through a TLS front at https://bridge.example (the front, on loopback,
    sets X-Forwarded-For and X-Forwarded-Proto; the browser sends its Origin)."""
    front = {"X-Forwarded-For": address, "X-Forwarded-Proto": "https", "Host": "bridge.example"}
    form = client.get("/console/login", headers=front)
    return client.post(
        "/console/login",
        headers={**front, "Origin": "https://bridge.example", "Sec-Fetch-Site": "same-origin"},
        data={"csrf": csrf_of(form.get_data(as_text=True)), "name": "alice", "password": password},
    )


@pytest.mark.parametrize("hops", [0, 1])
def test_behind_a_tls_front__logins_work_and_are_throttled_per_client_only_with_proxy_hops(tmp_path, hops):
    """Behind the documented front every request comes from 127.0.0.1 over http: without
    `--proxy-hops` the browser's https Origin never matched (every console login refused), and
    ten refused logins from anyone locked every operator out. With `--proxy-hops 1` the console
    sees https and the client's address; without it the forwarded headers are ignored (a client
    could write them), so they cannot dodge the throttle either."""
    from fhir_kap.bridge.console.security import LOGIN_REFUSALS
    from testkit.bridge import make_bridge

    bridge = make_bridge(tmp_path, options={"proxy_hops": hops})
    with bridge.app.app_context():
        Operators(services().db).add("alice", PASSWORD)
    ok = _login_through_front(bridge.app.test_client(), "198.51.100.7")
    if hops:
        assert ok.status_code == 303 and ok.headers["Location"].endswith("/console/")
    else:  # refused: the page's https Origin is not the http the bridge sees
        assert ok.status_code == 403
    mallory = bridge.app.test_client()
    for _ in range(LOGIN_REFUSALS):
        _login_through_front(mallory, "203.0.113.5", password="wrong")
    assert _login_through_front(mallory, "203.0.113.5", password="wrong").status_code == 429
    # another client behind the same front: blocked with it only when the front is not believed
    other = _login_through_front(bridge.app.test_client(), "198.51.100.8")
    assert other.status_code == (303 if hops else 429)


def test_a_refused_login_logs_the_name_only_when_it_could_be_an_account(console):
    client = console.app.test_client()
    login(client, name="x\u202e<b>evil</b>", password="wrong")
    entry = log_entries(console, "login")[0]
    assert entry.operator is None and entry.target is None and entry.outcome == "refused"
