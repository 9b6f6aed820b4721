//! The parts of each object a revert reads (Service, Deployment, ReplicaSet, scale), and pure
//! helpers over them: template comparison the way kubectl does it, label selectors, rollout
//! progress as `kubectl rollout status` judges it, ready pods and endpoints.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v1::Scale;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::DynamicObject;
use serde::Serialize;
use serde_json::Value;

use crate::policy::target::kubernetes::APP_KEYS;

use super::{
    KubeError, ObjectState, RolloutProgress, POD_TEMPLATE_HASH_LABEL, REVISION_ANNOTATION, REVISION_HISTORY_ANNOTATION,
};

// ---------------------------------------------------------------------------------------------
// Pure helpers: views of the objects, template comparison, plans and patch bodies
// ---------------------------------------------------------------------------------------------

/// The parts of a Service we use.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ServiceView {
    pub(super) name: String,
    pub(super) resource_version: String,
    pub(super) selector: BTreeMap<String, String>,
    /// Who last changed the selector, from managedFields (see [`field_change`]).
    pub(super) selector_change: Option<FieldChange>,
}

impl ServiceView {
    pub(super) fn from_service(svc: &Service) -> Self {
        Self {
            name: svc.metadata.name.clone().unwrap_or_default(),
            resource_version: svc.metadata.resource_version.clone().unwrap_or_default(),
            selector: svc.spec.as_ref().and_then(|s| s.selector.clone()).unwrap_or_default(),
            selector_change: field_change(&svc.metadata, SELECTOR_PATH),
        }
    }
}

/// The parts of a Deployment a rollout undo uses. Templates stay raw JSON so that fields this
/// build of k8s-openapi does not know survive the round trip (a dropped field would make the
/// restored template differ from the ReplicaSet's, and the controller would create a new one).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct DeploymentView {
    pub(super) name: String,
    pub(super) uid: String,
    pub(super) resource_version: String,
    pub(super) generation: Option<i64>,
    /// status.observedGeneration: the controller has acted on the spec up to this generation.
    pub(super) observed_generation: Option<i64>,
    pub(super) annotations: BTreeMap<String, String>,
    pub(super) paused: bool,
    pub(super) selector: String,
    pub(super) template: Value,
    /// Who last changed the pod template, from managedFields (`None`: not recorded).
    pub(super) template_change: Option<FieldChange>,
    /// That manager owns nothing but the pod template, so its time is the template's. When it
    /// owns more (helm: labels, annotations, replicas), its time may be another field's.
    pub(super) template_change_exact: bool,
}

