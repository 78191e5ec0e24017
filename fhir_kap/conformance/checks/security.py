"""Security checks (sec-01 … sec-03): no token and a wrong token are refused, and no response
echoes the credential (conformance/checks/, layer 3: orchestration; imports base, client/ and
the conformance context only).
"""

from __future__ import annotations

import uuid

from ...client import BearerAuth, FhirClient, NoAuth
from ..context import Check, Context, Failed, Skipped


def _need_auth(ctx: Context) -> None:
    if ctx.config.auth_kind == "none":
        raise Skipped("no auth configured (--auth none): the server is used without credentials")


def _sec_no_token(ctx: Context) -> str:
    _need_auth(ctx)
    unauth = FhirClient(ctx.config.server, auth=NoAuth(), timeout=ctx.config.timeout)
    resp = ctx.request("GET", "Patient", params={"_count": "1"}, client=unauth)
    if resp.status not in (401, 403):
        raise Failed(f"a search without a token answered {resp.status}, expected 401 or 403")
    return f"no token → {resp.status}"


def _sec_wrong_token(ctx: Context) -> str:
    _need_auth(ctx)
    wrong = FhirClient(
        ctx.config.server, auth=BearerAuth(f"kap-check-wrong-{uuid.uuid4().hex}"), timeout=ctx.config.timeout
    )
    resp = ctx.request("GET", "Patient", params={"_count": "1"}, client=wrong)
    if resp.status not in (401, 403):
        raise Failed(f"a search with a wrong token answered {resp.status}, expected 401 or 403")
    return f"wrong token → {resp.status}"


def _sec_no_echo(ctx: Context) -> str:
    _need_auth(ctx)
    if not ctx.secrets:
        raise Skipped("no credential was sent during this run")
    if ctx.echoed:
        raise Failed(f"the credential appeared in {len(ctx.echoed)} response(s): {', '.join(ctx.echoed[:5])}")
    return f"credential absent from all {ctx.responses_seen} responses of the run"


CHECKS = (
    Check(
        "sec-01",
        "security",
        "no token → 401/403",
        "RFC 6750 §3.1; SMART Backend Services",
        True,
        _sec_no_token,
    ),
    Check(
        "sec-02", "security", "wrong token → 401/403", "RFC 6750 §3.1 (invalid_token)", True, _sec_wrong_token
    ),
    Check(
        "sec-03",
        "security",
        "the server does not echo the credential",
        "RFC 6750 §5.3; OWASP ASVS 8.3",
        True,
        _sec_no_echo,
    ),
)
