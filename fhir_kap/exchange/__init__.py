"""Moving resources between systems (layer 3, orchestration): `outbound` (record -> consent
gate -> outbox), `delivery` (outbox -> a partner's FHIR server), `inbound` (a partner's write
-> checks -> store, applying the rules in `inbound_rules`) and `webhooks` (rest-hook notifications).

May import layers 0-2.
"""
