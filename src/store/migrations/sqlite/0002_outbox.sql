-- What people were told, and what they still must be told: the notification outbox. Rows are
-- written in the same transaction as the state change that caused them and delivered by a
-- worker, in order per (incident, channel), with retries.
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    incident_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    next_attempt_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    delivered_at BIGINT,
    last_error TEXT,
    owner TEXT,
    lease_until BIGINT
);
CREATE INDEX outbox_due ON outbox (state, next_attempt_at);
CREATE INDEX outbox_order ON outbox (incident_id, channel, state, id);

-- Handles the peers gave us back (Slack channel id and ts, Statuspage incident id), reused so
-- that a restart updates the same message instead of posting a new one.
CREATE TABLE notification_refs (
    incident_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    ref_key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (incident_id, channel, ref_key)
);

-- Who, what and where of an incident, fixed when it opens: the first alert's links and the
-- notification routes (so a policy reload mid-incident does not reroute half a conversation).
ALTER TABLE incidents ADD COLUMN context TEXT NOT NULL DEFAULT '{}';
