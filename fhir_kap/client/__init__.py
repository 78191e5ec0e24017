"""The FHIR REST client (layer 2, IO adapter: the only `requests` user).

`FhirClient` with its auth schemes (none, bearer, SMART backend services), the server's
CapabilityStatement, retries of idempotent requests and the Bundle helpers delivery uses.
Modules: `client` (FhirClient, RetryPolicy, the request and retry loop), `auth` (the three
schemes, SMART tokens), `capabilities` (the CapabilityStatement read), `bundles` (transaction
Bundles, conditions, write results), `answers` (JSON bodies and statuses as ServerError).

May import layers 0-1.
"""

from __future__ import annotations

from .auth import JWT_BEARER, Auth, BearerAuth, NoAuth, SmartBackendAuth
from .bundles import WriteResult, entry_results, identifier_query, token_query, transaction_bundle
from .capabilities import Capabilities, parse_capabilities
from .client import FhirClient, RetryPolicy

__all__ = [
    "JWT_BEARER",
    "Auth",
    "BearerAuth",
    "Capabilities",
    "FhirClient",
    "NoAuth",
    "RetryPolicy",
    "SmartBackendAuth",
    "WriteResult",
    "entry_results",
    "identifier_query",
    "parse_capabilities",
    "token_query",
    "transaction_bundle",
]
