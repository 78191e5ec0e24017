"""Partners of the bridge: who may call it, with which token, as whom, for what (storage/,
layer 2: IO adapter; imports base only; tables: storage/sql/schema/partners-*.sql).

A partner is a referring practice, an EHR, or one of the clinic's own systems. Tokens are
`secrets.token_urlsafe(32)` (256 bits), shown once when the partner is added and stored only
as their SHA-256 (a fast hash is enough for random tokens of this size; there is nothing to
brute-force). Lookups go by hash and the final comparison is `hmac.compare_digest`.

Scopes follow SMART backend services: `system/<Type|*>.<read|write|*>`, plus
`kap/records.write` (post KAP records), `kap/referrals.write` (move referral Tasks) and
`kap/clinic` (a clinic operator: reads everything, sees why a disclosure was refused) and
`kap/consent-authority` (a referring practice that collects the client's signed releases:
the Consents, Practitioners, PractitionerRoles and Organizations it posts become consent
context). Only clinic partners and consent authorities feed the consent gate; what any
other partner posts is stored for it but never decides a disclosure.
Endpoint secrets are never stored: `endpoint_auth` names an environment variable
(`bearer:ENVVAR`) or a SMART client id (`smart:CLIENT_ID`).

Where the bridge may post for a partner is the operator's choice, never the partner's: its
webhook URL, and for its topic-based Subscriptions an endpoint at an origin (scheme, host,
port) the operator registered: the webhook's origin and `subscription_origins`
(`partners add --subscription-origin`, `partners subscription-origins`; column partners-3).
Otherwise a partner could have the bridge reach any host it can name (server-side request
forgery) and learn from a Subscription's status whether it answers.

SMART Backend Services: a partner registered with a JWKS (its public keys) may instead get
short-lived access tokens from the bridge's token endpoint with a signed assertion
(`private_key_jwt`). `grant` records the assertion's `jti` (a replayed assertion is refused) and
stores the new token's SHA-256 with the scopes granted (never more than the partner's own) and
an expiry; `authenticate` accepts it until then, as that partner with those scopes only.

Rotation: `rotate(name, grace_seconds=G)` gives a partner a new token and keeps the old one
working for G seconds (its digest becomes an access token of the partner's scopes expiring then;
revoking the partner ends it too). A revoked partner added again under its name (`add`) is
registered anew: the settings given, a new token, and none of its earlier SMART tokens.

`Partners(db, cache_seconds=N)` keeps successful token lookups and the partner list for N
seconds per process (the bridge uses 5), so a request needs no database read to
authenticate. A revocation through the same object takes effect at once; one made elsewhere
(`fhir-kap partners revoke` while the bridge runs) within N seconds. Unknown tokens are
never cached, so a new partner works at once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from .. import jsonio
from ..errors import Conflict, InputError, NotFound
from .db import Database
from .sql import migrations

__all__ = [
    "ACCESS_TOKEN_SECONDS",
    "MAX_GRACE_SECONDS",
    "DEFAULT_SCOPES",
    "NPI_SYSTEM",
    "Partner",
    "Partners",
    "check_jwks",
    "check_origin",
    "origin_of",
    "scope_interactions",
]

NPI_SYSTEM = "http://hl7.org/fhir/sid/us-npi"
DEFAULT_SCOPES = "system/*.read system/*.write"  # what the bridge lets anyone write is narrower still
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
#: SMART scopes: v1 `system/X.read|write|*` and v2 `system/X.cruds` (letters in that order, at
#: least one; granular `?param=` scopes are not supported and never match), and the KAP scopes.
_SCOPE = re.compile(
    r"(system/(\*|[A-Z][A-Za-z]+)\.(read|write|\*|(?=[cruds])c?r?u?d?s?)"
    r"|kap/(records\.write|referrals\.write|clinic|consent-authority))\Z"
)
#: What a scope's action grants of the bridge's interactions: read (read, vread, history),
#: search, write (create; v1 `write` and v2 `c`, `u`, `d` all mean changing data).
_ACTS = {
    "read": frozenset({"read", "search"}),
    "write": frozenset({"write"}),
    "*": frozenset({"read", "search", "write"}),
}
_LETTERS = {"c": "write", "r": "read", "u": "write", "d": "write", "s": "search"}


def scope_interactions(action: str) -> frozenset[str]:
    """The interactions a `system/` scope's action grants (empty for one that is not valid).

    >>> sorted(scope_interactions("rs")), sorted(scope_interactions("read")), sorted(scope_interactions("sr"))
    (['read', 'search'], ['read', 'search'], [])
    """
    if action in _ACTS:
        return _ACTS[action]
    if not action or not re.fullmatch(r"c?r?u?d?s?", action):
        return frozenset()
    return frozenset(_LETTERS[c] for c in action)


_NPI = re.compile(r"^\d{10}$", re.ASCII)
_REF = re.compile(r"^(Organization|Practitioner|PractitionerRole)/[A-Za-z0-9\-.]{1,64}$")

_JWK_ALGS = {"RSA": "RS384", "EC": "ES384"}
ACCESS_TOKEN_SECONDS = 300
MAX_GRACE_SECONDS = 30 * 86400  # partners rotate --grace: at most 30 days


@dataclass(frozen=True)
class Partner:
    """A registered partner (never carries its token)."""

    name: str
    scopes: tuple[str, ...]
    org_identifier: str | None = None  # "system|value"
    npis: tuple[str, ...] = ()
    references: tuple[str, ...] = ()  # literal references naming it, e.g. "Organization/practice-a"
    endpoint_url: str | None = None
    endpoint_auth: str | None = None
    webhook_url: str | None = None
    webhook_secret: str | None = field(default=None, repr=False)
    revoked: bool = False
    created: str = ""
    jwks: dict[str, Any] | None = field(default=None, repr=False)  # public keys for SMART backend services
    subscription_origins: tuple[str, ...] = ()  # registered by the operator, besides the webhook's origin

    @property
    def is_clinic(self) -> bool:
        return "kap/clinic" in self.scopes

    @property
    def is_consent_authority(self) -> bool:
        """Whether the context this partner posts (Consent, people, organisations) feeds the consent gate.

        The clinic's own systems (`kap/clinic`) and partners given `kap/consent-authority`.
        """
        return not self.revoked and (self.is_clinic or "kap/consent-authority" in self.scopes)

    @property
    def recipient_keys(self) -> tuple[str, ...]:
        """What names this partner as a recipient: references and `system|value` identifiers."""
        keys = list(self.references)
        if self.org_identifier:
            keys.append(self.org_identifier)
        keys += [f"{NPI_SYSTEM}|{n}" for n in self.npis]
        return tuple(keys)

    def allows(self, resource_type: str, interaction: str) -> bool:
        """Whether a scope grants `interaction` (read | search | write) on `resource_type`:
        SMART v1 (`system/Communication.read`) or v2 (`system/Communication.rs`)."""
        for scope in self.scopes:
            if not scope.startswith("system/"):
                continue
            what, _, act = scope[len("system/") :].partition(".")
            if what in ("*", resource_type) and interaction in scope_interactions(act):
                return True
        return False

    def grantable(self, requested: Sequence[str]) -> tuple[str, ...]:
        """The requested scopes this partner holds (a `system/` scope also when its own cover
        everything it grants, in either SMART version: `system/Communication.rs` under
        `system/*.read`, `system/Communication.read` under `system/*.rs`); others are dropped."""
        out = []
        for scope in requested:
            if scope in self.scopes:
                out.append(scope)
            elif scope.startswith("system/") and _SCOPE.match(scope):
                what, _, act = scope[len("system/") :].partition(".")
                wanted = scope_interactions(act)
                if wanted and all(self.allows(what, a) for a in wanted):
                    out.append(scope)
        return tuple(dict.fromkeys(out))

    @property
    def endpoint_origins(self) -> tuple[str, ...]:
        """The origins its Subscriptions' endpoints may be at: its webhook URL's, then the
        registered `subscription_origins` (canonical `scheme://host[:port]`)."""
        found = origin_of(self.webhook_url) if self.webhook_url else None
        return tuple(dict.fromkeys(([found] if found else []) + list(self.subscription_origins)))

    def may_post_to(self, url: str) -> bool:
        """Whether `url` is at one of `endpoint_origins` (same scheme, host and port)."""
        found = origin_of(url)
        return found is not None and found in self.endpoint_origins

    def key(self, kid: str) -> dict[str, Any] | None:
        """The registered public JWK with this key id."""
        for jwk in (self.jwks or {}).get("keys", []):
            if jwk.get("kid") == kid:
                return dict(jwk)
        return None

    def public(self) -> dict[str, Any]:
        """A listing without secrets."""
        return {
            "name": self.name,
            "scopes": list(self.scopes),
            "org_identifier": self.org_identifier,
            "npis": list(self.npis),
            "references": list(self.references),
            "endpoint": self.endpoint_url,
            "endpoint_auth": self.endpoint_auth,
            "webhook": self.webhook_url,
            "subscription_origins": list(self.endpoint_origins),
            "revoked": self.revoked,
            "created": self.created,
            "smart_key_ids": [k["kid"] for k in (self.jwks or {}).get("keys", [])],
        }


def _check_url(label: str, url: str) -> None:
    """An http(s) URL with a host, and without credentials or a fragment: a URL is listed by
    `partners list` and written to logs, so secrets go in --endpoint-auth, never in the URL."""
    from urllib.parse import urlsplit

    if not re.match(r"https?://[^\s]+\Z", url):
        raise InputError(f"{label} must be an http(s) URL", rule="partner:url")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise InputError(f"{label} is not a valid URL", rule="partner:url") from None
    if not parts.hostname:
        raise InputError(f"{label} must name a host", rule="partner:url")
    if parts.username is not None or parts.password is not None:
        raise InputError(
            f"{label} must not carry credentials (user:password@); give them with --endpoint-auth",
            rule="partner:url",
        )
    if parts.fragment:
        raise InputError(f"{label} must not have a #fragment", rule="partner:url")


def origin_of(url: str) -> str | None:
    """The origin of an http(s) URL as `scheme://host[:port]`: scheme and host lower-case, an
    IPv6 host in brackets, the scheme's default port (80, 443) left out; None for anything else.

    >>> origin_of("HTTPS://Hooks.Example:443/a?b"), origin_of("http://[::1]:8080/x"), origin_of("ftp://h")
    ('https://hooks.example', 'http://[::1]:8080', None)
    """
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{host}" + ("" if port is None or port == default else f":{port}")


def check_origin(text: str) -> str:
    """An origin the operator registers for a partner's Subscriptions, canonical
    (`origin_of`): `http(s)://host[:port]`, nothing else (no path but `/`, no query, fragment
    or credentials), printable ASCII only."""
    from urllib.parse import urlsplit

    if not isinstance(text, str) or not re.fullmatch(r"[\x21-\x7e]{1,300}", text):
        raise InputError("a subscription origin is http(s)://host[:port]", rule="partner:origin")
    _check_url("subscription origin", text)
    found = origin_of(text)
    if found is None or urlsplit(text).path not in ("", "/") or "?" in text or "#" in text:
        raise InputError(
            f"a subscription origin is http(s)://host[:port] (no path or query): '{text[:80]}'",
            rule="partner:origin",
        )
    return found


def _origins(given: Sequence[str]) -> tuple[str, ...]:
    if len(given) > 20:
        raise InputError("at most 20 subscription origins per partner", rule="partner:origin")
    return tuple(dict.fromkeys(check_origin(o) for o in given))


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class Partners:
    """The partners table on the shared database."""

    def __init__(
        self, db: Database, *, cache_seconds: float = 0.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.db = db
        self.cache_seconds = cache_seconds
        self._clock = clock
        self._by_digest: dict[str, tuple[float, Partner]] = {}
        self._list: tuple[float, list[Partner]] | None = None
        self._cache_lock = threading.Lock()
        migrations.ensure(db, "partners")

    def forget(self) -> None:
        """Drop this process's cached lookups (done on every add and revoke through this object)."""
        with self._cache_lock:
            self._by_digest.clear()
            self._list = None

    def add(
        self,
        name: str,
        *,
        scopes: Sequence[str] | str | None = None,
        org_identifier: str | None = None,
        npis: Sequence[str] = (),
        references: Sequence[str] = (),
        endpoint_url: str | None = None,
        endpoint_auth: str | None = None,
        webhook_url: str | None = None,
        jwks: Any = None,
        subscription_origins: Sequence[str] = (),
    ) -> tuple[Partner, str]:
        """Register a partner. Returns (partner, token); the token is not stored and cannot be shown again.

        `subscription_origins`: origins besides the webhook URL's at which its Subscriptions may
        have their endpoint (`check_origin`)."""
        if not _NAME.match(name or ""):
            raise InputError(
                "partner name must be 1-64 letters, digits, '.', '_' or '-'", rule="partner:name"
            )
        scope_list = tuple(
            (scopes or DEFAULT_SCOPES).split()
            if isinstance(scopes, str) or scopes is None
            else [s for item in scopes for s in item.split()]
        )
        bad = [s for s in scope_list if not _SCOPE.match(s)]
        if bad:
            raise InputError(
                f"unknown scope '{bad[0]}': use system/<Type|*>.<read|write|*>, "
                "kap/records.write, kap/referrals.write, kap/clinic or kap/consent-authority",
                rule="partner:scope",
            )
        if org_identifier is not None:
            system, sep, value = org_identifier.partition("|")
            if not sep or not system or not value:
                raise InputError("--org-identifier must be SYSTEM|VALUE", rule="partner:identifier")
        for npi in npis:
            if not _NPI.match(npi):
                raise InputError(f"NPI '{npi[:20]}' must be 10 digits", rule="partner:npi")
        for ref in references:
            if not _REF.match(ref):
                raise InputError(
                    f"reference '{ref[:80]}' must be Organization|Practitioner|PractitionerRole/id",
                    rule="partner:reference",
                )
        for label, url in (("endpoint", endpoint_url), ("webhook", webhook_url)):
            if url is not None:
                _check_url(label, url)
        auth = endpoint_auth or ("none" if endpoint_url else None)
        if auth is not None and not re.match(r"^(none|bearer:[A-Z_][A-Z0-9_]*|smart:[^\s]+)$", auth):
            raise InputError(
                "--endpoint-auth must be none, bearer:ENVVAR (an environment variable name) "
                "or smart:CLIENT_ID",
                rule="partner:endpoint-auth",
            )
        keys = None if jwks is None else check_jwks(jwks)
        origins = _origins(subscription_origins)
        token = secrets.token_urlsafe(32)
        identity = {"org_identifier": org_identifier, "npis": list(npis), "references": list(references)}
        created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        webhook_secret = secrets.token_urlsafe(32) if webhook_url else None
        values = (
            _hash(token),
            " ".join(scope_list),
            jsonio.dumps(identity).decode(),
            endpoint_url,
            auth,
            webhook_url,
            webhook_secret,
            created,
            None if keys is None else jsonio.dumps(keys).decode(),
            jsonio.dumps(list(origins)).decode() if origins else None,
        )
        with self.db.transaction() as tx:
            found = tx.execute("SELECT revoked FROM partners WHERE name = ?", (name,))
            if found and not found[0]["revoked"]:
                raise Conflict(f"partner '{name}' already exists", rule="partner:exists", code="duplicate")
            if found:
                # A revoked name added again: registered anew (these settings, a new token),
                # and nothing issued before the revocation comes back to life.
                tx.execute(
                    "UPDATE partners SET token_sha256 = ?, scopes = ?, identity = ?, endpoint_url = ?, "
                    "endpoint_auth = ?, webhook_url = ?, webhook_secret = ?, revoked = 0, created = ?, "
                    "jwks = ?, subscription_origins = ? WHERE name = ?",
                    (*values, name),
                )
                tx.execute("DELETE FROM partner_access_tokens WHERE partner = ?", (name,))
            else:
                tx.execute(
                    "INSERT INTO partners (name, token_sha256, scopes, identity, endpoint_url, endpoint_auth, "
                    "webhook_url, webhook_secret, revoked, created, jwks, subscription_origins) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?)",
                    (name, *values),
                )
        self.forget()
        partner = self.get(name)
        assert partner is not None
        return partner, token

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        return self.db.query(sql, params)

    def get(self, name: str) -> Partner | None:
        rows = self._read("SELECT * FROM partners WHERE name = ?", (name,))
        return _partner(rows[0]) if rows else None

    def list(self) -> list[Partner]:
        """Every partner, revoked ones included (cached for `cache_seconds`)."""
        now = self._clock()
        cached = self._list
        if cached is not None and now < cached[0]:
            return list(cached[1])
        partners = [_partner(r) for r in self._read("SELECT * FROM partners ORDER BY name")]
        if self.cache_seconds > 0:
            with self._cache_lock:
                self._list = (now + self.cache_seconds, partners)
        return list(partners)

    def revoke(self, name: str) -> Partner:
        """Revoke a partner: its token, a rotated token's grace and its SMART tokens stop working
        (the row stays for the audit trail; `add` with the same name registers it anew)."""
        with self.db.transaction() as tx:
            if not tx.execute("SELECT name FROM partners WHERE name = ?", (name,)):
                raise NotFound(f"no partner named '{name[:64]}'", rule="partner:unknown")
            tx.execute("UPDATE partners SET revoked = 1 WHERE name = ?", (name,))
        self.forget()
        partner = self.get(name)
        assert partner is not None
        return partner

    def rotate(
        self, name: str, *, grace_seconds: float = 0.0, now: float | None = None
    ) -> tuple[Partner, str]:
        """Give a partner a new token; the old one keeps working for `grace_seconds` (0: not at all).

        The old token's digest is kept as an access token of the partner's current scopes that
        expires when the grace ends (so a revocation still ends it at once). Returns (partner,
        new token); the token is not stored and cannot be shown again.
        """
        if not 0 <= grace_seconds <= MAX_GRACE_SECONDS:
            raise InputError(
                f"the grace must be 0-{MAX_GRACE_SECONDS} seconds (30 days)", rule="partner:grace"
            )
        ts = time.time() if now is None else now
        token = secrets.token_urlsafe(32)
        with self.db.transaction() as tx:
            rows = tx.execute("SELECT token_sha256, scopes, revoked FROM partners WHERE name = ?", (name,))
            if not rows:
                raise NotFound(f"no partner named '{name[:64]}'", rule="partner:unknown")
            if rows[0]["revoked"]:
                raise Conflict(
                    f"partner '{name[:64]}' is revoked: add it again (partners add) for a new token",
                    rule="partner:revoked",
                )
            if grace_seconds > 0:
                tx.execute(
                    "INSERT INTO partner_access_tokens (token_sha256, partner, scopes, expires_at) "
                    "VALUES (?, ?, ?, ?)",
                    (rows[0]["token_sha256"], name, rows[0]["scopes"], ts + grace_seconds),
                )
            tx.execute("UPDATE partners SET token_sha256 = ? WHERE name = ?", (_hash(token), name))
        self.forget()
        partner = self.get(name)
        assert partner is not None
        return partner, token

    def set_jwks(self, name: str, jwks: Any) -> Partner:
        """Replace a partner's SMART public keys (key rotation); tokens already issued stay valid."""
        keys = check_jwks(jwks)
        with self.db.transaction() as tx:
            if not tx.execute(
                "UPDATE partners SET jwks = ? WHERE name = ? RETURNING name",
                (jsonio.dumps(keys).decode(), name),
            ):
                raise NotFound(f"no partner named '{name[:64]}'", rule="partner:unknown")
        self.forget()
        partner = self.get(name)
        assert partner is not None
        return partner

    def set_subscription_origins(self, name: str, origins: Sequence[str]) -> Partner:
        """Replace the origins registered for a partner's Subscriptions besides its webhook's
        (none: only the webhook's). The sender checks every notification against them when it
        posts: one whose endpoint is no longer registered is not sent and its Subscription is
        turned off."""
        checked = _origins(origins)
        with self.db.transaction() as tx:
            if not tx.execute(
                "UPDATE partners SET subscription_origins = ? WHERE name = ? RETURNING name",
                (jsonio.dumps(list(checked)).decode() if checked else None, name),
            ):
                raise NotFound(f"no partner named '{name[:64]}'", rule="partner:unknown")
        self.forget()
        partner = self.get(name)
        assert partner is not None
        return partner

    def grant(
        self,
        partner: Partner,
        scopes: Sequence[str],
        *,
        jti: str,
        assertion_expires: float,
        seconds: int = ACCESS_TOKEN_SECONDS,
        now: float | None = None,
    ) -> str:
        """Issue an access token for `partner` with `scopes` (already checked with `grantable`).

        `jti` is the verified assertion's id: one seen before (and not yet expired) raises
        Conflict, so an intercepted assertion cannot be replayed. Expired ids and tokens are
        purged on the way.
        """
        ts = time.time() if now is None else now
        token = secrets.token_urlsafe(32)
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM partner_assertions WHERE expires_at < ?", (ts,))
            tx.execute("DELETE FROM partner_access_tokens WHERE expires_at < ?", (ts,))
            if not tx.execute(
                "INSERT INTO partner_assertions (partner, jti, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (partner, jti) DO NOTHING RETURNING jti",
                (partner.name, jti, max(assertion_expires, ts)),
            ):
                raise Conflict("this client assertion (jti) was used before", rule="smart:jti-replay")
            tx.execute(
                "INSERT INTO partner_access_tokens (token_sha256, partner, scopes, expires_at) "
                "VALUES (?, ?, ?, ?)",
                (_hash(token), partner.name, " ".join(scopes), ts + seconds),
            )
        return token

    def authenticate(self, token: str | None) -> Partner | None:
        """The active partner holding `token` (its own, or a SMART access token it was granted:
        then with the granted scopes only), or None (unknown, expired, revoked, or malformed)."""
        if not token or len(token) > 256:
            return None
        digest = _hash(token)
        now = self._clock()
        hit = self._by_digest.get(digest)
        if hit is not None and now < hit[0]:
            return hit[1]
        until = now + self.cache_seconds
        rows = self._read("SELECT * FROM partners WHERE token_sha256 = ?", (digest,))
        if rows and hmac.compare_digest(rows[0]["token_sha256"], digest):
            partner = _partner(rows[0])
        else:
            wall = time.time()
            rows = self._read(
                "SELECT p.*, t.token_sha256 AS granted_sha256, t.scopes AS granted, t.expires_at "
                "FROM partner_access_tokens t JOIN partners p ON p.name = t.partner "
                "WHERE t.token_sha256 = ? AND t.expires_at > ?",
                (digest, wall),
            )
            if not rows or not hmac.compare_digest(rows[0]["granted_sha256"], digest):
                return None
            partner = replace(_partner(rows[0]), scopes=tuple(rows[0]["granted"].split()))
            until = min(until, now + float(rows[0]["expires_at"]) - wall)  # never past the token's expiry
        if partner.revoked:
            return None
        if self.cache_seconds > 0:
            with self._cache_lock:
                if len(self._by_digest) > 10_000:  # bounded: a cache, not a registry
                    self._by_digest.clear()
                self._by_digest[digest] = (until, partner)
        return partner


