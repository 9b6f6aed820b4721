//! All SQL lives here, one file per table family: `intake` (alerts as they arrive, group
//! commit), `alerts` (claiming and reading them afterwards), `incidents`, `leases` (who runs an
//! incident's work), `events` (the audit trail), `outbox` (notifications and their handles),
//! `approvals` (votes and webhook receipts), `freezes`, plus the read-only views (`pages`), the
//! fair order of the decision loop (`fair`), re-deciding (`reconcile`) and undecidable alerts.
//! This file holds the connection, the transaction type and the conversions they share.
//!
//! One set of store code serves SQLite (the embedded default, a file in the working
//! directory) and PostgreSQL (shared by several replicas) through sqlx's `Any` driver: the SQL
//! is portable (`$n` placeholders, `ON CONFLICT`, integer milliseconds for time, JSON as text);
//! only the migrations differ per dialect. Exactly-once rests on three things written here:
//! the unique `(fingerprint, starts_at)` of an alert, the unique `open_target` of an incident,
//! and conditional updates (`WHERE version = $n`, `WHERE pending = 1`, lease expiry) that only
//! one replica can win. Phase names in SQL are always spelled by [`Phase::as_str`].

mod alerts;
mod approvals;
mod deferred;
mod durable;
mod events;
mod fair;
mod freezes;
mod health;
mod incidents;
mod intake;
mod leases;
mod outbox;
mod pages;
mod reconcile;
mod text;
mod undecidable;

pub use alerts::StoredAlert;
pub use approvals::Receipt;
pub use events::{EventRecord, NewEvent};
pub use outbox::OutboxRow;
pub use reconcile::REDECIDED;
use text::{could_be_stored, storable};
pub use undecidable::UndecidableAlert;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Transaction};

use crate::alert::Notification;
use crate::incident::Phase;

pub use pages::{IncidentFilter, Notice};

/// Which database is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// SQLite (a file): the group fdatasync every write waits for ([`durable`]).
    sync: durable::Syncer,
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

