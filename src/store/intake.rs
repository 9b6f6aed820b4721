//! Webhook intake: every alert of a delivery durably stored before the delivery is answered,
//! with group commit and a cache of alerts already stored.
//!
//! A 2xx to Alertmanager is a promise that the alerts are on disk, and making a commit durable
//! costs an fsync (0.25-0.7 ms on this project's machines). One transaction per request would
//! cap intake at the disk's fsync rate and queue every request for the store's connection.
//! Instead, request handlers queue their rows for one writer task, which writes everything that
//! queued up while its previous commit was running in one transaction, and answers all of those
//! requests after that one commit is durable. On SQLite the fsync is not part of the commit: a
//! group fdatasync of the WAL ([`super::durable`]) makes it durable while the writer is already
//! writing the next batch. Nothing waits on purpose: an idle writer takes a request at once; under
//! load the batches grow by themselves. A batch that fails is retried one request at a time, so
//! one bad request cannot fail the others.
//!
//! On SQLite every transaction shares one connection, so a delivery that arrives while another
//! transaction holds it (the decision loop, mostly) would wait for that commit and then for
//! one of its own: two fsyncs. Instead that transaction writes the waiting deliveries too and
//! commits them with its own work ([`Intake::absorb`], called by `StoreTx::commit`): one fsync,
//! and the deliveries are answered after it. If that commit fails they go back to the queue,
//! and the writer takes them alone.
//!
//! Re-sends are the common case (every `group_interval`, every `repeat_interval`, once per HA
//! peer, and on retries). [`Known`] remembers, per `(fingerprint, startsAt)`, the strongest
//! status this process has seen committed; a copy that could change nothing (firing after
//! firing or resolved, resolved after resolved) is answered as a duplicate without touching the
//! store. The cache is filled only after a commit, so it never says "stored" about something
//! that is not; anything it does not know goes to the store, which stays the judge.

use std::collections::VecDeque;

use foldhash::{HashMap, HashMapExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use sqlx::{AnyConnection, AnyPool};
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};

use super::durable::{self, Syncer};
use super::{ms, to_json, Backend, IngestStats, Result, StoreError};
use crate::alert::{AlertStatus, Notification};

/// Requests queued for the writer at most; beyond that handlers wait (back-pressure on the
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
    /// Another transaction tried to carry it and failed: only the writer takes it now.
    carried: bool,
    /// Its place in the queue, given back when it is answered.
    _room: OwnedSemaphorePermit,
}

/// The deliveries waiting to be written, shared by the handlers, the writer and (on SQLite)
/// any transaction that commits while they wait.
struct Queue {
    jobs: Mutex<VecDeque<Job>>,
    ready: Notify,
    room: Arc<Semaphore>,
    closed: AtomicBool,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Job>> {
        // A panic while holding the lock leaves a consistent queue (push and pop only).
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes jobs from the front up to [`MAX_BATCH_ROWS`] rows; `carried_too` also takes jobs
    /// that another transaction failed to carry (only the writer does).
    fn take(&self, carried_too: bool) -> Vec<Job> {
        let mut q = self.lock();
        let mut batch = Vec::new();
        let mut rows = 0;
        while let Some(job) = q.front() {
            if rows > 0 && rows + job.rows.len() > MAX_BATCH_ROWS {
                break;
            }
            if job.carried && !carried_too {
                break;
            }
            rows += job.rows.len();
            batch.extend(q.pop_front());
        }
        batch
    }

    /// Puts jobs back at the front, in their order, for the writer alone.
    fn give_back(&self, jobs: Vec<Job>) {
        let mut q = self.lock();
        for mut job in jobs.into_iter().rev() {
            job.carried = true;
            q.push_front(job);
        }
        drop(q);
        self.ready.notify_one();
    }
}

/// The handle request handlers use; cheap to clone with the store.
pub(super) struct Intake {
    queue: Arc<Queue>,
    known: Arc<Known>,
    sql: Arc<Mutex<UpsertSql>>,
    /// Whether other transactions carry waiting deliveries (SQLite: one shared connection).
    carry: bool,
}

impl Drop for Intake {
    fn drop(&mut self) {
        // The writer ends once the queue is empty, and with it its hold on the pool.
        self.queue.closed.store(true, Ordering::Release);
        self.queue.ready.notify_one();
    }
}

impl Intake {
    /// Starts the writer task on `pool`.
    pub(super) fn start(pool: AnyPool, backend: Backend, sync: Syncer) -> Intake {
        let queue = Arc::new(Queue {
            jobs: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            room: Arc::new(Semaphore::new(QUEUE)),
            closed: AtomicBool::new(false),
        });
        let known = Arc::new(Known::new(KNOWN_CAPACITY));
        let sql = Arc::new(Mutex::new(UpsertSql::new(backend)));
        tokio::spawn(write_loop(pool, queue.clone(), known.clone(), sql.clone(), sync));
        Intake {
            queue,
            known,
            sql,
            carry: backend == Backend::Sqlite,
        }
    }

