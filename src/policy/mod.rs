//! Policy files: what to do about which alert, for which service, under which guards.
//!
//! `policies/*.yaml` are loaded here ([`PolicySet::load_dir`]), parsed strictly (unknown keys
//! are errors, every error names file and line) and checked. [`decide`] is the pure step that
//! turns an alert, the incident history and the loaded set into a [`Decision`]; the responder
//! stores that decision and acts on it. Nothing in this module does I/O beyond reading the files.

mod decide;
mod matcher;
pub mod target;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use decide::{
    checked_after, decide, decide_manual, find, holds_automatic, saturating_after, Decision, Freeze, FreezeState,
    GlobalGuards, History, Outcome, Suppression,
};
pub use matcher::{all_match, MatchOp, Matcher};

use crate::action::Target;
use crate::alert::LabelSet;

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
    pub gradual: Option<target::alb::GradualChoice>,
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

impl Policy {
    /// `planned` (the incident's target) with the immediate or stepwise choice of `trigger`,
    /// the trigger that names the incident when the action runs: its own `gradual` if it has
    /// one, else this policy's target's. Chosen then, not when the incident opened, so a
    /// graceful request promoted by an immediate trigger shifts at once (seed 003).
    pub fn with_trigger_gradual(&self, planned: Target, trigger: Option<&str>) -> Target {
        match planned {
            Target::Alb(mut t) => {
                let own = match &self.target {
                    Target::Alb(p) => p.gradual.clone(),
                    Target::Kubernetes(_) => t.gradual.clone(),
                };
                let choice = trigger
                    .and_then(|name| self.triggers.iter().find(|x| x.name == name))
                    .and_then(|x| x.gradual.as_ref());
                t.gradual = match choice {
                    Some(c) => c.shift().cloned(),
                    None => own,
                };
                Target::Alb(t)
            }
            other => other,
        }
    }

    /// Cross-field checks serde cannot express: `(text to locate in the file, message)`.
    fn check(&self) -> Vec<(String, String)> {
        let mut errs = Vec::new();
        let mut err = |at: &str, msg: String| errs.push((at.to_string(), msg));
        if self.name.trim().is_empty() {
            err("name:", "name: give the policy a name".into());
        }
        if self.triggers.is_empty() {
            err("triggers:", "triggers: list at least one trigger".into());
        }
        let mut seen = HashSet::new();
        for t in &self.triggers {
            if !seen.insert(t.name.as_str()) {
                err(
                    &t.name,
                    format!(
                        "triggers: trigger name {:?} is used twice; names must be unique",
                        t.name
                    ),
                );
            }
            if t.matchers.is_empty() && self.matchers.is_empty() {
                err(&t.name, format!("triggers[{}].matchers: a trigger with no matchers would match every alert; add at least alertname=\"...\"", t.name));
            }
            if let Mode::AutoAfter(d) = t.mode {
                if d < t.for_ {
                    err(&t.name, format!("triggers[{}].mode.auto_after ({}) is shorter than for ({}): make auto_after at least as long", t.name, humantime::format_duration(d), humantime::format_duration(t.for_)));
                }
            }
            match (&t.gradual, &self.target) {
                (Some(_), Target::Kubernetes(_)) => err(
                    &t.name,
                    format!("triggers[{}].gradual only applies to an ALB target: remove it", t.name),
                ),
                (Some(target::alb::GradualChoice::Shift(g)), _) => {
                    if let Err(e) = g.validate() {
                        err(&t.name, format!("triggers[{}].{e}", t.name));
                    }
                }
                _ => {}
            }
            if matches!(t.mode, Mode::Manual | Mode::AutoAfter(_)) && self.approval.is_none() {
                err(&t.name, format!("triggers[{}] needs approval but the policy has no approval section: add approval.approvers and approval.on_timeout", t.name));
            }
        }
        if let Err(e) = self.target.validate() {
            err("target:", e);
        }
        if let Some(a) = &self.approval {
            let count =
                a.approvers.slack_users.len() + a.approvers.slack_groups.len() + a.approvers.pagerduty_users.len();
            if count == 0 {
                err(
                    "approvers:",
                    "approval.approvers: name at least one slack user, slack group or pagerduty user".into(),
                );
            }
            if !(1..=2).contains(&a.required_approvals) {
                err(
                    "required_approvals:",
                    "approval.required_approvals: use 1, or 2 for a two-person rule".into(),
                );
            }
            if a.timeout.is_zero() {
                err("timeout:", "approval.timeout: must be longer than 0s, e.g. 15m".into());
            }
        }
        if let Some(r) = &self.guards.max_rollbacks {
            if r.count == 0 || r.per.is_zero() {
                err(
                    "max_rollbacks:",
                    "guards.max_rollbacks: count and per must be above zero, e.g. {count: 2, per: 1h}".into(),
                );
            }
        }
        for w in &self.guards.freeze_windows {
            if w.end <= w.start {
                err(
                    "freeze_windows:",
                    format!(
                        "guards.freeze_windows: window starting {} ends before it starts",
                        w.start
                    ),
                );
            }
        }
        if self.verification.interval.is_zero() {
            err(
                "interval:",
                "verification.interval: must be above zero, e.g. 10s".into(),
            );
        }
        if let Some(p) = &self.verification.health_probe {
            if p.interval.is_zero() {
                err(
                    "interval:",
                    "verification.health_probe.interval: must be above zero, e.g. 10s".into(),
                );
            }
            if !(p.url.starts_with("http://") || p.url.starts_with("https://")) {
                err(
                    "health_probe:",
                    "verification.health_probe.url: must be an http:// or https:// URL".into(),
                );
            }
            if p.successes == 0 {
                err("successes:", "verification.health_probe.successes: at least 1".into());
            }
        }
        if let Some(p) = &self.verification.prometheus {
            if p.below.is_none() == p.above.is_none() {
                err(
                    "prometheus:",
                    "verification.prometheus: give exactly one of `below` or `above`".into(),
                );
            }
        }
        errs
    }
}

