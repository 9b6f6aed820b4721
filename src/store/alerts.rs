//! The `alerts` table after intake: claiming pending alerts for the decision loop (one at a
//! time or a batch in one statement), recording what became of each (its incident, the
//! decision), and reading an incident's alerts. Writing alerts as they arrive is [`super::intake`].

use sqlx::any::AnyRow;
use sqlx::Row;

use super::{bind_ids, from_ms, opt_ms, placeholders, to_json, Result, Store, StoreError, StoreTx};
use crate::alert::{Alert, AlertStatus, Fingerprint, LabelSet};
use crate::incident::IncidentId;
use crate::policy::Decision;

/// An alert as stored, with its row id.
#[derive(Debug, Clone)]
pub struct StoredAlert {
    pub id: i64,
    pub alert: Alert,
    pub group_key: String,
    pub external_url: String,
    pub incident_id: Option<IncidentId>,
}

impl Store {
    /// Ids of alerts waiting to be processed, oldest first.
    pub async fn pending_alert_ids(&self, limit: i64) -> Result<Vec<i64>> {
        let rows = sqlx::query("SELECT id FROM alerts WHERE pending = 1 ORDER BY id LIMIT $1")
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| r.try_get::<i64, _>(0).map_err(StoreError::from))
            .collect()
    }

    /// The alerts attached to an incident.
    pub async fn incident_alerts(&self, id: &IncidentId) -> Result<Vec<StoredAlert>> {
        let rows = sqlx::query(&format!(
            "SELECT {ALERT_COLS} FROM alerts WHERE incident_id = $1 ORDER BY id"
        ))
        .bind(&id.0)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(alert_from_row).collect()
    }

    /// How many alerts of an incident still fire (outside any transaction).
    pub async fn firing_alert_count(&self, id: &IncidentId) -> Result<i64> {
        Ok(
            sqlx::query("SELECT COUNT(*) FROM alerts WHERE incident_id = $1 AND status = 'firing'")
                .bind(&id.0)
                .fetch_one(&self.pool)
                .await?
                .try_get(0)?,
        )
    }

    /// Alert counts by processing state, for readiness details and tests.
    pub async fn alert_count(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT COUNT(*) FROM alerts")
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?)
    }
}

impl StoreTx {
    /// Takes a pending alert for processing; `None` if another worker already took it.
    pub async fn claim_alert(&mut self, id: i64) -> Result<Option<StoredAlert>> {
        let row = sqlx::query(&format!(
            "UPDATE alerts SET pending = 0 WHERE id = $1 AND pending = 1 RETURNING {ALERT_COLS}"
        ))
        .bind(id)
        .fetch_optional(&mut *self.tx)
        .await?;
        row.map(|r| alert_from_row(&r)).transpose()
    }