impl DeploymentView {
    pub(super) fn parse(obj: &DynamicObject) -> Result<Self, KubeError> {
        let name = obj.metadata.name.clone().unwrap_or_default();
        let spec = obj.data.get("spec");
        let template = spec
            .and_then(|s| s.get("template"))
            .cloned()
            .ok_or_else(|| KubeError::internal(format!("deployment {name} has no spec.template")))?;
        let selector = match spec.and_then(|s| s.get("selector")) {
            Some(sel) => label_selector_string(sel).map_err(KubeError::internal)?,
            None => String::new(),
        };
        let (template_change, template_change_exact) = match last_change_exact(&obj.metadata, TEMPLATE_PATH) {
            Some((c, exact)) => (Some(c), exact),
            None => (None, false),
        };
        Ok(Self {
            uid: obj.metadata.uid.clone().unwrap_or_default(),
            resource_version: obj.metadata.resource_version.clone().unwrap_or_default(),
            generation: obj.metadata.generation,
            observed_generation: obj.data.pointer("/status/observedGeneration").and_then(Value::as_i64),
            annotations: obj.metadata.annotations.clone().unwrap_or_default(),
            paused: spec
                .and_then(|s| s.get("paused"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            selector,
            template,
            template_change,
            template_change_exact,
            name,
        })
    }
}

/// The parts of a ReplicaSet a rollout undo uses.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RsView {
    pub(super) name: String,
    /// `None` when the annotation is missing or not a number (kubectl skips those).
    pub(super) revision: Option<u64>,
    /// uid of the controller owner reference, if any.
    pub(super) controller_uid: Option<String>,
    pub(super) annotations: BTreeMap<String, String>,
    pub(super) template: Value,
    pub(super) replicas: i64,
    pub(super) ready: i64,
    /// The revisions it had before the controller renumbered it (reused by a rollback).
    pub(super) revision_history: Vec<u64>,
    /// metadata.creationTimestamp.
    pub(super) created: Option<DateTime<Utc>>,
}

impl RsView {
    pub(super) fn parse(obj: &DynamicObject) -> Self {
        let annotations = obj.metadata.annotations.clone().unwrap_or_default();
        let status = obj.data.get("status");
        let count = |field: &str| status.and_then(|s| s.get(field)).and_then(Value::as_i64).unwrap_or(0);
        Self {
            name: obj.metadata.name.clone().unwrap_or_default(),
            revision: annotations.get(REVISION_ANNOTATION).and_then(|r| r.parse().ok()),
            controller_uid: obj
                .metadata
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.controller == Some(true))
                .map(|o| o.uid.clone()),
            template: obj.data.pointer("/spec/template").cloned().unwrap_or(Value::Null),
            replicas: count("replicas"),
            ready: count("readyReplicas"),
            revision_history: annotations
                .get(REVISION_HISTORY_ANNOTATION)
                .map(|h| h.split(',').filter_map(|r| r.trim().parse().ok()).collect())
                .unwrap_or_default(),
            created: time_of(&obj.metadata.creation_timestamp),
            annotations,
        }
    }
}

/// The scale subresource's replicas.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ScaleView {
    pub(super) deployment: String,
    pub(super) resource_version: String,
    pub(super) replicas: i32,
}

impl ScaleView {
    pub(super) fn from_scale(deployment: &str, s: &Scale) -> Self {
        Self {
            deployment: deployment.to_string(),
            resource_version: s.metadata.resource_version.clone().unwrap_or_default(),
            replicas: s.spec.as_ref().and_then(|sp| sp.replicas).unwrap_or(0),
        }
    }
}

/// Everything a step needs to decide what to write.
#[derive(Debug, Clone)]
pub(super) enum Current {
    Service(ServiceView),
    Undo(DeploymentView, Vec<RsView>),
    Scale(ScaleView),
}

impl Current {
    pub(super) fn resource_version(&self) -> &str {
        match self {
            Current::Service(s) => &s.resource_version,
            Current::Undo(d, _) => &d.resource_version,
            Current::Scale(s) => &s.resource_version,
        }
    }

    pub(super) fn state(&self) -> ObjectState {
        match self {
            Current::Service(s) => ObjectState::Service {
                name: s.name.clone(),
                resource_version: s.resource_version.clone(),
                selector: s.selector.clone(),
            },
            Current::Undo(d, rses) => deployment_state(d, rses),
            Current::Scale(s) => ObjectState::Scale {
                deployment: s.deployment.clone(),
                resource_version: s.resource_version.clone(),
                replicas: s.replicas,
            },
        }
    }
}

pub(super) fn deployment_state(d: &DeploymentView, rses: &[RsView]) -> ObjectState {
    let (images, template_labels) = template_summary(&d.template);
    ObjectState::Deployment {
        name: d.name.clone(),
        resource_version: d.resource_version.clone(),
        generation: d.generation,
        revision: d.annotations.get(REVISION_ANNOTATION).cloned(),
        replica_set: owned(d, rses)
            .find(|rs| templates_equal(&rs.template, &d.template))
            .map(|rs| rs.name.clone()),
        images,
        template_labels,
    }
}

/// Images per container and labels (without `pod-template-hash`) of a pod template.
pub(super) fn template_summary(template: &Value) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut images = BTreeMap::new();
    for (list, prefix) in [("containers", ""), ("initContainers", "init:")] {
        for c in template
            .pointer(&format!("/spec/{list}"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = c.get("name").and_then(Value::as_str).unwrap_or("?");
            let image = c.get("image").and_then(Value::as_str).unwrap_or("");
            images.insert(format!("{prefix}{name}"), image.to_string());
        }
    }
    let labels = template
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter(|(k, _)| k.as_str() != POD_TEMPLATE_HASH_LABEL)
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default();
    (images, labels)
}

