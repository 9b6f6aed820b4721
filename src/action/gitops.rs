//! Keeping a Kubernetes rollback rolled back when Argo CD or Flux owns the objects.
//!
//! Under automated sync, Argo CD (or Flux) puts the release that git names back within
//! minutes of a `kubectl rollout undo`: the rollback is undone before anyone has reverted git.
//! A Kubernetes target may therefore name its GitOps owner (`gitops:` in the policy). The
//! Kubernetes executor ([`super::kubernetes::KubeExecutor::revert`]) calls
//! [`KubeExecutor::suspend_gitops`] after its reads and pre-checks and before its first write:
//! an Argo CD Application loses `spec.syncPolicy.automated` (what was there is kept, in the
//! step record and in the annotation [`RESUME_ANNOTATION`] with the incident it was suspended
//! for, as the exact patch that restores it); a Flux Kustomization or HelmRelease gets
//! `spec.suspend: true`. Found off already, it is this incident's own suspend (a takeover),
//! an earlier incident's (named, not counted as this one's change), or somebody else's. The step is recorded in
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

use chrono::{DateTime, Utc};
use kube::api::ApiResource;
use kube::core::GroupVersionKind;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::kubernetes::{KubeError, KubeExecutor, KubeStepRecord};
use super::retry::BeforeWrite;
use super::ForIncident;
pub use crate::policy::target::gitops::{ArgoCdApp, FluxKind, FluxObject, GitOps, Owner};

/// Annotation the suspend adds to the owner object: which incident suspended it and the
/// merge patch that resumes it exactly as it was ([`Suspension`], as JSON). A second run of
/// the same incident (takeover after a crash) finds it and reports the same resume command
/// instead of "was already off"; another incident finds an earlier incident's suspension and
/// says whose it is; the resume patch removes it again.
pub const RESUME_ANNOTATION: &str = "rollback-responder/gitops-resume";

/// What [`RESUME_ANNOTATION`] holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Suspension {
    /// The incident the suspend was made for.
    #[serde(flatten)]
    pub by: SuspendedFor,
    /// The merge patch that resumes the owner as it was.
    pub resume: Value,
}

/// The incident a suspend was made for: its id, and when it opened.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SuspendedFor {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident_opened_at: Option<DateTime<Utc>>,
}

impl SuspendedFor {
    fn of(i: &ForIncident) -> Self {
        SuspendedFor {
            incident: i.id.clone(),
            // Stored with millisecond precision: the store keeps no finer.
            incident_opened_at: i
                .opened_at
                .and_then(|t| DateTime::from_timestamp_millis(t.timestamp_millis())),
        }
    }

    /// Made for incident `i`: the ids when both are known, else the opening times (to the
    /// millisecond). A mark that names no incident is an older version's: nobody's but a
    /// caller's that names none either.
    pub fn is(&self, i: &ForIncident) -> bool {
        match (&self.incident, &i.id) {
            (Some(a), Some(b)) => a == b,
            _ => match (self.incident_opened_at, i.opened_at) {
                (Some(a), Some(b)) => a.timestamp_millis() == b.timestamp_millis(),
                (None, None) => self.incident.is_none() && i.id.is_none(),
                _ => false,
            },
        }
    }

    /// `incident 0190... (opened 2026-12-03T10:00:00Z)`.
    pub fn describe(&self) -> String {
        let opened = self
            .incident_opened_at
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        match (&self.incident, opened) {
            (Some(id), Some(at)) => format!("incident {id} (opened {at})"),
            (Some(id), None) => format!("incident {id}"),
            (None, Some(at)) => format!("the incident opened {at}"),
            (None, None) => "an incident it did not record (an older version of the responder)".into(),
        }
    }
}

/// Reads [`RESUME_ANNOTATION`]; an older version stored the bare resume patch, naming no
/// incident.
fn suspension_of(obj: &Value) -> Option<Suspension> {
    let raw = obj
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(RESUME_ANNOTATION))
        .and_then(Value::as_str)?;
    let v: Value = serde_json::from_str(raw).ok()?;
    if v.get("resume").is_some() {
        serde_json::from_value(v).ok()
    } else {
        Some(Suspension {
            by: SuspendedFor::default(),
            resume: v,
        })
    }
}

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
    /// Syncing is off already.
    AlreadyOff(Off),
}

/// Who turned syncing off, as far as the object tells.
#[derive(Debug, Clone, PartialEq)]
pub enum Off {
    /// An earlier run of this incident (takeover after a crash): `resume` from the annotation.
    ThisIncident { resume: Value },
    /// The responder, for another incident, whose suspension is still recorded on the object
    /// (never resumed, or resumed without the resume patch and turned off again since).
    OtherIncident { by: SuspendedFor, resume: Value },
    /// Somebody else: nothing of ours to resume.
    NotUs,
}

