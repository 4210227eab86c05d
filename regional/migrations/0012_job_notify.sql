-- Job watchers wait on one LISTEN per node (regional/src/queue/watch.rs)
-- instead of each polling the table: every state change notifies, whoever
-- made it (any node of the region, the sweeper, a replicated write, which
-- the applier makes with INSERT ... ON CONFLICT DO UPDATE, firing UPDATE
-- triggers too). Delivered at commit, so a watcher never reads a state that
-- is not yet visible.
CREATE FUNCTION jobs_notify_state() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('meridian_job_changes', NEW.id::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_notify_state AFTER UPDATE OF state ON jobs
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION jobs_notify_state();
