//! What a revert reports: the state of each object (before, after, would-be), each step's
//! result, and the typed step records sent to the caller while it runs, each rendering itself
//! in Kubernetes terms (ready pods, selectors before and after, replicas) for the timeline and
//! the Slack thread.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use super::{FieldChange, KubeStep};
use crate::action::retry::Attempt;
use crate::action::steps::Step;

// ---------------------------------------------------------------------------------------------
// Reports
// ---------------------------------------------------------------------------------------------

/// The parts of an object a revert changes, enough for a person to restore it by hand.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ObjectState {
    /// A Service's selector (`kubectl patch service NAME -p` restores it).
    Service {
        /// Service name.
        name: String,
        /// resourceVersion as read.
        resource_version: String,
        /// The whole selector.
        selector: BTreeMap<String, String>,
    },
    /// A Deployment's pod template, summarised.
    Deployment {
        /// Deployment name.
        name: String,
        /// resourceVersion as read.
        resource_version: String,
        /// metadata.generation.
        generation: Option<i64>,
        /// `deployment.kubernetes.io/revision` of the Deployment.
        revision: Option<String>,
        /// The owned ReplicaSet whose template equals this one (`None`: not created yet).
        replica_set: Option<String>,
        /// Container name to image (init containers as `init:NAME`).
        images: BTreeMap<String, String>,
        /// Pod template labels without `pod-template-hash`.
        template_labels: BTreeMap<String, String>,
    },
    /// A Deployment's scale subresource.
    Scale {
        /// Deployment name.
        deployment: String,
        /// resourceVersion as read (the Deployment's).
        resource_version: String,
        /// spec.replicas.
        replicas: i32,
    },
}

impl ObjectState {
    /// resourceVersion of the object as read.
    pub fn resource_version(&self) -> &str {
        match self {
            ObjectState::Service { resource_version, .. }
            | ObjectState::Deployment { resource_version, .. }
            | ObjectState::Scale { resource_version, .. } => resource_version,
        }
    }
}

/// What happened to one step.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum StepResult {
    /// Written and confirmed by reading back.
    Changed {
        /// State before the write.
        before: ObjectState,
        /// State read back after the write.
        after: ObjectState,
    },
    /// Nothing to do; nothing written.
    AlreadyDone {
        /// State as read.
        state: ObjectState,
        /// Why nothing needed writing.
        reason: String,
        /// Who last changed the field, when managedFields say (us, after a takeover, or a person).
        #[serde(skip_serializing_if = "Option::is_none")]
        by: Option<FieldChange>,
    },
    /// Dry run: the server validated the patch (dryRun=All) and persisted nothing.
    DryRun {
        /// State as read.
        before: ObjectState,
        /// The object as the server says it would be after the patch.
        would_write: ObjectState,
    },
    /// A check step passed; the next step ran.
    Checked {
        /// The check, described.
        check: String,
        /// Requests made.
        probes: u32,
        /// How long it took.
        waited_ms: u64,
        /// The last answer.
        last: String,
    },
    /// Dry run: a check step is described, not run (the steps before it were not written).
    CheckNotRun {
        /// The check, described.
        check: String,
    },
}

/// How a check step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckVerdict {
    /// Passed: the next step runs.
    Passed,
    /// Not passed within its timeout: no later step runs.
    Failed,
    /// Dry run: not run.
    NotRun,
}

/// One step's outcome, in target order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepOutcome {
    /// Position in `KubernetesTarget::steps`.
    pub index: usize,
    /// The step as configured.
    pub step: KubeStep,
    /// What happened.
    #[serde(flatten)]
    pub result: StepResult,
}

/// How a revert ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KubeOutcome {
    /// At least one step was written (false for no-ops and dry runs).
    pub changed: bool,
    /// Nothing was persisted.
    pub dry_run: bool,
    /// Every step, in order.
    pub steps: Vec<StepOutcome>,
    /// What the GitOps suspend did before the first write (action::gitops).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gitops: Option<crate::action::gitops::GitOpsStep>,
}

