"""The database machinery of storage/ (layer 2, IO adapter; imports base and, for data
migrations, its sibling storage modules).

- database.py: `Database` and `Tx`: connections, nested transactions, the SQL dialects;
- walsync.py: durable commits on SQLite (the WAL sync after each write commit);
- groupcommit.py: `GroupCommitter`, the batches behind `Database.write`;
- checkpoint.py: `WalCheckpointer`, WAL checkpoints off the request path;
- migrations.py and schema/: every table definition and migration, in one place.

Other code imports `Database` from `storage.db`, the stable entry.
"""
