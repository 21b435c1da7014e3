-- What replicas sharing the catalog need to keep one another's changes (only adds: the
-- previous release keeps working beside this one).
-- A task's revision: a write stores the writer's copy only if the stored row is the revision
-- that copy was read at, so replicas never overwrite each other's changes to one task.
ALTER TABLE ota_tasks ADD COLUMN revision BIGINT NOT NULL DEFAULT 0;
-- A device's last topology change (copies of a device are merged field group by field
-- group), and when its row last changed in something a reader acts on (replicas read the
-- devices changed since they last looked).
ALTER TABLE devices ADD COLUMN topology_at TIMESTAMPTZ;
ALTER TABLE devices ADD COLUMN changed_at TIMESTAMPTZ NOT NULL DEFAULT now();
CREATE INDEX devices_changed ON devices (changed_at);
-- Work one replica does for the deployment (OTA timers, rollout scheduling): held by
-- `holder` until `expires_at` (the database's clock), renewed every few seconds; a lease
-- whose holder stopped renewing is taken over by another replica.
CREATE TABLE leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL,
    acquired_at TIMESTAMPTZ NOT NULL
);
-- A rollout's revision: an operator's action taken through one replica and the scheduler's
-- writes on another never overwrite each other.
ALTER TABLE rollouts ADD COLUMN revision BIGINT NOT NULL DEFAULT 0;
