"""The stable entry to the database (storage/, layer 2: IO adapter; imports base only).

`from .db import Database, Tx` is how every table module, room and test reaches the database;
the machinery behind it lives in storage/sql/ (see its `__init__`), split by concern.
"""

from __future__ import annotations

from .sql.checkpoint import WalCheckpointer
from .sql.database import Database, Tx
from .sql.groupcommit import GroupCommitter

__all__ = ["Database", "GroupCommitter", "Tx", "WalCheckpointer"]
