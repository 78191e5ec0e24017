"""The console's gate: operator sessions, CSRF tokens, security headers (issue 16).

- Operators log in with a name and password (storage/operators.py: argon2id, one hash per try
  whatever the name, an account locked for 5 minutes after 5 wrong passwords). Every refusal
  gets the same answer (views.login), so the lock does not tell which names are operators'; the
  operator log keeps why. A partner's bearer token means nothing here: the console reads its own
  cookie only.
- The session cookie is `__Host-kap-console` (Secure, HttpOnly, SameSite=Strict, Path=/, no
  Domain): it holds a random token whose SHA-256 names a server-side session (logout ends it).
  `FHIR_KAP_CONSOLE_SECURE_COOKIE=0` drops `Secure` (and the `__Host-` prefix, which needs it)
  for plain-http development and tests, and only for requests to a loopback host (127.0.0.1,
  ::1, localhost): to any other host the cookie stays Secure, so a console served over plain
  http elsewhere cannot log in.
- Every POST carries the session's CSRF token (a hidden field, compared in constant time), and a
  POST whose Origin or Sec-Fetch-Site header names another origin is refused: both answer the 403 page. The login
  form has its own token (a double-submit cookie), so a page elsewhere cannot log a browser in.
- Every console answer has a strict Content-Security-Policy (no script at all, styles from the
  console's own stylesheet only, forms posting back to the console only, never framed) and
  `Cache-Control: no-store`.

Room: bridge/ (layer 4, entry point; the only Flask user): may import any room; nothing imports it but cli/.
"""

from __future__ import annotations

import hmac
import os
import secrets
import threading
import time
from dataclasses import dataclass, field

from flask import Flask, g, request
from werkzeug.wrappers import Response

from ...storage.operators import Operators, Session

__all__ = [
    "CSP",
    "LOGIN_COOKIE",
    "ConsoleGate",
    "csrf_ok",
    "secure_headers",
]

CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURE_COOKIE = "__Host-kap-console"
PLAIN_COOKIE = "kap-console"
LOGIN_COOKIE = "kap-console-login"
_LOOPBACK = frozenset({"127.0.0.1", "::1", "[::1]", "localhost"})
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # not no-referrer: a browser then sends `Origin: null` with forms
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}


def secure_headers(resp: Response) -> Response:
    for name, value in _HEADERS.items():
        resp.headers[name] = value
    if request.is_secure:
        resp.headers["Strict-Transport-Security"] = "max-age=31536000"
    return resp


#: Refused logins from one client address this process answers within LOGIN_WINDOW seconds before
#: it answers 429 (and logs that once per window) instead of trying, or logging, any more.
LOGIN_REFUSALS = 10
LOGIN_WINDOW = 300.0


@dataclass
class LoginThrottle:
    """Refused logins per client address, per process (bounded): an anonymous client cannot
    flood the operator log or try passwords at speed. Several workers each keep their own count."""

    limit: int = LOGIN_REFUSALS
    window: float = LOGIN_WINDOW
    max_addresses: int = 10_000

    def __post_init__(self) -> None:
        self._seen: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, address: str, now: float) -> list[float]:
        kept = [t for t in self._seen.get(address, ()) if now - t < self.window]
        if kept:
            self._seen[address] = kept
        else:
            self._seen.pop(address, None)
        return kept

    def blocked(self, address: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        with self._lock:
            return len(self._recent(address, now)) >= self.limit

    def refused(self, address: str, now: float | None = None) -> bool:
        """Count a refusal; True when this one reaches the limit (log it once, then stop)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if address not in self._seen and len(self._seen) >= self.max_addresses:
                self._seen.pop(next(iter(self._seen)))  # the oldest address: memory stays bounded
            recent = self._recent(address, now)
            recent.append(now)
            self._seen[address] = recent
            return len(recent) == self.limit


@dataclass
class ConsoleGate:
    """Sessions and cookies of the console, on the app's database."""

    operators: Operators
    secure_cookie: bool = True
    throttle: LoginThrottle = field(default_factory=LoginThrottle)

    @classmethod
    def for_app(cls, app: Flask, operators: Operators) -> ConsoleGate:
        """The gate; `Secure` cookies unless `FHIR_KAP_CONSOLE_SECURE_COOKIE=0` in the environment
        (read once here) or `app.config["FHIR_KAP_CONSOLE_SECURE_COOKIE"] = False` (tests)."""
        secure = os.environ.get("FHIR_KAP_CONSOLE_SECURE_COOKIE", "1").strip().lower() not in (
            "0",
            "false",
            "no",
        )
        return cls(operators, secure)

    def _secure_here(self) -> bool:
        """Secure unless configured off, and always Secure for a host that is not loopback."""
        from flask import current_app

        secure = current_app.config.get("FHIR_KAP_CONSOLE_SECURE_COOKIE", self.secure_cookie)
        host = request.host or ""
        host = "[::1]" if host.startswith("[") else host.rsplit(":", 1)[0]
        return bool(secure) or host not in _LOOPBACK

    def cookie_name(self) -> str:
        return SECURE_COOKIE if self._secure_here() else PLAIN_COOKIE

    def session(self) -> Session | None:
        token = request.cookies.get(self.cookie_name())
        found = self.operators.session(token)
        g.console_session = found
        g.console_token = token if found else None
        return found

    def start(self, resp: Response, name: str) -> Session:
        token, session = self.operators.open_session(name)
        resp.set_cookie(
            self.cookie_name(),
            token,
            path="/",
            secure=self._secure_here(),
            httponly=True,
            samesite="Strict",
        )
        resp.delete_cookie(
            LOGIN_COOKIE, path="/console", secure=self._secure_here(), httponly=True, samesite="Strict"
        )
        return session

    def end(self, resp: Response) -> None:
        self.operators.close_session(g.get("console_token"))
        resp.delete_cookie(
            self.cookie_name(), path="/", secure=self._secure_here(), httponly=True, samesite="Strict"
        )

    def login_token(self, resp: Response) -> str:
        """The login form's CSRF token: kept in a cookie of its own, echoed by the form."""
        token = request.cookies.get(LOGIN_COOKIE) or ""
        if len(token) != 43:
            token = secrets.token_urlsafe(32)
        resp.set_cookie(
            LOGIN_COOKIE, token, path="/console", secure=self._secure_here(), httponly=True, samesite="Strict"
        )
        return token

    def login_token_ok(self) -> bool:
        cookie = request.cookies.get(LOGIN_COOKIE) or ""
        given = request.form.get("csrf") or ""
        return bool(cookie) and same_origin() and hmac.compare_digest(cookie.encode(), given.encode())


def same_origin() -> bool:
    """Whether a POST comes from the console's own pages, as far as the browser says: its
    `Sec-Fetch-Site` (when sent) is same-origin, and its `Origin` (when sent) is this origin.
    A client that sends neither (not a browser) still needs the CSRF token."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site != "same-origin":
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin.rstrip("/") == request.host_url.rstrip("/")


def csrf_ok(session: Session) -> bool:
    """The POST carries the session's CSRF token and, if it says where it comes from, this origin."""
    given = request.form.get("csrf") or ""
    return same_origin() and hmac.compare_digest(session.csrf.encode(), given.encode())
