"""The public API is small and pinned: a change to it is a deliberate change to this list."""
import fhir_kap

EXPECTED = {
    "__version__", "Release", "Settings", "load_settings", "Issue", "KapError", "InputError",
    "MappingError", "ProfileError", "ServerError", "operation_outcome",
}


def test_exported_members_are_pinned():
    assert set(fhir_kap.__all__) == EXPECTED


def test_every_export_exists():
    for name in fhir_kap.__all__:
        assert hasattr(fhir_kap, name), name


def test_package_is_typed():
    from pathlib import Path
    assert (Path(fhir_kap.__file__).parent / "py.typed").exists()
