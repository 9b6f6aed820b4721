//! The `alerts` table after intake: claiming pending alerts for the decision loop (one at a
//! time or a batch in one statement), recording what became of each (its incident, the
//! decision), and reading an incident's alerts. Writing alerts as they arrive is [`super::intake`].

use sqlx::any::AnyRow;
use sqlx::Row;

use chrono::{DateTime, Utc};

use super::{bind_ids, from_ms, ms, opt_ms, placeholders, to_json, Backend, Result, Store, StoreError, StoreTx};
use crate::alert::{Alert, AlertStatus, Fingerprint, LabelSet};
use crate::incident::joins::JoinMark;
use crate::incident::{IncidentId, Phase};
use crate::policy::Decision;

/// An alert as stored, with its row id.
#[derive(Debug, Clone)]
pub struct StoredAlert {
    pub id: i64,
    pub alert: Alert,
    pub group_key: String,
    pub external_url: String,
    pub incident_id: Option<IncidentId>,
    /// Read by [`StoreTx::claim_alerts`] without its annotations, generator and external URLs
    /// and group key, which a decision needs only when it opens an incident or announces a
    /// new kind of alert; [`StoreTx::complete_alert`] reads them.
    pub partial: bool,
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
        .fetch_optional(self.db().await?)
        .await?;
        row.map(|r| alert_from_row(&r)).transpose()
    }

    /// Of `ids`, those still pending that no other transaction holds, in their order, locked
    /// for this transaction until it ends: on PostgreSQL `FOR UPDATE SKIP LOCKED`, so another
    /// replica asking for the same oldest alerts skips the whole batch (and waits) instead of
    /// deciding the same storm alongside; on SQLite this transaction holds the only
    /// connection, and `ids` are returned as they are. The batch then reads them a few at a
    /// time with [`StoreTx::claim_alerts`].
    pub async fn lock_alerts(&mut self, ids: &[i64]) -> Result<Vec<i64>> {
        if self.backend == Backend::Sqlite || ids.is_empty() {
            return Ok(ids.to_vec());
        }
        let sql = format!(
            "SELECT id FROM alerts WHERE pending = 1 AND id IN ({}) FOR UPDATE SKIP LOCKED",
            placeholders(self.backend, ids.len())
        );
        let locked: Vec<i64> = bind_ids(&sql, ids)
            .fetch_all(self.db().await?)
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<std::result::Result<_, _>>()?;
        Ok(ids.iter().copied().filter(|id| locked.contains(id)).collect())
    }

    /// Takes every alert of `ids` that is still pending, in one statement; returns them in id
    /// order (alerts another worker took first are left out). They stay pending until
    /// [`StoreTx::settle_alerts`] says which were decided: that write is held back and joins
    /// the alerts' outcomes in one statement ([`super::deferred`]), so each decided alert's row
    /// is written once, not twice. Taken alerts are not settled go back with the commit, as
    /// they were. What keeps another worker off them until then: on SQLite this transaction
    /// holds the only connection; on PostgreSQL `FOR UPDATE SKIP LOCKED` locks the rows (a
    /// second worker skips them) until the commit.
    pub async fn claim_alerts(&mut self, ids: &[i64]) -> Result<Vec<StoredAlert>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let lock = match self.backend {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let sql = format!(
            "SELECT {CLAIM_COLS} FROM alerts WHERE pending = 1 AND id IN ({}){lock}",
            placeholders(self.backend, ids.len())
        );
        // A batch claims a few alerts at a time; what it holds back writes only alerts it has
        // claimed already, so a claim of others need not send that first.
        let held_back = self.deferred.outcomes.iter().any(|o| ids.contains(&o.alert_id));
        let db = if held_back { self.db().await? } else { self.db_ahead() };
        let mut alerts = bind_ids(&sql, ids)
            .fetch_all(db)
            .await?
            .iter()
            .map(claimed_from_row)
            .collect::<Result<Vec<_>>>()?;
        alerts.sort_by_key(|a| a.id);
        Ok(alerts)
    }

    /// `a` with everything [`StoreTx::claim_alerts`] left out read (a copy; `a` itself if it
    /// is complete already).
    pub async fn complete_alert(&mut self, a: &StoredAlert) -> Result<StoredAlert> {
        if !a.partial {
            return Ok(a.clone());
        }
        let row = sqlx::query(&format!("SELECT {ALERT_COLS} FROM alerts WHERE id = $1"))
            .bind(a.id)
            .fetch_one(self.db().await?)
            .await?;
        alert_from_row(&row)
    }

    /// Marks alerts taken by [`StoreTx::claim_alerts`] as decided (no longer pending), with
    /// the outcomes recorded for them; held back like those.
    pub fn settle_alerts(&mut self, ids: &[i64]) {
        self.deferred
            .outcomes
            .extend(ids.iter().map(|&alert_id| super::deferred::Outcome {
                alert_id,
                incident: None,
                decision: None,
                joined: None,
            }));
    }

    /// Records what became of an alert, which this transaction has taken: its incident (if
    /// any) and the decision; it is no longer pending. Held back and sent with the
    /// transaction's next statement or its commit ([`super::deferred`]).
    pub async fn set_alert_outcome(
        &mut self,
        alert_id: i64,
        incident: Option<&IncidentId>,
        decision: Option<&Decision>,
    ) -> Result<()> {
        let decision = decision.map(|d| match self.decisions.iter().find(|(kept, _)| kept == d) {
            Some((_, json)) => json.clone(),
            None => {
                let json: std::sync::Arc<str> = to_json(d).into();
                if self.decisions.len() == KEPT_DECISIONS {
                    self.decisions.remove(0);
                }
                self.decisions.push((d.clone(), json.clone()));
                json
            }
        });
        self.deferred.outcomes.push(super::deferred::Outcome {
            alert_id,
            incident: incident.map(|i| i.0.clone()),
            decision,
            joined: None,
        });
        Ok(())
    }

    /// Records a plain join: the alert is in `incident` (which it did not change, in `phase`,
    /// due again at `due_at`) under `decision`, and its timeline entry is kept on its row, placed
    /// after the incident's audit entries so far ([`crate::incident::joins`]). Held back like
    /// [`StoreTx::set_alert_outcome`].
    pub async fn join_alert(
        &mut self,
        alert_id: i64,
        incident: &IncidentId,
        decision: &Decision,
        at: DateTime<Utc>,
        phase: Phase,
        due_at: Option<DateTime<Utc>>,
    ) -> Result<()> {
        self.joins += 1;
        let mark = JoinMark {
            at: ms(at),
            seq: self.joins,
            after: self.last_event_id(incident).await?,
            phase,
            due_at: due_at.map(ms),
        };
        self.set_alert_outcome(alert_id, Some(incident), Some(decision)).await?;
        if let Some(o) = self.deferred.outcomes.last_mut() {
            o.joined = Some(mark.to_json());
        }
        Ok(())
    }

    /// Whether an alert other than `except` with this name already belongs to the incident.
    pub async fn incident_has_alertname(&mut self, id: &IncidentId, alertname: &str, except: i64) -> Result<bool> {
        let row = sqlx::query("SELECT 1 FROM alerts WHERE incident_id = $1 AND alertname = $2 AND id <> $3 LIMIT 1")
            .bind(&id.0)
            .bind(alertname)
            .bind(except)
            .fetch_optional(self.db().await?)
            .await?;
        Ok(row.is_some())
    }

    /// Ends the older episodes of `fingerprint` in an incident that still fire, because a
    /// later one (started at `starts_at`) resolved: Alertmanager keeps one alert per
    /// fingerprint, so when an alert resolved and fired again between two of its notifications
    /// it never sends the first episode's resolve, and that row would fire for ever (its
    /// incident never closing, every later alert on the target joining it). Returns how many.
    pub async fn end_older_episodes(
        &mut self,
        id: &IncidentId,
        fingerprint: &Fingerprint,
        starts_at: DateTime<Utc>,
    ) -> Result<u64> {
        // The older episode ended before the later one began; exactly when is not known.
        let r = sqlx::query(
            "UPDATE alerts SET status = 'resolved', ends_at = $1
             WHERE incident_id = $2 AND status = 'firing' AND fingerprint = $3 AND starts_at < $1",
        )
        .bind(ms(starts_at))
        .bind(&id.0)
        .bind(fingerprint.0.as_str())
        .execute(self.db().await?)
        .await?;
        Ok(r.rows_affected())
    }

    /// How many alerts of an incident still fire.
    pub async fn firing_alerts(&mut self, id: &IncidentId) -> Result<u64> {
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM alerts WHERE incident_id = $1 AND status = 'firing'")
            .bind(&id.0)
            .fetch_one(self.db().await?)
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
        .fetch_all(self.db().await?)
        .await?;
        rows.iter().map(alert_from_row).collect()
    }
}

