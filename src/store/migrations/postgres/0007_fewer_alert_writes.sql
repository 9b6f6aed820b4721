-- Cheaper decisions (issue 22): a decided alert's row is the only row its decision writes.
--
-- alerts_incident_name served a single look-up (is an alert of this name already in the
-- incident?) that the decision loop now makes once per incident and name per replica, not per
-- alert; it reads the incident's alerts through alerts_incident instead. Every decided alert's
-- row entered this index too.
DROP INDEX alerts_incident_name;
-- A plain join (one that changed nothing of the incident) is kept on the alert's row, not as
-- an audit row: `joined` is its JoinMark (src/incident/joins.rs) as JSON, and reading an
-- incident's timeline puts the entry back in its place. NULL for every other alert.
ALTER TABLE alerts ADD COLUMN joined TEXT;
