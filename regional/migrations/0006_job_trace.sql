-- The W3C trace context of the request that submitted a job, so the worker
-- that runs it later (on any node of the region) continues the same trace.
-- NULL when the request carried none (tracing off); a sampled-out context is
-- kept, so the worker follows that decision too.
ALTER TABLE jobs ADD COLUMN traceparent text;
