"""The consent context the send-time consent re-check decides on (storage/, layer 2: IO adapter;
imports base and pure core).

The `outbox_context` table (created by the outbox's migrations, storage/sql/schema/outbox-*.sql)
keeps the latest version of the resources the consent gate needs (Consents, PractitionerRoles,
Organizations, Practitioners, Patients), by (type, id). A Consent is one consent per business
identifier: an EHR that re-posts it (e.g. revoked) gets a new server id, and the gate must see
the new state, not two consents. `Outbox.put_context` / `Outbox.context_for` delegate here.

Consents as EHRs write them name their client by a literal reference, by identifier (a logical
reference) or by a contained Patient. The existing columns index all three (no migration):
`patient_ref` holds a Consent's literal client reference, or `identifier:,T1,T2,` with one token
`T` (`quote(system)|quote(value)`) per identifier the Consent names its client by; a Patient
row keeps its identifiers' tokens in `ident` the same way. `for_patient` returns the consents
naming the client either way, and every stored Patient carrying an identifier they name, so
that the gate sees when an identifier is ambiguous (it then denies).

Revocation is monotonic for a given consent (the same id, or the same business identifier about
the same client): once the context holds a revoking copy (status `inactive`, `rejected`,
`not-done` or `entered-in-error`), a copy that is not revoking replaces it only when it was
signed strictly later (R4 `dateTime`, R5 `date`) than the revocation; an older state re-posted
(the old active copy) is ignored, whoever sends it. A new signature (a later date) reactivates.

Every gate reads all the parties (PractitionerRoles, Organizations, Practitioners: `patient_ref`
NULL); each is decoded once per change and kept per process by (type, id) with its `version` and
`updated_at`, which `put` moves strictly forward on every change (never equal to the copy it
replaces, whatever the clock says), so a gate never decides on a stale party: an affiliation
revoked counts at the next decision, in every process.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote as urlquote

from .. import jsonio
from ..consent import CONTEXT_TYPES
from ..consent.parties import Client, named_client
from ..consent.recipients import normalise_reference
from ..errors import InputError, quote
from ..fhir.identifiers import business_identifier
from ..fhir.references import identifiers_of
from .db import Database, Tx

__all__ = ["CONTEXT_TYPES", "ConsentContext", "consent_key"]

#: The JSON bytes of consent-context parties one process keeps decoded (`_all_parties`).
PARTY_CACHE_BYTES = 4 * 2**20
#: The PostgreSQL advisory lock `put` holds for its transaction (store 4242, Subscriptions 4244).
_PUT_LOCK = 4245


class ConsentContext:
    """The consent context on a shared `Database`; `clock` gives "now" in epoch seconds."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock
        # The parties (patient_ref NULL: Practitioners, Organizations, PractitionerRoles) as
        # decoded here, by (type, id): (version, updated_at, body). `put` moves a row's
        # updated_at strictly forward on every change, so an entry is used only while the row
        # is exactly what was decoded, whichever process wrote it.
        # (type, id) -> (version, updated_at, body, its JSON size), oldest filed first
        self._parties: dict[tuple[str, str], tuple[Any, float, dict[str, Any], int]] = {}
        self._party_bytes = 0  # the JSON size of the bodies held
        self._parties_lock = threading.Lock()
        # Parties this thread's open transaction wrote (`put`): read there, never remembered,
        # since a rollback may undo them. Cleared once the thread is outside a transaction.
        self._uncommitted = threading.local()

    def put(self, resource: dict[str, Any], *, now: float | None = None) -> bool:
        """Keep the latest version of a Consent / PractitionerRole / Organization /
        Practitioner / Patient by (type, id). An older `meta.versionId` than the stored one is
        ignored; a Consent replaces any stored Consent with the same business identifier (an EHR
        re-posting a revoked consent gets a new server id). Returns True when stored."""
        rtype = resource.get("resourceType") if isinstance(resource, dict) else None
        if rtype not in CONTEXT_TYPES:
            raise InputError(
                f"Consent context must be one of {', '.join(CONTEXT_TYPES)}, not {quote(rtype)}",
                pointer="/resourceType",
                expression="resourceType",
                rule="outbox:context-type",
            )
        rid = resource.get("id")
        if not isinstance(rid, str) or not rid:
            raise InputError(
                f"{rtype} in the consent context needs an id",
                pointer="/id",
                expression=f"{rtype}.id",
                rule="outbox:context-id",
                code="required",
            )
        meta = resource.get("meta")
        if meta is not None and not isinstance(meta, dict):
            raise InputError(
                f"{rtype}.meta must be an object",
                pointer="/meta",
                expression=f"{rtype}.meta",
                rule="fhir:meta",
            )
        version = (meta or {}).get("versionId")
        if version is not None and not isinstance(version, str):
            raise InputError(
                f"{rtype}.meta.versionId must be a string",
                pointer="/meta/versionId",
                expression=f"{rtype}.meta.versionId",
                rule="fhir:meta",
            )
        client = named_client(resource) if rtype == "Consent" else None
        if rtype == "Consent" and client is None:
            # unreadable here would mean "applies to every client": refuse it instead
            raise InputError(
                "Consent needs a patient (R4 patient / R5 subject) named by a literal reference or by "
                "identifier (a logical reference, or a contained Patient that carries one)",
                pointer="/patient",
                expression="Consent.patient",
                rule="outbox:context-patient",
                code="required",
            )
        patient = (
            _client_key(client) if client is not None else (f"Patient/{rid}" if rtype == "Patient" else None)
        )
        ident = (
            consent_key(resource)
            if rtype == "Consent"
            else (_tokens_key(identifiers_of(resource)) if rtype == "Patient" else None)
        )
        ts = float(self.clock() if now is None else now)
        body = jsonio.dumps(resource).decode()
        self._written((rtype, rid))
        with self.db.transaction() as tx:
            if self.db.dialect == "postgresql":
                # Serialise context writers (SQLite's BEGIN IMMEDIATE does): two puts reading the
                # same old row could otherwise store the older version last (a revocation undone).
                tx.execute("SELECT pg_advisory_xact_lock(?)", (_PUT_LOCK,))
            old = tx.execute(
                "SELECT version, updated_at FROM outbox_context WHERE type = ? AND id = ?", (rtype, rid)
            )
            if old and _older(version, old[0]["version"]):
                return False
            if old:  # strictly later than the copy replaced: what `for_patient`'s cache keys on
                ts = max(ts, math.nextafter(float(old[0]["updated_at"]), math.inf))
            if rtype == "Consent" and not _revoking(resource):
                # monotonic revocation: an older state never reactivates a revoked consent
                copies = _earlier_copies(tx, rid, ident, client) if ident and client is not None else []
                bodies = [
                    r["body"]
                    for r in tx.execute(
                        "SELECT body FROM outbox_context WHERE type = 'Consent' AND id = ?", (rid,)
                    )
                ]
                bodies += [c["body"] for c in copies]
                for text in bodies:
                    held = jsonio.loads(text, source="outbox context")
                    if _revoking(held) and not _signed_later(resource, held):
                        return False
            if ident and client is not None:
                # the same client's consent under another server id: this arrival replaces it
                _replace_earlier_copies(tx, rid, ident, client)
            if old:
                tx.execute(
                    "UPDATE outbox_context SET version = ?, patient_ref = ?, body = ?, ident = ?, "
                    "updated_at = ? WHERE type = ? AND id = ?",
                    (version, patient, body, ident, ts, rtype, rid),
                )
            else:
                tx.execute(
                    "INSERT INTO outbox_context (type, id, version, patient_ref, body, ident, "
                    "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (rtype, rid, version, patient, body, ident, ts),
                )
        return True

    def consent_ids(self, ident: str) -> list[str]:
        """The ids of the Consents in the context kept under business identifier `ident` (`consent_key`)."""
        return [
            r["id"]
            for r in self.db.query(
                "SELECT id FROM outbox_context WHERE type = 'Consent' AND ident = ?", (ident,)
            )
        ]

    def for_patient(self, patient_ref: str) -> list[dict[str, Any]]:
        """The consent context for one patient: that patient's Consents (and Patient resource)
        plus every stored PractitionerRole, Organization and Practitioner (each decoded once per
        change and kept in this process, `_all_parties`: a gate reads their versions, and the
        bodies of only those that changed).

        "That patient's Consents" are those naming `patient_ref`, and those naming by identifier
        (logical or contained Patient) a client whose stored Patient carries that identifier;
        then every stored Patient carrying an identifier those consents name comes too, so the
        gate can tell an ambiguous identifier (and deny)."""
        refs = tuple(dict.fromkeys(r for r in (patient_ref, normalise_reference(patient_ref)) if r))
        marks = ", ".join("?" for _ in refs)
        rows = self.db.query(
            f"SELECT type, id, body FROM outbox_context WHERE patient_ref IN ({marks})", refs
        )
        found = {(r["type"], r["id"]): jsonio.loads(r["body"], source="outbox context") for r in rows}
        found.update(self._all_parties())
        base_keys = sorted(found)
        patient = next((b for (t, _), b in found.items() if t == "Patient"), None)
        carried = _tokens(identifiers_of(patient)) if patient is not None else set()
        named: set[str] = set()
        for row in self._rows_with_tokens("patient_ref", carried, "identifier:"):
            named |= set(row["patient_ref"].removeprefix("identifier:").strip(",").split(","))
            found.setdefault((row["type"], row["id"]), jsonio.loads(row["body"], source="outbox context"))
        if named:
            for row in self._rows_with_tokens("ident", named, "", "Patient"):
                found.setdefault((row["type"], row["id"]), jsonio.loads(row["body"], source="outbox context"))
            # Patients stored before their identifiers were indexed (ident NULL): read them
            for row in self.db.query(
                "SELECT type, id, body FROM outbox_context WHERE type = 'Patient' AND ident IS NULL"
            ):
                body = jsonio.loads(row["body"], source="outbox context")
                if _tokens(identifiers_of(body)) & named:
                    found.setdefault((row["type"], row["id"]), body)
        return [found[k] for k in base_keys] + [found[k] for k in sorted(set(found) - set(base_keys))]

    def _all_parties(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Every party row (patient_ref NULL) by (type, id), decoded only when it changed since
        this process last decoded it: its (version, updated_at) are read for all, bodies only
        for the changed ones."""
        # Inside a write transaction (a write's fan-out asks the gate) a row this transaction
        # wrote is used, never remembered (a rollback could leave the cache a body no commit has,
        # under a version and time a later commit may repeat); committed rows are remembered.
        unsure = self._written()
        current = self.db.query(
            "SELECT type, id, version, updated_at FROM outbox_context WHERE patient_ref IS NULL"
        )
        out: dict[tuple[str, str], dict[str, Any]] = {}
        stale: list[tuple[str, str]] = []
        with self._parties_lock:
            for r in current:
                key = (r["type"], r["id"])
                held = self._parties.get(key)
                if held is not None and held[0] == r["version"] and held[1] == float(r["updated_at"]):
                    out[key] = held[2]
                else:
                    stale.append(key)
            if len(self._parties) > len(current):  # rows gone (never, today): forget them
                live = {(r["type"], r["id"]) for r in current}
                for key in [k for k in self._parties if k not in live]:
                    self._party_bytes -= self._parties.pop(key)[3]
        for rtype in sorted({t for t, _ in stale}):
            ids = [i for t, i in stale if t == rtype]
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ", ".join("?" for _ in chunk)
                for r in self.db.query(
                    "SELECT type, id, version, updated_at, body FROM outbox_context "
                    f"WHERE patient_ref IS NULL AND type = ? AND id IN ({marks})",
                    (rtype, *chunk),
                ):
                    body = jsonio.loads(r["body"], source="outbox context")
                    out[(r["type"], r["id"])] = body
                    if (r["type"], r["id"]) not in unsure:
                        self._remember(
                            (r["type"], r["id"]), (r["version"], float(r["updated_at"]), body), len(r["body"])
                        )
        return out

    def _written(self, key: tuple[str, str] | None = None) -> set[tuple[str, str]]:
        """The parties this thread's open transaction has written (with `key` added, if given);
        outside a transaction, none (what was written is committed or rolled back by then)."""
        written: set[tuple[str, str]] = getattr(self._uncommitted, "keys", set())
        if not self.db.in_transaction:
            written = set()
        if key is not None and self.db.in_transaction:
            written.add(key)
        self._uncommitted.keys = written
        return written

    def _remember(self, key: tuple[str, str], held: tuple[Any, float, dict[str, Any]], size: int) -> None:
        """File a decoded party while the bodies held stay within `PARTY_CACHE_BYTES` of JSON
        (decoded, a body takes several times its JSON: an authority's 60 parties of 900 KB held
        700 MB per worker before this bound). A full cache admits no more rather than evicting:
        every gate reads every party, and evicting the oldest would miss on all of them."""
        with self._parties_lock:
            old = self._parties.pop(key, None)
            if old is not None:
                self._party_bytes -= old[3]
            if self._party_bytes + size > PARTY_CACHE_BYTES:
                return  # the budget is full: this one is decoded each time, the ones held stay
            self._parties[key] = (*held, size)
            self._party_bytes += size

    def _rows_with_tokens(
        self, column: str, tokens: Iterable[str], prefix: str, rtype: str | None = None
    ) -> list[dict[str, Any]]:
        """Rows whose `column` (an `_tokens_key`, after `prefix`) holds any of `tokens`."""
        out: list[dict[str, Any]] = []
        wanted = sorted(tokens)
        for start in range(0, len(wanted), 50):
            chunk = wanted[start : start + 50]
            where = " OR ".join(f"{column} LIKE ? ESCAPE '!'" for _ in chunk)
            typed = "type = ? AND " if rtype else ""
            params = ([rtype] if rtype else []) + [f"{_like(prefix)}%,{_like(t)},%" for t in chunk]
            out += self.db.query(
                f"SELECT type, id, body, patient_ref FROM outbox_context WHERE {typed}({where})", params
            )
        return out


def consent_key(resource: dict[str, Any]) -> str | None:
    """`SYSTEM|VALUE` under which a Consent in the context is one consent (`business_identifier`)."""
    found = business_identifier(resource)
    return "|".join(found) if found else None


def _tokens(idents: Iterable[tuple[str, str]]) -> set[str]:
    """One token per identifier: `quote(system)|quote(value)` (percent-encoded, so a token never
    holds the `,` that separates tokens)."""
    return {f"{urlquote(s, safe='')}|{urlquote(v, safe='')}" for s, v in idents}


def _tokens_key(idents: Iterable[tuple[str, str]]) -> str:
    """`,T1,T2,` (sorted; `,` alone when there are none): what `LIKE '%,T,%'` finds a token in."""
    return "," + "".join(f"{t}," for t in sorted(_tokens(idents)))


def _client_key(client: Client) -> str | None:
    """A Consent's `patient_ref`: its literal client reference, else `identifier:` + the tokens."""
    return client.reference or "identifier:" + _tokens_key(client.identifiers)


def _like(text: str) -> str:
    """`text` as a literal inside a LIKE pattern with ESCAPE '!'."""
    return text.replace("!", "!!").replace("%", "!%").replace("_", "!_")


def _replace_earlier_copies(tx: Tx, rid: str, ident: str, client: Client) -> None:
    """Delete the stored copies of the same Consent (`_earlier_copies`)."""
    for row in _earlier_copies(tx, rid, ident, client):
        tx.execute("DELETE FROM outbox_context WHERE type = 'Consent' AND id = ?", (row["id"],))


def _earlier_copies(tx: Tx, rid: str, ident: str, client: Client) -> list[dict[str, Any]]:
    """The stored copies (rows with id and body) of the same Consent (same business identifier)
    about the same client under another id: same literal reference, a shared identifier, or a
    literal client whose stored Patient carries an identifier the new copy names (and the other
    way round)."""
    new_tokens = _tokens(client.identifiers)
    new_carried = _patient_tokens(tx, client.reference) if client.reference else set()
    out = []
    for row in tx.execute(
        "SELECT id, patient_ref, body FROM outbox_context WHERE type = 'Consent' AND ident = ? AND id <> ?",
        (ident, rid),
    ):
        old = row["patient_ref"] or ""
        if old.startswith("identifier:"):
            old_tokens = set(old.removeprefix("identifier:").strip(",").split(",")) - {""}
            same = bool(old_tokens & (new_tokens | new_carried))
        else:
            same = old == client.reference or bool(_patient_tokens(tx, old) & new_tokens)
        if same:
            out.append(row)
    return out


#: Consent statuses that revoke (R4 and R5).
REVOKING = frozenset({"inactive", "rejected", "not-done", "entered-in-error"})


def _revoking(consent: Any) -> bool:
    return isinstance(consent, dict) and consent.get("status") in REVOKING


def _signed(consent: dict[str, Any]) -> datetime | None:
    """When a Consent was signed (R4 `dateTime`, R5 `date`) as an instant (a date: its start, UTC)."""
    value = consent.get("dateTime", consent.get("date"))
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        got = datetime.fromisoformat(value.replace("Z", "+00:00")) if "T" in value else None
        got = got or datetime.fromisoformat(value[:10])
    except ValueError:
        return None
    return got if got.tzinfo is not None else got.replace(tzinfo=UTC)


def _signed_later(new: dict[str, Any], revoked: dict[str, Any]) -> bool:
    """Whether `new` was signed strictly after the revoked copy (unknown either way: no)."""
    a, b = _signed(new), _signed(revoked)
    return a is not None and b is not None and a > b


def _patient_tokens(tx: Tx, reference: str) -> set[str]:
    """The identifier tokens of the stored Patient a literal `Patient/id` reference names."""
    rtype, _, pid = reference.rpartition("/")
    if rtype != "Patient":
        return set()
    rows = tx.execute("SELECT body FROM outbox_context WHERE type = 'Patient' AND id = ?", (pid,))
    return _tokens(identifiers_of(jsonio.loads(rows[0]["body"], source="outbox context"))) if rows else set()


def _older(new: str | None, old: str | None) -> bool:
    """True when version `new` is known to be older than `old` (numeric versionIds)."""
    try:
        return new is not None and old is not None and int(new) < int(old)
    except ValueError:
        return False
