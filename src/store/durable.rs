//! SQLite's durability, taken off the write lock: commits are written with
//! `synchronous=NORMAL` (into the WAL, no fsync) and a thread of our own fdatasyncs the WAL for
//! everything committed so far; whoever committed waits for that before anyone is told.
//!
//! Why: SQLite has one writer, and with `synchronous=FULL` its commit holds the write lock
//! while the fsync runs, so at 16 webhooks in flight the commits ran one after another (the
//! batch's CPU, then its fsync) and the core sat 28 % idle (docs/benchmarks.md, ninth round).
//! Here the next batch is written while the last one is being synced.
//!
//! What still holds: every write path of the store (the single writes followed by
//! `Store::durable`, [`super::StoreTx::commit`], the intake writer) returns, and every webhook
//! is answered, only after a sync that *started after* its commit had finished, so the commit
//! is on disk. A kill -9 loses nothing either way: the WAL frames are in the page cache, and
//! SQLite's recovery reads them back. What is new: another connection can read a commit before
//! its sync is done; anything acting on what it reads (a lease claim, an outbox claim) writes
//! first and waits for its own sync, which covers every earlier WAL frame too.
//!
//! A failed fdatasync is final, as in PostgreSQL: Linux marks the pages it could not write as
//! clean, so a later fdatasync would succeed without them, and after a power loss SQLite's
//! recovery would stop at the first lost frame, dropping every commit after it. So from the
//! first failure on, every wait fails (webhooks get 503, nothing is acknowledged), `/readyz`
//! says why, and only a restart (SQLite then reads back what did reach the disk) recovers.
//! A full disk is not such a failure: SQLite's write into the WAL fails first, its commit
//! fails and changes nothing, and the service recovers when space returns.
//! PostgreSQL needs none of this (its commit is durable and group-committed by the server):
//! there [`WalSync`] is absent and waiting is free.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::watch;

use super::{Result, StoreError};

/// How syncs are done: the WAL file (production), or a stand-in for tests.
type SyncFn = Box<dyn FnMut() -> std::io::Result<()> + Send>;

/// Syncs finished, as waiters see them.
#[derive(Debug, Clone, Default)]
struct Finished {
    /// The number of the last sync that finished (syncs run one at a time, in order).
    through: u64,
    /// The number of the last sync that succeeded before the first failure; it never moves
    /// after one.
    ok_through: u64,
    /// The first failure, which is final.
    failed: Option<String>,
}

#[derive(Default)]
struct Requests {
    /// Syncs started so far (the one running included).
    started: u64,
    /// The highest sync number a waiter needs.
    wanted: u64,
    /// Waits registered so far (for tests and debugging).
    waits: u64,
    closed: bool,
}

struct Shared {
    requests: Mutex<Requests>,
    work: Condvar,
    /// The thread holds the sending side: should it ever stop, waiting fails instead of hanging.
    finished: watch::Receiver<Finished>,
}

impl Shared {
    fn requests(&self) -> std::sync::MutexGuard<'_, Requests> {
        // Only counters behind it: a panic elsewhere leaves them consistent.
        self.requests.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a store's writes wait for: the syncer of its SQLite file, or nothing (PostgreSQL, or a
/// database in memory).
pub(super) type Syncer = Option<Arc<WalSync>>;

/// Returns once every commit made before the call is on disk (see the module's text); at once
/// when there is no syncer.
pub(super) async fn wait(sync: &Syncer) -> Result<()> {
    match sync {
        Some(s) => s.wait().await,
        None => Ok(()),
    }
}

/// The group syncer of one SQLite database.
pub(super) struct WalSync {
    shared: Arc<Shared>,
}

impl Drop for WalSync {
    fn drop(&mut self) {
        self.shared.requests().closed = true;
        self.shared.work.notify_one();
    }
}

impl WalSync {
    /// A syncer of the database file `db` (its WAL is `db-wal`).
    pub(super) fn for_database(db: PathBuf) -> WalSync {
        let mut wal = WalFile::new(db);
        WalSync::start(Box::new(move || wal.sync()))
    }

