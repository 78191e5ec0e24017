"""Red-team findings F9 and F10 (2026-12-05) over the bridge app's test client.

F9 ("never a 500"): an integer taken from a request (`_count`, `_offset`, the console's `after`,
`before`, item and job ids) is ASCII digits only. `str.isdigit()` also accepts superscripts and
circled digits (`²`, `①`), which `int()` refuses (a 500), and `int()` accepts other scripts' digits
(`٣`) and more than 4300 digits raises: each is now a 400 naming the parameter and the rule (an
OperationOutcome on /fhir, the 400 page on /console).

F10: the console's lock-out (5 wrong passwords lock an account for 5 minutes) stays, but the login
answers a locked real account exactly as an unknown name: no operator-name enumeration. The
operator log still says `locked`.
"""

from __future__ import annotations

from typing import Any

import pytest

from fhir_kap.bridge.app import services
from fhir_kap.storage.operators import MAX_FAILURES, Operators
from testkit.bridge import is_outcome, load
from testkit.console import PASSWORD, csrf_of, dead_letter

#: Not ASCII digits: superscript two and circled one (isdigit() but not int()), Arabic-Indic three
#: (int() reads it as 3), fullwidth seven, and a number too long for int() to read at all.
NOT_ASCII = ["\u00b2", "\u2460", "\u0663", "\uff17", "1\u00b2", "9" * 5000]


def _bad_param(resp: Any, name: str) -> None:
    """A 400 OperationOutcome naming the parameter (expression) and the rule `search:<name>`."""
    assert resp.status_code == 400, (resp.status_code, resp.get_data(as_text=True)[:300])
    assert is_outcome(resp)
    issue = resp.get_json(force=True)["issue"][0]
    assert issue["expression"] == [name]
    assert f"rule search:{name}" in issue["diagnostics"]


def _note_id(bridge, value: str = "redteam-inputs-1") -> str:
    note = load("Example-Communication-note-1.json")
    note["identifier"][0]["value"] = value
    resp = bridge.post("clinic", "/fhir/Communication", note)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return str(resp.get_json(force=True)["id"])


# ---- F9 on /fhir


@pytest.mark.parametrize(
    "value", ["ge\u0662\u0660\u0662\u0664", "\u0662\u0660\u0662\u0664-01-01", "2024-\u0660\u0661"]
)
def test_search__a_date_in_other_scripts_digits_is_400_not_read_as_ascii(bridge, value):
    """`_lastUpdated=ge٢٠٢٤` was answered 200 as the year 2024 (`\\d` matches any script's
    digits and int() reads them): a date is ASCII digits, as FHIR's date type says."""
    _note_id(bridge)
    resp = bridge.get("clinic", "/fhir/Communication?_lastUpdated=" + value)
    assert resp.status_code == 400 and is_outcome(resp), resp.get_data(as_text=True)[:300]
    assert bridge.get("clinic", "/fhir/Communication?_lastUpdated=ge2024").status_code == 200


def test_update__an_if_match_version_in_other_scripts_digits_is_400(bridge):
    rid = _note_id(bridge, "redteam-inputs-ifmatch")
    note = bridge.get("clinic", f"/fhir/Communication/{rid}").get_json(force=True)
    resp = bridge.client.put(
        f"/fhir/Communication/{rid}",
        json=note,
        headers=bridge.h("clinic", **{"Content-Type": "application/fhir+json", "If-Match": 'W/"\u0661"'}),
    )
    assert resp.status_code == 400 and is_outcome(resp), resp.get_data(as_text=True)[:300]


@pytest.mark.parametrize("value", NOT_ASCII)
@pytest.mark.parametrize("name", ["_count", "_offset"])
def test_search__non_ascii_digits_in_count_or_offset_are_400_naming_the_parameter(bridge, name, value):
    _bad_param(bridge.get("clinic", f"/fhir/Task?{name}={value}"), name)
    _bad_param(bridge.get("a", f"/fhir/Communication?{name}={value}"), name)
    _bad_param(bridge.get("a", f"/fhir/Communication?{name}=1&{name}={value}"), name)  # the last counts


@pytest.mark.parametrize("value", NOT_ASCII)
@pytest.mark.parametrize("name", ["_count", "_offset"])
def test_history__non_ascii_digits_in_count_or_offset_are_400(bridge, name, value):
    rid = _note_id(bridge)
    _bad_param(bridge.get("clinic", f"/fhir/Communication/{rid}/_history?{name}={value}"), name)


def test_search__ascii_digits_still_page(bridge):
    """The control: ASCII digits are read as before (a page of one, and the offset past it)."""
    _note_id(bridge, "redteam-inputs-1"), _note_id(bridge, "redteam-inputs-2")
    page = bridge.get("clinic", "/fhir/Communication?_count=1&_offset=1").get_json(force=True)
    assert page["resourceType"] == "Bundle" and len(page["entry"]) == 1
    assert any(link["relation"] == "previous" for link in page["link"])


