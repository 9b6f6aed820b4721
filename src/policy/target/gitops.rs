//! `target.kubernetes.gitops`: the Argo CD Application or Flux object that syncs a Kubernetes
//! target's objects, as plain data with its checks, and the owner object it resolves to. The
//! suspend itself (reads, patches, the resume annotation) is `action::gitops`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

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
    pub(crate) fn gvkp(&self) -> (&'static str, &'static str, &'static str, &'static str) {
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
    pub(crate) fn what(&self) -> &'static str {
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
pub(crate) fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
