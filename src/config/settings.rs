//! The settings file's schema: one struct per section, parsed strictly
//! (`deny_unknown_fields`), with the defaults the embedded configuration runs on. Validation
//! across fields, and the secrets' values, are [`super::load`]'s.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

use crate::policy::RateLimit;
use crate::telemetry::LogFormat;

/// Everything the service is configured with.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub server: ServerSettings,
    pub store: StoreSettings,
    /// Directory of `*.yaml` policy files.
    pub policies_dir: Option<PathBuf>,
    /// How Alertmanager authenticates (its `http_config`).
    pub webhook: WebhookAuth,
    /// Bearer token for the write API (`/api/v1/freezes`); without one that API answers 401.
    pub api: ApiAuth,
    pub safety: SafetySettings,
    /// AWS access for ALB targets; absent means ALB rollbacks are recorded, not executed.
    pub aws: Option<crate::action::alb::AwsSettings>,
    /// Kubernetes access for Kubernetes targets; absent means those rollbacks are recorded only.
    pub kubernetes: Option<crate::action::kubernetes::KubeSettings>,
    /// Slack: incident messages and threads; absent means nothing is posted.
    pub slack: Option<SlackSettings>,
    /// PagerDuty Events API v2; absent means nobody is paged by the responder.
    pub pagerduty: Option<PagerDutySettings>,
    /// Atlassian Statuspage; absent means the status page is left alone.
    pub statuspage: Option<StatuspageSettings>,
    /// Delivery retries of the notification outbox.
    pub notifications: NotificationSettings,
    /// Where verification queries go.
    pub verification: VerificationSettings,
    pub workers: WorkerSettings,
    pub log: LogSettings,
}

/// The HTTP server.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// `host:port`; default 127.0.0.1:9095 without webhook credentials, 0.0.0.0:9095 with.
    pub listen: Option<SocketAddr>,
    /// Largest webhook body accepted (413 above). Alertmanager sends about 1 KiB per alert.
    pub body_limit_bytes: usize,
    /// How long shutdown waits for work in flight before handing it over.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Where people reach this service (`https://rollback.example.com`): the base of the links
    /// to incident pages.
    pub public_url: Option<String>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: None,
            body_limit_bytes: 1024 * 1024,
            shutdown_grace: Duration::from_secs(20),
            public_url: None,
        }
    }
}

/// The database.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// `sqlite://PATH` (embedded default) or `postgres://...` (several replicas).
    pub url: Option<SecretString>,
    pub url_file: Option<PathBuf>,
    pub max_connections: u32,
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            url: None,
            url_file: None,
            max_connections: 10,
        }
    }
}

/// Alertmanager's `http_config`: a bearer token and/or basic auth.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookAuth {
    pub bearer_token: Option<SecretString>,
    pub bearer_token_file: Option<PathBuf>,
    pub basic_auth: Option<BasicAuth>,
}

/// The operator API's credential.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ApiAuth {
    pub bearer_token: Option<SecretString>,
    pub bearer_token_file: Option<PathBuf>,
    /// Token the read-only views (incident pages, `/api/v1` reads) require as a bearer token or
    /// as the password of basic auth; none (and no trusted header): they are open.
    pub read_token: Option<SecretString>,
    pub read_token_file: Option<PathBuf>,
    /// A header an SSO proxy in front of the service sets to the signed-in user (oauth2-proxy:
    /// `X-Auth-Request-User` or `X-Forwarded-User`); a request carrying it may read. Only safe
    /// when nothing but the proxy can reach the service (see the NetworkPolicy).
    pub trusted_user_header: Option<String>,
}

/// Basic auth credentials.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    pub username: String,
    #[serde(default)]
    pub password: Option<SecretString>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

/// Slack Web API access.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackSettings {
    /// Base URL of the Web API (tests point it at a loopback server).
    #[serde(default = "slack_api_url")]
    pub api_url: String,
    /// Bot token (`xoxb-...`) with chat:write.
    #[serde(default)]
    pub bot_token: Option<SecretString>,
    #[serde(default)]
    pub bot_token_file: Option<PathBuf>,
    /// Channel for policies that name none.
    #[serde(default)]
    pub default_channel: Option<String>,
    /// Signing secret that Slack signs slash commands and button clicks with; without it
    /// `/slack/commands` and `/slack/interactions` answer 401.
    #[serde(default)]
    pub signing_secret: Option<SecretString>,
    #[serde(default)]
    pub signing_secret_file: Option<PathBuf>,
}

