"""Dry run: what would this recipient receive, candidate by candidate, and why.

Room: consent/ (layer 1, pure core: no IO, no clock): may import the base rooms only.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

from .policy import normalise_purpose

if TYPE_CHECKING:
    from .decide import ConsentGate
    from .recipients import Recipient

__all__ = ["preview"]

DEFAULT_PURPOSE = "TREAT"


def preview(
    gate: ConsentGate,
    candidates: Iterable[dict[str, Any]],
    recipient: Recipient,
    purpose: str | None,
    on: date | datetime,
) -> list[dict[str, Any]]:
    """Each candidate with its decision. Without a purpose, every purpose any consent names
    (and TREAT) is tried; `purposes` lists those that would permit."""
    purposes = (
        [purpose]
        if purpose
        else list(dict.fromkeys([normalise_purpose(DEFAULT_PURPOSE)] + list(gate.purposes())))
    )
    rows = []
    for res in candidates:
        decisions = [(p, gate.decide(res, recipient, p, on)) for p in purposes]
        permitted = [(p, d) for p, d in decisions if d.permit]
        chosen = permitted[0][1] if permitted else decisions[0][1]
        rid = res.get("id")
        row = {
            "resource": f"{res.get('resourceType')}/{rid if isinstance(rid, str) else '?'}",
            **chosen.to_json(),
            "purposes": [p.rpartition("|")[2] for p, _ in permitted],
        }
        rows.append(row)
    return rows