def _partner(row: dict[str, Any]) -> Partner:
    ident = jsonio.loads(row["identity"])
    return Partner(
        name=row["name"],
        scopes=tuple(row["scopes"].split()),
        org_identifier=ident.get("org_identifier"),
        npis=tuple(ident.get("npis") or ()),
        references=tuple(ident.get("references") or ()),
        endpoint_url=row["endpoint_url"],
        endpoint_auth=row["endpoint_auth"],
        webhook_url=row["webhook_url"],
        webhook_secret=row["webhook_secret"],
        revoked=bool(row["revoked"]),
        created=row["created"],
        jwks=jsonio.loads(row["jwks"]) if row.get("jwks") else None,
        subscription_origins=tuple(
            jsonio.loads(row["subscription_origins"]) if row.get("subscription_origins") else ()
        ),
    )


def _usable(jwk: dict[str, Any], i: int) -> None:
    """Refuse a key the token endpoint could never verify with, or an RSA key under 2048 bits."""
    import jwt  # PyJWT (with cryptography), as the token endpoint uses it

    try:
        key = jwt.PyJWK(jwk).key
    except (jwt.PyJWTError, ValueError, TypeError):
        raise InputError(f"keys[{i}] is not a usable {jwk['kty']} public key", rule="partner:jwks") from None
    if jwk["kty"] == "RSA" and getattr(key, "key_size", 0) < 2048:
        raise InputError(f"keys[{i}]: RSA keys need at least 2048 bits", rule="partner:jwks")


