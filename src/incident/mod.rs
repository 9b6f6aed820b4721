//! Incidents: one per rollback target while its alerts fire, with every state change in
//! [`transition`].
//!
//! The responder opens an incident when a firing alert matches a policy (or attaches the alert
//! to the target's open incident), feeds it [`Event`]s as the decision, approvals, the action and
//! verification progress, and the store persists each new [`Phase`] together with an
//! append-only event log: the audit trail. This module is pure: no store, no SDK.

mod audit;
pub mod joins;
mod plan;
pub mod reconcile;

pub use audit::{AuditKind, SYSTEM_ACTOR};
pub use plan::Plan;

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::policy::{OnTimeout, Outcome, Suppression};

/// An incident's id (a UUIDv7, so ids sort by creation time).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IncidentId(pub String);

impl IncidentId {
    /// A fresh id.
    pub fn new() -> Self {
        IncidentId(uuid::Uuid::now_v7().to_string())
    }
}

impl Default for IncidentId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for IncidentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where an incident's rollback stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// A guard says "not yet" (too young); re-decided at the due time if still firing.
    Waiting,
    /// A human must approve; expires at the due time with the policy's on_timeout.
    AwaitingApproval,
    /// Claimed by a replica; the action is running (or about to).
    Executing,
    /// The action changed the target; checks are running.
    Verifying,
    /// The rollback took.
    Verified,
    /// The rollback ran but the checks did not pass: escalated, never retried automatically.
    VerificationFailed,
    /// Dry run: what would have been written is recorded; nothing was changed.
    DryRun,
    /// The decision was to do nothing (cooldown, rate limit, freeze).
    Suppressed,
    /// A human said no.
    Denied,
    /// Approval expired and the policy says give up.
    GaveUp,
    /// Approval expired and the policy says escalate.
    Escalated,
    /// The action or its pre-check failed: escalated.
    Failed,
    /// Every alert resolved before anything was done.
    Cancelled,
}

impl Phase {
    /// Every phase, for parsing and metrics.
    pub const ALL: [Phase; 13] = [
        Phase::Waiting,
        Phase::AwaitingApproval,
        Phase::Executing,
        Phase::Verifying,
        Phase::Verified,
        Phase::VerificationFailed,
        Phase::DryRun,
        Phase::Suppressed,
        Phase::Denied,
        Phase::GaveUp,
        Phase::Escalated,
        Phase::Failed,
        Phase::Cancelled,
    ];

