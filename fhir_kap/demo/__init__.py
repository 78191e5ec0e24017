"""`fhir-kap demo` (layer 3, orchestration): the KAP journey played against a local SEKMET
FHIR server (`testserver`), which the system tests use too.

May import layers 0-2 (it drives `fhir-kap` itself in subprocesses).
"""
