//! Reverting a canary release on Kubernetes, the way the seeds' kubectl commands do.
//!
//! This runs after the responder has decided (from alerts and policies) to roll back a target
//! of kind Kubernetes. A target is a namespace and an ordered list of steps: switch a Service's
//! selector back to the stable pods (`kubectl patch service`), undo a Deployment's rollout
//! (`kubectl rollout undo`), scale a Deployment (`kubectl scale`). [`KubeExecutor::revert`]
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
//! [`UNDO_MARKER_ANNOTATION`], so that running the same undo twice does not flip back to the
//! canary the way a second `kubectl rollout undo` does.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::autoscaling::v1::Scale;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::retry::{Attempt, BeforeWrite, Classify, ErrorClass, RetryPolicy};

/// Reading the target back during the bake (verification).
#[path = "kube_readback.rs"]
mod readback;
pub use readback::KubeBaseline;

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
    /// `kubectl rollout undo deployment/NAME [--to-revision=N]`.
    RolloutUndo {
        deployment: String,
        #[serde(default)]
        to_revision: Option<u64>,
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
        if let Some(g) = &self.gitops {
            g.owner()?;
        }
        for (i, s) in self.steps.iter().enumerate() {
            if let KubeStep::SwitchService { selector, .. } = s {
                if selector.is_empty() {
                    return Err(format!(
                        "target.kubernetes.steps[{i}].switch_service.selector: give the previous version's labels, e.g. {{version: v1.0.0-rc.0}}"
                    ));
                }
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

// ---------------------------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------------------------

/// The Deployment controller's revision counter, on Deployments and their ReplicaSets.
pub const REVISION_ANNOTATION: &str = "deployment.kubernetes.io/revision";
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
/// Polling bounds for `verify`: often enough for short test timeouts, gentle on the API.
const MIN_POLL: Duration = Duration::from_millis(50);
const MAX_POLL: Duration = Duration::from_secs(2);

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

// ---------------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------------

/// Kubernetes client settings from the service's config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubeSettings {
    /// Kubeconfig file to use instead of `KUBECONFIG` / `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context; `None` uses the file's current-context.
    pub context: Option<String>,
    /// `true`: use the pod's service account only. `false`: infer (kubeconfig first, then
    /// in-cluster), unless `kubeconfig` or `context` is set.
    pub in_cluster: bool,
    /// Field manager recorded in managedFields for our patches.
    pub field_manager: String,
    /// Re-reads and retries after a write lost a resourceVersion race.
    pub max_conflict_retries: u32,
    /// How long a call failing with a retryable error (5xx, 429, timeout, connection) is
    /// tried again (humantime, at most 30m).
    #[serde(with = "humantime_serde")]
    pub retry_window: Duration,
    /// First backoff in milliseconds before a retried call; grows exponentially with jitter.
    /// Conflicts are counted separately (`max_conflict_retries`): they need a re-read, not
    /// just a resend.
    pub initial_backoff_ms: u64,
}

impl Default for KubeSettings {
    fn default() -> Self {
        Self {
            kubeconfig: None,
            context: None,
            in_cluster: false,
            field_manager: "rollback-responder".into(),
            max_conflict_retries: 3,
            retry_window: super::retry::DEFAULT_WINDOW,
            initial_backoff_ms: 250,
        }
    }
}

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
    },
    /// Dry run: the server validated the patch (dryRun=All) and persisted nothing.
    DryRun {
        /// State as read.
        before: ObjectState,
        /// The object as the server says it would be after the patch.
        would_write: ObjectState,
    },
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
    pub gitops: Option<super::gitops::GitOpsStep>,
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
    Gitops(super::gitops::GitOpsStep),
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

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Errors of the Kubernetes revert and verification.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize)]
#[serde(tag = "error", rename_all = "snake_case")]
pub enum KubeError {
    /// The object does not exist.
    #[error("{kind} {namespace}/{name} not found")]
    NotFound {
        /// Kind (`Service`, `Deployment`, ...).
        kind: String,
        /// Namespace.
        namespace: String,
        /// Object name (empty for lists).
        name: String,
    },
    /// RBAC denies a call; names the rule to add.
    #[error(
        "forbidden: the responder may not {verb} {resource} (API group {api_group:?}) in namespace {namespace}; \
         add verb {verb:?} for resource {resource:?} to the Role (deploy/kubernetes/base/rbac.yaml). Server: {message}"
    )]
    Forbidden {
        /// Verb denied (`get`, `list`, `patch`).
        verb: String,
        /// Resource, with subresource (`deployments/scale`).
        resource: String,
        /// API group (`""` is the core group).
        api_group: String,
        /// Namespace.
        namespace: String,
        /// Server message.
        message: String,
    },
    /// Someone else kept changing the object; gave up after the configured retries.
    #[error("conflict: {kind} {namespace}/{name} changed under us {attempts} time(s); last: {message}")]
    Conflict {
        /// Kind.
        kind: String,
        /// Namespace.
        namespace: String,
        /// Object name.
        name: String,
        /// Write attempts made.
        attempts: u32,
        /// Last server message.
        message: String,
    },
    /// Too few ready pods behind the new selector; nothing was written.
    #[error(
        "pre-check failed: service {namespace}/{service}: {ready} of {matching} pod(s) matching {selector} are Ready, \
         {required} required; nothing was changed"
    )]
    PreCheckFailed {
        /// Service about to be switched.
        service: String,
        /// Namespace.
        namespace: String,
        /// The new selector.
        selector: String,
        /// Pods matching it.
        matching: u32,
        /// Ready pods.
        ready: u32,
        /// `min_ready_replicas`.
        required: u32,
    },
    /// kubectl refuses to roll back a paused Deployment, and so do we.
    #[error("deployment {deployment} is paused: resume it (kubectl rollout resume) before rolling back")]
    Paused {
        /// Deployment name.
        deployment: String,
    },
    /// Fewer than two revisions: there is no previous one.
    #[error("no rollout history found for deployment {deployment}")]
    NoRolloutHistory {
        /// Deployment name.
        deployment: String,
    },
    /// `to_revision` names a revision none of the Deployment's ReplicaSets has.
    #[error("unable to find revision {revision} of deployment {deployment} (revisions present: {available:?})")]
    RevisionNotFound {
        /// Deployment name.
        deployment: String,
        /// Requested revision.
        revision: u64,
        /// Revisions found.
        available: Vec<u64>,
    },
    /// The undone Deployment did not finish rolling out in time (or hit its progress deadline).
    #[error("deployment {deployment} did not complete its rollout within {timeout_secs}s: {last_status}")]
    RolloutTimedOut {
        /// Deployment name.
        deployment: String,
        /// `rollout_timeout` in seconds.
        timeout_secs: u64,
        /// The Deployment reported ProgressDeadlineExceeded (failed early).
        progress_deadline_exceeded: bool,
        /// Last progress line.
        last_status: String,
    },
    /// After the switch, the Service has no ready endpoint of the new selector's pods.
    #[error("service {service} has {ready} ready endpoint(s) for pods matching {selector} after {waited_secs}s, {required} required (min_ready_replicas)")]
    NoReadyEndpoints {
        /// Service name.
        service: String,
        /// The new selector.
        selector: String,
        /// How long we waited.
        waited_secs: u64,
        /// Ready endpoints of the new selector's pods at the end.
        ready: u32,
        /// `min_ready_replicas` (at least 1).
        required: u32,
    },
    /// The write was accepted but the object read back is not in the wanted state (e.g. a
    /// mutating webhook or an HPA changed it).
    #[error("{object}: write did not take: expected {expected}, read back {got}")]
    ReadBackMismatch {
        /// Object written.
        object: String,
        /// Wanted state (JSON).
        expected: String,
        /// State read back (JSON).
        got: String,
    },
    /// The target definition is unusable.
    #[error("invalid Kubernetes target: {message}")]
    InvalidTarget {
        /// What is wrong and how to fix it.
        message: String,
    },
    /// Client configuration could not be loaded (kubeconfig, in-cluster files).
    #[error("kubernetes client configuration: {message}")]
    Config {
        /// Cause.
        message: String,
    },
    /// Any other API error, as the server returned it.
    #[error("kubernetes API error {code} {reason}: {message}")]
    Api {
        /// HTTP status.
        code: u16,
        /// Status reason (`Invalid`, `TooManyRequests`, ...).
        reason: String,
        /// Server message.
        message: String,
    },
    /// The GitOps owner could not be suspended and the policy requires it: nothing reverted.
    #[error(
        "could not suspend {owner} before the revert: {cause}; nothing was reverted, because its sync would undo \
         the revert within minutes: fix the policy's target.kubernetes.gitops or the responder's RBAC \
         (deploy/kubernetes/gitops/), or set gitops.required: false to revert without suspending"
    )]
    GitOpsSuspend {
        /// `Argo CD application argocd/portal-api`.
        owner: String,
        /// The failed call's error.
        cause: String,
        /// Whether the failed call may succeed later.
        retryable: bool,
    },
    /// Transport, timeout or decoding error on our side.
    #[error("kubernetes client error: {message}")]
    Client {
        /// Cause.
        message: String,
        /// Whether another attempt may succeed (transport and timeouts: yes).
        retryable: bool,
    },
}

