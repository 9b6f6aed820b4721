//! A Kubernetes rollback target as written in a policy file: a namespace and the ordered
//! kubectl-equivalent steps (switch a Service's selector, undo a Deployment's rollout, scale a
//! Deployment) and the checks between them (`kube_check`). Plain data and its validation;
//! `action::kubernetes` carries it out.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use super::kube_check::{ExpectStatus, HttpCheck, KubeCheck};

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
    /// The Argo CD Application or Flux object to suspend before the first write (action::gitops).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gitops: Option<super::gitops::GitOps>,
}

/// Selector keys that name an application (the Kubernetes recommended labels and the common
/// conventions).
pub const APP_KEYS: &[&str] = &[
    "app",
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "k8s-app",
    "name",
    "component",
    "app.kubernetes.io/component",
];

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
    /// Verify before the next step runs (seed 000's `curl -f` between the switch and the
    /// scale-down); writes nothing. A failure stops the steps after it.
    Check(KubeCheck),
}

impl KubeStep {
    /// The object the step writes: `service/NAME` or `deployment/NAME` (a check: what it
    /// checks).
    pub fn object(&self) -> String {
        match self {
            KubeStep::SwitchService { service, .. } => format!("service/{service}"),
            KubeStep::RolloutUndo { deployment, .. } | KubeStep::Scale { deployment, .. } => {
                format!("deployment/{deployment}")
            }
            KubeStep::Check(c) => format!("check {}", c.describe()),
        }
    }
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
        if let Some(g) = &self.gitops {
            g.owner()?;
        }
        if self.steps.iter().all(|s| matches!(s, KubeStep::Check(_))) {
            return Err(
                "target.kubernetes.steps: a check writes nothing, so checks alone revert nothing; add the step(s) it \
                 guards (switch_service, rollout_undo or scale)"
                    .into(),
            );
        }
        for (i, s) in self.steps.iter().enumerate() {
            match s {
                KubeStep::Check(c) => c.validate(&format!("target.kubernetes.steps[{i}]"))?,
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
        let waits = self
            .steps
            .iter()
            .filter_map(|s| match s {
                KubeStep::Check(c) => Some(c.timeout()),
                _ => None,
            })
            .try_fold(Duration::ZERO, Duration::checked_add);
        if waits.is_none_or(|w| w > super::kube_check::MAX_CHECKS_TOTAL) {
            return Err(format!(
                "target.kubernetes.steps: the checks' timeouts add up to more than {}; shorten them",
                humantime::format_duration(super::kube_check::MAX_CHECKS_TOTAL)
            ));
        }
        Ok(())
    }

    /// Findings that do not refuse the target (`policy check` prints them), one line each.
    /// A `switch_service` selector replaces the Service's whole selector, so one without a key
    /// that names the app (seed 000's patch `{version: v1.0.0-rc.0}` copied as is drops `app`)
    /// would send the traffic to every pod of any app carrying that version.
    pub fn warnings(&self) -> Vec<String> {
        self.steps
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                KubeStep::SwitchService { service, selector }
                    if !selector.keys().any(|k| APP_KEYS.contains(&k.as_str())) =>
                {
                    let keys: Vec<&str> = selector.keys().map(String::as_str).collect();
                    Some(format!(
                        "warning: target.kubernetes.steps[{i}].switch_service.selector has only {} and no key naming \
                         the app ({}): it replaces service/{service}'s whole selector, so keys it leaves out (such as \
                         app) are dropped and pods of other apps with these labels get the traffic; list every key the \
                         Service selects, e.g. {{app: NAME, version: ...}} (at run time the pre-check refuses pods that \
                         neither the current selector nor the stable Deployment owns)",
                        keys.join(", "),
                        APP_KEYS.join(", ")
                    ))
                }
                _ => None,
            })
            .collect()
    }

    /// Identity of what a revert changes: the namespace and every object it touches.
    pub fn key(&self) -> String {
        // A check changes nothing: not part of the identity.
        let objects: Vec<String> = self
            .steps
            .iter()
            .filter_map(|s| match s {
                KubeStep::SwitchService { service, .. } => Some(format!("svc/{service}")),
                KubeStep::RolloutUndo { deployment, .. } | KubeStep::Scale { deployment, .. } => {
                    Some(format!("deploy/{deployment}"))
                }
                KubeStep::Check(_) => None,
            })
            .collect();
        format!("k8s:{}/{}", self.namespace, objects.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn switch(pairs: &[(&str, &str)]) -> KubernetesTarget {
        KubernetesTarget {
            namespace: "portal".into(),
            steps: vec![KubeStep::SwitchService {
                service: "portal-api-prod".into(),
                selector: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            }],
            min_ready_replicas: 1,
            rollout_timeout: Duration::from_secs(60),
            gitops: None,
        }
    }

    #[test]
    fn a_selector_without_the_app_key_is_warned_about() {
        let w = switch(&[("version", "v1.0.0-rc.0")]).warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with(
                "warning: target.kubernetes.steps[0].switch_service.selector has only version and no key naming the app"
            ),
            "{}",
            w[0]
        );
        assert!(w[0].contains("service/portal-api-prod's whole selector"), "{}", w[0]);
        assert!(switch(&[("app", "portal-api"), ("version", "v1.0.0-rc.0")])
            .warnings()
            .is_empty());
        assert!(switch(&[("app.kubernetes.io/name", "portal-api"), ("version", "v1")])
            .warnings()
            .is_empty());
    }

    #[test]
    fn undo_names_one_known_good_release_at_most() {
        let mut t = switch(&[("app", "a")]);
        t.steps = vec![KubeStep::RolloutUndo {
            deployment: "web".into(),
            to_revision: Some(2),
            to_image: Some("web:1".into()),
        }];
        assert_eq!(
            t.validate().unwrap_err(),
            "target.kubernetes.steps[0].rollout_undo: name the known-good to_revision or to_image, not both"
        );
        t.steps = vec![KubeStep::RolloutUndo {
            deployment: "web".into(),
            to_revision: None,
            to_image: Some(" ".into()),
        }];
        assert!(t
            .validate()
            .unwrap_err()
            .contains("to_image: give the known-good image"));
    }
}
