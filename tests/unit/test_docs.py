"""The documentation holds together: a short README, its set-up commands up front, no broken links.

Checks README.md, CONTRIBUTING.md, CHANGELOG.md and every docs/**/*.md page: each relative link
names a file that exists, each `#anchor` a heading of that file (GitHub's slugs), and every docs
page can be reached by following links from README.md. The checker is shown to fail on a broken
file link and on a broken anchor.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_LIMIT = 10_240  # bytes
SETUP_COMMANDS = (
    ".ci/bootstrap demo && .venv/bin/fhir-kap demo",
    ".ci/run",
)

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def doc_files(root: Path = ROOT) -> list[Path]:
    """The Markdown files whose links are checked."""
    top = [root / name for name in ("README.md", "CONTRIBUTING.md", "CHANGELOG.md")]
    return [p for p in top if p.exists()] + sorted((root / "docs").rglob("*.md"))


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation dropped, spaces to '-'.

    >>> slug("Checking a FHIR server: `fhir-kap check`")
    'checking-a-fhir-server-fhir-kap-check'
    """
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub gives the headings of `path` (repeats get -1, -2, ...)."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    """The link targets in `path`'s prose (not in code blocks or inline code)."""
    found: list[str] = []
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        line = _INLINE_CODE.sub("", line)
        found += [m.group(1) for m in _LINK.finditer(line)]
    return found


def _is_external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.\-]*:", target, re.I))


def resolve(path: Path, target: str) -> tuple[Path, str]:
    """(file, anchor) a relative link from `path` points at; the anchor may be ''."""
    file_part, _, anchor = target.partition("#")
    dest = path if not file_part else (path.parent / file_part).resolve()
    return dest, anchor


def broken_links(files: list[Path], root: Path = ROOT) -> list[str]:
    """One line per relative link whose file or heading does not exist."""
    problems: list[str] = []
    for path in files:
        for target in links(path):
            if _is_external(target):
                continue
            dest, anchor = resolve(path, target)
            where = f"{path.relative_to(root)}: ({target})"
            if not dest.exists():
                problems.append(
                    f"{where}: no file {dest.relative_to(root) if dest.is_relative_to(root) else dest}"
                )
            elif anchor and (dest.is_dir() or dest.suffix != ".md" or anchor not in anchors(dest)):
                problems.append(f"{where}: no heading #{anchor}")
    return problems


def unreachable(root: Path = ROOT) -> list[str]:
    """docs/**/*.md pages that no chain of links from README.md (or docs/README.md) reaches."""
    start = [p for p in (root / "README.md", root / "docs" / "README.md") if p.exists()]
    seen: set[Path] = set()
    todo = [p.resolve() for p in start]
    while todo:
        page = todo.pop()
        if page in seen:
            continue
        seen.add(page)
        for target in links(page):
            if _is_external(target):
                continue
            dest, _ = resolve(page, target)
            if dest.suffix == ".md" and dest.is_file():
                todo.append(dest)
    return sorted(str(p.relative_to(root)) for p in (root / "docs").rglob("*.md") if p.resolve() not in seen)


def test_readme_is_at_most_10_kb():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; move sections into docs/"


@pytest.mark.parametrize("command", SETUP_COMMANDS)
def test_readme_shows_each_setup_command_in_its_first_screen(command):
    first = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:40]
    assert any(command in line for line in first), f"{command!r} is not in README.md's first 40 lines"


def test_every_relative_link_and_anchor_in_the_docs_exists():
    assert broken_links(doc_files()) == []


def test_every_docs_page_is_reachable_from_the_readme():
    assert unreachable() == []


def test_the_docs_have_the_pages_the_readme_promises():
    for page in (
        "README.md",
        "architecture.md",
        "records-and-mapping.md",
        "validation.md",
        "consent.md",
        "client.md",
        "performance.md",
        "operations/settings.md",
        "operations/delivery.md",
        "operations/bridge.md",
        "operations/smart.md",
        "operations/notifications.md",
        "operations/durability.md",
        "operations/check.md",
    ):
        assert (ROOT / "docs" / page).is_file(), page


def test_link_checker_fails_on_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        "# Top\n\n[ok](docs/a.md#the-title) [gone](docs/missing.md) [bad anchor](docs/a.md#nope)\n"
        "[here](#top) [web](https://example.org/x.md) `[code](not/checked.md)`\n"
        "```\n[fenced](not/checked/either.md)\n```\n"
    )
    (tmp_path / "docs" / "a.md").write_text("# The *title*\n\n[back](../README.md#top)\n")
    (tmp_path / "docs" / "orphan.md").write_text("# Nobody links here\n")
    problems = broken_links(doc_files(tmp_path), tmp_path)
    assert problems == [
        "README.md: (docs/missing.md): no file docs/missing.md",
        "README.md: (docs/a.md#nope): no heading #nope",
    ]
    assert unreachable(tmp_path) == ["docs/orphan.md"]


@pytest.mark.parametrize(
    "heading, expected",
    [
        ("Set-up on a fresh machine: two commands", "set-up-on-a-fresh-machine-two-commands"),
        ("FHIR client (`fhir_kap.client`)", "fhir-client-fhir_kapclient"),
        ("Writes, durability and throughput", "writes-durability-and-throughput"),
        ("Who decides consent: consent authorities", "who-decides-consent-consent-authorities"),
        ("R4 → R5", "r4--r5"),
    ],
)
def test_slugs_follow_github(heading, expected):
    assert slug(heading) == expected
