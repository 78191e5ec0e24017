"""The package's one layer table, keyed on rooms (folders, and the three base modules).

A room may import rooms of lower layers; a room of the same layer only where ALLOWED_SAME_LAYER
draws that arrow (layer 0 rooms may use each other). `requests` only in client/, `flask` only in
bridge/, no IO library in the pure core, and nothing imports an entry point but another one.
Each folder's `__init__` docstring names its layer; the test below keeps those in step with this
table. The checker is shown to fail on a wrong arrow and on an allowance nobody uses.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "fhir_kap"

LAYERS = {
    0: {"errors", "config", "jsonio", "fhir"},  # base
    1: {"records", "validation", "consent"},  # pure core, no IO
    2: {"storage", "client"},  # IO adapters
    3: {"exchange", "conformance", "demo"},  # orchestration
    4: {"bridge", "cli"},  # entry points
}
LAYER_NAMES = {0: "base", 1: "pure core", 2: "IO adapter", 3: "orchestration", 4: "entry point"}
LAYER_OF = {room: layer for layer, rooms in LAYERS.items() for room in rooms}
ALLOWED_SAME_LAYER = {
    ("records", "validation"),  # the pipeline's last step is the profile check
    ("cli", "bridge"),  # `fhir-kap serve`
}
PURE_FORBIDDEN = {
    "requests",
    "flask",
    "sqlite3",
    "psycopg",
    "socket",
    "subprocess",
    "http",
    "urllib.request",
    "gunicorn",
    "threading",
}


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "_generated" not in p.parts)


def room_of(path: Path) -> str:
    """The room a module lives in: its top folder under fhir_kap/, or its own name at the top."""
    first = path.relative_to(PKG).with_suffix("").parts[0]
    return first


@functools.cache
def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported name, line): ours as 'fhir_kap.<room>...', others as their dotted name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel_pkg = list(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = rel_pkg[: len(rel_pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:
                    out += [(f"{mod}.{a.name}", node.lineno) for a in node.names]
                    continue
            else:
                mod = node.module or ""
            out.append((mod, node.lineno))
    return out


def arrows(path: Path, me: str) -> list[tuple[str, int]]:
    """(room imported, line) for every import of another room of ours."""
    found = []
    for name, line in _imports(path):
        parts = name.split(".")
        if parts[0] == "fhir_kap" and len(parts) > 1 and parts[1] in LAYER_OF and parts[1] != me:
            found.append((parts[1], line))
    return found


def violations(path: Path, me: str) -> list[str]:
    my_layer = LAYER_OF[me]
    wrong = []
    for name, line in _imports(path):
        parts = name.split(".")
        if parts[0] == "fhir_kap":
            if len(parts) == 1 or parts[1] == "__init__":
                wrong.append(f"line {line}: imports the package root")
        else:
            if parts[0] == "requests" and me != "client":
                wrong.append(f"line {line}: only client/ may import requests")
            if parts[0] == "flask" and me != "bridge":
                wrong.append(f"line {line}: only bridge/ may import flask")
            if my_layer <= 1 and (name in PURE_FORBIDDEN or parts[0] in PURE_FORBIDDEN):
                wrong.append(f"line {line}: pure core room '{me}' imports IO library '{name}'")
    for other, line in arrows(path, me):
        theirs = LAYER_OF[other]
        same_ok = my_layer == 0 or (me, other) in ALLOWED_SAME_LAYER
        if theirs > my_layer or (theirs == my_layer and not same_ok):
            wrong.append(f"line {line}: layer {my_layer} '{me}' imports layer {theirs} '{other}'")
    return wrong


def test_every_module_lives_in_a_room_with_a_layer():
    unknown = {room_of(p) for p in _modules()} - set(LAYER_OF) - {"__init__", "py"}
    assert not unknown, f"add these rooms to LAYERS: {sorted(unknown)}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_follow_the_layers(path: Path):
    me = room_of(path)
    if me not in ("__init__", "py"):  # the package root may gather the public API from any room
        assert not violations(path, me), "\n".join(violations(path, me))


def unused_allowances(allowed: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """The same-layer arrows in `allowed` that no module imports along."""
    used = {
        (room_of(p), other)
        for p in _modules()
        if room_of(p) in LAYER_OF
        for other, _line in arrows(p, room_of(p))
    }
    return allowed - used


def test_every_allowed_same_layer_arrow_is_used():
    unused = unused_allowances(ALLOWED_SAME_LAYER)
    assert not unused, f"drop these allowances, nothing imports along them: {sorted(unused)}"


@pytest.mark.parametrize("room", sorted(r for r in LAYER_OF if (PKG / r).is_dir()))
def test_each_folder_declares_the_layer_of_this_table(room: str):
    doc = ast.get_docstring(ast.parse((PKG / room / "__init__.py").read_text())) or ""
    found = re.search(r"\(layer (\d)", doc)
    assert found, f"fhir_kap/{room}/__init__.py should say '(layer N, ...)' in its docstring"
    assert int(found.group(1)) == LAYER_OF[room], f"{room}: docstring says layer {found.group(1)}"
    assert LAYER_NAMES[LAYER_OF[room]] in doc, (
        f"{room}: docstring should name '{LAYER_NAMES[LAYER_OF[room]]}'"
    )


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_each_module_docstring_names_its_room_and_layer(path: Path):
    """A reader opening any module sees where it lives and what it may touch."""
    room = room_of(path)
    if room in ("__init__", "py"):
        return
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    named = f"{room}/" in doc if (PKG / room).is_dir() else f"Room: {room}" in doc
    assert named or path.name == "__init__.py", (
        f"{path.relative_to(PKG)}: the opening docstring should name its room ({room})"
    )
    assert f"layer {LAYER_OF[room]}" in doc, (
        f"{path.relative_to(PKG)}: the docstring should say 'layer {LAYER_OF[room]}'"
    )


def test_checker_catches_a_wrong_arrow():
    """The checker itself must be able to fail: a pure-core module importing client and requests."""
    probe = PKG / "consent" / "_layering_probe.py"
    probe.write_text("from ..client import FhirClient\nimport requests\nfrom ..bridge import app\n")
    try:
        found = violations(probe, "consent")
    finally:
        probe.unlink()
    assert any("imports layer 2 'client'" in v for v in found)
    assert any("imports layer 4 'bridge'" in v for v in found)
    assert any("only client/ may import requests" in v for v in found)


def test_checker_catches_an_allowance_nobody_uses():
    assert unused_allowances(ALLOWED_SAME_LAYER | {("client", "storage")}) == {("client", "storage")}
