-- Fair decisions (issue 18 item 9): the oldest pending alert of each Alertmanager group is found
-- by a loose index scan over this index, so an alert of a quiet group is decided next to a
-- flood of another group's alerts instead of behind it. Only pending rows are in it.
CREATE INDEX alerts_pending_group ON alerts (group_key, id) WHERE pending = 1;
