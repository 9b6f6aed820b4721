//! Holding an incident's lease while this replica works on it (the action, the verification).
//!
//! The claim (`Store::claim`, or the deciding transaction) comes before; the work's result,
//! recorded in a transaction that first re-checks the lease (`StoreTx::hold_lease`), comes
//! after. While the work runs, [`Responder::with_lease`] renews the lease every third of its
//! length. A renewal the store cannot answer is retried for as long as the lease still runs:
//! nobody else can claim the incident before it runs out. The lease counts as lost only when
//! it ran out unrenewed or somebody else holds it. A replica that lost it stops before its next
//! write, or its next retry of a failing write (work with no writes, such as verification,
//! stops at once), records nothing further as its own and leaves the incident to the holder:
//! two replicas must never both write.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tracing::warn;

use super::{Clock, Responder};
use crate::incident::IncidentId;
use crate::metrics::Metrics;

/// Where this replica's hold on a lease stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Held,
    /// Ran out or taken: no further write, nothing more recorded as ours.
    Lost,
    /// Lost, and the work is waiting at its next write: nothing is in flight, it can be dropped.
    Parked,
}

/// When work that lost its lease may be dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StopAt {
    /// At once: the work only reads (verification).
    Loss,
    /// When it reaches its next write or a retry of one ([`Lease::before_write`]); an attempt
    /// or read-back in flight finishes first.
    NextWrite,
}

/// This replica's hold on one incident's lease while its work runs.
pub(super) struct Lease {
    /// Until when the store holds the lease for us, as of our last renewal.
    until: Mutex<DateTime<Utc>>,
    state: watch::Sender<State>,
    clock: Clock,
    metrics: Arc<Metrics>,
}

impl Lease {
    /// A lease the store holds for `r`'s replica until `until`.
    pub(super) fn new(r: &Responder, until: DateTime<Utc>) -> Lease {
        Lease {
            until: Mutex::new(until),
            state: watch::Sender::new(State::Held),
            clock: r.clock.clone(),
            metrics: r.metrics.clone(),
        }
    }

