//! Webhook intake: every alert of a delivery durably stored before the delivery is answered,
//! with group commit and a cache of alerts already stored.
//!
//! A 2xx to Alertmanager is a promise that the alerts are on disk, and a commit costs an fsync
//! (about 0.7 ms on this project's machines). One transaction per request would cap intake at
//! the disk's fsync rate and queue every request for the store's connection. Instead, request
//! handlers hand their rows to one writer task, which writes everything that queued up while
//! its previous commit was running in one transaction, and answers all of those requests after
//! that one commit. Nothing waits on purpose: an idle writer takes a request at once; under
//! load the batches grow by themselves. A batch that fails is retried one request at a time, so
//! one bad request cannot fail the others.
//!
//! Re-sends are the common case (every `group_interval`, every `repeat_interval`, once per HA
//! peer, and on retries). [`Known`] remembers, per `(fingerprint, startsAt)`, the strongest
//! status this process has seen committed; a copy that could change nothing (firing after
//! firing or resolved, resolved after resolved) is answered as a duplicate without touching the
//! store. The cache is filled only after a commit, so it never says "stored" about something
//! that is not; anything it does not know goes to the store, which stays the judge.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::AnyPool;
use tokio::sync::{mpsc, oneshot};

use super::{ms, to_json, Backend, IngestStats, Result, StoreError};
use crate::alert::{AlertStatus, Notification};

/// Requests waiting for the writer; a full queue makes handlers wait (back-pressure on the
/// sender instead of unbounded memory).
const QUEUE: usize = 1024;
/// Rows per transaction at most: bounds how long one commit holds the store in a storm.
const MAX_BATCH_ROWS: usize = 2_000;
/// Rows per INSERT statement (12 parameters per row; SQLite allows 32,766, PostgreSQL 65,535).
const ROWS_PER_STATEMENT: usize = 500;
/// Alerts remembered as stored: ~100 bytes each, so about 10 MB at most.
const KNOWN_CAPACITY: usize = 100_000;

/// One alert, ready to bind.
struct Row {
    fingerprint: String,
    starts_at: i64,
    ends_at: Option<i64>,
    status: AlertStatus,
    alertname: String,
    labels: String,
    annotations: String,
    generator_url: String,
}

/// One request's rows and where its answer goes.
struct Job {
    rows: Vec<Row>,
    group_key: String,
    external_url: String,
    received_at: i64,
    reply: oneshot::Sender<Result<u64>>,
}

/// The handle request handlers use; cheap to clone with the store.
pub(super) struct Intake {
    jobs: mpsc::Sender<Job>,
    known: Arc<Known>,
}

impl Intake {
    /// Starts the writer task on `pool`.
    pub(super) fn start(pool: AnyPool, backend: Backend) -> Intake {
        let (jobs, queue) = mpsc::channel(QUEUE);
        let known = Arc::new(Known::new(KNOWN_CAPACITY));
        tokio::spawn(write_loop(pool, queue, known.clone(), UpsertSql::new(backend)));
        Intake { jobs, known }
    }

    /// Whether deliveries are queued for the writer (the decision loop yields to them).
    pub(super) fn waiting(&self) -> bool {
        self.jobs.capacity() < self.jobs.max_capacity()
    }

    /// Stores every alert of a delivery that the store does not already have in this state;
    /// returns once they are committed.
    pub(super) async fn ingest(&self, n: &Notification, now: DateTime<Utc>) -> Result<IngestStats> {
        // One row per (fingerprint, startsAt): an upsert may touch a row once per statement. A
        // resolved copy wins over a firing one, as it would across two deliveries.
        let mut rows: Vec<Row> = Vec::with_capacity(n.alerts.len());
        let mut seen: HashMap<(&str, i64), usize> = HashMap::with_capacity(n.alerts.len());
        for a in &n.alerts {
            let starts_at = ms(a.starts_at);
            if self.known.covers(&a.fingerprint.0, starts_at, a.status) {
                continue;
            }
            let row = Row {
                fingerprint: a.fingerprint.0.clone(),
                starts_at,
                ends_at: a.ended_at().map(ms),
                status: a.status,
                alertname: a.alertname().to_string(),
                labels: to_json(&a.labels),
                annotations: to_json(&a.annotations),
                generator_url: a.generator_url.clone(),
            };
            match seen.get(&(a.fingerprint.0.as_str(), starts_at)) {
                Some(&i) if a.status == AlertStatus::Resolved => rows[i] = row,
                Some(_) => {}
                None => {
                    seen.insert((a.fingerprint.0.as_str(), starts_at), rows.len());
                    rows.push(row);
                }
            }
        }
        let total = n.alerts.len() as u64;
        if rows.is_empty() {
            return Ok(IngestStats {
                stored: 0,
                duplicates: total,
            });
        }
        let (reply, answer) = oneshot::channel();
        let job = Job {
            rows,
            group_key: n.group_key.clone(),
            external_url: n.external_url.clone(),
            received_at: ms(now),
            reply,
        };
        self.jobs.send(job).await.map_err(|_| StoreError::IntakeStopped)?;
        let stored = answer.await.map_err(|_| StoreError::IntakeStopped)??;
        Ok(IngestStats {
            stored,
            duplicates: total - stored,
        })
    }
}

