//! The Kubernetes executor's errors, and how a failed API call is classified (not found,
//! forbidden with the rule to add, conflict, retryable server trouble) naming the call.

use std::time::Duration;

use serde::Serialize;

use crate::action::retry::{Classify, ErrorClass};

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
    /// Too few ready pods behind the new selector; the switch was not written.
    #[error(
        "pre-check failed: service {namespace}/{service}: {ready} of {matching} pod(s) matching {selector} are Ready, \
         {required} required; the selector was not switched"
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
    /// The new selector also selects pods of another app; the switch was not written.
    #[error(
        "pre-check failed: service {namespace}/{service}: the new selector {selector} also selects pod(s) of another \
         app, which neither the current selector ({current}) selects nor carry its app labels: {}; the selector was \
         not switched; list the app's key in the policy's selector (e.g. app: NAME)",
        pods.join(", ")
    )]
    ForeignPods {
        /// Service about to be switched.
        service: String,
        /// Namespace.
        namespace: String,
        /// The new selector.
        selector: String,
        /// The Service's selector now.
        current: String,
        /// The foreign pods, `name (app labels)`.
        pods: Vec<String>,
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
    /// `to_image` names an image none of the Deployment's ReplicaSets runs.
    #[error("no revision of deployment {deployment} runs image {image} (images present: {available:?})")]
    ImageNotFound {
        /// Deployment name.
        deployment: String,
        /// Requested image.
        image: String,
        /// Images found.
        available: Vec<String>,
    },
    /// The pod template changed after the incident opened, to a release that is not older than
    /// the one that was current then: not ours to undo.
    #[error(
        "deployment {deployment} changed after the incident opened ({opened_at}) {by}, to a newer release ({images}); \
         not undoing someone else's release: a human decides"
    )]
    ChangedSinceOpened {
        /// Deployment name.
        deployment: String,
        /// Who changed it and when.
        by: String,
        /// When the incident opened.
        opened_at: String,
        /// Its images now.
        images: String,
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
    /// A check step did not pass within its timeout; the steps after it were not run.
    #[error(
        "check steps[{index}] failed: {check}: not passed after {probes} probe(s) in {:.1}s, last answer {last}; \
         the steps after it were not run",
        Duration::from_millis(*waited_ms).as_secs_f64()
    )]
    CheckFailed {
        /// Step position.
        index: usize,
        /// The check, described.
        check: String,
        /// Requests made.
        probes: u32,
        /// How long it waited, in milliseconds.
        waited_ms: u64,
        /// The last answer (`HTTP 503`, `no answer within 2s`, ...).
        last: String,
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
    /// The GitOps sync was suspended, then the revert failed before any Kubernetes object was
    /// reverted: a partial rollback (the suspend stays) with nothing reverted.
    #[error(
        "{cause}; {}the {what} of {owner} was suspended and stays so: once the release is sorted out, resume \
         it with: {resume}",
        if cause.outcome_unknown() { "" } else { "no Kubernetes object was reverted, but " }
    )]
    NothingRevertedAfterSuspend {
        /// `Argo CD application argocd/portal-api`.
        owner: String,
        /// `automated sync`, `reconciliation`.
        what: String,
        /// The commands that resume it.
        resume: String,
        /// Why the revert failed.
        cause: Box<KubeError>,
    },
    /// A write failed without a clear answer (timed out, the connection cut, a 5xx: the API
    /// server may have applied it), and its retries ended without one either: whether it took
    /// is not known. Never said as "nothing was changed".
    #[error("{call}: whether it took is UNKNOWN: an attempt failed without a clear answer and no later one had one ({cause}); check it before acting")]
    OutcomeUnknown {
        /// The write (`patch deployments/web in portal`).
        call: String,
        /// The last error.
        cause: String,
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
    /// Whether a write that failed so may have been applied all the same: no clear answer
    /// (a timeout, a cut connection) or the API server failed inside (500, 502, 504: an etcd
    /// timeout may have stored it). 503 "unavailable" and every 4xx are clear: not applied.
    pub fn may_have_been_applied(&self) -> bool {
        match self {
            KubeError::Client { retryable, .. } => *retryable,
            KubeError::Api { code, .. } => *code >= 500 && *code != 503,
            _ => false,
        }
    }

    /// Whether this error leaves unknown whether the target changed.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            KubeError::OutcomeUnknown { .. } => true,
            KubeError::NothingRevertedAfterSuspend { cause, .. } => cause.outcome_unknown(),
            _ => false,
        }
    }

    /// Whether running the revert again later may succeed without a person's help.
    pub fn is_retryable(&self) -> bool {
        match self {
            KubeError::Conflict { .. } => true,
            KubeError::Api { code, .. } => *code == 429 || *code >= 500,
            KubeError::Client { retryable, .. } | KubeError::GitOpsSuspend { retryable, .. } => *retryable,
            KubeError::NothingRevertedAfterSuspend { cause, .. } => cause.is_retryable(),
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
            KubeError::ForeignPods { .. } => "foreign_pods",
            KubeError::Paused { .. } => "paused",
            KubeError::NoRolloutHistory { .. } => "no_rollout_history",
            KubeError::RevisionNotFound { .. } => "revision_not_found",
            KubeError::ImageNotFound { .. } => "image_not_found",
            KubeError::ChangedSinceOpened { .. } => "changed_since_opened",
            KubeError::RolloutTimedOut { .. } => "rollout_timed_out",
            KubeError::NoReadyEndpoints { .. } => "no_ready_endpoints",
            KubeError::ReadBackMismatch { .. } => "read_back_mismatch",
            KubeError::CheckFailed { .. } => "check_failed",
            KubeError::InvalidTarget { .. } => "invalid_target",
            KubeError::Config { .. } => "config",
            KubeError::GitOpsSuspend { .. } => "gitops_suspend_failed",
            KubeError::Api { .. } => "api",
            KubeError::Client { .. } => "client",
            KubeError::OutcomeUnknown { .. } => "outcome_unknown",
            // The cause is what to fix; the suspend is in the message.
            KubeError::NothingRevertedAfterSuspend { cause, .. } => cause.code(),
        }
    }

    /// The pods about to take the traffic were not ready (or not all the app's): refused before
    /// any write when found at the start, or before the next write when found after a check.
    pub fn is_precheck(&self) -> bool {
        matches!(self, KubeError::PreCheckFailed { .. } | KubeError::ForeignPods { .. })
    }

    /// Worth sending the same request again right away (throttling, server trouble, transport).
    pub(super) fn is_transient(&self) -> bool {
        match self {
            KubeError::Api { code, .. } => matches!(code, 429 | 500 | 502 | 503 | 504),
            KubeError::Client { retryable, .. } => *retryable,
            _ => false,
        }
    }

    pub(super) fn internal(message: impl Into<String>) -> Self {
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
pub(super) struct Op<'a> {
    pub(super) verb: &'static str,
    pub(super) kind: &'static str,
    pub(super) api_group: &'static str,
    pub(super) resource: &'static str,
    pub(super) namespace: &'a str,
    pub(super) name: &'a str,
}

