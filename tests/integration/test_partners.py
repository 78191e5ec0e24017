"""Partners: tokens shown once, stored hashed, revocable; scopes and identities checked."""

from __future__ import annotations

import time

import pytest

from fhir_kap.errors import Conflict, InputError, NotFound
from fhir_kap.storage.db import Database
from fhir_kap.storage.partners import NPI_SYSTEM, Partners


@pytest.fixture
def partners(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'p.sqlite3'}")
    yield Partners(db)
    db.close()


def test_add_returns_a_token_that_authenticates_and_is_not_stored(partners):
    partner, token = partners.add(
        "practice-a", org_identifier="urn:ietf:rfc:3986|urn:oid:1.2.3", npis=["1234567893"]
    )
    assert len(token) >= 40
    assert partners.authenticate(token) == partner
    dump = repr(partners.db.execute("SELECT * FROM partners"))
    assert token not in dump
    assert partner.recipient_keys == ("urn:ietf:rfc:3986|urn:oid:1.2.3", f"{NPI_SYSTEM}|1234567893")


@pytest.mark.parametrize("token", [None, "", "nope", "x" * 1000, "é\x00"])
def test_unknown_tokens_do_not_authenticate(partners, token):
    partners.add("practice-a")
    assert partners.authenticate(token) is None


def test_revoked_partner_no_longer_authenticates(partners):
    _, token = partners.add("practice-a")
    assert partners.revoke("practice-a").revoked
    assert partners.authenticate(token) is None
    assert [p.name for p in partners.list()] == ["practice-a"]


def test_revoking_an_unknown_partner_is_not_found(partners):
    with pytest.raises(NotFound):
        partners.revoke("ghost")


def test_adding_a_partner_twice_conflicts(partners):
    partners.add("practice-a")
    with pytest.raises(Conflict):
        partners.add("practice-a")


@pytest.mark.parametrize(
    "kwargs,rule",
    [
        ({"name": "../etc"}, "partner:name"),
        ({"name": "ok", "scopes": "system/*.delete"}, "partner:scope"),
        ({"name": "ok", "org_identifier": "no-bar"}, "partner:identifier"),
        ({"name": "ok", "npis": ["12"]}, "partner:npi"),
        ({"name": "ok", "endpoint_url": "ftp://x"}, "partner:url"),
        ({"name": "ok", "webhook_url": "https://user:secret@hooks.example/kap"}, "partner:url"),
        ({"name": "ok", "endpoint_url": "https://:secret@ehr.example/fhir"}, "partner:url"),
        ({"name": "ok", "webhook_url": "https://hooks.example:notaport/kap"}, "partner:url"),
        ({"name": "ok", "webhook_url": "https:///no-host"}, "partner:url"),
        ({"name": "ok", "webhook_url": "https://hooks.example/kap#frag"}, "partner:url"),
        (
            {"name": "ok", "endpoint_url": "https://x", "endpoint_auth": "bearer:s3cr3t-token"},
            "partner:endpoint-auth",
        ),
        ({"name": "ok", "references": ["Patient/x"]}, "partner:reference"),
    ],
)
def test_invalid_partner_settings_are_refused_naming_the_rule(partners, kwargs, rule):
    name = kwargs.pop("name")
    with pytest.raises(InputError) as err:
        partners.add(name, **kwargs)
    assert err.value.issues[0].rule == rule


@pytest.mark.parametrize(
    "scopes,rtype,interaction,allowed",
    [
        ("system/*.read", "Communication", "read", True),
        ("system/*.read", "Communication", "write", False),
        ("system/Communication.*", "Communication", "write", True),
        ("system/Communication.*", "Consent", "read", False),
        ("kap/clinic", "Communication", "read", False),
        ("system/*.read", "Communication", "search", True),  # v1 read covers search
        ("system/Communication.rs", "Communication", "read", True),  # SMART v2
        ("system/Communication.rs", "Communication", "search", True),
        ("system/Communication.rs", "Communication", "write", False),
        ("system/Communication.r", "Communication", "search", False),  # read by id only
        ("system/Communication.s", "Communication", "read", False),
        ("system/*.c", "ServiceRequest", "write", True),
        ("system/*.cruds", "Consent", "search", True),
        ("system/*.ud", "Consent", "write", True),
    ],
)
def test_scopes_grant_interactions(partners, scopes, rtype, interaction, allowed):
    partner, _ = partners.add("p", scopes=scopes)
    assert partner.allows(rtype, interaction) is allowed


