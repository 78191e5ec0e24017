"""The one inbound path: FHIR as EHRs send it -> KAP records with the issues found
(records/, layer 1, pure core: no IO; `fhir-kap import` and the bridge both call it).

    outcomes = Ingest(pipeline).document("referral.json", doc, context=ResourceIndex(more))

For each resource (a Bundle of any type is read entry by entry, its entries resolving each
other's references): validate (base FHIR, and the KAP profile it claims), resolve every
reference (`fhir.references.Resolver`: contained, the Bundle, then the caller's context),
give parties and KAP resources their record id from their business identifier, map with
the mappings (codes the tables do not know stay as given: information, not errors), keep the
referral's clinical context (reasonReference / supportingInfo targets) with it, tagged with
an information category, and keep everything the mapping does not carry (`carry.kept`:
foreign codings, unknown extensions, extensions on primitives, elements KAP has no field
for), so mapping the record back to FHIR gives it back.

Record ids come from business identifiers, never from a server's id (`record_id`). A party
named only by identifier that nothing resolves keeps its identifier (the mapped Reference
carries it) and gets a derived id; the issue says so.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from .. import jsonio
from ..config import CANONICAL, CS, Release
from ..errors import InputError, Issue, KapError, MappingError, ProfileError
from ..fhir.digits import ascii_digits
from ..fhir.references import PARTY_TYPES, Resolved, Resolver, ResourceLookup, iter_references
from ..fhir.release import detect_release
from ..validation import KAP_PROFILES, Validator
from .carry import kept, not_carried
from .transforms import TransformError

__all__ = [
    "CLINICAL_CONTEXT_TYPES",
    "PARTY_TYPES",
    "Ingest",
    "Ingested",
    "record_id",
]

#: Resource types a referral's reasonReference / supportingInfo may carry as clinical context.
CLINICAL_CONTEXT_TYPES = (
    "Condition",
    "AllergyIntolerance",
    "MedicationStatement",
    "MedicationRequest",
    "Observation",
    "DocumentReference",
    "QuestionnaireResponse",
)
#: Business identifier systems that *are* the record id (the project's own).
OWN_SYSTEMS: Mapping[str, tuple[str, ...]] = {
    "Patient": (CS.ID_CLIENT_MRN,),
    "Practitioner": (f"{CANONICAL}/sid/practitioner",),
    "PractitionerRole": (f"{CANONICAL}/sid/practitioner-role",),
    "Organization": (f"{CANONICAL}/sid/organization", f"{CANONICAL}/sid/org"),
    "ServiceRequest": (CS.ID_REFERRAL,),
    "Procedure": (CS.ID_SESSION,),
    "Consent": (CS.ID_CONSENT,),
    "Communication": (CS.ID_NOTE,),
}
#: Where a Reference without a type names a client.
_CLIENT_FIELDS = frozenset({"subject", "patient", "for", "beneficiary"})
#: The code table that tags clinical context with an information category.
CONTEXT_TABLE = "clinical-context-category"
CONTEXT_CATEGORIES = ("treatment-history", "risk-considerations", "contraindications")
#: Its documented default, for a resource no entry of the table names.
CONTEXT_DEFAULT = "treatment-history"
FHIR_TYPES = "http://hl7.org/fhir/fhir-types"
#: The information category of an inbound note that names none of ours (documented default).
NOTE_DEFAULT_CATEGORY = "care-coordination"
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_NOT_ID = re.compile(r"[^A-Za-z0-9\-.]+")
_RELATIVE = re.compile(r"^[A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64}$")


def _derived(system: str, value: str) -> str:
    """A record id for an identifier from another system: readable, and distinct per identifier
    (the hash is of system and value: `E400/0123` and `E400 0123` slug alike, never collide).

    >>> _derived("urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14", "E4000123")
    'E4000123-b8580efc'
    """
    slug = _NOT_ID.sub("-", value).strip("-")[:48] or "id"
    return f"{slug}-{hashlib.sha256(f'{system}|{value}'.encode()).hexdigest()[:8]}"


def _id_from(rtype: str, idents: list[tuple[str, str]]) -> str | None:
    own = OWN_SYSTEMS.get(rtype, ())
    for system, value in idents:
        if system in own and _ID.match(value):
            return value
    for system, value in idents:
        if system == CS.NPI and rtype in ("Practitioner", "Organization") and ascii_digits(value):
            return f"npi-{value}"
    if idents:
        return _derived(*idents[0])
    return None


def _ordered_identifiers(resource: Any) -> list[tuple[str, str]]:
    raw = resource.get("identifier") if isinstance(resource, Mapping) else None
    raw = [raw] if isinstance(raw, Mapping) else raw if isinstance(raw, list) else []
    current: list[tuple[str, str]] = []
    old: list[tuple[str, str]] = []
    for i in raw:
        if not isinstance(i, Mapping):
            continue
        s, v = i.get("system"), i.get("value")
        if isinstance(s, str) and s and isinstance(v, str) and v:
            (old if i.get("use") == "old" else current).append((s, v))
    return current + old


def record_id(rtype: str, resource: Any) -> tuple[str, bool]:
    """(record id, from_identifier) of a resource: the project's own identifier's value, `npi-<NPI>`
    for a Practitioner or Organization, else an id derived from its first business identifier;
    with none, a hash of its content (False: it cannot be recognised when sent again otherwise).

    >>> record_id("ServiceRequest", {"id": "srv-uuid", "identifier": [
    ...     {"system": "http://fhir-kap.example/sid/referral", "value": "referral-1"}]})
    ('referral-1', True)
    >>> record_id("Practitioner", {"identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"}]})
    ('npi-1234567893', True)
    """
    found = _id_from(rtype, _ordered_identifiers(resource))
    if found is not None:
        return found, True
    body = (
        {k: v for k, v in resource.items() if k not in ("id", "meta", "text")}
        if isinstance(resource, dict)
        else {}
    )
    return f"h-{hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()[:24]}", False


@dataclass(frozen=True)
class Ingested:
    """One record made from what came in (or the error that stopped it), with every issue found."""

    label: str
    result: dict[str, Any] | None = None
    error: KapError | None = None
    issues: tuple[Issue, ...] = ()
    resource_type: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class _Work:
    """What reading one resource found on the way."""

    issues: list[Issue] = field(default_factory=list)
    parties: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)  # (pointer, resource, id)
    context: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (pointer, resource)
    skip: set[str] = field(default_factory=set)  # pointers not to keep (consumed references)


class Ingest:
    """Reads FHIR into KAP records. Build once (from a Pipeline); immutable and thread-safe."""

    def __init__(self, inputs: Any, mapper: Any) -> None:
        self.inputs = inputs
        self.mapper = mapper
        self._types = frozenset(mapper.resource_type(r) for r in mapper.record_types())

    # -- documents ---------------------------------------------------------------------------

    def document(
        self,
        label: str,
        doc: Any,
        *,
        release: Release | None = None,
        default: Release = Release.R4,
        context: ResourceLookup | None = None,
    ) -> list[Ingested]:
        """Every record in one document: a resource, or a Bundle of any type (entry by entry)."""
        if jsonio.too_deep(doc, jsonio.MAX_DEPTH + 4):  # a Bundle wraps its resources 3 levels down
            nested = InputError(
                f"the document nests deeper than {jsonio.MAX_DEPTH} levels",
                pointer="",
                rule="fhir:nesting",
                code="too-costly",
            )
            return [Ingested(label, error=nested)]
        if (
            isinstance(doc, dict)
            and doc.get("resourceType") == "Bundle"
            and isinstance(doc.get("entry"), list)
        ):
            return self._bundle(label, doc, release, default, context)
        return self.resource(label, doc, Resolver((), context), release=release, default=default)

    def _bundle(
        self,
        label: str,
        doc: dict[str, Any],
        release: Release | None,
        default: Release,
        context: ResourceLookup | None,
    ) -> list[Ingested]:
        rel = release or detect_release(doc) or default
        errors = [i for i in Validator.load(rel).validate(doc) if i.is_error]
        if errors:
            return [Ingested(label, error=ProfileError(errors), resource_type="Bundle")]
        entries = [e for e in doc["entry"] if isinstance(e, dict)]
        resolver = Resolver(
            (
                (e.get("fullUrl") if isinstance(e.get("fullUrl"), str) else None, e.get("resource"))
                for e in entries
            ),
            context,
        )
        consumed = {
            id(r.resource)
            for e in entries
            if isinstance(e.get("resource"), dict) and e["resource"].get("resourceType") == "ServiceRequest"
            for _, r in self._context_refs(e["resource"], resolver)
            if r.resource is not None and r.found_in == "bundle"
        }
        out: list[Ingested] = []
        for i, e in enumerate(doc["entry"]):
            res = e.get("resource") if isinstance(e, dict) else None
            sub = f"{label}#entry[{i}]"
            if res is None:
                continue
            if id(res) in consumed:
                out.append(
                    Ingested(
                        sub,
                        issues=(
                            Issue(
                                "information",
                                "informational",
                                f"{res.get('resourceType')} kept with the referral as clinical context",
                                f"Bundle.entry[{i}].resource",
                                f"/entry/{i}/resource",
                                "import:clinical-context",
                            ),
                        ),
                        resource_type=str(res.get("resourceType")),
                    )
                )
                continue
            out += [
                replace(o, issues=tuple(x.prefixed(pointer_prefix=f"/entry/{i}/resource") for x in o.issues))
                for o in self.resource(sub, res, resolver, release=rel, default=default)
            ]
        return out

    # -- one resource ------------------------------------------------------------------------

    def resource(
        self,
        label: str,
        resource: Any,
        resolver: Resolver | None = None,
        *,
        release: Release | None = None,
        default: Release = Release.R4,
        keep: bool = True,
    ) -> list[Ingested]:
        """The records one resource gives (its contained parties first, then its own). `keep`
        False skips working out what the record keeps of elements it does not map
        (`record.fhir.kept` and the issue `import:kept`); everything else is the same."""
        try:
            return self._resource(label, resource, resolver or Resolver(), release, default, keep)
        except KapError as exc:
            rt = resource.get("resourceType") if isinstance(resource, dict) else None
            return [Ingested(label, error=exc, resource_type=rt if isinstance(rt, str) else None)]

    def _resource(
        self,
        label: str,
        resource: Any,
        resolver: Resolver,
        release: Release | None,
        default: Release,
        keep: bool = True,
    ) -> list[Ingested]:
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise InputError(
                "A FHIR resource must be a JSON object with a resourceType",
                pointer="/resourceType",
                expression="resourceType",
                rule="fhir:resourceType",
            )
        jsonio.check_depth(resource)
        rt = resource["resourceType"]
        rel = release or detect_release(resource) or default
        validation = Validator.load(rel).validate(resource)
        errors = [i for i in validation if i.is_error]
        if errors:
            raise ProfileError(errors)
        issues = [i for i in validation if not i.is_error]
        if rt not in self._mapped_types():
            return [
                Ingested(
                    label,
                    issues=(
                        *issues,
                        Issue(
                            "information",
                            "not-supported",
                            f"{rt} is valid FHIR but not a KAP record type; it is not imported on its own "
                            "(a referral keeps Condition, Observation, ... it references as clinical context)",
                            rt,
                            "/resourceType",
                            "import:not-a-record",
                        ),
                    ),
                    resource_type=rt,
                )
            ]
        work = _Work(issues=issues)
        normal = self._normalise(resource, rt, resolver, work)
        record = self._record(rt, resource, normal, rel, work, keep)
        outs: list[Ingested] = []
        for ptr, party, pid in work.parties:
            sub = jsonio.copy(party)
            sub["id"] = pid
            for o in self._resource(
                f"{label}#{ptr.lstrip('/')}", sub, Resolver((), None), rel, default, keep
            ):
                outs.append(replace(o, issues=tuple(x.prefixed(pointer_prefix=ptr) for x in o.issues)))
        outs.append(Ingested(label, result=record, issues=tuple(work.issues), resource_type=rt))
        return outs

    def _mapped_types(self) -> frozenset[str]:
        return self._types

    # -- references --------------------------------------------------------------------------

    def _normalise(
        self, resource: dict[str, Any], rt: str, resolver: Resolver, work: _Work
    ) -> dict[str, Any]:
        """A copy with every party reference made literal (`Type/<record id>`) where it can be;
        clinical context taken out of the referral; the record id set from the business identifier."""
        rid, from_ident = record_id(rt, resource)
        if not from_ident:
            work.issues.append(
                Issue(
                    "warning",
                    "informational",
                    f"{rt} has no business identifier: its record id is a hash of its content, so only an "
                    "identical copy is recognised as the same record",
                    f"{rt}.identifier",
                    "/identifier",
                    "import:no-identifier",
                )
            )
        if rt == "ServiceRequest":
            for ptr, res in self._context_refs(resource, resolver):
                if res.resource is not None and res.type in CLINICAL_CONTEXT_TYPES:
                    work.context.append((ptr, self._context_copy(res.resource, resource, resolver)))
                    work.skip.add(ptr)
        literals = resolver.reads_literals
        walk = literals or _worth_a_walk(resource)
        # the copy is changed in place below only when there is something to resolve or take out;
        # else a shallow one does (most resources a partner posts: plain Type/id references)
        normal = jsonio.copy(resource) if walk or work.skip else dict(resource)
        normal["id"] = rid
        normal.pop("contained", None)
        for ptr, key, ref in iter_references(normal, contained=False) if walk else ():
            if not literals and len(ref) == 1 and _RELATIVE.match(ref.get("reference") or ""):
                continue  # a plain Type/id nothing here could resolve further: as it is
            if ptr in work.skip or any(ptr.startswith(s + "/") for s in work.skip):
                continue
            found = resolver.resolve(ref, resource)
            if found is None:
                continue
            res = found
            new = self._party_reference(res, key, ptr, rt, work, resource)
            if new is not None:
                if res.resource is not None:
                    work.skip.add(f"{ptr}/reference")  # resolved: the record carries it
                ref.clear()
                ref.update(new)
        for ptr in sorted(work.skip, reverse=True):
            if not ptr.endswith("/reference"):
                _remove(normal, ptr)
        return normal

    def _context_copy(
        self, target: dict[str, Any], referral: dict[str, Any], resolver: Resolver
    ) -> dict[str, Any]:
        """A clinical-context resource as kept: its party references made literal like the referral's
        (a contained `#pat` means the referral's contained Patient)."""
        out = jsonio.copy(target)
        scratch = _Work()
        for ptr, key, ref in iter_references(out, contained=False):
            res = resolver.resolve(ref, referral)
            new = (
                self._party_reference(res, key, ptr, target["resourceType"], scratch, referral)
                if res
                else None
            )
            if new is not None:
                ref.clear()
                ref.update(new)
        return out

    def _context_refs(self, resource: dict[str, Any], resolver: Resolver) -> Iterator[tuple[str, Resolved]]:
        for key in ("reasonReference", "supportingInfo", "reason"):
            items = resource.get(key)
            for i, item in enumerate(items if isinstance(items, list) else []):
                ref = item.get("reference") if key == "reason" and isinstance(item, dict) else item
                ptr = f"/{key}/{i}"
                if (
                    key == "supportingInfo"
                    and isinstance(item, dict)
                    and isinstance(item.get("reference"), dict)
                ):
                    ref = item["reference"]  # R5: a CodeableReference
                res = resolver.resolve(ref, resource) if isinstance(ref, dict) else None
                if res is not None:
                    yield ptr, res

    def _party_reference(
        self, res: Resolved, key: str, ptr: str, rt: str, work: _Work, container: dict[str, Any]
    ) -> dict[str, Any] | None:
        ref = res.ref
        target = res.type or (
            "Patient" if key in _CLIENT_FIELDS and ref.kind in ("logical", "conditional") else None
        )
        if target not in self._mapped_types():
            if res.resource is None and ref.kind in ("contained", "urn", "conditional"):
                work.issues.append(_unresolved(rt, ptr, res))
            return None
        if res.resource is not None:
            pid, _ = record_id(target, res.resource)
            if res.found_in == "contained" and target in PARTY_TYPES:
                at = f"/contained/{_contained_index(container, res.resource)}"
                if all(p[0] != at for p in work.parties):
                    work.parties.append((at, res.resource, pid))
            return {"reference": f"{target}/{pid}"}
        if ref.kind in ("conditional", "logical") or (
            ref.identifier is not None and not (ref.kind == "relative" and _claims_kap(container))
        ):
            # a literal reference to another server's id that carries a business identifier too:
            # the identifier names the party. (A resource written to the KAP profiles names its
            # parties by their KAP record ids: its relative references stay as they are.)
            ordered = ([ref.identifier] if ref.identifier else []) + list(ref.query_identifiers or ())
            derived = _id_from(str(target), ordered)
            if derived is None:
                work.issues.append(_unresolved(rt, ptr, res))
                return None
            work.issues.append(
                Issue(
                    "warning",
                    "informational",
                    f"{target} named by identifier{'' if ref.local is None else ' (and another server id)'}"
                    " and not found in the Bundle or the context: kept as "
                    f"given (the reference keeps its identifier); the record names it {target}/{derived}",
                    _expression(rt, ptr),
                    ptr,
                    "import:unresolved-reference",
                )
            )
            new: dict[str, Any] = {"reference": f"{target}/{derived}"}
            if ref.identifier is not None:  # a party reference keeps the identifier that names it
                new["identifier"] = {"system": ref.identifier[0], "value": ref.identifier[1]}
            return new
        if ref.kind in ("contained", "urn"):
            work.issues.append(_unresolved(rt, ptr, res))
        return None

    # -- mapping -----------------------------------------------------------------------------

    def _record(
        self,
        rt: str,
        original: dict[str, Any],
        normal: dict[str, Any],
        rel: Release,
        work: _Work,
        keep: bool = True,
    ) -> dict[str, Any]:
        record, issues = self.mapper.read(normal, rel, lenient=True)
        errors = [i for i in issues if i.is_error]
        if errors:
            raise MappingError(errors)
        work.issues += issues
        carry: dict[str, Any] = {}
        if work.context:
            carry["context"] = [
                {"category": self._category(res), "resource": jsonio.copy(res)} for _, res in work.context
            ]
            work.issues.append(
                Issue(
                    "information",
                    "informational",
                    "clinical context kept with the referral: "
                    + ", ".join(
                        f"{c['resource']['resourceType']} ({c['category']})" for c in carry["context"]
                    ),
                    f"{rt}.supportingInfo",
                    None,
                    "import:clinical-context",
                )
            )
        if rt == "Communication" and "category" not in record:
            record["category"] = NOTE_DEFAULT_CATEGORY
            work.issues.append(
                Issue(
                    "warning",
                    "incomplete",
                    "the note carries no KAP information category (kap-information-category); read as "
                    f"'{NOTE_DEFAULT_CATEGORY}', the category of notes between care-team members",
                    f"{rt}.category",
                    "/category",
                    "import:note-category",
                )
            )
        if rt == "Patient" and "name" not in record:
            work.issues.append(
                Issue(
                    "warning",
                    "incomplete",
                    "the client has no name the record can carry (Patient.name); it is known by its identifiers",
                    f"{rt}.name",
                    "/name",
                    "import:client-name",
                )
            )
        if rt == "ServiceRequest" and "clinic" not in record:
            work.issues.append(
                Issue(
                    "warning",
                    "incomplete",
                    "the referral names no performing organisation (ServiceRequest.performer): it is "
                    "taken as addressed to the clinic that received it",
                    f"{rt}.performer",
                    "/performer",
                    "import:referral-clinic",
                )
            )
        if rt == "ServiceRequest" and "collaboration_model" not in record:
            work.issues.append(
                Issue(
                    "warning",
                    "incomplete",
                    "the referral states no KAP collaboration model (extension kap-collaboration-model); the "
                    "clinic agrees one with the referring therapist before dosing",
                    f"{rt}.extension",
                    "/extension",
                    "import:collaboration-model",
                )
            )
        mapped = None
        if keep:
            try:
                mapped = self.mapper.to_fhir(record, rel)
            except (MappingError, TransformError, KeyError, TypeError, ValueError):
                mapped = None
        if mapped is not None:
            ops = kept(_without(original, work.skip), mapped, skip=work.skip)
            if ops:
                carry["kept"] = ops
                shown = not_carried(rt, ops)
                work.issues.append(
                    Issue(
                        "information",
                        "informational",
                        f"{len(shown)} element(s) not carried by the KAP record, kept as given: "
                        + ", ".join(shown[:20])
                        + (", ..." if len(shown) > 20 else ""),
                        rt,
                        None,
                        "import:kept",
                    )
                )
        if carry:
            record["fhir"] = carry
        return self.inputs.check(record)

    def _category(self, resource: dict[str, Any]) -> str:
        """The information category of a piece of clinical context: the one its sender tagged it
        with (meta.tag, kap-information-category, when it is a clinical-context category); else
        the code table `clinical-context-category` by the resource's codes, then by its type;
        else the default."""
        meta = resource.get("meta")
        tags = meta.get("tag") if isinstance(meta, dict) else None
        for tag in tags if isinstance(tags, list) else []:
            if (
                isinstance(tag, dict)
                and tag.get("system") == CS.INFO_CATEGORY
                and tag.get("code") in CONTEXT_CATEGORIES
            ):
                return str(tag["code"])
        try:
            table = self.mapper.table(CONTEXT_TABLE)
        except TransformError:
            return CONTEXT_DEFAULT
        codings: list[Any] = []
        for key in ("code", "medicationCodeableConcept"):
            c = resource.get(key)
            if isinstance(c, dict) and isinstance(c.get("coding"), list):
                codings += c["coding"]
        for attempt in (codings, [{"system": FHIR_TYPES, "code": resource.get("resourceType")}]):
            try:
                return str(table.local_code(attempt))
            except TransformError:
                continue
        return CONTEXT_DEFAULT


_UNUSUAL_REFERENCE = re.compile(rb'"reference":"(?:#|urn:|[a-z][a-z0-9+.\-]*://|[^"]*\?)')


def _worth_a_walk(resource: dict[str, Any]) -> bool:
    """Whether a resource holds a reference other than plain `Type/id` (contained, urn, absolute,
    conditional, or any Reference with an identifier): one C-speed scan of its JSON instead of a
    Python walk over every element (most resources a partner posts hold plain ones only)."""
    raw = orjson.dumps(resource)
    return b'"identifier":{' in raw or _UNUSUAL_REFERENCE.search(raw) is not None


def _without(resource: dict[str, Any], pointers: set[str]) -> dict[str, Any]:
    """A copy of `resource` without the list items at `pointers` (consumed references)."""
    if not any(not p.endswith("/reference") for p in pointers):
        return resource
    out = jsonio.copy(resource)
    for ptr in sorted(pointers, reverse=True):
        if not ptr.endswith("/reference"):
            _remove(out, ptr)
    return out


def _remove(node: dict[str, Any], ptr: str) -> None:
    parts = ptr.strip("/").split("/")
    parent: Any = node
    for p in parts[:-1]:
        parent = parent[int(p)] if isinstance(parent, list) else parent.get(p)
        if parent is None:
            return
    last = parts[-1]
    if isinstance(parent, list) and ascii_digits(last, most=9) and int(last) < len(parent):
        parent[int(last)] = None
    elif isinstance(parent, dict):
        parent.pop(last, None)
    # compact lists emptied above
    for key in ("reasonReference", "supportingInfo", "reason"):
        if isinstance(node.get(key), list):
            node[key] = [x for x in node[key] if x is not None]
            if not node[key]:
                del node[key]


def _contained_index(container: dict[str, Any], target: Any) -> int:
    raw = container.get("contained")
    for i, c in enumerate(raw if isinstance(raw, list) else []):
        if c is target:
            return i
    return 0


def _claims_kap(resource: dict[str, Any]) -> bool:
    """Whether a resource claims one of the KAP profiles (it was written by fhir-kap's mappings)."""
    meta = resource.get("meta")
    profiles = meta.get("profile") if isinstance(meta, dict) else None
    return any(
        isinstance(p, str) and p.split("|")[0] in KAP_PROFILES
        for p in (profiles if isinstance(profiles, list) else [])
    )


def _expression(rt: str, ptr: str) -> str:
    return ".".join([rt] + [p for p in ptr.strip("/").split("/") if p and not ascii_digits(p)])


def _unresolved(rt: str, ptr: str, res: Resolved) -> Issue:
    return Issue(
        "warning",
        "not-found",
        f"reference ({res.ref.kind}) could not be resolved: {res.why or 'not found'}; kept as given",
        _expression(rt, ptr),
        ptr,
        "import:unresolved-reference",
    )
