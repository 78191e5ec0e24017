"""Write units for the group-commit tests' table `t (k)` (the `db` fixture is in their conftest.py)."""

from __future__ import annotations


def _insert(key: str, fail: bool = False):
    def work(tx):
        tx.execute("INSERT INTO t (k) VALUES (?)", (key,))
        if fail:
            raise ValueError("this unit fails after writing")
        return key

    return work
