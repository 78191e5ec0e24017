"""What a FHIR server says it can do (client/, layer 2: IO adapter; imports base only, no IO
of its own).

`parse_capabilities` reads a CapabilityStatement (from `GET /metadata`) into `Capabilities`:
the release (R4 or R5, from `fhirVersion` or the MIME parameter), the types and their
interactions, conditional create/update, transaction/batch. `FhirClient.preflight` uses it to
refuse early, naming what is missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import Release
from ..errors import ServerError

__all__ = ["Capabilities", "parse_capabilities"]


@dataclass(frozen=True)
class Capabilities:
    """What a server says it can do (from its CapabilityStatement)."""

    fhir_version: Release
    software: str | None
    resources: Mapping[str, frozenset[str]]
    conditional_create: frozenset[str]
    conditional_update: frozenset[str]
    transaction: bool
    batch: bool
    formats: frozenset[str]
    raw: dict[str, Any] = field(repr=False, compare=False)

    def supports(self, resource_type: str, interaction: str) -> bool:
        """True when `resource_type` lists `interaction` ("create", "read", "search-type", ...)."""
        return interaction in self.resources.get(resource_type, frozenset())


def _release_of(version: str | None) -> Release:
    v = (version or "").strip()
    if v == "4.0" or v.startswith("4.0."):
        return Release.R4
    if v == "5.0" or v.startswith("5.0."):
        return Release.R5
    raise ServerError(
        f"Server speaks an unsupported FHIR version '{v[:20] or 'none given'}' "
        "(fhir-kap speaks 4.0.x = R4 and 5.0.x = R5)",
        retryable=False,
    )


def _mime_fhir_version(content_type: str | None) -> str | None:
    """The `fhirVersion` MIME parameter (`application/fhir+json; fhirVersion=5.0`), if any."""
    for part in (content_type or "").split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.strip().lower() == "fhirversion":
            return value.strip().strip('"')
    return None


def parse_capabilities(cs: Mapping[str, Any], *, content_type: str | None = None) -> Capabilities:
    """Read a CapabilityStatement into `Capabilities`.

    The release comes from `fhirVersion`; when absent, from the `fhirVersion` MIME parameter
    of the response. Anything but 4.0.x / 5.0.x raises ServerError (not retryable).
    """
    if not isinstance(cs, Mapping) or cs.get("resourceType") != "CapabilityStatement":
        raise ServerError(
            "GET metadata: the server did not answer with a CapabilityStatement", retryable=False
        )
    release = _release_of(cs.get("fhirVersion") or _mime_fhir_version(content_type))
    resources: dict[str, frozenset[str]] = {}
    cond_create: set[str] = set()
    cond_update: set[str] = set()
    system: set[str] = set()
    for rest in cs.get("rest") or []:
        if not isinstance(rest, Mapping) or rest.get("mode", "server") != "server":
            continue
        system |= {str(i.get("code")) for i in rest.get("interaction") or [] if isinstance(i, Mapping)}
        for res in rest.get("resource") or []:
            if not isinstance(res, Mapping) or not isinstance(res.get("type"), str):
                continue
            rtype = res["type"]
            codes = frozenset(
                str(i.get("code"))
                for i in res.get("interaction") or []
                if isinstance(i, Mapping) and i.get("code")
            )
            resources[rtype] = resources.get(rtype, frozenset()) | codes
            if res.get("conditionalCreate") is True:
                cond_create.add(rtype)
            if res.get("conditionalUpdate") is True:
                cond_update.add(rtype)
    sw: Mapping[str, Any] = cs["software"] if isinstance(cs.get("software"), Mapping) else {}
    software = " ".join(str(x) for x in (sw.get("name"), sw.get("version")) if x) or None
    return Capabilities(
        fhir_version=release,
        software=software,
        resources=resources,
        conditional_create=frozenset(cond_create),
        conditional_update=frozenset(cond_update),
        transaction="transaction" in system,
        batch="batch" in system,
        formats=frozenset(str(f) for f in cs.get("format") or []),
        raw=dict(cs),
    )
