//! Planning (pure): from the objects as read, what each step must write (the exact patch, the
//! state it produces, what to pre-check), or why it is already done. `kubectl rollout undo`'s
//! choice of ReplicaSet and its annotation rules live here.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::views::{
    equality_selector, owned, strip_hash, template_summary, templates_equal, Current, DeploymentView, FieldChange,
    RsView,
};
use super::{
    KubeError, KubeStep, ObjectState, ANNOTATIONS_TO_SKIP, JSON_PATCH, MERGE_PATCH, REVISION_ANNOTATION,
    UNDO_MARKER_ANNOTATION,
};

/// kubectl's choice of ReplicaSet: `None`/`Some(0)` the second-highest revision, else exact.
pub(super) fn select_replica_set<'a>(
    d: &'a DeploymentView,
    rses: &'a [RsView],
    to_revision: Option<u64>,
) -> Result<&'a RsView, KubeError> {
    let by_revision: BTreeMap<u64, &RsView> = owned(d, rses).filter_map(|rs| rs.revision.map(|r| (r, rs))).collect();
    match to_revision {
        None | Some(0) => by_revision
            .values()
            .rev()
            .nth(1)
            .copied()
            .ok_or_else(|| KubeError::NoRolloutHistory {
                deployment: d.name.clone(),
            }),
        Some(n) => by_revision.get(&n).copied().ok_or_else(|| KubeError::RevisionNotFound {
            deployment: d.name.clone(),
            revision: n,
            available: by_revision.keys().copied().collect(),
        }),
    }
}

/// Annotations after the undo. Unlike kubectl (which keeps only the skip-list keys of the
/// Deployment), every Deployment annotation is kept; the ReplicaSet's annotations that are not
/// on the skip list are added on top, as kubectl does.
pub(super) fn merge_annotations(
    deployment: &BTreeMap<String, String>,
    replica_set: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut out = deployment.clone();
    for (k, v) in replica_set {
        if !ANNOTATIONS_TO_SKIP.contains(&k.as_str()) {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

/// What [`UNDO_MARKER_ANNOTATION`] holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct UndoMarker {
    /// ReplicaSet whose template was restored (names survive revision renumbering).
    pub(super) to_replica_set: String,
    /// Its revision at the time.
    pub(super) to_revision: u64,
    /// The Deployment's revision we rolled back from.
    pub(super) from_revision: Option<String>,
    /// The step's `to_revision` (`None` for "previous"): a different request is not done.
    #[serde(default)]
    pub(super) requested: Option<u64>,
    /// The step's `to_image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) requested_image: Option<String>,
    /// When the incident whose run wrote it opened: a later incident does not take an earlier
    /// incident's undo for its own (that release may have been rolled forward since).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) incident_opened_at: Option<DateTime<Utc>>,
}

/// JSON patch replacing the Service selector as a whole, guarded by resourceVersion. `add`
/// rather than `replace` because it also works when the selector is absent.
pub(super) fn selector_patch(resource_version: &str, selector: &BTreeMap<String, String>) -> Value {
    json!([
        {"op": "test", "path": "/metadata/resourceVersion", "value": resource_version},
        {"op": "add", "path": "/spec/selector", "value": selector},
    ])
}

/// kubectl's rollout-undo patch plus a resourceVersion `test`, which kubectl does not send.
pub(super) fn undo_patch(resource_version: &str, template: &Value, annotations: &BTreeMap<String, String>) -> Value {
    json!([
        {"op": "test", "path": "/metadata/resourceVersion", "value": resource_version},
        {"op": "replace", "path": "/spec/template", "value": template},
        {"op": "add", "path": "/metadata/annotations", "value": annotations},
    ])
}

/// Merge patch for the scale subresource; the resourceVersion makes it conditional (409 if
/// the Deployment changed since we read it).
pub(super) fn scale_patch(resource_version: &str, replicas: i32) -> Value {
    json!({"metadata": {"resourceVersion": resource_version}, "spec": {"replicas": replicas}})
}

/// What a step's pre-check looks at.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum PreCheckNeed {
    /// Not a traffic-shifting step.
    None,
    /// Pods behind the Service's new selector must be Ready.
    Pods {
        service: String,
        selector: BTreeMap<String, String>,
        /// The Service's selector now: pods it selects, or of its app, are not foreign.
        current: BTreeMap<String, String>,
    },
    /// The ReplicaSet a rollout undo restores (informational, see `precheck`).
    ReplicaSet {
        name: String,
        revision: u64,
        replicas: i64,
        ready: i64,
    },
}

/// A write to make.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct WritePlan {
    pub(super) content_type: &'static str,
    pub(super) patch: Value,
    pub(super) would_write: ObjectState,
    pub(super) precheck: PreCheckNeed,
}

