//! The Kubernetes read-back during the bake: re-read each step's object and compare it with
//! what the revert wrote (a Service's selector, a scaled Deployment's replicas) and with the
//! bake's first read (an undone Deployment's pod template and revision). A change back is
//! drift: reported with what changed and who (the managed-fields manager that owns the field
//! now), never written over.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DynamicObject};
use serde::Serialize;
use serde_json::{json, Value};

use super::error::Op;
use super::views::{equality_selector, field_change, template_summary, templates_equal};
use super::{KubeError, KubeExecutor, KubeStep, KubernetesTarget, REVISION_ANNOTATION};
use crate::action::ReadBack;

/// kubectl apply's record of what it last applied.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// What the bake's first read saw of each undone Deployment.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct KubeBaseline {
    /// Deployment name -> (pod template, revision annotation).
    templates: BTreeMap<String, (Value, Option<String>)>,
}

/// Who owns `path` (e.g. `["f:spec", "f:selector"]`) of an object now: the newest
/// managed-fields entry that covers it. Pure.
pub(crate) fn who_changed(meta: &ObjectMeta, path: &[&str]) -> String {
    if let Some(change) = field_change(meta, path) {
        return change.describe();
    }
    let pointer: String = path.iter().map(|p| format!("/{p}")).collect();
    if meta.annotations.as_ref().is_some_and(|a| a.contains_key(LAST_APPLIED)) {
        format!("by unknown (no managed-fields entry owns {pointer}; the object carries a `kubectl apply` last-applied-configuration)")
    } else {
        format!("by unknown (no managed-fields entry owns {pointer})")
    }
}

fn images(template: &Value) -> String {
    let (images, _) = template_summary(template);
    let list: Vec<String> = images.iter().map(|(c, i)| format!("{c}={i}")).collect();
    list.join(",")
}

impl KubeExecutor {
    /// One read-back sample of every step's object; the first drift found ends the sample.
    /// `baseline` is the bake's first read of the undone Deployments (set by the first call).
    pub async fn read_back_sample(
        &self,
        t: &KubernetesTarget,
        baseline: &mut Option<KubeBaseline>,
    ) -> Result<ReadBack, KubeError> {
        let ns = t.namespace.as_str();
        let mut ignore = |_| {};
        let mut deployments: BTreeMap<String, DynamicObject> = BTreeMap::new();
        let mut seen = Vec::new();
        let mut evidence = Vec::new();
        let mut first = baseline.clone().unwrap_or_default();
        for step in &t.steps {
            let drift = match step {
                // A check wrote nothing: nothing to read back.
                KubeStep::Check(_) => continue,
                KubeStep::SwitchService { service, selector } => {
                    let api: Api<Service> = Api::namespaced(self.client.clone(), ns);
                    let op = Op::service("get", ns, service);
                    let svc = self.call(op, &mut ignore, || api.get(service)).await?;
                    let now = svc.spec.as_ref().and_then(|s| s.selector.clone()).unwrap_or_default();
                    seen.push(format!("svc/{service} {}", equality_selector(&now)));
                    evidence.push(json!({ "service": service, "selector": now }));
                    (now != *selector).then(|| {
                        format!(
                            "service/{service} selector changed back to {} (written: {}) {}",
                            equality_selector(&now),
                            equality_selector(selector),
                            who_changed(&svc.metadata, &["f:spec", "f:selector"])
                        )
                    })
                }
                KubeStep::Scale { deployment, replicas } => {
                    let d = self.deployment(ns, deployment, &mut deployments).await?;
                    let now = d.data.pointer("/spec/replicas").and_then(Value::as_i64);
                    seen.push(format!(
                        "deploy/{deployment} replicas {}",
                        now.map_or("unset".into(), |n| n.to_string())
                    ));
                    evidence.push(json!({ "deployment": deployment, "replicas": now }));
                    (now != Some(i64::from(*replicas))).then(|| {
                        format!(
                            "deployment/{deployment} replicas changed to {} (written: {replicas}) {}",
                            now.map_or("unset".into(), |n| n.to_string()),
                            who_changed(&d.metadata, &["f:spec", "f:replicas"])
                        )
                    })
                }
                KubeStep::RolloutUndo { deployment, .. } => {
                    let d = self.deployment(ns, deployment, &mut deployments).await?;
                    let template = d.data.pointer("/spec/template").cloned().unwrap_or(Value::Null);
                    let revision = d
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(REVISION_ANNOTATION).cloned());
                    seen.push(format!(
                        "deploy/{deployment} revision {} [{}]",
                        revision.as_deref().unwrap_or("?"),
                        images(&template)
                    ));
                    evidence
                        .push(json!({ "deployment": deployment, "revision": revision, "images": images(&template) }));
                    match first.templates.get(deployment) {
                        None => {
                            first
                                .templates
                                .insert(deployment.clone(), (template.clone(), revision.clone()));
                            None
                        }
                        Some((tpl, rev)) if !templates_equal(tpl, &template) || *rev != revision => Some(format!(
                            "deployment/{deployment} is no longer the restored template: revision {} [{}] -> {} [{}] {}",
                            rev.as_deref().unwrap_or("?"),
                            images(tpl),
                            revision.as_deref().unwrap_or("?"),
                            images(&template),
                            who_changed(&d.metadata, &["f:spec", "f:template"])
                        )),
                        Some(_) => None,
                    }
                }
            };
            if let Some(what) = drift {
                return Ok(ReadBack {
                    ok: false,
                    value: format!("DRIFT {}", seen.join("; ")),
                    drift: Some(what),
                    evidence: Value::Array(evidence),
                });
            }
        }
        *baseline = Some(first);
        Ok(ReadBack {
            ok: true,
            value: format!("as written: {}", seen.join("; ")),
            drift: None,
            evidence: Value::Array(evidence),
        })
    }

    /// A Deployment, read once per sample.
    async fn deployment(
        &self,
        ns: &str,
        name: &str,
        cache: &mut BTreeMap<String, DynamicObject>,
    ) -> Result<DynamicObject, KubeError> {
        if let Some(d) = cache.get(name) {
            return Ok(d.clone());
        }
        let api = self.dynamic_api::<Deployment>(ns);
        let op = Op::deployment("get", ns, name);
        let d = self.call(op, &mut |_| {}, || api.get(name)).await?;
        cache.insert(name.to_string(), d.clone());
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_manager_of_the_field_is_named() {
        let meta: ObjectMeta = serde_json::from_value(json!({
            "name": "svc",
            "managedFields": [
                {"manager": "rollback-responder", "operation": "Update", "time": "2026-12-03T06:00:00Z",
                 "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:selector": {}}}},
                {"manager": "kubectl-edit", "operation": "Update", "time": "2026-12-03T06:00:05Z",
                 "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:selector": {}}}},
                {"manager": "kubectl-label", "operation": "Update", "time": "2026-12-03T06:00:09Z",
                 "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {}}}}
            ]
        }))
        .unwrap();
        let who = who_changed(&meta, &["f:spec", "f:selector"]);
        assert!(
            who.starts_with("by `kubectl-edit` (Update at 2026-12-03T06:00:05Z"),
            "{who}"
        );
        let none = who_changed(&ObjectMeta::default(), &["f:spec", "f:selector"]);
        assert_eq!(none, "by unknown (no managed-fields entry owns /f:spec/f:selector)");
    }
}
