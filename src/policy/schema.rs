//! The policy file's schema: what a policy says (triggers, guards, approval, verification,
//! notification routes, links), parsed strictly, with its defaults. Checks across fields and
//! loading the files are [`super::load`]'s.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Matcher, Target};

/// One policy file: a service, the alerts that matter for it, and how to roll it back.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Unique across all files; used in commands (`/rollback now NAME`), metrics and the API.
    pub name: String,
    pub service: String,
    #[serde(default)]
    pub description: String,
    /// Conditions every trigger of this policy shares (usually the service label).
    #[serde(default)]
    pub matchers: Vec<Matcher>,
    /// What a rollback reverts. YAML writes enums as `alb: {...}` maps, not `!alb` tags.
    #[serde(with = "serde_norway::with::singleton_map_recursive")]
    pub target: Target,
    /// Which alerts roll back, after how long, automatically or with approval. First match wins.
    pub triggers: Vec<Trigger>,
    #[serde(default)]
    pub guards: Guards,
    #[serde(default)]
    pub approval: Option<Approval>,
    #[serde(default)]
    pub verification: Verification,
    #[serde(default)]
    pub notify: Notify,
    #[serde(default)]
    pub links: Links,
    /// What a rollback leaves to people (database restore, DNS, cache): listed in the
    /// incident's messages once the rollback has run. Checked in `follow_ups.rs`.
    #[serde(default)]
    pub follow_ups: Vec<String>,
}

/// One alert condition and the mode of rollback it calls for.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub matchers: Vec<Matcher>,
    /// How long the alert must have been firing (since its `startsAt`) before anything happens.
    #[serde(rename = "for", default, with = "humantime_serde")]
    pub for_: Duration,
    #[serde(with = "serde_norway::with::singleton_map")]
    pub mode: Mode,
    /// ALB only: this trigger's own immediate (`none`) or stepwise revert, instead of the
    /// target's `gradual` (seed 003: immediate and graceful triggers for the same traffic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gradual: Option<super::target::alb::GradualChoice>,
}

/// How a trigger rolls back.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Mode {
    /// Roll back without asking (seed 004: health failing > 2 min, 5xx > 5 % for 5 min).
    Auto,
    /// Ask the approvers and wait (seed 004: "engineering judgment").
    Manual,
    /// Ask now; roll back automatically if still firing this long after it started
    /// (seed 002's HIGH tier: "roll back if not resolved in 30 min").
    AutoAfter(#[serde(with = "humantime_serde")] Duration),
}

/// Safety limits on automatic and manual rollbacks.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Guards {
    /// No second rollback of the same target within this time of the last one.
    #[serde(default = "default_cooldown", with = "humantime_serde")]
    pub cooldown: Duration,
    /// At most this many rollbacks by this policy within the window.
    #[serde(default)]
    pub max_rollbacks: Option<RateLimit>,
    /// Record exactly what would be done; change nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Periods in which automatic rollbacks are suppressed (humans can still approve).
    #[serde(default)]
    pub freeze_windows: Vec<FreezeWindow>,
}

impl Default for Guards {
    fn default() -> Self {
        Guards {
            cooldown: default_cooldown(),
            max_rollbacks: None,
            dry_run: false,
            freeze_windows: vec![],
        }
    }
}

fn default_cooldown() -> Duration {
    Duration::from_secs(30 * 60)
}

/// `count` rollbacks per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub count: u32,
    #[serde(with = "humantime_serde")]
    pub per: Duration,
}

/// A change freeze: automatic rollbacks are held between `start` and `end`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FreezeWindow {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    #[serde(default)]
    pub reason: String,
}

/// Who may approve, how many must, and what happens when nobody does.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    pub approvers: Approvers,
    /// 1, or 2 for a two-person rule (distinct people).
    #[serde(default = "one_u8")]
    pub required_approvals: u8,
    #[serde(default = "default_approval_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    pub on_timeout: OnTimeout,
}

fn one_u8() -> u8 {
    1
}

fn default_approval_timeout() -> Duration {
    Duration::from_secs(15 * 60)
}

/// Identities allowed to approve, deny or start a rollback.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Approvers {
    #[serde(default)]
    pub slack_users: Vec<String>,
    #[serde(default)]
    pub slack_groups: Vec<String>,
    #[serde(default)]
    pub pagerduty_users: Vec<String>,
}