impl KubeError {
    /// Whether running the revert again later may succeed without a person's help.
    pub fn is_retryable(&self) -> bool {
        match self {
            KubeError::Conflict { .. } => true,
            KubeError::Api { code, .. } => *code == 429 || *code >= 500,
            KubeError::Client { retryable, .. } | KubeError::GitOpsSuspend { retryable, .. } => *retryable,
            _ => false,
        }
    }

    /// Short label for metrics.
    pub fn code(&self) -> &str {
        match self {
            KubeError::NotFound { .. } => "not_found",
            KubeError::Forbidden { .. } => "forbidden",
            KubeError::Conflict { .. } => "conflict",
            KubeError::PreCheckFailed { .. } => "precheck_failed",
            KubeError::Paused { .. } => "paused",
            KubeError::NoRolloutHistory { .. } => "no_rollout_history",
            KubeError::RevisionNotFound { .. } => "revision_not_found",
            KubeError::RolloutTimedOut { .. } => "rollout_timed_out",
            KubeError::NoReadyEndpoints { .. } => "no_ready_endpoints",
            KubeError::ReadBackMismatch { .. } => "read_back_mismatch",
            KubeError::InvalidTarget { .. } => "invalid_target",
            KubeError::Config { .. } => "config",
            KubeError::GitOpsSuspend { .. } => "gitops_suspend_failed",
            KubeError::Api { .. } => "api",
            KubeError::Client { .. } => "client",
        }
    }

    /// The pods about to take the traffic were not ready, so nothing was changed.
    pub fn is_precheck(&self) -> bool {
        matches!(self, KubeError::PreCheckFailed { .. })
    }

    /// Worth sending the same request again right away (throttling, server trouble, transport).
    fn is_transient(&self) -> bool {
        match self {
            KubeError::Api { code, .. } => matches!(code, 429 | 500 | 502 | 503 | 504),
            KubeError::Client { retryable, .. } => *retryable,
            _ => false,
        }
    }

    fn internal(message: impl Into<String>) -> Self {
        KubeError::Client {
            message: message.into(),
            retryable: false,
        }
    }
}

impl Classify for KubeError {
    fn class(&self) -> ErrorClass {
        if self.is_transient() {
            ErrorClass::Retryable
        } else {
            ErrorClass::Permanent
        }
    }

    fn code(&self) -> &str {
        KubeError::code(self)
    }

    fn for_call(self, call: &str, attempts: u32) -> Self {
        let tries = if attempts > 1 {
            format!(" (gave up after {attempts} attempts)")
        } else {
            String::new()
        };
        match self {
            KubeError::Api { code, reason, message } => KubeError::Api {
                code,
                reason,
                message: format!("{call}: {message}{tries}"),
            },
            // Client messages start with the call already.
            KubeError::Client { message, retryable } => KubeError::Client {
                message: format!("{message}{tries}"),
                retryable,
            },
            other => other,
        }
    }
}

/// The API call being made, so an error can say what was denied or missing.
#[derive(Debug, Clone, Copy)]
struct Op<'a> {
    verb: &'static str,
    kind: &'static str,
    api_group: &'static str,
    resource: &'static str,
    namespace: &'a str,
    name: &'a str,
}

impl Op<'_> {
    fn describe(&self) -> String {
        if self.name.is_empty() {
            format!("{} {} in {}", self.verb, self.resource, self.namespace)
        } else {
            format!("{} {}/{} in {}", self.verb, self.resource, self.name, self.namespace)
        }
    }
}

