//! Each executor's step records, rendered for people in the executor's own terms.
//!
//! The executors report every notable step through a callback while they run (`alb::AlbStep`,
//! `kubernetes::KubeStepRecord`); [`crate::action::Executors::execute`] turns each into a
//! [`Step`]: one line for the incident's timeline and Slack thread, the typed record as JSON
//! for the audit trail, and whether the step changed the target. An ALB step speaks of
//! healthy targets and weights, a Kubernetes step of ready pods, selectors and replicas.

use std::collections::BTreeMap;

use super::alb::AlbStep;
use super::kubernetes::{KubeStepRecord, ObjectState};

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

impl From<KubeStepRecord> for Step {
    fn from(s: KubeStepRecord) -> Step {
        Step {
            summary: s.describe(),
            applied: s.applied(),
            notable: match &s {
                KubeStepRecord::Patched { dry_run, .. } => !dry_run,
                KubeStepRecord::AttemptFailed(a) => a.is_notable(),
                _ => false,
            },
            detail: serde_json::to_value(&s).unwrap_or_default(),
        }
    }
}

fn selector_of(selector: &BTreeMap<String, String>) -> String {
    if selector.is_empty() {
        return "nothing (no selector)".into();
    }
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

impl ObjectState {
    /// The state in Kubernetes terms: a Service's selector, a Deployment's revision and
    /// images, a scale's replicas.
    pub fn describe(&self) -> String {
        match self {
            ObjectState::Service { name, selector, .. } => {
                format!("service/{name} selects {}", selector_of(selector))
            }
            ObjectState::Deployment {
                name,
                revision,
                replica_set,
                images,
                ..
            } => {
                let images: Vec<String> = images.iter().map(|(c, i)| format!("{c}={i}")).collect();
                format!(
                    "deployment/{name} at revision {} ({}), images {}",
                    revision.as_deref().unwrap_or("?"),
                    replica_set
                        .as_deref()
                        .map_or_else(|| "no replicaset yet".to_string(), |r| format!("replicaset {r}")),
                    images.join(", ")
                )
            }
            ObjectState::Scale {
                deployment, replicas, ..
            } => format!("deployment/{deployment} has {replicas} replica(s)"),
        }
    }
}

impl KubeStepRecord {
    /// One line in Kubernetes terms: ready pods, selectors before and after, replicas.
    pub fn describe(&self) -> String {
        match self {
            KubeStepRecord::Read { state, .. } => format!("read: {}", state.describe()),
            KubeStepRecord::AlreadyDone { reason, .. } => format!("already done, nothing written: {reason}"),
            KubeStepRecord::PreCheck {
                object,
                selector,
                matching,
                ready,
                required,
                passed,
                note,
                ..
            } => {
                let mut line = if object.starts_with("service/") {
                    format!(
                        "pre-check {object}: {ready} of {matching} pod(s) matching {selector} Ready, {required} required: {}",
                        if *passed { "passed" } else { "FAILED, nothing written" }
                    )
                } else {
                    format!(
                        "pre-check {object} ({selector}): {ready} of {matching} replica(s) Ready, {required} required: {}",
                        if *passed { "passed" } else { "FAILED, nothing written" }
                    )
                };
                if let Some(n) = note {
                    line.push_str(&format!(" ({n})"));
                }
                line
            }
            KubeStepRecord::Planned {
                dry_run, would_write, ..
            } => format!(
                "planned: {}{}",
                would_write.describe(),
                if *dry_run { " (dry run: validated by the server, not stored)" } else { "" }
            ),
            KubeStepRecord::Patched {
                object,
                attempt,
                dry_run,
                ..
            } => match (dry_run, attempt) {
                (true, _) => format!("{object}: patch accepted by the server as a dry run, nothing stored"),
                (false, 1) => format!("{object} patched"),
                (false, n) => format!("{object} patched on write attempt {n} (after a resourceVersion race)"),
            },
            KubeStepRecord::ConflictRetry {
                object,
                attempt,
                will_retry,
                ..
            } => format!(
                "{object}: write attempt {attempt} lost a race with another writer (resourceVersion changed): {}",
                if *will_retry { "re-reading and trying again" } else { "giving up" }
            ),
            KubeStepRecord::AttemptFailed(a) => a.describe(),
            KubeStepRecord::ReadBack { state, matches, .. } => format!(
                "read back: {}: {}",
                state.describe(),
                if *matches { "as wanted" } else { "NOT as wanted" }
            ),
            KubeStepRecord::Endpoints {
                service,
                selector,
                matching_pods,
                ready_endpoints,
                passed,
            } => format!(
                "service/{service}: {ready_endpoints} ready endpoint(s) for the {matching_pods} pod(s) matching {selector}: {}",
                if *passed { "passed" } else { "waiting" }
            ),
            KubeStepRecord::Rollout { deployment, progress } => {
                format!("rollout of deployment/{deployment}: {}", progress.message)
            }
        }
    }

    /// Whether this step changed an object (a patch that was stored).
    pub fn applied(&self) -> bool {
        matches!(self, KubeStepRecord::Patched { dry_run: false, .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::retry::Attempt;

    fn sel(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn kubernetes_steps_speak_kubernetes() {
        let pre = KubeStepRecord::PreCheck {
            index: 0,
            object: "service/portal-api-prod".into(),
            selector: "app=portal-api,version=v1.0.0-rc.0".into(),
            matching: 3,
            ready: 2,
            required: 2,
            passed: true,
            note: None,
        };
        assert_eq!(
            pre.describe(),
            "pre-check service/portal-api-prod: 2 of 3 pod(s) matching app=portal-api,version=v1.0.0-rc.0 Ready, 2 required: passed"
        );
        let back = KubeStepRecord::ReadBack {
            index: 0,
            state: ObjectState::Service {
                name: "portal-api-prod".into(),
                resource_version: "9".into(),
                selector: sel(&[("app", "portal-api"), ("version", "v1.0.0-rc.0")]),
            },
            matches: true,
        };
        assert_eq!(
            back.describe(),
            "read back: service/portal-api-prod selects app=portal-api,version=v1.0.0-rc.0: as wanted"
        );
        let scale = KubeStepRecord::Read {
            index: 1,
            state: ObjectState::Scale {
                deployment: "portal-api-canary".into(),
                resource_version: "4".into(),
                replicas: 3,
            },
        };
        assert_eq!(scale.describe(), "read: deployment/portal-api-canary has 3 replica(s)");
        for s in [pre, back, scale] {
            assert!(!s.describe().contains("null"), "{}", s.describe());
        }
    }

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