/// Decisions a transaction keeps as written ([`StoreTx::set_alert_outcome`]).
const KEPT_DECISIONS: usize = 8;

/// What deciding needs of every claimed alert, in this order (read by position).
const CLAIM_COLS: &str = "id, fingerprint, starts_at, ends_at, status, labels, incident_id";

/// A claimed alert from a row of [`CLAIM_COLS`]: partial.
fn claimed_from_row(r: &AnyRow) -> Result<StoredAlert> {
    let status: String = r.try_get(4)?;
    let labels: LabelSet =
        serde_json::from_str(r.try_get::<&str, _>(5)?).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(StoredAlert {
        id: r.try_get(0)?,
        alert: Alert {
            status: AlertStatus::parse(&status)
                .ok_or_else(|| StoreError::Corrupt(format!("alert status {status:?}")))?,
            labels,
            annotations: LabelSet::new(),
            starts_at: from_ms(r.try_get(2)?),
            ends_at: opt_ms(r.try_get(3)?),
            generator_url: String::new(),
            fingerprint: Fingerprint(r.try_get(1)?),
        },
        group_key: String::new(),
        external_url: String::new(),
        incident_id: r.try_get::<Option<String>, _>(6)?.map(IncidentId),
        partial: true,
    })
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
        partial: false,
    })
}

#[cfg(test)]
mod tests {
    use super::super::intake::tests::{delivery, sqlite_store};
    use chrono::Utc;

    #[tokio::test]
    async fn a_batch_claims_in_one_statement_and_hands_back_what_it_did_not_settle() {
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
        tx.settle_alerts(&ids[..1]);
        assert_eq!(
            tx.claim_alerts(&ids).await.unwrap().len(),
            2,
            "a settled alert is not pending any more, in the transaction too"
        );
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
