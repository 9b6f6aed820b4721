//! What re-deciding open incidents needs from the store: making incidents due at once (a
//! freeze lifted, a policy reload), and what a human denied.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::Row;

use super::{ms, sql_phases, Result, Store, StoreTx};
use crate::incident::{AuditKind, IncidentId, Phase};

/// Phases whose incidents are decided again when an input changes (their due time).
pub const REDECIDED: [Phase; 6] = [
    Phase::Waiting,
    Phase::AwaitingApproval,
    Phase::Suppressed,
    Phase::Denied,
    Phase::Escalated,
    Phase::GaveUp,
];

impl Store {
    /// Makes every open incident in `phases` due at `now`, so the next tick decides it again
    /// (a freeze was lifted, the policies changed). Returns how many.
    pub async fn make_due(&self, phases: &[Phase], now: DateTime<Utc>) -> Result<u64> {
        let r = sqlx::query(&format!(
            "UPDATE incidents SET due_at = $1, version = version + 1
             WHERE closed_at IS NULL AND phase IN ({}) AND (due_at IS NULL OR due_at > $1)",
            sql_phases(phases)
        ))
        .bind(ms(now))
        .execute(&self.pool)
        .await?;
        self.durable().await?;
        Ok(r.rows_affected())
    }
}

impl StoreTx {
    /// The detail of the incident's latest audit entry of `kind` (the triggers a deny covered).
    pub async fn last_event_detail(&mut self, id: &IncidentId, kind: AuditKind) -> Result<Option<Value>> {
        let row = sqlx::query(
            "SELECT detail FROM incident_events WHERE incident_id = $1 AND kind = $2 ORDER BY id DESC LIMIT 1",
        )
        .bind(&id.0)
        .bind(kind.as_str())
        .fetch_optional(self.db().await?)
        .await?;
        Ok(row
            .map(|r| r.try_get::<String, _>("detail"))
            .transpose()?
            .map(|d| serde_json::from_str(&d).unwrap_or(Value::Null)))
    }
}
