"""The FHIR REST client (layer 2, IO adapter: the only `requests` user).

`FhirClient` with its auth schemes (none, bearer, SMART backend services), the server's
CapabilityStatement, retries of idempotent requests and the Bundle helpers delivery uses.

May import layers 0-1.
"""
from __future__ import annotations

from .client import (JWT_BEARER, Auth, BearerAuth, Capabilities, FhirClient, NoAuth, RetryPolicy,
                     SmartBackendAuth, WriteResult, entry_results, identifier_query, parse_capabilities,
                     token_query, transaction_bundle)

__all__ = ["JWT_BEARER", "Auth", "BearerAuth", "Capabilities", "FhirClient", "NoAuth", "RetryPolicy",
           "SmartBackendAuth", "WriteResult", "entry_results", "identifier_query", "parse_capabilities",
           "token_query", "transaction_bundle"]
