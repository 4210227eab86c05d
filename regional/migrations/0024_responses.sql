-- Stored responses of the Responses API (`/v1/responses`): what a later
-- request names as `previous_response_id`, what `GET /v1/responses/{id}`
-- returns and `input_items` lists. Replicated to the tenant's regions like
-- conversations, so a chain started in one region continues in another,
-- also after the first is lost.
--
-- A row holds the response object as the API returned it (`body`, without
-- the input) and the input items this request added (`input_items`), not
-- the whole chain: the chain is rebuilt from the rows by following
-- `previous_response_id`, never taken from a client.
--
-- Deleting a response blanks it (`deleted_at`, body and items emptied)
-- rather than removing the row: the blanking replicates as an update that
-- wins by the clock over a late copy of the original, where a removed row
-- could come back with it. The id stays known, so it is never served again.
CREATE TABLE responses (
    id                   text        PRIMARY KEY
                             CHECK (id ~ '^resp_[A-Za-z0-9]{1,120}$'),
    tenant_id            text        NOT NULL,
    model                text        NOT NULL,
    status               text        NOT NULL,
    -- Not a foreign key: the previous response may arrive after this one
    -- (each region's log is pulled on its own stream).
    previous_response_id text,
    body                 jsonb       NOT NULL,
    -- A background response's job (`background: true`): its state and
    -- result are read from the job, which replicates and is adopted like
    -- any job, until the response is settled into `body`.
    job_id               uuid,
    input_items          jsonb       NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    deleted_at           timestamptz,
    hlc                  bigint      NOT NULL DEFAULT 0,
    origin_region        text        COLLATE "C" NOT NULL DEFAULT ''
);

CREATE INDEX responses_by_tenant ON responses (tenant_id, created_at);
-- Expiry (`inference.response_retention_days`) reads by age alone.
CREATE INDEX responses_by_age ON responses (created_at);
CREATE INDEX responses_origin_hlc ON responses (origin_region, hlc);

CREATE TRIGGER replication_lock BEFORE INSERT OR UPDATE OR DELETE ON responses
    FOR EACH STATEMENT EXECUTE FUNCTION replication_lock_clock();
CREATE TRIGGER replication_stamp BEFORE INSERT OR UPDATE ON responses
    FOR EACH ROW EXECUTE FUNCTION replication_stamp();
CREATE TRIGGER replication_log AFTER INSERT OR UPDATE OR DELETE ON responses
    FOR EACH ROW EXECUTE FUNCTION replication_log_change('id');
