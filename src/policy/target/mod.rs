//! What a policy reverts, as plain data: the schema of each executor's target in the policy
//! file, with the checks serde cannot make. The executors in `action/` read these; nothing
//! here does I/O.

pub mod alb;
pub mod gitops;
pub mod kube_check;
pub mod kubernetes;

use serde::{Deserialize, Serialize};

use alb::AlbTarget;
use kubernetes::{KubeStep, KubernetesTarget};

/// What a policy reverts.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// An AWS ALB listener (or rule): weighted forward back to the stable target group.
    Alb(AlbTarget),
    /// Kubernetes: Service selector, rollout undo, scale, and checks between them, in order.
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
            Target::Alb(t) if t.scope == alb::Scope::Listener => format!(
                "forward 100 % of every forward on listener {} that sends traffic to a canary group to stable target \
                 group {} (others weight 0)",
                t.listener_arn, t.stable_target_group_arn
            ),
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
                            to_image,
                        } => match (to_revision, to_image) {
                            (Some(r), _) => {
                                format!("rollout undo deployment/{deployment} to revision {r}")
                            }
                            (None, Some(image)) => format!("rollout undo deployment/{deployment} to image {image}"),
                            (None, None) => format!("rollout undo deployment/{deployment}"),
                        },
                        KubeStep::Scale { deployment, replicas } => {
                            format!("scale deployment/{deployment} to {replicas}")
                        }
                        KubeStep::Check(c) => format!("check that {}", c.describe()),
                    })
                    .collect();
                let suspend = match t.gitops.as_ref().map(gitops::GitOps::owner) {
                    Some(Ok(owner)) => format!("suspend the sync of {}, then ", owner.describe()),
                    _ => String::new(),
                };
                format!("in namespace {}: {suspend}{}", t.namespace, steps.join(", then "))
            }
        }
    }
}
