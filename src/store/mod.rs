//! All SQL lives here: alerts, incidents, the audit trail, freezes.
//!
//! One set of store code serves SQLite (the embedded default, a file in the working
//! directory) and PostgreSQL (shared by several replicas) through sqlx's `Any` driver: the SQL
//! is portable (`$n` placeholders, `ON CONFLICT`, integer milliseconds for time, JSON as text);
//! only the migrations differ per dialect. Exactly-once rests on three things written here:
//! the unique `(fingerprint, starts_at)` of an alert, the unique `open_target` of an incident,
//! and conditional updates (`WHERE version = $n`, `WHERE pending = 1`, lease expiry) that only
//! one replica can win.

mod health;
mod intake;
mod pages;
mod text;

use text::{could_be_stored, storable};

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row, Transaction};

use crate::alert::{Alert, AlertStatus, Fingerprint, LabelSet, Notification};
use crate::incident::{Incident, IncidentId, Phase};
use crate::policy::{Decision, Freeze, FreezeState, History};

pub use pages::{IncidentFilter, Notice};

/// Which database is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Errors from the store; all of them are "transient" from a webhook sender's point of view.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Db(#[from] sqlx::Error),
    #[error("store migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported store url {0:?}: use sqlite://PATH or postgres://USER@HOST/DB")]
    Url(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("the intake writer has stopped (shutting down)")]
    IntakeStopped,
    /// The same failure, told to each of several waiting requests.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

impl StoreError {
    /// A unique-constraint violation: another writer (replica) got there first.
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Db(sqlx::Error::Database(e)) if e.is_unique_violation())
    }
}

type Result<T> = std::result::Result<T, StoreError>;

/// The shared store.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    intake: Arc<intake::Intake>,
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// When a lease of `lease` taken at `now` ends: checked, the end of the calendar at most.
fn lease_end(now: DateTime<Utc>, lease: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(lease)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

fn from_ms(v: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(v).unwrap_or_default()
}

fn opt_ms(v: Option<i64>) -> Option<DateTime<Utc>> {
    v.map(from_ms)
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

/// Counts from one webhook delivery.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngestStats {
    /// New alerts, or a known alert whose status changed (firing -> resolved).
    pub stored: u64,
    /// Alerts we already had in this state (re-sends, HA duplicates).
    pub duplicates: u64,
}

/// An alert as stored, with its row id.
#[derive(Debug, Clone)]
pub struct StoredAlert {
    pub id: i64,
    pub alert: Alert,
    pub group_key: String,
    pub external_url: String,
    pub incident_id: Option<IncidentId>,
}

/// One entry of an incident's audit trail.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EventRecord {
    pub at: DateTime<Utc>,
    pub kind: String,
    pub actor: String,
    pub phase_from: Option<Phase>,
    pub phase_to: Option<Phase>,
    pub summary: String,
    pub detail: Value,
}

/// A new audit entry, appended within a state change's transaction.
#[derive(Debug, Clone)]
pub struct NewEvent<'a> {
    pub kind: &'a str,
    pub actor: &'a str,
    pub phase_from: Option<Phase>,
    pub phase_to: Option<Phase>,
    pub summary: String,
    pub detail: Value,
}