/// `matchLabels` / `matchExpressions` as a label selector query string, like
/// `metav1.LabelSelectorAsSelector(..).String()`.
pub(super) fn label_selector_string(sel: &Value) -> Result<String, String> {
    let mut parts = Vec::new();
    if let Some(labels) = sel.get("matchLabels").and_then(Value::as_object) {
        for (k, v) in labels {
            parts.push(format!("{k}={}", v.as_str().unwrap_or_default()));
        }
    }
    for e in sel
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = e.get("key").and_then(Value::as_str).unwrap_or_default();
        let values: Vec<&str> = e
            .get("values")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        match e.get("operator").and_then(Value::as_str).unwrap_or_default() {
            "In" => parts.push(format!("{key} in ({})", values.join(","))),
            "NotIn" => parts.push(format!("{key} notin ({})", values.join(","))),
            "Exists" => parts.push(key.to_string()),
            "DoesNotExist" => parts.push(format!("!{key}")),
            other => return Err(format!("unsupported label selector operator {other:?} for key {key}")),
        }
    }
    Ok(parts.join(","))
}

/// An equality selector (`a=b,c=d`) from a Service-style map.
pub(super) fn equality_selector(sel: &BTreeMap<String, String>) -> String {
    sel.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The template without the `pod-template-hash` label (what kubectl writes back).
pub(super) fn strip_hash(template: &Value) -> Value {
    let mut t = template.clone();
    if let Some(labels) = t.pointer_mut("/metadata/labels").and_then(Value::as_object_mut) {
        labels.remove(POD_TEMPLATE_HASH_LABEL);
    }
    t
}

/// Drops nulls and empty maps/lists recursively: the API machinery's semantic equality treats
/// nil and empty alike, and clients differ in which they send.
pub(super) fn normalize(v: &Value) -> Option<Value> {
    match v {
        Value::Null => None,
        Value::Object(m) => {
            let out: serde_json::Map<String, Value> = m
                .iter()
                .filter_map(|(k, v)| normalize(v).map(|v| (k.clone(), v)))
                .collect();
            (!out.is_empty()).then_some(Value::Object(out))
        }
        Value::Array(a) => {
            let out: Vec<Value> = a.iter().map(|v| normalize(v).unwrap_or(Value::Null)).collect();
            (!out.is_empty()).then_some(Value::Array(out))
        }
        other => Some(other.clone()),
    }
}

/// kubectl's `EqualIgnoreHash`: same pod template apart from the `pod-template-hash` label.
pub(super) fn templates_equal(a: &Value, b: &Value) -> bool {
    normalize(&strip_hash(a)) == normalize(&strip_hash(b))
}

/// ReplicaSets whose controller is this Deployment (the label selector alone can match
/// ReplicaSets of another Deployment or orphans).
pub(super) fn owned<'a>(d: &'a DeploymentView, rses: &'a [RsView]) -> impl Iterator<Item = &'a RsView> + 'a {
    rses.iter()
        .filter(move |rs| !d.uid.is_empty() && rs.controller_uid.as_deref() == Some(d.uid.as_str()))
}

