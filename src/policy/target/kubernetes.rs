//! A Kubernetes rollback target as written in a policy file: a namespace and the ordered
//! kubectl-equivalent steps (switch a Service's selector, undo a Deployment's rollout, scale a
//! Deployment). Plain data and its validation; `action::kubernetes` carries it out.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A namespace and the ordered steps to revert in it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesTarget {
    pub namespace: String,
    pub steps: Vec<KubeStep>,
    /// Pre-check: ready replicas the Service's new selector (or the previous ReplicaSet) must have.
    #[serde(default = "one")]
    pub min_ready_replicas: u32,
    /// How long an undone Deployment may take to complete its rollout.
    #[serde(default = "five_minutes", with = "humantime_serde")]
    pub rollout_timeout: Duration,
}

fn one() -> u32 {
    1
}

fn five_minutes() -> Duration {
    Duration::from_secs(300)
}

/// One kubectl-equivalent step.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum KubeStep {
    /// `kubectl patch service NAME` with the selector replaced, not merged.
    SwitchService {
        service: String,
        selector: BTreeMap<String, String>,
    },
    /// `kubectl rollout undo deployment/NAME [--to-revision=N]`. Without `to_revision` or
    /// `to_image`, the bad release is the revision that was current when the incident opened,
    /// and the one before it is restored; if someone already rolled back since, nothing is
    /// written. `to_revision` names the known-good revision (also found under its old number
    /// after an undo renumbered it); `to_image` the known-good image of one of its containers.
    RolloutUndo {
        deployment: String,
        #[serde(default)]
        to_revision: Option<u64>,
        #[serde(default)]
        to_image: Option<String>,
    },
    /// `kubectl scale deployment NAME --replicas=N`.
    Scale { deployment: String, replicas: u32 },
}

impl KubernetesTarget {
    /// Checks what serde cannot; the message names the field and the fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.namespace.is_empty() {
            return Err("target.kubernetes.namespace: name the namespace the objects live in".into());
        }
        if self.steps.is_empty() {
            return Err(
                "target.kubernetes.steps: list at least one step (switch_service, rollout_undo or scale)".into(),
            );
        }
        for (i, s) in self.steps.iter().enumerate() {
            match s {
                KubeStep::SwitchService { selector, .. } if selector.is_empty() => {
                    return Err(format!(
                        "target.kubernetes.steps[{i}].switch_service.selector: give the previous version's labels, e.g. {{version: v1.0.0-rc.0}}"
                    ));
                }
                KubeStep::RolloutUndo {
                    to_revision: Some(_),
                    to_image: Some(_),
                    ..
                } => {
                    return Err(format!(
                        "target.kubernetes.steps[{i}].rollout_undo: name the known-good to_revision or to_image, not both"
                    ));
                }
                KubeStep::RolloutUndo {
                    to_image: Some(image), ..
                } if image.trim().is_empty() => {
                    return Err(format!(
                        "target.kubernetes.steps[{i}].rollout_undo.to_image: give the known-good image, e.g. registry/portal-api:v1.0.0-rc.0"
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Identity of what a revert changes: the namespace and every object it touches.
    pub fn key(&self) -> String {
        let objects: Vec<String> = self
            .steps
            .iter()
            .map(|s| match s {
                KubeStep::SwitchService { service, .. } => format!("svc/{service}"),
                KubeStep::RolloutUndo { deployment, .. } | KubeStep::Scale { deployment, .. } => {
                    format!("deploy/{deployment}")
                }
            })
            .collect();
        format!("k8s:{}/{}", self.namespace, objects.join(","))
    }
}
