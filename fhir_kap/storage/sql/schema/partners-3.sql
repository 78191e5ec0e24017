-- partners-3: the origins (scheme://host[:port]) the operator registered for a partner's
-- Subscription endpoints besides its webhook URL's (a JSON list; NULL: none).

ALTER TABLE partners ADD COLUMN subscription_origins TEXT;