impl KubeOutcome {
    /// Found already reverted (nothing written, not a dry run): who had done it, from the
    /// managedFields of what each step would have written. Only changes made at or after
    /// `opened_at` (when the incident opened, if known) say who reverted it: an older one
    /// (last month's `helm` upgrade of a step that was already stable) says nothing. `None`
    /// when something was written or nobody is recorded since.
    pub fn found_reverted_by(
        &self,
        our_manager: &str,
        opened_at: Option<DateTime<Utc>>,
    ) -> Option<crate::action::RevertedBy> {
        if self.changed || self.dry_run {
            return None;
        }
        let by: Vec<(&KubeStep, &FieldChange)> = self
            .steps
            .iter()
            .filter_map(|s| match &s.result {
                StepResult::AlreadyDone { by: Some(b), .. } => Some((&s.step, b)),
                _ => None,
            })
            .filter(|(_, b)| opened_at.is_none_or(|at| b.since(at)))
            .collect();
        if by.is_empty() {
            return None;
        }
        let others: Vec<String> = by
            .iter()
            .filter(|(_, b)| b.manager != our_manager)
            .map(|(step, b)| format!("{} {}", step.object(), b.describe()))
            .collect();
        Some(if others.is_empty() {
            crate::action::RevertedBy::Us
        } else {
            crate::action::RevertedBy::Others { who: others.join("; ") }
        })
    }
}

/// A notable step of a revert or verification, for the incident's audit trail.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum KubeStepRecord {
    /// An object as read (before any change, or again after a conflict).
    Read {
        /// Step position.
        index: usize,
        /// What was read.
        state: ObjectState,
    },
    /// The object already is as wanted: nothing is written for this step.
    AlreadyDone {
        /// Step position.
        index: usize,
        /// What was read.
        state: ObjectState,
        /// Why nothing needs writing.
        reason: String,
        /// Who last changed the field, when managedFields say.
        #[serde(skip_serializing_if = "Option::is_none")]
        by: Option<FieldChange>,
    },
    /// Readiness of what is about to take the traffic.
    PreCheck {
        /// Step position.
        index: usize,
        /// `service/NAME` (pods behind the new selector) or `replicaset/NAME`.
        object: String,
        /// Label selector used, or the revision restored.
        selector: String,
        /// Pods (or ReplicaSet replicas) found.
        matching: u32,
        /// Of those, Ready.
        ready: u32,
        /// `min_ready_replicas`.
        required: u32,
        /// Whether the revert may proceed.
        passed: bool,
        /// Why a check passed without meeting `required`, if it did.
        note: Option<String>,
    },
    /// The patch about to be sent (or validated only, in a dry run).
    Planned {
        /// Step position.
        index: usize,
        /// `service/NAME`, `deployment/NAME` or `deployment/NAME/scale`.
        object: String,
        /// Whether this is a dry run.
        dry_run: bool,
        /// `application/json-patch+json` or `application/merge-patch+json`.
        content_type: String,
        /// The exact patch body.
        patch: Value,
        /// The state the patch produces.
        would_write: ObjectState,
    },
    /// The API server accepted the patch (dry run: validated, nothing persisted).
    Patched {
        /// Step position.
        index: usize,
        /// Object written.
        object: String,
        /// 1-based attempt (conflict retries count).
        attempt: u32,
        /// Whether this was a dry run.
        dry_run: bool,
        /// resourceVersion the server returned.
        resource_version: String,
    },
    /// The write lost a resourceVersion race (409, or 422 from a failed `test`).
    ConflictRetry {
        /// Step position.
        index: usize,
        /// Object written.
        object: String,
        /// 1-based attempt that failed.
        attempt: u32,
        /// Short error code.
        code: String,
        /// Server message.
        message: String,
        /// Whether the step is re-read and tried again.
        will_retry: bool,
    },
    /// An API call failed (`call` is e.g. `get services/portal-api-prod in portal`); retryable
    /// errors are sent again within the retry window.
    AttemptFailed(Attempt),
    /// The object read back after the write.
    ReadBack {
        /// Step position.
        index: usize,
        /// What was read.
        state: ObjectState,
        /// Whether it is in the wanted state.
        matches: bool,
    },
    /// Verify: ready endpoints of a Service that belong to pods of the new selector.
    Endpoints {
        /// Service name.
        service: String,
        /// The new selector.
        selector: String,
        /// Pods matching the selector.
        matching_pods: u32,
        /// Ready endpoints backed by those pods.
        ready_endpoints: u32,
        /// Whether the check passed.
        passed: bool,
    },
    /// Verify: a Deployment's rollout progress (recorded when it changes).
    Rollout {
        /// Deployment name.
        deployment: String,
        /// Progress as read.
        progress: RolloutProgress,
    },
    /// The GitOps owner's sync suspended (or not) before the first write (action::gitops).
    Gitops(crate::action::gitops::GitOpsStep),
    /// One request of a check step, recorded when its answer differs from the one before.
    CheckProbe {
        /// Step position.
        index: usize,
        /// The check, described.
        check: String,
        /// 1-based request number.
        probe: u32,
        /// `HTTP 503`, `no answer within 2s`, `request failed: ...`.
        answer: String,
        /// Whether the answer is accepted.
        ok: bool,
        /// Accepted answers in a row so far.
        in_a_row: u32,
        /// Accepted answers in a row needed.
        required: u32,
    },
    /// How a check step ended.
    Checked {
        /// Step position.
        index: usize,
        /// The check, described.
        check: String,
        /// Passed, failed or (dry run) not run.
        verdict: CheckVerdict,
        /// Requests made.
        probes: u32,
        /// How long it waited.
        waited_ms: u64,
        /// The last answer.
        last: Option<String>,
    },
}