/// Whether Argo CD's automated sync is on: `automated` present, and not `enabled: false`
/// (Argo CD 3 can keep the settings with automation off).
fn argo_automated(obj: &Value) -> Option<&Value> {
    obj.pointer("/spec/syncPolicy/automated")
        .filter(|a| !a.is_null() && a.get("enabled").and_then(Value::as_bool) != Some(false))
}

/// Decides the write for `owner` from the object as read (the whole object, as JSON), for
/// `incident`.
pub fn plan(owner: &Owner, obj: &Value, incident: &ForIncident) -> Plan {
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
        return Plan::AlreadyOff(match suspension_of(obj) {
            Some(s) if s.by.is(incident) => Off::ThisIncident { resume: s.resume },
            Some(s) => Off::OtherIncident {
                by: s.by,
                resume: s.resume,
            },
            None => Off::NotUs,
        });
    };
    let resume = json!({"metadata": {"annotations": remove_ours}, "spec": resume_spec});
    let rv = obj.pointer("/metadata/resourceVersion").cloned().unwrap_or(Value::Null);
    let mark = Suspension {
        by: SuspendedFor::of(incident),
        resume: resume.clone(),
    };
    let patch = json!({
        "metadata": {
            "resourceVersion": rv,
            "annotations": { RESUME_ANNOTATION: serde_json::to_string(&mark).unwrap_or_default() },
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
        /// An earlier run of this incident turned it off (takeover after a crash).
        by_us: bool,
        /// The responder turned it off for another (earlier) incident: not this one's change.
        #[serde(skip_serializing_if = "Option::is_none")]
        other_incident: Option<SuspendedFor>,
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
                ..
            } => format!(
                "{}: {} already suspended by an earlier run of this incident's rollback; once git holds the good \
                 version, \
                 resume with: {}",
                owner.describe(),
                owner.what(),
                resume(resume_commands)
            ),
            GitOpsStep::AlreadyOff {
                owner,
                other_incident: Some(other),
                resume_commands,
                ..
            } => format!(
                "{}: {} was already off, suspended by the responder for {}, not by this incident (its resume \
                 annotation is still on the object): nothing written, not counted as this incident's change; \
                 resuming it is for whoever handles that release: {}",
                owner.describe(),
                owner.what(),
                other.describe(),
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
        incident: &ForIncident,
        on_step: &mut (dyn FnMut(KubeStepRecord) + Send),
        before_write: BeforeWrite<'_>,
    ) -> Result<GitOpsStep, KubeError> {
        let owner = g.owner().map_err(|message| KubeError::InvalidTarget { message })?;
        match self
            .suspend_owner(&owner, dry_run, incident, on_step, before_write)
            .await
        {
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
            // Whether the suspend took is not known: said as such, never "nothing was changed".
            Err(e) if e.outcome_unknown() => Err(e),
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
        incident: &ForIncident,
        on_step: &mut (dyn FnMut(KubeStepRecord) + Send),
        before_write: BeforeWrite<'_>,
    ) -> Result<GitOpsStep, KubeError> {
        let get = Call {
            owner,
            patch: None,
            dry_run,
        };
        let mut obj = self.gitops_call(get, on_step, None).await?;
        let max_attempts = self.max_conflict_retries().saturating_add(1);
        let mut attempt = 1u32;
        loop {
            let (patch, resume) = match plan(owner, &obj, incident) {
                Plan::AlreadyOff(off) => {
                    let (by_us, other_incident, resume) = match off {
                        Off::ThisIncident { resume } => (true, None, Some(resume)),
                        Off::OtherIncident { by, resume } => (false, Some(by), Some(resume)),
                        Off::NotUs => (false, None, None),
                    };
                    return Ok(GitOpsStep::AlreadyOff {
                        owner: owner.clone(),
                        by_us,
                        other_incident,
                        resume_commands: resume.map(|r| owner.resume_commands(&r)).unwrap_or_default(),
                    });
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
            let (kind, namespace, name, message) = match self
                .gitops_call(write, on_step, (!dry_run).then_some(before_write))
                .await
            {
                Ok(_) if dry_run => {
                    return Ok(GitOpsStep::DryRun {
                        owner: owner.clone(),
                        patch,
                        resume_commands: owner.resume_commands(&resume),
                    });
                }
                // The answer is the stored object: it must read as off now, with our annotation.
                Ok(written) => {
                    if plan(owner, &written, incident) != Plan::AlreadyOff(Off::ThisIncident { resume: resume.clone() })
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
            obj = self.gitops_call(get, on_step, None).await?;
            attempt += 1;
        }
    }
}

#[cfg(test)]
#[path = "gitops_tests.rs"]
mod tests;
