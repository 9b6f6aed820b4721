//! Each executor's step records, rendered for people in the executor's own terms.
//!
//! The executors report every notable step through a callback while they run (`alb::AlbStep`,
//! `kubernetes::KubeStepRecord`); [`crate::action::Executors::execute`] turns each into a
//! [`Step`]: one line for the incident's timeline and Slack thread, the typed record as JSON
//! for the audit trail, and whether the step changed the target. An ALB step speaks of
//! healthy targets and weights, a Kubernetes step of ready pods, selectors and replicas (its
//! rendering lives beside its records, in `kubernetes/records.rs`).

use super::alb::AlbStep;

/// One step of an action as it happens.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// One line for the timeline and Slack.
    pub summary: String,
    /// The executor's typed record, for the audit trail.
    pub detail: serde_json::Value,
    /// The step changed the target (a write that took): a partial revert names these.
    pub applied: bool,
    /// Worth a line in the incident's Slack thread as it happens (writes, failed calls, waits).
    pub notable: bool,
}

impl From<AlbStep> for Step {
    fn from(s: AlbStep) -> Step {
        Step {
            summary: s.describe(),
            applied: s.applied(),
            notable: s.notable(),
            detail: serde_json::to_value(&s).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::retry::Attempt;

    #[test]
    fn alb_steps_speak_alb_and_failed_calls_are_named() {
        let pre = AlbStep::PreCheck {
            target_group_arn: "tg/stable".into(),
            healthy: 3,
            required: 2,
            passed: true,
            states: [("healthy".to_string(), 3)].into(),
            targets: vec![],
        };
        assert_eq!(
            pre.describe(),
            "pre-check: 3 healthy target(s) in stable target group tg/stable, 2 required (3 healthy): passed"
        );
        let failed = AlbStep::AttemptFailed(Attempt {
            call: "ModifyListener".into(),
            attempt: 2,
            code: "Throttling".into(),
            message: "Rate exceeded".into(),
            retryable: true,
            will_retry: true,
            retry_in_ms: Some(400),
        });
        assert_eq!(
            failed.describe(),
            "ModifyListener attempt 2 failed: Throttling Rate exceeded (retrying in 400 ms)"
        );
        let step: Step = failed.clone().into();
        // The attempts between the first and the last are in the timeline only.
        assert!(!step.notable && !step.applied);
        assert_eq!(step.detail["step"], "attempt_failed");
        assert_eq!(step.detail["call"], "ModifyListener");
        let AlbStep::AttemptFailed(mut first) = failed else {
            unreachable!()
        };
        first.attempt = 1;
        assert!(Step::from(AlbStep::AttemptFailed(first)).notable);
        let wrote = Step::from(AlbStep::Wrote {
            operation: "ModifyListener".into(),
            stable_percent: 50,
            attempt: 1,
        });
        assert!(wrote.applied && wrote.notable);
        assert_eq!(wrote.summary, "ModifyListener written: 50% to stable (attempt 1)");
    }
}