    /// The storage and API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Waiting => "waiting",
            Phase::AwaitingApproval => "awaiting_approval",
            Phase::Executing => "executing",
            Phase::Verifying => "verifying",
            Phase::Verified => "verified",
            Phase::VerificationFailed => "verification_failed",
            Phase::DryRun => "dry_run",
            Phase::Suppressed => "suppressed",
            Phase::Denied => "denied",
            Phase::GaveUp => "gave_up",
            Phase::Escalated => "escalated",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        }
    }

    /// Parses the storage spelling.
    pub fn parse(s: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// Whether the rollback's story is over (the incident may stay open while alerts fire).
    pub fn is_settled(self) -> bool {
        !matches!(
            self,
            Phase::Waiting | Phase::AwaitingApproval | Phase::Executing | Phase::Verifying
        )
    }

    /// The phase a fresh decision puts an incident in; `None` for "no match" (no incident).
    pub fn for_outcome(outcome: &Outcome) -> Option<Phase> {
        match outcome {
            Outcome::NoMatch | Outcome::Undecidable { .. } => None,
            Outcome::Auto => Some(Phase::Executing),
            Outcome::NeedsApproval { .. } | Outcome::EscalateLater { .. } => Some(Phase::AwaitingApproval),
            Outcome::Suppressed(Suppression::TooYoung { .. }) => Some(Phase::Waiting),
            Outcome::Suppressed(Suppression::DryRun { would }) => Phase::for_outcome(would),
            Outcome::Suppressed(_) => Some(Phase::Suppressed),
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that happened to an incident.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A (re-)decision for a firing alert of this incident.
    Decided { outcome: Outcome },
    /// Enough approvals were given.
    Approved { by: Vec<String> },
    /// An approver said no.
    Denied { by: String },
    /// The approval request expired.
    ApprovalExpired { on_timeout: OnTimeout },
    /// The approval request expired with "roll back anyway", but a freeze, the cooldown or a
    /// rate limit holds automatic rollbacks at that moment (the outcome says which).
    ExpiryHeld { outcome: Outcome },
    /// The action finished: it changed the target, found it already reverted, or (dry run)
    /// only recorded what it would write.
    ActionSucceeded { changed: bool, dry_run: bool },
    /// The action or its pre-check failed.
    ActionFailed,
    /// All verification checks passed.
    VerificationPassed,
    /// A verification check failed or the bake period ran out.
    VerificationFailed,
    /// Every alert of the incident has resolved.
    AllAlertsResolved,
    /// An authorized person rolls back an incident whose own story ended without a rollback
    /// that helped (escalated, failed, gave up, denied, held, verification failed).
    HumanRollback { by: String },
}

impl Event {
    /// The audit-trail kind of this event.
    pub fn kind(&self) -> AuditKind {
        match self {
            Event::Decided { .. } => AuditKind::Decided,
            Event::Approved { .. } => AuditKind::Approved,
            Event::Denied { .. } => AuditKind::Denied,
            Event::ApprovalExpired { .. } | Event::ExpiryHeld { .. } => AuditKind::ApprovalExpired,
            Event::ActionSucceeded { .. } => AuditKind::ActionSucceeded,
            Event::ActionFailed => AuditKind::ActionFailed,
            Event::VerificationPassed => AuditKind::VerificationPassed,
            Event::VerificationFailed => AuditKind::VerificationFailed,
            Event::AllAlertsResolved => AuditKind::AllAlertsResolved,
            Event::HumanRollback { .. } => AuditKind::HumanRollback,
        }
    }
}

/// An event that the phase does not allow; the caller records it and changes nothing.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{event} is not allowed while the incident is {phase}")]
pub struct InvalidTransition {
    pub phase: Phase,
    pub event: String,
}

/// What follows a dry run of an incident whose alerts still fire: nothing automatic (the
/// rehearsal was its rollback), and nothing was changed, so a person may roll back for real.
pub(crate) const AFTER_DRY_RUN: &str =
    "the dry run rehearsed this incident's rollback and changed nothing; nothing more happens on its own: \
     a person can roll back for real (Approve, /rollback now)";

/// Every state change of an incident, in one place.
pub fn transition(phase: Phase, event: &Event) -> Result<Phase, InvalidTransition> {
    use Phase as P;
    let next = match (phase, event) {
        // "No match" on re-decision (a reload removed the trigger) ends the wait.
        (P::Waiting, Event::Decided { outcome }) => Some(Phase::for_outcome(outcome).unwrap_or(P::Cancelled)),
        // A stronger trigger joining a pending request acts at once; weaker ones change nothing.
        (P::AwaitingApproval, Event::Decided { outcome }) => match Phase::for_outcome(outcome) {
            Some(P::Executing) => Some(P::Executing),
            _ => Some(P::AwaitingApproval),
        },
        // A held incident is decided again when its hold ends: it acts, asks, or stays held.
        (P::Suppressed, Event::Decided { outcome }) => match Phase::for_outcome(outcome) {
            Some(p @ (P::Executing | P::AwaitingApproval)) => Some(p),
            _ => Some(P::Suppressed),
        },
        // After a deny, an escalation or giving up, only an automatic trigger (one the deny did
        // not cover, see `reconcile`) acts; anything else leaves the phase as it is.
        (P::Denied | P::Escalated | P::GaveUp, Event::Decided { outcome }) => match Phase::for_outcome(outcome) {
            Some(P::Executing) => Some(P::Executing),
            _ => Some(phase),
        },
        // A person can always roll back by hand, also after a failed rollback or verification,
        // and after a dry run rehearsed it (never the responder on its own).
        (
            P::Waiting
            | P::Suppressed
            | P::Denied
            | P::Escalated
            | P::GaveUp
            | P::Failed
            | P::VerificationFailed
            | P::DryRun,
            Event::HumanRollback { .. },
        ) => Some(P::Executing),
        (P::AwaitingApproval, Event::Approved { .. }) => Some(P::Executing),
        (P::AwaitingApproval, Event::Denied { .. }) => Some(P::Denied),
        (P::AwaitingApproval, Event::ApprovalExpired { on_timeout }) => Some(match on_timeout {
            OnTimeout::Rollback => P::Executing,
            OnTimeout::Escalate => P::Escalated,
            OnTimeout::GiveUp => P::GaveUp,
        }),
        (P::AwaitingApproval, Event::ExpiryHeld { .. }) => Some(P::Suppressed),
        (P::Waiting | P::AwaitingApproval, Event::AllAlertsResolved) => Some(P::Cancelled),
        (P::Executing, Event::ActionSucceeded { dry_run: true, .. }) => Some(P::DryRun),
        (P::Executing, Event::ActionSucceeded { dry_run: false, .. }) => Some(P::Verifying),
        (P::Executing, Event::ActionFailed) => Some(P::Failed),
        (P::Verifying, Event::VerificationPassed) => Some(P::Verified),
        (P::Verifying, Event::VerificationFailed) => Some(P::VerificationFailed),
        // Work in flight finishes even if the alert resolves meanwhile; settled phases stay.
        (p, Event::AllAlertsResolved) => Some(p),
        _ => None,
    };
    next.ok_or_else(|| InvalidTransition {
        phase,
        event: event.kind().to_string(),
    })
}

/// An incident closes by itself once its rollback story is settled and none of its alerts
/// fires, except after a failed verification: the rollback is not proven to work whatever the
/// alert says, so the page stays open until a human closes the incident.
pub fn should_close(phase: Phase, firing_alerts: u64) -> bool {
    phase.is_settled() && phase != Phase::VerificationFailed && firing_alerts == 0
}

/// An incident as stored.
#[derive(Debug, Clone, Serialize)]
pub struct Incident {
    pub id: IncidentId,
    pub policy: String,
    pub trigger: Option<String>,
    pub service: String,
    pub target_key: String,
    pub phase: Phase,
    pub decision: crate::policy::Decision,
    /// What a rollback reverts (the policy's target, as it was when the incident opened).
    pub plan: Plan,
    pub alertname: String,
    pub first_alert_starts_at: DateTime<Utc>,
    pub opened_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub closed_at: Option<DateTime<Utc>>,
    pub due_at: Option<DateTime<Utc>>,
    /// When the target was really changed; `None` means nothing was executed.
    pub acted_at: Option<DateTime<Utc>>,
    pub verified_at: Option<DateTime<Utc>>,
    pub owner: Option<String>,
    pub lease_until: Option<DateTime<Utc>>,
    pub version: i64,
    /// The first alert's links and the notification routes, fixed when the incident opened.
    pub context: serde_json::Value,
}

impl Incident {
    /// Whether anything was changed on a real system for this incident.
    pub fn executed(&self) -> bool {
        self.acted_at.is_some()
    }

    /// Closes the incident at `now`. Its due time ends with it: nothing decides a closed
    /// incident again, and a due time left behind would come back on every tick.
    pub fn close(&mut self, now: DateTime<Utc>) {
        self.closed_at = Some(now);
        self.due_at = None;
    }
}

#[cfg(test)]
impl Incident {
    /// An incident for unit tests, opened at `now` under a policy "p", in `phase`.
    pub(crate) fn sample(phase: Phase, now: DateTime<Utc>) -> Incident {
        Incident {
            id: IncidentId::new(),
            policy: "p".into(),
            trigger: Some("t".into()),
            service: "svc".into(),
            target_key: "alb:listener/x".into(),
            phase,
            decision: crate::policy::Decision {
                outcome: crate::policy::Outcome::Auto,
                policy: Some("p".into()),
                trigger: Some("t".into()),
                reason: "test".into(),
                policy_hash: "h".into(),
                decided_at: now,
            },
            plan: Plan::Unreadable {
                stored: serde_json::Value::Null,
                problem: "no plan in this sample".into(),
            },
            alertname: "HighErrorRate".into(),
            first_alert_starts_at: now,
            opened_at: now,
            updated_at: now,
            closed_at: None,
            due_at: None,
            acted_at: None,
            verified_at: None,
            owner: None,
            lease_until: None,
            version: 0,
            context: serde_json::Value::Null,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Outcome;

    fn at() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    #[test]
    fn decisions_open_in_the_right_phase() {
        assert_eq!(Phase::for_outcome(&Outcome::Auto), Some(Phase::Executing));
        assert_eq!(Phase::for_outcome(&Outcome::NoMatch), None);
        let dry = Outcome::Suppressed(Suppression::DryRun {
            would: Box::new(Outcome::Auto),
        });
        assert_eq!(Phase::for_outcome(&dry), Some(Phase::Executing));
        let young = Outcome::Suppressed(Suppression::TooYoung {
            firing_for_secs: 1,
            required_secs: 2,
            recheck_at: at(),
        });
        assert_eq!(Phase::for_outcome(&young), Some(Phase::Waiting));
        let cool = Outcome::Suppressed(Suppression::Cooldown {
            last_rollback: at(),
            until: at(),
        });
        assert_eq!(Phase::for_outcome(&cool), Some(Phase::Suppressed));
        assert_eq!(
            Phase::for_outcome(&Outcome::EscalateLater { auto_at: at() }),
            Some(Phase::AwaitingApproval)
        );
    }

    #[test]
    fn approval_paths() {
        let p = Phase::AwaitingApproval;
        assert_eq!(
            transition(p, &Event::Approved { by: vec!["U1".into()] }),
            Ok(Phase::Executing)
        );
        assert_eq!(transition(p, &Event::Denied { by: "U1".into() }), Ok(Phase::Denied));
        assert_eq!(
            transition(
                p,
                &Event::ApprovalExpired {
                    on_timeout: OnTimeout::Rollback
                }
            ),
            Ok(Phase::Executing)
        );
        assert_eq!(
            transition(
                p,
                &Event::ApprovalExpired {
                    on_timeout: OnTimeout::Escalate
                }
            ),
            Ok(Phase::Escalated)
        );
        assert_eq!(
            transition(
                p,
                &Event::ApprovalExpired {
                    on_timeout: OnTimeout::GiveUp
                }
            ),
            Ok(Phase::GaveUp)
        );
        let held = Outcome::Suppressed(Suppression::Frozen {
            scope: "*".into(),
            freeze_reason: "db failover".into(),
            until: None,
        });
        assert_eq!(
            transition(p, &Event::ExpiryHeld { outcome: held.clone() }),
            Ok(Phase::Suppressed)
        );
        assert!(transition(Phase::Waiting, &Event::ExpiryHeld { outcome: held }).is_err());
        assert_eq!(transition(p, &Event::AllAlertsResolved), Ok(Phase::Cancelled));
        assert_eq!(
            transition(p, &Event::Decided { outcome: Outcome::Auto }),
            Ok(Phase::Executing)
        );
    }

    #[test]
    fn action_and_verification_paths() {
        assert_eq!(
            transition(
                Phase::Executing,
                &Event::ActionSucceeded {
                    changed: true,
                    dry_run: false
                }
            ),
            Ok(Phase::Verifying)
        );
        assert_eq!(
            transition(
                Phase::Executing,
                &Event::ActionSucceeded {
                    changed: false,
                    dry_run: true
                }
            ),
            Ok(Phase::DryRun)
        );
        assert_eq!(transition(Phase::Executing, &Event::ActionFailed), Ok(Phase::Failed));
        assert_eq!(
            transition(Phase::Verifying, &Event::VerificationPassed),
            Ok(Phase::Verified)
        );
        assert_eq!(
            transition(Phase::Verifying, &Event::VerificationFailed),
            Ok(Phase::VerificationFailed)
        );
        assert_eq!(
            transition(Phase::Executing, &Event::AllAlertsResolved),
            Ok(Phase::Executing)
        );
    }

    #[test]
    fn settled_incidents_never_act_again_on_their_own() {
        for p in [
            Phase::Verified,
            Phase::VerificationFailed,
            Phase::Denied,
            Phase::Failed,
            Phase::Suppressed,
            Phase::DryRun,
        ] {
            assert!(transition(p, &Event::Approved { by: vec![] }).is_err(), "{p}");
            assert_eq!(transition(p, &Event::AllAlertsResolved), Ok(p));
        }
        // After a rollback (or a dry run) and after a failed one: never a second automatic one.
        for p in [Phase::Verified, Phase::VerificationFailed, Phase::Failed, Phase::DryRun] {
            assert!(
                transition(p, &Event::Decided { outcome: Outcome::Auto }).is_err(),
                "{p}"
            );
        }
    }

    #[test]
    fn a_hold_ending_or_an_automatic_trigger_after_a_deny_acts() {
        for p in [Phase::Suppressed, Phase::Denied, Phase::Escalated, Phase::GaveUp] {
            assert_eq!(
                transition(p, &Event::Decided { outcome: Outcome::Auto }),
                Ok(Phase::Executing),
                "{p}"
            );
        }
        let ask = Outcome::NeedsApproval {
            expires_at: at(),
            on_timeout: OnTimeout::Escalate,
        };
        assert_eq!(
            transition(Phase::Suppressed, &Event::Decided { outcome: ask.clone() }),
            Ok(Phase::AwaitingApproval)
        );
        assert_eq!(
            transition(Phase::Denied, &Event::Decided { outcome: ask }),
            Ok(Phase::Denied),
            "only an automatic trigger acts after a deny"
        );
    }

    #[test]
    fn a_person_can_always_roll_back_once_the_story_ended_without_help() {
        let by = Event::HumanRollback { by: "slack:U1".into() };
        for p in [
            Phase::Waiting,
            Phase::Suppressed,
            Phase::Denied,
            Phase::Escalated,
            Phase::GaveUp,
            Phase::Failed,
            Phase::VerificationFailed,
        ] {
            assert_eq!(transition(p, &by), Ok(Phase::Executing), "{p}");
        }
        for p in [Phase::Executing, Phase::Verifying, Phase::Verified, Phase::Cancelled] {
            assert!(transition(p, &by).is_err(), "{p}");
        }
        let e = transition(Phase::Verified, &Event::ActionFailed).unwrap_err();
        assert_eq!(
            e.to_string(),
            "action_failed is not allowed while the incident is verified"
        );
    }

    #[test]
    fn closing_waits_for_work_in_flight() {
        assert!(!should_close(Phase::Executing, 0));
        assert!(!should_close(Phase::Verified, 1));
        assert!(should_close(Phase::Verified, 0));
        assert!(should_close(Phase::Cancelled, 0));
        assert!(
            !should_close(Phase::VerificationFailed, 0),
            "a failed verification waits for a human even when the alert resolved"
        );
    }

    #[test]
    fn phase_names_round_trip() {
        for p in Phase::ALL {
            assert_eq!(Phase::parse(p.as_str()), Some(p));
        }
    }
}
