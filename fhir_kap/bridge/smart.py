"""SMART Backend Services for partners: discovery and a client_credentials token endpoint.

    GET  /fhir/.well-known/smart-configuration   what a SMART client discovers (no token needed)
    POST /auth/token                             grant_type=client_credentials with a signed
                                                 client assertion (private_key_jwt)

A partner registered with a JWKS (`fhir-kap partners add NAME --jwks keys.json`) signs an
assertion with its private key (RS384 or ES384; `kid` names the registered key; iss = sub =
its partner name; aud = this token endpoint; exp at most 5 minutes ahead; a fresh `jti`) and
gets an opaque access token valid for 5 minutes, carrying the requested scopes it holds.
That token is then a bearer token like its static one, with those scopes only.

Both need the bridge's public base URL (`fhir-kap serve --base-url https://bridge.example/fhir`):
the assertion's `aud` is checked against the token endpoint it names, never against the
request's Host header, which a caller controls. Without it they answer 404.

Errors follow RFC 6749 section 5.2 (what OAuth clients parse): `{"error": ..., "error_description": ...}`
with 400, or 401 for `invalid_client`; the description names the rule, never a key or a claim value.

Room: bridge/ (layer 4, entry point; the only Flask user): may import any room; nothing imports it but cli/.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Response, request

from ..client import JWT_BEARER
from ..errors import Conflict, NotFound
from ..storage.partners import ACCESS_TOKEN_SECONDS
from .app import json_response, services

__all__ = ["TOKEN_PATH", "register"]

TOKEN_PATH = "/auth/token"
ALGS = ("RS384", "ES384")
MAX_ASSERTION_SECONDS = 300  # SMART: exp no more than five minutes in the future
LEEWAY_SECONDS = 30  # clock skew allowed on exp (and iat/nbf)
_MAX_ASSERTION_BYTES = 8192
log = logging.getLogger("fhir_kap.bridge.smart")


class _OAuthError(Exception):
    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error, self.description, self.status = error, description, status


def token_url() -> str | None:
    """This bridge's token endpoint as clients must name it in `aud` (None without a base URL)."""
    given = services().options.base_url
    if not given:
        return None
    parts = urlsplit(given.rstrip("/"))
    path = parts.path[: -len("/fhir")] if parts.path.endswith("/fhir") else parts.path
    return f"{parts.scheme}://{parts.netloc}{path}{TOKEN_PATH}"


def _not_configured() -> NotFound:
    return NotFound(
        "SMART backend services need the bridge's public base URL: serve with --base-url",
        rule="smart:base-url",
        code="not-supported",
    )


def register(app: Flask) -> None:
    @app.get("/fhir/.well-known/smart-configuration")
    def smart_configuration() -> Response:
        endpoint = token_url()
        if endpoint is None:
            raise _not_configured()
        return json_response(
            {
                "token_endpoint": endpoint,
                "grant_types_supported": ["client_credentials"],
                "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                "token_endpoint_auth_signing_alg_values_supported": list(ALGS),
                "scopes_supported": [
                    "system/*.read",
                    "system/*.write",
                    "system/*.*",
                    "system/*.rs",
                    "system/*.cruds",
                    "kap/records.write",
                    "kap/referrals.write",
                    "kap/clinic",
                    "kap/consent-authority",
                ],
                "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
            }
        )

    @app.post(TOKEN_PATH)
    def token() -> Response:
        if token_url() is None:
            raise _not_configured()
        try:
            return _token()
        except _OAuthError as exc:
            log.info("token refused: %s", exc.error)
            resp = json_response({"error": exc.error, "error_description": exc.description}, exc.status)
            resp.headers["Cache-Control"] = "no-store"
            return resp