    /// Takes every alert of `ids` that is still pending, in one statement; returns them in id
    /// order (alerts another worker took first are left out).
    pub async fn claim_alerts(&mut self, ids: &[i64]) -> Result<Vec<StoredAlert>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "UPDATE alerts SET pending = 0 WHERE pending = 1 AND id IN ({}) RETURNING {ALERT_COLS}",
            placeholders(ids.len())
        );
        let mut alerts = bind_ids(&sql, ids)
            .fetch_all(&mut *self.tx)
            .await?
            .iter()
            .map(alert_from_row)
            .collect::<Result<Vec<_>>>()?;
        alerts.sort_by_key(|a| a.id);
        Ok(alerts)
    }

    /// Gives claimed alerts back (pending again), in the claiming transaction: a batch that
    /// stops early leaves the rest to the next one, and nobody else ever saw them taken.
    pub async fn unclaim_alerts(&mut self, ids: &[i64]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "UPDATE alerts SET pending = 1 WHERE id IN ({})",
            placeholders(ids.len())
        );
        bind_ids(&sql, ids).execute(&mut *self.tx).await?;
        Ok(())
    }

    /// Records what became of an alert: its incident (if any) and the decision.
    pub async fn set_alert_outcome(
        &mut self,
        alert_id: i64,
        incident: Option<&IncidentId>,
        decision: Option<&Decision>,
    ) -> Result<()> {
        sqlx::query("UPDATE alerts SET incident_id = COALESCE($1, incident_id), decision = COALESCE($2, decision) WHERE id = $3")
            .bind(incident.map(|i| i.0.clone()))
            .bind(decision.map(to_json))
            .bind(alert_id)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    /// Whether an alert other than `except` with this name already belongs to the incident.
    pub async fn incident_has_alertname(&mut self, id: &IncidentId, alertname: &str, except: i64) -> Result<bool> {
        let row = sqlx::query("SELECT 1 FROM alerts WHERE incident_id = $1 AND alertname = $2 AND id <> $3 LIMIT 1")
            .bind(&id.0)
            .bind(alertname)
            .bind(except)
            .fetch_optional(&mut *self.tx)
            .await?;
        Ok(row.is_some())
    }

    /// How many alerts of an incident still fire.
    pub async fn firing_alerts(&mut self, id: &IncidentId) -> Result<u64> {
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM alerts WHERE incident_id = $1 AND status = 'firing'")
            .bind(&id.0)
            .fetch_one(&mut *self.tx)
            .await?
            .try_get(0)?;
        Ok(n as u64)
    }

    /// The firing alerts of an incident (for re-decisions).
    pub async fn firing_alerts_of(&mut self, id: &IncidentId) -> Result<Vec<StoredAlert>> {
        let rows = sqlx::query(&format!(
            "SELECT {ALERT_COLS} FROM alerts WHERE incident_id = $1 AND status = 'firing' ORDER BY id"
        ))
        .bind(&id.0)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter().map(alert_from_row).collect()
    }
}

const ALERT_COLS: &str =
    "id, fingerprint, starts_at, ends_at, status, labels, annotations, generator_url, group_key, external_url, incident_id";

fn alert_from_row(r: &AnyRow) -> Result<StoredAlert> {
    let status: String = r.try_get("status")?;
    let labels: LabelSet =
        serde_json::from_str(&r.try_get::<String, _>("labels")?).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let annotations: LabelSet = serde_json::from_str(&r.try_get::<String, _>("annotations")?)
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(StoredAlert {
        id: r.try_get("id")?,
        alert: Alert {
            status: AlertStatus::parse(&status)
                .ok_or_else(|| StoreError::Corrupt(format!("alert status {status:?}")))?,
            labels,
            annotations,
            starts_at: from_ms(r.try_get("starts_at")?),
            ends_at: opt_ms(r.try_get("ends_at")?),
            generator_url: r.try_get("generator_url")?,
            fingerprint: Fingerprint(r.try_get("fingerprint")?),
        },
        group_key: r.try_get("group_key")?,
        external_url: r.try_get("external_url")?,
        incident_id: r.try_get::<Option<String>, _>("incident_id")?.map(IncidentId),
    })
}

#[cfg(test)]
mod tests {
    use super::super::intake::tests::{delivery, sqlite_store};
    use chrono::Utc;

    #[tokio::test]
    async fn a_batch_claims_in_one_statement_and_hands_back_what_it_did_not_decide() {
        let (_dir, store) = sqlite_store().await;
        let fps = ["a1b2c3d4e5f60701", "a1b2c3d4e5f60702", "a1b2c3d4e5f60703"];
        store.ingest(&delivery(&fps), Utc::now()).await.unwrap();
        let ids = store.pending_alert_ids(10).await.unwrap();
        assert_eq!(ids.len(), 3);

        let mut tx = store.begin().await.unwrap();
        let claimed = tx.claim_alerts(&ids).await.unwrap();
        assert_eq!(
            claimed.iter().map(|a| a.id).collect::<Vec<_>>(),
            ids,
            "all, in id order"
        );
        assert!(
            tx.claim_alerts(&ids).await.unwrap().is_empty(),
            "a claimed alert is not claimed twice"
        );
        tx.unclaim_alerts(&ids[1..]).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            store.pending_alert_ids(10).await.unwrap(),
            ids[1..].to_vec(),
            "handed back"
        );

        // A transaction that does not commit takes nothing.
        let mut tx = store.begin().await.unwrap();
        assert_eq!(tx.claim_alerts(&ids).await.unwrap().len(), 2);
        drop(tx);
        assert_eq!(store.pending_alert_ids(10).await.unwrap(), ids[1..].to_vec());
    }
}
