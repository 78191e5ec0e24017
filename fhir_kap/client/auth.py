"""Credentials for a FHIR server (client/, layer 2: IO adapter; imports base only).

Three schemes behind one `Auth` protocol: none, a static bearer token, and SMART Backend
Services (client_credentials with a client secret or `private_key_jwt`), whose tokens are
cached and renewed before expiry, and renewed once when the server answers 401. Tokens and
secrets never appear in repr, messages or logs, and the token requests never follow a redirect
(the form carries the secret or the signed assertion).
"""

from __future__ import annotations

import base64
import logging
import threading
import time
import uuid
from collections.abc import Callable, MutableMapping
from typing import Any, Protocol
from urllib.parse import quote

import requests

from ..errors import ConfigError, ServerError
from ..fhir.retry import RETRY_STATUSES
from .answers import json_body, redirect_error, status_error, strip_query

__all__ = ["JWT_BEARER", "Auth", "BearerAuth", "NoAuth", "SmartBackendAuth"]

log = logging.getLogger("fhir_kap.client")

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_EXPIRY_MARGIN = 60.0  # seconds: renew this early (or 10% of the lifetime, if shorter)


class Auth(Protocol):
    """Adds credentials to a request. `invalidate()` drops cached credentials after a 401 and
    says whether trying again with fresh ones makes sense."""

    def apply(
        self,
        session: requests.Session,
        headers: MutableMapping[str, str],
        *,
        base_url: str,
        timeout: float | tuple[float, float],
    ) -> None: ...

    def invalidate(self) -> bool: ...


class NoAuth:
    """No credentials."""

    def apply(
        self,
        session: requests.Session,
        headers: MutableMapping[str, str],
        *,
        base_url: str,
        timeout: float | tuple[float, float],
    ) -> None:
        return None

    def invalidate(self) -> bool:
        return False


class BearerAuth:
    """A static bearer token (its value never appears in repr, messages or logs)."""

    def __init__(self, token: str) -> None:
        if not token or not isinstance(token, str):
            raise ConfigError("Bearer auth needs a non-empty token", rule="auth")
        self._token = token

    def __repr__(self) -> str:
        return "BearerAuth(token=***)"

    def apply(
        self,
        session: requests.Session,
        headers: MutableMapping[str, str],
        *,
        base_url: str,
        timeout: float | tuple[float, float],
    ) -> None:
        headers["Authorization"] = f"Bearer {self._token}"

    def invalidate(self) -> bool:
        return False  # a static token does not get better by asking again


