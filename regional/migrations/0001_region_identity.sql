-- The region a database belongs to. A node refuses to start against a
-- database that another region owns, so a mistyped URL cannot mix two
-- regions' data.
CREATE TABLE region_identity (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    region     text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
