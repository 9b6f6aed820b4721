//! The `approvals` and `webhook_receipts` tables: one vote per person and incident, and the
//! signed webhooks already seen (PagerDuty's `event.id`), so a redelivery is not a second vote.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{ms, storable, Result, Store, StoreError, StoreTx};
use crate::incident::IncidentId;

/// A signed webhook as its sender names it (PagerDuty's `event.id`): remembered in the
/// transaction of the change it made ([`StoreTx::take_receipt`]), so the change and "seen" are
/// durable together or not at all. A delivery answered 5xx left no receipt and no vote or note
/// behind, whatever failed (a full disk, a lost sync), and its redelivery is processed; a copy
/// processed at the same moment finds it taken and changes nothing. One that changed nothing
/// (refused, ignored) is remembered on its own ([`Store::first_receipt`]), so that a replay of
/// its signed body stays a duplicate however the incident moves on.
#[derive(Debug, Clone)]
pub struct Receipt {
    source: &'static str,
    key: String,
}

impl Receipt {
    pub fn new(source: &'static str, key: impl Into<String>) -> Receipt {
        Receipt {
            source,
            key: key.into(),
        }
    }

    /// The sender's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Who sent it and its key, for messages.
    pub fn describe(&self) -> String {
        format!("{} event {}", self.source, self.key)
    }
}

impl Store {
    /// Remembers a webhook on its own, once on disk; false if it was seen before (a replay).
    /// For receipts that guard no change (Slack's signatures, a refused PagerDuty vote).
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

    /// Whether the change a webhook asked for is already committed and on disk: the quick
    /// answer to a redelivery. Not the judge: [`StoreTx::take_receipt`] is, in the change's
    /// transaction. A receipt read here may belong to a commit whose sync has not finished (or
    /// failed): "seen" is said only after a sync that covers it, else the sender, told
    /// "duplicate", would never send again what may be lost.
    pub async fn receipt_seen(&self, r: &Receipt) -> Result<bool> {
        let row = sqlx::query("SELECT COUNT(*) FROM webhook_receipts WHERE source = $1 AND receipt_key = $2")
            .bind(r.source)
            .bind(storable(&r.key))
            .fetch_one(&self.pool)
            .await?;
        let seen = row.try_get::<i64, _>(0)? > 0;
        if seen {
            self.durable().await?;
        }
        Ok(seen)
    }
}

impl StoreTx {
    /// Remembers a webhook in this transaction; false if another transaction already did (the
    /// caller then commits nothing of it), once that one's commit is on disk (see
    /// [`Store::receipt_seen`]). On PostgreSQL a copy being processed at the same moment holds
    /// the key until it commits or rolls back, and this waits for that.
    pub async fn take_receipt(&mut self, r: &Receipt, now: DateTime<Utc>) -> Result<bool> {
        let done = sqlx::query("INSERT INTO webhook_receipts (source, receipt_key, at) VALUES ($1, $2, $3) ON CONFLICT (source, receipt_key) DO NOTHING")
            .bind(r.source)
            .bind(storable(&r.key))
            .bind(ms(now))
            .execute(self.db().await?)
            .await?;
        if done.rows_affected() == 1 {
            return Ok(true);
        }
        super::durable::wait(&self.sync).await?;
        Ok(false)
    }

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
