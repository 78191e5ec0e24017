"""Helpers shared by the test tiers (not tests themselves): the bridge builder, the faulty
FHIR server, the group-commit table. Fixtures live in tests/conftest.py."""
