-- Cheaper intake (issue 10, measured in docs/benchmarks.md). Alertmanager's fingerprints are
-- hashes: a unique key led by the fingerprint put every new alert on a random index page, so
-- each commit rewrote one page per alert. Led by startsAt (about "now" for a new alert) the key
-- grows at its end. The pending and per-incident indexes only hold the rows they serve, so
-- storing an alert no longer writes an incident index entry. Plain INTEGER PRIMARY KEY (ids are
-- still increasing: alerts are never deleted) instead of AUTOINCREMENT, which wrote
-- sqlite_sequence on every insert, even one that changed nothing.
CREATE TABLE alerts_new (
    id INTEGER PRIMARY KEY,
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
    UNIQUE (starts_at, fingerprint)
);
INSERT INTO alerts_new SELECT id, fingerprint, starts_at, ends_at, status, alertname, labels, annotations,
    generator_url, group_key, external_url, received_at, updated_at, pending, incident_id, decision FROM alerts;
DROP TABLE alerts;
ALTER TABLE alerts_new RENAME TO alerts;
CREATE INDEX alerts_pending ON alerts (id) WHERE pending = 1;
CREATE INDEX alerts_incident ON alerts (incident_id, status) WHERE incident_id IS NOT NULL;
-- Which kinds of alert an incident has (one Slack reply per kind joining, not per alert).
CREATE INDEX alerts_incident_name ON alerts (incident_id, alertname) WHERE incident_id IS NOT NULL;
