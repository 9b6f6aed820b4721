//! Keeping a Kubernetes rollback rolled back when Argo CD or Flux owns the objects.
//!
//! Under automated sync, Argo CD (or Flux) puts the release that git names back within
//! minutes of a `kubectl rollout undo`: the rollback is undone before anyone has reverted git.
//! A Kubernetes target may therefore name its GitOps owner (`gitops:` in the policy). The
//! Kubernetes executor ([`super::kubernetes::KubeExecutor::revert`]) calls
//! [`KubeExecutor::suspend_gitops`] after its reads and pre-checks and before its first write:
//! an Argo CD Application loses `spec.syncPolicy.automated` (what was there is kept, in the
//! step record and in the annotation [`RESUME_ANNOTATION`], as the exact patch that restores
//! it); a Flux Kustomization or HelmRelease gets `spec.suspend: true`. The step is recorded in
//! the incident's timeline and Slack thread with the command that resumes syncing, which a
//! person runs once git holds the good version. A suspend that fails stops the rollback before
//! anything is reverted (the revert would be undone anyway), unless the policy says
//! `required: false`: then the revert goes on and a warning step says what may happen. A dry
//! run sends the patch with `dryRun=All` (the server checks RBAC and the object, stores
//! nothing) and records what would be done.
//!
//! The plan (what to write, what resumes) is pure and unit-tested here; the calls go through
//! the executor's client, retries and error classification. The custom resources are reached
//! as `DynamicObject`s, so no CRD crate is needed.

use kube::api::ApiResource;
use kube::core::GroupVersionKind;
use serde::Serialize;
use serde_json::{json, Value};

use super::kubernetes::{KubeError, KubeExecutor, KubeStepRecord};
use super::retry::BeforeWrite;
pub use crate::policy::target::gitops::{ArgoCdApp, FluxKind, FluxObject, GitOps, Owner};

/// Annotation the suspend adds to the owner object: the merge patch that resumes it exactly
/// as it was. A second run (takeover after a crash) finds it and reports the same resume
/// command instead of "was already off"; the resume patch removes it again.
pub const RESUME_ANNOTATION: &str = "rollback-responder/gitops-resume";

/// RBAC rules the suspend needs, as (API group, resource, verbs). They live in the owner's
/// namespace (argocd, flux-system), so they ship as separate Roles under
/// deploy/kubernetes/gitops/; a test compares them with these.
pub const RBAC_RULES: &[(&str, &str, &[&str])] = &[
    ("argoproj.io", "applications", &["get", "patch"]),
    ("kustomize.toolkit.fluxcd.io", "kustomizations", &["get", "patch"]),
    ("helm.toolkit.fluxcd.io", "helmreleases", &["get", "patch"]),
];

/// The policy's `gitops:` section and the owner it names are plain data in
/// `policy::target::gitops`; this is how the executor reaches the owner object.
impl Owner {
    /// For `Api::namespaced_with`.
    pub fn api_resource(&self) -> ApiResource {
        let (group, version, kind, plural) = self.gvkp();
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
    }
}

// ---------------------------------------------------------------------------------------------
// Plan (pure)
// ---------------------------------------------------------------------------------------------

/// What the owner object needs, decided from what was read.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Syncing is on: `patch` (a merge patch guarded by resourceVersion) turns it off;
    /// `resume` is the merge patch that puts it back as it was.
    Suspend { patch: Value, resume: Value },
    /// Syncing is off already: by an earlier run of ours (`resume` from the annotation), or by
    /// somebody else (`None`: nothing of ours to resume).
    AlreadyOff { resume: Option<Value> },
}

/// Whether Argo CD's automated sync is on: `automated` present, and not `enabled: false`
/// (Argo CD 3 can keep the settings with automation off).
fn argo_automated(obj: &Value) -> Option<&Value> {
    obj.pointer("/spec/syncPolicy/automated")
        .filter(|a| !a.is_null() && a.get("enabled").and_then(Value::as_bool) != Some(false))
}

