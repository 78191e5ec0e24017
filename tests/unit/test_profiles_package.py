"""The KAP FHIR package: package.json, .index.json and the conformance resources agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fhir_kap.config import CANONICAL, CS

PROFILES = Path(__file__).resolve().parents[2] / "profiles"
RESOURCES = sorted(
    p
    for p in PROFILES.glob("*-*.json")
    if p.name.split("-")[0] in ("StructureDefinition", "CodeSystem", "ValueSet")
)


def test_index_lists_every_conformance_resource() -> None:
    index = json.loads((PROFILES / ".index.json").read_text())
    assert index["index-version"] == 1
    assert sorted(f["filename"] for f in index["files"]) == sorted(p.name for p in RESOURCES)


def test_package_manifest_pins_r4_core() -> None:
    pkg = json.loads((PROFILES / "package.json").read_text())
    assert pkg["fhirVersions"] == ["4.0.1"] and pkg["dependencies"] == {"hl7.fhir.r4.core": "4.0.1"}


@pytest.mark.parametrize("path", RESOURCES, ids=lambda p: p.name)
def test_resource_url_matches_its_file_name_and_canonical(path: Path) -> None:
    res = json.loads(path.read_text())
    assert path.name == f"{res['resourceType']}-{res['id']}.json"
    assert res["url"] == f"{CANONICAL}/{res['resourceType']}/{res['id']}"


def test_code_system_urls_match_config() -> None:
    urls = {json.loads(p.read_text())["url"] for p in PROFILES.glob("CodeSystem-*.json")}
    assert {CS.INFO_CATEGORY, CS.COLLAB_MODEL, CS.SESSION_KIND, CS.CLEARANCE, CS.READINESS} == urls
