"""The console's pages and actions under /console (issue 16): server-rendered, no JavaScript.

Pages: overview (outbox by state and endpoint), outbox items (filters, keyset pages, bulk
retry/hold/release), one item, consent decisions and the audit trail (patient, type, outcome,
dates), partners (scopes, endpoint, rest-hook health, token rotation), the rest-hook queue
(retry dead), the operator log. Every page shows ids, codes, dates and states only: never a
resource body, never the free text of a note (an outbox item's `last_error` is the delivery
worker's summary of status and issue codes; its `hold_reason` is a consent reason code or an
operator's short reason).

Every action (login, logout, retry, hold, release, rotate, rest-hook retry) is written to the
operator log (storage/operators.py), refused or done.

Room: bridge/ (layer 4, entry point; the only Flask user): may import any room; nothing imports it but cli/.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from flask import (
    Blueprint,
    Flask,
    abort,
    g,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from ...errors import KapError
from ...fhir.digits import ascii_digits
from ...storage.auditlog import OUTCOME_CODES, OUTCOME_NAMES, disclosed, extract, reason_codes
from ...storage.outbox import STATES, OutboxItem, iso
from ...storage.webhooks import WebhookJobs
from ..app import services
from .security import ConsoleGate, csrf_ok, secure_headers

__all__ = ["blueprint", "install"]

PAGE = 50
MAX_IDS = 500
GRACES = {"0": 0.0, "3600": 3600.0, "86400": 86400.0, "604800": 7 * 86400.0}
_REASON = re.compile(r"^[A-Za-z0-9 .:_\-]{1,100}$")
_REF = re.compile(r"^[A-Za-z0-9|:/._\-]{1,200}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
#: What an operator account name may be (storage/operators.py): only such a name is logged.
_OPERATOR_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@\-]{0,63}$")
_WEBHOOK_STATES = ("pending", "sending", "delivered", "dead")

blueprint = Blueprint(
    "console", __name__, url_prefix="/console", template_folder="templates", static_folder="static"
)
_OPEN = frozenset({"console.login", "console.login_form", "console.static"})


def _gate() -> ConsoleGate:
    from flask import current_app

    return current_app.extensions["fhir_kap_console"]


def install(app: Flask) -> None:
    from ...storage.operators import Operators

    app.extensions["fhir_kap_console"] = ConsoleGate.for_app(app, Operators(services().db))
    app.register_blueprint(blueprint)


# ---- the gate: every page but the login needs a session; every POST its CSRF token


@blueprint.before_request
def _need_session() -> Response | None:
    g.console_session = None
    if request.endpoint in _OPEN:
        return None
    session = _gate().session()  # a partner's Authorization header is never looked at
    if session is None:
        return redirect(url_for("console.login_form"), 303)
    if request.method == "POST" and not csrf_ok(session):
        _gate().operators.log(session.operator, "csrf-refused", request.path[:200], "refused")
        return _refused("The form's security token is missing or wrong: reload the page and try again.")
    return None


@blueprint.after_request
def _headers(resp: Response) -> Response:
    return secure_headers(resp)


def _refused(text: str, status: int = 403) -> Response:
    resp = make_response(render_template("console/error.html", status=status, text=text), status)
    return secure_headers(resp)


@blueprint.errorhandler(KapError)
def _kap_error(exc: KapError) -> Response:
    return _refused("; ".join(i.message for i in exc.issues), exc.http_status)


@blueprint.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> Response:
    return _refused(exc.description or exc.name, exc.code or 500)


@blueprint.app_template_filter("when")
def _when(ts: float | None) -> str:
    return (iso(ts) or "-").replace("T", " ").replace("+00:00", "Z")


@blueprint.app_context_processor
def _context() -> dict[str, Any]:
    session = g.get("console_session")
    return {"operator": session.operator if session else None, "csrf": session.csrf if session else ""}


# ---- login and logout


@blueprint.get("/login")
def login_form() -> Response:
    resp = make_response()
    token = _gate().login_token(resp)
    resp.set_data(render_template("console/login.html", login_csrf=token, failed=request.args.get("failed")))
    return resp


@blueprint.post("/login")
def login() -> Response:
    gate = _gate()
    given = (request.form.get("name") or "")[:64]
    name = given if _OPERATOR_NAME.match(given) else ""  # only a possible account name is logged
    address = request.remote_addr or "-"
    if gate.throttle.blocked(address):
        abort(429, "Too many refused logins from this address: wait a few minutes.")
    if not gate.login_token_ok():
        if gate.throttle.refused(address):
            gate.operators.log(None, "login", None, "refused", "throttled")
        return _refused("The login form's security token is missing or wrong: reload the page.")
    ok, why = gate.operators.verify(given, request.form.get("password") or "")  # one hash whatever the name
    if not ok and gate.throttle.refused(address):
        gate.operators.log(None, "login", None, "refused", "throttled")
    gate.operators.log(name or None, "login", name or None, "ok" if ok else "refused", why)
    if not ok:
        # One answer for every refusal (unknown name, wrong password, locked, disabled): a locked
        # account must not tell anyone that the name is an operator's. The log keeps `why`.
        return redirect(url_for("console.login_form", failed="1"), 303)
    resp = redirect(url_for("console.overview"), 303)
    gate.start(resp, name)
    return resp


@blueprint.post("/logout")
def logout() -> Response:
    session = g.console_session
    _gate().operators.log(session.operator, "logout", session.operator, "ok")
    resp = redirect(url_for("console.login_form"), 303)
    _gate().end(resp)
    return resp


# ---- overview and the outbox


@blueprint.get("/")
def overview() -> str:
    sv = services()
    by_endpoint = sv.outbox.counts_by_endpoint()
    counts = {s: sum(c[s] for c in by_endpoint.values()) for s in STATES}  # one scan, not two
    dead_hooks = sum(c.get("dead", 0) for c in _webhook_jobs().counts().values())
    denials = [_audit_row(r) for r in sv.audit.page("AuditEvent", outcome="4", limit=5)]
    return render_template(
        "console/overview.html",
        counts=counts,
        by_endpoint=by_endpoint,
        states=STATES,
        dead_hooks=dead_hooks,
        denials=denials,
    )


def _int_arg(name: str) -> int | None:
    """A page key from the query: absent or empty is None; anything but 1-18 ASCII digits a 400."""
    value = request.args.get(name, "")
    if not value:
        return None
    if not ascii_digits(value):
        abort(400, f"{name} is a whole number (1-18 digits 0-9)")
    return int(value)


@blueprint.get("/outbox")
def outbox() -> str:
    sv = services()
    state = request.args.get("state") or None
    if state not in (None, *STATES):
        abort(400, f"unknown state; use one of {', '.join(STATES)}")
    endpoint = request.args.get("endpoint") or None
    if endpoint is not None and not _REF.match(endpoint):
        abort(400, "an endpoint name has letters, digits and . _ - only")
    after, before = _int_arg("after"), _int_arg("before")
    items = sv.outbox.list(state, endpoint=endpoint, limit=PAGE + 1, after=after, before=before)
    more = len(items) > PAGE
    items = items[:PAGE] if before is None else items[-PAGE:]
    base = {k: v for k, v in (("state", state), ("endpoint", endpoint)) if v}
    older = (
        _link("console.outbox", base, after=items[-1].id) if items and (more or before is not None) else None
    )
    newer = (
        _link("console.outbox", base, before=items[0].id) if items and (after or (before and more)) else None
    )
    return render_template(
        "console/outbox.html",
        items=[_item_row(i) for i in items],
        state=state,
        endpoint=endpoint,
        states=STATES,
        endpoints=sv.outbox.endpoints(),
        next_link=older,
        prev_link=newer,
        msg=_message(),
    )


def _link(endpoint: str, base: dict[str, Any], **extra: Any) -> str:
    return url_for(endpoint) + "?" + urlencode({**base, **extra})


def _item_row(item: OutboxItem) -> dict[str, Any]:
    """What a page may show of an item: ids, codes, states and times (never its resource)."""
    row = item.summary()
    row["key"] = item.idempotency_key
    row["when"] = item.delivered_at if item.state == "delivered" else item.next_attempt_at
    return row


@blueprint.get("/outbox/<item_id>")
def item(item_id: str) -> str:
    # Not werkzeug's <int:...>: its \d+ takes other scripts' digits (/outbox/٣ was item 3).
    found = services().outbox.get(int(item_id)) if ascii_digits(item_id) else None
    if found is None:
        abort(404, "no such outbox item (an id is 1-18 digits 0-9)")
    return render_template("console/item.html", item=_item_row(found), msg=_message())


def _ids() -> list[int]:
    raw = request.form.getlist("id")
    if not raw or len(raw) > MAX_IDS or not all(ascii_digits(x) for x in raw):
        abort(400, f"choose 1-{MAX_IDS} items")
    return sorted({int(x) for x in raw})


@blueprint.post("/outbox/action")
def outbox_action() -> Response:
    """Retry, hold or release the chosen items, one by one: an item another operator or a worker
    moved meanwhile is counted as skipped, never an error for the rest."""
    sv = services()
    operator = g.console_session.operator
    action = request.form.get("action", "")
    if action not in ("retry", "hold", "release"):
        abort(400, "the action is retry, hold or release")
    reason = (request.form.get("reason") or "").strip() or "held by an operator"
    if action == "hold" and not _REASON.match(reason):
        abort(400, "a hold reason has 1-100 letters, digits, spaces and . : _ -")
    done: list[int] = []
    skipped: list[int] = []
    with sv.db.transaction():  # one commit for every move and its log line (each a savepoint)
        for item_id in _ids():
            try:
                if action == "hold":
                    ok = sv.outbox.hold(item_id, reason)
                else:
                    getattr(sv.outbox, action)(item_id)
                    ok = True
            except KapError:
                ok = False
            (done if ok else skipped).append(item_id)
            _gate().operators.log(
                operator,
                f"outbox-{action}",
                f"outbox/{item_id}",
                "ok" if ok else "skipped",
                reason if action == "hold" else None,
            )
    return _back(f"{action}:{len(done)}:{len(skipped)}")


@blueprint.post("/outbox/retry-all")
def outbox_retry_all() -> Response:
    """Every dead (or held) item, of one endpoint if named, back to pending (bulk retry)."""
    sv = services()
    state = request.form.get("state", "dead")
    endpoint = request.form.get("endpoint") or None
    if state not in ("dead", "held") or (endpoint is not None and not _REF.match(endpoint)):
        abort(400, "bulk retry takes state dead or held and an optional endpoint")
    done = len(sv.outbox.retry_all(state, endpoint=endpoint))  # one transaction: nothing skipped
    _gate().operators.log(
        g.console_session.operator, "outbox-retry-all", f"{state}:{endpoint or '*'}", "ok", f"retried {done}"
    )
    return _back(f"retry:{done}:0")


def _back(msg: str) -> Response:
    target = request.form.get("back") or url_for("console.outbox")
    if not target.startswith("/console") or "//" in target or "\\" in target:
        target = url_for("console.outbox")
    sep = "&" if "?" in target else "?"
    target = re.sub(r"([?&])msg=[^&]*&?", r"\1", target).rstrip("?&")
    sep = "&" if "?" in target else "?"
    return redirect(f"{target}{sep}msg={msg}", 303)


def _message() -> str | None:
    """The outcome of the last action, rebuilt from its counts (nothing of the URL is echoed)."""
    m = re.fullmatch(r"(retry|hold|release|resend):([0-9]{1,6}):([0-9]{1,6})", request.args.get("msg", ""))
    if m is None:
        return None
    verb = {"retry": "retried", "hold": "held", "release": "released", "resend": "sent again"}[m.group(1)]
    text = f"{int(m.group(2))} item(s) {verb}"
    return text + (f", {int(m.group(3))} skipped (not in a state that allows it)" if int(m.group(3)) else "")


# ---- consent decisions and the audit trail


def _audit_row(row: dict[str, Any]) -> dict[str, Any]:
    res = row["resource"]
    rec = extract(res)
    return {
        "seq": row["seq"],
        "recorded": rec.recorded,
        "type": rec.resource_type,
        "outcome": OUTCOME_NAMES.get(rec.outcome or "", rec.outcome or "-"),
        "reasons": reason_codes(res),
        "resource": disclosed(res),
        "patient": rec.patient,
        "recipient": rec.recipient,
        "consent": rec.consent_ref,
    }


def _date(name: str) -> str | None:
    from datetime import date

    value = request.args.get(name) or None
    if value is None:
        return None
    try:
        if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value):
            raise ValueError(value)
        date.fromisoformat(value)
    except ValueError:
        abort(400, f"{name} is a date YYYY-MM-DD")
    return value


@blueprint.get("/audit")
def audit() -> str:
    sv = services()
    args = request.args
    rtype = args.get("type") or None
    if rtype not in (None, "AuditEvent", "Provenance"):
        abort(400, "type is AuditEvent or Provenance")
    outcome = args.get("outcome") or None
    if outcome not in (None, *OUTCOME_CODES):
        abort(400, f"outcome is one of {', '.join(OUTCOME_CODES)}")
    patient = (args.get("patient") or "").strip() or None
    recipient = (args.get("recipient") or "").strip() or None
    for label, value in (("patient", patient), ("recipient", recipient)):
        if value is not None and not _REF.match(value):
            abort(400, f"{label} is a reference like Patient/abc, or SYSTEM|VALUE")
    since, until = _date("since"), _date("until")
    until_bound = None
    if until is not None:
        from datetime import date, timedelta

        until_bound = (date.fromisoformat(until) + timedelta(days=1)).isoformat()  # the whole day
    before = None
    given = args.get("before", "")
    m = re.fullmatch(r"([0-9]{1,12}(?:\.[0-9]{1,9})?)_([0-9]{1,18})", given)
    if given and m is None:
        abort(400, "before is the key of the next page's link (SECONDS_SEQUENCE, digits 0-9)")
    if m:
        before = (float(m.group(1)), int(m.group(2)))
    rows = sv.audit.page(
        rtype,
        patient,
        OUTCOME_CODES.get(outcome) if outcome else None,
        since,
        until=until_bound,
        recipient=recipient,
        before=before,
        limit=PAGE + 1,
    )
    more = len(rows) > PAGE
    rows = rows[:PAGE]
    base = {
        k: v
        for k, v in (
            ("type", rtype),
            ("outcome", outcome),
            ("patient", patient),
            ("recipient", recipient),
            ("since", since),
            ("until", until),
        )
        if v
    }
    older = (
        _link("console.audit", base, before=f"{rows[-1]['recorded_epoch']!r}_{rows[-1]['seq']}")
        if more
        else None
    )
    return render_template(
        "console/audit.html",
        rows=[_audit_row(r) for r in rows],
        f=base,
        outcomes=list(OUTCOME_CODES),
        next_link=older,
        first_link=_link("console.audit", base) if before else None,
    )


# ---- partners and the rest-hook queue


def _webhook_jobs() -> WebhookJobs:
    notifier = services().inbound.notifier
    if notifier is not None and notifier.webhook_jobs is not None:
        return notifier.webhook_jobs
    return WebhookJobs(services().db)  # a bridge without its own sender still shows the queue


@blueprint.get("/partners")
def partners() -> str:
    sv = services()
    counts = _webhook_jobs().counts()  # one grouped query for every partner, nothing capped
    rows = []
    for p in sv.partners.list():
        health = None
        if p.webhook_url:
            mine = counts.get(p.name, {})
            health = {s: mine.get(s, 0) for s in ("pending", "dead", "delivered")}
        rows.append({"p": p, "health": health})
    return render_template("console/partners.html", rows=rows, graces=list(GRACES))


@blueprint.post("/partners/<name>/rotate")
def rotate(name: str) -> Response:
    operator = g.console_session.operator
    grace = GRACES.get(request.form.get("grace", "0"))
    if not _NAME.match(name):
        abort(400, "a partner name has 1-64 letters, digits and _ . -")
    if grace is None:
        abort(400, f"grace is one of {', '.join(GRACES)} seconds")
    try:
        partner, token = services().partners.rotate(name, grace_seconds=grace)
    except KapError:
        _gate().operators.log(operator, "partner-rotate", f"partner/{name}", "refused")
        raise
    _gate().operators.log(operator, "partner-rotate", f"partner/{name}", "ok", f"grace {grace:g}s")
    until = datetime.fromtimestamp(time.time() + grace, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    # Shown once, in this answer only (no-store): it is stored only as its SHA-256.
    return make_response(render_template("console/token.html", partner=partner, token=token, until=until))


@blueprint.get("/webhooks")
def webhooks() -> str:
    state = request.args.get("state") or None
    partner = request.args.get("partner") or None
    if state not in (None, *_WEBHOOK_STATES):
        abort(400, f"state is one of {', '.join(_WEBHOOK_STATES)}")
    if partner is not None and not _NAME.match(partner):
        abort(400, "a partner name has 1-64 letters, digits and _ . -")
    jobs = _webhook_jobs().jobs(state, limit=200, partner=partner)
    return render_template(
        "console/webhooks.html",
        jobs=jobs,
        state=state,
        partner=partner,
        states=_WEBHOOK_STATES,
        msg=_message(),
    )


@blueprint.post("/webhooks/retry")
def webhooks_retry() -> Response:
    operator = g.console_session.operator
    raw = request.form.get("job") or ""
    partner = request.form.get("partner") or None
    if (raw and not ascii_digits(raw)) or (partner is not None and not _NAME.match(partner)):
        abort(400, "a job id, or a partner name")
    notifier = services().inbound.notifier
    job_id = int(raw) if raw else None
    if notifier is not None and notifier.webhook_jobs is not None:
        moved = notifier.retry(job_id, partner=partner)
    else:
        moved = _webhook_jobs().retry(job_id, partner=partner, now=time.time())
    _gate().operators.log(
        operator,
        "webhook-retry",
        f"webhook/{job_id}" if job_id else f"partner/{partner or '*'}",
        "ok",
        f"moved {len(moved)}",
    )
    return redirect(url_for("console.webhooks", msg=f"resend:{len(moved)}:0"), 303)


# ---- the operator log


@blueprint.get("/log")
def oplog() -> str:
    before = _int_arg("before")
    entries = _gate().operators.entries(before=before, limit=PAGE + 1)
    more = len(entries) > PAGE
    entries = entries[:PAGE]
    return render_template(
        "console/log.html",
        entries=entries,
        next_link=_link("console.oplog", {}, before=entries[-1].seq) if more else None,
    )
