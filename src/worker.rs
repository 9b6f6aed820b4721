//! Background loops, the same on every replica: process stored alerts as soon as the webhook
//! wakes us, and on every tick pick up due incidents (re-decisions, approval expiry) and
//! orphaned work (a replica died holding a lease). The store decides who does what; a local
//! in-flight set stops this replica from running one incident twice at once.
//! An intake-only replica (`workers.decide: false`) skips the first part: it stores alerts
//! and leaves them pending for a replica that decides.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::incident::IncidentId;
use crate::responder::Responder;

/// Alerts decided per batch before newly found work is started.
const ALERT_BATCH: i64 = 32;

/// Where a piece of work stands when it is handed over.
#[derive(Clone, Copy)]
enum Claim {
    /// The deciding transaction took the lease and recorded the start: run it now.
    Held,
    /// Approved, due or orphaned work: claim it first (another replica may have).
    ToTake,
}

/// An incident this replica is working on; leaves the set when dropped.
struct InFlight(Arc<Mutex<HashSet<IncidentId>>>, IncidentId);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        s.remove(&self.1);
    }
}

/// Counts the tasks that ended in a panic (logged by the panic hook); the incident's work is
/// picked up again on a later tick, as after any failure.
fn reap(tasks: &mut JoinSet<()>, metrics: &crate::metrics::Metrics) {
    while let Some(done) = tasks.try_join_next() {
        if done.is_err_and(|e| e.is_panic()) {
            metrics.panic("worker");
        }
    }
}

/// Starts each incident's work unless this replica already runs it.
fn spawn_work(
    tasks: &mut JoinSet<()>,
    in_flight: &Arc<Mutex<HashSet<IncidentId>>>,
    responder: &Arc<Responder>,
    work: Vec<IncidentId>,
    claim: Claim,
) {
    for id in work {
        let fresh = in_flight.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone());
        if !fresh {
            continue;
        }
        let r = responder.clone();
        // Taken off the in-flight set however the task ends, a panic included: otherwise this
        // replica would never run that incident again.
        let flight = InFlight(in_flight.clone(), id.clone());
        tasks.spawn(async move {
            let result = match claim {
                Claim::Held => r.run_started(&id).await,
                Claim::ToTake => r.run_work(&id).await,
            };
            if let Err(e) = result {
                warn!(incident = %id, error = %e, "incident work failed; it will be retried");
            }
            drop(flight);
        });
    }
}

/// Runs until `shutdown` turns true, then waits up to `grace` for work in flight and hands
/// the rest over (releases its leases so another replica takes over at once).
pub async fn run(responder: Arc<Responder>, tick: Duration, grace: Duration, mut shutdown: watch::Receiver<bool>) {
    let in_flight: Arc<Mutex<HashSet<IncidentId>>> = Arc::default();
    let mut tasks = JoinSet::new();
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let on_tick = tokio::select! {
            _ = responder.wake.notified() => false,
            _ = ticker.tick() => true,
            _ = shutdown.changed() => break,
        };
        // A panic in one round is counted (and logged by the panic hook) and the loop goes
        // on: the work it was doing is still in the store for the next round.
        let round = std::panic::AssertUnwindSafe(round(&responder, &mut tasks, &in_flight, on_tick, &shutdown));
        if futures::FutureExt::catch_unwind(round).await.is_err() {
            responder.metrics.panic("worker");
        }
        reap(&mut tasks, &responder.metrics);
    }
    info!(in_flight = tasks.len(), "shutting down: waiting for work in flight");
    if tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        tasks.abort_all();
        let ids: Vec<IncidentId> = in_flight
            .lock()
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for id in ids {
            // Handing over: the action reads the target's real state before acting again.
            if let Err(e) = responder.store.release(&id, &responder.replica).await {
                warn!(incident = %id, error = %e, "could not release the lease; it expires on its own");
            }
        }
    }
}

/// One round of the loop: stored alerts first, then due and orphaned work.
async fn round(
    responder: &Arc<Responder>,
    tasks: &mut JoinSet<()>,
    in_flight: &Arc<Mutex<HashSet<IncidentId>>>,
    on_tick: bool,
    shutdown: &watch::Receiver<bool>,
) {
    // Alerts first, in small batches: a rollback found early in a storm starts at once. An
    // intake-only replica (`workers.decide: false`) leaves them pending for one that decides.
    if responder.decides {
        loop {
            match responder.process_pending(ALERT_BATCH).await {
                Ok((work, more)) => {
                    spawn_work(tasks, in_flight, responder, work, Claim::Held);
                    // A long backlog must not hold up shutdown: what is left stays pending in
                    // the store for the next start or another replica.
                    if !more || *shutdown.borrow() {
                        break;
                    }
                }
                Err(e) => {
                    responder.metrics.store_error();
                    warn!(error = %e, "processing stored alerts failed; retrying next tick");
                    break;
                }
            }
        }
    }
    // Due and unowned work: on every tick, and at once when this replica made some (an
    // approval, a takeover, a lifted freeze). A wake for stored alerts alone skips it: the
    // decisions above claim what they start themselves.
    let hinted = responder.work_hint.swap(false, std::sync::atomic::Ordering::SeqCst);
    if !on_tick && !hinted {
        return;
    }
    let mut work = Vec::new();
    match responder.run_due().await {
        Ok(w) => work.extend(w),
        Err(e) => warn!(error = %e, "due incidents failed; retrying next tick"),
    }
    // Approved or orphaned work (a replica died holding a lease) is picked up here.
    match responder.store.unowned_work(responder.clock.now()).await {
        Ok(w) => {
            responder.still_unowned(&w);
            work.extend(w);
        }
        Err(e) => warn!(error = %e, "looking for orphaned work failed"),
    }
    spawn_work(tasks, in_flight, responder, work, Claim::ToTake);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_that_panics_leaves_the_in_flight_set_and_is_counted() {
        let in_flight: Arc<Mutex<HashSet<IncidentId>>> = Arc::default();
        let id = IncidentId("inc-1".into());
        in_flight.lock().unwrap().insert(id.clone());
        let mut tasks = JoinSet::new();
        let flight = InFlight(in_flight.clone(), id.clone());
        tasks.spawn(async move {
            let _flight = flight;
            panic!("work failed badly");
        });
        let metrics = crate::metrics::Metrics::new();
        while !tasks.is_empty() {
            tokio::task::yield_now().await;
            reap(&mut tasks, &metrics);
        }
        assert!(in_flight.lock().unwrap().is_empty(), "it can run again");
        assert!(metrics
            .render()
            .contains(r#"rollback_responder_panics_total{where="worker"} 1"#));
    }
}