/// A Deployment's rollout progress, judged as `kubectl rollout status` does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RolloutProgress {
    /// metadata.generation.
    pub generation: i64,
    /// status.observedGeneration.
    pub observed_generation: i64,
    /// spec.replicas (default 1).
    pub desired: i32,
    /// status.replicas (old and new pods).
    pub replicas: i32,
    /// status.updatedReplicas.
    pub updated: i32,
    /// status.availableReplicas.
    pub available: i32,
    /// Progressing condition says ProgressDeadlineExceeded.
    pub deadline_exceeded: bool,
    /// Rollout finished.
    pub complete: bool,
    /// One line, as kubectl would print it.
    pub message: String,
}

impl From<KubeStepRecord> for Step {
    fn from(s: KubeStepRecord) -> Step {
        Step {
            summary: s.describe(),
            applied: s.applied(),
            notable: match &s {
                KubeStepRecord::Patched { dry_run, .. } => !dry_run,
                KubeStepRecord::AttemptFailed(a) => a.is_notable(),
                KubeStepRecord::Gitops(g) => g.is_notable(),
                KubeStepRecord::Checked { verdict, .. } => *verdict != CheckVerdict::NotRun,
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
            KubeStepRecord::AlreadyDone { reason, by, .. } => match by {
                Some(by) if !reason.contains(&by.describe()) => {
                    format!("already done, nothing written: {reason} (last changed {})", by.describe())
                }
                _ => format!("already done, nothing written: {reason}"),
            },
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
                        if *passed { "passed" } else { "FAILED, not switched" }
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
            KubeStepRecord::Gitops(g) => g.describe(),
            KubeStepRecord::CheckProbe {
                index,
                probe,
                answer,
                ok,
                in_a_row,
                required,
                ..
            } => format!(
                "check steps[{index}] probe {probe}: {answer}: {}",
                if *ok {
                    format!("accepted, {in_a_row} of {required} in a row")
                } else {
                    format!("not accepted, {required} in a row needed")
                }
            ),
            KubeStepRecord::Checked {
                index,
                check,
                verdict,
                probes,
                waited_ms,
                last,
            } => {
                let secs = Duration::from_millis(*waited_ms).as_secs_f64();
                let last = last.as_deref().unwrap_or("none");
                match verdict {
                    CheckVerdict::Passed => format!(
                        "check steps[{index}] passed, the next step runs: {check} ({probes} probe(s) in {secs:.1}s, last {last})"
                    ),
                    CheckVerdict::Failed => format!(
                        "check steps[{index}] FAILED, the steps after it are not run: {check} (not passed after {probes} \
                         probe(s) in {secs:.1}s, last {last})"
                    ),
                    CheckVerdict::NotRun => format!(
                        "dry run: check steps[{index}] not run (the steps before it were not written): would {check}"
                    ),
                }
            }
        }
    }

    /// Whether this step changed the cluster for the rollback: a patch of a step that was
    /// stored, or the GitOps suspend that took (now, or by an interrupted earlier attempt of
    /// this incident, found off by us on a takeover). The suspend moves no traffic, but it is
    /// this incident's change and stays until a person resumes it: a revert that fails after
    /// it is a partial rollback that says so, never "nothing was changed".
    pub fn applied(&self) -> bool {
        use crate::action::gitops::GitOpsStep;
        matches!(
            self,
            KubeStepRecord::Patched { dry_run: false, .. }
                | KubeStepRecord::Gitops(GitOpsStep::Suspended { .. } | GitOpsStep::AlreadyOff { by_us: true, .. })
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_target_found_reverted_names_who_did_it_and_only_our_manager_is_us() {
        let t = |s: &str| Some(DateTime::parse_from_rfc3339(s).expect("time").with_timezone(&Utc));
        let done_at = |manager: &str, time: Option<DateTime<Utc>>| StepOutcome {
            index: 0,
            step: KubeStep::SwitchService {
                service: "web".into(),
                selector: sel(&[("app", "web")]),
            },
            result: StepResult::AlreadyDone {
                state: ObjectState::Service {
                    name: "web".into(),
                    resource_version: "3".into(),
                    selector: sel(&[("app", "web")]),
                },
                reason: "service web already selects app=web".into(),
                by: Some(FieldChange {
                    manager: manager.into(),
                    operation: "Update".into(),
                    time,
                    shared_time: false,
                }),
            },
        };
        let done = |manager: &str| done_at(manager, None);
        let outcome = |steps| KubeOutcome {
            changed: false,
            dry_run: false,
            steps,
            gitops: None,
        };
        assert_eq!(
            outcome(vec![done("rollback-responder")]).found_reverted_by("rollback-responder", None),
            Some(crate::action::RevertedBy::Us)
        );
        assert_eq!(
            outcome(vec![done("rollback-responder"), done("kubectl-patch")])
                .found_reverted_by("rollback-responder", None),
            Some(crate::action::RevertedBy::Others {
                who: "service/web by `kubectl-patch` (Update at unknown time)".into()
            })
        );
        let mut changed = outcome(vec![done("kubectl-patch")]);
        changed.changed = true;
        assert_eq!(changed.found_reverted_by("rollback-responder", None), None);
        assert_eq!(outcome(vec![]).found_reverted_by("rollback-responder", None), None);

        // With the incident's opening time: a months-old `helm` change of a step that was
        // already stable says nothing; our own takeover write since the opening is Us.
        let opened = t("2026-12-03T11:00:00.700Z");
        let old_helm = done_at("helm", t("2026-09-01T08:00:00Z"));
        let ours = done_at("rollback-responder", t("2026-12-03T11:02:00Z"));
        assert_eq!(
            outcome(vec![old_helm.clone(), ours.clone()]).found_reverted_by("rollback-responder", opened),
            Some(crate::action::RevertedBy::Us)
        );
        // Nobody changed anything since it opened: nobody is named.
        assert_eq!(
            outcome(vec![old_helm.clone()]).found_reverted_by("rollback-responder", opened),
            None
        );
        // Someone else since the opening (same second counts: managedFields keep whole seconds).
        let human = done_at("kubectl-patch", t("2026-12-03T11:00:00Z"));
        assert_eq!(
            outcome(vec![old_helm, ours, human]).found_reverted_by("rollback-responder", opened),
            Some(crate::action::RevertedBy::Others {
                who: "service/web by `kubectl-patch` (Update at 2026-12-03T11:00:00Z)".into()
            })
        );
    }
}