/// The explicit action when an approval request expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// Page the escalation target; do not roll back.
    Escalate,
    /// Roll back as if approved (seed 002: "roll back if not resolved in 30 min").
    Rollback,
    /// Close the request; do nothing more.
    GiveUp,
}

/// How to prove a rollback worked: every configured check holds through the whole `bake`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Verification {
    /// How long every check must hold; `verified` is said at its end, never before.
    #[serde(default = "default_bake", with = "humantime_serde")]
    pub bake: Duration,
    /// Bad samples a check may have after its first good one before verification fails.
    #[serde(default)]
    pub allowed_bad_samples: u32,
    /// End the bake at the first failed check (the default); `false` samples every check to
    /// the end of the bake for the evidence, and the verdict is the same.
    #[serde(default = "yes")]
    pub fail_fast: bool,
    /// How often the Prometheus query, the target's read-back and the alert are sampled (the
    /// health probe has its own `interval`); a bake shorter than this samples once at its end.
    #[serde(default = "default_sample_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default)]
    pub health_probe: Option<HealthProbe>,
    #[serde(default)]
    pub prometheus: Option<PrometheusCheck>,
    /// Wait for the triggering alert's resolved notification.
    #[serde(default)]
    pub alert_resolves: bool,
}

impl Default for Verification {
    fn default() -> Self {
        Verification {
            bake: default_bake(),
            allowed_bad_samples: 0,
            fail_fast: true,
            interval: default_sample_interval(),
            health_probe: None,
            prometheus: None,
            alert_resolves: false,
        }
    }
}

fn default_bake() -> Duration {
    Duration::from_secs(5 * 60)
}

fn default_sample_interval() -> Duration {
    Duration::from_secs(10)
}

/// `curl -f` with patience: N consecutive successes.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthProbe {
    pub url: String,
    #[serde(default = "default_status")]
    pub expected_status: u16,
    #[serde(default = "default_successes")]
    pub successes: u32,
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "default_probe_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_status() -> u16 {
    200
}
fn default_successes() -> u32 {
    3
}
fn default_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_probe_timeout() -> Duration {
    Duration::from_secs(2)
}

/// An instant query whose value must stay below (or above) a bound.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PrometheusCheck {
    pub query: String,
    #[serde(default)]
    pub below: Option<f64>,
    #[serde(default)]
    pub above: Option<f64>,
}

/// Where this policy's incidents are reported; absent sections fall back to config defaults.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Notify {
    #[serde(default)]
    pub slack: Option<SlackRoute>,
    #[serde(default)]
    pub pagerduty: Option<PagerDutyRoute>,
    #[serde(default)]
    pub statuspage: Option<StatuspageRoute>,
    /// Who is mentioned when a rollback fails or verification fails.
    #[serde(default)]
    pub escalation: Option<Escalation>,
}

/// A Slack channel for the incident's message and thread.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SlackRoute {
    pub channel: String,
}

/// PagerDuty Events API v2 routing.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PagerDutyRoute {
    pub severity: Severity,
    /// Name of a routing key under `pagerduty.routing_keys` in the config (keys are secrets).
    #[serde(default)]
    pub routing_key: Option<String>,
}

/// PagerDuty's event severities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Critical,
    Error,
    Warning,
    Info,
}

/// Statuspage components to mark while the rollback runs.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StatuspageRoute {
    /// component id -> status while degraded.
    pub components: BTreeMap<String, ComponentStatus>,
    #[serde(default = "yes")]
    pub deliver_notifications: bool,
}

fn yes() -> bool {
    true
}

/// Statuspage component states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ComponentStatus {
    Operational,
    DegradedPerformance,
    PartialOutage,
    MajorOutage,
    UnderMaintenance,
}

/// The human target of an escalation.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Escalation {
    /// A Slack mention, e.g. `<!subteam^S0PLATFORM>` or `<@U0ONCALL>`.
    pub slack_mention: String,
}

/// Links put into every message.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Links {
    #[serde(default)]
    pub runbook: Option<String>,
    #[serde(default)]
    pub dashboard: Option<String>,
}