    /// [`WalSync::for_database`] whose fdatasync fails (EIO) while `fail` is set: for tests of
    /// what a failed sync does beyond the store (readiness).
    #[cfg(test)]
    pub(super) fn failing_when(db: PathBuf, fail: Arc<std::sync::atomic::AtomicBool>) -> WalSync {
        let mut wal = WalFile::new(db);
        WalSync::start(Box::new(move || {
            if fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(std::io::Error::other("injected EIO"));
            }
            wal.sync()
        }))
    }

    /// Starts the syncing thread around `sync`.
    pub(super) fn start(mut sync: SyncFn) -> WalSync {
        let (tx, rx) = watch::channel(Finished::default());
        let shared = Arc::new(Shared {
            requests: Mutex::new(Requests::default()),
            work: Condvar::new(),
            finished: rx,
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("rr-wal-sync".into())
            .spawn(move || loop {
                let n = {
                    let mut r = s.requests();
                    while r.wanted <= r.started && !r.closed {
                        r = s.work.wait(r).unwrap_or_else(|p| p.into_inner());
                    }
                    if r.wanted <= r.started {
                        return; // closed, nobody waiting
                    }
                    r.started += 1;
                    r.started
                };
                let failed_before = tx.borrow().failed.is_some();
                // After a failure nothing is synced any more: every wait fails anyway.
                let result = if failed_before { Ok(()) } else { sync() };
                if let Err(e) = &result {
                    tracing::error!(error = %e, "fdatasync of the SQLite WAL failed: what it covered may not be on disk; \
                                    every write is refused from now on, restart the service once the disk is healthy");
                }
                tx.send_modify(|f| {
                    f.through = n;
                    match result {
                        Ok(()) if f.failed.is_none() => f.ok_through = n,
                        Ok(()) => {}
                        Err(e) => f.failed = Some(e.to_string()),
                    }
                });
            })
            .expect("spawning the WAL sync thread");
        WalSync { shared }
    }

    /// Returns once everything committed before this call is on disk: after a sync that started
    /// after the call. Waiters that arrive while a sync runs share the next one.
    pub(super) async fn wait(&self) -> Result<()> {
        let mut finished = self.shared.finished.clone();
        if let Some(e) = self.failure() {
            return Err(e);
        }
        let target = {
            let mut r = self.shared.requests();
            let target = r.started + 1;
            r.wanted = r.wanted.max(target);
            r.waits += 1;
            target
        };
        self.shared.work.notify_one();
        let f = finished
            .wait_for(|f| f.through >= target)
            .await
            .map_err(|_| StoreError::Unavailable("the WAL sync thread has stopped".into()))?;
        if f.ok_through >= target {
            Ok(())
        } else {
            drop(f);
            Err(self
                .failure()
                .unwrap_or_else(|| StoreError::Unavailable("the WAL sync failed".into())))
        }
    }

    /// The failed sync that ended durability for this process, as the error every write gets.
    pub(super) fn failure(&self) -> Option<StoreError> {
        self.shared.finished.borrow().failed.as_ref().map(|e| {
            StoreError::Unavailable(format!(
                "the database file could not be synced to disk ({e}): nothing is acknowledged any more; \
                 restart the service once the disk is healthy"
            ))
        })
    }
}

/// The WAL file, held open: an error the kernel met writing it back is reported to every
/// descriptor open at the time, so a descriptor opened afresh for each sync could miss one.
struct WalFile {
    db: PathBuf,
    wal: PathBuf,
    open: Option<(File, (u64, u64))>,
}

impl WalFile {
    fn new(db: PathBuf) -> WalFile {
        let mut wal = db.clone().into_os_string();
        wal.push("-wal");
        WalFile {
            db,
            wal: wal.into(),
            open: None,
        }
    }

    fn sync(&mut self) -> std::io::Result<()> {
        let not_found = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
        let meta = match std::fs::metadata(&self.wal) {
            Ok(m) => m,
            Err(e) if not_found(&e) => return self.no_wal(),
            Err(e) => return Err(e),
        };
        let id = (meta.dev(), meta.ino());
        if self.open.as_ref().map(|(_, open_id)| *open_id) != Some(id) {
            let file = match File::open(&self.wal) {
                Ok(f) => f,
                // Removed since the look above (the last connection closed): see `no_wal`.
                Err(e) if not_found(&e) => return self.no_wal(),
                Err(e) => return Err(e),
            };
            // A WAL created since we last looked (SQLite reopened the database): its name in the
            // directory must reach the disk too, or a power loss could lose the whole file.
            if let Some(dir) = self.wal.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)?.sync_all()?;
            }
            self.open = Some((file, id));
        }
        match &self.open {
            Some((file, _)) => file.sync_data(),
            None => Ok(()),
        }
    }