/// What a step needs, decided from what was read.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Plan {
    /// Nothing to write; `by` is who last changed the field, when managedFields say.
    Done {
        reason: String,
        by: Option<FieldChange>,
    },
    Write(Box<WritePlan>),
}

/// Plans one step from what was read. `opened_at` is when the incident opened: the revision
/// current then is the bad one (`None`: kubectl's "previous revision", nothing pinned).
pub(super) fn plan_step(
    step: &KubeStep,
    current: &Current,
    opened_at: Option<DateTime<Utc>>,
) -> Result<Plan, KubeError> {
    match (step, current) {
        (KubeStep::SwitchService { service, selector }, Current::Service(s)) => {
            if &s.selector == selector {
                return Ok(Plan::Done {
                    reason: format!("service {service} already selects {}", equality_selector(selector)),
                    by: s.selector_change.clone(),
                });
            }
            Ok(Plan::Write(Box::new(WritePlan {
                content_type: JSON_PATCH,
                patch: selector_patch(&s.resource_version, selector),
                would_write: ObjectState::Service {
                    name: s.name.clone(),
                    resource_version: s.resource_version.clone(),
                    selector: selector.clone(),
                },
                precheck: PreCheckNeed::Pods {
                    service: service.clone(),
                    selector: selector.clone(),
                    current: s.selector.clone(),
                },
            })))
        }
        (
            KubeStep::RolloutUndo {
                to_revision, to_image, ..
            },
            Current::Undo(d, rses),
        ) => {
            let good = match (to_revision.filter(|&r| r != 0), to_image) {
                (Some(r), _) => Good::Revision(r),
                (None, Some(image)) => Good::Image(image.clone()),
                (None, None) => Good::BeforeBad,
            };
            plan_rollout_undo(d, rses, &good, opened_at)
        }
        (KubeStep::Scale { deployment, replicas }, Current::Scale(s)) => {
            let want = i32::try_from(*replicas).unwrap_or(i32::MAX);
            if s.replicas == want {
                return Ok(Plan::Done {
                    reason: format!("deployment {deployment} already has {want} replica(s)"),
                    by: None,
                });
            }
            Ok(Plan::Write(Box::new(WritePlan {
                content_type: MERGE_PATCH,
                patch: scale_patch(&s.resource_version, want),
                would_write: ObjectState::Scale {
                    deployment: deployment.clone(),
                    resource_version: s.resource_version.clone(),
                    replicas: want,
                },
                precheck: PreCheckNeed::None,
            })))
        }
        _ => Err(KubeError::internal("step and object read do not match")),
    }
}

/// Which revision a rollout undo restores.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Good {
    /// The one before the bad release: the revision current when the incident opened (or, with
    /// `opened_at` unknown, the current one, as kubectl assumes).
    BeforeBad,
    /// The policy names the known-good revision (its old number counts after a renumbering).
    Revision(u64),
    /// The policy names the known-good image of one of the containers.
    Image(String),
}

impl Good {
    fn requested(&self) -> (Option<u64>, Option<String>) {
        match self {
            Good::BeforeBad => (None, None),
            Good::Revision(r) => (Some(*r), None),
            Good::Image(i) => (None, Some(i.clone())),
        }
    }
}

fn has_image(template: &Value, image: &str) -> bool {
    template_summary(template).0.values().any(|i| i == image)
}

/// The named known-good ReplicaSet: by revision (present or in its revision history, so a
/// renumbered one is still found) or by image (the newest revision that runs it).
fn select_good<'a>(d: &'a DeploymentView, rses: &'a [RsView], good: &Good) -> Result<&'a RsView, KubeError> {
    let mut owned: Vec<&RsView> = owned(d, rses).filter(|rs| rs.revision.is_some()).collect();
    owned.sort_by_key(|rs| std::cmp::Reverse(rs.revision));
    match good {
        Good::Revision(n) => owned
            .iter()
            .find(|rs| rs.revision == Some(*n))
            .or_else(|| owned.iter().find(|rs| rs.revision_history.contains(n)))
            .copied()
            .ok_or_else(|| KubeError::RevisionNotFound {
                deployment: d.name.clone(),
                revision: *n,
                available: owned.iter().rev().filter_map(|rs| rs.revision).collect(),
            }),
        Good::Image(image) => owned
            .iter()
            .find(|rs| has_image(&rs.template, image))
            .copied()
            .ok_or_else(|| KubeError::ImageNotFound {
                deployment: d.name.clone(),
                image: image.clone(),
                available: owned
                    .iter()
                    .flat_map(|rs| template_summary(&rs.template).0.into_values())
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect(),
            }),
        Good::BeforeBad => select_replica_set(d, rses, None),
    }
}

