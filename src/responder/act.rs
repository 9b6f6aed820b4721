//! Acting on a claimed incident: record the start, run the executor, and record each of its
//! steps as it happens, then settle the incident on the result.
//!
//! Comes after a decision, an approval or an expiry moved the incident into `executing` and
//! this replica holds its lease; verification follows ([`Responder::verify`]). Every step the
//! executor reports reaches the timeline with its own time while the action runs (a gradual
//! shift shows each write when it happens), and the notable ones (writes, failed calls) reach
//! the Slack thread as they happen too. A revert that changed part of the target before it
//! failed counts as a rollback (acted_at is set, so cooldown and rate limits apply) and says
//! what took and what failed. A real action that finds the target already reverted says so
//! ("found already reverted", by whom when the executor can tell, `found_reverted_by`, else
//! "not by this service") and counts only when our own interrupted attempt had recorded
//! the intent of a write ([`found_reverted`]). A takeover hands the executor the steps the
//! interrupted attempt recorded, so a gradual shift goes on from where the weights stand with
//! the interval counted from its last step (`alb::Resume`), and the rollback counts from the
//! interrupted attempt's first write, when the traffic first moved.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::warn;

use crate::action::{ActionError, ActionReport, EarlierStep, RevertedBy, Step, Target};
use crate::incident::{AuditKind, Event, Incident, IncidentId, Phase};
use crate::notify::{self, Change};

use super::lease::{lease_end, Lease, StopAt};
use super::{Responder, StepError};

/// An executor step with the time it happened.
#[derive(Debug, Clone)]
pub(super) struct Timed {
    pub(super) at: DateTime<Utc>,
    pub(super) step: Step,
}

/// How long a step that the store refuses is retried before the next write goes ahead with
/// the step kept for the result's transaction instead: well inside the action's lease.
const RECORD_STEP_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// An earlier attempt at this incident's action that never recorded a result.
#[derive(Debug, Clone, PartialEq)]
struct Interrupted {
    /// Who started the last attempt.
    started_by: String,
    /// Who recorded the plan of a write (not a dry run) before dying, if any attempt did.
    wrote: Option<String>,
    /// When that plan was recorded: the write, if it took, came right after.
    wrote_at: Option<DateTime<Utc>>,
    /// Every step the earlier attempts recorded, with its time: a takeover resumes from them.
    steps: Vec<(DateTime<Utc>, serde_json::Value)>,
}

impl Interrupted {
    /// The attempt left without a result, from the incident's audit trail: only what follows
    /// the last result counts. An attempt that recorded its result (failed, or succeeded and
    /// later failed verification) was not interrupted, so a person's retry after it is a new
    /// attempt: not "taking over", not resuming the old attempt's steps, and not crediting its
    /// planned write (which the result already judged) as this attempt's rollback.
    fn find(events: &[crate::store::EventRecord]) -> Option<Interrupted> {
        let since = events
            .iter()
            .rposition(|e| matches!(e.kind, AuditKind::ActionSucceeded | AuditKind::ActionFailed))
            .map_or(0, |i| i + 1);
        let events = &events[since..];
        let started_by = events
            .iter()
            .rev()
            .find(|e| e.kind == AuditKind::ActionStarted)?
            .actor
            .clone();
        let planned = events
            .iter()
            .find(|e| e.kind == AuditKind::ActionStep && e.detail["step"] == "planned" && e.detail["dry_run"] == false);
        Some(Interrupted {
            started_by,
            wrote: planned.map(|e| e.actor.clone()),
            wrote_at: planned.map(|e| e.at),
            steps: events
                .iter()
                .filter(|e| e.kind == AuditKind::ActionStep)
                .map(|e| (e.at, e.detail.clone()))
                .collect(),
        })
    }

    /// The recorded steps with how long before `now` each was recorded, for the executor.
    fn earlier(&self, now: DateTime<Utc>) -> Vec<EarlierStep> {
        self.steps
            .iter()
            .map(|(at, detail)| EarlierStep {
                ago: (now - *at).to_std().unwrap_or_default(),
                detail: detail.clone(),
            })
            .collect()
    }
}

