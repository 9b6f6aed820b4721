-- Closed incidents are never due. A person's close used to keep the incident's due time, so a
-- held incident closed by hand came back to every round of due work, and a hundred of them
-- took all of its places from the open incidents due after them.
UPDATE incidents SET due_at = NULL WHERE closed_at IS NOT NULL AND due_at IS NOT NULL;
-- The round of due work reads open incidents in due order: only those are in this index.
CREATE INDEX incidents_open_due ON incidents (due_at) WHERE closed_at IS NULL AND due_at IS NOT NULL;
