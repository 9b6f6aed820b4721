//! What people do to incidents: approve or deny (Slack buttons and commands, PagerDuty),
//! start a rollback by hand, freeze and unfreeze automatic rollbacks. Every state change
//! still goes through `Responder::apply`; this file decides who may and records the votes.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tracing::info;

use super::{Responder, StepError, SYSTEM};
use crate::approval::{may_approve, Person, Refusal, Verdict, VoteResult};
use crate::incident::reconcile::request_expiry;
use crate::incident::{AuditKind, Event, Incident, IncidentId, Phase};
use crate::notify::{self, Change};
use crate::policy::{self, Decision, Freeze, Outcome, Suppression};
use crate::store::{NewEvent, Receipt, StoreTx};

/// Where an authorized person's Approve or `/rollback now` rolls back an open incident at once.
const HUMAN_ROLLBACK: [Phase; 8] = [
    Phase::Waiting,
    Phase::Suppressed,
    Phase::Denied,
    Phase::Escalated,
    Phase::GaveUp,
    Phase::Failed,
    Phase::VerificationFailed,
    Phase::DryRun,
];

/// A refusal, or a store problem.
#[derive(Debug, thiserror::Error)]
pub enum HumanError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Step(#[from] StepError),
}

impl From<crate::store::StoreError> for HumanError {
    fn from(e: crate::store::StoreError) -> Self {
        HumanError::Step(StepError::Store(e))
    }
}

impl Responder {
    /// A person's approve or deny on a pending incident. Votes are stored one per person, so
    /// double clicks, a click plus a command, or clicks on two replicas count once; the phase
    /// change is conditional on the incident's version, so exactly one of them moves it.
    pub async fn vote(
        &self,
        id: &IncidentId,
        who: &Person,
        verdict: Verdict,
        via: &str,
    ) -> Result<VoteResult, HumanError> {
        self.vote_as(id, who, verdict, via, None).await
    }

    /// [`Responder::vote`] from a webhook its sender may deliver again: its receipt is taken in
    /// the vote's own transaction, and a delivery whose receipt is already taken changes
    /// nothing ([`Refusal::Redelivered`]).
    pub async fn vote_once(
        &self,
        id: &IncidentId,
        who: &Person,
        verdict: Verdict,
        via: &str,
        receipt: &Receipt,
    ) -> Result<VoteResult, HumanError> {
        self.vote_as(id, who, verdict, via, Some(receipt)).await
    }

