"""After the checks: delete what the run created, then search by the run's tag and report exactly
what remains (conformance/, layer 3: orchestration; imports base and the conformance context only).

Honest by construction: a resource counts as deleted only when its DELETE answered 2xx, or when
the DELETE was refused with 404/410 and a read then answers 404/410 too (it was already gone).
A DELETE answered 404 or 405 for a resource that still reads back is *not* deleted. Whatever the
deletes say, the run then searches every type it wrote by `_tag` (the run's tag) and by the run's
identifier system, keeps only hits that really carry the tag or identifier (a server that ignores
an unknown search parameter returns everything), and adds what a read still finds; that list is
`Cleanup.remaining`. With `keep_data` nothing is deleted and the search still runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import KapError
from .context import RUN_TAG_SYSTEM, Context
from .examples import CREATE_ORDER


@dataclass(frozen=True)
class Cleanup:
    """What the clean-up did and what it found left: `remaining` is ("Type", "id", "why") triples."""

    attempted: bool
    deleted: int = 0
    remaining: tuple[tuple[str, str, str], ...] = ()
    problems: tuple[str, ...] = ()
    searched: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        by_type: dict[str, int] = {}
        for rtype, _, _ in self.remaining:
            by_type[rtype] = by_type.get(rtype, 0) + 1
        return {
            "attempted": self.attempted,
            "deleted": self.deleted,
            "remaining_count": len(self.remaining),
            "remaining_by_type": by_type,
            "remaining": [{"type": t, "id": i, "why": w} for t, i, w in self.remaining],
            "problems": list(self.problems),
            "searched": list(self.searched),
        }


@dataclass
class _State:
    deleted: int = 0
    problems: list[str] = field(default_factory=list)
    why: dict[tuple[str, str], str] = field(default_factory=dict)


def _carries_run(ctx: Context, res: dict[str, Any]) -> bool:
    tags = (res.get("meta") or {}).get("tag") or []
    if any(t.get("system") == RUN_TAG_SYSTEM and t.get("code") == ctx.run_id for t in tags):
        return True
    return any(i.get("system") == ctx.run_system for i in res.get("identifier") or [] if isinstance(i, dict))


def find_run_data(ctx: Context, types: Iterable[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Resources of the run still on the server (by _tag and by identifier system), and notes."""
    found: list[tuple[str, str]] = []
    notes: list[str] = []
    for rtype in types:
        for params in (
            {"_tag": f"{RUN_TAG_SYSTEM}|{ctx.run_id}", "_count": "100"},
            {"identifier": f"{ctx.run_system}|", "_count": "100"},
        ):
            try:
                resp = ctx.request("GET", rtype, params=params)
            except (OSError, KapError) as exc:
                notes.append(f"search {rtype} failed ({type(exc).__name__})")
                continue
            bundle = resp.json()
            if resp.status != 200 or not isinstance(bundle, dict):
                notes.append(f"search {rtype}?{next(iter(params))}=… answered {resp.status}")
                continue
            for e in bundle.get("entry") or []:
                res = (e or {}).get("resource") or {}
                key = (str(res.get("resourceType") or ""), str(res.get("id") or ""))
                if key[0] and key[1] and _carries_run(ctx, res) and key not in found:
                    found.append(key)
    return found, notes


def _still_there(ctx: Context, rtype: str, rid: str) -> bool | None:
    try:
        return ctx.request("GET", f"{rtype}/{rid}").status == 200
    except (OSError, KapError):
        return None


def _delete(ctx: Context, key: tuple[str, str], st: _State) -> None:
    rtype, rid = key
    try:
        resp = ctx.request("DELETE", f"{rtype}/{rid}")
    except (OSError, KapError) as exc:
        st.problems.append(f"{rtype}/{rid}: DELETE failed ({type(exc).__name__})")
        st.why[key] = f"DELETE failed ({type(exc).__name__})"
        return
    if 200 <= resp.status < 300:
        st.deleted += 1
        return
    there = _still_there(ctx, rtype, rid)
    if resp.status in (404, 410) and there is False:
        return  # already gone (deleted by a check, or a conditional create's duplicate id)
    ctx.exercise(rtype, "delete", resp, f"DELETE {rtype}/{rid}")
    st.why[key] = f"DELETE answered {resp.status}"


def clean_up(ctx: Context) -> Cleanup:
    """Delete the run's data (newest first, referencing types before referenced), then report what remains."""
    wrote = {t for t, _ in ctx.created} | set(ctx.needs)
    types = [t for t in CREATE_ORDER if t in wrote] + sorted(wrote - set(CREATE_ORDER))
    st = _State()
    attempted = not ctx.config.keep_data
    if attempted:
        found, _ = find_run_data(ctx, types)
        keys = list(dict.fromkeys([*ctx.created, *found]))
        order = {t: i for i, t in enumerate(CREATE_ORDER)}
        # Reversed before the (stable) sort: newest first within a type.
        for key in sorted(keys[::-1], key=lambda k: -order.get(k[0], -1)):  # noqa: C415 - see above
            _delete(ctx, key, st)
    left, notes = find_run_data(ctx, types)
    kept = "kept (--keep-data)"
    remaining = [
        (t, i, st.why.get((t, i), kept if not attempted else "still found by search")) for t, i in left
    ]
    # What the searches missed (a server that cannot search by _tag or identifier) but a read finds.
    missed = st.why if attempted else dict.fromkeys(ctx.created, kept)
    for key, why in missed.items():
        if key not in left and _still_there(ctx, *key) is not False:
            remaining.append((key[0], key[1], why))
    refused: dict[str, int] = {}
    for why in st.why.values():
        refused[why] = refused.get(why, 0) + 1
    st.problems += [f"{why} for {n} resource(s): not deleted" for why, n in refused.items()]
    ctx.created.clear()
    return Cleanup(
        attempted=attempted,
        deleted=st.deleted,
        remaining=tuple(remaining),
        problems=tuple(st.problems + notes),
        searched=("_tag", "identifier"),
    )
