"""The schema in one place: every migration is registered, has its SQL files, and a fresh
database ends with all of them recorded, on SQLite and on PostgreSQL."""

from __future__ import annotations

import pytest

from fhir_kap.errors import ConfigError
from fhir_kap.exchange.webhooks import Notifier
from fhir_kap.storage.auditlog import AuditLog
from fhir_kap.storage.operators import Operators
from fhir_kap.storage.outbox import Outbox
from fhir_kap.storage.partners import Partners
from fhir_kap.storage.sql import migrations
from fhir_kap.storage.store import Store
from fhir_kap.storage.subscriptions import Subscriptions


def test_the_registry_names_exactly_the_migrations_that_have_sql_files():
    names = [m.name for m in migrations.MIGRATIONS]
    assert len(names) == len(set(names))
    assert set(names) == migrations.names_on_disk()


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_every_migration_but_a_data_only_one_has_statements_for_each_dialect(dialect):
    empty = {m.name for m in migrations.MIGRATIONS if not migrations.statements(m.name, dialect)}
    assert empty == {"outbox-3"}  # a data migration: its step is Python (`after`)
    assert all(m.after is not None for m in migrations.MIGRATIONS if m.name in empty)


def test_an_unknown_migration_is_refused():
    with pytest.raises(ConfigError, match="No migration 'outbox-9'"):
        migrations.statements("outbox-9", "sqlite")


def test_a_fresh_database_ends_with_every_migration_recorded_once(db):
    Outbox(db)
    Store(db)
    AuditLog(db)
    Partners(db)
    Notifier(db=db)
    Operators(db)
    Subscriptions(db)
    recorded = [r["name"] for r in db.query("SELECT name FROM schema_migrations ORDER BY name")]
    assert recorded == sorted(m.name for m in migrations.MIGRATIONS)
    assert all(migrations.ensure(db, owner) == [] for owner in {m.owner for m in migrations.MIGRATIONS})
