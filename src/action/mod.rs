//! Carrying out a rollback: one folder per executor (`alb/`, `kubernetes/`, each split into
//! its pure plan, its API calls, typed step records and error classification), dispatched on
//! the [`Target`] enum, whose schema is plain data in `policy::target`.
//!
//! The responder hands an incident's target here once the incident is claimed for execution
//! (decision "auto", an approval, or an expiry that says roll back). The report that comes back
//! (before and after state, every step) goes into the incident's audit trail; verification
//! comes next. Both executors share one retry policy and one retryable-or-permanent
//! classification (`retry.rs`). An executor that is not configured (no AWS or Kubernetes
//! settings) can only record what would be done: start-up and reloads refuse such a policy
//! outside dry run (`app::preflight`), so the embedded default (dry run) acts on nothing.

pub mod alb;
pub mod gitops;
pub mod kubernetes;
pub mod retry;
pub mod steps;

use serde::Serialize;

pub use crate::policy::target::{ActionKind, Target};
pub use alb::AlbTarget;
pub use kubernetes::{KubeStep, KubernetesTarget};
pub use steps::Step;

/// The incident an action runs for: what marks its own writes (the GitOps suspend's
/// annotation) and pins its bad release (the revision current when it opened).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ForIncident {
    /// The incident's id (`None`: not known to the caller; the opening time then tells).
    pub id: Option<String>,
    /// When it opened.
    pub opened_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl From<chrono::DateTime<chrono::Utc>> for ForIncident {
    fn from(opened_at: chrono::DateTime<chrono::Utc>) -> Self {
        ForIncident {
            id: None,
            opened_at: Some(opened_at),
        }
    }
}

impl From<&crate::incident::Incident> for ForIncident {
    fn from(inc: &crate::incident::Incident) -> Self {
        ForIncident {
            id: Some(inc.id.0.clone()),
            opened_at: Some(inc.opened_at),
        }
    }
}

/// What an action did, for the audit trail.
#[derive(Debug, Clone, Serialize)]
pub struct ActionReport {
    /// The target was changed by this action (false for no-ops and dry runs).
    pub changed: bool,
    pub dry_run: bool,
    /// One line for people.
    pub summary: String,
    /// Before/after state or what would be written.
    pub detail: serde_json::Value,
    /// Found already reverted (nothing written): who had done it, when the executor can tell.
    pub found_reverted_by: Option<RevertedBy>,
}

/// Who had reverted a target this action found already reverted (Kubernetes: the managedFields
/// manager of the fields a step would have written).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum RevertedBy {
    /// Our own field manager: an earlier attempt of ours wrote it.
    Us,
    /// Somebody else (`by `kubectl-patch` (Update at ...)` per object).
    Others { who: String },
}

/// A step an interrupted earlier attempt at the same action recorded (the executor's record as
/// JSON) and how long before this attempt began: a takeover resumes from it (ALB: the wait before
/// the next gradual step counts from the last step written).
#[derive(Debug, Clone, PartialEq)]
pub struct EarlierStep {
    /// Time since the step was recorded.
    pub ago: std::time::Duration,
    /// The step's record, as the audit trail holds it.
    pub detail: serde_json::Value,
}

/// Why an action failed; `detail` is the executor's structured error (AWS code and all).
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// The stable side is not healthy enough to take the traffic: the step was not written (nor
    /// any step, when found before the first write). The executor's message already says
    /// "pre-check failed".
    #[error("{message}")]
    PreCheck { message: String, detail: serde_json::Value },
    #[error("{message}")]
    Failed { message: String, detail: serde_json::Value },
    /// Failed, and whether a write took is not known (it failed without a clear answer and
    /// could not be read back since): never said as "nothing was changed".
    #[error("{message}")]
    Unconfirmed { message: String, detail: serde_json::Value },
}

impl ActionError {
    /// The structured error for the audit trail.
    pub fn detail(&self) -> &serde_json::Value {
        match self {
            ActionError::PreCheck { detail, .. }
            | ActionError::Failed { detail, .. }
            | ActionError::Unconfirmed { detail, .. } => detail,
        }
    }
}

/// Every step an executor took, in order, for the audit trail (each AWS attempt, read-backs).
pub type Steps = Vec<serde_json::Value>;

/// The configured executors; `None` means "not configured here": actions become dry runs
/// that say so.
#[derive(Clone, Default)]
pub struct Executors {
    pub alb: Option<alb::AlbExecutor>,
    pub kube: Option<kubernetes::KubeExecutor>,
}