# ---- F9 on /console


@pytest.mark.parametrize("value", [*NOT_ASCII, "abc", "-1", "1.5", " 1", "9" * 19])
@pytest.mark.parametrize(
    "path",
    ["/console/outbox?after=", "/console/outbox?before=", "/console/log?before=", "/console/audit?before="],
)
def test_console__a_page_number_not_ascii_digits_is_the_400_page(op, path, value):
    resp = op.get(path + value)
    assert resp.status_code == 400 and "text/html" in resp.content_type
    name = path.rsplit("?", 1)[1].rstrip("=")
    assert f"{name} is" in resp.get_data(as_text=True)


@pytest.mark.parametrize("value", NOT_ASCII)
@pytest.mark.parametrize(
    ("path", "field", "extra"),
    [
        ("/console/outbox/action", "id", {"action": "retry"}),
        ("/console/webhooks/retry", "job", {}),
    ],
)
def test_console__an_id_not_ascii_digits_is_the_400_page(console, op, path, field, extra, value):
    item = dead_letter(services_of(console).outbox, "N-redteam-ids")
    token = csrf_of(op.get("/console/").get_data(as_text=True))
    resp = op.post(path, data={"csrf": token, field: value, **extra})
    assert resp.status_code == 400 and "text/html" in resp.content_type
    assert services_of(console).outbox.get(item.id).state == "dead"  # nothing moved


def test_console__an_item_path_not_ascii_digits_is_404(console, op):
    """/console/outbox/١ (Arabic-Indic one) is no item: werkzeug's <int:> read it as item 1."""
    item = dead_letter(services_of(console).outbox, "N-redteam-path")
    assert op.get(f"/console/outbox/{item.id}").status_code == 200  # the control
    arabic = str(item.id).translate(
        str.maketrans("0123456789", "\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669")
    )
    for path in (arabic, "\u00b2", "9" * 19, "9" * 5000):
        resp = op.get(f"/console/outbox/{path}")
        assert resp.status_code == 404 and "text/html" in resp.content_type, path[:20]


def test_console__ascii_page_numbers_still_work(console, op):
    """The control: an ASCII `after`/`before` is a page; none at all is the first page."""
    for path in (
        "/console/outbox",
        "/console/outbox?after=1",
        "/console/outbox?before=5",
        "/console/log?before=3",
    ):
        assert op.get(path).status_code == 200, path


def services_of(bridge) -> Any:
    with bridge.app.app_context():
        return services()


# ---- F10: a locked account looks like an unknown name


def _tries(client: Any, name: str, address: str, password: str, n: int) -> list[tuple[int, str, str]]:
    """`n` logins from `address`: each answer's status, Location, and the text of the page it leads to."""
    env = {"REMOTE_ADDR": address}
    out = []
    for _ in range(n):
        form = client.get("/console/login", environ_base=env).get_data(as_text=True)
        resp = client.post(
            "/console/login",
            data={"csrf": csrf_of(form), "name": name, "password": password},
            environ_base=env,
        )
        location = resp.headers.get("Location", "")
        shown = client.get(location, environ_base=env).get_data(as_text=True) if location else ""
        out.append((resp.status_code, location, shown))
    return out


def test_login__a_locked_account_answers_as_an_unknown_name(console):
    """Six wrong passwords for alice (locked after the fifth) and six for a name that does not
    exist: the same status, Location and page each time; then alice's right password, still
    locked, answers as a wrong one. Only the operator log tells `locked` from `unknown`."""
    client = console.app.test_client()  # one login cookie: the forms (and pages) are alike
    unknown = _tries(client, "mallory", "10.0.0.1", "wrong password guess", MAX_FAILURES + 1)
    real = _tries(client, "alice", "10.0.0.2", "wrong password guess", MAX_FAILURES + 1)
    assert real == unknown
    assert {(status, loc.rsplit("?", 1)[-1]) for status, loc, _ in real} == {(303, "failed=1")}
    assert _tries(client, "alice", "10.0.0.3", PASSWORD, 1) == unknown[:1]  # locked: the right one too
    assert client.get("/console/", environ_base={"REMOTE_ADDR": "10.0.0.3"}).status_code == 303

    entries = list(reversed(Operators(services_of(console).db).entries(action="login")))
    why = [(e.operator, e.detail) for e in entries if e.outcome == "refused"]
    assert why == (
        [("mallory", "unknown")] * (MAX_FAILURES + 1)
        + [("alice", "wrong-password")] * MAX_FAILURES
        + [("alice", "locked")] * 2
    )
