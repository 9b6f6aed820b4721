//! Carrying out a rollback: one file per executor, dispatched on the [`Target`] enum.
//!
//! The responder hands an incident's target here once the incident is claimed for execution
//! (decision "auto", an approval, or an expiry that says roll back). The report that comes back
//! (before and after state, every step) goes into the incident's audit trail; verification
//! comes next. An executor that is not configured (no AWS or Kubernetes settings) turns the
//! action into a dry run that records exactly what would be done: the embedded default acts on
//! nothing.

pub mod alb;
pub mod kubernetes;

use serde::{Deserialize, Serialize};

pub use alb::AlbTarget;
pub use kubernetes::{KubeStep, KubernetesTarget};

/// What a policy reverts.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// An AWS ALB listener (or rule): weighted forward back to the stable target group.
    Alb(AlbTarget),
    /// Kubernetes: Service selector, rollout undo, scale, in order.
    Kubernetes(KubernetesTarget),
}

/// The executor kinds, for metrics and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    Alb,
    Kubernetes,
}

impl ActionKind {
    /// Metric label spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Alb => "alb",
            ActionKind::Kubernetes => "kubernetes",
        }
    }
}

impl Target {
    /// Checks what serde cannot; the message names the field and the fix.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Target::Alb(t) => t.validate(),
            Target::Kubernetes(t) => t.validate(),
        }
    }

    /// Identity of what a revert changes: one open incident per key, cooldowns per key.
    pub fn key(&self) -> String {
        match self {
            Target::Alb(t) => t.key(),
            Target::Kubernetes(t) => t.key(),
        }
    }

    /// Which executor handles it.
    pub fn kind(&self) -> ActionKind {
        match self {
            Target::Alb(_) => ActionKind::Alb,
            Target::Kubernetes(_) => ActionKind::Kubernetes,
        }
    }

    /// One line a person reads in the timeline and in Slack.
    pub fn describe(&self) -> String {
        match self {
            Target::Alb(t) => format!(
                "forward 100 % of {} to stable target group {} (others weight 0)",
                t.rule_arn.as_deref().unwrap_or(&t.listener_arn),
                t.stable_target_group_arn
            ),
            Target::Kubernetes(t) => {
                let steps: Vec<String> = t
                    .steps
                    .iter()
                    .map(|s| match s {
                        KubeStep::SwitchService { service, selector } => {
                            let sel: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
                            format!("switch service/{service} selector to {}", sel.join(","))
                        }
                        KubeStep::RolloutUndo {
                            deployment,
                            to_revision,
                        } => match to_revision {
                            Some(r) => {
                                format!("rollout undo deployment/{deployment} to revision {r}")
                            }
                            None => format!("rollout undo deployment/{deployment}"),
                        },
                        KubeStep::Scale { deployment, replicas } => {
                            format!("scale deployment/{deployment} to {replicas}")
                        }
                    })
                    .collect();
                format!("in namespace {}: {}", t.namespace, steps.join(", then "))
            }
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
}

/// Why an action failed.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("pre-check failed: {0}")]
    PreCheck(String),
    #[error("{0}")]
    Failed(String),
}

/// The configured executors; `None` means "not configured here": actions become dry runs.
#[derive(Clone, Default)]
pub struct Executors {}

impl Executors {
    /// Carries out (or, dry run, only describes) the revert of `target`.
    pub async fn execute(&self, target: &Target, dry_run: bool) -> Result<ActionReport, ActionError> {
        let why = if dry_run {
            "dry run".to_string()
        } else {
            format!("no {} executor is configured on this responder", target.kind().as_str())
        };
        Ok(ActionReport {
            changed: false,
            dry_run: true,
            summary: format!("not executed ({why}): would {}", target.describe()),
            detail: serde_json::json!({ "executed": false, "why": why, "would": target }),
        })
    }
}
