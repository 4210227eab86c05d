-- Spend by API key: the key a request came with (its id, as the gateway
-- names it in `x-meridian-key-id`), on the spend counters and on a job, so
-- that a job's spend counts against the key that submitted it. NULL: no key
-- (a request without the gateway, or counted before keys were recorded).
-- Nullable, as columns added to replicated tables must be.
ALTER TABLE spend ADD COLUMN key_id text;
ALTER TABLE jobs  ADD COLUMN key_id text;