impl Executors {
    /// Carries out (or, dry run, only describes) the revert of `target` for an incident (its
    /// id marks what it suspends; what was current when it opened is the bad release; an
    /// opening time alone identifies it too), handing every step to `on_step` as it happens,
    /// whether the action succeeds or not.
    /// `before_write` is awaited right before each write is sent (see [`retry::BeforeWrite`]).
    /// `earlier`: what an interrupted earlier attempt recorded (empty for a first attempt).
    pub async fn execute(
        &self,
        target: &Target,
        dry_run: bool,
        incident: impl Into<ForIncident>,
        on_step: &mut (dyn FnMut(Step) + Send),
        before_write: retry::BeforeWrite<'_>,
        earlier: &[EarlierStep],
    ) -> Result<ActionReport, ActionError> {
        let incident: ForIncident = incident.into();
        match (target, &self.alb, &self.kube) {
            (Target::Alb(t), Some(exec), _) => {
                let mut record = |s: alb::AlbStep| on_step(s.into());
                let resume = alb::Resume::from_earlier(earlier);
                alb::report(
                    t,
                    dry_run,
                    exec.revert_resuming(t, dry_run, &mut record, before_write, &resume)
                        .await,
                )
            }
            (Target::Kubernetes(t), _, Some(exec)) => {
                let mut record = |s: kubernetes::KubeStepRecord| on_step(s.into());
                kube_report(
                    t,
                    exec.field_manager(),
                    incident.opened_at,
                    exec.revert_for(t, dry_run, &incident, &mut record, before_write).await,
                )
            }
            _ => Ok(not_configured(target, dry_run)),
        }
    }

    /// Whether this responder can carry out `target` (its executor is configured).
    pub fn can_execute(&self, target: &Target) -> bool {
        match target {
            Target::Alb(_) => self.alb.is_some(),
            Target::Kubernetes(_) => self.kube.is_some(),
        }
    }

    /// Why policy `policy`'s target cannot be carried out here, naming the missing config
    /// section; `None` when its executor is configured.
    pub fn missing_for(&self, policy: &str, target: &Target) -> Option<String> {
        if self.can_execute(target) {
            return None;
        }
        let (what, section) = match target {
            Target::Alb(_) => ("an ALB", "aws"),
            Target::Kubernetes(_) => ("a Kubernetes", "kubernetes"),
        };
        Some(format!(
            "policy {policy:?} reverts {what} target, but this responder has no `{section}:` section: its rollbacks \
             would only be recorded; add `{section}:` to the config, or set the policy's guards.dry_run"
        ))
    }

    /// The executor's readiness check after a revert (Kubernetes: at least
    /// `min_ready_replicas` ready endpoints behind each switched Service, every undone
    /// Deployment's rollout complete, within the policy's `rollout_timeout`), with its
    /// evidence. `None` when the executor has none (the ALB's stable-group health is part of
    /// its read-back).
    pub async fn verify(&self, target: &Target) -> Option<(Result<String, ActionError>, Steps)> {
        match (target, &self.kube) {
            (Target::Kubernetes(t), Some(exec)) => {
                let mut steps: Steps = Vec::new();
                let mut record =
                    |s: kubernetes::KubeStepRecord| steps.push(serde_json::to_value(&s).unwrap_or_default());
                let result = exec.verify(t, &mut record).await.map(|()| {
                    format!(
                        "the switched Services have at least {} ready endpoint(s) and undone rollouts completed",
                        t.min_ready_replicas.max(1)
                    )
                });
                Some((result.map_err(|e| kube_error(&e)), steps))
            }
            (Target::Kubernetes(_), None) => Some((
                Err(ActionError::Failed {
                    message: NOT_CONFIGURED_HERE.replace("{kind}", "kubernetes"),
                    detail: serde_json::Value::Null,
                }),
                Vec::new(),
            )),
            (Target::Alb(_), _) => None,
        }
    }

    /// One read-back sample of the target during the bake: re-read what the revert wrote and
    /// compare (see [`ReadBack`]). `baseline` keeps the bake's first read between samples.
    /// A replica without the executor's settings cannot read: a bad sample that says so.
    pub async fn read_back(&self, target: &Target, baseline: &mut Option<ReadBackBaseline>) -> ReadBack {
        let failed = |message: String| ReadBack {
            ok: false,
            value: format!("unreadable: {message}"),
            drift: None,
            evidence: serde_json::Value::Null,
        };
        match (target, &self.alb, &self.kube) {
            (Target::Alb(t), Some(exec), _) => {
                let mut b = match baseline.take() {
                    Some(ReadBackBaseline::Alb(s)) => Some(s),
                    _ => None,
                };
                let r = exec.read_back_sample(t, &mut b).await;
                *baseline = b.map(ReadBackBaseline::Alb);
                r.unwrap_or_else(|e| failed(format!("{e} (code {})", e.code())))
            }
            (Target::Kubernetes(t), _, Some(exec)) => {
                let mut b = match baseline.take() {
                    Some(ReadBackBaseline::Kube(s)) => Some(s),
                    _ => None,
                };
                let r = exec.read_back_sample(t, &mut b).await;
                *baseline = b.map(ReadBackBaseline::Kube);
                r.unwrap_or_else(|e| failed(format!("{e} (code {})", e.code())))
            }
            _ => failed(NOT_CONFIGURED_HERE.replace("{kind}", target.kind().as_str())),
        }
    }
}

/// Why a replica cannot verify a target.
const NOT_CONFIGURED_HERE: &str =
    "no {kind} executor is configured on this replica, so it cannot read the target: verification is inconclusive";