/// Whether `a` is an older release than `b`: reused by a rollback (it has a revision history),
/// or created earlier.
fn older(a: &RsView, b: &RsView) -> bool {
    !a.revision_history.is_empty() || matches!((a.created, b.created), (Some(x), Some(y)) if x < y)
}

/// `kubectl rollout undo` as a plan (the module docs list where it differs from kubectl).
/// With [`Good::BeforeBad`] and the incident's opening time `opened_at`, the bad release is
/// pinned: if the pod template changed after the incident opened (managedFields) to an older
/// release, someone already rolled back and nothing is written; to a newer one, we refuse to
/// undo it. Our undo marker counts only when written for this incident (opened at or after
/// `opened_at`).
pub(super) fn plan_rollout_undo(
    d: &DeploymentView,
    rses: &[RsView],
    good: &Good,
    opened_at: Option<DateTime<Utc>>,
) -> Result<Plan, KubeError> {
    let (requested, requested_image) = good.requested();
    // Who changed the template, for a step found done; a change of another field by the same
    // manager since the incident opened does not make it a change made since then.
    let template_by = match opened_at {
        Some(at) if d.template_change.as_ref().is_some_and(|c| c.since(at)) => {
            template_changed_since(d, rses, at).cloned()
        }
        _ => d.template_change.clone(),
    };
    if d.paused {
        return Err(KubeError::Paused {
            deployment: d.name.clone(),
        });
    }
    // An earlier run (ours, for this incident) already restored a ReplicaSet that is still in
    // effect: done, even though "the previous revision" now points at the canary again. An
    // earlier incident's marker says nothing about this one's bad release.
    if let Some(marker) = d
        .annotations
        .get(UNDO_MARKER_ANNOTATION)
        .and_then(|m| serde_json::from_str::<UndoMarker>(m).ok())
        .filter(|m| opened_at.is_none_or(|at| m.incident_opened_at.is_some_and(|mine| mine >= at)))
    {
        let same_request = marker.requested == requested && marker.requested_image == requested_image;
        if let Some(rs) = owned(d, rses).find(|rs| same_request && rs.name == marker.to_replica_set) {
            if templates_equal(&rs.template, &d.template) {
                return Ok(Plan::Done {
                    reason: format!(
                        "already rolled back to replicaset {} (revision {} then) by an earlier run; \
                         its template is still current",
                        rs.name, marker.to_revision
                    ),
                    by: template_by.clone(),
                });
            }
        }
    }
    if let (Good::BeforeBad, Some(opened_at)) = (good, opened_at) {
        if let Some(change) = template_changed_since(d, rses, opened_at) {
            return changed_since_opened(d, rses, change, opened_at);
        }
    }
    let target = select_good(d, rses, good)?;
    let revision = target.revision.unwrap_or_default();
    if templates_equal(&target.template, &d.template) {
        return Ok(Plan::Done {
            reason: format!(
                "current template already matches revision {revision} (replicaset {})",
                target.name
            ),
            by: template_by,
        });
    }
    let template = strip_hash(&target.template);
    let mut annotations = merge_annotations(&d.annotations, &target.annotations);
    let marker = UndoMarker {
        to_replica_set: target.name.clone(),
        to_revision: revision,
        from_revision: d.annotations.get(REVISION_ANNOTATION).cloned(),
        requested,
        requested_image,
        incident_opened_at: opened_at,
    };
    annotations.insert(
        UNDO_MARKER_ANNOTATION.to_string(),
        serde_json::to_string(&marker).map_err(|e| KubeError::internal(e.to_string()))?,
    );
    let (images, template_labels) = template_summary(&template);
    Ok(Plan::Write(Box::new(WritePlan {
        content_type: JSON_PATCH,
        patch: undo_patch(&d.resource_version, &template, &annotations),
        would_write: ObjectState::Deployment {
            name: d.name.clone(),
            resource_version: d.resource_version.clone(),
            generation: d.generation,
            revision: d.annotations.get(REVISION_ANNOTATION).cloned(),
            replica_set: Some(target.name.clone()),
            images,
            template_labels,
        },
        precheck: PreCheckNeed::ReplicaSet {
            name: target.name.clone(),
            revision,
            replicas: target.replicas,
            ready: target.ready,
        },
    })))
}

