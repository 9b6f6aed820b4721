//! Who may approve, deny or start a rollback, and what a vote amounts to. Pure: the HTTP edge
//! resolves who is asking (Slack user and their user groups, or a PagerDuty user) and the
//! responder stores the vote and changes the incident's phase.

use std::fmt;

use serde::Serialize;

use crate::policy::Approval;

/// Where a person answered from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Slack,
    PagerDuty,
}

/// Someone answering an approval request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Person {
    pub source: Source,
    /// Slack user id (`U...`) or PagerDuty user id (`P...`).
    pub id: String,
    /// Slack user groups the person belongs to (resolved by the caller, only those that matter).
    pub groups: Vec<String>,
}

impl Person {
    /// A Slack user.
    pub fn slack(id: &str, groups: Vec<String>) -> Person {
        Person {
            source: Source::Slack,
            id: id.to_string(),
            groups,
        }
    }

    /// A PagerDuty user.
    pub fn pagerduty(id: &str) -> Person {
        Person {
            source: Source::PagerDuty,
            id: id.to_string(),
            groups: vec![],
        }
    }

    /// The stored identity (one vote per identity per incident).
    pub fn key(&self) -> String {
        match self.source {
            Source::Slack => format!("slack:{}", self.id),
            Source::PagerDuty => format!("pagerduty:{}", self.id),
        }
    }
}

impl fmt::Display for Person {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.source {
            Source::Slack => write!(f, "<@{}>", self.id),
            Source::PagerDuty => write!(f, "PagerDuty user {}", self.id),
        }
    }
}

/// Whether `p` is one of the policy's approvers.
pub fn may_approve(a: &Approval, p: &Person) -> bool {
    match p.source {
        Source::Slack => {
            a.approvers.slack_users.contains(&p.id) || p.groups.iter().any(|g| a.approvers.slack_groups.contains(g))
        }
        Source::PagerDuty => a.approvers.pagerduty_users.contains(&p.id),
    }
}

/// Yes or no.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Approve,
    Deny { reason: Option<String> },
}

/// Why a vote changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("there is no incident {0}")]
    UnknownIncident(String),
    #[error("{who} may not approve or deny rollbacks of policy {policy}")]
    NotAuthorized { who: String, policy: String },
    #[error("incident {id} is not waiting for approval (it is {phase})")]
    NotPending { id: String, phase: String },
    #[error("the approval request for incident {0} has expired")]
    Expired(String),
    #[error("{who} already voted on incident {id}")]
    AlreadyVoted { who: String, id: String },
    #[error("there is no policy {0}")]
    UnknownPolicy(String),
    #[error("{0}")]
    Guard(String),
    /// A webhook whose change another delivery of it already made (see `store::Receipt`).
    #[error("{0} was already processed")]
    Redelivered(String),
}

/// What a vote did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VoteResult {
    /// Enough approvals: the rollback starts.
    Approved { by: Vec<String> },
    /// Counted; more distinct approvals are needed.
    NeedsMore { have: usize, need: usize },
    /// Denied: nothing will be rolled back for this incident.
    Denied,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Approvers, OnTimeout};

    fn approval() -> Approval {
        Approval {
            approvers: Approvers {
                slack_users: vec!["U1".into()],
                slack_groups: vec!["S1".into()],
                pagerduty_users: vec!["P1".into()],
            },
            required_approvals: 1,
            timeout: std::time::Duration::from_secs(60),
            on_timeout: OnTimeout::Escalate,
        }
    }

    #[test]
    fn approvers_by_user_group_and_pagerduty() {
        let a = approval();
        assert!(may_approve(&a, &Person::slack("U1", vec![])));
        assert!(!may_approve(&a, &Person::slack("U2", vec![])));
        assert!(may_approve(&a, &Person::slack("U2", vec!["S1".into()])));
        assert!(!may_approve(&a, &Person::slack("U2", vec!["S2".into()])));
        assert!(may_approve(&a, &Person::pagerduty("P1")));
        assert!(
            !may_approve(&a, &Person::pagerduty("U1")),
            "a Slack id is not a PagerDuty id"
        );
        assert_eq!(Person::slack("U1", vec![]).key(), "slack:U1");
        assert_eq!(Person::slack("U1", vec![]).to_string(), "<@U1>");
    }
}
