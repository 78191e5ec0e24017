"""Render a conformance-check report (the JSON dict of `RunReport.to_dict()`) as text.

Pure functions, data in, text out: a console table, JUnit XML for CI systems and a
self-contained HTML page (inline CSS, no scripts, no external assets). Everything taken from
the report is escaped. All three put failures first (required, then optional), link the spec
rule each check cites, say what to change for each failing check, and say exactly what test
data remains on the server (count, types, ids). The FHIR TestReport is in testreport.py.

JSON report schema (version 1), as written by `fhir-kap check --json`:

    {"report": "fhir-kap-check", "version": 1,
     "server": URL, "fhir_version": str | null (as declared by the server), "auth": "none|bearer|smart",
     "role": "full|clinic|practice-receiver|referral-sender", "read_only": bool,
     "run_system": identifier system of the test data, "run_tag": "system|code" of its meta.tag,
     "started"/"finished": ISO 8601 UTC,
     "passed": bool (every required check passed),
     "data_kept": bool (--keep-data, or something remained), "cleanup_problems": [str],
     "cleanup": {"attempted": bool, "deleted": int, "remaining_count": int,
                 "remaining_by_type": {type: int}, "remaining": [{"type", "id", "why"}],
                 "problems": [str], "searched": ["_tag", "identifier"]},
     "summary": {"total", "pass", "fail", "skip", "required_failed": int},
     "groups": [group names in run order],
     "results": [{"id", "group", "title", "rule", "rule_url": str | null, "fix": str, "required": bool,
                  "outcome": "pass|fail|skip", "reason", "duration_ms",
                  "exchanges": [{"method", "url", "request": {"headers", "body"},
                                 "response": {"status", "headers", "body"}}]}]}

Exchanges are kept for failures only; bodies are masked excerpts of at most 2 KB. `results` are
in run order; the renderers reorder (`failures_first`).

Room: conformance/ (layer 3, orchestration): may import layers 0-2.
"""

from __future__ import annotations

import html
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import unquote

__all__ = ["cleanup_lines", "console_table", "failures_first", "html_report", "junit_xml", "progress_line"]

_LABEL = {"pass": "PASS", "fail": "FAIL", "skip": "SKIP"}