    /// No WAL: SQLite checkpointed it into the database file, synced that, and removed it (the
    /// last connection closed). The database file is what holds the commits now.
    fn no_wal(&mut self) -> std::io::Result<()> {
        self.open = None;
        File::open(&self.db)?.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiters_are_released_only_by_a_sync_that_started_after_they_called_and_share_it() {
        let syncs = Arc::new(AtomicU64::new(0));
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let gate_rx = Mutex::new(gate_rx);
        let s = syncs.clone();
        let w = Arc::new(WalSync::start(Box::new(move || {
            gate_rx.lock().unwrap().recv().ok();
            s.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })));
        // The first waiter starts sync 1, which blocks on the gate.
        let first = tokio::spawn({
            let w = w.clone();
            async move { w.wait().await }
        });
        while w.shared.requests().started < 1 {
            tokio::task::yield_now().await;
        }
        // These arrive while sync 1 runs: it may have begun before their commits, so none of them
        // may be released by it.
        let later: Vec<_> = (0..50)
            .map(|_| {
                let w = w.clone();
                tokio::spawn(async move { w.wait().await })
            })
            .collect();
        // All of them waiting, sync 1 still held: every one of them needs sync 2.
        while w.shared.requests().waits < 51 {
            tokio::task::yield_now().await;
        }
        assert_eq!(w.shared.requests().wanted, 2);
        gate_tx.send(()).unwrap();
        first.await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            later.iter().all(|h| !h.is_finished()),
            "released by a sync that started before they called"
        );
        drop(gate_tx); // every sync from now on runs at once
        for h in later {
            h.await.unwrap().unwrap();
        }
        assert_eq!(syncs.load(Ordering::SeqCst), 2, "the 50 later waiters share one sync");
    }

    #[tokio::test]
    async fn a_failed_sync_is_final_and_nothing_is_synced_after_it() {
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        let w = WalSync::start(Box::new(move || {
            if c.fetch_add(1, Ordering::SeqCst) == 1 {
                Err(std::io::Error::other("EIO"))
            } else {
                Ok(())
            }
        }));
        w.wait().await.unwrap();
        assert!(w.failure().is_none());
        let e = w.wait().await.unwrap_err();
        assert!(
            e.to_string().contains("could not be synced") && e.to_string().contains("EIO"),
            "{e}"
        );
        // A later fdatasync would succeed without the pages the failed one lost: none is trusted.
        assert!(w.wait().await.is_err());
        assert!(w.wait().await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 2, "nothing synced after the failure");
        assert!(w.failure().is_some());
    }

