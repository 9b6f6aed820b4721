//! Settings: a YAML file (`--config PATH`) plus environment overrides, validated at start-up.
//!
//! Layering uses the `config` crate: the file, then `ROLLBACK_RESPONDER__SECTION__KEY`
//! variables. The file is first parsed strictly on its own so that a typo is reported with its
//! line. Secrets come from the file, the environment, or a `*_file` path (Kubernetes Secret
//! mounts) and are held as `secrecy` types so they never reach a log. Every external system's
//! base URL lives here: that is the seam tests use to point the service at loopback peers.
//! `std::env` is read only in this module.
//!
//! `settings.rs` is the file's schema (one struct per section, with defaults), `secrets.rs`
//! reads every secret setting the one way, and this file layers, validates and resolves them
//! into [`Resolved`]. The executors' sections (`aws`, `kubernetes`) are their own types; the log
//! format is telemetry's.

mod secrets;
mod settings;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

pub use crate::telemetry::LogFormat;
use secrets::{hide_values, is_secret_key, webhook_secrets_ok, SecretKey};
pub use settings::*;

/// The default listen address (loopback: see [`Settings::listen_addr`]).
pub const DEFAULT_PORT: u16 = 9095;
/// Environment variable prefix for overrides.
pub const ENV_PREFIX: &str = "ROLLBACK_RESPONDER";

/// How long a replica holds a message while it sends it. `notifications.timeout` must end
/// well inside it (this module refuses more than [`MAX_REQUEST_TIMEOUT`]) or another replica
/// could send the same message while the first request is still running.
pub const DELIVERY_LEASE: Duration = Duration::from_secs(60);
/// The longest request timeout the lease leaves room for.
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(50);

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
    let store_url = SecretKey::StoreUrl
        .read(&settings)?
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
    let webhook_bearer = SecretKey::WebhookBearerToken.read(&settings)?;
    if (settings.webhook.basic_auth.as_ref()).is_some_and(|b| b.username.is_empty()) {
        return Err(ConfigError("webhook.basic_auth.username: is empty".into()));
    }
    let webhook_basic = SecretKey::WebhookBasicAuthPassword
        .require(&settings, "webhook.basic_auth: set password or password_file")?
        .zip(settings.webhook.basic_auth.as_ref())
        .map(|(password, b)| (b.username.clone(), password));
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
    let slack_token =
        SecretKey::SlackBotToken.require(&settings, "slack.bot_token: set bot_token or bot_token_file (xoxb-...)")?;
    let api_token = SecretKey::ApiBearerToken.read(&settings)?;
    let read_token = SecretKey::ApiReadToken.read(&settings)?;
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
    let slack_signing_secret = SecretKey::SlackSigningSecret.read(&settings)?;
    let pagerduty_action_token = SecretKey::PagerdutyActionToken.read(&settings)?;
    if let Some(p) = &settings.pagerduty {
        webhook_secrets_ok(&p.webhook_secrets)?;
    }
    let pagerduty_key = SecretKey::PagerdutyRoutingKey.read(&settings)?;
    let statuspage_key =
        SecretKey::StatuspageApiKey.require(&settings, "statuspage.api_key: set api_key or api_key_file")?;
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
    if t.is_zero() || t > MAX_REQUEST_TIMEOUT {
        return Err(ConfigError(format!(
            "notifications.timeout: {} is out of range; use 1s to {} (a message is leased for {} while it is sent)",
            humantime::format_duration(t),
            humantime::format_duration(MAX_REQUEST_TIMEOUT),
            humantime::format_duration(DELIVERY_LEASE),
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
