//! Settings: a YAML file (`--config PATH`) plus environment overrides, validated at start-up.
//!
//! Layering uses the `config` crate: the file, then `ROLLBACK_RESPONDER__SECTION__KEY`
//! variables. The file is first parsed strictly on its own so that a typo is reported with its
//! line. Secrets come from the file, the environment, or a `*_file` path (Kubernetes Secret
//! mounts) and are held as `secrecy` types so they never reach a log. Every external system's
//! base URL lives here: that is the seam tests use to point the service at loopback peers.
//! `std::env` is read only in this module.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::policy::RateLimit;

/// The default listen address (loopback: see [`Settings::listen_addr`]).
pub const DEFAULT_PORT: u16 = 9095;
/// Environment variable prefix for overrides.
pub const ENV_PREFIX: &str = "ROLLBACK_RESPONDER";

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

/// Text for people, JSON for log pipelines.
#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The longest duration any setting takes.
const MAX_SETTING_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// A configuration problem: where, what, and how to fix it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Settings with secrets resolved and defaults filled in: what the service runs on.
#[derive(Debug)]
pub struct Resolved {
    pub settings: Settings,
    pub store_url: SecretString,
    pub policies_dir: PathBuf,
    pub webhook_bearer: Option<SecretString>,
    pub webhook_basic: Option<(String, SecretString)>,
    pub listen: SocketAddr,
    /// Where the settings came from, for the start-up log.
    pub source: String,
    pub api_token: Option<SecretString>,
    /// The read-only views' token (`api.read_token`).
    pub read_token: Option<SecretString>,
    pub slack_token: Option<SecretString>,
    pub slack_signing_secret: Option<SecretString>,
    pub pagerduty_key: Option<SecretString>,
    pub pagerduty_action_token: Option<SecretString>,
    pub statuspage_key: Option<SecretString>,
}

impl Resolved {
    /// True when Alertmanager must present credentials.
    pub fn webhook_auth_configured(&self) -> bool {
        self.webhook_bearer.is_some() || self.webhook_basic.is_some()
    }
}

/// Loads the file (if any) and the environment, then validates.
pub fn load(path: Option<&Path>, listen_override: Option<SocketAddr>) -> Result<Resolved, ConfigError> {
    let env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
        .collect();
    load_from(path, listen_override, env)
}

