"""The KAP example instances a run creates, and the manifest of invalid ones `$validate` must
reject (conformance/, layer 3: orchestration; reads files, imports base only).

Valid examples come from `profiles/examples/<r4|r5>` (or `CheckConfig.examples_dir`), sorted in
creation order so every reference points at something already created; invalid ones are listed
with their reason and rule in `profiles/examples/invalid/manifest.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import jsonio
from ..errors import ConfigError

# Creation order so that every reference points at something already created.
CREATE_ORDER = (
    "Organization",
    "Practitioner",
    "PractitionerRole",
    "Patient",
    "Consent",
    "ServiceRequest",
    "Procedure",
    "Communication",
)


def load_examples(directory: Path) -> list[dict[str, Any]]:
    """The KAP example instances in `directory`, in creation order (referenced ones first)."""
    if not directory.is_dir():
        raise ConfigError(f"KAP examples folder '{directory}' not found", rule="check:examples")
    docs = []
    for path in sorted(directory.glob("*.json")):
        doc = jsonio.loads(path.read_bytes(), source=path.name)
        if isinstance(doc, dict) and doc.get("resourceType") in CREATE_ORDER:
            docs.append(doc)
    if not docs:
        raise ConfigError(f"No KAP example instances in '{directory}'", rule="check:examples")
    return sorted(docs, key=lambda d: CREATE_ORDER.index(d["resourceType"]))


def load_invalid_examples(directory: Path) -> list[dict[str, Any]]:
    """The manifest of invalid instances (`manifest.json`), each item with its `resource` loaded."""
    manifest = directory / "manifest.json"
    if not manifest.is_file():
        raise ConfigError(f"Invalid-examples manifest '{manifest}' not found", rule="check:examples")
    items = jsonio.loads(manifest.read_bytes(), source=manifest.name)
    out = []
    for item in items:
        item = dict(item)
        item["resource"] = jsonio.loads((directory / item["file"]).read_bytes(), source=item["file"])
        out.append(item)
    return out