/// Classifies a kube error for the call `op`: 404, 403 and 409 get their own variants.
fn classify(err: kube::Error, op: &Op<'_>) -> KubeError {
    match err {
        kube::Error::Api(status) => {
            if status.is_not_found() {
                KubeError::NotFound {
                    kind: op.kind.into(),
                    namespace: op.namespace.into(),
                    name: op.name.into(),
                }
            } else if status.is_forbidden() {
                KubeError::Forbidden {
                    verb: op.verb.into(),
                    resource: op.resource.into(),
                    api_group: op.api_group.into(),
                    namespace: op.namespace.into(),
                    message: status.message,
                }
            } else if status.is_conflict() {
                KubeError::Conflict {
                    kind: op.kind.into(),
                    namespace: op.namespace.into(),
                    name: op.name.into(),
                    attempts: 1,
                    message: status.message,
                }
            } else {
                KubeError::Api {
                    code: status.code,
                    reason: status.reason,
                    message: status.message,
                }
            }
        }
        // Connection refused/reset, TLS and timeouts surface as hyper or tower service errors.
        e @ (kube::Error::HyperError(_) | kube::Error::Service(_)) => KubeError::Client {
            message: format!("{}: {e}", op.describe()),
            retryable: true,
        },
        e => KubeError::Client {
            message: format!("{}: {e}", op.describe()),
            retryable: false,
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Pure helpers: views of the objects, template comparison, plans and patch bodies
// ---------------------------------------------------------------------------------------------

/// The parts of a Service we use.
#[derive(Debug, Clone, PartialEq)]
struct ServiceView {
    name: String,
    resource_version: String,
    selector: BTreeMap<String, String>,
}

impl ServiceView {
    fn from_service(svc: &Service) -> Self {
        Self {
            name: svc.metadata.name.clone().unwrap_or_default(),
            resource_version: svc.metadata.resource_version.clone().unwrap_or_default(),
            selector: svc.spec.as_ref().and_then(|s| s.selector.clone()).unwrap_or_default(),
        }
    }
}

/// The parts of a Deployment a rollout undo uses. Templates stay raw JSON so that fields this
/// build of k8s-openapi does not know survive the round trip (a dropped field would make the
/// restored template differ from the ReplicaSet's, and the controller would create a new one).
#[derive(Debug, Clone, PartialEq)]
struct DeploymentView {
    name: String,
    uid: String,
    resource_version: String,
    generation: Option<i64>,
    annotations: BTreeMap<String, String>,
    paused: bool,
    selector: String,
    template: Value,
}

impl DeploymentView {
    fn parse(obj: &DynamicObject) -> Result<Self, KubeError> {
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
        Ok(Self {
            uid: obj.metadata.uid.clone().unwrap_or_default(),
            resource_version: obj.metadata.resource_version.clone().unwrap_or_default(),
            generation: obj.metadata.generation,
            annotations: obj.metadata.annotations.clone().unwrap_or_default(),
            paused: spec
                .and_then(|s| s.get("paused"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            selector,
            template,
            name,
        })
    }
}

/// The parts of a ReplicaSet a rollout undo uses.
#[derive(Debug, Clone, PartialEq)]
struct RsView {
    name: String,
    /// `None` when the annotation is missing or not a number (kubectl skips those).
    revision: Option<u64>,
    /// uid of the controller owner reference, if any.
    controller_uid: Option<String>,
    annotations: BTreeMap<String, String>,
    template: Value,
    replicas: i64,
    ready: i64,
}

impl RsView {
    fn parse(obj: &DynamicObject) -> Self {
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
            annotations,
        }
    }
}

/// The scale subresource's replicas.
#[derive(Debug, Clone, PartialEq)]
struct ScaleView {
    deployment: String,
    resource_version: String,
    replicas: i32,
}

impl ScaleView {
    fn from_scale(deployment: &str, s: &Scale) -> Self {
        Self {
            deployment: deployment.to_string(),
            resource_version: s.metadata.resource_version.clone().unwrap_or_default(),
            replicas: s.spec.as_ref().and_then(|sp| sp.replicas).unwrap_or(0),
        }
    }
}

/// Everything a step needs to decide what to write.
#[derive(Debug, Clone)]
enum Current {
    Service(ServiceView),
    Undo(DeploymentView, Vec<RsView>),
    Scale(ScaleView),
}

impl Current {
    fn resource_version(&self) -> &str {
        match self {
            Current::Service(s) => &s.resource_version,
            Current::Undo(d, _) => &d.resource_version,
            Current::Scale(s) => &s.resource_version,
        }
    }

    fn state(&self) -> ObjectState {
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

fn deployment_state(d: &DeploymentView, rses: &[RsView]) -> ObjectState {
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
fn template_summary(template: &Value) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
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
fn label_selector_string(sel: &Value) -> Result<String, String> {
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
fn equality_selector(sel: &BTreeMap<String, String>) -> String {
    sel.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The template without the `pod-template-hash` label (what kubectl writes back).
fn strip_hash(template: &Value) -> Value {
    let mut t = template.clone();
    if let Some(labels) = t.pointer_mut("/metadata/labels").and_then(Value::as_object_mut) {
        labels.remove(POD_TEMPLATE_HASH_LABEL);
    }
    t
}

/// Drops nulls and empty maps/lists recursively: the API machinery's semantic equality treats
/// nil and empty alike, and clients differ in which they send.
fn normalize(v: &Value) -> Option<Value> {
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
fn templates_equal(a: &Value, b: &Value) -> bool {
    normalize(&strip_hash(a)) == normalize(&strip_hash(b))
}

/// ReplicaSets whose controller is this Deployment (the label selector alone can match
/// ReplicaSets of another Deployment or orphans).
fn owned<'a>(d: &'a DeploymentView, rses: &'a [RsView]) -> impl Iterator<Item = &'a RsView> + 'a {
    rses.iter()
        .filter(move |rs| !d.uid.is_empty() && rs.controller_uid.as_deref() == Some(d.uid.as_str()))
}

/// kubectl's choice of ReplicaSet: `None`/`Some(0)` the second-highest revision, else exact.
fn select_replica_set<'a>(
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
fn merge_annotations(
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
struct UndoMarker {
    /// ReplicaSet whose template was restored (names survive revision renumbering).
    to_replica_set: String,
    /// Its revision at the time.
    to_revision: u64,
    /// The Deployment's revision we rolled back from.
    from_revision: Option<String>,
    /// The step's `to_revision` (`None` for "previous"): a different request is not done.
    #[serde(default)]
    requested: Option<u64>,
}

/// JSON patch replacing the Service selector as a whole, guarded by resourceVersion. `add`
/// rather than `replace` because it also works when the selector is absent.
fn selector_patch(resource_version: &str, selector: &BTreeMap<String, String>) -> Value {
    json!([
        {"op": "test", "path": "/metadata/resourceVersion", "value": resource_version},
        {"op": "add", "path": "/spec/selector", "value": selector},
    ])
}

/// kubectl's rollout-undo patch plus a resourceVersion `test`, which kubectl does not send.
fn undo_patch(resource_version: &str, template: &Value, annotations: &BTreeMap<String, String>) -> Value {
    json!([
        {"op": "test", "path": "/metadata/resourceVersion", "value": resource_version},
        {"op": "replace", "path": "/spec/template", "value": template},
        {"op": "add", "path": "/metadata/annotations", "value": annotations},
    ])
}

/// Merge patch for the scale subresource; the resourceVersion makes it conditional (409 if
/// the Deployment changed since we read it).
fn scale_patch(resource_version: &str, replicas: i32) -> Value {
    json!({"metadata": {"resourceVersion": resource_version}, "spec": {"replicas": replicas}})
}

/// What a step's pre-check looks at.
#[derive(Debug, Clone, PartialEq)]
enum PreCheckNeed {
    /// Not a traffic-shifting step.
    None,
    /// Pods behind the Service's new selector must be Ready.
    Pods {
        service: String,
        selector: BTreeMap<String, String>,
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
struct WritePlan {
    content_type: &'static str,
    patch: Value,
    would_write: ObjectState,
    precheck: PreCheckNeed,
}

/// What a step needs, decided from what was read.
#[derive(Debug, Clone, PartialEq)]
enum Plan {
    Done { reason: String },
    Write(Box<WritePlan>),
}

fn plan_step(step: &KubeStep, current: &Current) -> Result<Plan, KubeError> {
    match (step, current) {
        (KubeStep::SwitchService { service, selector }, Current::Service(s)) => {
            if &s.selector == selector {
                return Ok(Plan::Done {
                    reason: format!("service {service} already selects {}", equality_selector(selector)),
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
                },
            })))
        }
        (KubeStep::RolloutUndo { to_revision, .. }, Current::Undo(d, rses)) => plan_rollout_undo(d, rses, *to_revision),
        (KubeStep::Scale { deployment, replicas }, Current::Scale(s)) => {
            let want = i32::try_from(*replicas).unwrap_or(i32::MAX);
            if s.replicas == want {
                return Ok(Plan::Done {
                    reason: format!("deployment {deployment} already has {want} replica(s)"),
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

/// `kubectl rollout undo` as a plan (the module docs list where it differs from kubectl).
fn plan_rollout_undo(d: &DeploymentView, rses: &[RsView], to_revision: Option<u64>) -> Result<Plan, KubeError> {
    // kubectl treats 0 as "previous", like no revision at all.
    let requested = to_revision.filter(|&r| r != 0);
    if d.paused {
        return Err(KubeError::Paused {
            deployment: d.name.clone(),
        });
    }
    // An earlier run (ours) already restored a ReplicaSet that is still in effect: done, even
    // though "the previous revision" now points at the canary again.
    if let Some(marker) = d
        .annotations
        .get(UNDO_MARKER_ANNOTATION)
        .and_then(|m| serde_json::from_str::<UndoMarker>(m).ok())
    {
        let same_request = marker.requested == requested;
        if let Some(rs) = owned(d, rses).find(|rs| same_request && rs.name == marker.to_replica_set) {
            if templates_equal(&rs.template, &d.template) {
                return Ok(Plan::Done {
                    reason: format!(
                        "already rolled back to replicaset {} (revision {} then) by an earlier run; \
                         its template is still current",
                        rs.name, marker.to_revision
                    ),
                });
            }
        }
    }
    let target = select_replica_set(d, rses, to_revision)?;
    let revision = target.revision.unwrap_or_default();
    if templates_equal(&target.template, &d.template) {
        return Ok(Plan::Done {
            reason: format!(
                "current template already matches revision {revision} (replicaset {})",
                target.name
            ),
        });
    }
    let template = strip_hash(&target.template);
    let mut annotations = merge_annotations(&d.annotations, &target.annotations);
    let marker = UndoMarker {
        to_replica_set: target.name.clone(),
        to_revision: revision,
        from_revision: d.annotations.get(REVISION_ANNOTATION).cloned(),
        requested,
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

fn pod_is_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Ready endpoints (ready unset counts as ready, as the API documents) whose target is one of
/// `pods`.
fn ready_endpoints(slices: &[EndpointSlice], pods: &BTreeSet<String>) -> u32 {
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

fn object_name(step: &KubeStep) -> String {
    match step {
        KubeStep::SwitchService { service, .. } => format!("service/{service}"),
        KubeStep::RolloutUndo { deployment, .. } => format!("deployment/{deployment}"),
        KubeStep::Scale { deployment, .. } => format!("deployment/{deployment}/scale"),
    }
}

/// Which stored object a step writes (the scale subresource is the Deployment).
fn object_key(step: &KubeStep) -> String {
    match step {
        KubeStep::SwitchService { service, .. } => format!("service/{service}"),
        KubeStep::RolloutUndo { deployment, .. } | KubeStep::Scale { deployment, .. } => {
            format!("deployment/{deployment}")
        }
    }
}

fn step_kind(step: &KubeStep) -> (&'static str, &str) {
    match step {
        KubeStep::SwitchService { service, .. } => ("Service", service),
        KubeStep::RolloutUndo { deployment, .. } | KubeStep::Scale { deployment, .. } => ("Deployment", deployment),
    }
}

fn clamp_u32(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

/// A tenth of the timeout, within [50 ms, 2 s].
fn poll_interval(timeout: Duration) -> Duration {
    (timeout / 10).clamp(MIN_POLL, MAX_POLL)
}

// ---------------------------------------------------------------------------------------------
// Executor
// ---------------------------------------------------------------------------------------------

/// Executes Kubernetes reverts and verifications with one client.
#[derive(Clone)]
pub struct KubeExecutor {
    client: kube::Client,
    field_manager: String,
    max_conflict_retries: u32,
    retry: RetryPolicy,
}

impl std::fmt::Debug for KubeExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeExecutor")
            .field("field_manager", &self.field_manager)
            .field("max_conflict_retries", &self.max_conflict_retries)
            .finish_non_exhaustive()
    }
}

type OnStep<'a> = &'a mut (dyn FnMut(KubeStepRecord) + Send);

impl KubeExecutor {
    /// Builds the client from the settings: `in_cluster` (service account only), or the given
    /// kubeconfig file and/or context, or else inference (kubeconfig first, then in-cluster).
    /// Installs the ring crypto provider first (see `crate::tls`).
    pub async fn from_settings(s: &KubeSettings) -> Result<Self, KubeError> {
        crate::tls::install_crypto_provider();
        let mut config = load_config(s).await?;
        // kube's own retry layer resends 429/503/504 up to 15 times with delays growing into
        // minutes, invisibly; we retry a few times ourselves and report every attempt.
        config.default_retry = false;
        let client = kube::Client::try_from(config).map_err(|e| KubeError::Config {
            message: format!("building the client: {e}"),
        })?;
        Ok(Self::new(client, s))
    }

    /// Wraps an existing client (tests pass a mock or a client of the fake API server).
    pub fn new(client: kube::Client, s: &KubeSettings) -> Self {
        Self {
            client,
            field_manager: if s.field_manager.is_empty() {
                KubeSettings::default().field_manager
            } else {
                s.field_manager.clone()
            },
            max_conflict_retries: s.max_conflict_retries,
            retry: RetryPolicy::new(s.retry_window, Duration::from_millis(s.initial_backoff_ms), None),
        }
    }

    /// Runs the steps in order. First every step's object is read and its write planned
    /// (nothing is written if any read fails, a Deployment is paused or a revision is
    /// missing); then every traffic-shifting step that needs a write is pre-checked
    /// (`SwitchService`: at least `min_ready_replicas` Ready pods match the new selector, else
    /// [`KubeError::PreCheckFailed`] with nothing written; `RolloutUndo`: the restored
    /// ReplicaSet's readiness is recorded but does not block, because the controller scales it
    /// up and keeps the current pods until the restored ones are Ready); then each step is
    /// written with a resourceVersion precondition (conflicts: re-read, re-plan, retry up to
    /// `max_conflict_retries` times) and read back. Steps already in the wanted state are
    /// reported as done, which makes a second call after a partial run finish the work.
    /// Dry run: reads, pre-checks, and sends each patch with `dryRun=All` so the server
    /// validates it (RBAC, admission, schema) without persisting anything.
    pub async fn revert(
        &self,
        t: &KubernetesTarget,
        dry_run: bool,
        on_step: &mut (dyn FnMut(KubeStepRecord) + Send),
    ) -> Result<KubeOutcome, KubeError> {
        self.revert_gated(t, dry_run, on_step, &super::retry::no_gate).await
    }

    /// [`KubeExecutor::revert`], awaiting `before_write` after each patch is planned (and
    /// reported) and before it is sent (not in a dry run).
    pub async fn revert_gated(
        &self,
        t: &KubernetesTarget,
        dry_run: bool,
        on_step: &mut (dyn FnMut(KubeStepRecord) + Send),
        before_write: BeforeWrite<'_>,
    ) -> Result<KubeOutcome, KubeError> {
        t.validate().map_err(|message| KubeError::InvalidTarget { message })?;
        let ns = t.namespace.as_str();

        let mut planned: Vec<(Current, Plan)> = Vec::with_capacity(t.steps.len());
        for (index, step) in t.steps.iter().enumerate() {
            let current = self.read_step(ns, step, on_step).await?;
            on_step(KubeStepRecord::Read {
                index,
                state: current.state(),
            });
            let plan = plan_step(step, &current)?;
            if let Plan::Done { reason } = &plan {
                on_step(KubeStepRecord::AlreadyDone {
                    index,
                    state: current.state(),
                    reason: reason.clone(),
                });
            }
            planned.push((current, plan));
        }

        for (index, (_, plan)) in planned.iter().enumerate() {
            if let Plan::Write(w) = plan {
                self.precheck(ns, index, &w.precheck, t.min_ready_replicas, on_step)
                    .await?;
            }
        }

        // GitOps (action::gitops): Argo CD / Flux must not sync the release back; before any write.
        let gitops = match &t.gitops {
            Some(g) => Some(self.suspend_gitops(g, dry_run, on_step, before_write).await?),
            None => None,
        };

        let mut touched: HashSet<String> = HashSet::new();
        let mut steps = Vec::with_capacity(t.steps.len());
        for (index, (step, (current, plan))) in t.steps.iter().zip(planned).enumerate() {
            let result = match plan {
                Plan::Done { reason } => StepResult::AlreadyDone {
                    state: current.state(),
                    reason,
                },
                Plan::Write(_) => {
                    let key = object_key(step);
                    // An earlier step of this run wrote the same object (undo, then scale):
                    // read it again rather than spend a conflict retry on a known-stale version.
                    let current = if touched.contains(&key) {
                        let fresh = self.read_step(ns, step, on_step).await?;
                        on_step(KubeStepRecord::Read {
                            index,
                            state: fresh.state(),
                        });
                        fresh
                    } else {
                        current
                    };
                    let result = self
                        .execute_step(ns, index, step, current, dry_run, on_step, before_write)
                        .await?;
                    if matches!(result, StepResult::Changed { .. }) {
                        touched.insert(key);
                    }
                    result
                }
            };
            steps.push(StepOutcome {
                index,
                step: step.clone(),
                result,
            });
        }
        let changed = steps.iter().any(|s| matches!(s.result, StepResult::Changed { .. }));
        Ok(KubeOutcome {
            changed,
            dry_run,
            steps,
            gitops,
        })
    }

    /// Verification after a revert, polling until `t.rollout_timeout` (one deadline for the
    /// whole target): every switched Service has at least `min_ready_replicas` ready endpoints (EndpointSlices
    /// labelled `kubernetes.io/service-name`) backed by a pod of the new selector, else
    /// [`KubeError::NoReadyEndpoints`]; every undone Deployment completes its rollout
    /// (observedGeneration >= generation, updated == desired, no old replicas left, all
    /// updated available), else [`KubeError::RolloutTimedOut`], early on
    /// ProgressDeadlineExceeded; every scaled Deployment has exactly its replicas, all available,
    /// else [`KubeError::RolloutTimedOut`]. Drift is the read-back's
    /// (`read_back_sample`), sampled through the whole bake.
    pub async fn verify(
        &self,
        t: &KubernetesTarget,
        on_step: &mut (dyn FnMut(KubeStepRecord) + Send),
    ) -> Result<(), KubeError> {
        t.validate().map_err(|message| KubeError::InvalidTarget { message })?;
        let ns = t.namespace.as_str();
        let started = Instant::now();
        let deadline = started + t.rollout_timeout;
        let interval = poll_interval(t.rollout_timeout);
        for step in &t.steps {
            match step {
                KubeStep::SwitchService { service, selector } => {
                    let within = Window {
                        started,
                        deadline,
                        interval,
                    };
                    self.wait_for_endpoints(ns, service, selector, t.min_ready_replicas, within, on_step)
                        .await?;
                }
                KubeStep::RolloutUndo { deployment, .. } => {
                    self.wait_for_rollout(ns, deployment, None, t.rollout_timeout, deadline, interval, on_step)
                        .await?;
                }
                // The controller saw the new replicas, and exactly that many pods are left,
                // all available (scaling the canary to 0: its pods are gone).
                KubeStep::Scale { deployment, replicas } => {
                    let want = i32::try_from(*replicas).unwrap_or(i32::MAX);
                    self.wait_for_rollout(
                        ns,
                        deployment,
                        Some(want),
                        t.rollout_timeout,
                        deadline,
                        interval,
                        on_step,
                    )
                    .await?;
                }
            }
        }
        Ok(())
    }

    /// One API call with a time limit per attempt, retried within the shared retry policy's
    /// window while it fails transiently; every failed attempt is recorded.
    async fn call<T, F, Fut>(&self, op: Op<'_>, on_step: OnStep<'_>, mut f: F) -> Result<T, KubeError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        let call = op.describe();
        let mut on_attempt = |a: Attempt| on_step(KubeStepRecord::AttemptFailed(a));
        self.retry
            .run(&call, &mut on_attempt, || {
                let fut = f();
                async move {
                    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
                        Ok(r) => r.map_err(|e| classify(e, &op)),
                        Err(_) => Err(KubeError::Client {
                            message: format!("{}: no answer within {}s", op.describe(), CALL_TIMEOUT.as_secs()),
                            retryable: true,
                        }),
                    }
                }
            })
            .await
    }

    fn dynamic_api<K>(&self, ns: &str) -> Api<DynamicObject>
    where
        K: kube::Resource<DynamicType = ()>,
    {
        Api::namespaced_with(self.client.clone(), ns, &ApiResource::erase::<K>(&()))
    }

    /// Reads what a step needs: the Service; the Deployment and its ReplicaSets; the scale.
    async fn read_step(&self, ns: &str, step: &KubeStep, on_step: OnStep<'_>) -> Result<Current, KubeError> {
        match step {
            KubeStep::SwitchService { service, .. } => {
                let api: Api<Service> = Api::namespaced(self.client.clone(), ns);
                let op = Op {
                    verb: "get",
                    kind: "Service",
                    api_group: "",
                    resource: "services",
                    namespace: ns,
                    name: service,
                };
                let svc = self.call(op, on_step, || api.get(service)).await?;
                Ok(Current::Service(ServiceView::from_service(&svc)))
            }
            KubeStep::RolloutUndo { deployment, .. } => {
                let api = self.dynamic_api::<Deployment>(ns);
                let op = Op {
                    verb: "get",
                    kind: "Deployment",
                    api_group: "apps",
                    resource: "deployments",
                    namespace: ns,
                    name: deployment,
                };
                let obj = self.call(op, on_step, || api.get(deployment)).await?;
                let d = DeploymentView::parse(&obj)?;
                let rs_api = self.dynamic_api::<ReplicaSet>(ns);
                let lp = ListParams::default().labels(&d.selector);
                let op = Op {
                    verb: "list",
                    kind: "ReplicaSet",
                    api_group: "apps",
                    resource: "replicasets",
                    namespace: ns,
                    name: "",
                };
                let list = self.call(op, on_step, || rs_api.list(&lp)).await?;
                let rses = list.items.iter().map(RsView::parse).collect();
                Ok(Current::Undo(d, rses))
            }
            KubeStep::Scale { deployment, .. } => {
                let api: Api<Deployment> = Api::namespaced(self.client.clone(), ns);
                let op = Op {
                    verb: "get",
                    kind: "Deployment",
                    api_group: "apps",
                    resource: "deployments/scale",
                    namespace: ns,
                    name: deployment,
                };
                let scale = self.call(op, on_step, || api.get_scale(deployment)).await?;
                Ok(Current::Scale(ScaleView::from_scale(deployment, &scale)))
            }
        }
    }

    async fn precheck(
        &self,
        ns: &str,
        index: usize,
        need: &PreCheckNeed,
        required: u32,
        on_step: OnStep<'_>,
    ) -> Result<(), KubeError> {
        match need {
            PreCheckNeed::None => Ok(()),
            PreCheckNeed::Pods { service, selector } => {
                let sel = equality_selector(selector);
                let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
                let lp = ListParams::default().labels(&sel);
                let op = Op {
                    verb: "list",
                    kind: "Pod",
                    api_group: "",
                    resource: "pods",
                    namespace: ns,
                    name: "",
                };
                let pods = self.call(op, on_step, || api.list(&lp)).await?;
                let matching = u32::try_from(pods.items.len()).unwrap_or(u32::MAX);
                let ready = u32::try_from(pods.items.iter().filter(|p| pod_is_ready(p)).count()).unwrap_or(u32::MAX);
                let passed = ready >= required;
                on_step(KubeStepRecord::PreCheck {
                    index,
                    object: format!("service/{service}"),
                    selector: sel.clone(),
                    matching,
                    ready,
                    required,
                    passed,
                    note: None,
                });
                if passed {
                    Ok(())
                } else {
                    Err(KubeError::PreCheckFailed {
                        service: service.clone(),
                        namespace: ns.to_string(),
                        selector: sel,
                        matching,
                        ready,
                        required,
                    })
                }
            }
            PreCheckNeed::ReplicaSet {
                name,
                revision,
                replicas,
                ready,
            } => {
                // Decided: recorded, never blocking. After a completed rollout the ReplicaSet
                // to restore is normally at 0 replicas, so demanding ready pods would refuse
                // every ordinary undo. The controller scales it up within the rolling-update
                // budget and a Service only routes to Ready pods, so the current pods keep
                // serving meanwhile (a Recreate strategy has a gap either way); verify() is
                // what tells whether the restored version came up.
                let ready_n = clamp_u32(*ready);
                let note = (ready_n < required).then(|| {
                    format!(
                        "replicaset {name} has {ready_n} ready replica(s); the Deployment controller scales it up \
                         after the undo, and verify() waits for the rollout to complete"
                    )
                });
                on_step(KubeStepRecord::PreCheck {
                    index,
                    object: format!("replicaset/{name}"),
                    selector: format!("revision {revision}"),
                    matching: clamp_u32(*replicas),
                    ready: ready_n,
                    required,
                    passed: true,
                    note,
                });
                Ok(())
            }
        }
    }

    /// Writes one step with optimistic concurrency: a 409, or a 422 while the object's
    /// resourceVersion moved (our `test` op failed), means someone wrote in between: re-read,
    /// re-plan (it may be done now) and try again, at most `max_conflict_retries` times.
    #[allow(clippy::too_many_arguments)]
    async fn execute_step(
        &self,
        ns: &str,
        index: usize,
        step: &KubeStep,
        mut current: Current,
        dry_run: bool,
        on_step: OnStep<'_>,
        before_write: BeforeWrite<'_>,
    ) -> Result<StepResult, KubeError> {
        let object = object_name(step);
        let before = current.state();
        let max_attempts = self.max_conflict_retries.saturating_add(1);
        let mut attempt = 1u32;
        loop {
            let plan = match plan_step(step, &current)? {
                Plan::Write(w) => w,
                Plan::Done { reason } => {
                    let state = current.state();
                    on_step(KubeStepRecord::AlreadyDone {
                        index,
                        state: state.clone(),
                        reason: reason.clone(),
                    });
                    // Found done after a conflict: by someone else, or by our own attempt
                    // whose answer was lost. Either way the object changed during this run.
                    return Ok(if attempt == 1 || dry_run {
                        StepResult::AlreadyDone { state, reason }
                    } else {
                        StepResult::Changed { before, after: state }
                    });
                }
            };
            on_step(KubeStepRecord::Planned {
                index,
                object: object.clone(),
                dry_run,
                content_type: plan.content_type.to_string(),
                patch: plan.patch.clone(),
                would_write: plan.would_write.clone(),
            });
            let tested = current.resource_version().to_string();
            if !dry_run {
                before_write().await;
            }
            let err = match self.write(ns, step, &current, &plan, dry_run, on_step).await {
                Ok(written) => {
                    on_step(KubeStepRecord::Patched {
                        index,
                        object: object.clone(),
                        attempt,
                        dry_run,
                        resource_version: written.resource_version().to_string(),
                    });
                    if dry_run {
                        return Ok(StepResult::DryRun {
                            before,
                            would_write: written,
                        });
                    }
                    tracing::info!(object = %object, namespace = ns, attempt, "kubernetes revert step written");
                    let reread = self.read_step(ns, step, on_step).await?;
                    let after = reread.state();
                    let matches = matches!(plan_step(step, &reread), Ok(Plan::Done { .. }));
                    on_step(KubeStepRecord::ReadBack {
                        index,
                        state: after.clone(),
                        matches,
                    });
                    if !matches {
                        return Err(KubeError::ReadBackMismatch {
                            object,
                            expected: serde_json::to_string(&plan.would_write).unwrap_or_default(),
                            got: serde_json::to_string(&after).unwrap_or_default(),
                        });
                    }
                    return Ok(StepResult::Changed { before, after });
                }
                Err(e) => e,
            };
            let maybe_stale = matches!(err, KubeError::Conflict { .. } | KubeError::Api { code: 422, .. });
            if !maybe_stale {
                return Err(err);
            }
            let reread = self.read_step(ns, step, on_step).await?;
            if matches!(err, KubeError::Api { .. }) && reread.resource_version() == tested {
                // 422 with an unchanged object: the patch itself is invalid, not stale.
                return Err(err);
            }
            let will_retry = attempt < max_attempts;
            tracing::warn!(object = %object, namespace = ns, attempt, will_retry, error = %err, "kubernetes write lost a resourceVersion race");
            on_step(KubeStepRecord::ConflictRetry {
                index,
                object: object.clone(),
                attempt,
                code: err.code().to_string(),
                message: err.to_string(),
                will_retry,
            });
            if !will_retry {
                let (kind, name) = step_kind(step);
                return Err(KubeError::Conflict {
                    kind: kind.to_string(),
                    namespace: ns.to_string(),
                    name: name.to_string(),
                    attempts: attempt,
                    message: err.to_string(),
                });
            }
            on_step(KubeStepRecord::Read {
                index,
                state: reread.state(),
            });
            current = reread;
            attempt += 1;
        }
    }

    /// Sends a step's patch; returns the object as the server answered (the would-be object
    /// for a dry run).
    async fn write(
        &self,
        ns: &str,
        step: &KubeStep,
        current: &Current,
        plan: &WritePlan,
        dry_run: bool,
        on_step: OnStep<'_>,
    ) -> Result<ObjectState, KubeError> {
        let pp = PatchParams {
            dry_run,
            field_manager: Some(self.field_manager.clone()),
            ..PatchParams::default()
        };
        let json_patch = || -> Result<Patch<()>, KubeError> {
            serde_json::from_value::<json_patch::Patch>(plan.patch.clone())
                .map(Patch::Json)
                .map_err(|e| KubeError::internal(format!("building the JSON patch: {e}")))
        };
        match (step, current) {
            (KubeStep::SwitchService { service, .. }, Current::Service(_)) => {
                let api: Api<Service> = Api::namespaced(self.client.clone(), ns);
                let patch = json_patch()?;
                let op = Op {
                    verb: "patch",
                    kind: "Service",
                    api_group: "",
                    resource: "services",
                    namespace: ns,
                    name: service,
                };
                let svc = self.call(op, on_step, || api.patch(service, &pp, &patch)).await?;
                Ok(Current::Service(ServiceView::from_service(&svc)).state())
            }
            (KubeStep::RolloutUndo { deployment, .. }, Current::Undo(_, rses)) => {
                let api = self.dynamic_api::<Deployment>(ns);
                let patch = json_patch()?;
                let op = Op {
                    verb: "patch",
                    kind: "Deployment",
                    api_group: "apps",
                    resource: "deployments",
                    namespace: ns,
                    name: deployment,
                };
                let obj = self.call(op, on_step, || api.patch(deployment, &pp, &patch)).await?;
                Ok(deployment_state(&DeploymentView::parse(&obj)?, rses))
            }
            (KubeStep::Scale { deployment, .. }, Current::Scale(_)) => {
                // An HPA targeting this Deployment will fight a manual replica count (it
                // leaves a Deployment at 0 alone, but resets any other value to its range).
                let api: Api<Deployment> = Api::namespaced(self.client.clone(), ns);
                let patch = Patch::Merge(plan.patch.clone());
                let op = Op {
                    verb: "patch",
                    kind: "Deployment",
                    api_group: "apps",
                    resource: "deployments/scale",
                    namespace: ns,
                    name: deployment,
                };
                let scale = self
                    .call(op, on_step, || api.patch_scale(deployment, &pp, &patch))
                    .await?;
                Ok(Current::Scale(ScaleView::from_scale(deployment, &scale)).state())
            }
            _ => Err(KubeError::internal("step and object read do not match")),
        }
    }

    /// Waits for at least `min_ready_replicas` (at least one) ready endpoints of the new
    /// selector's pods behind the Service.
    async fn wait_for_endpoints(
        &self,
        ns: &str,
        service: &str,
        selector: &BTreeMap<String, String>,
        min_ready_replicas: u32,
        within: Window,
        on_step: OnStep<'_>,
    ) -> Result<(), KubeError> {
        let Window {
            started,
            deadline,
            interval,
        } = within;
        let required = min_ready_replicas.max(1);
        let sel = equality_selector(selector);
        let pods_api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let slices_api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), ns);
        let pods_lp = ListParams::default().labels(&sel);
        let slices_lp = ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}={service}"));
        let mut last: Option<(u32, u32)> = None;
        loop {
            let op = Op {
                verb: "list",
                kind: "Pod",
                api_group: "",
                resource: "pods",
                namespace: ns,
                name: "",
            };
            let pods = self.call(op, on_step, || pods_api.list(&pods_lp)).await?;
            let names: BTreeSet<String> = pods.items.iter().filter_map(|p| p.metadata.name.clone()).collect();
            let op = Op {
                verb: "list",
                kind: "EndpointSlice",
                api_group: "discovery.k8s.io",
                resource: "endpointslices",
                namespace: ns,
                name: "",
            };
            let slices = self.call(op, on_step, || slices_api.list(&slices_lp)).await?;
            let ready = ready_endpoints(&slices.items, &names);
            let matching = u32::try_from(names.len()).unwrap_or(u32::MAX);
            let passed = ready >= required;
            if last != Some((matching, ready)) || passed {
                on_step(KubeStepRecord::Endpoints {
                    service: service.to_string(),
                    selector: sel.clone(),
                    matching_pods: matching,
                    ready_endpoints: ready,
                    passed,
                });
                last = Some((matching, ready));
            }
            if passed {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(KubeError::NoReadyEndpoints {
                    service: service.to_string(),
                    selector: sel,
                    waited_secs: now.duration_since(started).as_secs(),
                    ready,
                    required,
                });
            }
            tokio::time::sleep(interval.min(deadline - now)).await;
        }
    }

    /// Waits for the Deployment's rollout to complete and, for a scale step, for exactly
    /// `replicas` pods, all available.
    #[allow(clippy::too_many_arguments)]
    async fn wait_for_rollout(
        &self,
        ns: &str,
        deployment: &str,
        replicas: Option<i32>,
        timeout: Duration,
        deadline: Instant,
        interval: Duration,
        on_step: OnStep<'_>,
    ) -> Result<(), KubeError> {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), ns);
        let mut last: Option<RolloutProgress> = None;
        loop {
            let op = Op {
                verb: "get",
                kind: "Deployment",
                api_group: "apps",
                resource: "deployments",
                namespace: ns,
                name: deployment,
            };
            let d = self.call(op, on_step, || api.get(deployment)).await?;
            let mut progress = rollout_progress(&d);
            if let Some(n) = replicas.filter(|_| progress.complete) {
                if progress.replicas != n || progress.available < n {
                    progress.complete = false;
                    progress.message = format!(
                        "scaled to {n}: {} replicas left, {} available",
                        progress.replicas, progress.available
                    );
                }
            }
            if last.as_ref() != Some(&progress) {
                on_step(KubeStepRecord::Rollout {
                    deployment: deployment.to_string(),
                    progress: progress.clone(),
                });
            }
            if progress.complete {
                return Ok(());
            }
            let now = Instant::now();
            if progress.deadline_exceeded || now >= deadline {
                return Err(KubeError::RolloutTimedOut {
                    deployment: deployment.to_string(),
                    timeout_secs: timeout.as_secs(),
                    progress_deadline_exceeded: progress.deadline_exceeded,
                    last_status: progress.message,
                });
            }
            last = Some(progress);
            tokio::time::sleep(interval.min(deadline - now)).await;
        }
    }
}

// GitOps hook: action::gitops makes its calls through this executor's client, retries and
// error classification.
impl KubeExecutor {
    /// GET, or merge PATCH (with the field manager, `dryRun=All` in a dry run), of the GitOps
    /// owner object; the object comes back as JSON.
    pub(super) async fn gitops_call(
        &self,
        c: super::gitops::Call<'_>,
        on_step: OnStep<'_>,
    ) -> Result<Value, KubeError> {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), c.owner.namespace(), &c.owner.api_resource());
        let op = Op {
            verb: if c.patch.is_some() { "patch" } else { "get" },
            kind: c.owner.kind(),
            api_group: c.owner.group(),
            resource: c.owner.resource(),
            namespace: c.owner.namespace(),
            name: c.owner.name(),
        };
        let name = c.owner.name();
        let obj = match c.patch {
            None => self.call(op, on_step, || api.get(name)).await?,
            Some(body) => {
                let pp = PatchParams {
                    dry_run: c.dry_run,
                    field_manager: Some(self.field_manager.clone()),
                    ..PatchParams::default()
                };
                let patch = Patch::Merge(body);
                self.call(op, on_step, || api.patch(name, &pp, &patch)).await?
            }
        };
        serde_json::to_value(&obj).map_err(|e| KubeError::internal(format!("{}: {e}", op.describe())))
    }

    /// Re-reads after a lost resourceVersion race, as for the revert's own writes.
    pub(super) fn max_conflict_retries(&self) -> u32 {
        self.max_conflict_retries
    }
}

/// When a verification wait started, when it must end, and how often it polls.
#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    deadline: Instant,
    interval: Duration,
}

/// The client configuration the settings ask for.
async fn load_config(s: &KubeSettings) -> Result<kube::Config, KubeError> {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let options = KubeConfigOptions {
        context: s.context.clone(),
        ..KubeConfigOptions::default()
    };
    let err = |what: &str, e: &dyn std::fmt::Display| KubeError::Config {
        message: format!("{what}: {e}"),
    };
    if s.in_cluster {
        if s.kubeconfig.is_some() || s.context.is_some() {
            return Err(KubeError::Config {
                message: "in_cluster: true cannot be combined with kubeconfig or context; set one or the other".into(),
            });
        }
        return kube::Config::incluster().map_err(|e| err("in-cluster configuration", &e));
    }
    if let Some(path) = &s.kubeconfig {
        let kc = Kubeconfig::read_from(path).map_err(|e| err(&format!("reading {}", path.display()), &e))?;
        return kube::Config::from_custom_kubeconfig(kc, &options)
            .await
            .map_err(|e| err(&format!("kubeconfig {}", path.display()), &e));
    }
    if s.context.is_some() {
        return kube::Config::from_kubeconfig(&options)
            .await
            .map_err(|e| err("kubeconfig", &e));
    }
    kube::Config::infer()
        .await
        .map_err(|e| err("no kubeconfig and no in-cluster service account", &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "uid-1";

    fn tpl(version: &str, hash: Option<&str>) -> Value {
        let mut labels = json!({"app": "web", "version": version});
        if let Some(h) = hash {
            labels[POD_TEMPLATE_HASH_LABEL] = json!(h);
        }
        json!({"metadata": {"labels": labels},
               "spec": {"containers": [{"name": "web", "image": format!("web:{version}")}],
                        "initContainers": [{"name": "migrate", "image": "migrate:1"}]}})
    }

    fn deploy(version: &str) -> DeploymentView {
        DeploymentView {
            name: "web".into(),
            uid: UID.into(),
            resource_version: "42".into(),
            generation: Some(5),
            annotations: [
                (REVISION_ANNOTATION.to_string(), "3".to_string()),
                ("team".to_string(), "portal".to_string()),
            ]
            .into(),
            paused: false,
            selector: "app=web".into(),
            template: tpl(version, None),
        }
    }

    fn rs(name: &str, version: &str, revision: Option<u64>, owner: Option<&str>) -> RsView {
        RsView {
            name: name.into(),
            revision,
            controller_uid: owner.map(str::to_string),
            annotations: [
                (
                    REVISION_ANNOTATION.to_string(),
                    revision.unwrap_or_default().to_string(),
                ),
                ("deployment.kubernetes.io/desired-replicas".to_string(), "3".to_string()),
                ("kubernetes.io/change-cause".to_string(), format!("deploy {version}")),
            ]
            .into(),
            template: tpl(version, Some(&format!("h-{name}"))),
            replicas: 0,
            ready: 0,
        }
    }

    fn history() -> Vec<RsView> {
        vec![
            rs("web-1", "v1", Some(1), Some(UID)),
            rs("web-2", "v2", Some(2), Some(UID)),
            rs("web-3", "v3", Some(3), Some(UID)),
            rs("other-9", "evil", Some(9), Some("uid-other")),
            rs("orphan-8", "orphan", Some(8), None),
            rs("web-x", "broken", None, Some(UID)),
        ]
    }

    #[test]
    fn previous_revision_is_the_second_highest_owned_one() {
        let d = deploy("v3");
        let rses = history();
        assert_eq!(
            select_replica_set(&d, &rses, None).map(|r| &r.name),
            Ok(&"web-2".to_string())
        );
        assert_eq!(
            select_replica_set(&d, &rses, Some(0)).map(|r| &r.name),
            Ok(&"web-2".to_string())
        );
        assert_eq!(
            select_replica_set(&d, &rses, Some(1)).map(|r| &r.name),
            Ok(&"web-1".to_string())
        );
        assert_eq!(
            select_replica_set(&d, &rses, Some(9)).map(|r| &r.name),
            Err(KubeError::RevisionNotFound {
                deployment: "web".into(),
                revision: 9,
                available: vec![1, 2, 3]
            }),
            "revision 9 belongs to another Deployment"
        );
        let only_current = vec![
            rs("web-3", "v3", Some(3), Some(UID)),
            rs("other-9", "evil", Some(9), Some("uid-other")),
        ];
        assert_eq!(
            select_replica_set(&d, &only_current, None).map(|r| &r.name),
            Err(KubeError::NoRolloutHistory {
                deployment: "web".into()
            })
        );
    }

    #[test]
    fn templates_compare_without_the_hash_label_and_nil_equals_empty() {
        assert!(templates_equal(&tpl("v2", Some("abc")), &tpl("v2", None)));
        assert!(templates_equal(&tpl("v2", Some("abc")), &tpl("v2", Some("def"))));
        assert!(!templates_equal(&tpl("v2", None), &tpl("v3", None)));
        let mut with_empties = tpl("v2", None);
        with_empties["metadata"]["annotations"] = json!({});
        with_empties["spec"]["volumes"] = json!([]);
        with_empties["spec"]["nodeSelector"] = Value::Null;
        assert!(templates_equal(&with_empties, &tpl("v2", Some("abc"))));
        assert_eq!(strip_hash(&tpl("v2", Some("abc"))), tpl("v2", None));
    }

    #[test]
    fn annotations_keep_the_deployments_and_add_the_replicasets_except_the_skip_list() {
        let d: BTreeMap<String, String> = [
            (REVISION_ANNOTATION, "3"),
            ("team", "portal"),
            ("kubernetes.io/change-cause", "deploy v3"),
            ("kubectl.kubernetes.io/last-applied-configuration", "{\"v\":3}"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let r: BTreeMap<String, String> = [
            (REVISION_ANNOTATION, "2"),
            ("deployment.kubernetes.io/desired-replicas", "3"),
            ("deployment.kubernetes.io/max-replicas", "4"),
            ("kubectl.kubernetes.io/last-applied-configuration", "{\"v\":2}"),
            ("kubernetes.io/change-cause", "deploy v2"),
            ("owner", "payments"),
            (UNDO_MARKER_ANNOTATION, "{\"stale\":true}"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let merged = merge_annotations(&d, &r);
        let expect: BTreeMap<String, String> = [
            (REVISION_ANNOTATION, "3"),
            ("team", "portal"),
            ("kubernetes.io/change-cause", "deploy v2"),
            ("kubectl.kubernetes.io/last-applied-configuration", "{\"v\":3}"),
            ("owner", "payments"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(merged, expect);
    }

    #[test]
    fn patch_bodies_are_exact() {
        let sel: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
        assert_eq!(
            selector_patch("7", &sel),
            json!([{"op": "test", "path": "/metadata/resourceVersion", "value": "7"},
                   {"op": "add", "path": "/spec/selector", "value": {"app": "web"}}])
        );
        assert_eq!(
            scale_patch("8", 0),
            json!({"metadata": {"resourceVersion": "8"}, "spec": {"replicas": 0}})
        );
        let ann: BTreeMap<String, String> = [("a".to_string(), "b".to_string())].into();
        assert_eq!(
            undo_patch("9", &tpl("v2", None), &ann),
            json!([{"op": "test", "path": "/metadata/resourceVersion", "value": "9"},
                   {"op": "replace", "path": "/spec/template", "value": tpl("v2", None)},
                   {"op": "add", "path": "/metadata/annotations", "value": {"a": "b"}}])
        );
        // Every body we send as a JSON patch parses as one.
        assert!(serde_json::from_value::<json_patch::Patch>(selector_patch("7", &sel)).is_ok());
    }

    #[test]
    fn undo_plan_writes_the_previous_template_and_a_marker_then_is_done() {
        let mut d = deploy("v3");
        let mut rses = history();
        let Ok(Plan::Write(w)) = plan_rollout_undo(&d, &rses, None) else {
            panic!("expected a write");
        };
        let ops = w.patch.as_array().expect("ops");
        assert_eq!(ops[1]["value"], tpl("v2", None));
        let ann: BTreeMap<String, String> = serde_json::from_value(ops[2]["value"].clone()).expect("map");
        assert_eq!(ann["team"], "portal");
        assert_eq!(ann["kubernetes.io/change-cause"], "deploy v2");
        assert!(!ann.contains_key("deployment.kubernetes.io/desired-replicas"));
        assert!(matches!(w.precheck, PreCheckNeed::ReplicaSet { ref name, revision: 2, .. } if name == "web-2"));

        // Apply it as the server would, and let the controller renumber web-2 to revision 4.
        d.template = ops[1]["value"].clone();
        d.annotations = ann;
        rses[1].revision = Some(4);
        assert!(
            matches!(plan_rollout_undo(&d, &rses, None), Ok(Plan::Done { ref reason }) if reason.contains("earlier run"))
        );
        // A different request is judged on its own.
        assert!(matches!(plan_rollout_undo(&d, &rses, Some(1)), Ok(Plan::Write(_))));
        // Without our marker, kubectl semantics would flip back to the canary (web-3).
        d.annotations.remove(UNDO_MARKER_ANNOTATION);
        let Ok(Plan::Write(w)) = plan_rollout_undo(&d, &rses, None) else {
            panic!("expected a write");
        };
        assert_eq!(w.patch[1]["value"], tpl("v3", None));

        d.paused = true;
        assert_eq!(
            plan_rollout_undo(&d, &rses, None),
            Err(KubeError::Paused {
                deployment: "web".into()
            })
        );
    }

    #[test]
    fn undo_to_the_current_template_is_done() {
        // The Deployment already runs revision 2's template, which is also "the previous".
        let d = deploy("v2");
        let rses = history();
        assert!(matches!(
            plan_rollout_undo(&d, &rses, None),
            Ok(Plan::Done { ref reason }) if reason == "current template already matches revision 2 (replicaset web-2)"
        ));
        assert!(matches!(plan_rollout_undo(&d, &rses, Some(1)), Ok(Plan::Write(_))));
    }

    #[test]
    fn service_and_scale_plans() {
        let want: BTreeMap<String, String> = [
            ("app".to_string(), "web".to_string()),
            ("version".to_string(), "v1".to_string()),
        ]
        .into();
        let step = KubeStep::SwitchService {
            service: "web".into(),
            selector: want.clone(),
        };
        let mut view = ServiceView {
            name: "web".into(),
            resource_version: "5".into(),
            selector: [
                ("app".to_string(), "web".to_string()),
                ("version".to_string(), "v2".to_string()),
                ("stale".to_string(), "x".to_string()),
            ]
            .into(),
        };
        let Ok(Plan::Write(w)) = plan_step(&step, &Current::Service(view.clone())) else {
            panic!("expected a write");
        };
        assert_eq!(w.content_type, JSON_PATCH);
        assert_eq!(w.patch, selector_patch("5", &want));
        view.selector = want;
        assert!(matches!(
            plan_step(&step, &Current::Service(view)),
            Ok(Plan::Done { .. })
        ));

        let step = KubeStep::Scale {
            deployment: "web".into(),
            replicas: 0,
        };
        let mut scale = ScaleView {
            deployment: "web".into(),
            resource_version: "8".into(),
            replicas: 3,
        };
        let Ok(Plan::Write(w)) = plan_step(&step, &Current::Scale(scale.clone())) else {
            panic!("expected a write");
        };
        assert_eq!((w.content_type, w.patch.clone()), (MERGE_PATCH, scale_patch("8", 0)));
        assert_eq!(w.precheck, PreCheckNeed::None);
        scale.replicas = 0;
        assert!(matches!(
            plan_step(&step, &Current::Scale(scale)),
            Ok(Plan::Done { .. })
        ));
    }

    #[test]
    fn label_selectors_render_like_kubernetes() {
        let sel = json!({"matchLabels": {"app": "web", "tier": "api"},
                         "matchExpressions": [
                             {"key": "env", "operator": "In", "values": ["prod", "canary"]},
                             {"key": "legacy", "operator": "DoesNotExist"},
                             {"key": "zone", "operator": "Exists"},
                             {"key": "x", "operator": "NotIn", "values": ["y"]}]});
        assert_eq!(
            label_selector_string(&sel),
            Ok("app=web,tier=api,env in (prod,canary),!legacy,zone,x notin (y)".to_string())
        );
        assert!(label_selector_string(&json!({"matchExpressions": [{"key": "a", "operator": "Gt"}]})).is_err());
    }

    fn op() -> Op<'static> {
        Op {
            verb: "patch",
            kind: "Deployment",
            api_group: "apps",
            resource: "deployments/scale",
            namespace: "portal",
            name: "web",
        }
    }

    fn api_err(code: u16, reason: &str) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure("server says no", reason)
                .with_code(code)
                .boxed(),
        )
    }

    #[test]
    fn errors_are_classified_for_people_and_metrics() {
        let nf = classify(api_err(404, "NotFound"), &op());
        assert_eq!(nf.to_string(), "Deployment portal/web not found");
        assert_eq!((nf.code(), nf.is_retryable()), ("not_found", false));

        let fb = classify(api_err(403, "Forbidden"), &op());
        assert!(matches!(&fb, KubeError::Forbidden { verb, resource, api_group, .. }
            if verb == "patch" && resource == "deployments/scale" && api_group == "apps"));
        assert!(fb
            .to_string()
            .contains("add verb \"patch\" for resource \"deployments/scale\""));
        assert_eq!((fb.code(), fb.is_retryable()), ("forbidden", false));

        let cf = classify(api_err(409, "Conflict"), &op());
        assert!(matches!(cf, KubeError::Conflict { attempts: 1, .. }));
        assert!(cf.is_retryable());

        let inv = classify(api_err(422, "Invalid"), &op());
        assert!(matches!(inv, KubeError::Api { code: 422, .. }));
        assert!(!inv.is_retryable() && !inv.is_transient());

        let busy = classify(api_err(503, "ServiceUnavailable"), &op());
        assert!(busy.is_retryable() && busy.is_transient());
        let throttled = classify(api_err(429, "TooManyRequests"), &op());
        assert!(throttled.is_transient());

        let pre = KubeError::PreCheckFailed {
            service: "web".into(),
            namespace: "portal".into(),
            selector: "app=web".into(),
            matching: 1,
            ready: 0,
            required: 1,
        };
        assert!(pre.is_precheck() && !fb.is_precheck());
        assert_eq!(pre.code(), "precheck_failed");
    }

    #[test]
    fn every_error_serializes_with_its_tag() {
        let errors = [
            KubeError::Client {
                message: "x".into(),
                retryable: true,
            },
            KubeError::InvalidTarget { message: "x".into() },
            KubeError::Paused { deployment: "d".into() },
            KubeError::Api {
                code: 500,
                reason: "InternalError".into(),
                message: "x".into(),
            },
        ];
        for e in errors {
            let v = serde_json::to_value(&e).expect("serializes");
            assert_eq!(v["error"], e.code());
        }
    }

    fn deployment_with(generation: i64, status: Value) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "generation": generation},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}}, "template": tpl("v1", None)},
            "status": status,
        }))
        .expect("deployment")
    }

    #[test]
    fn rollout_progress_follows_kubectl_rollout_status() {
        let done = json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 3});
        assert!(rollout_progress(&deployment_with(2, done.clone())).complete);
        assert!(
            !rollout_progress(&deployment_with(3, done)).complete,
            "spec change not observed yet"
        );
        let old_left = json!({"observedGeneration": 2, "replicas": 4, "updatedReplicas": 3, "availableReplicas": 3});
        let p = rollout_progress(&deployment_with(2, old_left));
        assert!(!p.complete && p.message.contains("pending termination"));
        let unavailable = json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 2});
        assert!(!rollout_progress(&deployment_with(2, unavailable)).complete);
        let stuck = json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 1, "availableReplicas": 2,
                           "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]});
        let p = rollout_progress(&deployment_with(2, stuck));
        assert!(p.deadline_exceeded && !p.complete);
    }

    #[test]
    fn only_ready_endpoints_of_the_new_pods_count() {
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "web-1"},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.0.0.1"], "targetRef": {"kind": "Pod", "name": "stable-0"}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false}, "targetRef": {"kind": "Pod", "name": "stable-1"}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "canary-0"}},
                {"addresses": ["10.0.0.4"], "conditions": {"ready": true}},
            ],
        }))
        .expect("slice");
        let pods: BTreeSet<String> = ["stable-0".to_string(), "stable-1".to_string()].into();
        assert_eq!(ready_endpoints(&[slice], &pods), 1);
    }

    #[test]
    fn settings_have_defaults_and_reject_unknown_fields() {
        let s: KubeSettings = serde_json::from_value(json!({})).expect("defaults");
        assert_eq!(s, KubeSettings::default());
        assert_eq!(
            (s.field_manager.as_str(), s.max_conflict_retries, s.in_cluster),
            ("rollback-responder", 3, false)
        );
        assert!(serde_json::from_value::<KubeSettings>(json!({"kube_config": "/x"})).is_err());
    }

    #[test]
    fn poll_interval_is_bounded() {
        assert_eq!(poll_interval(Duration::from_millis(100)), MIN_POLL);
        assert_eq!(poll_interval(Duration::from_secs(5)), Duration::from_millis(500));
        assert_eq!(poll_interval(Duration::from_secs(300)), MAX_POLL);
    }

    #[test]
    fn rbac_rules_cover_every_call_the_executor_makes() {
        // (group, resource, verb) of every Op in this file.
        let calls = [
            ("", "services", "get"),
            ("", "services", "patch"),
            ("apps", "deployments", "get"),
            ("apps", "deployments", "patch"),
            ("apps", "replicasets", "list"),
            ("apps", "deployments/scale", "get"),
            ("apps", "deployments/scale", "patch"),
            ("", "pods", "list"),
            ("discovery.k8s.io", "endpointslices", "list"),
        ];
        let granted: BTreeSet<(&str, &str, &str)> = RBAC_RULES
            .iter()
            .flat_map(|(g, r, vs)| vs.iter().map(move |v| (*g, *r, *v)))
            .collect();
        assert_eq!(granted, calls.into_iter().collect());
    }
}
