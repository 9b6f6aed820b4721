//! Reverting a canary release on Kubernetes, the way the seeds' kubectl commands do.
//!
//! This runs after the responder has decided (from alerts and policies) to roll back a target
//! of kind Kubernetes. A target is a namespace and an ordered list of steps: switch a Service's
//! selector back to the stable pods (`kubectl patch service`), undo a Deployment's rollout
//! (`kubectl rollout undo`), scale a Deployment (`kubectl scale`); check steps between them
//! (an HTTP GET that must pass, seed 000's `curl -f`) stop the steps after them when they
//! fail, and the rollback ends partial, naming the check. [`KubeExecutor::revert`]
//! first reads every object and plans every step, then pre-checks that the pods about to take
//! the traffic are ready, and only then writes, one step at a time, each write guarded by the
//! object's resourceVersion and read back afterwards. A step whose object is already in the
//! wanted state is reported as done and not written, so calling `revert` again after a crash
//! (takeover by another replica) finishes the work without repeating it. What follows is the
//! caller's business: [`KubeExecutor::verify`] (ready endpoints, finished rollouts), the
//! alert clearing, and notifications. Every notable step is reported through a callback so the
//! caller can keep the incident's audit trail.
//!
//! Where we differ from kubectl, on purpose: the Service selector is replaced as a whole with
//! a JSON patch (`kubectl patch -p` merges maps, so stale keys survive); every write carries a
//! resourceVersion precondition (kubectl's rollout undo has none); rollout undo keeps all of
//! the Deployment's annotations (kubectl drops those not on its skip list) and adds
//! [`UNDO_MARKER_ANNOTATION`] (with the incident's opening time: another incident ignores it),
//! so that running the same undo twice does not flip back to the canary the way a second
//! `kubectl rollout undo` does; given the incident's opening time,
//! rollout undo pins the release current then as the bad one (a person's undo since then is
//! found done, with who and when from managedFields, instead of being undone again), and a
//! policy may name the known-good revision or image; a Service switch is refused when the new
//! selector would also select another app's pods.

//!
//! Layout: the target schema lives in [`crate::policy::target::kubernetes`] (plain data,
//! re-exported here); `settings` holds the client settings; `views` the parts of each object
//! we read and pure helpers over them; `plan` decides, from what was read, what each step must
//! write (pure, unit-tested in `tests.rs`); `executor` makes the API calls of a revert;
//! `check` the pre-check before any write and the check steps between writes;
//! `verify` waits for endpoints and rollouts after it; `readback` samples the target during
//! the bake; `records` holds the typed step records and renders them in Kubernetes terms;
//! `error` the error enum and its classification; `gitops_hook` the calls through which
//! [`crate::action::gitops`] suspends Argo CD / Flux right after the pre-checks.

use std::time::Duration;

mod check;
mod error;
mod executor;
mod gitops_hook;
mod plan;
/// Reading the target back during the bake (verification).
mod readback;
mod records;
mod settings;
mod verify;
mod views;

#[cfg(test)]
mod field_tests;
#[cfg(test)]
mod tests;

pub use crate::policy::target::kubernetes::{ExpectStatus, HttpCheck, KubeCheck, KubeStep, KubernetesTarget};
pub use error::KubeError;
pub use executor::KubeExecutor;
pub use readback::KubeBaseline;
pub use records::{CheckVerdict, KubeOutcome, KubeStepRecord, ObjectState, RolloutProgress, StepOutcome, StepResult};
pub use settings::KubeSettings;
pub use views::{rollout_progress, FieldChange};

/// The Deployment controller's revision counter, on Deployments and their ReplicaSets.
pub const REVISION_ANNOTATION: &str = "deployment.kubernetes.io/revision";
/// Revisions a reused ReplicaSet had before (the controller renumbers it on a rollback).
pub const REVISION_HISTORY_ANNOTATION: &str = "deployment.kubernetes.io/revision-history";
/// Label the Deployment controller adds to each ReplicaSet's pod template (and pods).
pub const POD_TEMPLATE_HASH_LABEL: &str = "pod-template-hash";
/// Annotation we write together with a rollout undo: which ReplicaSet's template we restored.
/// `kubectl rollout undo` run twice flips back to the bad version (the restored ReplicaSet
/// gets the newest revision, so "the previous one" is the canary again); this marker lets a
/// second run (takeover after a crash) see that the undo already happened and do nothing.
pub const UNDO_MARKER_ANNOTATION: &str = "rollback-responder/rollout-undo";
/// Label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// kubectl's `annotationsToSkip` (rollback.go): Deployment annotations that keep their current
/// value instead of being copied from the ReplicaSet. Our own marker is skipped as well, since
/// the controller copies Deployment annotations onto ReplicaSets and a stale marker must not
/// come back from one.
const ANNOTATIONS_TO_SKIP: &[&str] = &[
    "kubectl.kubernetes.io/last-applied-configuration",
    "deployment.kubernetes.io/revision",
    "deployment.kubernetes.io/revision-history",
    "deployment.kubernetes.io/desired-replicas",
    "deployment.kubernetes.io/max-replicas",
    "deprecated.deployment.rollback.to",
    UNDO_MARKER_ANNOTATION,
];
/// Content types of the two patch flavours we send.
const JSON_PATCH: &str = "application/json-patch+json";
const MERGE_PATCH: &str = "application/merge-patch+json";
/// One API call may not take longer than this; a hung connection becomes a retryable error.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Exactly the RBAC rules the executor needs, as (API group, resource, verbs); a test compares
/// them with deploy/kubernetes/base/rbac.yaml. All writes are patches (no update, no create).
pub const RBAC_RULES: &[(&str, &str, &[&str])] = &[
    // Read the selector; switch it back (JSON patch).
    ("", "services", &["get", "patch"]),
    // Rollout undo: read template and annotations, write them back (JSON patch); verify polls
    // the Deployment's status with get (no list/watch needed).
    ("apps", "deployments", &["get", "patch"]),
    // Rollout undo: find the Deployment's ReplicaSets and their revisions.
    ("apps", "replicasets", &["list"]),
    // Scale through the subresource (merge patch).
    ("apps", "deployments/scale", &["get", "patch"]),
    // Pre-check (ready pods behind the new selector) and verify (which endpoints are ours).
    ("", "pods", &["list"]),
    // Verify: the Service has ready endpoints after the switch.
    ("discovery.k8s.io", "endpointslices", &["list"]),
];
