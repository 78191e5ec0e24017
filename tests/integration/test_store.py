"""The versioned resource store, on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from fhir_kap.errors import InputError, PreconditionFailed
from fhir_kap.storage.db import Database
from fhir_kap.storage.sql import migrations
from fhir_kap.storage.store import IDENTIFIER_LOOKUP, Store

DATA = Path(__file__).resolve().parents[1] / "data" / "bridge"


def load(name: str) -> dict:
    return json.loads((DATA / name).read_text())


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request, tmp_path):
    if request.param == "sqlite":
        db = Database(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    else:
        url = request.getfixturevalue("pg_url")
        db = Database(url)
        with db.transaction() as tx:  # an isolated schema per test
            schema = "t_" + uuid.uuid4().hex[:12]
            tx.execute(f"CREATE SCHEMA {schema}")
        db.close()
        db = Database(url + ("&" if "?" in url else "?") + f"options=-csearch_path%3D{schema}")
    yield Store(db)
    db.close()
    if request.param == "postgresql":
        admin = Database(url)
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()


def test_create_assigns_id_version_and_last_updated(store):
    stored, created = store.create(load("Example-Communication-note-1.json"))
    assert created and stored.version == 1 and stored.id != "note-1"
    assert stored.resource["meta"]["versionId"] == "1"
    assert stored.resource["meta"]["lastUpdated"] == stored.last_updated
    assert store.get("Communication", stored.id).resource == stored.resource


def test_update_bumps_version_and_keeps_history(store):
    first, _ = store.create(load("Example-Communication-note-1.json"))
    changed = dict(first.resource, status="entered-in-error")
    second, created = store.update("Communication", first.id, changed)
    assert not created and second.version == 2
    assert [h.version for h in store.history("Communication", first.id)] == [2, 1]
    assert store.vread("Communication", first.id, 1).resource["status"] == "completed"
    assert store.vread("Communication", first.id, 3) is None


def test_update_with_stale_if_match_is_refused(store):
    first, _ = store.create(load("Example-Communication-note-1.json"))
    store.update("Communication", first.id, first.resource)
    with pytest.raises(PreconditionFailed):
        store.update("Communication", first.id, first.resource, if_match=1)


def test_conditional_create__returns_existing_on_match(store):
    note = load("Example-Communication-note-1.json")
    cond = {"identifier": ["http://fhir-kap.example/sid/note|note-1"]}
    a, created_a = store.create(note, if_none_exist=cond)
    b, created_b = store.create(note, if_none_exist=cond)
    assert created_a and not created_b and a.id == b.id
    assert store.counts() == {"Communication": 1}


def test_with_identifier_finds_the_senders_current_resources_by_business_identifier(store):
    note = load("Example-Communication-note-1.json")
    system = "http://fhir-kap.example/sid/note"
    mine, _ = store.create(note, source="practice-a")
    store.create(note, source="practice-b")
    gone, _ = store.create(note, source="practice-a")
    store.delete("Communication", gone.id)
    found = store.with_identifier("Communication", system, "note-1", source="practice-a")
    assert [s.id for s in found] == [mine.id]  # another sender's and deleted ones never match
    assert store.with_identifier("Communication", system, "note-2", source="practice-a") == []
    assert store.with_identifier("Procedure", system, "note-1", source="practice-a") == []
    # the conditional create on identifier=SYSTEM|VALUE goes the same (indexed) way
    again, created = store.create(
        note, source="practice-a", if_none_exist={"identifier": [f"{system}|note-1"]}
    )
    assert not created and again.id == mine.id


def test_an_identifier_lookup_reads_the_identifier_index_not_the_whole_type(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'plan.sqlite3'}")
    Store(db)
    with db.transaction(immediate=False) as t:
        plan = " ".join(
            str(r["detail"])
            for r in t.execute(
                "EXPLAIN QUERY PLAN " + IDENTIFIER_LOOKUP.format(owner="c.source = ?", order="ASC"),
                ("Communication", "x", "y", "s", 20),
            )
        )
    db.close()
    assert "fhir_index_identifier" in plan and "fhir_current_seq" not in plan


def test_conditional_create__several_matches_is_412(store):
    note = load("Example-Communication-note-1.json")
    store.create(note)
    store.create(note)
    with pytest.raises(PreconditionFailed):
        store.create(note, if_none_exist={"identifier": ["note-1"]})


@pytest.mark.parametrize(
    "params,hits",
    [
        ({"patient": ["client-1"]}, 1),
        ({"patient": ["Patient/client-1"]}, 1),
        ({"patient": ["client-2"]}, 0),
        ({"identifier": ["http://fhir-kap.example/sid/note|note-1"]}, 1),
        ({"identifier": ["note-1"]}, 1),
        ({"identifier": ["http://other|note-1"]}, 0),
        ({"status": ["completed"]}, 1),
        ({"status": ["in-progress,completed"]}, 1),
        ({"status": ["in-progress"]}, 0),
        ({"recipient": ["Practitioner/ref-therapist"]}, 1),
        ({"recipient": ["ref-therapist"]}, 1),
        ({"category": ["http://fhir-kap.example/CodeSystem/kap-information-category|session-dates"]}, 1),
        ({"category": ["session-dates"]}, 1),
        ({"category": ["safety"]}, 0),
        ({"based-on": ["ServiceRequest/referral-1"]}, 1),
        ({"_lastUpdated": ["ge2000-01-01"]}, 1),
        ({"_lastUpdated": ["lt2000-01-01"]}, 0),
        ({"patient": ["client-1"], "status": ["in-progress"]}, 0),
        ({"identifier": ["http://fhir-kap.example/sid/note|"]}, 1),
        ({"identifier": ["http://other|"]}, 0),
        ({"identifier": ["|note-1"]}, 0),
        ({"status": ["|completed"]}, 1),
        ({"_security": ["http://terminology.hl7.org/CodeSystem/v3-Confidentiality|R"]}, 1),
        ({"_security": ["http://terminology.hl7.org/CodeSystem/v3-ActCode|R"]}, 0),
        ({"_security": ["PSY"]}, 1),
        ({"subject": ["client-1"]}, 1),
        ({"subject": ["Patient/client-1"]}, 1),
        ({"subject": ["Group/client-1"]}, 0),
        ({"recipient": ["Organization/ref-therapist"]}, 0),
        ({"sender": ["Organization/kap-clinic"]}, 1),
        ({"about": ["Procedure/session-1,Procedure/other"]}, 1),
        ({"based-on": ["referral-2"]}, 0),
    ],
)
def test_search_matches_indexed_parameters(store, params, hits):
    note = load("Example-Communication-note-1.json")
    note["sender"] = {"reference": "Organization/kap-clinic"}  # the bridge fills it from the poster
    store.create(note)
    store.create(load("Example-ServiceRequest-referral-1.json"))
    assert store.search("Communication", params).total == hits


def test_search_pages_with_count_and_offset(store):
    ids = [store.create(load("Example-Communication-note-1.json"))[0].id for _ in range(5)]
    page1 = store.search("Communication", {}, count=2, offset=0)
    page3 = store.search("Communication", {}, count=2, offset=4)
    assert page1.total == 5 and [s.id for s in page1.items] == ids[:2]
    assert [s.id for s in page3.items] == ids[4:]


def test_search_reflects_only_the_current_version(store):
    first, _ = store.create(load("Example-Communication-note-1.json"))
    store.update("Communication", first.id, dict(first.resource, status="entered-in-error"))
    assert store.search("Communication", {"status": ["completed"]}).total == 0
    assert store.search("Communication", {"status": ["entered-in-error"]}).total == 1


def test_deleted_resources_leave_search_but_keep_history(store):
    first, _ = store.create(load("Example-Communication-note-1.json"))
    store.delete("Communication", first.id)
    assert store.search("Communication", {}).total == 0
    assert store.get("Communication", first.id).deleted
    assert len(store.history("Communication", first.id)) == 2


@pytest.mark.parametrize(
    "params", [{"nonsense": ["x"]}, {"_lastUpdated": ["yesterday"]}, {"_lastUpdated": ["ge2025-13-40"]}]
)
def test_bad_search_parameters_are_input_errors(store, params):
    with pytest.raises(InputError):
        store.search("Communication", params)


@pytest.mark.parametrize(
    "value", ["9999-12-31", "0001-01-01T00:00+05:00", "9999-12-31T23:59-05:00", "9999-12", "eq9999"]
)
def test_dates_whose_range_leaves_years_1_to_9999_are_input_errors_naming_the_parameter(store, value):
    with pytest.raises(InputError) as err:
        store.search("Communication", {"_lastUpdated": [value]})
    assert (err.value.issues[0].rule, err.value.issues[0].expression) == ("search:date", "_lastUpdated")


@pytest.mark.parametrize("value,hits", [("gt0001-01-02", 1), ("lt0999-01-01", 0), ("ge9999-12-30", 0)])
def test_dates_at_the_edges_of_the_calendar_still_compare_correctly(store, value, hits):
    store.create(load("Example-Communication-note-1.json"))
    assert store.search("Communication", {"_lastUpdated": [value]}).total == hits


@pytest.mark.parametrize(
    "params",
    [
        {"category": [",".join(["a"] * 101)]},
        {"_id": [",".join(["a"] * 5000)]},
        {"category": [",".join(["a"] * 60)], "status": [",".join(["b"] * 41)]},
        {"category": [",".join(["a"] * 50), ",".join(["a"] * 51)]},
    ],
)
def test_more_than_a_hundred_search_values_are_too_costly(store, params):
    with pytest.raises(InputError) as err:
        store.search("Communication", params)
    assert (err.value.issues[0].rule, err.value.issues[0].code) == ("search:too-many-values", "too-costly")
    with pytest.raises(InputError):
        store.create(load("Example-Communication-note-1.json"), if_none_exist=params)
    assert store.counts() == {}


def test_a_hundred_search_values_and_many_audience_references_are_searched(store):
    created, _ = store.create(load("Example-Communication-note-1.json"), source="x")
    refs = [f"Practitioner/p{i}" for i in range(1500)] + ["Practitioner/ref-therapist"]
    found = store.search(
        "Communication", {"_id": [",".join(["a"] * 99 + [created.id])]}, audience=("y", refs)
    )
    assert [s.id for s in found.items] == [created.id]


@pytest.mark.parametrize(
    "condition",
    [
        {},
        {"_count": ["1"]},
        {"_sort": ["x"], "_summary": ["true"]},
        # criteria beside a result parameter: refused by the store itself, as at the HTTP door
        {"identifier": ["urn:x|1"], "_count": ["1"]},
        {"identifier": ["urn:x|1"], "_elements": ["id"]},
    ],
)
def test_a_condition_without_search_criteria_or_with_result_parameters_is_refused(store, condition):
    store.create(load("Example-Communication-note-1.json"), source="x")
    with pytest.raises(InputError) as err:
        store.create(load("Example-Communication-note-1.json"), source="x", if_none_exist=condition)
    assert err.value.issues[0].rule == "http:if-none-exist"
    assert store.counts() == {"Communication": 1}


def test_a_failed_transaction_writes_nothing(store):
    with pytest.raises(PreconditionFailed), store.transaction() as tx:
        store.create(load("Example-Communication-note-1.json"), tx=tx)
        raise PreconditionFailed("abort halfway")
    assert store.counts() == {}


def test_an_index_of_the_old_layout_is_rebuilt_on_open(tmp_path):
    """A store-1 database (one row per normalised value) is migrated and every resource stays findable."""
    import sqlite3

    path = tmp_path / "old.sqlite3"
    db = Database(f"sqlite:///{path}")
    migrations.apply(db, "store-1")
    note = load("Example-Communication-note-1.json")
    note["meta"] = {"versionId": "1", "lastUpdated": "2025-01-01T00:00:00.000000Z"}
    with db.transaction() as tx:
        tx.execute(
            "INSERT INTO fhir_history (type, id, version, last_updated, source, body) "
            "VALUES ('Communication', 'note-1', 1, '2025-01-01T00:00:00.000000Z', NULL, ?)",
            (json.dumps(note),),
        )
        tx.execute(
            "INSERT INTO fhir_current (type, id, version, seq, last_updated, source, body) "
            "VALUES ('Communication', 'note-1', 1, 1, '2025-01-01T00:00:00.000000Z', NULL, ?)",
            (json.dumps(note),),
        )
    db.close()
    store = Store(Database(f"sqlite:///{path}"))
    assert [s.id for s in store.search("Communication", {"patient": ["client-1"]}).items] == ["note-1"]
    assert (
        store.search("Communication", {"identifier": ["http://fhir-kap.example/sid/note|note-1"]}).total == 1
    )
    cols = [r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(fhir_index)")]
    assert cols == ["type", "id", "param", "code", "system"]


def test_a_store_2_database_moves_to_one_body_per_version_and_keeps_everything(db):
    """store-3: bodies only in the history, fhir_current WITHOUT ROWID and no AUTOINCREMENT on SQLite;
    every version, search and sequence number survive."""
    from fhir_kap.storage.search import index_values

    migrations.apply(db, "store-1")
    migrations.apply(db, "store-2")
    note = load("Example-Communication-note-1.json")
    rows = []  # (seq, id, version, deleted, body): note-1 twice, note-2 created then deleted
    for seq, (rid, version, deleted) in enumerate(
        [("note-1", 1, 0), ("note-2", 1, 0), ("note-1", 2, 0), ("note-2", 2, 1)], start=1
    ):
        body = dict(
            note, id=rid, meta={"versionId": str(version), "lastUpdated": f"2025-01-0{seq}T00:00:00.000000Z"}
        )
        if deleted:
            body = {"resourceType": "Communication", "id": rid}
        rows.append((seq, rid, version, deleted, body))
    with db.transaction() as tx:
        for seq, rid, version, deleted, body in rows:
            tx.execute(
                "INSERT INTO fhir_history (seq, type, id, version, last_updated, deleted, source, body) "
                "VALUES (?, 'Communication', ?, ?, ?, ?, 'old', ?)",
                (
                    seq,
                    rid,
                    version,
                    body.get("meta", {}).get("lastUpdated", "2025-01-04T00:00:00.000000Z"),
                    deleted,
                    json.dumps(body),
                ),
            )
        for seq, rid, version, deleted, body in rows[2:]:  # the latest version of each
            tx.execute(
                "INSERT INTO fhir_current (type, id, version, seq, last_updated, deleted, source, body) "
                "VALUES ('Communication', ?, ?, ?, '2025-01-04T00:00:00.000000Z', ?, 'old', ?)",
                (rid, version, seq, deleted, json.dumps(body)),
            )
        tx.executemany(
            "INSERT INTO fhir_index (type, id, param, code, system) VALUES (?, ?, ?, ?, ?)",
            sorted({("Communication", "note-1", p, c, s) for p, (c, s) in index_values(rows[2][4])}),
        )
        if db.dialect == "postgresql":  # rows written with explicit seqs, as the identity would have
            tx.execute("SELECT setval(pg_get_serial_sequence('fhir_history', 'seq'), 4)")
    store = Store(db)
    if db.dialect == "sqlite":
        cols = [r["name"] for r in db.query("SELECT name FROM pragma_table_info('fhir_current')")]
        ddl = {
            r["name"]: r["sql"] for r in db.query("SELECT name, sql FROM sqlite_master WHERE type = 'table'")
        }
        assert "AUTOINCREMENT" not in ddl["fhir_history"] and "WITHOUT ROWID" in ddl["fhir_current"]
        assert {r["name"] for r in db.query("SELECT name FROM sqlite_master WHERE type = 'index'")} >= {
            "fhir_current_seq"
        }
    else:
        cols = [
            r["column_name"]
            for r in db.query(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'fhir_current' "
                "AND table_schema = current_schema()"
            )
        ]
    assert "body" not in cols and {"type", "id", "version", "seq"} <= set(cols)
    current = store.get("Communication", "note-1")
    assert current is not None and current.version == 2 and current.resource["meta"]["versionId"] == "2"
    assert store.get("Communication", "note-2").deleted
    assert [s.version for s in store.history("Communication", "note-1")] == [2, 1]
    assert (
        store.vread("Communication", "note-1", 1).resource["meta"]["lastUpdated"]
        == "2025-01-01T00:00:00.000000Z"
    )
    assert [s.id for s in store.search("Communication", {"patient": ["client-1"]}).items] == ["note-1"]
    created, _ = store.create(dict(note, identifier=[{"system": "urn:x", "value": "new"}]), source="old")
    seqs = db.query("SELECT seq FROM fhir_current WHERE id = ?", (created.id,))
    assert seqs[0]["seq"] > 4  # numbering goes on after the migrated history
    assert [s.id for s in store.search("Communication", {"patient": ["client-1"]}).items] == [
        "note-1",
        created.id,
    ]


def test_server_assigned_ids_are_time_ordered(store):
    """New ids land at the right edge of the (type, id) keys: a later create sorts after an earlier one."""
    ids = [store.create(load("Example-Communication-note-1.json"))[0].id for _ in range(3)]
    assert all(uuid.UUID(i).version == 7 for i in ids)
    assert [i[:12] for i in ids] == sorted(i[:12] for i in ids)


def test_the_layout_migration_refuses_a_current_row_without_its_history_and_changes_nothing(db):
    from fhir_kap.errors import ConfigError

    migrations.apply(db, "store-1")
    migrations.apply(db, "store-2")
    db.execute(
        "INSERT INTO fhir_current (type, id, version, seq, last_updated, deleted, source, body) "
        "VALUES ('Communication', 'orphan', 1, 99, '2025-01-01T00:00:00.000000Z', 0, NULL, '{}')"
    )
    with pytest.raises(ConfigError, match="no matching history row") as err:
        Store(db)
    assert err.value.issues[0].rule == "store:migration"
    assert db.query("SELECT body FROM fhir_current WHERE id = 'orphan'") == [
        {"body": "{}"}
    ]  # old layout kept
    assert not db.query("SELECT name FROM schema_migrations WHERE name = 'store-3'")
