-- fwrepo's catalog on PostgreSQL: one table per record kind, columns for every lookup and
-- list, keyset pagination on ids (ULIDs sort by time). JSONB holds raw protocol payloads and
-- documents read and written whole (a rollout's definition, timeline and events).

CREATE TABLE firmware (
    id              TEXT PRIMARY KEY,
    file_name       TEXT NOT NULL,
    model           TEXT NOT NULL,
    model_key       TEXT NOT NULL,          -- lower(model)
    product_version TEXT NOT NULL,
    version_key     BYTEA NOT NULL,         -- normalized version (sorts numerically)
    file_size       BIGINT NOT NULL,
    md5             TEXT NOT NULL,
    sha256          TEXT NOT NULL,
    release_note    TEXT,
    build_time      TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL,
    status          TEXT NOT NULL,
    verify_status   TEXT,
    verified_at     TIMESTAMPTZ,
    deleted_at      TIMESTAMPTZ,
    blob_key        TEXT NOT NULL
);
-- One live record per model + normalized version; a tombstone frees it.
CREATE UNIQUE INDEX firmware_live_version ON firmware (model_key, version_key)
    WHERE status <> 'deleted';
CREATE INDEX firmware_status ON firmware (status, id DESC);

CREATE TABLE pending_uploads (
    id           TEXT PRIMARY KEY,
    blob_key     TEXT NOT NULL,
    multipart_id TEXT,
    started_at   TIMESTAMPTZ NOT NULL
);

CREATE TABLE download_sessions (
    id            TEXT PRIMARY KEY,
    firmware_id   TEXT NOT NULL,
    task_id       TEXT,
    sn            TEXT,
    client        TEXT NOT NULL,
    user_agent    TEXT NOT NULL,
    file_size     BIGINT NOT NULL,
    bytes_sent    BIGINT NOT NULL,
    bytes_covered BIGINT NOT NULL,
    percent       DOUBLE PRECISION NOT NULL,
    requests      BIGINT NOT NULL,
    state         TEXT NOT NULL,
    started_at    TIMESTAMPTZ NOT NULL,
    last_seen_at  TIMESTAMPTZ NOT NULL,
    covered       JSONB NOT NULL             -- merged [[start, end), …]
);
CREATE INDEX download_sessions_firmware ON download_sessions (firmware_id, id DESC);
CREATE INDEX download_sessions_task ON download_sessions (task_id, sn);
CREATE INDEX download_sessions_seen ON download_sessions (last_seen_at);

CREATE TABLE idempotency (
    key       TEXT PRIMARY KEY,
    body_hash TEXT NOT NULL,
    answer    JSONB NOT NULL,
    at        TIMESTAMPTZ NOT NULL
);
CREATE INDEX idempotency_at ON idempotency (at);

CREATE TABLE devices (
    sn                      TEXT PRIMARY KEY,
    order_key               TEXT NOT NULL,
    gateway_sn              TEXT,
    child_sn                TEXT,
    osd_child_sn            TEXT,
    model_key               TEXT,
    model                   TEXT,
    model_declared          BOOLEAN NOT NULL,
    firmware_version        TEXT,
    compatible_status       BIGINT,
    firmware_upgrade_status BIGINT,
    mode_code               BIGINT,
    thing_version           TEXT,
    dialect                 TEXT,
    first_seen_at           TIMESTAMPTZ NOT NULL,
    last_seen_at            TIMESTAMPTZ,
    last_osd_at             TIMESTAMPTZ,
    last_state_at           TIMESTAMPTZ
);
CREATE INDEX devices_gateway ON devices (gateway_sn);

CREATE TABLE ota_tasks (
    id            TEXT PRIMARY KEY,
    gateway_sn    TEXT NOT NULL,
    tid           TEXT NOT NULL,
    bid           TEXT NOT NULL,
    status        TEXT NOT NULL,
    final         BOOLEAN NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    updated_at    TIMESTAMPTZ NOT NULL,
    percent       BIGINT,
    step_key      TEXT,
    sub_status    TEXT,
    rate          BIGINT,
    result_code   BIGINT,
    result_reason TEXT,
    retryable     BOOLEAN,
    replied_at    TIMESTAMPTZ,
    last_event_at TIMESTAMPTZ,
    finished_at   TIMESTAMPTZ
);
CREATE INDEX ota_tasks_gateway ON ota_tasks (gateway_sn, id DESC);
CREATE INDEX ota_tasks_status ON ota_tasks (status, id DESC);
CREATE INDEX ota_tasks_finished ON ota_tasks (finished_at) WHERE final;
CREATE INDEX ota_tasks_tid ON ota_tasks (tid);
CREATE INDEX ota_tasks_bid ON ota_tasks (bid);

CREATE TABLE ota_task_devices (
    task_id         TEXT NOT NULL REFERENCES ota_tasks (id) ON DELETE CASCADE,
    position        INT NOT NULL,
    sn              TEXT NOT NULL,
    firmware_id     TEXT NOT NULL,
    product_version TEXT NOT NULL,
    upgrade_type    SMALLINT,
    policy_rule     SMALLINT NOT NULL,
    policy_reason   TEXT NOT NULL,
    file_url        TEXT NOT NULL,
    file_name       TEXT NOT NULL,
    md5             TEXT NOT NULL,
    file_size       BIGINT NOT NULL,
    outcome         TEXT NOT NULL,
    outcome_at      TIMESTAMPTZ,
    PRIMARY KEY (task_id, position)
);

-- Appended as the task changes (the last entry's repeat count is the only update).
CREATE TABLE ota_task_history (
    task_id    TEXT NOT NULL REFERENCES ota_tasks (id) ON DELETE CASCADE,
    seq        INT NOT NULL,
    at         TIMESTAMPTZ NOT NULL,
    source     TEXT NOT NULL,
    status     TEXT NOT NULL,
    percent    BIGINT,
    step_key   TEXT,
    sub_status TEXT,
    rate       BIGINT,
    raw        JSON,                      -- the message as received, text kept
    repeats    BIGINT NOT NULL,
    PRIMARY KEY (task_id, seq)
);

-- The gateway and devices an open task holds: one row per serial, so of two concurrent
-- creations for one gateway exactly one inserts its claim. Removed when the task is final.
CREATE TABLE ota_claims (
    sn      TEXT PRIMARY KEY,
    task_id TEXT NOT NULL REFERENCES ota_tasks (id) ON DELETE CASCADE
);

CREATE TABLE ota_orphans (
    id  TEXT PRIMARY KEY,
    msg JSON NOT NULL
);

CREATE TABLE rollouts (
    id                  TEXT PRIMARY KEY,
    name                TEXT NOT NULL,
    status              TEXT NOT NULL,
    pause_reason        TEXT,
    finished_at         TIMESTAMPTZ,
    definition          JSONB NOT NULL,
    packages            JSONB NOT NULL,
    current_stage       INT NOT NULL,
    stage_sizes         BIGINT[] NOT NULL,
    acknowledged_failed BIGINT NOT NULL,
    created_at          TIMESTAMPTZ NOT NULL,
    updated_at          TIMESTAMPTZ NOT NULL,
    started_at          TIMESTAMPTZ,
    timeline            JSONB NOT NULL,
    events              JSONB NOT NULL
);
CREATE INDEX rollouts_status ON rollouts (status, id DESC);

CREATE TABLE rollout_members (
    rollout_id        TEXT NOT NULL,
    order_key         TEXT NOT NULL,
    gateway_sn        TEXT NOT NULL,
    stage             INT NOT NULL,
    state             TEXT NOT NULL,
    devices           JSONB NOT NULL,
    attempts          BIGINT NOT NULL,
    task_id           TEXT,
    dispatch_key      TEXT,
    last_error        TEXT,
    waiting_since     TIMESTAMPTZ,
    first_dispatch_at TIMESTAMPTZ,
    dispatched_at     TIMESTAMPTZ,
    next_attempt_at   TIMESTAMPTZ,
    finished_at       TIMESTAMPTZ,
    PRIMARY KEY (rollout_id, order_key)
);
CREATE INDEX rollout_members_state ON rollout_members (rollout_id, state);
CREATE UNIQUE INDEX rollout_members_dispatch ON rollout_members (dispatch_key)
    WHERE dispatch_key IS NOT NULL;

CREATE TABLE api_tokens (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    scopes       TEXT[] NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,
    created_by   TEXT,
    expires_at   TIMESTAMPTZ,
    last_used_at TIMESTAMPTZ,
    revoked_at   TIMESTAMPTZ,
    hash         TEXT NOT NULL UNIQUE
);

CREATE TABLE audit (
    id       TEXT PRIMARY KEY,
    at       TIMESTAMPTZ NOT NULL,
    who      TEXT,
    token_id TEXT,
    client   TEXT NOT NULL,
    method   TEXT NOT NULL,
    path     TEXT NOT NULL,
    status   INT NOT NULL,
    error    TEXT
);

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