/// Progress of a Deployment's rollout, with `kubectl rollout status`'s rules: the controller
/// has seen the latest spec, every replica is updated, no old replica is left, every updated
/// one is available; ProgressDeadlineExceeded is a failure.
pub fn rollout_progress(d: &Deployment) -> RolloutProgress {
    let generation = d.metadata.generation.unwrap_or(0);
    let desired = d.spec.replicas.unwrap_or(1);
    let status = d.status.clone().unwrap_or_default();
    let observed_generation = status.observed_generation.unwrap_or(0);
    let replicas = status.replicas.unwrap_or(0);
    let updated = status.updated_replicas.unwrap_or(0);
    let available = status.available_replicas.unwrap_or(0);
    let deadline_exceeded =
        status.conditions.iter().flatten().any(|c| {
            c.type_.as_deref() == Some("Progressing") && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
        });
    let (complete, message) = if observed_generation < generation {
        (
            false,
            "waiting for the deployment spec update to be observed".to_string(),
        )
    } else if deadline_exceeded {
        (false, "progress deadline exceeded".to_string())
    } else if updated < desired {
        (false, format!("{updated} of {desired} new replicas have been updated"))
    } else if replicas > updated {
        (
            false,
            format!("{} old replicas are pending termination", replicas - updated),
        )
    } else if available < updated {
        (
            false,
            format!("{available} of {updated} updated replicas are available"),
        )
    } else {
        (true, "successfully rolled out".to_string())
    };
    RolloutProgress {
        generation,
        observed_generation,
        desired,
        replicas,
        updated,
        available,
        deadline_exceeded,
        complete,
        message,
    }
}

pub(super) fn pod_is_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Ready endpoints (ready unset counts as ready, as the API documents) whose target is one of
/// `pods`.
pub(super) fn ready_endpoints(slices: &[EndpointSlice], pods: &BTreeSet<String>) -> u32 {
    let n = slices
        .iter()
        .flat_map(|s| s.endpoints.iter().flatten())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .filter(|e| {
            e.target_ref
                .as_ref()
                .is_some_and(|r| r.kind.as_deref() == Some("Pod") && r.name.as_ref().is_some_and(|n| pods.contains(n)))
        })
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Who last changed a field of an object, from its managedFields: the field manager
/// (`kubectl-rollout`, `kubectl-patch`, our own), the operation and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldChange {
    /// Field manager.
    pub manager: String,
    /// `Update` or `Apply`.
    pub operation: String,
    /// When (second precision, as the API server records it).
    pub time: Option<DateTime<Utc>>,
    /// The manager owns other fields too, so `time` is when it last changed any of them, not
    /// necessarily this one (managedFields keep one time per manager).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub shared_time: bool,
}

