//! The kinds of entry in an incident's audit trail (its timeline). The store keeps each kind as
//! its snake_case name, so these names are a stored format: renaming a variant is fine, changing
//! its name is not (old rows would no longer read).

use std::fmt;

use serde::{Deserialize, Serialize};

/// The actor of the entries the responder makes on its own (not a person, not Alertmanager).
pub const SYSTEM_ACTOR: &str = "rollback-responder";

/// What an audit entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    /// An incident was opened (by an alert or a person).
    Opened,
    /// A (re-)decision; a phase change from [`super::Event::Decided`].
    Decided,
    /// Enough approvals were given.
    Approved,
    /// An approver said no.
    Denied,
    /// The approval request expired (also when a hold kept it from rolling back).
    ApprovalExpired,
    /// One vote, short of the required number.
    ApprovalRecorded,
    /// A vote that was refused (not an approver, the same person twice, too late).
    ApprovalRefused,
    /// Another alert joined the incident.
    AlertJoined,
    /// One of the incident's alerts resolved.
    AlertResolved,
    /// Every alert of the incident resolved.
    AllAlertsResolved,
    /// A person rolled back by hand.
    HumanRollback,
    /// The action started (who runs it).
    ActionStarted,
    /// One step of the action: planned, applied, read back.
    ActionStep,
    /// The action finished.
    ActionSucceeded,
    /// The action or its pre-check failed.
    ActionFailed,
    /// One verification check's result.
    VerificationCheck,
    /// All verification checks passed.
    VerificationPassed,
    /// A verification check failed or the bake period ran out.
    VerificationFailed,
    /// The incident closed.
    Closed,
    /// A notification failed for good.
    NotificationFailed,
    /// PagerDuty says its incident was acknowledged.
    PagerdutyAcknowledged,
    /// PagerDuty says its incident was resolved.
    PagerdutyResolved,
    /// PagerDuty says its incident was unacknowledged.
    PagerdutyUnacknowledged,
    /// PagerDuty says its incident was reopened.
    PagerdutyReopened,
    /// PagerDuty says its incident was escalated.
    PagerdutyEscalated,
}

impl AuditKind {
    /// Every kind, for parsing.
    pub const ALL: [AuditKind; 25] = [
        AuditKind::Opened,
        AuditKind::Decided,
        AuditKind::Approved,
        AuditKind::Denied,
        AuditKind::ApprovalExpired,
        AuditKind::ApprovalRecorded,
        AuditKind::ApprovalRefused,
        AuditKind::AlertJoined,
        AuditKind::AlertResolved,
        AuditKind::AllAlertsResolved,
        AuditKind::HumanRollback,
        AuditKind::ActionStarted,
        AuditKind::ActionStep,
        AuditKind::ActionSucceeded,
        AuditKind::ActionFailed,
        AuditKind::VerificationCheck,
        AuditKind::VerificationPassed,
        AuditKind::VerificationFailed,
        AuditKind::Closed,
        AuditKind::NotificationFailed,
        AuditKind::PagerdutyAcknowledged,
        AuditKind::PagerdutyResolved,
        AuditKind::PagerdutyUnacknowledged,
        AuditKind::PagerdutyReopened,
        AuditKind::PagerdutyEscalated,
    ];

    /// The storage and API spelling (the same as serde's).
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::Opened => "opened",
            AuditKind::Decided => "decided",
            AuditKind::Approved => "approved",
            AuditKind::Denied => "denied",
            AuditKind::ApprovalExpired => "approval_expired",
            AuditKind::ApprovalRecorded => "approval_recorded",
            AuditKind::ApprovalRefused => "approval_refused",
            AuditKind::AlertJoined => "alert_joined",
            AuditKind::AlertResolved => "alert_resolved",
            AuditKind::AllAlertsResolved => "all_alerts_resolved",
            AuditKind::HumanRollback => "human_rollback",
            AuditKind::ActionStarted => "action_started",
            AuditKind::ActionStep => "action_step",
            AuditKind::ActionSucceeded => "action_succeeded",
            AuditKind::ActionFailed => "action_failed",
            AuditKind::VerificationCheck => "verification_check",
            AuditKind::VerificationPassed => "verification_passed",
            AuditKind::VerificationFailed => "verification_failed",
            AuditKind::Closed => "closed",
            AuditKind::NotificationFailed => "notification_failed",
            AuditKind::PagerdutyAcknowledged => "pagerduty_acknowledged",
            AuditKind::PagerdutyResolved => "pagerduty_resolved",
            AuditKind::PagerdutyUnacknowledged => "pagerduty_unacknowledged",
            AuditKind::PagerdutyReopened => "pagerduty_reopened",
            AuditKind::PagerdutyEscalated => "pagerduty_escalated",
        }
    }

    /// Parses the storage spelling.
    pub fn parse(s: &str) -> Option<AuditKind> {
        AuditKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The entry a PagerDuty webhook's `event_type` is recorded as, if it is one we record.
    pub fn for_pagerduty(event_type: &str) -> Option<AuditKind> {
        match event_type {
            "incident.acknowledged" => Some(AuditKind::PagerdutyAcknowledged),
            "incident.resolved" => Some(AuditKind::PagerdutyResolved),
            "incident.unacknowledged" => Some(AuditKind::PagerdutyUnacknowledged),
            "incident.reopened" => Some(AuditKind::PagerdutyReopened),
            "incident.escalated" => Some(AuditKind::PagerdutyEscalated),
            _ => None,
        }
    }
}

impl fmt::Display for AuditKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names rows already stored carry: none may change.
    #[test]
    fn stored_names_stay_as_they_were_and_round_trip() {
        let names: Vec<&str> = AuditKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "opened",
                "decided",
                "approved",
                "denied",
                "approval_expired",
                "approval_recorded",
                "approval_refused",
                "alert_joined",
                "alert_resolved",
                "all_alerts_resolved",
                "human_rollback",
                "action_started",
                "action_step",
                "action_succeeded",
                "action_failed",
                "verification_check",
                "verification_passed",
                "verification_failed",
                "closed",
                "notification_failed",
                "pagerduty_acknowledged",
                "pagerduty_resolved",
                "pagerduty_unacknowledged",
                "pagerduty_reopened",
                "pagerduty_escalated",
            ]
        );
        for k in AuditKind::ALL {
            assert_eq!(AuditKind::parse(k.as_str()), Some(k));
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str(), "serde spells it the same");
        }
        assert_eq!(AuditKind::parse("Opened"), None);
        assert_eq!(AuditKind::parse(""), None);
    }

    #[test]
    fn pagerduty_events_we_record_and_those_we_do_not() {
        assert_eq!(
            AuditKind::for_pagerduty("incident.acknowledged"),
            Some(AuditKind::PagerdutyAcknowledged)
        );
        assert_eq!(
            AuditKind::for_pagerduty("incident.escalated").map(AuditKind::as_str),
            Some("pagerduty_escalated")
        );
        assert_eq!(AuditKind::for_pagerduty("incident.annotated"), None);
        assert_eq!(AuditKind::for_pagerduty("acknowledged"), None);
    }
}