/// One read of the target during the bake.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReadBack {
    /// As written, and (ALB) enough healthy stable targets.
    pub ok: bool,
    /// Short, for the sample list: `as written [stable=100, canary=0]`.
    pub value: String,
    /// Someone changed the target back: what changed and, when known, who. Never written
    /// over: verification fails and a human decides.
    pub drift: Option<String>,
    /// What was read.
    pub evidence: serde_json::Value,
}

/// The bake's first read, to compare the later ones with.
#[derive(Debug, Clone)]
pub enum ReadBackBaseline {
    Alb(Vec<alb::ForwardSnapshot>),
    Kube(kubernetes::KubeBaseline),
}

fn kube_error(e: &kubernetes::KubeError) -> ActionError {
    let detail = serde_json::to_value(e).unwrap_or_default();
    let message = format!("{e} (code {})", e.code());
    if e.is_precheck() {
        ActionError::PreCheck { message, detail }
    } else if e.outcome_unknown() {
        ActionError::Unconfirmed { message, detail }
    } else {
        ActionError::Failed { message, detail }
    }
}

fn kube_report(
    t: &KubernetesTarget,
    our_manager: &str,
    opened_at: Option<chrono::DateTime<chrono::Utc>>,
    result: Result<kubernetes::KubeOutcome, kubernetes::KubeError>,
) -> Result<ActionReport, ActionError> {
    let outcome = result.map_err(|e| kube_error(&e))?;
    let found_reverted_by = outcome.found_reverted_by(our_manager, opened_at);
    let steps: Vec<String> = outcome
        .steps
        .iter()
        .map(|s| {
            let what = match (&s.result, serde_json::to_value(&s.result).ok()) {
                (kubernetes::StepResult::AlreadyDone { by: Some(by), .. }, _) => {
                    format!("already done, {}", by.describe())
                }
                (_, Some(v)) => v["result"].as_str().unwrap_or("done").replace('_', " "),
                (_, None) => "done".into(),
            };
            format!(
                "{}: {what}",
                Target::Kubernetes(KubernetesTarget {
                    steps: vec![s.step.clone()],
                    ..t.clone()
                })
                .describe()
            )
        })
        .collect();
    let mut summary = if outcome.dry_run {
        format!("dry run, nothing written (server-side dry run): {}", steps.join("; "))
    } else if outcome.changed {
        format!("reverted: {}", steps.join("; "))
    } else if matches!(outcome.gitops, Some(gitops::GitOpsStep::Suspended { .. })) {
        // The suspend below was written: only the Kubernetes objects were found reverted.
        format!("already reverted, no Kubernetes object written: {}", steps.join("; "))
    } else {
        format!("already reverted, nothing written: {}", steps.join("; "))
    };
    // How to resume Argo CD / Flux belongs in the result people read last, too.
    if let Some(g) = &outcome.gitops {
        summary.push_str(&format!(". {}", g.describe()));
    }
    Ok(ActionReport {
        changed: outcome.changed,
        dry_run: outcome.dry_run,
        summary,
        detail: serde_json::to_value(&outcome).unwrap_or_default(),
        found_reverted_by,
    })
}

fn not_configured(target: &Target, dry_run: bool) -> ActionReport {
    let why = if dry_run {
        "dry run".to_string()
    } else {
        format!("no {} executor is configured on this responder", target.kind().as_str())
    };
    ActionReport {
        changed: false,
        dry_run: true,
        summary: format!("not executed ({why}): would {}", target.describe()),
        detail: serde_json::json!({ "executed": false, "why": why, "would": target }),
        found_reverted_by: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kubernetes_target_with_gitops_says_it_suspends_first() {
        let t: Target = serde_json::from_value(serde_json::json!({"kubernetes": {
            "namespace": "portal",
            "gitops": {"flux": {"kind": "HelmRelease", "name": "portal-api", "namespace": "portal"}},
            "steps": [{"rollout_undo": {"deployment": "portal-api"}}]
        }}))
        .expect("target");
        assert_eq!(t.validate(), Ok(()));
        // What a dry run without an executor records.
        assert_eq!(
            not_configured(&t, true).summary,
            "not executed (dry run): would in namespace portal: suspend the sync of Flux HelmRelease \
             portal/portal-api, then rollout undo deployment/portal-api"
        );
    }

    #[test]
    fn a_missing_executor_names_the_policy_and_the_section() {
        let t: Target = serde_json::from_value(serde_json::json!({"kubernetes": {
            "namespace": "portal", "steps": [{"scale": {"deployment": "web", "replicas": 0}}]
        }}))
        .expect("target");
        let none = Executors::default();
        assert_eq!(
            none.missing_for("portal-api", &t).as_deref(),
            Some(
                "policy \"portal-api\" reverts a Kubernetes target, but this responder has no `kubernetes:` section: \
                 its rollbacks would only be recorded; add `kubernetes:` to the config, or set the policy's guards.dry_run"
            )
        );
        assert!(!none.can_execute(&t));
    }
}