impl FieldChange {
    /// `by `kubectl-rollout` (Update at 2026-12-03T11:02:03Z)`; with a shared time, `by `helm`
    /// (Update at ..., its last change of any field it owns)`.
    pub fn describe(&self) -> String {
        format!(
            "by `{}` ({} at {}{})",
            self.manager,
            self.operation,
            self.time.map_or_else(
                || "unknown time".to_string(),
                |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
            if self.shared_time {
                ", its last change of any field it owns"
            } else {
                ""
            }
        )
    }

    /// Whether the change was made at or after `at` (managedFields keep whole seconds, so
    /// `at` is compared truncated to its second).
    pub fn since(&self, at: DateTime<Utc>) -> bool {
        let floor = at.timestamp();
        self.time.is_some_and(|t| t.timestamp() >= floor)
    }
}

/// A metav1.Time as chrono (it serializes as RFC 3339).
pub(super) fn time_of<T: Serialize>(t: &Option<T>) -> Option<DateTime<Utc>> {
    let s = serde_json::to_value(t.as_ref()?).ok()?;
    DateTime::parse_from_rfc3339(s.as_str()?)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Who last changed `path` of an object, marked [`FieldChange::shared_time`] when that manager
/// owns other fields too: managedFields keep one time per manager, so `helm`, which owns a
/// Service's ports as well as its selector, may have changed a port at that time and not the
/// selector. The time still counts as a change since the incident opened (a step found done is
/// then not counted as our own rollback: somebody else may have made it); what it says names
/// the doubt. Unlike a pod template, where the ReplicaSets tell, nothing else records when a
/// selector changed. Pure.
pub(crate) fn field_change(meta: &ObjectMeta, path: &[&str]) -> Option<FieldChange> {
    last_change_exact(meta, path).map(|(change, exact)| FieldChange {
        shared_time: !exact,
        ..change
    })
}

/// The managedFields path of a Service's selector.
pub(super) const SELECTOR_PATH: &[&str] = &["f:spec", "f:selector"];

/// The managedFields path of a Deployment's pod template.
pub(super) const TEMPLATE_PATH: &[&str] = &["f:spec", "f:template"];

/// The newest managedFields entry that owns `path` (e.g. `["f:spec", "f:selector"]`) or
/// something under it, and whether that entry owns nothing outside `path`: managedFields keep one
/// time per manager (and operation), updated when any field it owns changes, so only then is
/// the time known to be that of `path`. Pure.
pub(crate) fn last_change_exact(meta: &ObjectMeta, path: &[&str]) -> Option<(FieldChange, bool)> {
    let pointer: String = path.iter().map(|p| format!("/{p}")).collect();
    meta.managed_fields
        .iter()
        .flatten()
        .filter_map(|e| {
            let fields = &e.fields_v1.as_ref()?.0;
            fields.pointer(&pointer)?;
            // Drop `path`, and each parent it leaves empty (`{}` alone would read as a leaf).
            let mut rest = fields.clone();
            for depth in (0..path.len()).rev() {
                let parent: String = path[..depth].iter().map(|p| format!("/{p}")).collect();
                let Some(m) = rest.pointer_mut(&parent).and_then(Value::as_object_mut) else {
                    break;
                };
                let child = m.get(path[depth]);
                if depth + 1 == path.len() || child.and_then(Value::as_object).is_some_and(serde_json::Map::is_empty) {
                    m.remove(path[depth]);
                } else {
                    break;
                }
            }
            let change = FieldChange {
                manager: e.manager.clone().unwrap_or_else(|| "?".into()),
                operation: e.operation.clone().unwrap_or_else(|| "?".into()),
                time: time_of(&e.time),
                shared_time: false,
            };
            Some((change, !owns_any(&rest)))
        })
        .max_by_key(|(c, _)| c.time)
}

/// Whether a fieldsV1 set owns any field (`{}` leaves; `.` only marks the map itself).
fn owns_any(fields: &Value) -> bool {
    fields.as_object().is_some_and(|m| {
        m.iter()
            .any(|(k, v)| k != "." && (v.as_object().is_some_and(serde_json::Map::is_empty) || owns_any(v)))
    })
}

/// Pods the new selector would pick up that neither the Service's current selector selects nor
/// carry the current selector's app-naming labels (the app the Service serves, whose stable
/// Deployment's pods are the ones we switch to): another app's pods, as `name (k=v,..)`. Empty
/// when the current selector names no app (nothing to tell them apart by).
///
/// An app key the new selector gives another value (`app.kubernetes.io/instance:
/// portal-api-canary` to `portal-api`) tells the canary from the stable track, not one app from
/// another, so it is not compared: every pod the new selector picks differs there by design.
/// An app key it keeps or drops is compared (dropping `app`, seed 000's copied `{version: ..}`,
/// is what lets another app's pods in).
pub(super) fn foreign_pods(
    pods: &[Pod],
    current: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
) -> Vec<String> {
    let named: Vec<(&String, &String)> = current.iter().filter(|(k, _)| APP_KEYS.contains(&k.as_str())).collect();
    if named.is_empty() {
        return Vec::new();
    }
    let app: Vec<(&String, &String)> = named
        .into_iter()
        .filter(|(k, v)| new.get(*k).is_none_or(|n| n == *v))
        .collect();
    pods.iter()
        .filter(|p| {
            let labels = p.metadata.labels.clone().unwrap_or_default();
            let has = |k: &String, v: &String| labels.get(k) == Some(v);
            let in_current = current.iter().all(|(k, v)| has(k, v));
            let same_app = app.iter().all(|(k, v)| has(k, v));
            !(in_current || same_app)
        })
        .map(|p| {
            let labels = p.metadata.labels.clone().unwrap_or_default();
            let shown: Vec<String> = labels
                .iter()
                .filter(|(k, _)| APP_KEYS.contains(&k.as_str()))
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!(
                "{} ({})",
                p.metadata.name.as_deref().unwrap_or("?"),
                if shown.is_empty() {
                    "no app label".to_string()
                } else {
                    shown.join(",")
                }
            )
        })
        .collect()
}
