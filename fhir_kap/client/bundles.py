"""Bundles and write results (client/, layer 2: IO adapter; imports base only, no IO of its own).

Building a transaction Bundle from resources (`transaction_bundle`: urn:uuid fullUrls, references
between the resources rewritten, `ifNoneExist` from each business identifier), the search
strings for those conditions (`identifier_query`, `token_query`), and reading what a server
answered to a create, an update or each entry of a transaction/batch (`WriteResult`,
`entry_results`). Delivery uses these with `FhirClient.transaction` and `batch`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from ..errors import InputError
from ..fhir.digits import ascii_digits
from ..fhir.identifiers import business_identifier
from ..fhir.searchvalues import escape_value
from ..jsonio import dumps, loads

__all__ = ["WriteResult", "entry_results", "identifier_query", "token_query", "transaction_bundle"]


@dataclass(frozen=True)
class WriteResult:
    """Outcome of a create/update (or of one transaction entry)."""

    status: int
    id: str | None
    version_id: str | None
    location: str | None
    created: bool
    # kept out of repr: a logged WriteResult must not carry patient data
    resource: dict[str, Any] | None = field(repr=False)
    outcome: dict[str, Any] | None = field(repr=False)


def _parse_location(location: str | None) -> tuple[str | None, str | None]:
    """(id, version) from `.../Type/id/_history/v` or `.../Type/id`."""
    if not location:
        return None, None
    parts = [p for p in urlsplit(location).path.split("/") if p]
    if len(parts) >= 4 and parts[-2] == "_history":
        return parts[-3], parts[-1]
    if len(parts) >= 2:
        return parts[-1], None
    return None, None


def _etag_version(etag: str | None) -> str | None:
    if not etag:
        return None
    e = etag.strip()
    e = e.removeprefix("W/")
    return e.strip('"') or None


def _write_result(status: int, body: Any, location: str | None, etag: str | None) -> WriteResult:
    resource = outcome = None
    if isinstance(body, dict):
        if body.get("resourceType") == "OperationOutcome":
            outcome = body
        else:
            resource = body
    rid, vid = _parse_location(location)
    if resource is not None:
        rid = resource.get("id") or rid
        vid = (resource.get("meta") or {}).get("versionId") or vid
    vid = vid or _etag_version(etag)
    return WriteResult(
        status=status,
        id=rid,
        version_id=vid,
        location=location,
        created=status == 201,
        resource=resource,
        outcome=outcome,
    )


def entry_results(response_bundle: Mapping[str, Any]) -> list[WriteResult]:
    """One WriteResult per entry of a transaction-/batch-response Bundle, in request order.

    `status` is the entry's HTTP status (a batch entry may fail alone: status >= 400, with the
    server's OperationOutcome in `outcome`).
    """
    out = []
    for entry in response_bundle.get("entry") or []:
        entry = entry if isinstance(entry, dict) else {}  # a garbled answer: a status-0 result
        given = entry.get("response")
        resp: dict[str, Any] = given if isinstance(given, dict) else {}
        code = str(resp.get("status", "0")).split()[:1]
        # ASCII digits only: int() refuses `²00` and reads other scripts' digits
        status = int(code[0]) if code and ascii_digits(code[0], most=3) else 0
        body = entry.get("resource")
        res = _write_result(status, body, resp.get("location"), resp.get("etag"))
        if resp.get("outcome") and res.outcome is None:
            res = WriteResult(
                res.status, res.id, res.version_id, res.location, res.created, res.resource, resp["outcome"]
            )
        out.append(res)
    return out


def _require_resource(resource: Any, what: str) -> str:
    if (
        not isinstance(resource, dict)
        or not isinstance(resource.get("resourceType"), str)
        or not resource["resourceType"].isalpha()
    ):
        raise InputError(
            f"{what} needs a FHIR resource (a JSON object with resourceType)",
            pointer="/resourceType",
            expression="resourceType",
            rule="fhir:resourceType",
        )
    return resource["resourceType"]


def _bundle_idempotent(bundle: Mapping[str, Any]) -> bool:
    """A Bundle may be re-sent safely when no entry is a plain (unconditional) POST."""
    for entry in bundle.get("entry") or []:
        req = entry.get("request") or {}
        if str(req.get("method", "")).upper() == "POST" and not req.get("ifNoneExist"):
            return False
    return True


def token_query(system: str, value: str, param: str = "identifier") -> str:
    """`identifier=SYSTEM|VALUE` with FHIR token escaping, URL-encoded (If-None-Exist or a query).

    >>> token_query("http://x/sid", "N 1")
    'identifier=http://x/sid|N%201'
    """
    return f"{param}=" + quote(escape_value(system), safe=":/@") + "|" + quote(escape_value(value), safe="")


def identifier_query(resource: Mapping[str, Any]) -> str | None:
    """`identifier=SYSTEM|VALUE` for the first business identifier with a system and a value
    (skipping `use: old`), URL-encoded for an If-None-Exist header or a query string.

    >>> identifier_query({"identifier": [{"system": "http://x.org/sid", "value": "A&B 1"}]})
    'identifier=http://x.org/sid|A%26B%201'
    """
    found = business_identifier(resource)
    return token_query(*found) if found else None


def _rewrite_references(node: Any, mapping: Mapping[str, str]) -> None:
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and ref in mapping:
            node["reference"] = mapping[ref]
        for value in node.values():
            if isinstance(value, (dict, list)):
                _rewrite_references(value, mapping)
    elif isinstance(node, list):
        for item in node:
            _rewrite_references(item, mapping)


def transaction_bundle(
    resources: Sequence[Mapping[str, Any]],
    *,
    conditional: bool = True,
    new_uuid: Callable[[], str] = lambda: str(uuid.uuid4()),
) -> dict[str, Any]:
    """A transaction Bundle POSTing `resources` (copied, never changed in place).

    Each entry gets `fullUrl: urn:uuid:...`; literal references between the resources
    ("Patient/p1" where a resource is Patient with id p1) are rewritten to that urn so the server
    resolves them to the ids it assigns. With `conditional`, each entry whose resource has a
    business identifier gets `ifNoneExist` (see identifier_query): re-sending the Bundle does
    not duplicate anything.
    """
    copies = []
    mapping: dict[str, str] = {}
    for i, resource in enumerate(resources):
        rtype = _require_resource(resource, f"transaction_bundle entry {i}")
        copy = loads(dumps(resource))
        urn = f"urn:uuid:{new_uuid()}"
        if isinstance(copy.get("id"), str):
            mapping[f"{rtype}/{copy['id']}"] = urn
        copies.append((rtype, urn, copy))
    entries = []
    for rtype, urn, copy in copies:
        _rewrite_references(copy, mapping)
        copy.pop("id", None)  # the server assigns ids on POST
        request: dict[str, Any] = {"method": "POST", "url": rtype}
        query = identifier_query(copy) if conditional else None
        if query:
            request["ifNoneExist"] = query
        entries.append({"fullUrl": urn, "resource": copy, "request": request})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}