/// One error in one policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for PolicyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

/// All policies in force, with the hash of the files they came from.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PolicySet {
    pub policies: Vec<LoadedPolicy>,
    /// sha256 over every file's name and content, in name order: decisions record it.
    pub hash: String,
    pub dir: PathBuf,
    /// Findings that do not refuse the set (`policy check` prints them): triggers that can
    /// never match because an earlier policy takes every alert they would.
    #[serde(skip)]
    pub warnings: Vec<PolicyError>,
}

/// A policy and where it came from.
#[derive(Debug, Clone, Serialize)]
pub struct LoadedPolicy {
    pub file: PathBuf,
    #[serde(flatten)]
    pub policy: Policy,
}

impl PolicySet {
    /// Loads every `*.yaml`/`*.yml` in `dir` (sorted by name). Returns every error found,
    /// each with file and line; a set with any error is refused as a whole.
    pub fn load_dir(dir: &Path) -> Result<PolicySet, Vec<PolicyError>> {
        let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
                .collect(),
            Err(e) => {
                return Err(vec![PolicyError {
                    file: dir.to_path_buf(),
                    line: 0,
                    message: format!(
                        "cannot read the policy directory: {e} (set policies_dir in the config or pass the directory)"
                    ),
                }])
            }
        };
        // No policy means no rollback, ever: a wrong directory must not look like a quiet day.
        if files.is_empty() {
            return Err(vec![PolicyError {
                file: dir.to_path_buf(),
                line: 0,
                message: "no policy files (*.yaml, *.yml) here: add one (see policies/portal-api.yaml and docs/policies.md) or point policies_dir at the right directory".into(),
            }]);
        }
        files.sort();
        let mut sources = Vec::new();
        for f in files {
            match std::fs::read_to_string(&f) {
                Ok(text) => sources.push((f, text)),
                Err(e) => {
                    return Err(vec![PolicyError {
                        file: f,
                        line: 0,
                        message: format!("cannot read: {e}"),
                    }])
                }
            }
        }
        Self::from_sources(dir, sources)
    }

    /// Parses already-read files; see [`PolicySet::load_dir`].
    pub fn from_sources(dir: &Path, sources: Vec<(PathBuf, String)>) -> Result<PolicySet, Vec<PolicyError>> {
        let mut errors = Vec::new();
        let mut policies: Vec<LoadedPolicy> = Vec::new();
        let mut hasher = Sha256::new();
        for (file, text) in &sources {
            hasher.update(
                file.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
                    .as_bytes(),
            );
            hasher.update([0u8]);
            hasher.update(text.as_bytes());
            hasher.update([0u8]);
            match serde_norway::from_str::<Policy>(text) {
                Ok(policy) => {
                    for (at, message) in policy.check() {
                        errors.push(PolicyError {
                            file: file.clone(),
                            line: locate(text, &at),
                            message,
                        });
                    }
                    if let Some(other) = policies.iter().find(|p| p.policy.name == policy.name) {
                        errors.push(PolicyError {
                            file: file.clone(),
                            line: locate(text, "name:"),
                            message: format!(
                                "name: policy {:?} is already defined in {}; names must be unique",
                                policy.name,
                                other.file.display()
                            ),
                        });
                    }
                    policies.push(LoadedPolicy {
                        file: file.clone(),
                        policy,
                    });
                }
                Err(e) => {
                    let line = e.location().map(|l| l.line()).unwrap_or(1);
                    // serde's message carries "at line N column M" already; keep only the what.
                    let msg = e.to_string();
                    let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
                    errors.push(PolicyError {
                        file: file.clone(),
                        line,
                        message: explain(&msg),
                    });
                }
            }
        }
        if errors.is_empty() {
            let hash = hex::encode(hasher.finalize());
            let warnings = shadowed(&policies, &sources);
            Ok(PolicySet {
                policies,
                hash: hash[..16].to_string(),
                dir: dir.to_path_buf(),
                warnings,
            })
        } else {
            Err(errors)
        }
    }

    /// The policy with this name.
    pub fn get(&self, name: &str) -> Option<&Policy> {
        self.policies.iter().map(|p| &p.policy).find(|p| p.name == name)
    }

    /// Policies in file order.
    pub fn iter(&self) -> impl Iterator<Item = &Policy> {
        self.policies.iter().map(|p| &p.policy)
    }
}