    /// Whether deliveries are queued for the writer (the decision loop yields to them).
    pub(super) fn waiting(&self) -> bool {
        !self.queue.lock().is_empty()
    }

    /// How many deliveries are queued for the writer.
    #[cfg(test)]
    pub(super) fn queue_len(&self) -> usize {
        self.queue.lock().len()
    }

    /// Stores every alert of a delivery that the store does not already have in this state;
    /// returns once they are committed and on disk.
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
        let room = self
            .queue
            .room
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::IntakeStopped)?;
        let (reply, answer) = oneshot::channel();
        let job = Job {
            rows,
            group_key: n.group_key.clone(),
            external_url: n.external_url.clone(),
            received_at: ms(now),
            reply,
            carried: false,
            _room: room,
        };
        self.queue.lock().push_back(job);
        self.queue.ready.notify_one();
        let stored = answer.await.map_err(|_| StoreError::IntakeStopped)??;
        Ok(IngestStats {
            stored,
            duplicates: total - stored,
        })
    }

    /// Writes the deliveries waiting in the queue into `conn`'s open transaction, which is
    /// about to commit; the caller answers them with [`Carried::answer`] once it knows how the
    /// commit went. Only on SQLite, where that transaction holds the one connection the writer
    /// is waiting for. Inside a savepoint: a failed write leaves nothing of them in the
    /// transaction, and they go back to the writer at once.
    pub(super) async fn absorb(&self, conn: &mut AnyConnection) -> Option<Carried> {
        if !self.carry {
            return None;
        }
        let jobs = self.queue.take(false);
        if jobs.is_empty() {
            return None;
        }
        let written = match sqlx::query("SAVEPOINT intake").execute(&mut *conn).await {
            Ok(_) => write_in(conn, &jobs, &self.sql).await,
            Err(e) => Err(e.into()),
        };
        let written = match written {
            Ok(counts) => sqlx::query("RELEASE intake")
                .execute(&mut *conn)
                .await
                .map(|_| counts)
                .map_err(StoreError::from),
            Err(e) => {
                let _ = sqlx::query("ROLLBACK TO intake").execute(&mut *conn).await;
                let _ = sqlx::query("RELEASE intake").execute(&mut *conn).await;
                Err(e)
            }
        };
        match written {
            Ok(counts) => Some(Carried {
                jobs,
                counts,
                queue: self.queue.clone(),
                known: self.known.clone(),
            }),
            Err(e) => {
                tracing::debug!(error = %e, requests = jobs.len(), "carrying deliveries in another commit failed; the writer takes them");
                self.queue.give_back(jobs);
                None
            }
        }
    }
}

/// Deliveries written into another transaction, waiting for its commit.
pub(super) struct Carried {
    jobs: Vec<Job>,
    counts: Vec<u64>,
    queue: Arc<Queue>,
    known: Arc<Known>,
}

impl Carried {
    /// Answers them once the commit that carried them is durable (`synced`), or with its
    /// error: the rows are in the store but not known to be on disk, so the sender must retry.
    pub(super) fn answer(self, synced: &Result<()>) {
        answer_all(&self.known, self.jobs, self.counts, synced);
    }

    /// Gives them back to the writer: the commit that carried them failed.
    pub(super) fn give_back(self) {
        self.queue.give_back(self.jobs);
    }
}

/// Answers jobs whose commit stored `counts`, after its sync (`synced`).
fn answer_all(known: &Known, jobs: Vec<Job>, counts: Vec<u64>, synced: &Result<()>) {
    for (job, stored) in jobs.into_iter().zip(counts) {
        let result = match synced {
            Ok(()) => Ok(stored),
            Err(e) => Err(StoreError::Unavailable(e.to_string())),
        };
        answer(known, job, result);
    }
}

