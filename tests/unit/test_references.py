"""fhir/references.py: every Reference form read one way, and resolved in one order
(contained, then the Bundle, then the context), on business identifiers only, uniquely."""

from __future__ import annotations

import pytest

from fhir_kap.fhir.references import Ref, Resolver, ResourceIndex, identifiers_of, parse_reference

MRN = "urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14"
NPI = "http://hl7.org/fhir/sid/us-npi"
UUID = "urn:uuid:6f1c1a52-3c1e-4b7e-9a43-0d1c3b5b2a10"


def patient(pid: str, *idents: tuple[str, str], **extra) -> dict:
    return {
        "resourceType": "Patient",
        "id": pid,
        "identifier": [{"system": s, "value": v} for s, v in idents],
    } | extra


@pytest.mark.parametrize(
    "value,expected",
    [
        ("Patient/p1", Ref("relative", "Patient/p1", "Patient", "p1")),
        ({"reference": "Patient/p1"}, Ref("relative", "Patient/p1", "Patient", "p1")),
        (
            "Patient/p1/_history/3",
            Ref("relative", "Patient/p1/_history/3", "Patient", "p1", version="3"),
        ),
        (
            "https://ehr.example/fhir/Patient/p1",
            Ref(
                "absolute", "https://ehr.example/fhir/Patient/p1", "Patient", "p1", "https://ehr.example/fhir"
            ),
        ),
        (
            "https://ehr.example/fhir/Patient/p1/_history/2",
            Ref(
                "absolute",
                "https://ehr.example/fhir/Patient/p1/_history/2",
                "Patient",
                "p1",
                "https://ehr.example/fhir",
                "2",
            ),
        ),
        ({"reference": "#pt"}, Ref("contained", "#pt", None, "pt")),
        ({"reference": "#pt", "type": "Patient"}, Ref("contained", "#pt", "Patient", "pt")),
        ("#", Ref("container", "#")),
        (
            {"type": "Patient", "identifier": {"system": MRN, "value": "E1"}},
            Ref("logical", None, "Patient", identifier=(MRN, "E1")),
        ),
        (
            {"identifier": {"system": NPI, "value": "1234567893"}},
            Ref("logical", None, None, identifier=(NPI, "1234567893")),
        ),
        (UUID, Ref("urn", UUID)),
        ("urn:oid:2.16.840.1.113883.4.642", Ref("urn", "urn:oid:2.16.840.1.113883.4.642")),
        (
            f"Patient?identifier={MRN}|E1",
            Ref(
                "conditional", f"Patient?identifier={MRN}|E1", "Patient", query=(("identifier", f"{MRN}|E1"),)
            ),
        ),
        (
            "Patient?identifier=urn%3Aoid%3A1.2%7CE1&identifier=http://x%7CK%2541",
            Ref(
                "conditional",
                "Patient?identifier=urn%3Aoid%3A1.2%7CE1&identifier=http://x%7CK%2541",
                "Patient",
                query=(("identifier", "urn:oid:1.2|E1"), ("identifier", "http://x|K%41")),
            ),
        ),
        (
            {"reference": "Patient/p1", "identifier": {"system": MRN, "value": "E1"}},
            Ref("relative", "Patient/p1", "Patient", "p1", identifier=(MRN, "E1")),
        ),
    ],
)
def test_parse_reference__reads_every_form(value, expected):
    assert parse_reference(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "   ",
        42,
        [],
        {},
        {"display": "Dr Who"},
        "patient/p1",  # types start upper-case
        "Patient/",
        "Patient/p1/extra",
        "Patient/has space",
        "Patient/" + "x" * 65,  # ids are 64 characters at most
        "urn:uuid:not-a-uuid",
        "urn:oid:3.1",
        "Patient?",
        {"identifier": {"system": MRN}},  # an identifier needs both system and value
        {"identifier": {"system": "", "value": "E1"}},
        {"identifier": {"value": "E1"}, "type": "Patient"},
        {"reference": "x" * 5000},
    ],
)
def test_parse_reference__names_nothing_for_malformed_input(value):
    assert parse_reference(value) is None


