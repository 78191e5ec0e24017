"""The package's layering, read from the source with `ast` (see fhir_kap/__init__.py).

A module may import modules of lower layers; same-layer imports only where ALLOWED_SAME_LAYER
says so. `requests` only in client, `flask` only in bridge/, and no IO library in the pure core.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "fhir_kap"

LAYERS = {
    0: {"errors", "config", "fhirmodel", "jsonio", "textscan", "identifiers"},
    1: {"inputs", "transforms", "mapping", "profiles", "consent", "reports", "_generated"},
    2: {"client", "outbox", "store", "notify", "db", "auditlog", "partners", "testserver"},
    3: {"pipeline", "outbound", "delivery", "inbound", "conformance", "demo"},
    4: {"bridge", "cli"},
}
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}
ALLOWED_SAME_LAYER = {
    ("mapping", "transforms"), ("profiles", "_generated"),
    ("outbox", "db"), ("auditlog", "db"), ("store", "db"), ("partners", "db"), ("notify", "db"),
    ("outbound", "pipeline"), ("inbound", "pipeline"), ("inbound", "outbound"), ("demo", "outbound"),
    ("demo", "delivery"), ("demo", "inbound"), ("cli", "bridge"),
}
PURE_FORBIDDEN = {"requests", "flask", "sqlite3", "psycopg", "socket", "subprocess", "http",
                  "urllib.request", "gunicorn", "threading"}


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "_generated" not in p.parts)


def _top(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    first = rel.parts[0]
    return "__init__" if first == "__init__" else first


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported name, line): ours as 'fhir_kap.<top>', others as their dotted name."""
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


def test_every_module_has_a_layer():
    unknown = {_top(p) for p in _modules()} - set(LAYER_OF) - {"__init__", "py"}
    assert not unknown, f"add these modules to LAYERS: {sorted(unknown)}"


def violations(path: Path, me: str) -> list[str]:
    my_layer = LAYER_OF[me]
    wrong = []
    for name, line in _imports(path):
        parts = name.split(".")
        if parts[0] == "fhir_kap":
            if len(parts) == 1 or parts[1] == "__init__":
                wrong.append(f"line {line}: imports the package root")
                continue
            other = parts[1]
            if other == me or other not in LAYER_OF:
                continue
            theirs = LAYER_OF[other]
            same_ok = my_layer == 0 or (me, other) in ALLOWED_SAME_LAYER
            if theirs > my_layer or (theirs == my_layer and not same_ok):
                wrong.append(f"line {line}: layer {my_layer} '{me}' imports layer {theirs} '{other}'")
        else:
            if parts[0] == "requests" and me != "client":
                wrong.append(f"line {line}: only client may import requests")
            if parts[0] == "flask" and me != "bridge":
                wrong.append(f"line {line}: only bridge/ may import flask")
            if my_layer <= 1 and (name in PURE_FORBIDDEN or parts[0] in PURE_FORBIDDEN):
                wrong.append(f"line {line}: pure core module imports IO library '{name}'")
    return wrong


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_follow_the_layers(path: Path):
    me = _top(path)
    if me != "__init__":
        assert not violations(path, me), "\n".join(violations(path, me))


def test_checker_catches_a_wrong_arrow():
    """The checker itself must be able to fail: a pure-core module importing client and requests."""
    probe = PKG / "consent" / "_layering_probe.py"
    probe.parent.mkdir(exist_ok=True)
    probe.write_text("from ..client import FhirClient\nimport requests\n")
    try:
        found = violations(probe, "consent")
    finally:
        probe.unlink()
    assert any("imports layer 2 'client'" in v for v in found)
    assert any("only client may import requests" in v for v in found)
