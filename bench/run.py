"""Run every fhir-kap benchmark and print one table; write bench/results.json.

    python bench/run.py            # everything, about 70 s on 2 cores
    python bench/run.py --quick    # smaller counts (CI smoke run)
    python bench/run.py --only mapping consent

Each row is a figure beside its same-run baseline: ratio = value / baseline, and the target
(where the issue sets one) is checked against that ratio, never against absolute numbers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

SUITES = ["mapping", "validation", "consent", "bridge", "client", "delivery", "bulk", "cli", "console"]


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 1:
        return f"{v:,.2f}"
    return f"{v:.4g}"


def check_target(row: dict) -> str:
    """'ok' / 'MISSED' / '' for a row with a target like {"ratio_min": 5} or {"ratio_max": 4}."""
    target = row.get("target") or {}
    ratio = row.get("ratio")
    if not target or ratio is None:
        return ""
    if "ratio_min" in target and ratio < target["ratio_min"]:
        return "MISSED"
    if "ratio_max" in target and ratio > target["ratio_max"]:
        return "MISSED"
    return "ok"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", choices=SUITES)
    ap.add_argument("--out", default=str(HERE / "results.json"))
    args = ap.parse_args(argv)
    rows: list[dict] = []
    started = time.monotonic()
    for name in args.only or SUITES:
        print(f"[{time.monotonic() - started:6.1f}s] running {name} ...", file=sys.stderr, flush=True)
        try:
            module = importlib.import_module(f"bench_{name}")
            got = module.run(quick=args.quick)
        except Exception as exc:  # noqa: BLE001 - a broken suite is reported, the others still run
            got = [{"name": f"{name}: FAILED ({type(exc).__name__}: {exc})", "value": None}]
        for row in got:
            row.setdefault("suite", name)
            if row.get("value") is not None and row.get("baseline"):
                row["ratio"] = row["value"] / row["baseline"]
            row["verdict"] = check_target(row)
            rows.append(row)
    elapsed = time.monotonic() - started
    header = ("suite", "figure", "value", "unit", "baseline", "baseline value", "ratio", "target")
    table = [header]
    for r in rows:
        tgt = r.get("target") or {}
        tdesc = ", ".join(f"{'≥' if k == 'ratio_min' else '≤'}{v}×" for k, v in tgt.items())
        table.append(
            (
                r["suite"],
                r["name"],
                _fmt(r.get("value")),
                r.get("unit", ""),
                r.get("baseline_name", ""),
                _fmt(r.get("baseline")),
                f"{r['ratio']:.2f}×" if r.get("ratio") is not None else "-",
                f"{tdesc} {r['verdict']}".strip(),
            )
        )
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(
        f"\n{len(rows)} figures in {elapsed:.0f}s on {platform.python_implementation()} "
        f"{platform.python_version()}, {platform.machine()}"
    )
    Path(args.out).write_text(json.dumps({"elapsed_s": elapsed, "quick": args.quick, "rows": rows}, indent=2))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