/// [`load`] with the environment passed in (tests).
pub fn load_from(
    path: Option<&Path>,
    listen_override: Option<SocketAddr>,
    env: Vec<(String, String)>,
) -> Result<Resolved, ConfigError> {
    let mut builder = config::Config::builder();
    // The global rate limit's default as keys of their own, so that an override of one of its
    // fields (ROLLBACK_RESPONDER__SAFETY__MAX_ROLLBACKS__COUNT=3) keeps the other.
    if let Some(d) = SafetySettings::default().max_rollbacks {
        builder = builder
            .set_default("safety.max_rollbacks.count", d.count)
            .and_then(|b| {
                b.set_default(
                    "safety.max_rollbacks.per",
                    humantime::format_duration(d.per).to_string(),
                )
            })
            .map_err(|e| ConfigError(e.to_string()))?;
    }
    if let Some(p) = path {
        let text = std::fs::read_to_string(p)
            .map_err(|e| ConfigError(format!("{}: cannot read the config file: {e}", p.display())))?;
        // Strict parse of the file alone first: serde_norway knows lines, `config` does not.
        // A field missing from the file may still come from the environment (a secret or a
        // page id injected by the deployment): that is judged after the merge below.
        match serde_norway::from_str::<Settings>(&text) {
            Ok(_) => {}
            Err(e) if e.to_string().contains("missing field") => {}
            Err(e) => {
                let line = e.location().map(|l| l.line()).unwrap_or(1);
                let msg = hide_values(&e.to_string());
                let msg = msg.split(" at line ").next().unwrap_or(&msg);
                return Err(ConfigError(format!(
                    "{}:{line}: {msg} (see deploy/config.example.yaml for every key)",
                    p.display()
                )));
            }
        }
        builder = builder.add_source(config::File::from(p).format(config::FileFormat::Yaml));
    }
    // Secrets from the environment are kept exactly as given: the environment source would
    // read `00123` as the number 123. So they bypass it, as strings.
    let (secrets, env): (Vec<_>, Vec<_>) = env
        .into_iter()
        .partition(|(k, _)| env_key(k).is_some_and(|k| is_secret_key(&k)));
    for (var, value) in secrets {
        let key = env_key(&var).unwrap_or_default();
        let set = if key == "pagerduty.webhook_secrets" {
            // Comma-separated, as the other lists (secret rotation: "old,new").
            let list: Vec<String> = value.split(',').map(str::to_string).collect();
            builder.set_override(key.as_str(), list)
        } else {
            builder.set_override(key.as_str(), value)
        };
        builder = set.map_err(|e| ConfigError(format!("{var}: {}", hide_values(&e.to_string()))))?;
    }
    // Lists from the environment are comma-separated (secret rotation: "old,new").
    let mut env_source = config::Environment::with_prefix(ENV_PREFIX)
        .list_separator(",")
        .with_list_parse_key("pagerduty.webhook_secrets")
        .with_list_parse_key("safety.freeze.policies")
        .prefix_separator("__")
        .separator("__")
        .try_parsing(true);
    env_source = env_source.source(Some(env.into_iter().collect()));
    builder = builder.add_source(env_source);
    let settings: Settings = builder.build().and_then(|c| c.try_deserialize()).map_err(|e| {
        ConfigError(format!(
            "{} (environment variables are {ENV_PREFIX}__SECTION__KEY, e.g. {ENV_PREFIX}__STORE__URL)",
            hide_values(&e.to_string())
        ))
    })?;
    resolve(settings, path, listen_override)
}

/// The settings key of an environment variable (`ROLLBACK_RESPONDER__PAGERDUTY__ROUTING_KEY`
/// is `pagerduty.routing_key`), as the environment source reads it.
fn env_key(var: &str) -> Option<String> {
    let rest = var.strip_prefix(ENV_PREFIX)?.strip_prefix("__")?;
    Some(rest.split("__").collect::<Vec<_>>().join(".").to_lowercase())
}

/// Keys whose values are secrets (their `_file` siblings are paths, not secrets).
fn is_secret_key(key: &str) -> bool {
    const SECRETS: [&str; 10] = [
        "store.url",
        "webhook.bearer_token",
        "webhook.basic_auth.password",
        "api.bearer_token",
        "slack.bot_token",
        "slack.signing_secret",
        "pagerduty.routing_key",
        "pagerduty.webhook_secrets",
        "pagerduty.action_token",
        "statuspage.api_key",
    ];
    SECRETS.contains(&key) || key.starts_with("pagerduty.routing_keys.")
}

/// A deserializer's message without the value it quotes (`invalid type: string "xoxb-..",
/// expected a sequence`): the value may be a secret, and the key and the expected shape say
/// what to fix.
fn hide_values(msg: &str) -> String {
    static LITERAL: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r#"(invalid (?:type|value|length): [a-z ]*?) ?(?:"(?:[^"\\]|\\.)*"|`[^`]*`)"#)
            .expect("a valid regex")
    });
    LITERAL.replace_all(msg, "$1 (value not shown)").into_owned()
}

fn secret(value: Option<SecretString>, file: Option<&PathBuf>, key: &str) -> Result<Option<SecretString>, ConfigError> {
    match (value, file) {
        (Some(_), Some(_)) => Err(ConfigError(format!("{key}: set either {key} or {key}_file, not both"))),
        (Some(v), None) if v.expose_secret().trim().is_empty() => {
            Err(ConfigError(format!("{key}: is empty; remove it or give it a value")))
        }
        (Some(v), None) => Ok(Some(v)),
        (None, Some(f)) => {
            let text = std::fs::read_to_string(f)
                .map_err(|e| ConfigError(format!("{key}_file: cannot read {}: {e}", f.display())))?;
            let text = text.trim_end_matches(['\n', '\r']).to_string();
            if text.is_empty() {
                return Err(ConfigError(format!("{key}_file: {} is empty", f.display())));
            }
            Ok(Some(SecretString::from(text)))
        }
        (None, None) => Ok(None),
    }
}

