"""The conformance checks, one module per group (conformance/checks/, layer 3: orchestration).

    capability   cap-01 …   what the CapabilityStatement declares
    round_trip   rt-01 …    create, read back, find, update with If-Match, delete
    idempotency  idem-01 …  conditional create, transactions
    search       srch-01 …  the search parameters KAP exchange uses, paging
    errors       err-01 …   bad requests answered 4xx with an OperationOutcome
    validation   val-01 …   $validate accepts the valid example, rejects each invalid one
    security     sec-01 …   tokens refused, credentials not echoed

Each module lists its checks in `CHECKS` (validation: `checks(invalid)`, built from the manifest);
`registry.py` names the modules one by one, in run order. No discovery: a new group is added there.
"""
