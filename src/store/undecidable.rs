//! Alerts that cannot be decided: marked with the reason (no longer pending, so they never
//! hold up the decision loop again), and listed for the API.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;

use super::{from_ms, Result, Store, StoreTx};

/// An alert marked undecidable, as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct UndecidableAlert {
    pub id: i64,
    pub fingerprint: String,
    pub alertname: String,
    pub starts_at: DateTime<Utc>,
    pub problem: String,
}

impl StoreTx {
    /// Marks a claimed alert as undecidable with `problem`; it is not pending any more.
    pub async fn mark_undecidable(&mut self, alert_id: i64, problem: &str) -> Result<()> {
        sqlx::query("UPDATE alerts SET pending = 0, undecidable = $1 WHERE id = $2")
            .bind(problem)
            .bind(alert_id)
            .execute(self.db().await?)
            .await?;
        Ok(())
    }
}

impl Store {
    /// Marks an alert undecidable in a transaction of its own (after a decision panicked and
    /// its own transaction was rolled back).
    pub async fn mark_undecidable(&self, alert_id: i64, problem: &str) -> Result<()> {
        let mut tx = self.begin().await?;
        tx.mark_undecidable(alert_id, problem).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The most recent alerts marked undecidable, newest first.
    pub async fn undecidable_alerts(&self, limit: i64) -> Result<Vec<UndecidableAlert>> {
        let rows = sqlx::query(
            "SELECT id, fingerprint, alertname, starts_at, undecidable FROM alerts
             WHERE undecidable IS NOT NULL ORDER BY id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(UndecidableAlert {
                    id: r.try_get("id")?,
                    fingerprint: r.try_get("fingerprint")?,
                    alertname: r.try_get("alertname")?,
                    starts_at: from_ms(r.try_get("starts_at")?),
                    problem: r.try_get("undecidable")?,
                })
            })
            .collect()
    }
}