impl Store {
    /// Connects, creating the SQLite file if needed, and runs the migrations.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(StoreError::Url(url.to_string()));
        };
        let url = match backend {
            Backend::Sqlite if !url.contains("mode=") => {
                format!("{url}{}mode=rwc", if url.contains('?') { '&' } else { '?' })
            }
            _ => url.to_string(),
        };
        let opts = AnyPoolOptions::new()
            .acquire_timeout(Duration::from_secs(5))
            .after_release(|conn, _| Box::pin(health::release_only_if_clean(conn)));
        let pool = match backend {
            // One writer at a time is how SQLite works anyway; a single connection avoids
            // SQLITE_BUSY on lock upgrades. WAL + synchronous=FULL: a commit is on disk.
            Backend::Sqlite => {
                opts.max_connections(1)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            sqlx::query("PRAGMA journal_mode=WAL").execute(&mut *conn).await?;
                            sqlx::query("PRAGMA synchronous=FULL").execute(&mut *conn).await?;
                            sqlx::query("PRAGMA busy_timeout=5000").execute(&mut *conn).await?;
                            // The commit that takes the WAL past this many pages copies them
                            // back into the database file and fsyncs it before it returns. At
                            // the default 1,000 pages (4 MB) that stall set the webhook's p99
                            // (11-19 ms at 2,000 deliveries/s); 100 pages stall a tenth as
                            // long, ten times as often: p99 5-7 ms, for ~5 % of peak throughput
                            // (docs/benchmarks.md). A checkpointer of its own, off the write
                            // path, was worse: under steady writes the WAL never starts over.
                            sqlx::query("PRAGMA wal_autocheckpoint=100").execute(&mut *conn).await?;
                            // Deliveries carried in another commit are written under a
                            // savepoint, whose undo log (up to a batch of rows, ~1-2 MB) would
                            // otherwise spill to a file created and deleted in /var/tmp each
                            // time: stalls of 40-370 ms were measured at 2,000 deliveries/s.
                            sqlx::query("PRAGMA temp_store=MEMORY").execute(&mut *conn).await?;
                            Ok(())
                        })
                    })
                    .connect(&url)
                    .await?
            }
            Backend::Postgres => opts.max_connections(max_connections.max(2)).connect(&url).await?,
        };
        match backend {
            Backend::Sqlite => sqlx::migrate!("src/store/migrations/sqlite").run(&pool).await?,
            Backend::Postgres => sqlx::migrate!("src/store/migrations/postgres").run(&pool).await?,
        }
        let intake = Arc::new(intake::Intake::start(pool.clone(), backend));
        Ok(Store { pool, backend, intake })
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Closes the pool (on shutdown).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Stores every alert of a delivery, durably, before it returns (group commit: see
    /// [`intake`]). A known alert in the same state is a duplicate and changes nothing;
    /// firing -> resolved marks it for processing again. A resolved alert never goes back to
    /// firing (late duplicates from an HA peer).
    pub async fn ingest(&self, n: &Notification, now: DateTime<Utc>) -> Result<IngestStats> {
        self.intake.ingest(n, now).await
    }

    /// Whether webhook deliveries are waiting to be written: work that can wait (deciding a
    /// backlog) makes way for them, since Alertmanager is waiting on those.
    pub fn intake_waiting(&self) -> bool {
        self.intake.waiting()
    }

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

    /// Starts a transaction for one state change.
    pub async fn begin(&self) -> Result<StoreTx> {
        Ok(StoreTx {
            tx: self.pool.begin().await?,
            backend: self.backend,
            queued: Vec::new(),
            intake: self.intake.clone(),
        })
    }

    /// Incidents whose due time has come: re-decisions and approval expiries.
    pub async fn due_incidents(&self, now: DateTime<Utc>) -> Result<Vec<IncidentId>> {
        let rows = sqlx::query(
            "SELECT id FROM incidents WHERE phase IN ('waiting', 'awaiting_approval') AND due_at <= $1 ORDER BY due_at LIMIT 100",
        )
        .bind(ms(now))
        .fetch_all(&self.pool)
        .await?;
        ids(rows)
    }

    /// Incidents with work in flight that no live replica holds (new, or whose owner's lease
    /// ran out: the owner died).
    pub async fn unowned_work(&self, now: DateTime<Utc>) -> Result<Vec<IncidentId>> {
        let rows = sqlx::query(
            "SELECT id FROM incidents WHERE phase IN ('executing', 'verifying')
               AND (owner IS NULL OR lease_until < $1) ORDER BY opened_at LIMIT 100",
        )
        .bind(ms(now))
        .fetch_all(&self.pool)
        .await?;
        ids(rows)
    }

    /// Takes the lease on an incident's work. Only one holder at a time: the update is
    /// conditional on the lease being free or expired, so neither another replica nor a second
    /// task on this one can start the same work.
    pub async fn claim(&self, id: &IncidentId, owner: &str, now: DateTime<Utc>, lease: Duration) -> Result<bool> {
        let until = lease_end(now, lease);
        let r = sqlx::query(
            "UPDATE incidents SET owner = $1, lease_until = $2
             WHERE id = $3 AND phase IN ('executing', 'verifying')
               AND (owner IS NULL OR lease_until < $4)",
        )
        .bind(owner)
        .bind(ms(until))
        .bind(&id.0)
        .bind(ms(now))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Extends a lease this owner holds; false if it was lost (expired and taken over).
    pub async fn renew(&self, id: &IncidentId, owner: &str, now: DateTime<Utc>, lease: Duration) -> Result<bool> {
        let until = lease_end(now, lease);
        let r = sqlx::query("UPDATE incidents SET lease_until = $1 WHERE id = $2 AND owner = $3")
            .bind(ms(until))
            .bind(&id.0)
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Gives the lease back (on shutdown, so another replica can take over at once).
    pub async fn release(&self, id: &IncidentId, owner: &str) -> Result<()> {
        sqlx::query("UPDATE incidents SET owner = NULL, lease_until = NULL WHERE id = $1 AND owner = $2")
            .bind(&id.0)
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// One incident.
    pub async fn incident(&self, id: &IncidentId) -> Result<Option<Incident>> {
        if !could_be_stored(&id.0) {
            return Ok(None);
        }
        fetch_incident(&self.pool, id).await
    }

    /// Recent incidents, newest first, optionally only open ones.
    pub async fn incidents(&self, open_only: bool, limit: i64) -> Result<Vec<Incident>> {
        let filter = if open_only { "WHERE closed_at IS NULL" } else { "" };
        let rows = sqlx::query(&format!(
            "SELECT {INCIDENT_COLS} FROM incidents {filter} ORDER BY opened_at DESC, id DESC LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(incident_from_row).collect()
    }

    /// An incident's audit trail, oldest first.
    pub async fn events(&self, id: &IncidentId) -> Result<Vec<EventRecord>> {
        let rows = sqlx::query(
            "SELECT at, kind, actor, phase_from, phase_to, summary, detail FROM incident_events WHERE incident_id = $1 ORDER BY id",
        )
        .bind(&id.0)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(EventRecord {
                    at: from_ms(r.try_get("at")?),
                    kind: r.try_get("kind")?,
                    actor: r.try_get("actor")?,
                    phase_from: r
                        .try_get::<Option<String>, _>("phase_from")?
                        .as_deref()
                        .and_then(Phase::parse),
                    phase_to: r
                        .try_get::<Option<String>, _>("phase_to")?
                        .as_deref()
                        .and_then(Phase::parse),
                    summary: r.try_get("summary")?,
                    detail: serde_json::from_str(&r.try_get::<String, _>("detail")?).unwrap_or(Value::Null),
                })
            })
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

    /// Open incidents and incidents waiting for approval (metrics gauges).
    pub async fn incident_gauges(&self) -> Result<(i64, i64)> {
        let row = sqlx::query(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN phase = 'awaiting_approval' THEN 1 ELSE 0 END), 0)
             FROM incidents WHERE closed_at IS NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((row.try_get(0)?, row.try_get(1)?))
    }

    /// Alert counts by processing state, for readiness details and tests.
    pub async fn alert_count(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT COUNT(*) FROM alerts")
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?)
    }

    /// Remembers a webhook; false if it was seen before (a replay or a redelivery).
    pub async fn first_receipt(&self, source: &str, key: &str, now: DateTime<Utc>) -> Result<bool> {
        let r = sqlx::query("INSERT INTO webhook_receipts (source, receipt_key, at) VALUES ($1, $2, $3) ON CONFLICT (source, receipt_key) DO NOTHING")
            .bind(source)
            .bind(storable(key))
            .bind(ms(now))
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Stores a handle for an incident's channel (e.g. the PagerDuty incident id).
    pub async fn set_ref(&self, incident: &IncidentId, channel: &str, key: &str, value: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO notification_refs (incident_id, channel, ref_key, value) VALUES ($1, $2, $3, $4)
             ON CONFLICT (incident_id, channel, ref_key) DO UPDATE SET value = excluded.value",
        )
        .bind(&incident.0)
        .bind(channel)
        .bind(key)
        .bind(storable(value))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The incident a handle belongs to (e.g. which of ours a PagerDuty incident id is).
    pub async fn incident_by_ref(&self, channel: &str, key: &str, value: &str) -> Result<Option<IncidentId>> {
        if !could_be_stored(value) {
            return Ok(None);
        }
        let row =
            sqlx::query("SELECT incident_id FROM notification_refs WHERE channel = $1 AND ref_key = $2 AND value = $3")
                .bind(channel)
                .bind(key)
                .bind(value)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|r| r.try_get::<String, _>(0)).transpose()?.map(IncidentId))
    }

    /// Appends an audit entry on its own (a refused approval, a PagerDuty acknowledgement).
    pub async fn note(
        &self,
        id: &IncidentId,
        now: DateTime<Utc>,
        kind: &str,
        actor: &str,
        summary: &str,
        detail: &Value,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO incident_events (incident_id, at, kind, actor, phase_from, phase_to, summary, detail)
             VALUES ($1, $2, $3, $4, NULL, NULL, $5, $6)",
        )
        .bind(&id.0)
        .bind(ms(now))
        .bind(kind)
        .bind(storable(actor))
        .bind(storable(summary))
        .bind(detail.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Freezes in force (the kill switch).
    pub async fn freezes(&self, now: DateTime<Utc>) -> Result<FreezeState> {
        let rows =
            sqlx::query("SELECT scope, reason, by_whom, until_at FROM freezes WHERE until_at IS NULL OR until_at > $1")
                .bind(ms(now))
                .fetch_all(&self.pool)
                .await?;
        let mut state = FreezeState::default();
        for r in rows {
            let scope: String = r.try_get("scope")?;
            let f = Freeze {
                reason: r.try_get("reason")?,
                by: r.try_get("by_whom")?,
                until: opt_ms(r.try_get("until_at")?),
            };
            if scope == "*" {
                state.global = Some(f);
            } else {
                state.policies.insert(scope, f);
            }
        }
        Ok(state)
    }

    /// Sets or replaces a freeze; `scope` is `*` (global) or a policy name.
    pub async fn freeze(&self, scope: &str, f: &Freeze, now: DateTime<Utc>) -> Result<()> {
        sqlx::query(
            "INSERT INTO freezes (scope, reason, by_whom, at, until_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (scope) DO UPDATE SET reason = excluded.reason, by_whom = excluded.by_whom, at = excluded.at, until_at = excluded.until_at",
        )
        .bind(storable(scope))
        .bind(storable(&f.reason))
        .bind(storable(&f.by))
        .bind(ms(now))
        .bind(f.until.map(ms))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Lifts a freeze; true if there was one.
    pub async fn unfreeze(&self, scope: &str) -> Result<bool> {
        if !could_be_stored(scope) {
            return Ok(false);
        }
        let r = sqlx::query("DELETE FROM freezes WHERE scope = $1")
            .bind(scope)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Undoes [`Store::first_receipt`] for a webhook whose processing failed (answered 5xx),
    /// so that the sender's redelivery is processed instead of answered as a duplicate.
    pub async fn forget_receipt(&self, source: &str, key: &str) -> Result<()> {
        sqlx::query("DELETE FROM webhook_receipts WHERE source = $1 AND receipt_key = $2")
            .bind(source)
            .bind(storable(key))
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// A notification claimed for delivery.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub incident_id: IncidentId,
    pub channel: String,
    pub payload: String,
    pub attempts: u32,
}

impl Store {
    /// Pending notifications whose time has come, only the oldest per (incident, channel) so
    /// that a thread reply never overtakes the message it replies to.
    pub async fn due_messages(&self, channel: &str, now: DateTime<Utc>, limit: i64) -> Result<Vec<i64>> {
        let rows = sqlx::query(
            "SELECT o.id FROM outbox o
             WHERE o.channel = $1 AND o.state = 'pending' AND o.next_attempt_at <= $2
               AND (o.owner IS NULL OR o.lease_until < $2)
               AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.incident_id = o.incident_id AND p.channel = o.channel
                                 AND p.state = 'pending' AND p.id < o.id)
             ORDER BY o.id LIMIT $3",
        )
        .bind(channel)
        .bind(ms(now))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| r.try_get::<i64, _>(0).map_err(StoreError::from))
            .collect()
    }

    /// Claims one notification for delivery; `None` if another replica holds it or it is done.
    pub async fn claim_message(
        &self,
        id: i64,
        owner: &str,
        now: DateTime<Utc>,
        lease: Duration,
    ) -> Result<Option<OutboxRow>> {
        let until = ms(lease_end(now, lease));
        let r = sqlx::query(
            "UPDATE outbox SET owner = $1, lease_until = $2 WHERE id = $3 AND state = 'pending' AND (owner IS NULL OR lease_until < $4)",
        )
        .bind(owner)
        .bind(until)
        .bind(id)
        .bind(ms(now))
        .execute(&self.pool)
        .await?;
        if r.rows_affected() == 0 {
            return Ok(None);
        }
        let row = sqlx::query("SELECT id, incident_id, channel, payload, attempts FROM outbox WHERE id = $1")
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
        Ok(Some(OutboxRow {
            id: row.try_get("id")?,
            incident_id: IncidentId(row.try_get("incident_id")?),
            channel: row.try_get("channel")?,
            payload: row.try_get("payload")?,
            attempts: row.try_get::<i64, _>("attempts")? as u32,
        }))
    }

    /// The handles stored for an incident's channel (Slack channel and ts, Statuspage id).
    pub async fn refs(
        &self,
        incident: &IncidentId,
        channel: &str,
    ) -> Result<std::collections::BTreeMap<String, String>> {
        let rows = sqlx::query("SELECT ref_key, value FROM notification_refs WHERE incident_id = $1 AND channel = $2")
            .bind(&incident.0)
            .bind(channel)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<String, _>(1)?)))
            .collect()
    }

    /// Marks a notification delivered and keeps the handles it returned, together.
    pub async fn message_delivered(
        &self,
        row: &OutboxRow,
        owner: &str,
        refs: &[(String, String)],
        now: DateTime<Utc>,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE outbox SET state = 'delivered', delivered_at = $1, attempts = attempts + 1, owner = NULL, lease_until = NULL WHERE id = $2 AND owner = $3")
            .bind(ms(now))
            .bind(row.id)
            .bind(owner)
            .execute(&mut *tx)
            .await?;
        for (k, v) in refs {
            sqlx::query(
                "INSERT INTO notification_refs (incident_id, channel, ref_key, value) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (incident_id, channel, ref_key) DO UPDATE SET value = excluded.value",
            )
            .bind(&row.incident_id.0)
            .bind(&row.channel)
            .bind(k)
            .bind(v)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Schedules another attempt.
    pub async fn message_retry(&self, row: &OutboxRow, owner: &str, error: &str, next: DateTime<Utc>) -> Result<()> {
        sqlx::query("UPDATE outbox SET attempts = attempts + 1, next_attempt_at = $1, last_error = $2, owner = NULL, lease_until = NULL WHERE id = $3 AND owner = $4")
            .bind(ms(next))
            .bind(error)
            .bind(row.id)
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Gives up on a notification and says so in the incident's timeline.
    pub async fn message_failed(&self, row: &OutboxRow, owner: &str, error: &str, now: DateTime<Utc>) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query("UPDATE outbox SET state = 'failed', attempts = attempts + 1, last_error = $1, owner = NULL, lease_until = NULL WHERE id = $2 AND owner = $3")
            .bind(error)
            .bind(row.id)
            .bind(owner)
            .execute(&mut *tx)
            .await?;
        if r.rows_affected() == 1 {
            sqlx::query(
                "INSERT INTO incident_events (incident_id, at, kind, actor, phase_from, phase_to, summary, detail)
                 VALUES ($1, $2, 'notification_failed', 'rollback-responder', NULL, NULL, $3, $4)",
            )
            .bind(&row.incident_id.0)
            .bind(ms(now))
            .bind(format!("{} notification failed for good after {} attempt(s): {error}", row.channel, row.attempts + 1))
            .bind(serde_json::json!({ "channel": row.channel, "error": error, "message": serde_json::from_str::<Value>(&row.payload).unwrap_or(Value::Null) }).to_string())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Pending notifications per channel (the outbox depth).
    pub async fn outbox_depth(&self) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query("SELECT channel, COUNT(*) FROM outbox WHERE state = 'pending' GROUP BY channel")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<i64, _>(1)?)))
            .collect()
    }

    /// Every notification of an incident, oldest first (API and tests).
    pub async fn messages(&self, incident: &IncidentId) -> Result<Vec<Value>> {
        let rows = sqlx::query(
            "SELECT id, channel, payload, state, attempts, last_error FROM outbox WHERE incident_id = $1 ORDER BY id",
        )
        .bind(&incident.0)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(serde_json::json!({
                    "id": r.try_get::<i64, _>("id")?,
                    "channel": r.try_get::<String, _>("channel")?,
                    "message": serde_json::from_str::<Value>(&r.try_get::<String, _>("payload")?).unwrap_or(Value::Null),
                    "state": r.try_get::<String, _>("state")?,
                    "attempts": r.try_get::<i64, _>("attempts")?,
                    "last_error": r.try_get::<Option<String>, _>("last_error")?,
                }))
            })
            .collect()
    }
}