def _clip(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _rank(r: Mapping[str, Any]) -> int:
    if r["outcome"] == "fail":
        return 0 if r["required"] else 1
    return 2


def failures_first(results: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Required failures, then optional failures, then the rest, each in run order."""
    return sorted(results, key=_rank)


def cleanup_lines(report: Mapping[str, Any], *, limit: int | None = None) -> list[str]:
    """What the run left on the server, in words: a verdict line, then one line per type with its ids."""
    c = report.get("cleanup") or {}
    remaining = c.get("remaining") or []
    tag = report.get("run_tag") or report.get("run_system")
    if not remaining:
        if c.get("attempted"):
            return [f"test data: {c.get('deleted', 0)} deleted; a search by the run's tag finds nothing left"]
        return ["test data: none written" if report.get("read_only") else "test data: nothing found"]
    by_type: dict[str, list[str]] = {}
    for item in remaining:
        by_type.setdefault(f"{item['type']} ({item['why']})", []).append(str(item["id"]))
    lines = [f"LEFT ON THE SERVER: {len(remaining)} test resources, tagged {tag}"]
    for kind, ids in by_type.items():
        shown = ids if limit is None else ids[:limit]
        more = f" … and {len(ids) - len(shown)} more" if len(shown) < len(ids) else ""
        lines.append(f"  {kind}: {len(ids)}: {', '.join(shown)}{more}")
    return lines


def progress_line(done: int, total: int, check_id: str, title: str, width: int = 100) -> str:
    """One status line, e.g. `[ 7/35] rt-02 read back without losing data`."""
    return _clip(f"[{done:>{len(str(total))}}/{total}] {check_id} {title}", width)


def console_table(report: Mapping[str, Any], *, reason_width: int = 70) -> str:
    """A readable table: id, group, title, PASS/FAIL/SKIP (`*` marks optional checks), reason."""
    rows = [("ID", "GROUP", "TITLE", "RESULT", "REASON")]
    for r in failures_first(report["results"]):
        label = _LABEL[r["outcome"]] + ("" if r["required"] or r["outcome"] == "pass" else "*")
        rows.append((r["id"], r["group"], _clip(r["title"], 48), label, _clip(r["reason"], reason_width)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(widths[i]) if i < 4 else cell for i, cell in enumerate(row)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 6)
    s = report["summary"]
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines.append("")
    lines.append(
        f"{verdict}: {s['pass']} passed, {s['fail']} failed ({s['required_failed']} required), "
        f"{s['skip']} skipped of {s['total']} — {report['server']} (FHIR {report.get('fhir_version') or '?'})"
    )
    if any(not r["required"] and r["outcome"] == "fail" for r in report["results"]):
        lines.append("* optional check: a failure is reported but does not fail the run")
    failing = failures_first([r for r in report["results"] if r["outcome"] == "fail"])
    if failing:
        lines += ["", "What to change:"]
        for r in failing:
            lines.append(f"  {r['id']}: {r.get('fix') or r['reason']}")
            if r.get("rule_url"):
                lines.append(f"  {' ' * len(r['id'])}  see {r['rule_url']}")
    lines.append("")
    lines += cleanup_lines(report)
    for problem in report.get("cleanup_problems") or []:
        lines.append(f"clean-up: {problem}")
    return "\n".join(lines) + "\n"


def _exchange_text(ex: Mapping[str, Any]) -> str:
    req, resp = ex["request"], ex["response"]
    parts = [f"{ex['method']} {ex['url']}"]
    parts += [f"{k}: {v}" for k, v in (req.get("headers") or {}).items()]
    if req.get("body"):
        parts += ["", req["body"]]
    parts += ["", f"HTTP {resp.get('status')}"]
    parts += [f"{k}: {v}" for k, v in (resp.get("headers") or {}).items()]
    if resp.get("body"):
        parts += ["", resp["body"]]
    return "\n".join(parts)


def junit_xml(report: Mapping[str, Any]) -> str:
    """JUnit XML: one <testsuite> per group, a <testcase> per check, <failure>/<skipped> as usual.

    Optional checks that fail are reported as <skipped> with the failure in the message (and in
    <system-out>), so CI does not go red on them while a reader still sees them.
    """
    root = ET.Element("testsuites", name="fhir-kap check", tests=str(report["summary"]["total"] + 1))
    total_fail = total_skip = 0
    groups = [g for g in report["groups"] if any(r["group"] == g for r in report["results"])]
    groups.sort(key=lambda g: min(_rank(r) for r in report["results"] if r["group"] == g))
    for group in groups:
        results = failures_first([r for r in report["results"] if r["group"] == group])
        suite = ET.SubElement(
            root, "testsuite", name=group, tests=str(len(results)), timestamp=str(report["started"])[:19]
        )
        fails = skips = 0
        seconds = 0.0
        for r in results:
            secs = r.get("duration_ms", 0) / 1000
            seconds += secs
            case = ET.SubElement(
                suite,
                "testcase",
                name=f"{r['id']} {r['title']}",
                classname=f"fhir_kap.check.{group}",
                time=f"{secs:.3f}",
            )
            advice = [f"What to change: {r['fix']}"] if r.get("fix") else []
            advice += [f"Spec: {r['rule_url']}"] if r.get("rule_url") else []
            if r["outcome"] == "fail" and r["required"]:
                fails += 1
                el = ET.SubElement(case, "failure", message=r["reason"], type=r["rule"])
                el.text = "\n\n".join(
                    [r["reason"], *advice] + [_exchange_text(x) for x in r.get("exchanges") or []]
                )
            elif r["outcome"] == "fail":
                skips += 1
                ET.SubElement(case, "skipped", message=f"optional check failed: {r['reason']}")
                out = ET.SubElement(case, "system-out")
                out.text = "\n\n".join(
                    [r["reason"], *advice] + [_exchange_text(x) for x in r.get("exchanges") or []]
                )
            elif r["outcome"] == "skip":
                skips += 1
                ET.SubElement(case, "skipped", message=r["reason"])
            else:
                out = ET.SubElement(case, "system-out")
                out.text = r["reason"]
        suite.set("failures", str(fails))
        suite.set("errors", "0")
        suite.set("skipped", str(skips))
        suite.set("time", f"{seconds:.3f}")
        total_fail += fails
        total_skip += skips
    root.set("failures", str(total_fail))
    root.set("errors", "0")
    root.set("skipped", str(total_skip + (1 if (report.get("cleanup") or {}).get("remaining") else 0)))
    _junit_cleanup(root, report)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _junit_cleanup(root: ET.Element, report: Mapping[str, Any]) -> None:
    """The clean-up as properties of the run and a `cleanup` suite (skipped when data remains)."""
    c = report.get("cleanup") or {}
    props = ET.Element("properties")
    for name, value in (
        ("role", report.get("role", "full")),
        ("read_only", str(bool(report.get("read_only"))).lower()),
        ("run_tag", report.get("run_tag", "")),
        ("cleanup.remaining_count", str(c.get("remaining_count", 0))),
        ("cleanup.remaining", " ".join(f"{i['type']}/{i['id']}" for i in c.get("remaining") or [])),
    ):
        ET.SubElement(props, "property", name=name, value=str(value))
    root.insert(0, props)
    suite = ET.SubElement(root, "testsuite", name="cleanup", tests="1", failures="0", errors="0")
    case = ET.SubElement(
        suite, "testcase", name="test data removed", classname="fhir_kap.check.cleanup", time="0"
    )
    text = "\n".join(cleanup_lines(report))
    if c.get("remaining"):
        suite.set("skipped", "1")
        ET.SubElement(case, "skipped", message=cleanup_lines(report)[0])
    else:
        suite.set("skipped", "0")
    ET.SubElement(case, "system-out").text = text


_CSS = """
:root{--pass:#1a7f37;--fail:#cf222e;--skip:#9a6700;--opt:#bc4c00;--ink:#1f2328;--mute:#59636e;--line:#d1d9e0}
*{box-sizing:border-box}body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--ink);
margin:0;background:#f6f8fa}main{max-width:1300px;margin:0 auto;padding:16px 24px}
header{background:#fff;border:1px solid var(--line);border-radius:10px;padding:20px 24px;margin-bottom:20px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:0}.meta{color:var(--mute);font-size:13px}
.verdict{display:inline-block;font-weight:700;padding:2px 10px;border-radius:999px;color:#fff;margin-left:8px;font-size:14px}
.verdict.ok{background:var(--pass)}.verdict.bad{background:var(--fail)}
.counts{display:flex;gap:12px;margin-top:16px;flex-wrap:wrap}
.count{flex:1;min-width:120px;border:1px solid var(--line);border-radius:8px;padding:10px 14px;background:#fff}
.count b{display:block;font-size:26px}.count.pass b{color:var(--pass)}.count.fail b{color:var(--fail)}
.count.skip b{color:var(--skip)}.count.req b{color:var(--fail)}
section{background:#fff;border:1px solid var(--line);border-radius:10px;margin-bottom:16px;overflow:hidden}
section>h2{padding:12px 18px;border-bottom:1px solid var(--line);background:#fbfcfd;display:flex;gap:10px;align-items:center}
section>h2 small{color:var(--mute);font-weight:400;font-size:13px}
table{border-collapse:collapse;width:100%;table-layout:fixed}
th:nth-child(1){width:90px}th:nth-child(2){width:34%}th:nth-child(3){width:120px}td,th{padding:8px 12px;border-bottom:1px solid #eef1f4;text-align:left;vertical-align:top}
th{font-size:12px;text-transform:uppercase;color:var(--mute);font-weight:600}
td.id{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;white-space:nowrap}
.badge{font-weight:700;font-size:12px;padding:2px 8px;border-radius:4px;color:#fff;white-space:nowrap}
.badge.pass{background:var(--pass)}.badge.fail{background:var(--fail)}.badge.skip{background:var(--skip)}
.badge.optfail{background:var(--opt)}
.rule{color:var(--mute);font-size:12px}.reason{word-break:break-word}
details{margin-top:6px}summary{cursor:pointer;color:#0969da;font-size:13px}
pre{background:#f6f8fa;border:1px solid var(--line);border-radius:6px;padding:10px;font-size:12px;
white-space:pre-wrap;word-break:break-all;max-height:420px;overflow:auto}
footer{color:var(--mute);font-size:12px;text-align:center;padding:12px}
#failures{border-color:var(--fail)}#failures ol{margin:0;padding:8px 18px 8px 40px}
#failures li{padding:3px 0;font-size:14px;border-bottom:1px solid #eef1f4}#failures li:last-child{border-bottom:0}
#failures .reason{color:var(--ink)}.fix{color:#0a3069;font-size:13px;margin-top:2px}
.fix::before{content:"→ ";color:var(--fail);font-weight:700}
#cleanup.left{border-color:var(--opt)}#cleanup.left h2{color:var(--opt)}#cleanup.clean h2{font-weight:400}
a{color:#0969da}.rule a{color:var(--mute)}
"""


def _rule_html(r: Mapping[str, Any]) -> str:
    e = html.escape
    url = r.get("rule_url")
    return f'<a href="{e(url)}" rel="noreferrer">{e(r["rule"])}</a>' if url else e(r["rule"])


def _failures_html(report: Mapping[str, Any]) -> list[str]:
    e = html.escape
    failing = failures_first([r for r in report["results"] if r["outcome"] == "fail"])
    if not failing:
        return []
    out = [f'<section id="failures"><h2>Fix these first <small>{len(failing)} failed</small></h2><ol>']
    for r in failing:
        cls = "fail" if r["required"] else "optfail"
        label = "FAIL" if r["required"] else "FAIL (optional)"
        out.append(
            f'<li class="failure" data-check="{e(r["id"])}"><span class="badge {cls}">{label}</span> '
            f'<a class="id" href="#check-{e(r["id"])}">{e(r["id"])}</a> <b>{e(r["title"])}</b>: '
            f'<span class="reason">{e(_clip(r["reason"], 160))}</span>'
            f'<div class="fix">{"What to change: " + e(r["fix"]) + " · " if r.get("fix") else ""}'
            f'<span class="rule">{_rule_html(r)}</span></div></li>'
        )
    out.append("</ol></section>")
    return out


def _cleanup_html(report: Mapping[str, Any]) -> list[str]:
    e = html.escape
    c = report.get("cleanup") or {}
    remaining = c.get("remaining") or []
    lines = cleanup_lines(report)
    if not remaining:
        return [
            f'<section id="cleanup" class="clean"><h2>Test data <small>{e(lines[0])}</small></h2></section>'
        ]
    out = [
        f'<section id="cleanup" class="left"><h2>Test data left on the server '
        f'<small data-remaining="{len(remaining)}">{len(remaining)} resources, tagged '
        f"{e(str(report.get('run_tag') or report['run_system']))}</small></h2>",
        "<table><thead><tr><th>Type</th><th>Id</th><th>Why</th></tr></thead><tbody>",
    ]
    for item in remaining:
        out.append(
            f'<tr class="remaining"><td>{e(str(item["type"]))}</td><td class="id">{e(str(item["id"]))}</td>'
            f"<td>{e(str(item['why']))}</td></tr>"
        )
    out.append("</tbody></table></section>")
    return out


def html_report(report: Mapping[str, Any]) -> str:
    """A self-contained HTML page: summary counts, the failures with what to change, what data
    remains, then per-group tables (failures first) with failing exchanges in <details>."""
    e = html.escape
    s = report["summary"]
    ok = report["passed"]
    role = f" · role {e(str(report['role']))}" if report.get("role") else ""
    role += " · read-only" if report.get("read_only") else ""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>fhir-kap check — {e(str(report['server']))}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        "<header>",
        f'<h1>FHIR server check<span class="verdict {"ok" if ok else "bad"}" id="verdict">'
        f"{'PASSED' if ok else 'FAILED'}</span></h1>",
        f'<div class="meta">{e(str(report["server"]))} · FHIR {e(str(report.get("fhir_version") or "?"))}'
        f" · auth {e(str(report['auth']))}{role} · {e(str(report['started']))} → {e(str(report['finished']))}</div>",
        '<div class="counts" id="summary">',
        f'<div class="count total"><b data-count="total">{s["total"]}</b>checks</div>',
        f'<div class="count pass"><b data-count="pass">{s["pass"]}</b>passed</div>',
        f'<div class="count fail"><b data-count="fail">{s["fail"]}</b>failed</div>',
        f'<div class="count req"><b data-count="required_failed">{s["required_failed"]}</b>required failed</div>',
        f'<div class="count skip"><b data-count="skip">{s["skip"]}</b>skipped</div>',
        "</div></header>",
        *_failures_html(report),
        *_cleanup_html(report),
    ]
    groups = [g for g in report["groups"] if any(r["group"] == g for r in report["results"])]
    groups.sort(key=lambda g: min(_rank(r) for r in report["results"] if r["group"] == g))
    for group in groups:
        results = failures_first([r for r in report["results"] if r["group"] == group])
        counts = {k: sum(1 for r in results if r["outcome"] == k) for k in ("pass", "fail", "skip")}
        out.append(
            f'<section id="group-{e(group)}"><h2>{e(group)} <small>{counts["pass"]} passed · '
            f"{counts['fail']} failed · {counts['skip']} skipped</small></h2>"
        )
        out.append(
            "<table><thead><tr><th>ID</th><th>Check</th><th>Result</th><th>Reason</th></tr></thead><tbody>"
        )
        for r in results:
            cls = r["outcome"] if r["required"] or r["outcome"] != "fail" else "optfail"
            label = _LABEL[r["outcome"]] + ("" if cls != "optfail" else " (optional)")
            fix = (
                f'<div class="fix">What to change: {e(r["fix"])}</div>'
                if r["outcome"] == "fail" and r.get("fix")
                else ""
            )
            out.append(
                f'<tr class="result {e(r["outcome"])}" data-outcome="{e(r["outcome"])}" id="check-{e(r["id"])}">'
                f'<td class="id">{e(r["id"])}</td>'
                f'<td>{e(r["title"])}<div class="rule">{_rule_html(r)}'
                f"{'' if r['required'] else ' · optional'}</div></td>"
                f'<td><span class="badge {cls}">{e(label)}</span></td><td class="reason">{e(r["reason"])}{fix}'
            )
            for n, ex in enumerate(r.get("exchanges") or [], start=1):
                out.append(
                    f"<details><summary>exchange {n}: {e(ex['method'])} {e(unquote(ex['url']))} → "
                    f"{e(str(ex['response'].get('status')))}</summary><pre>{e(_exchange_text(ex))}</pre></details>"
                )
            out.append("</td></tr>")
        out.append("</tbody></table></section>")
    footer = f"Test data under {e(str(report['run_system']))}"
    footer += " (kept)" if report.get("data_kept") else " (removed)"
    for problem in report.get("cleanup_problems") or []:
        footer += f" · clean-up: {e(problem)}"
    out.append(f"<footer>{footer} · generated by fhir-kap check</footer></main></body></html>")
    return "\n".join(out) + "\n"


def results_by_group(report: Mapping[str, Any]) -> dict[str, Sequence[Mapping[str, Any]]]:
    """Results grouped in report order (a convenience for other renderers)."""
    return {g: [r for r in report["results"] if r["group"] == g] for g in report["groups"]}