/// What running the executor left: its result, the steps that changed the target, and steps
/// the store could not take while the action ran (recorded with the result instead).
struct Ran {
    result: Result<ActionReport, ActionError>,
    applied: Vec<Timed>,
    unrecorded: Vec<Timed>,
    /// The executor picked up a change an interrupted earlier attempt had begun (a gradual
    /// shift resumed from the weights its step left).
    resumed: bool,
    secs: f64,
}

impl Responder {
    /// The `action_started` mark (and its note): a replica taking over later reads it to know
    /// that an earlier attempt may already have written to the target. `taking_over_from`: the
    /// replica whose attempt was interrupted, named in the note so the thread does not read
    /// as the same start twice.
    pub(super) async fn record_start(
        &self,
        tx: &mut crate::store::StoreTx,
        inc: &Incident,
        taking_over_from: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(), StepError> {
        let target: Target = inc
            .plan
            .target()
            .map_err(|e| StepError::Plan(inc.id.clone(), e.to_string()))?
            .clone();
        let dry_run = notify::is_dry_run(inc);
        // Never announce a rollback this responder cannot carry out.
        let started = match self.executors.missing_for(&inc.policy, &target) {
            Some(_) if !dry_run => format!(
                "not executing (no {} executor is configured on this responder): would {}",
                target.kind().as_str(),
                target.describe()
            ),
            _ => format!(
                "{}: {}",
                if dry_run { "dry run" } else { "rolling back" },
                target.describe()
            ),
        };
        let started = match taking_over_from {
            Some(who) => format!("taking over from {who}, whose attempt was interrupted; {started}"),
            None => started,
        };
        Self::record(
            tx,
            inc,
            AuditKind::ActionStarted,
            &self.replica,
            started.clone(),
            json!({ "dry_run": dry_run, "executor_configured": self.executors.can_execute(&target) }),
            now,
        )
        .await?;
        self.tell(tx, inc, Change::Note { summary: &started }, now).await?;
        Ok(())
    }

    pub(super) async fn run_claimed(&self, id: &IncidentId, started: bool) -> Result<(), StepError> {
        let Some(mut inc) = self.store.incident(id).await? else {
            return Ok(());
        };
        if inc.phase == Phase::Executing {
            let planned: Target = inc
                .plan
                .target()
                .map_err(|e| StepError::Plan(inc.id.clone(), e.to_string()))?
                .clone();
            // Immediate or stepwise is the trigger's choice (seed 003), and a promotion may
            // have changed the trigger since the plan was made.
            let target = match self.policies().get(&inc.policy) {
                Some(p) => p.with_trigger_gradual(planned, inc.trigger.as_deref()),
                None => planned,
            };
            let dry_run = notify::is_dry_run(&inc);
            let lease = Arc::new(Lease::new(self, inc.lease_until.unwrap_or_else(|| self.clock.now())));
            let mut interrupted = None;
            if !started {
                // An earlier start on this incident without a result (the phase is still
                // `executing`): that replica died or was stopped mid-action, maybe after its
                // write.
                interrupted = Interrupted::find(&self.store.audit_events(id).await?);
                let mut tx = self.store.begin().await?;
                let Some(until) = self.hold(&mut tx, &lease, id).await? else {
                    return Ok(());
                };
                let from = interrupted.as_ref().map(|i| i.started_by.clone());
                self.record_start(&mut tx, &inc, from.as_deref(), self.clock.now())
                    .await?;
                self.commit(tx, &inc).await?;
                lease.renewed(until);
            }

            let earlier = interrupted
                .as_ref()
                .map(|i| i.earlier(self.clock.now()))
                .unwrap_or_default();
            let Some(ran) = self.execute_recording(&inc, &target, dry_run, &earlier, &lease).await else {
                // Stopped before a write: the holder of the lease carries on from what the store says.
                return Ok(());
            };
            let now = self.clock.now();
            let mut tx = self.store.begin().await?;
            // The action is over: the lease's new end matters to nobody after this commit.
            if self.hold(&mut tx, &lease, id).await?.is_none() {
                return Ok(());
            }
            let Some(fresh) = tx.incident(id).await? else {
                return Ok(());
            };
            inc = fresh;
            for t in ran.unrecorded {
                Self::record(
                    &mut tx,
                    &inc,
                    AuditKind::ActionStep,
                    &self.replica,
                    t.step.summary,
                    t.step.detail,
                    t.at,
                )
                .await?;
            }
            // When the target first changed: what cooldowns and rate limits count from. A
            // takeover that resumed what the interrupted attempt began: when that one wrote.
            let resumed_from = interrupted.as_ref().filter(|_| ran.resumed).and_then(|i| i.wrote_at);
            let first_write = resumed_from.or(ran.applied.first().map(|t| t.at));
            match ran.result {
                Ok(report) => {
                    self.metrics.action(
                        target.kind().as_str(),
                        if report.dry_run {
                            "dry_run"
                        } else if report.changed {
                            "changed"
                        } else {
                            "no_op"
                        },
                        ran.secs,
                    );
                    if report.changed {
                        let at = first_write.unwrap_or(now);
                        inc.acted_at = Some(at);
                        self.metrics
                            .alert_to_action((at - inc.first_alert_starts_at).num_milliseconds() as f64 / 1000.0);
                    }
                    let ActionReport {
                        changed,
                        dry_run,
                        mut summary,
                        detail,
                        found_reverted_by,
                    } = report;
                    if !changed && !dry_run && inc.acted_at.is_none() {
                        let (counted, text) =
                            found_reverted(interrupted.as_ref(), found_reverted_by.as_ref(), &summary);
                        if counted {
                            // The traffic moved when our interrupted attempt wrote, not now:
                            // as on the failed-takeover path, guards count from that write.
                            inc.acted_at = Some(interrupted.as_ref().and_then(|i| i.wrote_at).unwrap_or(now));
                        }
                        summary = text;
                    }
                    if let Some((writer, at)) = interrupted
                        .as_ref()
                        .filter(|_| ran.resumed)
                        .and_then(|i| Some((i.wrote.as_deref()?, i.wrote_at?)))
                    {
                        summary = format!(
                            "resumed the change the interrupted earlier attempt of {writer} had begun (its first write \
                             at {}), from where it stood: {summary}",
                            at.format("%H:%M:%S UTC")
                        );
                    }
                    self.apply(
                        &mut tx,
                        &mut inc,
                        Event::ActionSucceeded { changed, dry_run },
                        &self.replica,
                        summary,
                        detail,
                        now,
                    )
                    .await?;
                }
                Err(e) => {
                    self.metrics.action(target.kind().as_str(), "failed", ran.secs);
                    warn!(error = %e, partial = ran.applied.len(), "rollback action failed; escalating");
                    // An interrupted earlier attempt that had begun to write (a takeover that
                    // then failed, e.g. on a forward or step the first replica never reached):
                    // its writes most likely took, so this is a partial rollback, counted.
                    let earlier = interrupted
                        .as_ref()
                        .filter(|_| !dry_run && (ran.resumed || ran.applied.is_empty()) && inc.acted_at.is_none())
                        .and_then(|i| Some((i.wrote.clone()?, i.wrote_at?)));
                    if let Some(at) = earlier.as_ref().map(|(_, at)| *at).or(first_write) {
                        // A partial revert changed the target: it is a rollback for the guards.
                        inc.acted_at = Some(at);
                        self.metrics
                            .alert_to_action((at - inc.first_alert_starts_at).num_milliseconds() as f64 / 1000.0);
                    }
                    // In the order they happened: the earlier attempt's writes came first.
                    let took: Vec<String> = earlier
                        .iter()
                        .map(|(writer, at)| {
                            format!(
                                "the writes of the interrupted earlier attempt of {writer} (begun at {}; see its steps \
                                 in the timeline)",
                                at.format("%H:%M:%S UTC")
                            )
                        })
                        .chain(
                            ran.applied
                                .iter()
                                .map(|t| format!("{} (at {})", t.step.summary, t.at.format("%H:%M:%S UTC"))),
                        )
                        .collect();
                    let summary = failure_summary(&took, &e);
                    self.apply(
                        &mut tx,
                        &mut inc,
                        Event::ActionFailed,
                        &self.replica,
                        summary,
                        json!({ "error": e.to_string(), "detail": e.detail(), "applied": took }),
                        now,
                    )
                    .await?;
                }
            }
            self.close_if_done(&mut tx, &mut inc, now).await?;
            self.commit(tx, &inc).await?;
        }
        if inc.phase == Phase::Verifying {
            self.verify(&mut inc).await?;
        }
        Ok(())
    }

    /// Re-checks (and extends) this replica's lease first thing in `tx`, which then records
    /// its work: `None` when the lease is gone, and `tx` must record nothing (it is dropped,
    /// so rolled back). Else the lease's new end, which is the store's only once `tx` commits:
    /// the caller hands it to `lease` ([`Lease::renewed`]) after its commit. Told before, a
    /// commit that then fails (a store blip) would leave this replica believing in a lease
    /// the store ends earlier: while its renewals fail too it would count on time it does not
    /// have, and its write gate would let its next write out after another replica (whose
    /// store answers) took the work over.
    pub(super) async fn hold(
        &self,
        tx: &mut crate::store::StoreTx,
        lease: &Lease,
        id: &IncidentId,
    ) -> Result<Option<DateTime<Utc>>, StepError> {
        let now = self.clock.now();
        if !lease.held() {
            return Ok(None);
        }
        if tx.hold_lease(id, &self.replica, now, self.lease).await? {
            Ok(Some(lease_end(now, self.lease)))
        } else {
            lease.lose("another replica holds it, or the work ended elsewhere");
            Ok(None)
        }
    }

    /// Runs the executor under the lease, recording each step in the store as it arrives;
    /// before each write, the steps reported so far (the write's plan among them) are
    /// committed, so a takeover can tell whether we had begun to write. `None`: the lease was
    /// lost and the executor stopped before its next write.
    async fn execute_recording(
        &self,
        inc: &Incident,
        target: &Target,
        dry_run: bool,
        earlier: &[EarlierStep],
        lease: &Arc<Lease>,
    ) -> Option<Ran> {
        let (sender, mut steps) = mpsc::unbounded_channel::<Timed>();
        let sent = AtomicU64::new(0);
        let (recorded_tx, recorded_rx) = watch::channel(0u64);
        let started = Instant::now();
        let sent_ref = &sent;
        let before_write = move || -> Pin<Box<dyn Future<Output = ()> + Send>> {
            let want = sent_ref.load(Ordering::SeqCst);
            let mut recorded = recorded_rx.clone();
            let lease = lease.clone();
            Box::pin(async move {
                // An error means the recorder is gone (it outlives the executor): go on.
                let _ = recorded.wait_for(|n| *n >= want).await;
                lease.before_write().await;
            })
        };
        let before_write = &before_write;
        let run = async move {
            let mut on_step = |step: Step| {
                sent_ref.fetch_add(1, Ordering::SeqCst);
                // The receiver lives until every sender is gone; a send cannot fail before.
                let _ = sender.send(Timed {
                    at: self.clock.now(),
                    step,
                });
            };
            self.executors
                .execute(target, dry_run, inc, &mut on_step, before_write, earlier)
                .await
        };
        let record = async {
            let (mut applied, mut unrecorded, mut resumed) = (Vec::new(), Vec::new(), false);
            while let Some(t) = steps.recv().await {
                if !lease.held() {
                    // Nothing more is recorded as ours: the holder reads the target itself.
                    recorded_tx.send_modify(|n| *n += 1);
                    continue;
                }
                if t.step.applied {
                    applied.push(t.clone());
                }
                resumed |= t.step.detail["step"] == "resumed";
                // The next write waits for this: a takeover reads a recorded plan as "we had
                // begun to write", so a store blip is retried for a while before the write is
                // let through without it.
                let mut delay = std::time::Duration::from_millis(100);
                let mut last = self.record_step(inc, &t, lease).await;
                let give_up = Instant::now() + RECORD_STEP_PATIENCE;
                while last.is_err() && lease.held() && Instant::now() + delay < give_up {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(2));
                    last = self.record_step(inc, &t, lease).await;
                }
                if !lease.held() {
                    // Lost meanwhile: the step is not ours to record any more.
                } else if let Err(e) = last {
                    // Kept for the result's transaction: a store blip loses no step.
                    warn!(error = %e, "could not record an action step as it happened; recording it with the result");
                    unrecorded.push(t);
                }
                recorded_tx.send_modify(|n| *n += 1);
            }
            (applied, unrecorded, resumed)
        };
        let (result, (applied, unrecorded, resumed)) = self
            .with_lease(&inc.id, lease, StopAt::NextWrite, async { tokio::join!(run, record) })
            .await?;
        Some(Ran {
            result,
            applied,
            unrecorded,
            resumed,
            secs: started.elapsed().as_secs_f64(),
        })
    }

