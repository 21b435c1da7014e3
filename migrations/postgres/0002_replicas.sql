-- The replicas of one deployment: each `fwrepo serve` renews its row every few seconds
-- (GET /api/v1/cluster). Only adds: a replica of the previous release keeps working beside it.
CREATE TABLE replicas (
    id             TEXT PRIMARY KEY,
    version        TEXT NOT NULL,
    started_at     TIMESTAMPTZ NOT NULL,
    last_heartbeat TIMESTAMPTZ NOT NULL,
    blob_store     TEXT NOT NULL,
    broker         TEXT NOT NULL,
    leases         TEXT[] NOT NULL DEFAULT '{}'
);