class SmartBackendAuth:
    """SMART Backend Services (client_credentials): client secret or private_key_jwt.

    The token endpoint is `token_url`, or discovered from `{base}/.well-known/smart-configuration`
    on first use. With `client_secret` the client authenticates with HTTP Basic
    (client_secret_basic); with `private_key_pem` it signs a fresh assertion each time
    (iss = sub = client_id, aud = token endpoint, exp <= 5 min, new jti, `kid` header).
    The access token is cached and renewed 60 s (or 10% of its lifetime, if shorter) before it
    expires, and renewed once when the server answers 401. `clock` (seconds) drives only that
    cache, so tests can move it; assertion claims always use the system time.
    """

    ASSERTION_LIFETIME = 240  # seconds; SMART allows at most 300, leave room for clock skew

    def __init__(
        self,
        client_id: str,
        *,
        token_url: str | None = None,
        client_secret: str | None = None,
        private_key_pem: bytes | None = None,
        key_id: str | None = None,
        alg: str = "RS384",
        scope: str = "system/*.read system/*.write",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not client_id:
            raise ConfigError("SMART auth needs a client_id", rule="auth")
        if (client_secret is None) == (private_key_pem is None):
            raise ConfigError(
                f"SMART client '{client_id}': give exactly one of client_secret or private_key_pem",
                rule="auth",
            )
        if alg not in ("RS384", "ES384"):
            raise ConfigError(
                f"SMART client '{client_id}': alg must be RS384 or ES384, not '{alg}'", rule="auth"
            )
        self.client_id = client_id
        self.token_url = token_url
        self.scope = scope
        self.alg = alg
        self.key_id = key_id
        self._secret = client_secret
        self._key: Any = None
        if private_key_pem is not None:
            if not key_id:
                raise ConfigError(
                    f"SMART client '{client_id}': private_key_jwt needs key_id (the "
                    "'kid' of the registered public key)",
                    rule="auth",
                )
            self._key = _load_private_key(private_key_pem, alg, client_id)
        self._clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._renew_at = 0.0
        self.token_requests = 0  # how many tokens were fetched (observability, tests)

    def __repr__(self) -> str:
        kind = "private_key_jwt" if self._key is not None else "client_secret"
        return f"SmartBackendAuth(client_id={self.client_id!r}, method={kind})"

    def apply(
        self,
        session: requests.Session,
        headers: MutableMapping[str, str],
        *,
        base_url: str,
        timeout: float | tuple[float, float],
    ) -> None:
        with self._lock:
            if self._token is None or self._clock() >= self._renew_at:
                self._fetch(session, base_url, timeout)
            headers["Authorization"] = f"Bearer {self._token}"

    def invalidate(self) -> bool:
        with self._lock:
            self._token = None
        return True

    def _discover(self, session: requests.Session, base_url: str, timeout: Any) -> str:
        url = f"{base_url}/.well-known/smart-configuration"
        try:
            resp = session.get(
                url, headers={"Accept": "application/json"}, timeout=timeout, allow_redirects=False
            )
        except requests.RequestException as exc:
            raise ServerError(
                f"GET .well-known/smart-configuration: could not reach server ({type(exc).__name__})",
                retryable=True,
                url=url,
            ) from None
        if 300 <= resp.status_code < 400:
            raise redirect_error("GET", ".well-known/smart-configuration", resp, url)
        if resp.status_code != 200:
            raise status_error("GET", ".well-known/smart-configuration", resp)
        doc = json_body(resp, "GET", ".well-known/smart-configuration")
        endpoint = doc.get("token_endpoint") if isinstance(doc, dict) else None
        if not isinstance(endpoint, str) or not endpoint.startswith(("https://", "http://")):
            raise ServerError(
                "GET .well-known/smart-configuration: no token_endpoint in the answer",
                retryable=False,
                url=url,
            )
        return endpoint

    def _fetch(self, session: requests.Session, base_url: str, timeout: Any) -> None:
        if self.token_url is None:
            self.token_url = self._discover(session, base_url, timeout)
        form = {"grant_type": "client_credentials", "scope": self.scope}
        headers = {"Accept": "application/json"}
        if self._key is not None:
            form["client_assertion_type"] = JWT_BEARER
            form["client_assertion"] = self._assertion()
        else:
            # RFC 6749 2.3.1: form-urlencode both parts before Basic encoding
            raw = f"{quote(self.client_id, safe='')}:{quote(self._secret or '', safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(raw.encode()).decode()
        started = self._clock()
        try:
            # never redirected: the form carries the client's secret or its signed assertion
            resp = session.post(
                self.token_url, data=form, headers=headers, timeout=timeout, allow_redirects=False
            )
        except requests.RequestException as exc:
            raise ServerError(
                f"POST token endpoint: could not reach server ({type(exc).__name__})",
                retryable=True,
                url=strip_query(self.token_url),
            ) from None
        self.token_requests += 1
        if 300 <= resp.status_code < 400:
            raise redirect_error("POST", "token endpoint", resp, self.token_url)
        if resp.status_code != 200:
            raise _token_error(resp, self.client_id)
        doc = json_body(resp, "POST", "token endpoint")
        token = doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise ServerError(
                "POST token endpoint: answer has no access_token",
                status=resp.status_code,
                retryable=False,
                url=strip_query(self.token_url),
            )
        try:
            lifetime = float(doc.get("expires_in", 300))
        except (TypeError, ValueError):
            lifetime = 300.0
        self._token = token
        self._renew_at = started + lifetime - min(TOKEN_EXPIRY_MARGIN, lifetime * 0.1)
        log.info("SMART token obtained for client %s (expires in %.0f s)", self.client_id, lifetime)

    def _assertion(self) -> str:
        import jwt  # PyJWT; only needed for private_key_jwt

        now = int(time.time())  # the token server checks these against real time, not self._clock
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.token_url,
            "iat": now,
            "exp": now + self.ASSERTION_LIFETIME,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._key, algorithm=self.alg, headers={"kid": self.key_id, "typ": "JWT"})


def _load_private_key(pem: bytes, alg: str, client_id: str) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"SMART client '{client_id}': private key is not an unencrypted PEM key ({type(exc).__name__})",
            rule="auth",
        ) from None
    wanted = rsa.RSAPrivateKey if alg == "RS384" else ec.EllipticCurvePrivateKey
    if not isinstance(key, wanted):
        raise ConfigError(
            f"SMART client '{client_id}': alg {alg} needs an "
            f"{'RSA' if alg == 'RS384' else 'EC P-384'} private key",
            rule="auth",
        )
    return key


def _token_error(resp: requests.Response, client_id: str) -> ServerError:
    error = desc = ""
    try:
        doc = resp.json()
        if isinstance(doc, dict):
            error = str(doc.get("error") or "")[:60]
            desc = str(doc.get("error_description") or "")[:200]
    except ValueError:
        pass
    detail = f" — {error}: {desc}" if error or desc else ""
    return ServerError(
        f"POST token endpoint for client {client_id}: {resp.status_code} {resp.reason or ''}".rstrip()
        + detail,
        status=resp.status_code,
        retryable=resp.status_code in RETRY_STATUSES,
        url=strip_query(resp.url or ""),
    )