/// One incident, through the pool or inside a transaction.
async fn fetch_incident<'e, E: sqlx::Executor<'e, Database = sqlx::Any>>(
    e: E,
    id: &IncidentId,
) -> Result<Option<Incident>> {
    let row = sqlx::query(&format!("SELECT {INCIDENT_COLS} FROM incidents WHERE id = $1"))
        .bind(&id.0)
        .fetch_optional(e)
        .await?;
    row.map(|r| incident_from_row(&r)).transpose()
}

fn ids(rows: Vec<AnyRow>) -> Result<Vec<IncidentId>> {
    rows.iter()
        .map(|r| Ok(IncidentId(r.try_get::<String, _>(0)?)))
        .collect()
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

const INCIDENT_COLS: &str =
    "id, policy, trigger_name, service, target_key, phase, decision, plan, alertname, first_alert_starts_at,
    opened_at, updated_at, closed_at, due_at, acted_at, verified_at, owner, lease_until, version, context";

fn incident_from_row(r: &AnyRow) -> Result<Incident> {
    let phase: String = r.try_get("phase")?;
    let decision: String = r.try_get("decision")?;
    let plan: String = r.try_get("plan")?;
    Ok(Incident {
        id: IncidentId(r.try_get("id")?),
        policy: r.try_get("policy")?,
        trigger: r.try_get("trigger_name")?,
        service: r.try_get("service")?,
        target_key: r.try_get("target_key")?,
        phase: Phase::parse(&phase).ok_or_else(|| StoreError::Corrupt(format!("phase {phase:?}")))?,
        decision: serde_json::from_str(&decision).map_err(|e| StoreError::Corrupt(format!("decision: {e}")))?,
        plan: serde_json::from_str(&plan).map_err(|e| StoreError::Corrupt(format!("plan: {e}")))?,
        alertname: r.try_get("alertname")?,
        first_alert_starts_at: from_ms(r.try_get("first_alert_starts_at")?),
        opened_at: from_ms(r.try_get("opened_at")?),
        updated_at: from_ms(r.try_get("updated_at")?),
        closed_at: opt_ms(r.try_get("closed_at")?),
        due_at: opt_ms(r.try_get("due_at")?),
        acted_at: opt_ms(r.try_get("acted_at")?),
        verified_at: opt_ms(r.try_get("verified_at")?),
        owner: r.try_get("owner")?,
        lease_until: opt_ms(r.try_get("lease_until")?),
        version: r.try_get("version")?,
        context: serde_json::from_str(&r.try_get::<String, _>("context")?).unwrap_or(Value::Null),
    })
}

/// One state change's transaction: everything it writes commits together or not at all.
pub struct StoreTx {
    tx: Transaction<'static, sqlx::Any>,
    #[allow(dead_code)]
    backend: Backend,
    /// Outbox channels this transaction queued messages for.
    queued: Vec<String>,
    /// Webhook deliveries waiting for the connection ride along with the commit (SQLite).
    intake: Arc<intake::Intake>,
}

/// What a committed transaction left for others to do.
#[derive(Debug, Default)]
pub struct Committed {
    /// Outbox channels with new messages: only their delivery loops need waking. (Waking all
    /// of them after every decision cost each loop two queries, on SQLite's one connection,
    /// for nothing: most decisions of a storm queue no message.)
    pub queued: Vec<String>,
}

impl StoreTx {
    /// Commits, with any webhook deliveries that waited for this transaction's connection
    /// (see [`intake`]): they are answered after this commit, or go back to the writer if it
    /// fails.
    pub async fn commit(mut self) -> Result<Committed> {
        let carried = self.intake.absorb(&mut self.tx).await;
        let result = self.tx.commit().await;
        if let Some(c) = carried {
            c.settle(result.is_ok());
        }
        result?;
        Ok(Committed { queued: self.queued })
    }

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

    /// What the guards need to know about earlier rollbacks.
    pub async fn history(
        &mut self,
        policy: &str,
        target_key: &str,
        policy_window: Option<Duration>,
        global_window: Option<Duration>,
        now: DateTime<Utc>,
    ) -> Result<History> {
        let last: Option<i64> = sqlx::query("SELECT MAX(acted_at) FROM incidents WHERE target_key = $1")
            .bind(target_key)
            .fetch_one(&mut *self.tx)
            .await?
            .try_get(0)?;
        // A window longer than the calendar reaches back to its start.
        let since = |w: Duration| ms(now).saturating_sub(i64::try_from(w.as_millis()).unwrap_or(i64::MAX));
        let mut h = History {
            last_rollback_on_target: opt_ms(last),
            ..Default::default()
        };
        // A rollback still executing counts too: its acted_at is only set when it is done, and a
        // storm across several targets must not start more rollbacks than the limit while the
        // first ones are still running.
        if let Some(w) = policy_window {
            let n: i64 = sqlx::query(
                "SELECT COUNT(*) FROM incidents WHERE policy = $1
                   AND (acted_at >= $2 OR (phase = 'executing' AND acted_at IS NULL))",
            )
            .bind(policy)
            .bind(since(w))
            .fetch_one(&mut *self.tx)
            .await?
            .try_get(0)?;
            h.policy_rollbacks_in_window = n as u32;
        }
        if let Some(w) = global_window {
            let n: i64 = sqlx::query(
                "SELECT COUNT(*) FROM incidents WHERE acted_at >= $1 OR (phase = 'executing' AND acted_at IS NULL)",
            )
            .bind(since(w))
            .fetch_one(&mut *self.tx)
            .await?
            .try_get(0)?;
            h.global_rollbacks_in_window = n as u32;
        }
        Ok(h)
    }

    /// The open incident on a target, if any.
    pub async fn open_incident_for(&mut self, target_key: &str) -> Result<Option<Incident>> {
        let row = sqlx::query(&format!("SELECT {INCIDENT_COLS} FROM incidents WHERE open_target = $1"))
            .bind(target_key)
            .fetch_optional(&mut *self.tx)
            .await?;
        row.map(|r| incident_from_row(&r)).transpose()
    }

    /// One incident, read inside the transaction.
    pub async fn incident(&mut self, id: &IncidentId) -> Result<Option<Incident>> {
        if !could_be_stored(&id.0) {
            return Ok(None);
        }
        fetch_incident(&mut *self.tx, id).await
    }

    /// Inserts a new incident; a conflict means another replica opened one for this target.
    pub async fn insert_incident(&mut self, i: &Incident) -> Result<()> {
        sqlx::query(
            "INSERT INTO incidents (id, policy, trigger_name, service, target_key, open_target, phase, decision, plan,
                 alertname, first_alert_starts_at, opened_at, updated_at, closed_at, due_at, acted_at, verified_at,
                 owner, lease_until, version, context)
             VALUES ($1, $2, $3, $4, $5, $5, $6, $7, $8, $9, $10, $11, $12, NULL, $13, NULL, NULL, NULL, NULL, $14, $15)",
        )
        .bind(&i.id.0)
        .bind(&i.policy)
        .bind(i.trigger.clone())
        .bind(&i.service)
        .bind(&i.target_key)
        .bind(i.phase.as_str())
        .bind(to_json(&i.decision))
        .bind(i.plan.to_string())
        .bind(&i.alertname)
        .bind(ms(i.first_alert_starts_at))
        .bind(ms(i.opened_at))
        .bind(ms(i.updated_at))
        .bind(i.due_at.map(ms))
        .bind(i.version)
        .bind(i.context.to_string())
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Writes an incident's new state if nobody changed it since it was read (`version`);
    /// returns false when someone did. A closed incident frees its target.
    ///
    /// The lease is not part of it: [`Store::claim`], `renew` and `release` change the owner
    /// without changing the version, so a copy read before another replica's claim still
    /// passes the version check, and writing its (empty) owner back would hand that replica's
    /// running work to a third. The lease is only ever cleared here, when the phase is settled
    /// and the work is over; it is taken with [`StoreTx::take_lease`].
    pub async fn save_incident(&mut self, i: &Incident) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE incidents SET phase = $1, decision = $2, trigger_name = $3, updated_at = $4, closed_at = $5,
                 open_target = CASE WHEN $5 IS NULL THEN target_key ELSE NULL END,
                 due_at = $6, acted_at = $7, verified_at = $8,
                 owner = CASE WHEN $9 = 1 THEN NULL ELSE owner END,
                 lease_until = CASE WHEN $9 = 1 THEN NULL ELSE lease_until END, version = version + 1
             WHERE id = $10 AND version = $11",
        )
        .bind(i.phase.as_str())
        .bind(to_json(&i.decision))
        .bind(i.trigger.clone())
        .bind(ms(i.updated_at))
        .bind(i.closed_at.map(ms))
        .bind(i.due_at.map(ms))
        .bind(i.acted_at.map(ms))
        .bind(i.verified_at.map(ms))
        .bind(i64::from(i.phase.is_settled()))
        .bind(&i.id.0)
        .bind(i.version)
        .execute(&mut *self.tx)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Takes the lease on an incident this transaction has just moved into `executing` (its
    /// version is the one just written), so the work can start right after the commit.
    pub async fn take_lease(&mut self, i: &Incident) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE incidents SET owner = $1, lease_until = $2, version = version + 1 WHERE id = $3 AND version = $4",
        )
        .bind(i.owner.clone())
        .bind(i.lease_until.map(ms))
        .bind(&i.id.0)
        .bind(i.version)
        .execute(&mut *self.tx)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Appends to an incident's audit trail.
    pub async fn append_event(&mut self, id: &IncidentId, at: DateTime<Utc>, e: NewEvent<'_>) -> Result<()> {
        sqlx::query(
            "INSERT INTO incident_events (incident_id, at, kind, actor, phase_from, phase_to, summary, detail)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&id.0)
        .bind(ms(at))
        .bind(e.kind)
        .bind(storable(e.actor))
        .bind(e.phase_from.map(|p| p.as_str()))
        .bind(e.phase_to.map(|p| p.as_str()))
        .bind(storable(&e.summary))
        .bind(e.detail.to_string())
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Queues a notification for delivery; it commits (or not) with the change that caused it.
    pub async fn enqueue(
        &mut self,
        incident: &IncidentId,
        channel: &str,
        payload: &str,
        now: DateTime<Utc>,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO outbox (incident_id, channel, payload, state, attempts, next_attempt_at, created_at)
             VALUES ($1, $2, $3, 'pending', 0, $4, $4)",
        )
        .bind(&incident.0)
        .bind(channel)
        .bind(payload)
        .bind(ms(now))
        .execute(&mut *self.tx)
        .await?;
        if !self.queued.iter().any(|c| c == channel) {
            self.queued.push(channel.to_string());
        }
        Ok(())
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
        .execute(&mut *self.tx)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Everyone who approved an incident, in order.
    pub async fn approvers(&mut self, incident: &IncidentId) -> Result<Vec<String>> {
        let rows =
            sqlx::query("SELECT approver FROM approvals WHERE incident_id = $1 AND verdict = 'approve' ORDER BY id")
                .bind(&incident.0)
                .fetch_all(&mut *self.tx)
                .await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>(0).map_err(StoreError::from))
            .collect()
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

/// `sql` with every id bound, for the `IN (...)` list [`placeholders`] wrote.
fn bind_ids<'q>(sql: &'q str, ids: &[i64]) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    ids.iter().fold(sqlx::query(sql), |q, id| q.bind(*id))
}

/// `$1, $2, ... $n`: numbered parameters for an `IN (...)` list.
fn placeholders(n: usize) -> String {
    (1..=n).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::intake::tests::{delivery, sqlite_store};
    use super::*;

    #[tokio::test]
    async fn windows_and_leases_longer_than_the_calendar_are_clamped_not_an_overflow() {
        let (_dir, store) = crate::store::intake::tests::sqlite_store().await;
        let now = Utc::now();
        let mut tx = store.begin().await.unwrap();
        let h = tx
            .history(
                "p",
                "t",
                Some(Duration::from_millis((1 << 63) + 1)),
                Some(Duration::MAX),
                now,
            )
            .await
            .unwrap();
        assert_eq!((h.policy_rollbacks_in_window, h.global_rollbacks_in_window), (0, 0));
        drop(tx);
        assert_eq!(lease_end(now, Duration::MAX), DateTime::<Utc>::MAX_UTC);
        assert_eq!(
            lease_end(now, Duration::from_secs(30)),
            now + chrono::Duration::seconds(30)
        );
        let id = IncidentId("nobody".into());
        assert!(!store.claim(&id, "r", now, Duration::MAX).await.unwrap());
        assert!(store.claim_message(1, "r", now, Duration::MAX).await.unwrap().is_none());
    }

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

    /// A copy read before another replica's claim passes the version check (a claim does not
    /// change the version); saving it must not give that replica's lease away, or a third
    /// replica would take the same work while it runs.
    #[tokio::test]
    async fn saving_a_copy_read_before_a_claim_keeps_the_claim() {
        let (_dir, store) = sqlite_store().await;
        let now = Utc::now();
        let inc = Incident::sample(Phase::Executing, now);
        let mut tx = store.begin().await.unwrap();
        tx.insert_incident(&inc).await.unwrap();
        tx.commit().await.unwrap();

        let mut stale = store.incident(&inc.id).await.unwrap().unwrap();
        assert!(store
            .claim(&inc.id, "replica-b", now, Duration::from_secs(30))
            .await
            .unwrap());
        // Another replica's batch applies an event that keeps the phase (its last alert
        // resolved while the rollback runs) and saves its copy.
        stale.updated_at = now;
        let mut tx = store.begin().await.unwrap();
        assert!(tx.save_incident(&stale).await.unwrap(), "the version still matches");
        tx.commit().await.unwrap();
        let after = store.incident(&inc.id).await.unwrap().unwrap();
        assert_eq!(after.owner.as_deref(), Some("replica-b"));
        assert!(after.lease_until.is_some());
        assert!(
            !store
                .claim(&inc.id, "replica-c", now, Duration::from_secs(30))
                .await
                .unwrap(),
            "nobody else can take it"
        );

        // Settling ends the work and frees the lease.
        let mut done = after.clone();
        done.phase = Phase::Failed;
        let mut tx = store.begin().await.unwrap();
        assert!(tx.save_incident(&done).await.unwrap());
        tx.commit().await.unwrap();
        let settled = store.incident(&inc.id).await.unwrap().unwrap();
        assert_eq!(settled.owner, None);
        assert_eq!(settled.lease_until, None);
    }

    #[tokio::test]
    async fn the_deciding_transaction_takes_the_lease_at_the_version_it_wrote() {
        let (_dir, store) = sqlite_store().await;
        let now = Utc::now();
        let mut inc = Incident::sample(Phase::Executing, now);
        let mut tx = store.begin().await.unwrap();
        tx.insert_incident(&inc).await.unwrap();
        inc.owner = Some("replica-a".into());
        inc.lease_until = Some(now + chrono::Duration::seconds(30));
        assert!(tx.take_lease(&inc).await.unwrap());
        inc.version += 1;
        let mut stale = inc.clone();
        stale.version = 0;
        assert!(!tx.take_lease(&stale).await.unwrap(), "an older copy cannot");
        tx.commit().await.unwrap();
        let after = store.incident(&inc.id).await.unwrap().unwrap();
        assert_eq!(after.owner.as_deref(), Some("replica-a"));
        assert_eq!(after.version, 1);
    }
}