/// Triggers that can never match. An alert falls under the first policy (file order) whose
/// matchers and one of whose triggers' matchers all match. If an earlier policy has a trigger
/// whose matchers, with its policy's, are the same as or a subset of a later trigger's (with
/// its policy's), every alert the later trigger matches is taken by the earlier one first
/// (the usual case: a copied file with the same matcher list). Only identical matchers are
/// compared; a regex that happens to cover another is not detected.
fn shadowed(policies: &[LoadedPolicy], sources: &[(PathBuf, String)]) -> Vec<PolicyError> {
    let text_of = |file: &Path| {
        sources
            .iter()
            .find(|(f, _)| f == file)
            .map(|(_, t)| t.as_str())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for (i, later) in policies.iter().enumerate() {
        let p = &later.policy;
        let mut hidden = Vec::new();
        for t in &p.triggers {
            let conditions: Vec<&Matcher> = p.matchers.iter().chain(&t.matchers).collect();
            let by = policies[..i].iter().find_map(|earlier| {
                earlier
                    .policy
                    .triggers
                    .iter()
                    .find(|et| {
                        earlier
                            .policy
                            .matchers
                            .iter()
                            .chain(&et.matchers)
                            .all(|m| conditions.contains(&m))
                    })
                    .map(|et| (earlier, et))
            });
            if let Some(by) = by {
                hidden.push((t, by));
            }
        }
        let text = text_of(&later.file);
        if !hidden.is_empty() && hidden.len() == p.triggers.len() {
            let (_, (earlier, _)) = hidden[0];
            out.push(PolicyError {
                file: later.file.clone(),
                line: locate(text, "name:"),
                message: format!(
                    "warning: policy {:?} can never match: policy {:?} ({}) comes first in file order and matches every alert its triggers match (its matchers are the same, or fewer); give the two policies different matchers (e.g. a label that tells their targets apart) or merge them",
                    p.name,
                    earlier.policy.name,
                    earlier.file.display()
                ),
            });
        } else {
            for (t, (earlier, et)) in hidden {
                out.push(PolicyError {
                    file: later.file.clone(),
                    line: locate(text, &t.name),
                    message: format!(
                        "warning: triggers[{}] can never match: trigger {:?} of policy {:?} ({}) comes first in file order and matches every alert it matches (its matchers are the same, or fewer)",
                        t.name,
                        et.name,
                        earlier.policy.name,
                        earlier.file.display()
                    ),
                });
            }
        }
    }
    out
}

/// Adds the fix to serde's terse messages where one is obvious.
fn explain(msg: &str) -> String {
    if msg.contains("unknown field") {
        format!("{msg} (check the spelling; the schema is in docs/policies.md)")
    } else if msg.contains("invalid type") || msg.contains("expected") {
        format!("{msg} (see docs/policies.md for the expected shape)")
    } else {
        msg.to_string()
    }
}

/// The 1-based line of the first occurrence of `needle`, or 1.
fn locate(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or(1)
}

/// Labels that identify a policy's match for display: `alertname` first.
pub fn describe_labels(labels: &LabelSet) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(n) = labels.get("alertname") {
        parts.push(n.clone());
    }
    parts.extend(
        labels
            .iter()
            .filter(|(k, _)| k.as_str() != "alertname")
            .map(|(k, v)| format!("{k}={v}")),
    );
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "name: web
service: web
target:
  alb:
    listener_arn: arn:aws:elasticloadbalancing:us-east-1:1:listener/app/web/1/2
    stable_target_group_arn: arn:aws:elasticloadbalancing:us-east-1:1:targetgroup/web-stable/1
triggers:
  - name: errors
    matchers: ['alertname=\"HighErrorRate\"']
    for: 5m
    mode: auto
";

    fn load(text: &str) -> Result<PolicySet, Vec<PolicyError>> {
        PolicySet::from_sources(Path::new("p"), vec![(PathBuf::from("p/web.yaml"), text.to_string())])
    }

    #[test]
    fn minimal_policy_loads_with_defaults() {
        let set = load(MINIMAL).unwrap();
        let p = set.get("web").unwrap();
        assert_eq!(p.guards.cooldown, Duration::from_secs(1800));
        assert_eq!(p.triggers[0].for_, Duration::from_secs(300));
        assert_eq!(set.hash.len(), 16);
    }

    #[test]
    fn unknown_key_is_reported_with_file_and_line() {
        let text = MINIMAL.replace("    for: 5m", "    for: 5m\n    fro: 5m");
        let errs = load(&text).unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].line, 11, "{}", errs[0]);
        assert!(errs[0].to_string().starts_with("p/web.yaml:11: "), "{}", errs[0]);
        assert!(errs[0].message.contains("unknown field `fro`"), "{}", errs[0]);
    }

    #[test]
    fn bad_matcher_regex_is_reported_at_its_line() {
        let text = MINIMAL.replace("alertname=\"HighErrorRate\"", "alertname=~\"(\"");
        let errs = load(&text).unwrap_err();
        assert!(errs[0].message.contains("invalid regular expression"), "{}", errs[0]);
        assert_eq!(errs[0].line, 9, "{}", errs[0]);
    }

    #[test]
    fn manual_trigger_without_approval_is_refused_with_the_fix() {
        let errs = load(&MINIMAL.replace("mode: auto", "mode: manual")).unwrap_err();
        assert!(errs[0].message.contains("add approval.approvers"), "{}", errs[0]);
        assert_eq!(errs[0].line, 8);
    }

    #[test]
    fn bad_duration_names_the_line() {
        let errs = load(&MINIMAL.replace("for: 5m", "for: five minutes")).unwrap_err();
        assert_eq!(errs[0].line, 10, "{}", errs[0]);
    }

    #[test]
    fn duplicate_policy_names_across_files_are_refused() {
        let errs = PolicySet::from_sources(
            Path::new("p"),
            vec![
                (PathBuf::from("p/a.yaml"), MINIMAL.to_string()),
                (PathBuf::from("p/b.yaml"), MINIMAL.to_string()),
            ],
        )
        .unwrap_err();
        assert!(
            errs[0]
                .to_string()
                .starts_with("p/b.yaml:1: name: policy \"web\" is already defined in p/a.yaml"),
            "{}",
            errs[0]
        );
    }

    fn two(a: &str, b: &str) -> Result<PolicySet, Vec<PolicyError>> {
        PolicySet::from_sources(
            Path::new("p"),
            vec![
                (PathBuf::from("p/a.yaml"), a.into()),
                (PathBuf::from("p/b.yaml"), b.into()),
            ],
        )
    }

    fn policy(name: &str, matchers: &str, triggers: &[(&str, &str)]) -> String {
        let mut s = format!(
            "name: {name}\nservice: s\nmatchers: {matchers}\ntarget: {{alb: {{listener_arn: \"arn:aws:elasticloadbalancing:us-east-1:1:listener/app/x/1/2\", stable_target_group_arn: \"arn:aws:elasticloadbalancing:us-east-1:1:targetgroup/s/1\"}}}}\ntriggers:\n"
        );
        for (t, m) in triggers {
            s.push_str(&format!("  - name: {t}\n    matchers: {m}\n    mode: auto\n"));
        }
        s
    }

    #[test]
    fn a_policy_with_the_same_matchers_as_an_earlier_one_is_warned_about_not_refused() {
        // Issue 20's case: one policy for the listener, a copy for a rule.
        let a = policy(
            "listener",
            r#"['service="portal-api"']"#,
            &[("errors", r#"['alertname="HighErrorRate"']"#)],
        );
        let b = policy(
            "rule",
            r#"['service="portal-api"']"#,
            &[("errors", r#"['alertname="HighErrorRate"']"#)],
        );
        let set = two(&a, &b).expect("warnings do not refuse the set");
        assert_eq!(set.warnings.len(), 1, "{:?}", set.warnings);
        let w = set.warnings[0].to_string();
        assert!(
            w.starts_with("p/b.yaml:1: warning: policy \"rule\" can never match: policy \"listener\" (p/a.yaml)"),
            "{w}"
        );
    }

    #[test]
    fn fewer_matchers_earlier_shadow_too_but_different_or_more_do_not() {
        let wide = policy("wide", r#"['service="a"']"#, &[("e", r#"['alertname="E"']"#)]);
        let narrow = policy(
            "narrow",
            r#"['service="a"', 'env="prod"']"#,
            &[("e", r#"['alertname="E"']"#)],
        );
        // The wide one first takes every alert of the narrow one.
        assert_eq!(two(&wide, &narrow).unwrap().warnings.len(), 1);
        // The narrow one first leaves the wide one the other envs.
        assert!(two(&narrow, &wide).unwrap().warnings.is_empty());
        // A different label value, or a negated one, is another service.
        let other = policy("other", r#"['service="b"']"#, &[("e", r#"['alertname="E"']"#)]);
        assert!(two(&wide, &other).unwrap().warnings.is_empty());
        let not_a = policy("not-a", r#"['service!="a"']"#, &[("e", r#"['alertname="E"']"#)]);
        assert!(two(&wide, &not_a).unwrap().warnings.is_empty());
    }

    #[test]
    fn only_the_shadowed_trigger_is_named_when_the_policy_still_matches_other_alerts() {
        // An alert falls through to the next policy when no trigger of the first matches.
        let a = policy(
            "a",
            r#"['service="s"']"#,
            &[("errors", r#"['alertname="HighErrorRate"']"#)],
        );
        let b = policy(
            "b",
            r#"['service="s"']"#,
            &[
                ("health", r#"['alertname="HealthCheckFailing"']"#),
                ("errors-too", r#"['alertname="HighErrorRate"']"#),
            ],
        );
        let set = two(&a, &b).unwrap();
        assert_eq!(set.warnings.len(), 1, "{:?}", set.warnings);
        let w = set.warnings[0].to_string();
        assert!(
            w.contains("warning: triggers[errors-too] can never match: trigger \"errors\" of policy \"a\""),
            "{w}"
        );
        assert!(w.starts_with("p/b.yaml:9:"), "the trigger's line: {w}");
    }

    #[test]
    fn the_go_cutover_triggers_choose_immediate_or_graceful_for_the_same_target() {
        let set = PolicySet::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")).expect("shipped");
        let p = set.get("go-cutover").expect("go-cutover");
        let gradual = |trigger: &str| match p.with_trigger_gradual(p.target.clone(), Some(trigger)) {
            Target::Alb(t) => t.gradual.map(|g| g.steps),
            Target::Kubernetes(_) => panic!("an ALB target"),
        };
        // Seed 003 "Immediate Rollback If": one write.
        assert_eq!(gradual("error-rate-above-5pct"), None);
        assert_eq!(gradual("data-integrity"), None);
        // "Graceful Rollback If": back in the seed's own phases (Python at 10 %, 50 %, 100 %).
        assert_eq!(gradual("latency-above-1s"), Some(vec![10, 50, 100]));
        assert_eq!(gradual("memory-leak"), Some(vec![10, 50, 100]));
        // A planned stepwise target promoted to an immediate trigger shifts at once.
        let stepwise = p.with_trigger_gradual(p.target.clone(), Some("latency-above-1s"));
        let Target::Alb(t) = p.with_trigger_gradual(stepwise, Some("security-breach")) else {
            panic!("an ALB target")
        };
        assert_eq!(t.gradual, None);
    }

    #[test]
    fn a_trigger_gradual_is_checked_like_the_targets_and_only_for_alb() {
        let with = |gradual: &str| {
            format!(
                "name: p\nservice: s\ntarget: {{alb: {{listener_arn: \"arn:aws:elasticloadbalancing:us-east-1:1:listener/app/x/1/2\", stable_target_group_arn: \"arn:aws:elasticloadbalancing:us-east-1:1:targetgroup/s/1\"}}}}\ntriggers:\n  - name: slow\n    matchers: ['alertname=\"A\"']\n    mode: auto\n    gradual: {gradual}\n"
            )
        };
        assert!(load(&with("none")).is_ok());
        assert!(load(&with("{steps: [50, 100], interval: 30s}")).is_ok());
        let errs = load(&with("{steps: [50], interval: 30s}")).unwrap_err();
        assert!(
            errs[0].message.contains("triggers[slow].gradual.steps ends at 50"),
            "{errs:?}"
        );
        let errs = load(&with("sometimes")).unwrap_err();
        assert!(errs[0].message.contains("`none` or {steps"), "{errs:?}");
        let kube = "name: k\nservice: s\ntarget: {kubernetes: {namespace: n, steps: [{scale: {deployment: d, replicas: 0}}]}}\ntriggers:\n  - name: slow\n    matchers: ['alertname=\"A\"']\n    mode: auto\n    gradual: none\n";
        let errs = load(kube).unwrap_err();
        assert!(
            errs[0]
                .message
                .contains("triggers[slow].gradual only applies to an ALB target"),
            "{errs:?}"
        );
    }

    #[test]
    fn shipped_policies_have_no_warnings() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let set = PolicySet::load_dir(&dir).unwrap_or_else(|e| panic!("{e:?}"));
        assert!(set.warnings.is_empty(), "{:?}", set.warnings);
    }

    #[test]
    fn shipped_policies_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let set = PolicySet::load_dir(&dir).unwrap_or_else(|e| panic!("{e:?}"));
        assert!(set.get("portal-api").is_some());
    }
}
