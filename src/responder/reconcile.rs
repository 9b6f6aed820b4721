//! Re-deciding an open incident whenever one of its inputs changes: gathers the inputs from the
//! store (one candidate decision per firing trigger, what a human denied), asks the pure
//! `incident::reconcile` for the next step, and applies it through `Responder::apply`.
//!
//! Called when an alert joins that could change the incident, at every due time (a trigger
//! passing its `for`, a request expiring, a hold ending), after a freeze is lifted and after a
//! policy reload.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use futures::FutureExt;
use serde_json::{json, Value};
use tracing::{debug, warn};

use super::{Responder, StepError, SYSTEM};
use crate::incident::reconcile::{self, Candidate, Next, Situation};
use crate::incident::{AuditKind, Event, Incident, IncidentId, Phase};
use crate::policy::{self, Decision, FreezeState, Outcome, PolicySet};
use crate::store::{StoreTx, REDECIDED};

/// What applying a step left to do.
pub(super) struct Applied {
    /// The incident entered `executing`.
    pub executing: bool,
    /// What the thread should say instead of a joining alert's own promise.
    pub note: Option<String>,
}

impl Responder {
    /// One candidate per firing trigger of the incident under the policy in force: the
    /// decision, at `now`, for that trigger's oldest firing alert (it passes its `for` first).
    pub(super) async fn candidates(
        &self,
        tx: &mut StoreTx,
        inc: &Incident,
        set: &PolicySet,
        freezes: &FreezeState,
        now: DateTime<Utc>,
    ) -> Result<Vec<Candidate>, StepError> {
        let Some(p) = set.get(&inc.policy) else {
            return Ok(Vec::new());
        };
        let firing = tx.firing_alerts_of(&inc.id).await?;
        let mut oldest = BTreeMap::new();
        for a in &firing {
            let Some((fp, t)) = policy::find(&a.alert, set) else {
                continue;
            };
            if fp.name != p.name {
                continue;
            }
            oldest
                .entry(t.name.clone())
                .and_modify(|o: &mut (&crate::alert::Alert, &policy::Trigger)| {
                    if a.alert.starts_at < o.0.starts_at {
                        *o = (&a.alert, t);
                    }
                })
                .or_insert((&a.alert, t));
        }
        if oldest.is_empty() {
            return Ok(Vec::new());
        }
        let history = self.load_history(tx, p, now).await?;
        Ok(oldest
            .into_values()
            .map(|(a, t)| {
                let d = policy::decide(a, Some((p, t)), now, &history, freezes, &self.global, &set.hash);
                Candidate::new(d, t)
            })
            .collect())
    }