/// The writer: takes whatever has queued, writes it in one transaction, answers everyone once
/// it is durable. On SQLite the sync runs while the writer writes the next batch: a task per
/// batch waits for it and answers.
async fn write_loop(pool: AnyPool, queue: Arc<Queue>, known: Arc<Known>, sql: Arc<Mutex<UpsertSql>>, sync: Syncer) {
    loop {
        if queue.lock().is_empty() {
            if queue.closed.load(Ordering::Acquire) {
                break;
            }
            queue.ready.notified().await;
            continue;
        }
        // The connection first, then the jobs: until the connection is free, whoever holds
        // it may carry them in its own commit.
        let mut conn = match pool.acquire().await {
            Ok(conn) => conn,
            Err(e) => {
                for job in queue.take(true) {
                    answer(&known, job, Err(StoreError::Unavailable(e.to_string())));
                }
                continue;
            }
        };
        let mut batch = queue.take(true);
        if batch.is_empty() {
            continue;
        }
        let written = commit_jobs(&mut conn, &batch, &sql).await;
        // Returned (a failed transaction rolled back) before the retries below: on SQLite it
        // is the only connection.
        drop(conn);
        match written {
            Ok(counts) => match &sync {
                Some(s) => {
                    let (s, known) = (s.clone(), known.clone());
                    tokio::spawn(async move { answer_all(&known, batch, counts, &s.wait().await) });
                }
                None => answer_all(&known, batch, counts, &Ok(())),
            },
            Err(e) if batch.len() == 1 => answer(&known, batch.remove(0), Err(e)),
            Err(e) => {
                tracing::warn!(error = %e, requests = batch.len(), "intake batch failed; writing its requests one at a time");
                for job in batch {
                    let result = write_alone(&pool, &job, &sql, &sync).await;
                    answer(&known, job, result);
                }
            }
        }
    }
}

/// Writes one job in a transaction of its own; durable when it returns.
async fn write_alone(pool: &AnyPool, job: &Job, sql: &Mutex<UpsertSql>, sync: &Syncer) -> Result<u64> {
    let mut conn = pool.acquire().await?;
    let counts = commit_jobs(&mut conn, std::slice::from_ref(job), sql).await?;
    drop(conn);
    durable::wait(sync).await?;
    Ok(counts[0])
}

/// Writes jobs and commits them (durable once the sync that follows is done). One job that
/// fits one statement is that statement alone, which SQLite and PostgreSQL commit as its own
/// transaction: no BEGIN and COMMIT round trips, and on SQLite no statement journal, which a
/// multi-row statement inside an explicit transaction keeps (every page it touches copied, in
/// case it fails half-way). That is every delivery that finds the writer idle. Anything more
/// is one transaction.
async fn commit_jobs(conn: &mut AnyConnection, jobs: &[Job], sql: &Mutex<UpsertSql>) -> Result<Vec<u64>> {
    match jobs {
        [job] if job.rows.len() <= ROWS_PER_STATEMENT => write_in(conn, jobs, sql).await,
        _ => {
            let mut tx = sqlx::Connection::begin(conn).await?;
            let counts = write_in(&mut tx, jobs, sql).await?;
            tx.commit().await?;
            Ok(counts)
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

/// Writes jobs into an open transaction; the number of rows each job inserted or changed.
async fn write_in(conn: &mut AnyConnection, jobs: &[Job], sql: &Mutex<UpsertSql>) -> Result<Vec<u64>> {
    let mut counts = Vec::with_capacity(jobs.len());
    for job in jobs {
        let mut stored = 0;
        for chunk in job.rows.chunks(ROWS_PER_STATEMENT) {
            let stmt = sql.lock().unwrap_or_else(|p| p.into_inner()).get(chunk.len());
            let mut q = sqlx::query(&stmt);
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
            stored += q.execute(&mut *conn).await?.rows_affected();
        }
        counts.push(stored);
    }
    Ok(counts)
}

/// The multi-row upsert for N rows, built once per N. A known alert changes only from firing
/// to resolved (which marks it for processing again); a resolved alert never goes back to
/// firing (late duplicates from an HA peer).
struct UpsertSql {
    backend: Backend,
    by_rows: HashMap<usize, Arc<str>>,
}

impl UpsertSql {
    fn new(backend: Backend) -> UpsertSql {
        UpsertSql {
            backend,
            by_rows: HashMap::new(),
        }
    }

    fn get(&mut self, rows: usize) -> Arc<str> {
        let backend = self.backend;
        self.by_rows
            .entry(rows)
            .or_insert_with(|| {
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
                sql.into()
            })
            .clone()
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
        // Lower case only, as Alertmanager writes them: parsing ignores case, so "A1B2..."
        // and "a1b2..." would share a key while the store keeps them apart.
        if fingerprint.len() != 16 || !fingerprint.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
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
#[path = "intake_tests.rs"]
pub(super) mod tests;
