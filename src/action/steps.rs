//! Each executor's step records, rendered for people in the executor's own terms.
//!
//! The executors report every notable step through a callback while they run (`alb::AlbStep`,
//! `kubernetes::KubeStepRecord`); [`crate::action::Executors::execute`] turns each into a
//! [`Step`]: one line for the incident's timeline and Slack thread, the typed record as JSON
//! for the audit trail, and whether the step changed the target. An ALB step speaks of
//! healthy targets and weights, a Kubernetes step of ready pods, selectors and replicas (its
//! rendering lives beside its records, in `kubernetes/records.rs`).

use std::collections::BTreeMap;

use super::alb::{AlbStep, ForwardSnapshot};

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
            notable: match &s {
                AlbStep::Wrote { .. } | AlbStep::Waiting { .. } | AlbStep::ReadBeforeRetry { applied: true, .. } => {
                    true
                }
                AlbStep::AttemptFailed(a) => a.is_notable(),
                _ => false,
            },
            detail: serde_json::to_value(&s).unwrap_or_default(),
        }
    }
}

fn forward_of(s: &ForwardSnapshot) -> String {
    s.forward
        .as_ref()
        .map_or_else(|| "no forward action".to_string(), ToString::to_string)
}

fn states_of(states: &BTreeMap<String, u32>) -> String {
    if states.is_empty() {
        return "no targets registered".to_string();
    }
    states
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl AlbStep {
    /// One line in ALB terms: healthy targets, weights, the ELBv2 call.
    pub fn describe(&self) -> String {
        match self {
            AlbStep::Read { snapshot } => format!("read {}: [{}]", snapshot.resource_arn, forward_of(snapshot)),
            AlbStep::AlreadyStable => "already forwards everything to the stable target group: nothing to write".into(),
            AlbStep::PreCheck {
                target_group_arn,
                healthy,
                required,
                passed,
                states,
                ..
            } => format!(
                "pre-check: {healthy} healthy target(s) in stable target group {target_group_arn}, {required} required ({}): {}",
                states_of(states),
                if *passed { "passed" } else { "FAILED, nothing written" }
            ),
            AlbStep::Planned {
                stable_percent,
                operation,
                dry_run,
                actions,
            } => format!(
                "{operation} planned: {stable_percent}% to stable [{}]{}",
                forward_of(actions),
                if *dry_run { " (dry run, not sent)" } else { "" }
            ),
            AlbStep::Wrote {
                operation,
                stable_percent,
                attempt,
            } => format!("{operation} written: {stable_percent}% to stable (attempt {attempt})"),
            AlbStep::AttemptFailed(a) => a.describe(),
            AlbStep::ReadBeforeRetry {
                operation,
                attempt,
                applied,
            } => {
                if *applied {
                    format!("before resending {operation} (attempt {attempt}): read back, the earlier attempt took; not sent again")
                } else {
                    format!("before resending {operation} (attempt {attempt}): read back, not written yet; sending again")
                }
            }
            AlbStep::ReadBack {
                stable_percent,
                snapshot,
                matches,
            } => format!(
                "read back: [{}]: {}",
                forward_of(snapshot),
                if *matches {
                    format!("{stable_percent}% to stable as written")
                } else {
                    format!("NOT the {stable_percent}% to stable written")
                }
            ),
            AlbStep::Waiting {
                interval_ms,
                next_stable_percent,
            } => format!(
                "waiting {} before shifting to {next_stable_percent}% stable",
                humantime_serde::re::humantime::format_duration(std::time::Duration::from_millis(*interval_ms))
            ),
        }
    }

    /// Whether this step changed the listener or rule.
    pub fn applied(&self) -> bool {
        matches!(
            self,
            AlbStep::Wrote { .. } | AlbStep::ReadBeforeRetry { applied: true, .. }
        )
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
