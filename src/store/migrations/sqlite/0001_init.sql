-- Alerts as Alertmanager sent them: one row per firing episode (fingerprint, startsAt).
CREATE TABLE alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    fingerprint TEXT NOT NULL,
    starts_at BIGINT NOT NULL,
    ends_at BIGINT,
    status TEXT NOT NULL,
    alertname TEXT NOT NULL,
    labels TEXT NOT NULL,
    annotations TEXT NOT NULL,
    generator_url TEXT NOT NULL,
    group_key TEXT NOT NULL,
    external_url TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    -- 1 until the responder has acted on the latest status.
    pending BIGINT NOT NULL,
    incident_id TEXT,
    decision TEXT,
    UNIQUE (fingerprint, starts_at)
);
CREATE INDEX alerts_pending ON alerts (pending, id);
CREATE INDEX alerts_incident ON alerts (incident_id, status);

CREATE TABLE incidents (
    id TEXT PRIMARY KEY,
    policy TEXT NOT NULL,
    trigger_name TEXT,
    service TEXT NOT NULL,
    target_key TEXT NOT NULL,
    -- target_key while open, NULL once closed: at most one open incident per target.
    open_target TEXT UNIQUE,
    phase TEXT NOT NULL,
    decision TEXT NOT NULL,
    plan TEXT NOT NULL,
    alertname TEXT NOT NULL,
    first_alert_starts_at BIGINT NOT NULL,
    opened_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    closed_at BIGINT,
    due_at BIGINT,
    acted_at BIGINT,
    verified_at BIGINT,
    owner TEXT,
    lease_until BIGINT,
    version BIGINT NOT NULL
);
CREATE INDEX incidents_phase_due ON incidents (phase, due_at);
CREATE INDEX incidents_target_acted ON incidents (target_key, acted_at);
CREATE INDEX incidents_policy_acted ON incidents (policy, acted_at);

-- The audit trail: append-only.
CREATE TABLE incident_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    incident_id TEXT NOT NULL,
    at BIGINT NOT NULL,
    kind TEXT NOT NULL,
    actor TEXT NOT NULL,
    phase_from TEXT,
    phase_to TEXT,
    summary TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX incident_events_incident ON incident_events (incident_id, id);

-- Kill switch: '*' for global, else a policy name.
CREATE TABLE freezes (
    scope TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    by_whom TEXT NOT NULL,
    at BIGINT NOT NULL,
    until_at BIGINT
);
