"""The SQLite files hold patient data and webhook secrets: owner-only modes (issue 14).

A new data dir is 0700 and the database, its -wal and -shm, and the commit lock are 0600
whatever the process umask; an existing database left 0644 (an older version made it) is
tightened at open, with a warning naming it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fhir_kap.config import load_settings
from fhir_kap.storage.db import Database
from fhir_kap.storage.outbox import Outbox


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def open_umask():
    old = os.umask(0o022)  # the usual default: files 0644, directories 0755
    yield
    os.umask(old)


def write_something(db: Database) -> None:
    Outbox(db)  # its migrations write
    db.write(lambda tx: tx.execute("CREATE TABLE IF NOT EXISTS t_modes (x INTEGER)"))
    db.write(lambda tx: tx.execute("INSERT INTO t_modes VALUES (1)"))


def test_new_data_dir_and_database_files__owner_only(tmp_path, open_umask):
    settings = load_settings(env={}, data_dir=str(tmp_path / "data" / "nested"))
    db = Database(settings.db_url)
    try:
        write_something(db)
        db_file = Path(settings.db_url.removeprefix("sqlite:///"))
        files = [db_file, Path(f"{db_file}-wal"), Path(f"{db_file}-shm"), Path(f"{db_file}.commit-lock")]
        assert all(f.exists() for f in files)
        assert {f.name: oct(mode(f)) for f in files} == {f.name: "0o600" for f in files}
        for d in (tmp_path / "data", tmp_path / "data" / "nested"):
            assert oct(mode(d)) == "0o700", d
        # nothing else appeared there with a wider mode
        for f in db_file.parent.iterdir():
            assert mode(f) & 0o077 == 0, f
    finally:
        db.close()


def test_existing_world_readable_database__tightened_at_open_with_a_warning(tmp_path, open_umask, caplog):
    db_file = tmp_path / "fhir-kap.sqlite3"
    old = Database(f"sqlite:///{db_file}")
    write_something(old)
    old.close()
    for f in tmp_path.iterdir():  # as an older version left them
        os.chmod(f, 0o644)
    Path(f"{db_file}-wal").touch(mode=0o644)
    os.chmod(f"{db_file}-wal", 0o644)
    db = Database(f"sqlite:///{db_file}")
    try:
        with caplog.at_level("WARNING", logger="fhir_kap.db"):
            write_something(db)
        for f in (db_file, Path(f"{db_file}-wal"), Path(f"{db_file}-shm"), Path(f"{db_file}.commit-lock")):
            assert oct(mode(f)) == "0o600", f
        assert f"{db_file} was readable by others (mode 644): tightened to 600" in caplog.text
        assert db.query("SELECT count(*) AS n FROM t_modes")[0]["n"] == 2
    finally:
        db.close()


def test_existing_directory__left_as_it_is(tmp_path, open_umask):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    db = Database(f"sqlite:///{shared / 'x.sqlite3'}")
    try:
        write_something(db)
        assert oct(mode(shared)) == "0o755" and oct(mode(shared / "x.sqlite3")) == "0o600"
    finally:
        db.close()
