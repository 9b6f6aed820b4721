//! The `approvals` and `webhook_receipts` tables: one vote per person and incident, and the
//! signed webhooks already seen (PagerDuty's `event.id`), so a redelivery is not a second vote.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{ms, storable, Result, Store, StoreError, StoreTx};
use crate::incident::IncidentId;

impl Store {
    /// Remembers a webhook; false if it was seen before (a replay or a redelivery).
    pub async fn first_receipt(&self, source: &str, key: &str, now: DateTime<Utc>) -> Result<bool> {
        let r = sqlx::query("INSERT INTO webhook_receipts (source, receipt_key, at) VALUES ($1, $2, $3) ON CONFLICT (source, receipt_key) DO NOTHING")
            .bind(source)
            .bind(storable(key))
            .bind(ms(now))
            .execute(&self.pool)
            .await?;
        self.durable().await?;
        Ok(r.rows_affected() == 1)
    }

    /// Undoes [`Store::first_receipt`] for a webhook whose processing failed (answered 5xx),
    /// so that the sender's redelivery is processed instead of answered as a duplicate.
    pub async fn forget_receipt(&self, source: &str, key: &str) -> Result<()> {
        sqlx::query("DELETE FROM webhook_receipts WHERE source = $1 AND receipt_key = $2")
            .bind(source)
            .bind(storable(key))
            .execute(&self.pool)
            .await?;
        self.durable().await?;
        Ok(())
    }
}

impl StoreTx {
    /// Records a person's vote; false if that person already voted on this incident.
    pub async fn add_vote(
        &mut self,
        incident: &IncidentId,
        approver: &str,
        verdict: &str,
        via: &str,
        reason: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let r = sqlx::query(
            "INSERT INTO approvals (incident_id, approver, verdict, via, reason, at) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (incident_id, approver) DO NOTHING",
        )
        .bind(&incident.0)
        .bind(storable(approver))
        .bind(verdict)
        .bind(storable(via))
        .bind(reason.map(storable))
        .bind(ms(now))
        .execute(self.db().await?)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Everyone who approved an incident, in order.
    pub async fn approvers(&mut self, incident: &IncidentId) -> Result<Vec<String>> {
        let rows =
            sqlx::query("SELECT approver FROM approvals WHERE incident_id = $1 AND verdict = 'approve' ORDER BY id")
                .bind(&incident.0)
                .fetch_all(self.db().await?)
                .await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>(0).map_err(StoreError::from))
            .collect()
    }
}