def check_jwks(jwks: Any) -> dict[str, Any]:
    """A partner's public keys as a JWKS (`{"keys": [...]}`), checked: RSA or EC (P-384) keys,
    each with a unique `kid`, and no private parts (`d`, `p`, `q`, ...), which must never be
    handed over. Returns the keys reduced to their public members."""
    keys = jwks.get("keys") if isinstance(jwks, dict) else None
    if not isinstance(keys, list) or not keys or len(keys) > 20:
        raise InputError("a JWKS is an object with 1-20 public keys in 'keys'", rule="partner:jwks")
    out, seen = [], set()
    for i, jwk in enumerate(keys):
        if not isinstance(jwk, dict) or jwk.get("kty") not in _JWK_ALGS:
            raise InputError(f"keys[{i}]: kty must be RSA or EC", rule="partner:jwks")
        if any(k in jwk for k in ("d", "p", "q", "dp", "dq", "qi", "oth", "k")):
            raise InputError(
                f"keys[{i}] holds private key material: register the PUBLIC key only",
                rule="partner:jwks-private",
            )
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not 1 <= len(kid) <= 128 or kid in seen:
            raise InputError(
                f"keys[{i}]: each key needs its own 'kid' (1-128 characters)", rule="partner:jwks"
            )
        seen.add(kid)
        members = ("kty", "kid", "n", "e") if jwk["kty"] == "RSA" else ("kty", "kid", "crv", "x", "y")
        if jwk["kty"] == "EC" and jwk.get("crv") != "P-384":
            raise InputError(f"keys[{i}]: EC keys must be on P-384 (ES384)", rule="partner:jwks")
        if not all(isinstance(jwk.get(m), str) and jwk.get(m) for m in members):
            raise InputError(f"keys[{i}]: missing one of {', '.join(members)}", rule="partner:jwks")
        public = {m: jwk[m] for m in members} | {"alg": _JWK_ALGS[jwk["kty"]]}
        _usable(public, i)
        out.append(public)
    return {"keys": out}