def test_parse_reference__a_malformed_literal_with_an_identifier_is_read_as_logical():
    ref = parse_reference({"reference": "not a reference", "identifier": {"system": MRN, "value": "E1"}})
    assert ref is not None and (ref.kind, ref.identifier) == ("logical", (MRN, "E1"))


def test_ref_local__is_type_and_id_for_literals_only():
    assert parse_reference("https://ehr.example/fhir/Patient/p1/_history/2").local == "Patient/p1"
    assert parse_reference("#pt").local is None
    assert parse_reference({"identifier": {"system": MRN, "value": "E1"}}).local is None


def test_identifiers_of__every_identifier_with_system_and_value_old_ones_too():
    res = {
        "identifier": [
            {"system": MRN, "value": "E1"},
            {"use": "old", "system": MRN, "value": "E0"},
            {"system": MRN},
            {"value": "x"},
            "junk",
        ]
    }
    assert identifiers_of(res) == {(MRN, "E1"), (MRN, "E0")}
    assert identifiers_of({"identifier": {"system": "s", "value": "v"}}) == {("s", "v")}  # 0..1 types
    assert identifiers_of({"identifier": "junk"}) == frozenset()
    assert identifiers_of(None) == frozenset()


# -- resolving ------------------------------------------------------------------------------------


def test_resolve__contained_names_the_containers_own_contained_resource():
    inner = patient("pt", (MRN, "E1"))
    consent = {"resourceType": "Consent", "contained": [inner]}
    context = ResourceIndex([patient("pt", (MRN, "E9"))])  # a context Patient with the same id is not it
    found = Resolver(context=context).resolve({"reference": "#pt"}, consent)
    assert found is not None and found.resource is inner and found.found_in == "contained"
    assert found.identifiers == {(MRN, "E1")}


def test_resolve__a_missing_contained_resource_is_unresolved_with_a_reason():
    found = Resolver().resolve("#nope", {"resourceType": "Consent", "contained": [patient("pt")]})
    assert found is not None and found.resource is None and "nope" in (found.why or "")
    assert Resolver().resolve("#pt", None).resource is None  # nothing contains it


def test_resolve__hash_names_the_container_and_nothing_without_one():
    consent = {"resourceType": "Consent", "id": "c"}
    found = Resolver().resolve("#", consent)
    assert found is not None and found.resource is consent and found.found_in == "container"
    alone = Resolver().resolve("#", None)
    assert alone is not None and alone.resource is None and alone.why


def test_resolve__order_is_contained_then_bundle_then_context():
    in_contained = patient("pt", (MRN, "E1"))
    in_bundle = patient("pt", (MRN, "E1"))
    in_context = patient("pt", (MRN, "E1"))
    resolver = Resolver(bundle=[("urn:uuid:x", in_bundle)], context=ResourceIndex([in_context]))
    holder = {"resourceType": "Consent", "contained": [in_contained]}
    assert resolver.resolve("#pt", holder).resource is in_contained
    assert resolver.resolve("Patient/pt", holder).resource is in_bundle
    logical = {"type": "Patient", "identifier": {"system": MRN, "value": "E1"}}
    found = resolver.resolve(logical, holder)
    assert found.resource is in_bundle and found.found_in == "bundle"
    only_context = Resolver(context=ResourceIndex([in_context]))
    found = only_context.resolve(logical)
    assert found.resource is in_context and found.found_in == "context"
    assert only_context.resolve("Patient/pt").found_in == "context"


def test_resolve__bundle_by_full_url_then_type_and_id():
    entry = patient("p1", (MRN, "E1"))
    resolver = Resolver(bundle=[(UUID, entry), ("https://ehr.example/fhir/Patient/p2", patient("p2"))])
    assert resolver.resolve(UUID).resource is entry
    assert resolver.resolve("Patient/p1").resource is entry
    assert resolver.resolve("https://ehr.example/fhir/Patient/p2/_history/4").resource["id"] == "p2"
    assert resolver.resolve("Patient/p2").resource["id"] == "p2"  # Type/id of a fullUrl
    unknown = resolver.resolve("urn:uuid:00000000-0000-0000-0000-000000000000")
    assert unknown.resource is None and unknown.why