impl Store {
    /// Connects, creating the SQLite file if needed, and runs the migrations.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store> {
        Store::connect_syncing(url, max_connections, durable::WalSync::for_database).await
    }

    /// A SQLite store whose fdatasync fails (EIO) while `fail` is set, for tests of what a
    /// failed sync does beyond the store.
    #[cfg(test)]
    pub(crate) async fn connect_failing_sync_when(
        url: &str,
        fail: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<Store> {
        Store::connect_syncing(url, 1, move |db| durable::WalSync::failing_when(db, fail)).await
    }

    /// [`Store::connect`], with the syncer a SQLite file gets made by `syncer` (tests hold or
    /// fail it).
    async fn connect_syncing(
        url: &str,
        max_connections: u32,
        syncer: impl FnOnce(std::path::PathBuf) -> durable::WalSync,
    ) -> Result<Store> {
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
            // SQLITE_BUSY on lock upgrades. WAL + synchronous=NORMAL: a commit is in the WAL, and
            // every write path waits for the group fdatasync of [`durable`] before it returns.
            Backend::Sqlite => {
                opts.max_connections(1)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            sqlx::query("PRAGMA journal_mode=WAL").execute(&mut *conn).await?;
                            sqlx::query("PRAGMA synchronous=NORMAL").execute(&mut *conn).await?;
                            sqlx::query("PRAGMA busy_timeout=5000").execute(&mut *conn).await?;
                            // The commit that takes the WAL past this many pages copies them
                            // back into the database file and fsyncs it before it returns. At
                            // the default 1,000 pages (4 MB) that stall set the webhook's p99
                            // (11-19 ms at 2,000 deliveries/s); 100 pages stall a tenth as
                            // long, ten times as often: p99 5-7 ms, for ~5 % of peak throughput
                            // (docs/benchmarks.md). A checkpointer of its own, off the write
                            // path, was worse: under steady writes the WAL never starts over.
                            // With synchronous=NORMAL these stalls (an fsync of the WAL, then of
                            // the database file) are the main fsyncs left under the write lock:
                            // 1,000 and 10,000 pages gave 5-20 % more deliveries per second at
                            // 16 connections but a p99 at 2,000/s of 4.9 ms against 4.3 ms (tenth
                            // round), so the bound stays.
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
        let sync = match backend {
            Backend::Sqlite => database_file(&pool).await?.map(|f| Arc::new(syncer(f))),
            Backend::Postgres => None,
        };
        // The migrations too, and a syncer that cannot sync fails the start, not a webhook.
        durable::wait(&sync).await?;
        let intake = Arc::new(intake::Intake::start(pool.clone(), backend, sync.clone()));
        Ok(Store {
            pool,
            backend,
            intake,
            sync,
        })
    }

    /// Returns once every commit made before the call is on disk (SQLite: [`durable`]; on
    /// PostgreSQL a commit already is).
    async fn durable(&self) -> Result<()> {
        durable::wait(&self.sync).await
    }

    /// Why nothing can be made durable any more (a failed fdatasync: see [`durable`]), for
    /// `/readyz`; `None` while all is well.
    pub fn durability_failure(&self) -> Option<String> {
        self.sync.as_ref().and_then(|s| s.failure()).map(|e| e.to_string())
    }

    /// Commits a transaction begun on the pool; durable when it returns.
    async fn commit_durably(&self, tx: Transaction<'static, sqlx::Any>) -> Result<()> {
        tx.commit().await?;
        self.durable().await
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

    /// Starts a transaction for one state change.
    pub async fn begin(&self) -> Result<StoreTx> {
        Ok(StoreTx {
            tx: self.pool.begin().await?,
            backend: self.backend,
            queued: Vec::new(),
            intake: self.intake.clone(),
            sync: self.sync.clone(),
            deferred: Default::default(),
            decisions: Vec::new(),
            event_marks: Default::default(),
            joins: 0,
        })
    }
}

/// One state change's transaction: everything it writes commits together or not at all.
pub struct StoreTx {
    tx: Transaction<'static, sqlx::Any>,
    backend: Backend,
    /// Outbox channels this transaction queued messages for.
    queued: Vec<String>,
    /// Webhook deliveries waiting for the connection ride along with the commit (SQLite).
    intake: Arc<intake::Intake>,
    /// What the commit waits for before it returns ([`durable`]).
    sync: durable::Syncer,
    /// Writes held back to be sent together ([`deferred`]); every other statement goes through
    /// [`StoreTx::db`], which sends them first.
    deferred: deferred::Deferred,
    /// The latest few decisions this transaction stored, as written: a storm's alerts are
    /// mostly decided alike, and comparing costs far less than serialising. A few, not one:
    /// a batch behind a backlog takes the oldest alert of several groups first, and their
    /// decisions alternate.
    decisions: Vec<(crate::policy::Decision, Arc<str>)>,
    /// The id of each incident's latest audit entry, as far as this transaction knows it: a
    /// plain join is placed after it ([`StoreTx::join_alert`]). Forgotten for an incident when
    /// this transaction appends an entry to it.
    event_marks: foldhash::HashMap<crate::incident::IncidentId, i64>,
    /// Plain joins this transaction recorded: each one's place among them.
    joins: u32,
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
    /// (see [`intake`]), and returns once the commit is on disk: they are answered then, or go
    /// back to the writer if the commit fails.
    pub async fn commit(mut self) -> Result<Committed> {
        self.flush().await?;
        let carried = self.intake.absorb(&mut self.tx).await;
        if let Err(e) = self.tx.commit().await {
            if let Some(c) = carried {
                c.give_back();
            }
            return Err(e.into());
        }
        let synced = durable::wait(&self.sync).await;
        if let Some(c) = carried {
            c.answer(&synced);
        }
        synced?;
        Ok(Committed { queued: self.queued })
    }
}

/// The file of a SQLite database, absolute, as SQLite opened it; `None` in memory.
async fn database_file(pool: &AnyPool) -> Result<Option<std::path::PathBuf>> {
    use sqlx::Row;
    let file: String = sqlx::query("SELECT file FROM pragma_database_list WHERE name = 'main'")
        .fetch_one(pool)
        .await?
        .try_get(0)?;
    Ok((!file.is_empty()).then(|| file.into()))
}

/// `'a', 'b'`: phases as SQL literals (for `phase IN (...)` or `phase = ...`), spelled by
/// [`Phase::as_str`] so that SQL and enum cannot drift apart; our own fixed names, never input.
fn sql_phases(phases: &[Phase]) -> String {
    phases
        .iter()
        .map(|p| format!("'{}'", p.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `sql` with every id bound, for the `IN (...)` list [`placeholders`] wrote.
fn bind_ids<'q>(sql: &'q str, ids: &[i64]) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    ids.iter().fold(sqlx::query(sql), |q, id| q.bind(*id))
}

/// `n` parameters for an `IN (...)` list bound in order: `$1, $2, ... $n` on PostgreSQL,
/// `?, ?, ...` on SQLite, where sqlx looks every `$n` up by name in a list SQLite keeps per
/// statement (a linear search each: quadratic in the parameters of a multi-row statement).
fn placeholders(backend: Backend, n: usize) -> String {
    match backend {
        Backend::Postgres => (1..=n).map(|i| format!("${i}")).collect::<Vec<_>>().join(", "),
        Backend::Sqlite => vec!["?"; n].join(", "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::incident::IncidentId;
    use chrono::Utc;

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
}