    async fn vote_as(
        &self,
        id: &IncidentId,
        who: &Person,
        verdict: Verdict,
        via: &str,
        receipt: Option<&Receipt>,
    ) -> Result<VoteResult, HumanError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.try_vote(id, who, &verdict, via, receipt).await {
                Err(HumanError::Step(StepError::Conflict(_))) if attempt < 5 => continue,
                Err(HumanError::Step(StepError::Store(e))) if e.is_conflict() && attempt < 5 => continue,
                other => return other,
            }
        }
    }

    async fn try_vote(
        &self,
        id: &IncidentId,
        who: &Person,
        verdict: &Verdict,
        via: &str,
        receipt: Option<&Receipt>,
    ) -> Result<VoteResult, HumanError> {
        let now = self.clock.now();
        let Some(inc) = self.store.incident(id).await? else {
            return Err(Refusal::UnknownIncident(id.to_string()).into());
        };
        let set = self.policies();
        let approval = set.get(&inc.policy).and_then(|p| p.approval.clone());
        let allowed = approval.as_ref().is_some_and(|a| may_approve(a, who));
        if !allowed {
            let refusal = Refusal::NotAuthorized {
                who: who.to_string(),
                policy: inc.policy.clone(),
            };
            let actor = who.key();
            let entry = NewEvent {
                kind: AuditKind::ApprovalRefused,
                actor: &actor,
                phase_from: None,
                phase_to: None,
                summary: refusal.to_string(),
                detail: json!({ "via": via, "verdict": format!("{verdict:?}") }),
            };
            if !self.store.note_event(receipt, &inc.id, now, entry).await? {
                return Err(Refusal::Redelivered(receipt.map(Receipt::describe).unwrap_or_default()).into());
            }
            info!(incident = %inc.id, who = %who.key(), "unauthorized approval attempt refused");
            return Err(refusal.into());
        }
        if matches!(verdict, Verdict::Approve) && HUMAN_ROLLBACK.contains(&inc.phase) {
            // The story ended without a rollback that helped: the Approve button still works.
            return self.human_rollback(id, who, via, "", receipt).await;
        }
        if inc.phase != Phase::AwaitingApproval {
            return Err(Refusal::NotPending {
                id: inc.id.to_string(),
                phase: inc.phase.to_string(),
            }
            .into());
        }
        // Derived, not stored: past its expiry the request is over even before the worker has
        // run. (The due time may be earlier: a young automatic trigger's re-check.)
        if request_expiry(&inc.decision.outcome).is_some_and(|d| d <= now) {
            return Err(Refusal::Expired(inc.id.to_string()).into());
        }
        let required = approval.map(|a| usize::from(a.required_approvals)).unwrap_or(1);
        let mut tx = self.store.begin().await?;
        take_receipt(&mut tx, receipt, now).await?;
        let Some(mut inc) = tx.incident(id).await? else {
            return Err(Refusal::UnknownIncident(id.to_string()).into());
        };
        if inc.phase != Phase::AwaitingApproval {
            return Err(Refusal::NotPending {
                id: inc.id.to_string(),
                phase: inc.phase.to_string(),
            }
            .into());
        }
        let key = who.key();
        let result = match verdict {
            Verdict::Deny { reason } => {
                if !tx.add_vote(&inc.id, &key, "deny", via, reason.as_deref(), now).await? {
                    return Err(Refusal::AlreadyVoted {
                        who: who.to_string(),
                        id: inc.id.to_string(),
                    }
                    .into());
                }
                // The deny covers the request as it stands: the triggers firing now. An
                // automatic trigger that fires later still acts (see `incident::reconcile`).
                let covers = self.firing_triggers(&mut tx, &inc).await?;
                let summary = format!(
                    "denied by {who} via {via}{}",
                    reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default()
                );
                self.apply(
                    &mut tx,
                    &mut inc,
                    Event::Denied { by: key.clone() },
                    &key,
                    summary,
                    json!({ "event": "denied", "by": key, "reason": reason, "covers": covers }),
                    now,
                )
                .await?;
                VoteResult::Denied
            }
            Verdict::Approve => {
                if !tx.add_vote(&inc.id, &key, "approve", via, None, now).await? {
                    return Err(Refusal::AlreadyVoted {
                        who: who.to_string(),
                        id: inc.id.to_string(),
                    }
                    .into());
                }
                let by = tx.approvers(&inc.id).await?;
                if by.len() >= required {
                    let names: Vec<String> = by.iter().map(|k| display_key(k)).collect();
                    let mut summary = format!("approved by {} via {via}", names.join(" and "));
                    if self.dry_run_in_force(&mut inc) {
                        summary.push_str(
                            "; dry run is in force now, so the rollback is a dry run: nothing will be changed",
                        );
                    }
                    self.apply(
                        &mut tx,
                        &mut inc,
                        Event::Approved { by: by.clone() },
                        &key,
                        summary,
                        Value::Null,
                        now,
                    )
                    .await?;
                    VoteResult::Approved { by }
                } else {
                    // Written although nothing about it changes: two approvers voting at the
                    // same moment (PostgreSQL) would each see only their own vote and both
                    // wait for "another approver". The version check makes the second wait
                    // for the first and conflict; its retry then counts both votes.
                    let summary = format!(
                        "approval {} of {required} from {who} via {via}; waiting for another approver",
                        by.len()
                    );
                    self.record_partial_approval(&mut tx, &mut inc, &key, &summary, now)
                        .await?;
                    VoteResult::NeedsMore {
                        have: by.len(),
                        need: required,
                    }
                }
            }
        };
        self.commit(tx, &inc).await?;
        if inc.phase == Phase::Executing {
            // The worker picks the approved work up at once.
            self.wake_for_work();
        }
        Ok(result)
    }

    /// `/rollback now POLICY [reason]`: a person starts a rollback. Authorized like an
    /// approval and held by the same guards (cooldown, rate limits, dry run). If the target
    /// already has an incident waiting for approval, this counts as approving it.
    pub async fn start_manual(
        &self,
        policy_name: &str,
        who: &Person,
        reason: &str,
    ) -> Result<(IncidentId, String), HumanError> {
        let now = self.clock.now();
        let set = self.policies();
        let p = set
            .get(policy_name)
            .ok_or_else(|| Refusal::UnknownPolicy(policy_name.to_string()))?;
        if !p.approval.as_ref().is_some_and(|a| may_approve(a, who)) {
            return Err(Refusal::NotAuthorized {
                who: who.to_string(),
                policy: p.name.clone(),
            }
            .into());
        }
        let mut tx = self.store.begin().await?;
        if let Some(open) = tx.open_incident_for(&p.target.key()).await? {
            drop(tx);
            if open.phase == Phase::AwaitingApproval {
                let r = self
                    .vote(&open.id, who, Verdict::Approve, "slack command `now`")
                    .await?;
                return Ok((open.id, format!("{r:?}")));
            }
            if HUMAN_ROLLBACK.contains(&open.phase) {
                let r = self
                    .human_rollback(&open.id, who, "slack command `now`", reason, None)
                    .await?;
                return Ok((open.id, format!("{r:?}")));
            }
            return Err(Refusal::Guard(format!(
                "incident {} is already open on this target (phase {}): nothing started",
                open.id, open.phase
            ))
            .into());
        }
        let history = self.load_history(&mut tx, p, now).await?;
        let d = policy::decide_manual(p, &who.to_string(), reason, now, &history, &self.global, &set.hash);
        self.metrics.decision(d.outcome.label(), &p.name);
        let Some(phase) = Phase::for_outcome(&d.outcome) else {
            return Err(Refusal::Guard(d.reason).into());
        };
        if phase == Phase::Suppressed {
            return Err(Refusal::Guard(d.reason).into());
        }
        let context = notify::Context {
            summary: Some(d.reason.clone()),
            runbook: p.links.runbook.clone(),
            dashboard: p.links.dashboard.clone(),
            target: p.target.describe(),
            routes: notify::Routes::resolve(p, &self.notify_defaults),
            verification: p.verification.clone(),
            pages_url: self.notify_defaults.pages_url.clone(),
            follow_ups: p.follow_ups.clone(),
            ..Default::default()
        };
        let inc = Incident {
            alertname: "manual".into(),
            ..super::opening(p, d.clone(), phase, &context, now)
        };
        tx.insert_incident(&inc).await?;
        Self::record(
            &mut tx,
            &inc,
            AuditKind::Opened,
            &who.key(),
            format!("manual rollback of policy {} started by {who}", p.name),
            json!({ "reason": reason }),
            now,
        )
        .await?;
        if phase == Phase::AwaitingApproval {
            // Two-person rule: asking is the first approval; the same person cannot give the
            // second.
            tx.add_vote(&inc.id, &who.key(), "approve", "slack command `now`", None, now)
                .await?;
        }
        Self::record(
            &mut tx,
            &inc,
            AuditKind::Decided,
            SYSTEM,
            d.reason.clone(),
            serde_json::to_value(&d).unwrap_or(Value::Null),
            now,
        )
        .await?;
        self.tell(&mut tx, &inc, Change::Opened, now).await?;
        self.commit(tx, &inc).await?;
        self.wake_for_work();
        Ok((inc.id, d.reason))
    }

    /// An authorized person rolls back an open incident whose story ended without a rollback
    /// that helped (or that is still waiting or held): Approve on an escalated request,
    /// `/rollback now` after a failed rollback or a failed verification. Never automatic; the
    /// cooldown and rate limits do not hold a person (they stop loops, and a person is not
    /// one), a dry run still only records. Under a two-person rule it waits for a second one.
    async fn human_rollback(
        &self,
        id: &IncidentId,
        who: &Person,
        via: &str,
        reason: &str,
        receipt: Option<&Receipt>,
    ) -> Result<VoteResult, HumanError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.try_human_rollback(id, who, via, reason, receipt).await {
                Err(HumanError::Step(StepError::Conflict(_))) if attempt < 5 => continue,
                Err(HumanError::Step(StepError::Store(e))) if e.is_conflict() && attempt < 5 => continue,
                other => return other,
            }
        }
    }

    async fn try_human_rollback(
        &self,
        id: &IncidentId,
        who: &Person,
        via: &str,
        reason: &str,
        receipt: Option<&Receipt>,
    ) -> Result<VoteResult, HumanError> {
        let now = self.clock.now();
        let set = self.policies();
        let mut tx = self.store.begin().await?;
        take_receipt(&mut tx, receipt, now).await?;
        let Some(mut inc) = tx.incident(id).await? else {
            return Err(Refusal::UnknownIncident(id.to_string()).into());
        };
        let Some(p) = set.get(&inc.policy) else {
            return Err(Refusal::UnknownPolicy(inc.policy.clone()).into());
        };
        let Some(approval) = p.approval.as_ref().filter(|a| may_approve(a, who)) else {
            return Err(Refusal::NotAuthorized {
                who: who.to_string(),
                policy: p.name.clone(),
            }
            .into());
        };
        if !HUMAN_ROLLBACK.contains(&inc.phase) {
            return Err(Refusal::NotPending {
                id: inc.id.to_string(),
                phase: inc.phase.to_string(),
            }
            .into());
        }
        // The votes stored for a rehearsal approved a dry run, not a real change: under a
        // two-person rule they must not count towards one.
        if inc.phase == Phase::DryRun && approval.required_approvals > 1 {
            return Err(Refusal::Guard(format!(
                "incident {} was a dry run; its approvals approved a rehearsal, and policy {} needs {} approvers \
                 for a real rollback: close this incident (POST /api/v1/incidents/{}/close), then `/rollback now {}` \
                 asks the approvers afresh",
                inc.id, p.name, approval.required_approvals, inc.id, p.name
            ))
            .into());
        }
        let key = who.key();
        // A vote per person and incident: a second press by the same person counts once.
        tx.add_vote(&inc.id, &key, "approve", via, None, now).await?;
        let mut by = tx.approvers(&inc.id).await?;
        if !by.contains(&key) {
            // Their earlier vote was a deny; asking for the rollback now is their answer.
            by.push(key.clone());
        }
        let required = usize::from(approval.required_approvals);
        if by.len() < required {
            let summary = format!(
                "rollback asked by {who} via {via} ({} of {required} approvals); waiting for another approver",
                by.len()
            );
            self.record_partial_approval(&mut tx, &mut inc, &key, &summary, now)
                .await?;
            self.commit(tx, &inc).await?;
            return Ok(VoteResult::NeedsMore {
                have: by.len(),
                need: required,
            });
        }
        let was = inc.phase;
        let summary = format!(
            "rolled back by hand: {who} via {via}{} (the incident was {was}; nothing automatic does this)",
            if reason.is_empty() {
                String::new()
            } else {
                format!(": {reason}")
            }
        );
        let outcome = if self.dry_run_for(p) {
            Outcome::Suppressed(Suppression::DryRun {
                would: Box::new(Outcome::Auto),
            })
        } else {
            Outcome::Auto
        };
        inc.decision = Decision {
            outcome,
            reason: summary.clone(),
            policy_hash: set.hash.clone(),
            decided_at: now,
            ..inc.decision.clone()
        };
        self.apply(
            &mut tx,
            &mut inc,
            Event::HumanRollback { by: key.clone() },
            &key,
            summary,
            Value::Null,
            now,
        )
        .await?;
        self.commit(tx, &inc).await?;
        self.wake_for_work();
        Ok(VoteResult::Approved { by })
    }

    /// Freezes automatic rollbacks, globally (`policy` None) or for one policy. Anyone who may
    /// approve that policy (for a global freeze: any policy) may freeze.
    pub async fn freeze(
        &self,
        policy: Option<&str>,
        who: &Person,
        until: Option<chrono::DateTime<Utc>>,
        reason: &str,
    ) -> Result<String, HumanError> {
        let scope = self.authorize_scope(policy, who)?;
        let f = Freeze {
            reason: if reason.is_empty() {
                "frozen by hand".into()
            } else {
                reason.to_string()
            },
            by: who.key(),
            until,
        };
        self.store.freeze(&scope, &f, self.clock.now()).await?;
        info!(scope = %scope, by = %who.key(), "automatic rollbacks frozen");
        Ok(scope)
    }

    /// Lifts a freeze; false if there was none.
    pub async fn unfreeze(&self, policy: Option<&str>, who: &Person) -> Result<bool, HumanError> {
        let scope = self.authorize_scope(policy, who)?;
        Ok(self.lift_freeze(&scope, &who.key()).await?)
    }

    /// Stores a freeze (`*` or a policy name); `/metrics` reads the freezes at scrape time.
    pub async fn set_freeze(&self, scope: &str, f: &Freeze) -> Result<(), crate::store::StoreError> {
        self.store.freeze(scope, f, self.clock.now()).await?;
        info!(scope = %scope, by = %f.by, reason = %f.reason, until = ?f.until, "automatic rollbacks frozen");
        Ok(())
    }

    /// Lifts a stored freeze; false if there was none. Config-file freezes stay.
    pub async fn lift_freeze(&self, scope: &str, by: &str) -> Result<bool, crate::store::StoreError> {
        let lifted = self.store.unfreeze(scope).await?;
        if lifted {
            // What the freeze held is decided again now (its alerts may still fire).
            if let Err(e) = self.freeze_lifted().await {
                tracing::warn!(error = %e, "could not make held incidents due; the next round of due work tries again");
            }
        }
        info!(scope = %scope, by = %by, lifted, "freeze lifted");
        Ok(lifted)
    }

    /// A vote that does not yet make the required number: written under the incident's
    /// version although its phase does not change, so two votes at the same moment
    /// (PostgreSQL) conflict and the retry counts both; then recorded and told.
    async fn record_partial_approval(
        &self,
        tx: &mut StoreTx,
        inc: &mut Incident,
        key: &str,
        summary: &str,
        now: DateTime<Utc>,
    ) -> Result<(), HumanError> {
        inc.updated_at = now;
        if !tx.save_incident(inc).await? {
            return Err(StepError::Conflict(inc.id.clone()).into());
        }
        inc.version += 1;
        Self::record(
            tx,
            inc,
            AuditKind::ApprovalRecorded,
            key,
            summary.to_string(),
            Value::Null,
            now,
        )
        .await?;
        self.tell(tx, inc, Change::Note { summary }, now).await?;
        Ok(())
    }

    fn authorize_scope(&self, policy: Option<&str>, who: &Person) -> Result<String, HumanError> {
        let set = self.policies();
        match policy {
            Some(name) => {
                let p = set.get(name).ok_or_else(|| Refusal::UnknownPolicy(name.to_string()))?;
                if !p.approval.as_ref().is_some_and(|a| may_approve(a, who)) {
                    return Err(Refusal::NotAuthorized {
                        who: who.to_string(),
                        policy: name.to_string(),
                    }
                    .into());
                }
                Ok(name.to_string())
            }
            None => {
                if !set
                    .iter()
                    .any(|p| p.approval.as_ref().is_some_and(|a| may_approve(a, who)))
                {
                    return Err(Refusal::NotAuthorized {
                        who: who.to_string(),
                        policy: "any".into(),
                    }
                    .into());
                }
                Ok("*".to_string())
            }
        }
    }
}

/// Takes a webhook's receipt in the transaction of its change: a delivery whose receipt
/// another one already took is refused, and its transaction (dropped) changes nothing.
async fn take_receipt(tx: &mut StoreTx, receipt: Option<&Receipt>, now: DateTime<Utc>) -> Result<(), HumanError> {
    match receipt {
        Some(r) if !tx.take_receipt(r, now).await? => Err(Refusal::Redelivered(r.describe()).into()),
        _ => Ok(()),
    }
}

/// `slack:U1` -> `<@U1>` for messages.
fn display_key(k: &str) -> String {
    match k.split_once(':') {
        Some(("slack", id)) => format!("<@{id}>"),
        Some(("pagerduty", id)) => format!("PagerDuty user {id}"),
        _ => k.to_string(),
    }
}