/// The writer: takes whatever has queued, writes it in one transaction, answers everyone.
async fn write_loop(pool: AnyPool, mut queue: mpsc::Receiver<Job>, known: Arc<Known>, mut sql: UpsertSql) {
    while let Some(first) = queue.recv().await {
        let mut rows = first.rows.len();
        let mut batch = vec![first];
        while rows < MAX_BATCH_ROWS {
            match queue.try_recv() {
                Ok(job) => {
                    rows += job.rows.len();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        match write(&pool, &batch, &mut sql).await {
            Ok(counts) => {
                for (job, stored) in batch.into_iter().zip(counts) {
                    answer(&known, job, Ok(stored));
                }
            }
            Err(e) if batch.len() == 1 => answer(&known, batch.remove(0), Err(e)),
            Err(e) => {
                tracing::warn!(error = %e, requests = batch.len(), "intake batch failed; writing its requests one at a time");
                for job in batch {
                    let result = write(&pool, std::slice::from_ref(&job), &mut sql)
                        .await
                        .map(|counts| counts[0]);
                    answer(&known, job, result);
                }
            }
        }
    }
}

/// Remembers a committed job's alerts and wakes its handler (which may have gone: the client
/// hung up; the alerts are stored all the same and a re-send will be a duplicate).
fn answer(known: &Known, job: Job, result: Result<u64>) {
    if result.is_ok() {
        for r in &job.rows {
            known.remember(&r.fingerprint, r.starts_at, r.status);
        }
    }
    let _ = job.reply.send(result);
}

/// One transaction for a batch; the number of rows each job inserted or changed.
async fn write(pool: &AnyPool, jobs: &[Job], sql: &mut UpsertSql) -> Result<Vec<u64>> {
    let mut tx = pool.begin().await?;
    let mut counts = Vec::with_capacity(jobs.len());
    for job in jobs {
        let mut stored = 0;
        for chunk in job.rows.chunks(ROWS_PER_STATEMENT) {
            let mut q = sqlx::query(sql.get(chunk.len()));
            for r in chunk {
                q = q
                    .bind(r.fingerprint.as_str())
                    .bind(r.starts_at)
                    .bind(r.ends_at)
                    .bind(r.status.as_str())
                    .bind(r.alertname.as_str())
                    .bind(r.labels.as_str())
                    .bind(r.annotations.as_str())
                    .bind(r.generator_url.as_str())
                    .bind(job.group_key.as_str())
                    .bind(job.external_url.as_str())
                    .bind(job.received_at)
                    .bind(job.received_at);
            }
            stored += q.execute(&mut *tx).await?.rows_affected();
        }
        counts.push(stored);
    }
    tx.commit().await?;
    Ok(counts)
}

/// The multi-row upsert for N rows, built once per N. A known alert changes only from firing
/// to resolved (which marks it for processing again); a resolved alert never goes back to
/// firing (late duplicates from an HA peer).
struct UpsertSql {
    backend: Backend,
    by_rows: HashMap<usize, String>,
}

impl UpsertSql {
    fn new(backend: Backend) -> UpsertSql {
        UpsertSql {
            backend,
            by_rows: HashMap::new(),
        }
    }

    fn get(&mut self, rows: usize) -> &str {
        let backend = self.backend;
        self.by_rows.entry(rows).or_insert_with(|| {
            let mut sql = String::from(
                "INSERT INTO alerts (fingerprint, starts_at, ends_at, status, alertname, labels, annotations,
                     generator_url, group_key, external_url, received_at, updated_at, pending) VALUES ",
            );
            for k in 0..rows {
                if k > 0 {
                    sql.push_str(", ");
                }
                // SQLite maps a numbered parameter to its position by scanning the statement's
                // parameter list, for each one: quadratic in a 1,000-parameter insert. Plain `?`
                // costs nothing to place; PostgreSQL only speaks `$n`.
                let p: Vec<String> = match backend {
                    Backend::Sqlite => vec!["?".to_string(); 12],
                    Backend::Postgres => (1..=12).map(|i| format!("${}", k * 12 + i)).collect(),
                };
                sql.push_str(&format!("({}, 1)", p.join(", ")));
            }
            sql.push_str(
                " ON CONFLICT (fingerprint, starts_at) DO UPDATE
                   SET status = excluded.status, ends_at = excluded.ends_at, updated_at = excluded.updated_at,
                       annotations = excluded.annotations, pending = 1
                   WHERE alerts.status = 'firing' AND excluded.status = 'resolved'",
            );
            sql
        })
    }
}

/// Alerts this process has seen committed, with the strongest status stored (resolved beats
/// firing). Bounded; what it forgets simply goes to the store again. Keyed by the fingerprint
/// as the number it is (Alertmanager writes 16 hex digits), so a lookup neither allocates nor
/// hashes a string; other fingerprints are not cached and always go to the store.
pub(super) struct Known(quick_cache::sync::Cache<(u64, i64), AlertStatus>);

impl Known {
    pub(super) fn new(capacity: usize) -> Known {
        Known(quick_cache::sync::Cache::new(capacity))
    }

    fn key(fingerprint: &str, starts_at: i64) -> Option<(u64, i64)> {
        if fingerprint.len() != 16 {
            return None;
        }
        u64::from_str_radix(fingerprint, 16).ok().map(|f| (f, starts_at))
    }

    /// Whether storing this copy could change nothing: the store already has the alert in
    /// this status or a later one.
    pub(super) fn covers(&self, fingerprint: &str, starts_at: i64, status: AlertStatus) -> bool {
        let Some(key) = Self::key(fingerprint, starts_at) else {
            return false;
        };
        match self.0.get(&key) {
            Some(AlertStatus::Resolved) => true,
            Some(AlertStatus::Firing) => status == AlertStatus::Firing,
            None => false,
        }
    }

    /// Records a committed copy, never downgrading resolved to firing.
    pub(super) fn remember(&self, fingerprint: &str, starts_at: i64, status: AlertStatus) {
        let Some(key) = Self::key(fingerprint, starts_at) else {
            return;
        };
        if status == AlertStatus::Firing && self.0.get(&key).is_some() {
            return;
        }
        self.0.insert(key, status);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "a1b2c3d4e5f60718";

    #[test]
    fn known_alerts_cover_only_copies_that_could_change_nothing() {
        let k = Known::new(16);
        assert!(!k.covers(A, 1, AlertStatus::Firing), "unknown: ask the store");
        k.remember(A, 1, AlertStatus::Firing);
        assert!(k.covers(A, 1, AlertStatus::Firing));
        assert!(
            !k.covers(A, 1, AlertStatus::Resolved),
            "firing -> resolved must be stored"
        );
        assert!(
            !k.covers(A, 2, AlertStatus::Firing),
            "another episode (startsAt) is new"
        );
        assert!(!k.covers("a1b2c3d4e5f60719", 1, AlertStatus::Firing));
        k.remember(A, 1, AlertStatus::Resolved);
        assert!(k.covers(A, 1, AlertStatus::Resolved));
        assert!(
            k.covers(A, 1, AlertStatus::Firing),
            "a late firing copy changes nothing"
        );
        k.remember(A, 1, AlertStatus::Firing);
        assert!(k.covers(A, 1, AlertStatus::Resolved), "never downgraded");
    }

    #[test]
    fn fingerprints_that_are_not_16_hex_digits_always_go_to_the_store() {
        let k = Known::new(16);
        for fp in ["a1b2", "a1b2c3d4e5f6071", "a1b2c3d4e5f60718a", "zzb2c3d4e5f60718"] {
            k.remember(fp, 1, AlertStatus::Resolved);
            assert!(!k.covers(fp, 1, AlertStatus::Firing), "{fp}");
        }
    }

    #[test]
    fn upsert_sql_places_twelve_parameters_per_row_in_either_dialect() {
        let pg = UpsertSql::new(Backend::Postgres).get(2).to_string();
        assert!(
            pg.contains("($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 1), ($13,"),
            "{pg}"
        );
        assert!(pg.contains("$24, 1) ON CONFLICT"), "{pg}");
        let lite = UpsertSql::new(Backend::Sqlite).get(2).to_string();
        assert_eq!(lite.matches('?').count(), 24, "{lite}");
        assert!(!lite.contains('$'), "{lite}");
    }
}
