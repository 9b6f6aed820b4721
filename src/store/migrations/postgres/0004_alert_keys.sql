-- Cheaper intake (issue 10, see the SQLite migration of the same name): the unique key led by
-- startsAt, so new alerts land at the end of the index instead of on random pages, and partial
-- pending and per-incident indexes that hold only the rows they serve.
CREATE UNIQUE INDEX alerts_starts_fingerprint ON alerts (starts_at, fingerprint);
ALTER TABLE alerts DROP CONSTRAINT alerts_fingerprint_starts_at_key;
DROP INDEX alerts_pending;
CREATE INDEX alerts_pending ON alerts (id) WHERE pending = 1;
DROP INDEX alerts_incident;
CREATE INDEX alerts_incident ON alerts (incident_id, status) WHERE incident_id IS NOT NULL;
-- Which kinds of alert an incident has (one Slack reply per kind joining, not per alert).
CREATE INDEX alerts_incident_name ON alerts (incident_id, alertname) WHERE incident_id IS NOT NULL;
