//! Kubernetes client settings from the service's config file, and the client configuration
//! they select (kubeconfig, context, in-cluster).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::KubeError;

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
            retry_window: crate::action::retry::DEFAULT_WINDOW,
            initial_backoff_ms: 250,
        }
    }
}

/// The client configuration the settings ask for.
pub(super) async fn load_config(s: &KubeSettings) -> Result<kube::Config, KubeError> {
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