def test_resolve__an_absolute_reference_is_never_looked_up_in_the_context_by_type_and_id():
    context = ResourceIndex([patient("p1", (MRN, "E1"))])
    found = Resolver(context=context).resolve("https://other.example/fhir/Patient/p1")
    assert found is not None and found.resource is None


def test_resolve__logical_matches_business_identifiers_only_never_display():
    context = ResourceIndex([patient("p1", (MRN, "E1"), name=[{"text": "Alex Doe"}])])
    resolver = Resolver(context=context)
    assert resolver.resolve({"display": "Alex Doe", "type": "Patient"}) is None
    miss = resolver.resolve({"identifier": {"system": MRN, "value": "Alex Doe"}, "display": "Alex Doe"})
    assert miss.resource is None
    other_system = resolver.resolve({"identifier": {"system": MRN + ".1", "value": "E1"}})
    assert other_system.resource is None


def test_resolve__logical_without_type_finds_any_type_with_type_only_that_type():
    org = {"resourceType": "Organization", "id": "o1", "identifier": [{"system": NPI, "value": "1"}]}
    resolver = Resolver(context=ResourceIndex([org]))
    assert resolver.resolve({"identifier": {"system": NPI, "value": "1"}}).resource is org
    typed = resolver.resolve({"type": "Practitioner", "identifier": {"system": NPI, "value": "1"}})
    assert typed.resource is None


def test_resolve__two_carriers_are_ambiguous_and_unresolved():
    context = ResourceIndex([patient("p1", (MRN, "E1")), patient("p2", (MRN, "E1"))])
    found = Resolver(context=context).resolve(
        {"type": "Patient", "identifier": {"system": MRN, "value": "E1"}}
    )
    assert found.resource is None and "ambiguous" in (found.why or "")
    cond = Resolver(context=context).resolve(f"Patient?identifier={MRN}|E1")
    assert cond.resource is None and "ambiguous" in (cond.why or "")


def test_resolve__two_copies_of_one_resource_are_one_candidate():
    v1 = patient("p1", (MRN, "E1"), meta={"versionId": "1"})
    v2 = patient("p1", (MRN, "E1"), meta={"versionId": "2"})
    found = Resolver(context=ResourceIndex([v1, v2])).resolve({"identifier": {"system": MRN, "value": "E1"}})
    assert found.resource is v1


def test_resolve__conditional_with_one_and_with_two_identifiers():
    p1 = patient("p1", (MRN, "E1"), ("urn:kap", "K1"))
    p2 = patient("p2", (MRN, "E1"), ("urn:kap", "K2"))
    resolver = Resolver(context=ResourceIndex([p1, p2]))
    assert resolver.resolve(f"Patient?identifier={MRN}|E1").resource is None  # both carry it
    both = resolver.resolve(f"Patient?identifier={MRN}|E1&identifier=urn:kap|K2")
    assert both.resource is p2  # all parameters must hold (AND)
    encoded = resolver.resolve("Patient?identifier=urn%3Akap%7CK1")
    assert encoded.resource is p1
    none = resolver.resolve(f"Patient?identifier={MRN}|E1&identifier=urn:kap|K3")
    assert none.resource is None


def test_resolve__a_percent_encoded_value_is_decoded_once():
    p = patient("p1", ("urn:kap", "K%41"))
    resolver = Resolver(context=ResourceIndex([p]))
    assert resolver.resolve("Patient?identifier=urn:kap%7CK%2541").resource is p


@pytest.mark.parametrize(
    "query", ["name=Doe", "identifier=E1", "identifier=", f"identifier={MRN}|E1&name=Doe"]
)
def test_resolve__a_conditional_reference_by_anything_but_identifier_is_unresolved(query):
    context = ResourceIndex([patient("p1", (MRN, "E1"), name=[{"family": "Doe"}])])
    found = Resolver(context=context).resolve(f"Patient?{query}")
    assert found is not None and found.resource is None and found.why