    /// One step in its own transaction, while this replica holds the lease: the timeline
    /// entry, and a Slack line if notable. Ok without recording when the lease is gone.
    pub(super) async fn record_step(&self, inc: &Incident, t: &Timed, lease: &Lease) -> Result<(), StepError> {
        let mut tx = self.store.begin().await?;
        let Some(until) = self.hold(&mut tx, lease, &inc.id).await? else {
            return Ok(());
        };
        Self::record(
            &mut tx,
            inc,
            AuditKind::ActionStep,
            &self.replica,
            t.step.summary.clone(),
            t.step.detail.clone(),
            t.at,
        )
        .await?;
        if t.step.notable {
            self.tell(
                &mut tx,
                inc,
                Change::Note {
                    summary: &t.step.summary,
                },
                t.at,
            )
            .await?;
        }
        self.commit(tx, inc).await?;
        lease.renewed(until);
        Ok(())
    }
}

/// A real (not dry) action that found the target already reverted: whether it counts as this
/// incident's rollback, and what people read. It counts only when an interrupted earlier
/// attempt had recorded the intent of a write before dying (its intent is committed before
/// anything is sent, so the revert is most likely that write, applied by AWS or the API
/// server after the crash): then the guards (cooldown, rate limits) and people (the PagerDuty
/// change event, "executed") must learn that we changed the target. When the executor can tell
/// who wrote it (Kubernetes managedFields), somebody else's change is never counted, whatever
/// we had begun. Otherwise somebody else reverted it: it is said so and not counted.
fn found_reverted(interrupted: Option<&Interrupted>, by: Option<&RevertedBy>, summary: &str) -> (bool, String) {
    let writer = interrupted.and_then(|i| i.wrote.as_deref());
    match (by, writer) {
        (Some(RevertedBy::Others { who }), _) => {
            let earlier = interrupted
                .map(|i| {
                    format!(
                        " (the interrupted earlier attempt by {} did not write it)",
                        i.started_by
                    )
                })
                .unwrap_or_default();
            (
                false,
                format!("found already reverted ({who}){earlier}: not counted as this incident's rollback; {summary}"),
            )
        }
        (_, Some(writer)) => (
            true,
            format!(
                "found already reverted, most likely by the interrupted earlier attempt of {writer}, which had begun \
                 to write it: counted as this incident's rollback; {summary}"
            ),
        ),
        (by, None) => {
            let who = match by {
                Some(RevertedBy::Us) => "by this service, but not in this incident",
                _ => "not by this service",
            };
            let earlier = interrupted
                .map(|i| {
                    format!(
                        " (the interrupted earlier attempt by {} had not begun to write)",
                        i.started_by
                    )
                })
                .unwrap_or_default();
            (
                false,
                format!("found already reverted ({who}){earlier}: not counted as this incident's rollback; {summary}"),
            )
        }
    }
}

/// What people read when the action failed: what took before the failure (with its time),
/// and the failed call.
fn failure_summary(took: &[String], e: &ActionError) -> String {
    if matches!(e, ActionError::Unconfirmed { .. }) {
        let took = if took.is_empty() {
            String::new()
        } else {
            format!("{} took; then ", took.join("; "))
        };
        // The error names the write whose outcome is unknown.
        return format!(
            "rollback failed, of UNKNOWN outcome: {took}{e}; nothing more will be tried automatically, a human \
             must check the target and act"
        );
    }
    if took.is_empty() {
        format!("rollback failed, nothing was changed: {e}; nothing more will be tried automatically, a human must act")
    } else {
        format!(
            "partial rollback: {} took; then it failed: {e}; the remaining steps were not done and nothing more \
             will be tried automatically, a human must act",
            took.join("; ")
        )
    }
}

#[cfg(test)]
#[path = "act_tests.rs"]
mod tests;
