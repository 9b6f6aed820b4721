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
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::kubernetes::{KubeError, KubeExecutor, KubeStepRecord};
use super::retry::BeforeWrite;

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

// ---------------------------------------------------------------------------------------------
// Policy
// ---------------------------------------------------------------------------------------------

/// `target.kubernetes.gitops`: which GitOps object syncs the target's objects. Exactly one of
/// `argocd` / `flux`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GitOps {
    /// An Argo CD Application with automated sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argocd: Option<ArgoCdApp>,
    /// A Flux Kustomization or HelmRelease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flux: Option<FluxObject>,
    /// `true` (default): a suspend that fails stops the rollback before its first write.
    /// `false`: the revert goes on with a warning (it may be synced back).
    #[serde(default = "yes")]
    pub required: bool,
}

/// `gitops.argocd`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ArgoCdApp {
    /// The Application's name.
    pub application: String,
    /// Where the Application object lives (default `argocd`), not where it deploys to.
    #[serde(default = "argocd_namespace")]
    pub namespace: String,
}

/// `gitops.flux`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FluxObject {
    /// `Kustomization` or `HelmRelease`.
    pub kind: FluxKind,
    /// The object's name.
    pub name: String,
    /// Where the Flux object lives (default `flux-system`).
    #[serde(default = "flux_namespace")]
    pub namespace: String,
}

/// The Flux objects that reconcile workloads and can be suspended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum FluxKind {
    /// kustomize.toolkit.fluxcd.io/v1 Kustomization.
    Kustomization,
    /// helm.toolkit.fluxcd.io/v2 HelmRelease.
    HelmRelease,
}

fn yes() -> bool {
    true
}

fn argocd_namespace() -> String {
    "argocd".into()
}

fn flux_namespace() -> String {
    "flux-system".into()
}

/// Kubernetes object names: a DNS-1123 subdomain (a namespace: a label, at most 63).
fn name_error(value: &str, max: usize) -> Option<&'static str> {
    let ok_chars = value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let ends_ok = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if value.is_empty() {
        Some("must not be empty")
    } else if value.len() > max {
        Some("is too long for a Kubernetes name")
    } else if !ok_chars || !ends_ok(value.bytes().next()) || !ends_ok(value.bytes().last()) {
        Some("must be a Kubernetes name: lower-case letters, digits, '-' and '.', starting and ending alphanumeric")
    } else {
        None
    }
}

impl GitOps {
    /// The object to suspend; the error names the key and the fix.
    pub fn owner(&self) -> Result<Owner, String> {
        const AT: &str = "target.kubernetes.gitops";
        let check = |key: &str, value: &str, max: usize, what: &str| match name_error(value, max) {
            Some(problem) => Err(format!("{AT}.{key}: {problem}; {what}")),
            None => Ok(()),
        };
        match (&self.argocd, &self.flux) {
            (Some(a), None) => {
                check(
                    "argocd.application",
                    &a.application,
                    253,
                    "name the Argo CD Application that syncs these objects",
                )?;
                check(
                    "argocd.namespace",
                    &a.namespace,
                    63,
                    "the namespace the Application object lives in (argocd)",
                )?;
                Ok(Owner::ArgoCd {
                    namespace: a.namespace.clone(),
                    application: a.application.clone(),
                })
            }
            (None, Some(f)) => {
                check(
                    "flux.name",
                    &f.name,
                    253,
                    "name the Flux object that reconciles these objects",
                )?;
                check(
                    "flux.namespace",
                    &f.namespace,
                    63,
                    "the namespace the Flux object lives in (flux-system)",
                )?;
                Ok(Owner::Flux {
                    kind: f.kind,
                    namespace: f.namespace.clone(),
                    name: f.name.clone(),
                })
            }
            (Some(_), Some(_)) => Err(format!("{AT}: give argocd or flux, not both")),
            (None, None) => Err(format!(
                "{AT}: name the object to suspend: argocd: {{application: NAME, namespace: argocd}} or \
                 flux: {{kind: Kustomization (or HelmRelease), name: NAME, namespace: flux-system}}"
            )),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The owner object
// ---------------------------------------------------------------------------------------------

/// The GitOps object a suspend writes, resolved from the policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "tool", rename_all = "snake_case")]
pub enum Owner {
    /// argoproj.io/v1alpha1 Application.
    ArgoCd { namespace: String, application: String },
    /// A Flux Kustomization or HelmRelease.
    Flux {
        kind: FluxKind,
        namespace: String,
        name: String,
    },
}

impl Owner {
    /// (group, version, kind, plural).
    fn gvkp(&self) -> (&'static str, &'static str, &'static str, &'static str) {
        match self {
            Owner::ArgoCd { .. } => ("argoproj.io", "v1alpha1", "Application", "applications"),
            Owner::Flux {
                kind: FluxKind::Kustomization,
                ..
            } => ("kustomize.toolkit.fluxcd.io", "v1", "Kustomization", "kustomizations"),
            Owner::Flux {
                kind: FluxKind::HelmRelease,
                ..
            } => ("helm.toolkit.fluxcd.io", "v2", "HelmRelease", "helmreleases"),
        }
    }

    /// For `Api::namespaced_with`.
    pub fn api_resource(&self) -> ApiResource {
        let (group, version, kind, plural) = self.gvkp();
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
    }

    /// API group.
    pub fn group(&self) -> &'static str {
        self.gvkp().0
    }

    /// Kind (`Application`, `Kustomization`, `HelmRelease`).
    pub fn kind(&self) -> &'static str {
        self.gvkp().2
    }

    /// Plural resource, as RBAC names it.
    pub fn resource(&self) -> &'static str {
        self.gvkp().3
    }

    /// Namespace of the object.
    pub fn namespace(&self) -> &str {
        match self {
            Owner::ArgoCd { namespace, .. } | Owner::Flux { namespace, .. } => namespace,
        }
    }

    /// Name of the object.
    pub fn name(&self) -> &str {
        match self {
            Owner::ArgoCd { application, .. } => application,
            Owner::Flux { name, .. } => name,
        }
    }

    /// For people: `Argo CD application argocd/portal-api`.
    pub fn describe(&self) -> String {
        let tool = match self {
            Owner::ArgoCd { .. } => "Argo CD application".to_string(),
            Owner::Flux { .. } => format!("Flux {}", self.kind()),
        };
        format!("{tool} {}/{}", self.namespace(), self.name())
    }

    /// What gets switched off, in the tool's words.
    fn what(&self) -> &'static str {
        match self {
            Owner::ArgoCd { .. } => "automated sync",
            Owner::Flux { .. } => "reconciliation",
        }
    }

    /// The commands that resume it, given the resume patch: the exact `kubectl patch` first,
    /// then the tool's own command where it does the same.
    pub fn resume_commands(&self, resume: &Value) -> Vec<String> {
        let (group, _, _, plural) = self.gvkp();
        let body = serde_json::to_string(resume).unwrap_or_default();
        let mut commands = vec![format!(
            "kubectl -n {} patch {plural}.{group} {} --type merge -p {}",
            self.namespace(),
            self.name(),
            shell_quote(&body)
        )];
        if let Owner::Flux { kind, .. } = self {
            let noun = match kind {
                FluxKind::Kustomization => "kustomization",
                FluxKind::HelmRelease => "helmrelease",
            };
            commands.push(format!("flux resume {noun} {} -n {}", self.name(), self.namespace()));
        }
        commands
    }
}

/// Single-quoted for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
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

    /// The owner object was changed (stored).
    pub fn applied(&self) -> bool {
        matches!(self, GitOpsStep::Suspended { .. })
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