/// Who changed the pod template at or after `opened_at`, if it changed then. managedFields
/// keep one time per manager, not per field: when the template's manager owns other fields
/// too (helm also owns labels, annotations, replicas), its time may be one of those, so the
/// ReplicaSets decide. The template is unchanged since the opening when the controller has
/// seen the latest spec (observedGeneration) and the template runs the newest revision's
/// ReplicaSet, created before the opening and never reused by a rollback (a rollback renumbers
/// an old one and records its revision history; a new release creates one). Anything else,
/// or anything unknown, counts as changed: refusing is the safe side.
pub(super) fn template_changed_since<'a>(
    d: &'a DeploymentView,
    rses: &[RsView],
    opened_at: DateTime<Utc>,
) -> Option<&'a FieldChange> {
    let change = d.template_change.as_ref().filter(|c| c.since(opened_at))?;
    if d.template_change_exact {
        return Some(change);
    }
    let seen_latest = matches!((d.generation, d.observed_generation), (Some(g), Some(o)) if o >= g);
    let newest = owned(d, rses).filter_map(|rs| rs.revision).max();
    let current = owned(d, rses).find(|rs| templates_equal(&rs.template, &d.template));
    let unchanged = seen_latest
        && current.is_some_and(|cur| {
            cur.revision.is_some()
                && cur.revision == newest
                && cur.revision_history.is_empty()
                && cur.created.is_some_and(|c| c.timestamp() < opened_at.timestamp())
        });
    (!unchanged).then_some(change)
}

/// The pod template changed after the incident opened: the bad release is the one current
/// before that change (the newest other revision; a rollback renumbers the restored one to the
/// top). Back to an older release: done by someone else. Forward to a newer one: refused, a
/// person decides.
fn changed_since_opened(
    d: &DeploymentView,
    rses: &[RsView],
    change: &FieldChange,
    opened_at: DateTime<Utc>,
) -> Result<Plan, KubeError> {
    let current = owned(d, rses).find(|rs| templates_equal(&rs.template, &d.template));
    let bad = owned(d, rses)
        .filter(|rs| current.is_none_or(|c| c.name != rs.name))
        .max_by_key(|rs| rs.revision);
    match (current, bad) {
        (Some(cur), Some(bad)) if older(cur, bad) => Ok(Plan::Done {
            reason: format!(
                "deployment {} was already rolled back after the incident opened, {}: it runs revision {} \
                 (replicaset {}, images {}) instead of the bad release (replicaset {})",
                d.name,
                change.describe(),
                cur.revision.unwrap_or_default(),
                cur.name,
                images_of(&cur.template),
                bad.name
            ),
            by: Some(change.clone()),
        }),
        _ => Err(KubeError::ChangedSinceOpened {
            deployment: d.name.clone(),
            by: change.describe(),
            opened_at: opened_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            images: images_of(&d.template),
        }),
    }
}

fn images_of(template: &Value) -> String {
    let (images, _) = template_summary(template);
    images
        .iter()
        .map(|(c, i)| format!("{c}={i}"))
        .collect::<Vec<_>>()
        .join(",")
}

pub(super) fn object_name(step: &KubeStep) -> String {
    match step {
        KubeStep::SwitchService { service, .. } => format!("service/{service}"),
        KubeStep::RolloutUndo { deployment, .. } => format!("deployment/{deployment}"),
        KubeStep::Scale { deployment, .. } => format!("deployment/{deployment}/scale"),
        KubeStep::Check(_) => "check".into(),
    }
}

/// Which stored object a step writes (the scale subresource is the Deployment).
pub(super) fn object_key(step: &KubeStep) -> String {
    match step {
        KubeStep::SwitchService { service, .. } => format!("service/{service}"),
        KubeStep::RolloutUndo { deployment, .. } | KubeStep::Scale { deployment, .. } => {
            format!("deployment/{deployment}")
        }
        KubeStep::Check(_) => "check".into(),
    }
}

pub(super) fn step_kind(step: &KubeStep) -> (&'static str, &str) {
    match step {
        KubeStep::SwitchService { service, .. } => ("Service", service),
        KubeStep::RolloutUndo { deployment, .. } | KubeStep::Scale { deployment, .. } => ("Deployment", deployment),
        KubeStep::Check(_) => ("Check", ""),
    }
}

pub(super) fn clamp_u32(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}
