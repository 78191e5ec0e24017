"""The public API is chosen on purpose and pinned: a change to it is a deliberate change to this list."""

import subprocess
import sys
from pathlib import Path

import fhir_kap

EXPECTED = {
    "__version__",
    # settings and the FHIR release
    "Release",
    "Settings",
    "EndpointConfig",
    "load_settings",
    # the one error root, rendered as OperationOutcome
    "Issue",
    "KapError",
    "InputError",
    "MappingError",
    "ProfileError",
    "ServerError",
    "operation_outcome",
    # pure core
    "Pipeline",
    "Mapper",
    "Validator",
    "ConsentGate",
    "Recipient",
    # IO adapters
    "Database",
    "Outbox",
    "AuditLog",
    "FhirClient",
    "NoAuth",
    "BearerAuth",
    "SmartBackendAuth",
    "RetryPolicy",
    # orchestration and entry points
    "DeliveryWorker",
    "CheckConfig",
    "run_checks",
    "BridgeOptions",
    "create_app",
}


def test_exported_members_are_pinned():
    assert set(fhir_kap.__all__) == EXPECTED


def test_every_export_exists_and_is_what_its_room_defines():
    for name in fhir_kap.__all__:
        assert getattr(fhir_kap, name) is not None, name
    from fhir_kap.client import FhirClient
    from fhir_kap.validation import Validator

    assert fhir_kap.FhirClient is FhirClient and fhir_kap.Validator is Validator


def test_an_unknown_name_is_an_attribute_error():
    try:
        fhir_kap.Nope  # noqa: B018 - the attribute access is the test
    except AttributeError as exc:
        assert "Nope" in str(exc)
    else:
        raise AssertionError("fhir_kap.Nope should not exist")


def test_importing_the_package_loads_no_room():
    """The exports are lazy: `import fhir_kap` (every CLI start) pulls in none of the rooms."""
    code = "import sys, fhir_kap; print(sorted(m for m in sys.modules if m.startswith('fhir_kap.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_package_is_typed():
    assert (Path(fhir_kap.__file__).parent / "py.typed").exists()


def test_the_typed_imports_name_exactly_the_lazy_exports_and_their_rooms():
    """`_EXPORTS` (what is loaded) and the TYPE_CHECKING imports (what mypy sees) are one list in two
    forms: each name comes from the same room in both."""
    import ast

    tree = ast.parse(Path(fhir_kap.__file__).read_text())
    block = next(
        n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING"
    )
    typed = {
        a.name: node.module for node in block.body if isinstance(node, ast.ImportFrom) for a in node.names
    }
    assert typed == fhir_kap._EXPORTS
