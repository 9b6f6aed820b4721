-- Who said yes or no to which rollback: one vote per person per incident, so a double click
-- (or a click and a command, on two replicas) counts once.
CREATE TABLE approvals (
    id BIGSERIAL PRIMARY KEY,
    incident_id TEXT NOT NULL,
    approver TEXT NOT NULL,
    verdict TEXT NOT NULL,
    via TEXT NOT NULL,
    reason TEXT,
    at BIGINT NOT NULL,
    UNIQUE (incident_id, approver)
);

-- Webhooks already handled (PagerDuty's X-Webhook-Id, Slack signatures): replays change nothing.
CREATE TABLE webhook_receipts (
    source TEXT NOT NULL,
    receipt_key TEXT NOT NULL,
    at BIGINT NOT NULL,
    PRIMARY KEY (source, receipt_key)
);