def _token() -> Response:
    import jwt  # PyJWT (with cryptography): verifies RS384 / ES384 against the partner's JWK

    if request.mimetype != "application/x-www-form-urlencoded":
        raise _OAuthError("invalid_request", "send the token request as application/x-www-form-urlencoded")
    form = request.form
    if form.get("grant_type") != "client_credentials":
        raise _OAuthError("unsupported_grant_type", "only grant_type=client_credentials is supported")
    if form.get("client_assertion_type") != JWT_BEARER:
        raise _OAuthError(
            "invalid_client", f"client_assertion_type must be {JWT_BEARER} (private_key_jwt)", 401
        )
    assertion = form.get("client_assertion") or ""
    if not assertion or len(assertion) > _MAX_ASSERTION_BYTES:
        raise _OAuthError("invalid_client", "a client_assertion (a signed JWT) is required", 401)
    try:
        header = jwt.get_unverified_header(assertion)
        unverified = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise _OAuthError("invalid_client", "client_assertion is not a JWT", 401) from None
    alg, kid, client_id = header.get("alg"), header.get("kid"), unverified.get("iss")
    if alg not in ALGS:
        raise _OAuthError("invalid_client", f"the assertion must be signed with {' or '.join(ALGS)}", 401)
    partner = (
        services().partners.get(client_id) if isinstance(client_id, str) and len(client_id) <= 64 else None
    )
    jwk = partner.key(kid) if partner is not None and isinstance(kid, str) else None
    # One answer for an unknown client, a revoked one, an unknown key and a bad signature:
    # nothing to learn about which partners and key ids exist.
    unknown = _OAuthError(
        "invalid_client", "no registered client key verifies this assertion (iss, kid)", 401
    )
    if partner is None or partner.revoked or jwk is None or jwk.get("alg") != alg:
        raise unknown
    audience = token_url()
    try:
        claims: dict[str, Any] = jwt.decode(
            assertion,
            jwt.PyJWK(jwk).key,
            algorithms=[alg],
            audience=audience,
            leeway=LEEWAY_SECONDS,
            options={"require": ["iss", "sub", "aud", "exp", "jti"]},
        )
    except (jwt.InvalidSignatureError, jwt.DecodeError):
        raise unknown from None
    except jwt.InvalidAudienceError:
        raise _OAuthError("invalid_client", f"the assertion's aud must be {audience}", 401) from None
    except jwt.ExpiredSignatureError:
        raise _OAuthError("invalid_client", "the assertion has expired", 401) from None
    except jwt.PyJWTError as exc:
        raise _OAuthError(
            "invalid_client", f"the assertion is not valid ({type(exc).__name__})", 401
        ) from None
    now = time.time()
    if claims["sub"] != claims["iss"]:
        raise _OAuthError("invalid_client", "the assertion's sub must equal its iss (the client id)", 401)
    if (
        not isinstance(claims["exp"], (int, float))
        or claims["exp"] > now + MAX_ASSERTION_SECONDS + LEEWAY_SECONDS
    ):
        raise _OAuthError("invalid_client", "the assertion's exp may be at most 5 minutes ahead", 401)
    jti = claims["jti"]
    if not isinstance(jti, str) or not 1 <= len(jti) <= 256:
        raise _OAuthError("invalid_client", "the assertion needs a jti of 1-256 characters", 401)
    requested = str(form.get("scope") or "").split()
    if not requested:
        raise _OAuthError("invalid_scope", "a scope is required, e.g. system/Communication.read")
    granted = partner.grantable(requested)
    if not granted:
        raise _OAuthError("invalid_scope", "none of the requested scopes is granted to this client")
    try:
        # The jti is kept as long as the assertion could still be accepted (exp plus the leeway).
        access = services().partners.grant(
            partner, granted, jti=jti, now=now, assertion_expires=float(claims["exp"]) + LEEWAY_SECONDS + 1
        )
    except Conflict:
        raise _OAuthError("invalid_grant", "this client assertion was used before (jti)") from None
    resp = json_response(
        {
            "access_token": access,
            "token_type": "bearer",
            "expires_in": ACCESS_TOKEN_SECONDS,
            "scope": " ".join(granted),
        }
    )
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["Pragma"] = "no-cache"
    return resp
