//! Loading `policies/*.yaml`: every file parsed strictly and checked across fields, each
//! error with its file and line; a set with any error is refused as a whole. Also the content
//! hash decisions record, and warnings about triggers an earlier policy always takes first.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::target::alb::Scope;
use super::{Matcher, Mode, Policy, Target};

impl Policy {
    /// `planned` (the incident's target) with the immediate or stepwise choice of `trigger`,
    /// the trigger that names the incident when the action runs: its own `gradual` if it has
    /// one, else the planned target's own (frozen with the rest of the plan; a policy edited
    /// since does not change it). Only the trigger's choice is read live, so a graceful
    /// request promoted by an immediate trigger shifts at once (seed 003).
    pub fn with_trigger_gradual(&self, planned: Target, trigger: Option<&str>) -> Target {
        match planned {
            Target::Alb(mut t) => {
                let choice = trigger
                    .and_then(|name| self.triggers.iter().find(|x| x.name == name))
                    .and_then(|x| x.gradual.as_ref());
                if let Some(c) = choice {
                    t.gradual = c.shift().cloned();
                }
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
                (Some(super::target::alb::GradualChoice::Shift(g)), _) => {
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
        errs.extend(super::follow_ups::check(&self.follow_ups));
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
                            line: step_line(text, &message).unwrap_or_else(|| locate(text, &at)),
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
        errors.extend(listener_overlaps(&policies, &sources));
        if errors.is_empty() {
            let hash = hex::encode(hasher.finalize());
            let mut warnings = shadowed(&policies, &sources);
            warnings.extend(target_warnings(&policies, &sources));
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

/// A `scope: listener` ALB policy rewrites every forward on its listener, keyed (cooldown,
/// one open incident) by the listener; another ALB policy on the same listener keyed by one of
/// its rules could then have an incident open at the same time writing the same rule under a
/// separate cooldown. Such a set is refused.
fn listener_overlaps(policies: &[LoadedPolicy], sources: &[(PathBuf, String)]) -> Vec<PolicyError> {
    let alb = |p: &LoadedPolicy| match &p.policy.target {
        Target::Alb(t) => Some(t.clone()),
        Target::Kubernetes(_) => None,
    };
    let mut out = Vec::new();
    for (i, later) in policies.iter().enumerate() {
        let Some(lt) = alb(later) else { continue };
        let clash = policies[..i].iter().find(|earlier| {
            alb(earlier).is_some_and(|et| {
                et.listener_arn == lt.listener_arn
                    && (et.scope == Scope::Listener || lt.scope == Scope::Listener)
                    && et.key() != lt.key()
            })
        });
        if let Some(earlier) = clash {
            let text = sources
                .iter()
                .find(|(f, _)| f == &later.file)
                .map(|(_, t)| t.as_str())
                .unwrap_or_default();
            out.push(PolicyError {
                file: later.file.clone(),
                line: locate(text, "listener_arn"),
                message: format!(
                    "target.alb: policy {:?} and policy {:?} ({}) both act on listener {} and one of them has scope: listener, which rewrites every forward on it: two incidents could write the same rule at once under separate cooldowns; keep only the scope: listener policy (its triggers can live in one file), or give both scope: one with different rules",
                    later.policy.name,
                    earlier.policy.name,
                    earlier.file.display(),
                    lt.listener_arn
                ),
            });
        }
    }
    out
}

/// What each policy's target says about itself (a Kubernetes selector that drops the app key).
fn target_warnings(policies: &[LoadedPolicy], sources: &[(PathBuf, String)]) -> Vec<PolicyError> {
    let mut out = Vec::new();
    for p in policies {
        if let Target::Kubernetes(t) = &p.policy.target {
            let text = sources
                .iter()
                .find(|(f, _)| f == &p.file)
                .map(|(_, t)| t.as_str())
                .unwrap_or_default();
            for message in t.warnings() {
                out.push(PolicyError {
                    file: p.file.clone(),
                    line: locate(text, "switch_service"),
                    message,
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

/// The 1-based line of the Kubernetes step a message is about (`target.kubernetes.steps[N]...`):
/// the N-th `- ` item under `steps:` (block style; `None` for anything else).
fn step_line(text: &str, message: &str) -> Option<usize> {
    let rest = message.strip_prefix("target.kubernetes.steps[")?;
    let n: usize = rest.split(']').next()?.parse().ok()?;
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let kube = lines.iter().position(|l| l.trim() == "kubernetes:")?;
    let steps = kube + 1 + lines[kube + 1..].iter().position(|l| l.trim() == "steps:")?;
    let mut items = lines
        .iter()
        .enumerate()
        .skip(steps + 1)
        .take_while(|(_, l)| {
            l.trim().is_empty() || l.trim_start().starts_with('#') || indent(l) >= indent(lines[steps])
        })
        .filter(|(_, l)| l.trim_start().starts_with("- "));
    let first = items.next()?;
    let item_indent = indent(first.1);
    std::iter::once(first)
        .chain(items.filter(|(_, l)| indent(l) == item_indent))
        .nth(n)
        .map(|(i, _)| i + 1)
}

/// The 1-based line of the first occurrence of `needle`, or 1.
fn locate(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or(1)
}
