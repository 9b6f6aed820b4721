//! What an incident's rollback reverts: its policy's target as it was when the incident opened,
//! parsed once when the incident is read. Stored and shown as the target's own JSON.
//!
//! A stored plan this version cannot read (written by another version, edited by hand) does not
//! make the incident unreadable: lists and pages still show it, and saving it keeps the stored
//! JSON as it was. Only acting on it fails, naming the problem.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::policy::Target;

/// An incident's rollback target, fixed when it opened.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// The target to revert.
    Target(Target),
    /// Stored JSON that is not a target this version knows, kept as it was.
    Unreadable { stored: Value, problem: String },
}

impl Plan {
    /// The target to revert, or why the stored plan cannot be read.
    pub fn target(&self) -> Result<&Target, &str> {
        match self {
            Plan::Target(t) => Ok(t),
            Plan::Unreadable { problem, .. } => Err(problem),
        }
    }
}

impl From<Target> for Plan {
    fn from(t: Target) -> Self {
        Plan::Target(t)
    }
}

impl Serialize for Plan {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Plan::Target(t) => t.serialize(s),
            Plan::Unreadable { stored, .. } => stored.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Plan {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let stored = Value::deserialize(d)?;
        Ok(match Target::deserialize(&stored) {
            Ok(t) => Plan::Target(t),
            Err(e) => Plan::Unreadable {
                problem: e.to_string(),
                stored,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alb() -> Value {
        serde_json::json!({
            "alb": {
                "listener_arn": "arn:aws:elasticloadbalancing:us-east-1:123456789012:listener/app/portal/1/2",
                "stable_target_group_arn": "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/stable/1"
            }
        })
    }

    #[test]
    fn a_stored_target_reads_as_itself_and_writes_back_the_same_json() {
        let plan: Plan = serde_json::from_value(alb()).unwrap();
        let target = plan.target().expect("an ALB target");
        assert!(matches!(target, Target::Alb(_)));
        assert_eq!(
            serde_json::to_value(&plan).unwrap(),
            serde_json::to_value(target).unwrap(),
            "the same JSON as the target itself"
        );
        let again: Plan = serde_json::from_value(serde_json::to_value(&plan).unwrap()).unwrap();
        assert_eq!(again, plan);
    }

    #[test]
    fn an_unknown_plan_is_kept_as_stored_and_fails_only_when_acted_on() {
        for stored in [
            Value::Null,
            serde_json::json!({ "gcp": { "backend": "b" } }),
            serde_json::json!({ "alb": { "listener_arn": 7 } }),
        ] {
            let plan: Plan = serde_json::from_value(stored.clone()).expect("never a read error");
            let problem = plan.target().expect_err("not a target");
            assert!(!problem.is_empty());
            assert_eq!(serde_json::to_value(&plan).unwrap(), stored, "saved unchanged");
        }
    }
}