    fn until(&self) -> DateTime<Utc> {
        *self.until.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The store confirmed the lease until `until`.
    pub(super) fn renewed(&self, until: DateTime<Utc>) {
        let mut u = self.until.lock().unwrap_or_else(|p| p.into_inner());
        *u = (*u).max(until);
    }

    /// Whether this replica still holds the lease as far as it knows.
    pub(super) fn held(&self) -> bool {
        *self.state.borrow() == State::Held
    }

    /// The lease is gone (`why`); said once.
    pub(super) fn lose(&self, why: &str) {
        let changed = self.state.send_if_modified(|s| {
            let was = *s == State::Held;
            if was {
                *s = State::Lost;
            }
            was
        });
        if changed {
            self.metrics.lease_lost();
            warn!(
                why,
                "lost the lease on this incident: no further write, leaving it to the holder"
            );
        }
    }

    /// Awaited right before a write, after its intent was recorded: returns when the write may
    /// go out; never returns when the lease is lost (the work is then dropped by
    /// [`Responder::with_lease`] with nothing in flight).
    pub(super) async fn before_write(&self) {
        if self.held() && self.clock.now() >= self.until() {
            self.lose("it ran out before the next write and could not be renewed");
        }
        if !self.held() {
            self.state.send_replace(State::Parked);
            std::future::pending::<()>().await;
        }
    }
}

/// When a lease taken or renewed at `now` runs out (as the store computes it).
pub(super) fn lease_end(now: DateTime<Utc>, lease: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(lease)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// First wait after a failed renewal; it doubles up to [`RENEW_RETRY_MAX`].
const RENEW_RETRY: Duration = Duration::from_millis(100);
const RENEW_RETRY_MAX: Duration = Duration::from_secs(2);

impl Responder {
    /// Runs `fut` while renewing this replica's lease on the incident, so a long action (a
    /// gradual shift) or bake is not taken over by another replica. `None` when the lease was
    /// lost and the work was stopped (see [`StopAt`]); the caller then records nothing.
    pub(super) async fn with_lease<T>(
        &self,
        id: &IncidentId,
        lease: &Lease,
        stop: StopAt,
        fut: impl Future<Output = T>,
    ) -> Option<T> {
        let renewing = async {
            let mut wait = self.lease / 3;
            let mut retry = RENEW_RETRY;
            while lease.held() {
                tokio::time::sleep(wait).await;
                if !lease.held() {
                    break;
                }
                let now = self.clock.now();
                let left = (lease.until() - now).to_std().unwrap_or(Duration::ZERO);
                // A store that hangs is as good as down: an answer that takes longer than a
                // renewal interval leaves time to try again before the lease runs out.
                let patience = left.min(self.lease / 3).max(RENEW_RETRY);
                let answer = tokio::time::timeout(patience, self.store.renew(id, &self.replica, now, self.lease)).await;
                match answer {
                    Ok(Ok(true)) => {
                        lease.renewed(lease_end(now, self.lease));
                        wait = self.lease / 3;
                        retry = RENEW_RETRY;
                    }
                    Ok(Ok(false)) => lease.lose("another replica holds it, or the work ended elsewhere"),
                    failed => {
                        let error = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => "no answer from the store".to_string(),
                        };
                        let left = (lease.until() - self.clock.now()).to_std().unwrap_or(Duration::ZERO);
                        if left.is_zero() {
                            lease.lose("it ran out while the store could not renew it");
                        } else {
                            // Nobody can claim it before it runs out: try again while it runs.
                            warn!(%error, left_ms = left.as_millis() as u64, "could not renew the lease; retrying");
                            self.metrics.store_error();
                            wait = retry.min(left);
                            retry = (retry * 2).min(RENEW_RETRY_MAX);
                        }
                    }
                }
            }
            std::future::pending::<()>().await
        };
        let stopped = async {
            let mut state = lease.state.subscribe();
            let _ = state
                .wait_for(|s| match stop {
                    StopAt::Loss => *s != State::Held,
                    StopAt::NextWrite => *s == State::Parked,
                })
                .await;
        };
        tokio::select! {
            out = fut => Some(out),
            () = renewing => None,
            () = stopped => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::incident::{Incident, Phase};
    use crate::responder::tests::responder;

    /// A responder with a `lease` and an executing incident it holds.
    async fn holding(lease: Duration) -> (tempfile::TempDir, Responder, Incident) {
        let (dir, mut r) = responder(Clock::System).await;
        r.lease = lease;
        let now = Utc::now();
        let mut inc = Incident::sample(Phase::Executing, now);
        let mut tx = r.store.begin().await.unwrap();
        tx.insert_incident(&inc).await.unwrap();
        tx.commit().await.unwrap();
        assert!(r.store.claim(&inc.id, &r.replica, now, lease).await.unwrap());
        inc.lease_until = Some(lease_end(now, lease));
        (dir, r, inc)
    }

    /// Another replica takes the incident over (our lease ran out during a pause).
    async fn taken_over(r: &Responder, inc: &Incident) {
        r.store.release(&inc.id, &r.replica).await.unwrap();
        assert!(r
            .store
            .claim(&inc.id, "replica-b", Utc::now(), Duration::from_secs(30))
            .await
            .unwrap());
    }

    #[tokio::test]
    async fn a_taken_lease_stops_reading_work_at_once_and_writing_work_before_its_next_write() {
        let (_dir, r, inc) = holding(Duration::from_millis(300)).await;
        taken_over(&r, &inc).await;
        // Verification only reads: dropped at once.
        let lease = Lease::new(&r, inc.lease_until.unwrap());
        let out = r
            .with_lease(&inc.id, &lease, StopAt::Loss, std::future::pending::<()>())
            .await;
        assert_eq!(out, None);
        assert!(!lease.held());

        // An action: the read in flight finishes, the write after it is never sent.
        let lease = Lease::new(&r, inc.lease_until.unwrap());
        let (read, wrote) = (AtomicBool::new(false), AtomicBool::new(false));
        let action = async {
            tokio::time::sleep(Duration::from_millis(400)).await;
            read.store(true, Ordering::SeqCst);
            lease.before_write().await;
            wrote.store(true, Ordering::SeqCst);
        };
        assert_eq!(r.with_lease(&inc.id, &lease, StopAt::NextWrite, action).await, None);
        assert!(read.load(Ordering::SeqCst) && !wrote.load(Ordering::SeqCst));
        assert!(r.metrics.render().contains("rollback_responder_leases_lost_total 2"));
        // Nothing it records afterwards passes the lease check; the holder keeps its lease.
        let mut tx = r.store.begin().await.unwrap();
        assert!(!tx.hold_lease(&inc.id, &r.replica, Utc::now(), r.lease).await.unwrap());
        drop(tx);
        let now = r.store.incident(&inc.id).await.unwrap().unwrap();
        assert_eq!(now.owner.as_deref(), Some("replica-b"));
    }

    #[tokio::test]
    async fn work_that_keeps_its_lease_runs_to_the_end_and_renews_it() {
        let (_dir, r, inc) = holding(Duration::from_millis(300)).await;
        let lease = Lease::new(&r, inc.lease_until.unwrap());
        let action = async {
            tokio::time::sleep(Duration::from_millis(700)).await;
            lease.before_write().await;
            7
        };
        assert_eq!(r.with_lease(&inc.id, &lease, StopAt::NextWrite, action).await, Some(7));
        let now = r.store.incident(&inc.id).await.unwrap().unwrap();
        assert!(now.lease_until > inc.lease_until, "renewed while it ran");
    }

    /// Holds SQLite's write lock from another connection for `hold`: the store cannot answer
    /// a renewal meanwhile (it waits, then times out), as during a database failover.
    async fn lock_the_store_for(dir: &tempfile::TempDir, hold: Duration) -> tokio::task::JoinHandle<()> {
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        let other = crate::store::Store::connect(&url, 1).await.unwrap();
        let mut tx = other.begin().await.unwrap();
        let mut locker = Incident::sample(Phase::Verified, Utc::now());
        locker.id = IncidentId("locker".into());
        locker.target_key = "locker".into();
        tx.insert_incident(&locker).await.unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(hold).await;
            drop(tx);
        })
    }

    #[tokio::test]
    async fn a_renewal_the_store_cannot_answer_is_retried_while_the_lease_runs() {
        let (dir, r, inc) = holding(Duration::from_secs(3)).await;
        let lease = Lease::new(&r, inc.lease_until.unwrap());
        let first_until = lease.until();
        let unlock = lock_the_store_for(&dir, Duration::from_millis(2300)).await;
        // The renewal at 1 s waits on the lock and gives up at 2 s; the store answers again at
        // 2.3 s, inside the lease (3 s): a retry renews it at once (the next regular renewal
        // would come only at 3 s, as the lease ends) and the action writes.
        let action = async {
            tokio::time::sleep(Duration::from_millis(2700)).await;
            assert!(
                lease.until() > first_until,
                "renewed by a retry soon after the store answered again, not at the next regular renewal"
            );
            tokio::time::sleep(Duration::from_millis(800)).await;
            lease.before_write().await;
        };
        assert_eq!(
            r.with_lease(&inc.id, &lease, StopAt::NextWrite, action).await,
            Some(()),
            "{:?}",
            r.store.incident(&inc.id).await
        );
        unlock.await.unwrap();
        assert!(lease.held());
        let m = r.metrics.render();
        assert!(m.contains("rollback_responder_leases_lost_total 0"), "{m}");
        assert!(
            m.contains("rollback_responder_store_errors_total 1"),
            "one renewal failed: {m}"
        );
    }

    #[tokio::test]
    async fn a_lease_the_store_could_not_renew_before_it_ran_out_is_lost() {
        let (dir, r, inc) = holding(Duration::from_secs(2)).await;
        let lease = Lease::new(&r, inc.lease_until.unwrap());
        let unlock = lock_the_store_for(&dir, Duration::from_millis(3000)).await;
        let action = async {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            lease.before_write().await;
        };
        assert_eq!(r.with_lease(&inc.id, &lease, StopAt::NextWrite, action).await, None);
        assert!(!lease.held());
        unlock.await.unwrap();
    }

    /// A step's record whose commit fails (a store blip) must not extend the lease this replica
    /// believes in: the store still ends it earlier, another replica may take the work over
    /// then, and the write gate, counting on the believed end, would let this one's next write
    /// out all the same.
    #[tokio::test]
    async fn a_renewal_whose_commit_failed_does_not_extend_the_lease() {
        let (dir, r, inc) = holding(Duration::from_secs(30)).await;
        let lease = Lease::new(&r, inc.lease_until.unwrap());
        let before = lease.until().timestamp_millis();
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        let mut other = <sqlx::AnyConnection as sqlx::Connection>::connect(&url).await.unwrap();
        sqlx::query(
            "CREATE TRIGGER refuse BEFORE INSERT ON incident_events BEGIN SELECT RAISE(ABORT, 'store blip'); END",
        )
        .execute(&mut other)
        .await
        .unwrap();
        // Later than the claim, so that a renewal would move the end.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let step = |summary: &str| super::super::act::Timed {
            at: Utc::now(),
            step: crate::action::Step {
                summary: summary.into(),
                detail: serde_json::Value::Null,
                applied: true,
                notable: false,
            },
        };
        let e = r.record_step(&inc, &step("switched"), &lease).await.unwrap_err();
        assert!(e.to_string().contains("store blip"), "{e}");
        let stored = |r: &Responder| {
            let id = inc.id.clone();
            let store = r.store.clone();
            async move {
                store
                    .incident(&id)
                    .await
                    .unwrap()
                    .unwrap()
                    .lease_until
                    .unwrap()
                    .timestamp_millis()
            }
        };
        assert_eq!(stored(&r).await, before, "the store kept the old end");
        assert_eq!(
            lease.until().timestamp_millis(),
            before,
            "believed a renewal the store never made"
        );
        // Once the store takes the record, the renewal it committed counts.
        sqlx::query("DROP TRIGGER refuse").execute(&mut other).await.unwrap();
        r.record_step(&inc, &step("switched"), &lease).await.unwrap();
        assert!(lease.until().timestamp_millis() > before);
        assert_eq!(lease.until().timestamp_millis(), stored(&r).await);
    }
}