    #[test]
    fn the_wal_file_is_synced_and_a_missing_one_syncs_the_database_file() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("s.db");
        std::fs::write(&db, b"db").unwrap();
        let mut f = WalFile::new(db.clone());
        f.sync().unwrap();
        assert!(f.open.is_none());
        std::fs::write(dir.path().join("s.db-wal"), b"wal").unwrap();
        f.sync().unwrap();
        let first = f.open.as_ref().unwrap().1;
        // Recreated (a new inode): opened again.
        std::fs::remove_file(dir.path().join("s.db-wal")).unwrap();
        std::fs::write(dir.path().join("s.db-wal.tmp"), b"wal2").unwrap();
        std::fs::rename(dir.path().join("s.db-wal.tmp"), dir.path().join("s.db-wal")).unwrap();
        f.sync().unwrap();
        assert_ne!(f.open.as_ref().unwrap().1, first);
        std::fs::remove_file(&db).unwrap();
        std::fs::remove_file(dir.path().join("s.db-wal")).unwrap();
        assert!(f.sync().is_err(), "neither file: the commits are nowhere to sync");
    }

    /// A store whose syncer can be held (nothing it covers may be answered) or made to fail.
    async fn store_with_controlled_sync() -> (tempfile::TempDir, crate::store::Store, Arc<Control>) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("s.db").display());
        let control = Arc::new(Control::default());
        let c = control.clone();
        let store = crate::store::Store::connect_syncing(&url, 1, move |db| {
            let mut wal = WalFile::new(db);
            WalSync::start(Box::new(move || {
                while c.hold.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                c.syncs.fetch_add(1, Ordering::SeqCst);
                if c.fail.load(Ordering::SeqCst) {
                    return Err(std::io::Error::other("injected EIO"));
                }
                wal.sync()
            }))
        })
        .await
        .unwrap();
        (dir, store, control)
    }

    #[derive(Default)]
    struct Control {
        hold: std::sync::atomic::AtomicBool,
        fail: std::sync::atomic::AtomicBool,
        syncs: AtomicU64,
    }

    fn freeze() -> crate::policy::Freeze {
        crate::policy::Freeze {
            reason: "test".into(),
            by: "me".into(),
            until: None,
        }
    }

    /// Waits (bounded) until `done` says the writes are committed, then checks that none of
    /// `pending` has returned while the syncer is held, releases it and returns them.
    async fn held_until_released<T: std::fmt::Debug>(
        control: &Control,
        mut committed: impl AsyncFnMut() -> bool,
        pending: Vec<(&str, tokio::task::JoinHandle<T>)>,
    ) -> Vec<T> {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !committed().await {
            assert!(std::time::Instant::now() < deadline, "the writes never committed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        for (what, h) in &pending {
            assert!(!h.is_finished(), "{what} returned before its sync");
        }
        control.hold.store(false, Ordering::SeqCst);
        let mut out = Vec::new();
        for (_, h) in pending {
            out.push(h.await.unwrap());
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_webhook_written_by_the_intake_writer_is_answered_only_after_its_sync() {
        use crate::store::intake::tests::delivery;
        let (_dir, store, control) = store_with_controlled_sync().await;
        control.hold.store(true, Ordering::SeqCst);
        let before = control.syncs.load(Ordering::SeqCst);
        let s = store.clone();
        let ingest = tokio::spawn(async move { s.ingest(&delivery(&["a1b2c3d4e5f60718"]), chrono::Utc::now()).await });
        // Committed (another connection reads it) but not yet on disk: nobody is told.
        let out = held_until_released(
            &control,
            async || store.alert_count().await.unwrap() == 1,
            vec![("the webhook", ingest)],
        )
        .await;
        assert_eq!(out[0].as_ref().unwrap().stored, 1);
        assert!(control.syncs.load(Ordering::SeqCst) > before);
        // Remembered as stored only now: a re-send is a duplicate without the store.
        let again = store
            .ingest(&delivery(&["a1b2c3d4e5f60718"]), chrono::Utc::now())
            .await
            .unwrap();
        assert_eq!((again.stored, again.duplicates), (0, 1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transaction_and_the_webhook_it_carried_return_only_after_their_sync() {
        use crate::store::intake::tests::queued_behind;
        let (_dir, store, control) = store_with_controlled_sync().await;
        let tx = store.begin().await.unwrap();
        let ingest = queued_behind(&store, &["a1b2c3d4e5f60718"]).await;
        control.hold.store(true, Ordering::SeqCst);
        let commit = tokio::spawn(async move { tx.commit().await.map(|_| ()) });
        let out = held_until_released(
            &control,
            async || store.alert_count().await.unwrap() == 1,
            vec![("the carried webhook", ingest)],
        )
        .await;
        assert_eq!(out[0].as_ref().unwrap().stored, 1);
        commit.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transactions_commit_returns_only_after_its_sync() {
        use crate::store::intake::tests::delivery;
        let (_dir, store, control) = store_with_controlled_sync().await;
        store
            .ingest(&delivery(&["a1b2c3d4e5f60718"]), chrono::Utc::now())
            .await
            .unwrap();
        let id = store.pending_alert_ids(1).await.unwrap()[0];
        control.hold.store(true, Ordering::SeqCst);
        let s = store.clone();
        let commit = tokio::spawn(async move {
            let mut tx = s.begin().await?;
            tx.mark_undecidable(id, "a test").await?;
            tx.commit().await.map(|_| ())
        });
        let out = held_until_released(
            &control,
            async || store.undecidable_alerts(10).await.unwrap().len() == 1,
            vec![("the commit", commit)],
        )
        .await;
        out.into_iter().next().unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn single_writes_return_only_after_their_sync() {
        let (_dir, store, control) = store_with_controlled_sync().await;
        control.hold.store(true, Ordering::SeqCst);
        let now = chrono::Utc::now();
        let id = crate::incident::IncidentId("inc-1".into());
        let spawn = |f: std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>| tokio::spawn(f);
        let (s1, s2, s3, s4) = (store.clone(), store.clone(), store.clone(), store.clone());
        let (i3, i4) = (id.clone(), id.clone());
        let pending = vec![
            (
                "a freeze",
                spawn(Box::pin(async move { s1.freeze("*", &freeze(), now).await })),
            ),
            (
                "a webhook receipt",
                spawn(Box::pin(async move {
                    s2.first_receipt("pagerduty", "evt-1", now).await.map(|_| ())
                })),
            ),
            (
                "a notification handle",
                spawn(Box::pin(async move { s3.set_ref(&i3, "slack", "ts", "1.2").await })),
            ),
            (
                "an audit note",
                spawn(Box::pin(async move {
                    s4.note(
                        &i4,
                        now,
                        crate::incident::AuditKind::NotificationFailed,
                        "me",
                        "x",
                        &serde_json::Value::Null,
                    )
                    .await
                })),
            ),
        ];
        let out = held_until_released(
            &control,
            // Reads only: a write here would wait for the held sync too.
            async || {
                store.freezes(now).await.unwrap().global.is_some() && store.refs(&id, "slack").await.unwrap().len() == 1
            },
            pending,
        )
        .await;
        for r in out {
            r.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_failed_sync_nothing_is_acknowledged_until_a_restart() {
        use crate::store::intake::tests::delivery;
        let (_dir, store, control) = store_with_controlled_sync().await;
        let now = chrono::Utc::now();
        store.ingest(&delivery(&["a1b2c3d4e5f60717"]), now).await.unwrap();
        assert!(store.durability_failure().is_none());
        control.fail.store(true, Ordering::SeqCst);
        let e = store.ingest(&delivery(&["a1b2c3d4e5f60718"]), now).await.unwrap_err();
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        // The disk answers again, but a later fdatasync would not rewrite the pages the failed
        // one lost: the retry, a new delivery and every other write are refused all the same.
        control.fail.store(false, Ordering::SeqCst);
        assert!(store.ingest(&delivery(&["a1b2c3d4e5f60718"]), now).await.is_err());
        assert!(store.ingest(&delivery(&["a1b2c3d4e5f60719"]), now).await.is_err());
        assert!(store.freeze("*", &freeze(), now).await.is_err());
        assert!(store.begin().await.unwrap().commit().await.is_err());
        let why = store.durability_failure().expect("readiness says why");
        assert!(why.contains("injected EIO") && why.contains("restart"), "{why}");
        // What was acknowledged before the failure is still known as stored.
        let dup = store.ingest(&delivery(&["a1b2c3d4e5f60717"]), now).await.unwrap();
        assert_eq!((dup.stored, dup.duplicates), (0, 1));
    }

    /// A batch that fails is written again one delivery at a time (`write_alone`): each of
    /// those is answered only after its own sync, like any other.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delivery_the_writer_retries_alone_is_answered_only_after_its_sync() {
        use crate::store::intake::tests::good_and_refused_queued_behind;
        let (_dir, store, control) = store_with_controlled_sync().await;
        let mut tx = store.begin().await.unwrap();
        // The transaction's carry fails on the refused delivery, the writer's batch of both
        // fails too, and then each goes alone.
        let (good, bad) = good_and_refused_queued_behind(&store, &mut tx).await;
        control.hold.store(true, Ordering::SeqCst);
        let commit = tokio::spawn(async move { tx.commit().await.map(|_| ()) });
        let out = held_until_released(
            &control,
            async || store.alert_count().await.unwrap() == 1,
            vec![("the good delivery, written alone", good)],
        )
        .await;
        assert_eq!(out[0].as_ref().unwrap().stored, 1);
        assert!(bad
            .await
            .unwrap()
            .unwrap_err()
            .to_string()
            .contains("refused by the test"));
        commit.await.unwrap().unwrap();
    }
}