/// Every webhook secret must have a value: an HMAC under an empty key is one anybody can
/// compute, so an empty entry (`""`, or the trailing comma of `old,new,` in the environment)
/// would let anyone sign a PagerDuty webhook.
fn webhook_secrets_ok(secrets: &[SecretString]) -> Result<(), ConfigError> {
    match secrets.iter().position(|s| s.expose_secret().trim().is_empty()) {
        Some(i) => Err(ConfigError(format!(
            "pagerduty.webhook_secrets: entry {} of {} is empty; remove it or give it a value \
             ({ENV_PREFIX}__PAGERDUTY__WEBHOOK_SECRETS is comma-separated: no empty items, no trailing comma)",
            i + 1,
            secrets.len()
        ))),
        None => Ok(()),
    }
}

fn resolve(
    settings: Settings,
    path: Option<&Path>,
    listen_override: Option<SocketAddr>,
) -> Result<Resolved, ConfigError> {
    // A misspelt level (`warning`) would otherwise be read as a target name: every event,
    // errors included, would be dropped.
    if let Err(e) = crate::telemetry::filter(&settings.log.level) {
        return Err(ConfigError(format!(
            "log.level: {e}; use {} ({ENV_PREFIX}__LOG__LEVEL, RUST_LOG overrides it)",
            crate::telemetry::LEVEL_CHOICES
        )));
    }
    let store_url = secret(
        settings.store.url.clone(),
        settings.store.url_file.as_ref(),
        "store.url",
    )?
    .unwrap_or_else(|| SecretString::from("sqlite://rollback-responder.db"));
    {
        let u = store_url.expose_secret();
        if !(u.starts_with("sqlite:") || u.starts_with("postgres://") || u.starts_with("postgresql://")) {
            return Err(ConfigError(
                "store.url: must start with sqlite:// (embedded, one replica) or postgres:// (shared by replicas)"
                    .into(),
            ));
        }
    }
    let webhook_bearer = secret(
        settings.webhook.bearer_token.clone(),
        settings.webhook.bearer_token_file.as_ref(),
        "webhook.bearer_token",
    )?;
    let webhook_basic = match &settings.webhook.basic_auth {
        Some(b) => {
            if b.username.is_empty() {
                return Err(ConfigError("webhook.basic_auth.username: is empty".into()));
            }
            let pw = secret(
                b.password.clone(),
                b.password_file.as_ref(),
                "webhook.basic_auth.password",
            )?
            .ok_or_else(|| ConfigError("webhook.basic_auth: set password or password_file".into()))?;
            Some((b.username.clone(), pw))
        }
        None => None,
    };
    let authed = webhook_bearer.is_some() || webhook_basic.is_some();
    let listen = listen_override.or(settings.server.listen).unwrap_or_else(|| {
        if authed {
            SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT))
        } else {
            SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT))
        }
    });
    if !authed && !listen.ip().is_loopback() {
        return Err(ConfigError(format!(
            "server.listen: {listen} is reachable from other hosts but no webhook credentials are configured; \
             set webhook.bearer_token (or webhook.basic_auth), or listen on 127.0.0.1"
        )));
    }
    if settings.server.body_limit_bytes < 1024 {
        return Err(ConfigError(
            "server.body_limit_bytes: at least 1024 (Alertmanager sends about 1 KiB per alert)".into(),
        ));
    }
    // Durations are added to clocks and deadlines (a lease ends at now + lease): a year is
    // more than any of them needs, and keeps every such sum far inside the calendar.
    let mut durations = vec![
        ("workers.tick", settings.workers.tick),
        ("workers.lease", settings.workers.lease),
        ("workers.decision_batch_budget", settings.workers.decision_batch_budget),
        ("server.shutdown_grace", settings.server.shutdown_grace),
        ("notifications.initial_backoff", settings.notifications.initial_backoff),
        ("notifications.max_backoff", settings.notifications.max_backoff),
    ];
    if let Some(r) = settings.safety.max_rollbacks {
        durations.push(("safety.max_rollbacks.per", r.per));
    }
    if let Some((key, d)) = durations.into_iter().find(|(_, d)| *d > MAX_SETTING_DURATION) {
        return Err(ConfigError(format!(
            "{key}: {} is too long; at most {}",
            humantime::format_duration(d),
            humantime::format_duration(MAX_SETTING_DURATION)
        )));
    }
    if settings.workers.tick.is_zero()
        || settings
            .workers
            .tick
            .checked_mul(3)
            .is_none_or(|three| settings.workers.lease < three)
    {
        return Err(ConfigError(
            "workers.lease: must be at least three ticks (workers.tick) so a live replica can renew it".into(),
        ));
    }
    if let Some(r) = settings.safety.max_rollbacks {
        if r.count == 0 || r.per.is_zero() {
            return Err(ConfigError(
                "safety.max_rollbacks: count and per must be above zero, e.g. {count: 5, per: 1h}".into(),
            ));
        }
    }
    let slack_token = match &settings.slack {
        Some(s) => Some(
            secret(s.bot_token.clone(), s.bot_token_file.as_ref(), "slack.bot_token")?
                .ok_or_else(|| ConfigError("slack.bot_token: set bot_token or bot_token_file (xoxb-...)".into()))?,
        ),
        None => None,
    };
    let api_token = secret(
        settings.api.bearer_token.clone(),
        settings.api.bearer_token_file.as_ref(),
        "api.bearer_token",
    )?;
    let read_token = secret(
        settings.api.read_token.clone(),
        settings.api.read_token_file.as_ref(),
        "api.read_token",
    )?;
    if let Some(h) = &settings.api.trusted_user_header {
        if axum::http::HeaderName::from_bytes(h.as_bytes()).is_err() {
            return Err(ConfigError(format!(
                "api.trusted_user_header: {h:?} is not a header name (e.g. X-Auth-Request-User)"
            )));
        }
    }
    if let Some(u) = &settings.server.public_url {
        match reqwest::Url::parse(u) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.query().is_none() => {}
            _ => {
                return Err(ConfigError(format!(
                    "server.public_url: {u:?} is not an http(s) base URL (e.g. https://rollback.example.com)"
                )))
            }
        }
    }
    let slack_signing_secret = match &settings.slack {
        Some(s) => secret(
            s.signing_secret.clone(),
            s.signing_secret_file.as_ref(),
            "slack.signing_secret",
        )?,
        None => None,
    };
    let pagerduty_action_token = match &settings.pagerduty {
        Some(p) => secret(
            p.action_token.clone(),
            p.action_token_file.as_ref(),
            "pagerduty.action_token",
        )?,
        None => None,
    };
    if let Some(p) = &settings.pagerduty {
        webhook_secrets_ok(&p.webhook_secrets)?;
    }
    let pagerduty_key = match &settings.pagerduty {
        Some(p) => secret(
            p.routing_key.clone(),
            p.routing_key_file.as_ref(),
            "pagerduty.routing_key",
        )?,
        None => None,
    };
    let statuspage_key = match &settings.statuspage {
        Some(s) => Some(
            secret(s.api_key.clone(), s.api_key_file.as_ref(), "statuspage.api_key")?
                .ok_or_else(|| ConfigError("statuspage.api_key: set api_key or api_key_file".into()))?,
        ),
        None => None,
    };
    for (key, url) in [
        ("slack.api_url", settings.slack.as_ref().map(|s| s.api_url.as_str())),
        (
            "pagerduty.events_url",
            settings.pagerduty.as_ref().map(|s| s.events_url.as_str()),
        ),
        (
            "statuspage.api_url",
            settings.statuspage.as_ref().map(|s| s.api_url.as_str()),
        ),
    ] {
        if let Some(u) = url {
            if !(u.starts_with("https://") || u.starts_with("http://")) {
                return Err(ConfigError(format!("{key}: must be an http(s) URL, got {u:?}")));
            }
        }
    }
    if settings.notifications.max_attempts == 0 {
        return Err(ConfigError("notifications.max_attempts: at least 1".into()));
    }
    // A message is leased while it is sent (notify::outbox): a request still running when
    // the lease ends could be sent a second time by another replica.
    let t = settings.notifications.timeout;
    if t.is_zero() || t > crate::notify::outbox::MAX_REQUEST_TIMEOUT {
        return Err(ConfigError(format!(
            "notifications.timeout: {} is out of range; use 1s to {} (a message is leased for {} while it is sent)",
            humantime::format_duration(t),
            humantime::format_duration(crate::notify::outbox::MAX_REQUEST_TIMEOUT),
            humantime::format_duration(crate::notify::outbox::DELIVERY_LEASE),
        )));
    }
    let policies_dir = settings
        .policies_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("policies"));
    let source = path
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "embedded defaults".into());
    Ok(Resolved {
        settings,
        store_url,
        policies_dir,
        webhook_bearer,
        webhook_basic,
        listen,
        source,
        api_token,
        read_token,
        slack_token,
        slack_signing_secret,
        pagerduty_key,
        pagerduty_action_token,
        statuspage_key,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn no_file_means_loopback_sqlite_and_dry_run() {
        let r = load_from(None, None, vec![]).unwrap();
        assert_eq!(r.listen.to_string(), "127.0.0.1:9095");
        assert_eq!(r.store_url.expose_secret(), "sqlite://rollback-responder.db");
        assert!(r.settings.safety.dry_run);
        assert!(!r.webhook_auth_configured());
    }

    #[test]
    fn decisions_default_to_two_millisecond_batches_and_can_be_turned_off_or_stretched() {
        let r = load_from(None, None, vec![]).unwrap();
        assert_eq!(r.settings.workers.decision_batch_budget, Duration::from_millis(2));
        assert!(r.settings.workers.decide);
        let env = vec![
            ("ROLLBACK_RESPONDER__WORKERS__DECIDE".into(), "false".into()),
            ("ROLLBACK_RESPONDER__WORKERS__DECISION_BATCH_BUDGET".into(), "1s".into()),
        ];
        let r = load_from(None, None, env).unwrap();
        assert!(!r.settings.workers.decide);
        assert_eq!(r.settings.workers.decision_batch_budget, Duration::from_secs(1));
        let env = vec![(
            "ROLLBACK_RESPONDER__WORKERS__DECISION_BATCH_BUDGET".into(),
            "soon".into(),
        )];
        let e = load_from(None, None, env).unwrap_err().to_string();
        assert!(e.contains("decision_batch_budget"), "{e}");
        let env = vec![("ROLLBACK_RESPONDER__WORKERS__DECIDE".into(), "maybe".into())];
        let e = load_from(None, None, env).unwrap_err().to_string();
        assert!(e.contains("decide"), "{e}");
    }

    #[test]
    fn typo_in_the_file_names_file_and_line() {
        let f = file("server:\n  listen: 127.0.0.1:9000\n  lisen: 1\n");
        let e = load_from(Some(f.path()), None, vec![]).unwrap_err().to_string();
        assert!(e.contains(":3: server: unknown field `lisen`"), "{e}");
    }

    #[test]
    fn environment_overrides_the_file_and_credentials_open_the_listener() {
        let f = file("store:\n  url: sqlite://a.db\n");
        let env = vec![
            ("ROLLBACK_RESPONDER__STORE__URL".into(), "postgres://db/rr".into()),
            ("ROLLBACK_RESPONDER__WEBHOOK__BEARER_TOKEN".into(), "s3cr3t".into()),
        ];
        let r = load_from(Some(f.path()), None, env).unwrap();
        assert_eq!(r.store_url.expose_secret(), "postgres://db/rr");
        assert_eq!(r.listen.to_string(), "0.0.0.0:9095");
        assert!(!format!("{r:?}").contains("s3cr3t"), "secrets must not be printable");
    }

    #[test]
    fn one_field_of_the_global_rate_limit_from_the_environment_keeps_the_other() {
        let env = vec![("ROLLBACK_RESPONDER__SAFETY__MAX_ROLLBACKS__COUNT".into(), "3".into())];
        let r = load_from(None, None, env).unwrap();
        assert_eq!(
            r.settings.safety.max_rollbacks,
            Some(RateLimit {
                count: 3,
                per: Duration::from_secs(3600)
            })
        );
        let f = file("safety:\n  max_rollbacks: {count: 2, per: 10m}\n");
        let env = vec![("ROLLBACK_RESPONDER__SAFETY__MAX_ROLLBACKS__PER".into(), "30m".into())];
        let r = load_from(Some(f.path()), None, env).unwrap();
        assert_eq!(
            r.settings.safety.max_rollbacks,
            Some(RateLimit {
                count: 2,
                per: Duration::from_secs(1800)
            })
        );
    }

    #[test]
    fn secrets_come_from_files_and_not_both() {
        let tok = file("from-file\n");
        let f = file(&format!("webhook:\n  bearer_token_file: {}\n", tok.path().display()));
        let r = load_from(Some(f.path()), None, vec![]).unwrap();
        assert_eq!(r.webhook_bearer.unwrap().expose_secret(), "from-file");
        let f = file(&format!(
            "webhook:\n  bearer_token: x\n  bearer_token_file: {}\n",
            tok.path().display()
        ));
        let e = load_from(Some(f.path()), None, vec![]).unwrap_err().to_string();
        assert!(
            e.contains("set either webhook.bearer_token or webhook.bearer_token_file"),
            "{e}"
        );
    }

    #[test]
    fn open_listener_without_credentials_is_refused_with_the_fix() {
        let e = load_from(None, Some("0.0.0.0:9095".parse().unwrap()), vec![])
            .unwrap_err()
            .to_string();
        assert!(e.contains("set webhook.bearer_token"), "{e}");
    }

    #[test]
    fn a_field_missing_from_the_file_may_come_from_the_environment() {
        let f = file("statuspage:\n  api_key: sp-key\n");
        let env = vec![("ROLLBACK_RESPONDER__STATUSPAGE__PAGE_ID".into(), "PAGE1".into())];
        let r = load_from(Some(f.path()), None, env).unwrap();
        assert_eq!(r.settings.statuspage.as_ref().unwrap().page_id, "PAGE1");
        // Missing from both: still refused.
        let e = load_from(Some(f.path()), None, vec![]).unwrap_err().to_string();
        assert!(e.contains("page_id"), "{e}");
    }

    #[test]
    fn a_notification_timeout_must_end_well_inside_the_delivery_lease() {
        for value in ["0s", "51s", "2m"] {
            let env = vec![("ROLLBACK_RESPONDER__NOTIFICATIONS__TIMEOUT".into(), value.into())];
            let e = load_from(None, None, env).unwrap_err().to_string();
            assert!(
                e.contains("notifications.timeout") && e.contains("use 1s to 50s"),
                "{value}: {e}"
            );
        }
        let env = vec![("ROLLBACK_RESPONDER__NOTIFICATIONS__TIMEOUT".into(), "50s".into())];
        assert!(load_from(None, None, env).is_ok());
    }

    #[test]
    fn empty_pagerduty_webhook_secrets_are_refused() {
        for value in ["", " ", "old,new,", "old,,new", ",new"] {
            let env = vec![("ROLLBACK_RESPONDER__PAGERDUTY__WEBHOOK_SECRETS".into(), value.into())];
            let e = load_from(None, None, env).unwrap_err().to_string();
            assert!(
                e.contains("pagerduty.webhook_secrets: entry") && e.contains("remove it or give it a value"),
                "{value:?}: {e}"
            );
        }
        let f = file("pagerduty:\n  webhook_secrets: [old, '  ']\n");
        let e = load_from(Some(f.path()), None, vec![]).unwrap_err().to_string();
        assert!(e.contains("pagerduty.webhook_secrets: entry 2 of 2 is empty"), "{e}");
        let env = vec![(
            "ROLLBACK_RESPONDER__PAGERDUTY__WEBHOOK_SECRETS".into(),
            "old,new".into(),
        )];
        let r = load_from(None, None, env).unwrap();
        let secrets = &r.settings.pagerduty.as_ref().unwrap().webhook_secrets;
        let secrets: Vec<&str> = secrets.iter().map(|s| s.expose_secret()).collect();
        assert_eq!(secrets, ["old", "new"]);
    }

    #[test]
    fn a_misspelt_log_level_is_refused_with_the_choices() {
        for value in ["warning", "information", "info,rollback_responder=verbose", ""] {
            let env = vec![("ROLLBACK_RESPONDER__LOG__LEVEL".into(), value.into())];
            let e = load_from(None, None, env).unwrap_err().to_string();
            assert!(
                e.starts_with("log.level: ") && e.contains("use trace, debug, info, warn, error or off"),
                "{value:?}: {e}"
            );
        }
        let env = vec![("ROLLBACK_RESPONDER__LOG__LEVEL".into(), "warning".into())];
        let e = load_from(None, None, env).unwrap_err().to_string();
        assert!(e.contains("\"warning\" is not a level"), "{e}");
        let f = file("log:\n  level: warning\n");
        let e = load_from(Some(f.path()), None, vec![]).unwrap_err().to_string();
        assert!(e.contains("log.level: \"warning\""), "{e}");
        for value in ["warn", "info", "debug", "info,rollback_responder=debug"] {
            let env = vec![("ROLLBACK_RESPONDER__LOG__LEVEL".into(), value.into())];
            let r = load_from(None, None, env).unwrap();
            assert_eq!(r.settings.log.level, value);
        }
        let f = file("log:\n  level: info,rollback_responder=debug\n");
        assert!(load_from(Some(f.path()), None, vec![]).is_ok());
    }

    #[test]
    fn unknown_environment_key_is_refused() {
        let e = load_from(None, None, vec![("ROLLBACK_RESPONDER__STORE__URLL".into(), "x".into())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("urll"), "{e}");
    }

    #[test]
    fn durations_too_long_for_a_clock_are_refused_by_name_not_a_panic() {
        for (key, var) in [
            ("workers.tick", "ROLLBACK_RESPONDER__WORKERS__TICK"),
            ("workers.lease", "ROLLBACK_RESPONDER__WORKERS__LEASE"),
            (
                "workers.decision_batch_budget",
                "ROLLBACK_RESPONDER__WORKERS__DECISION_BATCH_BUDGET",
            ),
            ("server.shutdown_grace", "ROLLBACK_RESPONDER__SERVER__SHUTDOWN_GRACE"),
            (
                "notifications.max_backoff",
                "ROLLBACK_RESPONDER__NOTIFICATIONS__MAX_BACKOFF",
            ),
            (
                "safety.max_rollbacks.per",
                "ROLLBACK_RESPONDER__SAFETY__MAX_ROLLBACKS__PER",
            ),
        ] {
            // Three ticks of this overflow a Duration; a lease of it overflows the calendar.
            let env = vec![(var.to_string(), "500000000000years".to_string())];
            let e = load_from(None, None, env).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("{key}: ")) && e.contains("too long"),
                "{key}: {e}"
            );
        }
        let env = vec![("ROLLBACK_RESPONDER__WORKERS__LEASE".to_string(), "300days".to_string())];
        assert!(load_from(None, None, env).is_ok());
    }

    #[test]
    fn errors_about_secret_keys_name_the_key_and_shape_never_the_value() {
        const SECRET: &str = "s3cr3t-VALUE-42";
        let files = [
            format!("pagerduty:\n  webhook_secrets: {SECRET}\n"),
            format!("pagerduty:\n  routing_keys: {SECRET}\n"),
            format!("pagerduty:\n  routing_keys: {{team: [{SECRET}]}}\n"),
            format!("slack:\n  signing_secret: {{a: {SECRET}}}\n  bot_token: {SECRET}\n"),
        ];
        for text in &files {
            let f = file(text);
            let e = load_from(Some(f.path()), None, vec![]).unwrap_err().to_string();
            assert!(!e.contains(SECRET) && !e.contains("VALUE"), "{text}: {e}");
            assert!(e.contains("pagerduty.") || e.contains("slack."), "names the key: {e}");
            assert!(e.contains("expected"), "says the shape: {e}");
        }
        for (var, value) in [
            ("ROLLBACK_RESPONDER__PAGERDUTY__ROUTING_KEYS", SECRET),
            ("ROLLBACK_RESPONDER__WEBHOOK__BASIC_AUTH", SECRET),
            ("ROLLBACK_RESPONDER__WORKERS__TICK", SECRET),
            ("ROLLBACK_RESPONDER__SERVER__BODY_LIMIT_BYTES", SECRET),
        ] {
            let e = load_from(None, None, vec![(var.into(), value.into())])
                .unwrap_err()
                .to_string();
            assert!(!e.contains(value), "{var}: {e}");
            assert!(e.contains("for key `"), "names the key: {e}");
        }
    }

    #[test]
    fn all_digit_secrets_from_the_environment_keep_their_leading_zeros() {
        let env: Vec<(String, String)> = [
            ("ROLLBACK_RESPONDER__WEBHOOK__BEARER_TOKEN", "00123"),
            ("ROLLBACK_RESPONDER__API__BEARER_TOKEN", "0000"),
            ("ROLLBACK_RESPONDER__SLACK__BOT_TOKEN", "007"),
            ("ROLLBACK_RESPONDER__SLACK__SIGNING_SECRET", "0.50"),
            ("ROLLBACK_RESPONDER__PAGERDUTY__ROUTING_KEY", "0123456789"),
            ("ROLLBACK_RESPONDER__PAGERDUTY__ROUTING_KEYS__TEAM", "000042"),
            ("ROLLBACK_RESPONDER__PAGERDUTY__WEBHOOK_SECRETS", "0011,00true"),
            ("ROLLBACK_RESPONDER__PAGERDUTY__ACTION_TOKEN", "1e3"),
            ("ROLLBACK_RESPONDER__STATUSPAGE__API_KEY", "08"),
            ("ROLLBACK_RESPONDER__STATUSPAGE__PAGE_ID", "p1"),
            ("ROLLBACK_RESPONDER__SERVER__BODY_LIMIT_BYTES", "4096"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let r = load_from(None, None, env).unwrap();
        let show = |s: &Option<SecretString>| s.as_ref().map(|s| s.expose_secret().to_string());
        assert_eq!(show(&r.webhook_bearer).as_deref(), Some("00123"));
        assert_eq!(show(&r.api_token).as_deref(), Some("0000"));
        assert_eq!(show(&r.slack_token).as_deref(), Some("007"));
        assert_eq!(show(&r.slack_signing_secret).as_deref(), Some("0.50"));
        assert_eq!(show(&r.pagerduty_key).as_deref(), Some("0123456789"));
        assert_eq!(show(&r.pagerduty_action_token).as_deref(), Some("1e3"));
        assert_eq!(show(&r.statuspage_key).as_deref(), Some("08"));
        let pd = r.settings.pagerduty.as_ref().unwrap();
        assert_eq!(pd.routing_keys["team"].expose_secret(), "000042");
        let secrets: Vec<&str> = pd.webhook_secrets.iter().map(|s| s.expose_secret()).collect();
        assert_eq!(secrets, ["0011", "00true"]);
        // Other numbers from the environment are still numbers.
        assert_eq!(r.settings.server.body_limit_bytes, 4096);
    }
}