fn slack_api_url() -> String {
    "https://slack.com/api".into()
}

/// PagerDuty Events API v2.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PagerDutySettings {
    /// Base URL of the Events API.
    #[serde(default = "pagerduty_events_url")]
    pub events_url: String,
    /// Integration (routing) key for policies that name none.
    #[serde(default)]
    pub routing_key: Option<SecretString>,
    #[serde(default)]
    pub routing_key_file: Option<PathBuf>,
    /// Named routing keys that policies refer to (`notify.pagerduty.routing_key: NAME`).
    #[serde(default)]
    pub routing_keys: std::collections::BTreeMap<String, SecretString>,
    /// Webhook v3 subscription secrets; several during a rotation.
    #[serde(default)]
    pub webhook_secrets: Vec<SecretString>,
    /// Bearer token for `/pagerduty/action` (incident workflows' "send webhook", unsigned).
    #[serde(default)]
    pub action_token: Option<SecretString>,
    #[serde(default)]
    pub action_token_file: Option<PathBuf>,
}

fn pagerduty_events_url() -> String {
    "https://events.pagerduty.com".into()
}

/// Statuspage REST API v1.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatuspageSettings {
    #[serde(default = "statuspage_api_url")]
    pub api_url: String,
    #[serde(default)]
    pub api_key: Option<SecretString>,
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    pub page_id: String,
}

fn statuspage_api_url() -> String {
    "https://api.statuspage.io/v1".into()
}

/// Outbox delivery retries: exponential backoff with jitter, then a permanent failure that
/// is recorded in the incident's timeline.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotificationSettings {
    pub max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Per-request timeout towards Slack, PagerDuty and Statuspage.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for NotificationSettings {
    fn default() -> Self {
        NotificationSettings {
            max_attempts: 12,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Verification after a rollback.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct VerificationSettings {
    /// Prometheus base URL for the policies' `verification.prometheus` queries.
    pub prometheus_url: Option<String>,
}

/// Guards that span all policies.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SafetySettings {
    /// Record what would be done, change nothing. On unless the config says otherwise.
    pub dry_run: bool,
    /// At most this many rollbacks across all policies in the window.
    pub max_rollbacks: Option<RateLimit>,
    /// Kill switch in the config: hold automatic rollbacks globally or for named policies.
    pub freeze: ConfigFreeze,
}

/// Freezes set in the config file (the API and Slack set run-time ones).
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct ConfigFreeze {
    pub global: bool,
    pub policies: Vec<String>,
    pub reason: Option<String>,
}

impl Default for SafetySettings {
    fn default() -> Self {
        SafetySettings {
            dry_run: true,
            max_rollbacks: Some(RateLimit {
                count: 5,
                per: Duration::from_secs(3600),
            }),
            freeze: ConfigFreeze::default(),
        }
    }
}

/// Background loops.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    /// How often due incidents and orphaned work are looked for.
    #[serde(with = "humantime_serde")]
    pub tick: Duration,
    /// How long a replica's claim on an incident lasts without renewal.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// This replica's name in claims and the audit trail (default: hostname and pid).
    pub replica_id: Option<String>,
    /// How long one batch of alert decisions may hold its transaction (on SQLite, webhook
    /// intake waits behind it). A batch also ends after 32 alerts. `bench/callgrind.sh` sets a
    /// long one: under valgrind the service runs ~50 times slower, and 2 ms would cut every
    /// batch to one alert, which it never is natively.
    #[serde(with = "humantime_serde")]
    pub decision_batch_budget: Duration,
    /// Whether this replica decides the alerts it stores. `false` makes an intake-only
    /// replica: alerts are stored (and answered) and wait, pending, for a replica that decides
    /// (PostgreSQL) or for the next start. `bench/callgrind.sh` uses it to count intake alone.
    pub decide: bool,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            tick: Duration::from_secs(1),
            lease: Duration::from_secs(30),
            replica_id: None,
            decision_batch_budget: Duration::from_millis(2),
            decide: true,
        }
    }
}

/// Log output.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A level (`trace`, `debug`, `info`, `warn`, `error`, `off`) or a tracing filter, e.g.
    /// `info,rollback_responder=debug`; anything else is refused at load (see
    /// [`crate::telemetry::filter`]).
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}
