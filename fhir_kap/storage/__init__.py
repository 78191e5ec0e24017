"""Everything kept on disk (layer 2, IO adapter): the database (SQLite or PostgreSQL), the
leased job queue, the FHIR store and its search, the outbox, the consent context, the audit
log, partners and the webhook jobs.

May import layers 0-1.
"""