@pytest.mark.parametrize(
    "scopes,authority",
    [
        ("system/*.read system/*.write", False),
        ("system/*.* kap/records.write kap/referrals.write", False),
        ("system/*.read system/*.write kap/consent-authority", True),
        ("system/*.* kap/clinic", True),
    ],
)
def test_only_clinic_systems_and_consent_authorities_feed_the_consent_gate(partners, scopes, authority):
    partner, _ = partners.add("p", scopes=scopes)
    assert partner.is_consent_authority is authority
    assert partners.revoke("p").is_consent_authority is False


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_cached_token_lookup_sees_a_revocation_made_elsewhere_within_the_cache_bound(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.sqlite3'}"
    clock = _Clock()
    bridge_side = Partners(Database(url), cache_seconds=5, clock=clock)
    cli_side = Partners(Database(url))
    _, token = cli_side.add("practice-a")
    assert bridge_side.authenticate(token) is not None
    cli_side.revoke("practice-a")
    clock.now += 4.9
    assert bridge_side.authenticate(token) is not None  # still inside the documented bound
    clock.now += 0.2
    assert bridge_side.authenticate(token) is None


def test_revocation_through_the_caching_object_takes_effect_at_once(tmp_path):
    partners = Partners(Database(f"sqlite:///{tmp_path / 'p.sqlite3'}"), cache_seconds=60)
    _, token = partners.add("practice-a")
    assert partners.authenticate(token) is not None
    partners.revoke("practice-a")
    assert partners.authenticate(token) is None
    assert partners.list()[0].revoked


def test_unknown_tokens_are_not_cached_so_a_new_partner_works_at_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.sqlite3'}"
    bridge_side = Partners(Database(url), cache_seconds=60)
    assert bridge_side.authenticate("not-yet") is None
    _, token = Partners(Database(url)).add("practice-a")
    assert bridge_side.authenticate(token) is not None


@pytest.mark.parametrize(
    "scope",
    [
        "system/Communication.sr",
        "system/Communication.",
        "system/*.rs?category=x",
        "system/communication.rs",
        "system/*.rx",
        "user/*.rs",
    ],
)
def test_scopes_outside_smart_v1_and_v2_are_refused(partners, scope):
    with pytest.raises(InputError) as err:
        partners.add("p", scopes=scope)
    assert err.value.issues[0].rule == "partner:scope"


@pytest.mark.parametrize(
    "held, requested, granted",
    [
        ("system/*.read", "system/Communication.rs", "system/Communication.rs"),  # v2 asked, v1 held
        ("system/*.rs", "system/Communication.read", "system/Communication.read"),  # v1 asked, v2 held
        ("system/*.r", "system/Communication.read", ""),  # v1 read needs search too
        ("system/*.read", "system/Communication.cruds", ""),  # asks for writes it does not hold
        (
            "system/*.read system/*.write",
            "system/Communication.cruds system/*.*",
            "system/Communication.cruds system/*.*",
        ),
        ("system/*.rs", "system/Communication.rs?category=x", ""),  # granular scopes are not granted
    ],
)
def test_token_scopes_are_granted_across_smart_versions(partners, held, requested, granted):
    partner, _ = partners.add("p", scopes=held)
    assert " ".join(partner.grantable(requested.split())) == granted


def test_partner_module_examples():
    import doctest

    from fhir_kap.storage import partners as module

    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_a_url_refused_for_credentials_never_echoes_them(partners):
    with pytest.raises(InputError) as err:
        partners.add("ok", webhook_url="https://user:s3cret@hooks.example/kap")
    assert "s3cret" not in str(err.value.operation_outcome())
    partner, _ = partners.add(
        "fine", webhook_url="http://127.0.0.1:9000/hooks", endpoint_url="https://ehr.example/fhir"
    )
    assert partner.webhook_url == "http://127.0.0.1:9000/hooks"


# --- rotation and re-adding a revoked name (issue 14), on both databases -----------------------


def test_rotate__new_token_works_and_old_one_stops_without_grace(db):
    partners = Partners(db)
    _, old = partners.add("practice-a")
    partner, new = partners.rotate("practice-a")
    assert new != old
    assert partners.authenticate(new) == partner
    assert partners.authenticate(old) is None


def test_rotate__old_token_keeps_working_until_the_grace_ends(db):
    partners = Partners(db)
    original, old = partners.add("practice-a", scopes="system/*.read kap/consent-authority")
    t0 = time.time()
    _, new = partners.rotate("practice-a", grace_seconds=60, now=t0)
    during = partners.authenticate(old)
    assert during is not None and during.name == "practice-a"
    assert during.scopes == original.scopes  # the partner's scopes, no more
    assert partners.authenticate(new) is not None
    # the grace ended: the old token's row has expired
    db.execute("UPDATE partner_access_tokens SET expires_at = ?", (t0 - 1,))
    assert partners.authenticate(old) is None
    assert partners.authenticate(new) is not None


def test_rotate__revocation_ends_the_grace_too(db):
    partners = Partners(db)
    _, old = partners.add("practice-a")
    _, new = partners.rotate("practice-a", grace_seconds=3600)
    partners.revoke("practice-a")
    assert partners.authenticate(old) is None
    assert partners.authenticate(new) is None


@pytest.mark.parametrize("grace", [-1, 31 * 86400])
def test_rotate__grace_out_of_range_is_refused(db, grace):
    partners = Partners(db)
    partners.add("practice-a")
    with pytest.raises(InputError) as err:
        partners.rotate("practice-a", grace_seconds=grace)
    assert err.value.issues[0].rule == "partner:grace"


def test_rotate__unknown_or_revoked_partner_is_refused(db):
    partners = Partners(db)
    with pytest.raises(NotFound):
        partners.rotate("ghost")
    partners.add("practice-a")
    partners.revoke("practice-a")
    with pytest.raises(Conflict) as err:
        partners.rotate("practice-a")
    assert err.value.issues[0].rule == "partner:revoked"


def test_add__a_revoked_name_is_registered_anew_with_a_new_token(db):
    partners = Partners(db)
    _, old = partners.add("practice-a", npis=["1234567893"])
    partners.revoke("practice-a")
    partner, new = partners.add("practice-a", npis=["1245319599"], scopes="system/*.read")
    assert not partner.revoked
    assert partner.npis == ("1245319599",)  # the settings given now
    assert partner.scopes == ("system/*.read",)
    assert partners.authenticate(new) == partner
    assert partners.authenticate(old) is None
    assert [p.name for p in partners.list()] == ["practice-a"]


def test_add__a_revoked_name_gets_none_of_its_earlier_smart_tokens_back(db):
    partners = Partners(db)
    partner, _ = partners.add("practice-a")
    granted = partners.grant(partner, partner.scopes, jti="j1", assertion_expires=time.time() + 60)
    partners.revoke("practice-a")
    partners.add("practice-a")
    assert partners.authenticate(granted) is None


def test_add__an_active_name_still_conflicts(db):
    partners = Partners(db)
    partners.add("practice-a")
    with pytest.raises(Conflict):
        partners.add("practice-a")


def test_cli_rotate_and_re_add(tmp_path, monkeypatch, capsys):
    import json

    from fhir_kap.cli import main

    monkeypatch.setenv("FHIR_KAP_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("FHIR_KAP_DATABASE_URL", raising=False)
    assert main(["partners", "add", "practice-a"]) == 0
    old = json.loads(capsys.readouterr().out)["token"]
    assert main(["partners", "rotate", "practice-a", "--grace", "120"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token"] != old and out["old_token_valid_until"].endswith("Z")
    assert main(["partners", "revoke", "practice-a"]) == 0
    capsys.readouterr()
    assert main(["partners", "add", "practice-a"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["partner"]["revoked"] is False and again["token"] not in (old, out["token"])


# --- where a partner's Subscriptions may post: origins the operator registers -------------------


def test_subscription_origins__the_webhooks_and_those_registered(db):
    partners = Partners(db)
    partner, _ = partners.add(
        "practice-a",
        webhook_url="https://hooks.practice-a.example/kap?x=1",
        subscription_origins=["https://EHR.practice-a.example:443/", "https://ehr.practice-a.example:8443"],
    )
    assert partner.subscription_origins == (
        "https://ehr.practice-a.example",
        "https://ehr.practice-a.example:8443",
    )
    assert partner.endpoint_origins == ("https://hooks.practice-a.example", *partner.subscription_origins)
    assert partner.public()["subscription_origins"] == list(partner.endpoint_origins)
    assert partner.may_post_to("https://ehr.practice-a.example/fhir/notify")
    assert partner.may_post_to("https://hooks.practice-a.example:443/other")
    assert not partner.may_post_to("https://ehr.practice-a.example:9443/fhir/notify")  # another port
    assert not partner.may_post_to("http://ehr.practice-a.example/fhir/notify")  # another scheme
    assert not partner.may_post_to("https://practice-a.example/")  # another host
    assert partners.get("practice-a") == partner


def test_subscription_origins__replaced_cleared_and_reset_when_a_revoked_name_is_added(db):
    partners = Partners(db)
    partners.add("practice-a", subscription_origins=["https://a.example"])
    changed = partners.set_subscription_origins("practice-a", ["http://[::1]:8080", "https://b.example"])
    assert changed.subscription_origins == ("http://[::1]:8080", "https://b.example")
    assert partners.set_subscription_origins("practice-a", []).endpoint_origins == ()
    partners.set_subscription_origins("practice-a", ["https://c.example"])
    partners.revoke("practice-a")
    again, _ = partners.add("practice-a")  # registered anew: the settings given now
    assert again.subscription_origins == ()
    with pytest.raises(NotFound):
        partners.set_subscription_origins("ghost", ["https://a.example"])


@pytest.mark.parametrize(
    "origin",
    [
        "https://a.example/path",  # an origin has no path
        "https://a.example/?q",
        "https://a.example#f",
        "https://user:pw@a.example",
        "ftp://a.example",
        "a.example",
        "https://a.example:99999",
        "https://ä.example",
        "",
    ],
)
def test_subscription_origins__anything_but_scheme_host_port_is_refused(partners, origin):
    with pytest.raises(InputError) as err:
        partners.add("practice-a", subscription_origins=[origin])
    assert err.value.issues[0].rule in ("partner:origin", "partner:url")
    assert partners.get("practice-a") is None  # nothing written


def test_cli_subscription_origins(tmp_path, monkeypatch, capsys):
    import json

    from fhir_kap.cli import main

    monkeypatch.setenv("FHIR_KAP_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("FHIR_KAP_DATABASE_URL", raising=False)
    assert (
        main(
            [
                "partners",
                "add",
                "practice-a",
                "--webhook",
                "https://hooks.practice-a.example/kap",
                "--subscription-origin",
                "https://ehr.practice-a.example",
                "--subscription-origin",
                "https://ehr.practice-a.example:8443",
            ]
        )
        == 0
    )
    added = json.loads(capsys.readouterr().out)["partner"]
    assert added["subscription_origins"] == [
        "https://hooks.practice-a.example",
        "https://ehr.practice-a.example",
        "https://ehr.practice-a.example:8443",
    ]
    assert main(["partners", "subscription-origins", "practice-a", "https://new.practice-a.example:443"]) == 0
    changed = json.loads(capsys.readouterr().out)
    assert changed["subscription_origins"] == [
        "https://hooks.practice-a.example",
        "https://new.practice-a.example",
    ]
    assert main(["partners", "subscription-origins", "practice-a"]) == 0  # none: only the webhook's
    assert json.loads(capsys.readouterr().out)["subscription_origins"] == ["https://hooks.practice-a.example"]
    assert main(["partners", "list"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["subscription_origins"] == [
        "https://hooks.practice-a.example"
    ]
    assert main(["partners", "subscription-origins", "practice-a", "https://x.example/path"]) != 0
    assert main(["partners", "subscription-origins", "ghost", "https://x.example"]) != 0


def test_cli_add__repeated_reference_and_npi_options_keep_every_value(tmp_path, monkeypatch, capsys):
    import json

    from fhir_kap.cli import main

    monkeypatch.setenv("FHIR_KAP_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("FHIR_KAP_DATABASE_URL", raising=False)
    args = ["partners", "add", "practice-a", "--reference", "Practitioner/t-1"]
    args += [
        "--reference",
        "PractitionerRole/r-1",
        "Organization/o-1",
        "--npi",
        "1234567893",
        "--npi",
        "1245319599",
    ]
    assert main(args) == 0
    added = json.loads(capsys.readouterr().out)["partner"]
    assert added["references"] == ["Practitioner/t-1", "PractitionerRole/r-1", "Organization/o-1"]
    assert added["npis"] == ["1234567893", "1245319599"]
