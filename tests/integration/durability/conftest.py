"""Group commit and durability: `db` here is a SQLite database with one table `t (k)`."""

from __future__ import annotations

import pytest

from fhir_kap.storage.db import Database


@pytest.fixture
def db(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'g.sqlite3'}")
    database.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")
    yield database
    database.close()