impl<'a> Op<'a> {
    /// A call on a core/v1 Service.
    pub(super) fn service(verb: &'static str, namespace: &'a str, name: &'a str) -> Self {
        Op {
            verb,
            kind: "Service",
            api_group: "",
            resource: "services",
            namespace,
            name,
        }
    }

    /// A call on an apps/v1 Deployment's scale subresource.
    pub(super) fn scale(verb: &'static str, namespace: &'a str, name: &'a str) -> Self {
        Op {
            resource: "deployments/scale",
            ..Op::deployment(verb, namespace, name)
        }
    }

    /// A call on an apps/v1 Deployment.
    pub(super) fn deployment(verb: &'static str, namespace: &'a str, name: &'a str) -> Self {
        Op {
            verb,
            kind: "Deployment",
            api_group: "apps",
            resource: "deployments",
            namespace,
            name,
        }
    }
    pub(super) fn describe(&self) -> String {
        if self.name.is_empty() {
            format!("{} {} in {}", self.verb, self.resource, self.namespace)
        } else {
            format!("{} {}/{} in {}", self.verb, self.resource, self.name, self.namespace)
        }
    }
}

/// Classifies a kube error for the call `op`: 404, 403 and 409 get their own variants.
pub(super) fn classify(err: kube::Error, op: &Op<'_>) -> KubeError {
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
