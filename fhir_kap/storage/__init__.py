"""Everything kept on disk (layer 2, IO adapter): the database (SQLite or PostgreSQL), the
leased job queue, the FHIR store and its search, the outbox, the consent context, the audit
log, partners and the webhook jobs.

May import layers 0-1.

- db.py: the stable entry (`Database`, `Tx`); the machinery behind it, and every table
  definition and migration (sql/schema/*.sql, sql/migrations.py), is in sql/;
- queue.py: the one leased job queue, under outbox.py and webhooks.py;
- store.py and search.py: versioned FHIR resources and their search;
- context.py: the consent context the send-time re-check reads;
- auditlog.py, partners.py: the audit log, the bridge's partners and their tokens.
"""
