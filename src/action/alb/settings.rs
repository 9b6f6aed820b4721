//! The `aws:` section of the service's config file: region, endpoint, profile, retries.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// AWS settings from the service's config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AwsSettings {
    /// Region; `None` uses the default chain (env, profile, IMDS).
    pub region: Option<String>,
    /// Endpoint override for ELBv2 (emulators, VPC endpoints).
    pub endpoint_url: Option<String>,
    /// Named profile from the shared config files.
    pub profile: Option<String>,
    /// Cap on attempts per AWS call, including the first (our retries; the SDK's are off);
    /// 0: no cap, `retry_window` decides.
    pub max_attempts: u32,
    /// First backoff delay in milliseconds; grows exponentially with jitter.
    pub initial_backoff_ms: u64,
    /// How long a call failing with a retryable error (throttling, 5xx, timeout, connection)
    /// is tried again (humantime, at most 30m).
    #[serde(with = "humantime_serde")]
    pub retry_window: Duration,
}

impl Default for AwsSettings {
    fn default() -> Self {
        Self {
            region: None,
            endpoint_url: None,
            profile: None,
            max_attempts: 0,
            initial_backoff_ms: 200,
            retry_window: crate::action::retry::DEFAULT_WINDOW,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_strict_with_defaults() {
        let s: AwsSettings = serde_json::from_value(serde_json::json!({"region": "eu-west-1"})).unwrap();
        assert_eq!(s.max_attempts, 0, "no cap: the retry window decides");
        assert_eq!(s.initial_backoff_ms, 200);
        assert_eq!(s.retry_window, Duration::from_secs(120));
        let s: AwsSettings = serde_json::from_value(serde_json::json!({"retry_window": "5m"})).unwrap();
        assert_eq!(s.retry_window, Duration::from_secs(300));
        assert!(serde_json::from_value::<AwsSettings>(serde_json::json!({"retries": 3})).is_err());
    }
}
