-- Alerts that cannot be decided (a time past the calendar's end, a startsAt far in the future,
-- a decision that panicked): the reason is kept here, the alert is no longer pending, and the
-- API lists them. The partial index holds only those rows.
ALTER TABLE alerts ADD COLUMN undecidable TEXT;
CREATE INDEX alerts_undecidable ON alerts (id) WHERE undecidable IS NOT NULL;