/// Decides the write for `owner` from the object as read (the whole object, as JSON).
pub fn plan(owner: &Owner, obj: &Value) -> Plan {
    let ours = obj
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(RESUME_ANNOTATION))
        .and_then(Value::as_str)
        .and_then(|s| serde_json::from_str::<Value>(s).ok());
    let remove_ours = json!({ RESUME_ANNOTATION: null });
    let (spec_off, resume_spec): (Value, Option<Value>) = match owner {
        Owner::ArgoCd { .. } => match argo_automated(obj) {
            Some(automated) => (
                json!({"syncPolicy": {"automated": null}}),
                Some(json!({"syncPolicy": {"automated": automated}})),
            ),
            None => (Value::Null, None),
        },
        Owner::Flux { .. } => {
            if obj.pointer("/spec/suspend").and_then(Value::as_bool) == Some(true) {
                (Value::Null, None)
            } else {
                (json!({"suspend": true}), Some(json!({"suspend": false})))
            }
        }
    };
    let Some(resume_spec) = resume_spec else {
        return Plan::AlreadyOff { resume: ours };
    };
    let resume = json!({"metadata": {"annotations": remove_ours}, "spec": resume_spec});
    let rv = obj.pointer("/metadata/resourceVersion").cloned().unwrap_or(Value::Null);
    let patch = json!({
        "metadata": {
            "resourceVersion": rv,
            "annotations": { RESUME_ANNOTATION: resume.to_string() },
        },
        "spec": spec_off,
    });
    Plan::Suspend { patch, resume }
}

// ---------------------------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------------------------

/// What the suspend did, for the timeline, Slack and the action's outcome.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "gitops", rename_all = "snake_case")]
pub enum GitOpsStep {
    /// Syncing turned off before the revert.
    Suspended {
        owner: Owner,
        /// The merge patch that resumes it as it was (also in [`RESUME_ANNOTATION`]).
        resume: Value,
        /// The commands a person runs to resume, once git holds the good version.
        resume_commands: Vec<String>,
        /// 1-based write attempt (conflict retries count).
        attempt: u32,
    },
    /// Off already: nothing written.
    AlreadyOff {
        owner: Owner,
        /// An earlier run of ours turned it off (takeover after a crash).
        by_us: bool,
        /// Empty when somebody else turned it off: theirs to resume.
        resume_commands: Vec<String>,
    },
    /// Dry run: the server accepted the patch with dryRun=All; nothing stored.
    DryRun {
        owner: Owner,
        patch: Value,
        resume_commands: Vec<String>,
    },
    /// The write lost a resourceVersion race (the controller writes status often): re-read.
    ConflictRetry {
        owner: Owner,
        attempt: u32,
        will_retry: bool,
    },
    /// `required: false` and the suspend failed: the revert goes on, and may be synced back.
    NotSuspended { owner: Owner, error: String },
}

impl GitOpsStep {
    /// One line for the timeline and Slack.
    pub fn describe(&self) -> String {
        let resume = |commands: &[String]| commands.join("  or  ");
        match self {
            GitOpsStep::Suspended {
                owner, resume_commands, ..
            } => format!(
                "{}: {} suspended before the revert, so it does not sync the bad release back; once git \
                 holds the good version, resume with: {}",
                owner.describe(),
                owner.what(),
                resume(resume_commands)
            ),
            GitOpsStep::AlreadyOff {
                owner,
                by_us: true,
                resume_commands,
            } => format!(
                "{}: {} already suspended by an earlier run of this rollback; once git holds the good version, \
                 resume with: {}",
                owner.describe(),
                owner.what(),
                resume(resume_commands)
            ),
            GitOpsStep::AlreadyOff { owner, .. } => format!(
                "{}: {} is already off (not by the responder): nothing suspended, nothing of ours to resume",
                owner.describe(),
                owner.what()
            ),
            GitOpsStep::DryRun {
                owner, resume_commands, ..
            } => format!(
                "dry run: would suspend the {} of {} before the revert (patch accepted by the server, nothing \
                 stored); resuming would be: {}",
                owner.what(),
                owner.describe(),
                resume(resume_commands)
            ),
            GitOpsStep::ConflictRetry {
                owner,
                attempt,
                will_retry,
            } => format!(
                "{}: suspend attempt {attempt} lost a race with another writer: {}",
                owner.describe(),
                if *will_retry {
                    "re-reading and trying again"
                } else {
                    "giving up"
                }
            ),
            GitOpsStep::NotSuspended { owner, error } => format!(
                "WARNING: could not suspend the {} of {} ({error}); gitops.required is false, so the revert goes \
                 on, but it may be synced back to the bad release within minutes",
                owner.what(),
                owner.describe()
            ),
        }
    }

    /// Worth a line in the Slack thread: every outcome but an intermediate race.
    pub fn is_notable(&self) -> bool {
        !matches!(self, GitOpsStep::ConflictRetry { will_retry: true, .. })
    }
}

