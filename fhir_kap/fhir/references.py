"""References: every form FHIR allows on a Reference, read one way, and resolved one way
(fhir/, layer 0, base).

`parse_reference` reads a Reference (or a bare reference string) into a `Ref`:

    relative      Patient/p1                      absolute   https://ehr.example/fhir/Patient/p1
    versioned     Patient/p1/_history/3           contained  #pat   (and "#": the container)
    logical       {"type": "Practitioner", "identifier": {"system": NPI, "value": ...}}
    urn           urn:uuid:…, urn:oid:…           conditional  Patient?identifier=sys|val

`Resolver` finds what a Ref names, in this order: the resource itself (its `contained`, or the
container for "#"), the same Bundle (fullUrl, then `Type/id` of its entries, then conditional
references and logical references by identifier), then the caller's context (the resources
given with `--context`, or the bridge's store and consent context) by `Type/id` and by
business identifier. Parties are matched on business identifiers only, never on display text;
a match must be unique (two candidates: unresolved). What it cannot find it says so
(`Resolved.resource is None`) and the caller keeps the reference as given.

Pure: no IO. The context is anything with `get(type, id)` and `by_identifier(type, system, value)`
(`ResourceIndex` is the in-memory one).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, Protocol
from urllib.parse import parse_qs

from .searchvalues import split_token, split_value

__all__ = [
    "PARTY_TYPES",
    "Ref",
    "Resolved",
    "Resolver",
    "ResourceIndex",
    "ResourceLookup",
    "identifiers_of",
    "iter_references",
    "parse_reference",
]

#: The resource types that name a party (a client, a practitioner, a role, an organisation).
PARTY_TYPES = ("Patient", "Practitioner", "PractitionerRole", "Organization")

Kind = Literal["relative", "absolute", "contained", "container", "logical", "urn", "conditional"]

_LITERAL = re.compile(
    r"^(?:(?P<base>[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s?#]+?)/)?(?P<type>[A-Z][A-Za-z]{1,63})/"
    r"(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/(?P<version>[A-Za-z0-9\-.]{1,64}))?$"
)
_CONDITIONAL = re.compile(r"^(?P<type>[A-Z][A-Za-z]{1,63})\?(?P<query>\S+)$")
_URN = re.compile(r"^urn:(?:uuid:[0-9a-fA-F-]{36}|oid:[0-2](?:\.(?:0|[1-9][0-9]*))+)$")


@dataclass(frozen=True)
class Ref:
    """One reference, read: its form (`kind`), what it names and how."""

    kind: Kind
    text: str | None = None  # the reference string as given
    type: str | None = None  # resource type: from the string, or Reference.type
    id: str | None = None  # relative/absolute id, or the contained id without '#'
    base: str | None = None  # absolute references: the server base
    version: str | None = None
    identifier: tuple[str, str] | None = None  # Reference.identifier (system, value)
    query: tuple[tuple[str, str], ...] = ()  # conditional: (name, value) pairs

    @property
    def query_identifiers(self) -> tuple[tuple[str, str], ...] | None:
        """A conditional reference's `identifier=SYSTEM|VALUE` criteria (all must hold); None when
        it is not conditional or has any other criterion (only identifiers select a party).

        >>> parse_reference("Patient?identifier=urn:oid:1.2|E1&identifier=s|v").query_identifiers
        (('urn:oid:1.2', 'E1'), ('s', 'v'))
        >>> parse_reference("Patient?name=x").query_identifiers is None
        True
        """
        if self.kind != "conditional":
            return None
        out = []
        for name, val in self.query:  # parse_qs has already decoded it once
            alternatives = split_value(val)  # FHIR search escapes, as the store reads them
            system, value = split_token(alternatives[0])
            if name != "identifier" or len(alternatives) != 1 or not system or not value:
                return None
            out.append((system, value))
        return tuple(out) or None

    @property
    def local(self) -> str | None:
        """`Type/id` for relative and absolute references, else None."""
        return f"{self.type}/{self.id}" if self.kind in ("relative", "absolute") else None


def _identifier(value: Any) -> tuple[str, str] | None:
    if value is not None and (type(value) is dict or isinstance(value, Mapping)):
        system, val = value.get("system"), value.get("value")
        if isinstance(system, str) and system and isinstance(val, str) and val:
            return system, val
    return None


def identifiers_of(resource: Any) -> frozenset[tuple[str, str]]:
    """Every (system, value) business identifier of a resource (`use: old` included: it still names it)."""
    raw = resource.get("identifier") if isinstance(resource, Mapping) else None
    if isinstance(raw, Mapping):  # a few types (e.g. R4 Bundle, QuestionnaireResponse) have 0..1
        raw = [raw]
    return frozenset(i for i in (_identifier(x) for x in raw) if i) if isinstance(raw, list) else frozenset()


def parse_reference(value: Any) -> Ref | None:
    """Read a Reference dict (or a reference string); None when it names nothing.

    >>> parse_reference({"reference": "https://ehr.example/fhir/Patient/p1/_history/2"}).local
    'Patient/p1'
    >>> parse_reference({"reference": "#pat"}).kind, parse_reference("#").kind
    ('contained', 'container')
    >>> r = parse_reference({"type": "Practitioner", "identifier": {"system": "s", "value": "v"}})
    >>> r.kind, r.type, r.identifier
    ('logical', 'Practitioner', ('s', 'v'))
    >>> parse_reference("Patient?identifier=urn%3Aoid%3A1.2%7CE1").query
    (('identifier', 'urn:oid:1.2|E1'),)
    """
    if isinstance(value, str):
        return _parse_text(value, None, None) if len(value) <= _CACHED_TEXT else _parse(value, None, None)
    if type(value) is not dict and not isinstance(value, Mapping):
        return None
    text = value.get("reference")
    raw_type = value.get("type")
    rtype = raw_type if isinstance(raw_type, str) else None
    ident = _identifier(value.get("identifier"))
    if (
        isinstance(text, str)
        and len(text) <= _CACHED_TEXT
        and (rtype is None or len(rtype) <= _CACHED_TEXT)
        and (ident is None or len(ident[0]) + len(ident[1]) <= _CACHED_TEXT)
    ):
        return _parse_text(text, rtype, ident)
    return _parse(text, rtype, ident)


#: References whose strings (reference, type, identifier) are each up to this long are read once
#: per process and remembered (`_parse_text`): a `Ref` is immutable, and the same few references
#: (a client, a therapist, a referral) recur on every resource a partner sends. Longer ones
#: (rare) are read each time, so the cache holds at most 4,096 small entries whatever is sent.
_CACHED_TEXT = 256


@lru_cache(maxsize=4096)
def _parse_text(text: str, rtype: str | None, ident: tuple[str, str] | None) -> Ref | None:
    return _parse(text, rtype, ident)


def _parse(text: Any, rtype: str | None, ident: tuple[str, str] | None) -> Ref | None:
    if isinstance(text, str) and text and len(text) <= 4096:
        text = text.strip()
        if text == "#":
            return Ref("container", text, rtype, identifier=ident)
        if text.startswith("#"):
            return Ref("contained", text, rtype, id=text[1:], identifier=ident)
        if _URN.match(text):
            return Ref("urn", text, rtype, identifier=ident)
        m = _CONDITIONAL.match(text)
        if m:
            pairs = tuple(
                (k, v) for k, vs in parse_qs(m.group("query"), keep_blank_values=True).items() for v in vs
            )
            return Ref("conditional", text, m.group("type"), identifier=ident, query=pairs)
        m = _LITERAL.match(text)
        if m:
            kind: Kind = "absolute" if m.group("base") else "relative"
            return Ref(
                kind,
                text,
                m.group("type"),
                id=m.group("id"),
                base=m.group("base"),
                version=m.group("version"),
                identifier=ident,
            )
    if ident is not None:
        return Ref("logical", None, rtype, identifier=ident)
    return None


def iter_references(
    node: Any, *, contained: bool = True, _at: str = "", _key: str = ""
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(JSON pointer, element name, Reference) of every Reference in a resource, in document
    order: a dict with a `reference` string, or a logical one (an `identifier` object and nothing
    a Reference lacks). `contained=False` leaves the resource's own contained resources out.
    Callers bound the depth first (`jsonio.too_deep`).

    >>> [(p, k) for p, k, _ in iter_references({"subject": {"reference": "Patient/1"},
    ...     "performer": [{"identifier": {"system": "s", "value": "v"}}]})]
    [('/subject', 'subject'), ('/performer/0', 'performer')]
    """
    if isinstance(node, dict):
        if _is_reference(node):
            yield _at, _key, node
            return
        for k, v in node.items():
            if contained or k != "contained" or _at:
                yield from iter_references(v, contained=contained, _at=f"{_at}/{k}", _key=k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from iter_references(v, contained=contained, _at=f"{_at}/{i}", _key=_key)


def _is_reference(node: dict[str, Any]) -> bool:
    if "resourceType" in node:
        return False
    if isinstance(node.get("reference"), str):
        return True
    return isinstance(node.get("identifier"), dict) and set(node) <= _LOGICAL_KEYS


_LOGICAL_KEYS = frozenset({"identifier", "type", "display", "id", "extension"})


class ResourceLookup(Protocol):
    """Where references are looked up beyond the resource and its Bundle."""

    def get(self, rtype: str, rid: str) -> dict[str, Any] | None: ...

    def by_identifier(self, rtype: str | None, system: str, value: str) -> list[dict[str, Any]]: ...


class ResourceIndex:
    """An in-memory `ResourceLookup` over resources (the CLI's `--context` files, a Bundle's entries)."""

    def __init__(self, resources: Iterable[Any] = ()) -> None:
        self._by_ref: dict[str, dict[str, Any]] = {}
        self._by_ident: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._filed: set[tuple[int, tuple[str, str]]] = set()  # (id(resource), identifier) filed
        for r in resources:
            self.add(r)

    def add(self, resource: Any, *, full_url: str | None = None) -> None:
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            return
        rtype, rid = resource["resourceType"], resource.get("id")
        if isinstance(rid, str) and rid:
            self._by_ref.setdefault(f"{rtype}/{rid}", resource)
        if full_url:
            self._by_ref.setdefault(full_url, resource)
            m = _LITERAL.match(full_url)
            if m:
                self._by_ref.setdefault(f"{m.group('type')}/{m.group('id')}", resource)
        for ident in identifiers_of(resource):
            # A set, not a scan of the bucket: many resources sharing one identifier (a consent
            # authority's 3,000 parties) made every index build quadratic (0.4 s at 6,000).
            # id() is stable while the index holds the resource.
            key = (id(resource), ident)
            if key not in self._filed:
                self._filed.add(key)
                self._by_ident.setdefault(ident, []).append(resource)

    def get(self, rtype: str, rid: str) -> dict[str, Any] | None:
        found = self._by_ref.get(f"{rtype}/{rid}")
        return found if found is not None and found.get("resourceType") == rtype else None

    def by_url(self, url: str) -> dict[str, Any] | None:
        return self._by_ref.get(url)

    def by_identifier(self, rtype: str | None, system: str, value: str) -> list[dict[str, Any]]:
        return [
            r for r in self._by_ident.get((system, value), ()) if rtype is None or r["resourceType"] == rtype
        ]


@dataclass(frozen=True)
class Resolved:
    """What a reference names: the resource when found, and where it was found."""

    ref: Ref
    resource: dict[str, Any] | None = None
    found_in: Literal["contained", "container", "bundle", "context"] | None = None
    why: str | None = None  # when unresolved: why (for the warning issue)

    @property
    def type(self) -> str | None:
        if self.resource is not None:
            return str(self.resource.get("resourceType"))
        return self.ref.type

    @property
    def identifiers(self) -> frozenset[tuple[str, str]]:
        own = identifiers_of(self.resource) if self.resource is not None else frozenset()
        return own | ({self.ref.identifier} if self.ref.identifier else frozenset())


class Resolver:
    """Resolves references inside one document: contained, then the Bundle, then the context."""

    def __init__(
        self,
        bundle: Iterable[tuple[str | None, Any]] = (),
        context: ResourceLookup | None = None,
    ) -> None:
        """`bundle`: (fullUrl, resource) of every entry of the Bundle being read (empty outside one)."""
        self._bundle = ResourceIndex()
        for full_url, resource in bundle:
            self._bundle.add(resource, full_url=full_url)
            self._has_bundle = True
        self._context = context

    _has_bundle = False

    @property
    def reads_literals(self) -> bool:
        """Whether a relative `Type/id` could resolve to anything here (a Bundle, or a context that
        looks literal references up); when not, callers may skip them."""
        return self._has_bundle or (
            self._context is not None and getattr(self._context, "resolves_literals", True)
        )

    def resolve(self, value: Any, container: dict[str, Any] | None = None) -> Resolved | None:
        """Resolve a Reference found in `container` (the resource that holds it); None when it names nothing.

        A resource found whose type is not the type the reference states is not what it names
        (unresolved, `why` says so)."""
        ref = parse_reference(value)
        if ref is None:
            return None
        found = self._resolve(ref, container)
        if found.resource is not None and ref.type and found.resource.get("resourceType") != ref.type:
            return Resolved(ref, why=f"it names a {ref.type}, the resource found is another type")
        return found

    def _resolve(self, ref: Ref, container: dict[str, Any] | None) -> Resolved:
        if ref.kind == "container":
            if container is None:
                return Resolved(ref, why="'#' names the containing resource, and there is none")
            return Resolved(ref, container, "container")
        if ref.kind == "contained":
            for c in _contained(container):
                if c.get("id") == ref.id:
                    return Resolved(ref, c, "contained")
            return Resolved(ref, why=f"no contained resource has id '{(ref.id or '')[:64]}'")
        if ref.kind == "urn":
            found = self._bundle.by_url(ref.text or "")
            return (
                Resolved(ref, found, "bundle")
                if found
                else Resolved(ref, why="no Bundle entry has that fullUrl")
            )
        if ref.kind == "absolute":
            found = self._bundle.by_url(_unversioned(ref))
            if found is not None:
                return Resolved(ref, found, "bundle")
        if ref.kind in ("relative", "absolute") and ref.type and ref.id:
            if ref.kind == "relative":
                found = self._bundle.get(ref.type, ref.id)
                if found is not None:
                    return Resolved(ref, found, "bundle")
            if self._context is not None and ref.kind == "relative":
                found = self._context.get(ref.type, ref.id)
                if found is not None:
                    return Resolved(ref, found, "context")
            if ref.identifier is None:
                return Resolved(ref, why="not in the Bundle or the context")
        idents: list[tuple[str, str]] = []
        if ref.kind == "conditional":
            wanted = ref.query_identifiers
            if wanted is None:
                return Resolved(
                    ref, why="a conditional reference is resolved by identifier=system|value only"
                )
            idents += wanted
        if ref.identifier:
            idents.append(ref.identifier)
        return self._by_identifiers(ref, idents)

    def _by_identifiers(self, ref: Ref, idents: list[tuple[str, str]]) -> Resolved:
        if not idents:
            return Resolved(ref, why="names no identifier")
        for where, index in (("bundle", self._bundle), ("context", self._context)):
            if index is None:
                continue
            hits: list[dict[str, Any]] = []
            for system, value in idents:
                for r in index.by_identifier(ref.type, system, value):
                    if not any(r is h or _same_resource(r, h) for h in hits):
                        hits.append(r)
            # all identifiers of a conditional reference must hold (AND)
            hits = [h for h in hits if all(i in identifiers_of(h) for i in idents)]
            if len(hits) == 1:
                return Resolved(ref, hits[0], where)  # type: ignore[arg-type]
            if len(hits) > 1:
                return Resolved(ref, why=f"{len(hits)} resources carry that identifier (ambiguous)")
        return Resolved(ref, why="no resource with that identifier in the Bundle or the context")


def _contained(container: Any) -> list[dict[str, Any]]:
    raw = container.get("contained") if isinstance(container, Mapping) else None
    return [c for c in raw if isinstance(c, dict)] if isinstance(raw, list) else []


def _same_resource(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two copies of one resource (same type and id, e.g. two versions) are one candidate, not two."""
    rid = a.get("id")
    return (
        isinstance(rid, str)
        and bool(rid)
        and (a.get("resourceType"), rid) == (b.get("resourceType"), b.get("id"))
    )


def _unversioned(ref: Ref) -> str:
    return f"{ref.base}/{ref.type}/{ref.id}"