    /// The triggers a human's deny covered (those firing when the request was denied).
    async fn denied_triggers(&self, tx: &mut StoreTx, inc: &Incident) -> Result<Option<BTreeSet<String>>, StepError> {
        let detail = tx.last_event_detail(&inc.id, AuditKind::Denied).await?;
        Ok(detail.map(|d| {
            let mut covers: BTreeSet<String> = d["covers"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
                .unwrap_or_default();
            // A deny recorded before the deny named its triggers covers the request's own.
            if covers.is_empty() {
                covers.extend(inc.trigger.clone());
            }
            covers
        }))
    }

    /// The names of the triggers firing now (what a deny given now covers).
    pub(super) async fn firing_triggers(&self, tx: &mut StoreTx, inc: &Incident) -> Result<Vec<String>, StepError> {
        let set = self.policies();
        let mut names: BTreeSet<String> = tx
            .firing_alerts_of(&inc.id)
            .await?
            .iter()
            .filter_map(|a| policy::find(&a.alert, &set).map(|(_, t)| t.name.clone()))
            .collect();
        names.extend(inc.trigger.clone());
        Ok(names.into_iter().collect())
    }

    /// Computes the incident's next step from `cands` at `now` and applies it in `tx`. An
    /// approval request that expires is decided again at once: what fires may act now (an
    /// automatic trigger after an escalation) or be due later.
    pub(super) async fn reconcile(
        &self,
        tx: &mut StoreTx,
        inc: &mut Incident,
        cands: &[Candidate],
        freezes: &FreezeState,
        now: DateTime<Utc>,
    ) -> Result<Applied, StepError> {
        let was = inc.phase;
        let first = self.reconcile_once(tx, inc, cands, freezes, now).await?;
        if was == Phase::AwaitingApproval && REDECIDED.contains(&inc.phase) && inc.phase != was {
            return self.reconcile_once(tx, inc, cands, freezes, now).await;
        }
        Ok(first)
    }

    async fn reconcile_once(
        &self,
        tx: &mut StoreTx,
        inc: &mut Incident,
        cands: &[Candidate],
        freezes: &FreezeState,
        now: DateTime<Utc>,
    ) -> Result<Applied, StepError> {
        let frozen = freezes.applying(&inc.policy, now).is_some()
            || self
                .policies()
                .get(&inc.policy)
                .is_some_and(|p| p.guards.freeze_windows.iter().any(|w| w.start <= now && now < w.end));
        let denied = match inc.phase {
            Phase::Denied => self.denied_triggers(tx, inc).await?,
            _ => None,
        };
        let next = reconcile::reconcile(&Situation {
            now,
            phase: inc.phase,
            current: &inc.decision,
            due_at: inc.due_at,
            candidates: cands,
            denied: denied.as_ref(),
            frozen,
        });
        let mut applied = Applied {
            executing: false,
            note: None,
        };
        match next {
            Next::Stay { due_at, note } => {
                self.set_due(tx, inc, due_at, now).await?;
                applied.note = note;
            }
            Next::Decide { decision, due_at, why } => {
                self.metrics.decision(decision.outcome.label(), &inc.policy);
                let event = Event::Decided {
                    outcome: decision.outcome.clone(),
                };
                // The strongest trigger names the incident.
                if decision.trigger.is_some() {
                    inc.trigger = decision.trigger.clone();
                }
                inc.decision = decision;
                let detail = json!({ "event": "decided", "decision": inc.decision });
                let phase = self.apply(tx, inc, event, SYSTEM, why, detail, now).await?;
                if phase == Phase::Executing {
                    applied.executing = true;
                } else if REDECIDED.contains(&phase) {
                    self.set_due(tx, inc, due_at, now).await?;
                }
                self.close_if_done(tx, inc, now).await?;
            }
            Next::Expire => {
                self.expire(tx, inc, freezes, now).await?;
                applied.executing = inc.phase == Phase::Executing;
                if REDECIDED.contains(&inc.phase) {
                    // Held on expiry: looked at again when the hold ends.
                    let due = reconcile::hold_ends(&inc.decision.outcome, now);
                    self.set_due(tx, inc, due, now).await?;
                }
            }
            Next::Cancel => {
                let summary = if tx.firing_alerts(&inc.id).await? == 0 {
                    "no alert fires any more"
                } else {
                    "no firing alert matches a trigger of the policy any more"
                };
                self.apply(
                    tx,
                    inc,
                    Event::AllAlertsResolved,
                    SYSTEM,
                    summary.into(),
                    Value::Null,
                    now,
                )
                .await?;
                self.close_if_done(tx, inc, now).await?;
            }
        }
        Ok(applied)
    }

    /// Saves a new due time (no phase change, so no audit entry: the decision's own message
    /// already said when it is looked at again).
    async fn set_due(
        &self,
        tx: &mut StoreTx,
        inc: &mut Incident,
        due_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<(), StepError> {
        if due_at == inc.due_at {
            return Ok(());
        }
        inc.due_at = due_at;
        inc.updated_at = now;
        if !tx.save_incident(inc).await? {
            return Err(StepError::Conflict(inc.id.clone()));
        }
        inc.version += 1;
        Ok(())
    }

    /// The approval request has run out: the policy's `on_timeout`, unless rolling back is
    /// what it says and a freeze, the cooldown or a rate limit holds automatic rollbacks now.
    async fn expire(
        &self,
        tx: &mut StoreTx,
        inc: &mut Incident,
        freezes: &FreezeState,
        now: DateTime<Utc>,
    ) -> Result<(), StepError> {
        let on_timeout = super::approval_timeout_action(&inc.decision.outcome);
        let summary = format!(
            "approval request expired; policy says {}",
            serde_json::to_value(on_timeout)
                .unwrap_or(Value::Null)
                .as_str()
                .unwrap_or("?")
        );
        // Rolling back on expiry is an automatic rollback, decided now: a freeze switched on,
        // or a rollback of the target, while the request was open holds it like it would hold
        // a fresh alert.
        let set = self.policies();
        let held = match (on_timeout, set.get(&inc.policy)) {
            (policy::OnTimeout::Rollback, Some(p)) => {
                let history = self.load_history(tx, p, now).await?;
                policy::holds_automatic(p, &history, freezes, &self.global, now)
            }
            _ => None,
        };
        let (event, summary) = match held {
            Some((why, reason)) => {
                let outcome = Outcome::Suppressed(why);
                inc.decision = Decision {
                    outcome: outcome.clone(),
                    reason: format!("{summary}, but {reason}"),
                    policy_hash: set.hash.clone(),
                    decided_at: now,
                    ..inc.decision.clone()
                };
                (Event::ExpiryHeld { outcome }, inc.decision.reason.clone())
            }
            None if on_timeout == policy::OnTimeout::Rollback && self.dry_run_in_force(inc) => (
                Event::ApprovalExpired { on_timeout },
                format!("{summary}; dry run is in force now, so the rollback is a dry run: nothing will be changed"),
            ),
            None => (Event::ApprovalExpired { on_timeout }, summary),
        };
        self.apply(tx, inc, event, SYSTEM, summary, Value::Null, now).await?;
        Ok(())
    }

    /// Re-decides incidents whose due time has come: a trigger passing its `for`, a request
    /// expiring, a hold ending, a freeze lifted, a policy reload. Returns incidents that
    /// entered `executing` (to be claimed and run). One incident that fails (its row
    /// unreadable, a conflict, a bug) is logged, counted and left for the next round; the
    /// incidents due after it are still decided in this one.
    pub async fn run_due(&self) -> Result<Vec<IncidentId>, StepError> {
        let now = self.clock.now();
        if self.redecide.swap(false, Ordering::AcqRel) {
            // A start, a policy reload: everything waiting on a decision is decided again
            // under the settings in force. Kept for the next round if that fails.
            if let Err(e) = self.store.make_due(&REDECIDED, now).await {
                self.redecide.store(true, Ordering::Release);
                return Err(e.into());
            }
        }
        let mut work = Vec::new();
        for id in self.store.due_incidents(now).await? {
            // Not about the incident: a failure here ends the round.
            let freezes = self.freezes(now).await?;
            let decided = std::panic::AssertUnwindSafe(self.run_due_one(&id, &freezes, now))
                .catch_unwind()
                .await;
            match decided {
                Ok(Ok(true)) => work.push(id),
                Ok(Ok(false)) => {}
                // Another replica (or a person) changed it meanwhile; still due, it is back
                // in the next round.
                Ok(Err(e)) if e.is_conflict() => debug!(incident = %id, error = %e, "due incident changed meanwhile"),
                Ok(Err(e)) => {
                    if matches!(e, StepError::Store(_)) {
                        self.metrics.store_error();
                    }
                    warn!(incident = %id, error = %e, "deciding a due incident again failed; skipped this round");
                }
                // The panic hook has logged it.
                Err(_) => {
                    self.metrics.panic("worker");
                    warn!(incident = %id, "deciding a due incident again panicked; skipped this round");
                }
            }
        }
        Ok(work)
    }

    /// Decides one due incident again in a transaction of its own; true when it entered
    /// `executing`.
    async fn run_due_one(&self, id: &IncidentId, freezes: &FreezeState, now: DateTime<Utc>) -> Result<bool, StepError> {
        let mut tx = self.store.begin().await?;
        let Some(mut inc) = tx.incident(id).await? else {
            return Ok(false);
        };
        if inc.due_at.is_none_or(|d| d > now) || inc.closed_at.is_some() {
            return Ok(false);
        }
        let set = self.policies();
        let cands = self.candidates(&mut tx, &inc, &set, freezes, now).await?;
        let applied = self.reconcile(&mut tx, &mut inc, &cands, freezes, now).await?;
        self.commit(tx, &inc).await?;
        Ok(applied.executing)
    }

    /// A freeze was lifted: incidents it held are decided again at once, or, when making
    /// them due fails, by the next round that can.
    pub(super) async fn freeze_lifted(&self) -> Result<(), StepError> {
        let made = self.store.make_due(&REDECIDED, self.clock.now()).await;
        if made.is_err() {
            self.redecide.store(true, Ordering::Release);
        }
        self.wake_for_work();
        made?;
        Ok(())
    }

    /// Has the next round decide every open incident waiting on a decision (see
    /// [`REDECIDED`]) again, as after a policy reload.
    pub fn redecide_waiting(&self) {
        self.redecide.store(true, Ordering::Release);
    }
}