// ---------------------------------------------------------------------------------------------
// Calls
// ---------------------------------------------------------------------------------------------

/// One request on the owner object, made through [`KubeExecutor::gitops_call`].
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    pub owner: &'a Owner,
    /// `None`: GET. `Some`: merge PATCH with this body.
    pub patch: Option<&'a Value>,
    pub dry_run: bool,
}

impl KubeExecutor {
    /// Turns off the owner's syncing before the revert's first write (see the module docs).
    /// `Err` only when the suspend failed and `required` is true; nothing has been reverted
    /// then.
    pub(super) async fn suspend_gitops(
        &self,
        g: &GitOps,
        dry_run: bool,
        on_step: &mut (dyn FnMut(KubeStepRecord) + Send),
        before_write: BeforeWrite<'_>,
    ) -> Result<GitOpsStep, KubeError> {
        let owner = g.owner().map_err(|message| KubeError::InvalidTarget { message })?;
        match self.suspend_owner(&owner, dry_run, on_step, before_write).await {
            Ok(step) => {
                on_step(KubeStepRecord::Gitops(step.clone()));
                Ok(step)
            }
            Err(e) if !g.required => {
                let step = GitOpsStep::NotSuspended {
                    owner,
                    error: e.to_string(),
                };
                on_step(KubeStepRecord::Gitops(step.clone()));
                Ok(step)
            }
            Err(e) => Err(KubeError::GitOpsSuspend {
                owner: owner.describe(),
                retryable: e.is_retryable(),
                cause: e.to_string(),
            }),
        }
    }

    async fn suspend_owner(
        &self,
        owner: &Owner,
        dry_run: bool,
        on_step: &mut (dyn FnMut(KubeStepRecord) + Send),
        before_write: BeforeWrite<'_>,
    ) -> Result<GitOpsStep, KubeError> {
        let get = Call {
            owner,
            patch: None,
            dry_run,
        };
        let mut obj = self.gitops_call(get, on_step).await?;
        let max_attempts = self.max_conflict_retries().saturating_add(1);
        let mut attempt = 1u32;
        loop {
            let (patch, resume) = match plan(owner, &obj) {
                Plan::AlreadyOff { resume } => {
                    return Ok(GitOpsStep::AlreadyOff {
                        owner: owner.clone(),
                        by_us: resume.is_some(),
                        resume_commands: resume.map(|r| owner.resume_commands(&r)).unwrap_or_default(),
                    })
                }
                Plan::Suspend { patch, resume } => (patch, resume),
            };
            if !dry_run {
                before_write().await;
            }
            let write = Call {
                owner,
                patch: Some(&patch),
                dry_run,
            };
            let (kind, namespace, name, message) = match self.gitops_call(write, on_step).await {
                Ok(_) if dry_run => {
                    return Ok(GitOpsStep::DryRun {
                        owner: owner.clone(),
                        patch,
                        resume_commands: owner.resume_commands(&resume),
                    });
                }
                // The answer is the stored object: it must read as off now, with our annotation.
                Ok(written) => {
                    if plan(owner, &written)
                        != (Plan::AlreadyOff {
                            resume: Some(resume.clone()),
                        })
                    {
                        return Err(KubeError::ReadBackMismatch {
                            object: owner.describe(),
                            expected: format!("{} off, annotated {RESUME_ANNOTATION}", owner.what()),
                            got: written.get("spec").map(Value::to_string).unwrap_or_default(),
                        });
                    }
                    tracing::info!(owner = %owner.describe(), attempt, "gitops sync suspended before the revert");
                    return Ok(GitOpsStep::Suspended {
                        owner: owner.clone(),
                        resume_commands: owner.resume_commands(&resume),
                        resume,
                        attempt,
                    });
                }
                Err(KubeError::Conflict {
                    kind,
                    namespace,
                    name,
                    message,
                    ..
                }) => (kind, namespace, name, message),
                Err(e) => return Err(e),
            };
            let will_retry = attempt < max_attempts;
            on_step(KubeStepRecord::Gitops(GitOpsStep::ConflictRetry {
                owner: owner.clone(),
                attempt,
                will_retry,
            }));
            if !will_retry {
                return Err(KubeError::Conflict {
                    kind,
                    namespace,
                    name,
                    attempts: attempt,
                    message,
                });
            }
            obj = self.gitops_call(get, on_step).await?;
            attempt += 1;
        }
    }
}

#[cfg(test)]
#[path = "gitops_tests.rs"]
mod tests;