def test_resolve__type_mismatch_is_unresolved():
    org = {"resourceType": "Organization", "id": "x", "identifier": [{"system": MRN, "value": "E1"}]}
    holder = {"resourceType": "Consent", "contained": [org]}
    resolver = Resolver(bundle=[(UUID, org)], context=ResourceIndex([org]))
    for value in (
        {"reference": "#x", "type": "Patient"},  # contained resource of another type
        {"reference": UUID, "type": "Patient"},  # Bundle entry of another type
        {"type": "Patient", "identifier": {"system": MRN, "value": "E1"}},  # identifier of another type
        "Patient/x",  # same id, other type
        {"reference": "#", "type": "Patient"},  # the container is a Consent
    ):
        found = resolver.resolve(value, holder)
        assert found is not None and found.resource is None, value
    assert resolver.resolve({"reference": "#x", "type": "Organization"}, holder).resource is org


def test_resolve__a_literal_not_found_falls_back_to_its_identifier():
    p = patient("local-7", (MRN, "E1"))
    resolver = Resolver(context=ResourceIndex([p]))
    ref = {"reference": "https://ehr.example/fhir/Patient/p1", "identifier": {"system": MRN, "value": "E1"}}
    assert resolver.resolve(ref).resource is p
    assert resolver.resolve("https://ehr.example/fhir/Patient/p1").resource is None


def test_resolve__names_nothing_is_none():
    assert Resolver().resolve({"display": "nobody"}) is None
    assert Resolver().resolve(None) is None


def test_resolved_identifiers__own_and_the_references():
    p = patient("p1", (MRN, "E1"))
    found = Resolver(context=ResourceIndex([p])).resolve(
        {"reference": "Patient/p1", "identifier": {"system": "urn:kap", "value": "K1"}}
    )
    assert found.identifiers == {(MRN, "E1"), ("urn:kap", "K1")} and found.type == "Patient"


def test_resource_index__skips_non_resources_and_checks_the_type_on_get():
    index = ResourceIndex([{"id": "x"}, "junk", patient("p1", (MRN, "E1"))])
    assert index.get("Patient", "p1")["id"] == "p1"
    assert index.get("Practitioner", "p1") is None
    assert [r["id"] for r in index.by_identifier(None, MRN, "E1")] == ["p1"]
    assert index.by_identifier("Organization", MRN, "E1") == []


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("Patient?identifier=s|a", (("s", "a"),)),
        ("Patient?identifier=s|a%5C%2Cb", (("s", "a,b"),)),  # an escaped comma is part of the value
        ("Patient?identifier=s|a%5C%7Cb", (("s", "a|b"),)),  # so is an escaped bar
        ("Patient?identifier=s|a,s|b", None),  # alternatives select no one party
        ("Patient?identifier=a", None),  # no system
    ],
)
def test_a_conditional_reference_reads_identifiers_with_the_search_escapes(reference, expected):
    """The same reading as the store's search and conditional writes (fhir/searchvalues.py): a
    reference `Patient?identifier=s|a\\,b` names the one value `a,b`, as a search for it finds."""
    assert parse_reference(reference).query_identifiers == expected


def test_an_index_files_each_resource_once_per_identifier_however_many_share_it(monkeypatch):
    """Filing checked the whole bucket for the same object: 6,000 parties sharing one identifier
    took 0.4 s per consent decision. Counted, not timed: the bucket is never scanned."""
    shared = [patient(f"p{i}", (NPI, "1003000126")) for i in range(3000)]
    index = ResourceIndex(shared)
    index.add(shared[0])  # the same object again: filed once
    assert len(index.by_identifier(None, NPI, "1003000126")) == 3000
    scanned = 0

    class Counting(list):
        def __iter__(self):
            nonlocal scanned
            scanned += 1
            return super().__iter__()

    bucket = Counting(index._by_ident[(NPI, "1003000126")])
    index._by_ident[(NPI, "1003000126")] = bucket
    index.add(patient("p-new", (NPI, "1003000126")))
    assert scanned == 0 and len(bucket) == 3001
