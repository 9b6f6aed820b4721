//! The decision: a pure function of the alert, the incident history and the policies.
//!
//! The responder calls [`find`] to pick the policy and trigger an alert falls under, loads the
//! [`History`] of that policy's target from the store, and calls [`decide`]. No I/O happens
//! here, so the whole decision table of the seeds is unit-tested below, boundaries included.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Mode, OnTimeout, Policy, PolicySet, RateLimit, Trigger};
use crate::alert::Alert;

/// What the store knows about earlier rollbacks, as far as the guards care.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// When this policy's target was last rolled back (by any incident).
    pub last_rollback_on_target: Option<DateTime<Utc>>,
    /// Rollbacks by this policy within its `guards.max_rollbacks.per` window.
    pub policy_rollbacks_in_window: u32,
    /// Rollbacks by any policy within the global window.
    pub global_rollbacks_in_window: u32,
}

/// A freeze put in place at run time (kill switch) or by config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Freeze {
    pub reason: String,
    pub by: String,
    pub until: Option<DateTime<Utc>>,
}

/// Freezes in force: global and per policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FreezeState {
    pub global: Option<Freeze>,
    pub policies: BTreeMap<String, Freeze>,
}

impl FreezeState {
    /// The freeze that applies to `policy` at `now`, global first.
    pub fn applying(&self, policy: &str, now: DateTime<Utc>) -> Option<(String, &Freeze)> {
        let live = |f: &&Freeze| f.until.is_none_or(|u| u > now);
        self.global
            .as_ref()
            .filter(live)
            .map(|f| ("global".to_string(), f))
            .or_else(|| {
                self.policies
                    .get(policy)
                    .filter(live)
                    .map(|f| (format!("policy {policy}"), f))
            })
    }
}

/// Guards that span all policies (from the service config).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GlobalGuards {
    pub dry_run: bool,
    pub max_rollbacks: Option<RateLimit>,
}

/// Why nothing happens (yet).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Suppression {
    /// Not firing long enough; re-decided at `recheck_at` if still firing.
    TooYoung {
        firing_for_secs: u64,
        required_secs: u64,
        recheck_at: DateTime<Utc>,
    },
    /// The target was rolled back recently.
    Cooldown {
        last_rollback: DateTime<Utc>,
        until: DateTime<Utc>,
    },
    /// Too many rollbacks in the window.
    RateLimited {
        scope: String,
        count: u32,
        max: u32,
        window_secs: u64,
    },
    /// Automatic rollbacks are frozen (`freeze_reason`: the decision has its own `reason`,
    /// and the two share one JSON object).
    Frozen {
        scope: String,
        freeze_reason: String,
        until: Option<DateTime<Utc>>,
    },
    /// Dry run: what would have happened is recorded, nothing is changed.
    DryRun { would: Box<Outcome> },
}

/// The decision's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// No policy matches the alert.
    NoMatch,
    /// Roll back now, without asking.
    Auto,
    /// Ask the approvers; on expiry do `on_timeout`.
    NeedsApproval {
        expires_at: DateTime<Utc>,
        on_timeout: OnTimeout,
    },
    /// Ask now; roll back automatically at `auto_at` if still firing and nobody denied.
    EscalateLater { auto_at: DateTime<Utc> },
    /// Nothing happens, for a reason.
    Suppressed(Suppression),
    /// The alert's data cannot be decided on (a time past the calendar's end, a `startsAt`
    /// far in the future): it is marked with `problem` and never opens or changes an incident.
    Undecidable { problem: String },
}

impl Outcome {
    /// The short label used by `simulate --format json` and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::NoMatch => "no_match",
            Outcome::Auto => "auto",
            Outcome::NeedsApproval { .. } => "manual",
            Outcome::EscalateLater { .. } => "escalate_later",
            Outcome::Suppressed(_) => "suppressed",
            Outcome::Undecidable { .. } => "undecidable",
        }
    }
}

/// A decision with its human-readable reason and the policy-set hash it was made under.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    #[serde(flatten)]
    pub outcome: Outcome,
    pub policy: Option<String>,
    pub trigger: Option<String>,
    pub reason: String,
    pub policy_hash: String,
    pub decided_at: DateTime<Utc>,
}

/// The first policy (in file order) and, within it, the first trigger whose matchers (the
/// policy's and the trigger's) all match the alert's labels.
pub fn find<'a>(alert: &Alert, set: &'a PolicySet) -> Option<(&'a Policy, &'a Trigger)> {
    set.iter()
        .filter(|p| super::all_match(&p.matchers, &alert.labels))
        .find_map(|p| {
            p.triggers
                .iter()
                .find(|t| super::all_match(&t.matchers, &alert.labels))
                .map(|t| (p, t))
        })
}

/// `d` in whole seconds, spelled as `humantime::format_duration` spells it ("2days 10h 10s").
/// Written out instead of going through humantime's formatter, which writes every unit with
/// `write!`: a decision spells two durations, and that was a sixth of deciding an alert
/// (docs/benchmarks.md, eighth round). The property test `fmt_dur_spells_as_humantime`
/// holds it to humantime's spelling.
fn fmt_dur(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return "0s".into();
    }
    // humantime's calendar: a year is 365.25 days, a month 30.44 days.
    let (years, rest) = (secs / 31_557_600, secs % 31_557_600);
    let (months, rest) = (rest / 2_630_016, rest % 2_630_016);
    let (days, rest) = (rest / 86_400, rest % 86_400);
    let units = [
        (years, "year", true),
        (months, "month", true),
        (days, "day", true),
        (rest / 3600, "h", false),
        (rest % 3600 / 60, "m", false),
        (rest % 60, "s", false),
    ];
    let mut out = String::with_capacity(32);
    let mut digits = itoa::Buffer::new();
    for (value, unit, plural) in units {
        if value == 0 {
            continue;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(digits.format(value));
        out.push_str(unit);
        if plural && value > 1 {
            out.push('s');
        }
    }
    out
}

/// `t + d`, or `None` past the end of the calendar (a `startsAt` in the year +262142, a
/// `for` of a million years): time arithmetic on input never panics.
pub fn checked_after(t: DateTime<Utc>, d: Duration) -> Option<DateTime<Utc>> {
    chrono::Duration::from_std(d).ok().and_then(|d| t.checked_add_signed(d))
}

/// `t + d` for durations from our own config (cooldowns, approval timeouts): past the end of
/// the calendar means "never", the latest time there is.
pub fn saturating_after(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    checked_after(t, d).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// How far in the future an alert's `startsAt` may lie (clocks of Prometheus and this service
/// disagree a little); beyond it the alert is bad data, not an alert that fires "for 0s".
pub const MAX_CLOCK_SKEW: chrono::Duration = chrono::Duration::hours(1);

/// Decides what to do about a firing `alert` that `matched` (from [`find`]) at `now`.
pub fn decide(
    alert: &Alert,
    matched: Option<(&Policy, &Trigger)>,
    now: DateTime<Utc>,
    history: &History,
    freezes: &FreezeState,
    global: &GlobalGuards,
    policy_hash: &str,
) -> Decision {
    let name = alert.alertname();
    let make = |outcome: Outcome, policy: Option<&Policy>, trigger: Option<&Trigger>, reason: String| Decision {
        outcome,
        policy: policy.map(|p| p.name.clone()),
        trigger: trigger.map(|t| t.name.clone()),
        reason,
        policy_hash: policy_hash.to_string(),
        decided_at: now,
    };
    let Some((policy, trigger)) = matched else {
        return make(
            Outcome::NoMatch,
            None,
            None,
            format!("no policy matches {name} with these labels"),
        );
    };
    let undecidable = |problem: String| {
        make(
            Outcome::Undecidable {
                problem: problem.clone(),
            },
            Some(policy),
            Some(trigger),
            format!("cannot decide {name}: {problem}"),
        )
    };
    if now
        .checked_add_signed(MAX_CLOCK_SKEW)
        .is_some_and(|latest| alert.starts_at > latest)
    {
        return undecidable(format!(
            "startsAt {} is in the future (more than {} minutes ahead of this service's clock)",
            alert.starts_at.to_rfc3339(),
            MAX_CLOCK_SKEW.num_minutes()
        ));
    }
    let firing_for = now.signed_duration_since(alert.starts_at).to_std().unwrap_or_default();
    let t = trigger.name.as_str();

    if firing_for < trigger.for_ {
        let Some(recheck_at) = checked_after(alert.starts_at, trigger.for_) else {
            return undecidable(format!(
                "startsAt {} plus trigger {t}'s for ({}) is past the end of the calendar",
                alert.starts_at.to_rfc3339(),
                fmt_dur(trigger.for_)
            ));
        };
        return make(
            Outcome::Suppressed(Suppression::TooYoung {
                firing_for_secs: firing_for.as_secs(),
                required_secs: trigger.for_.as_secs(),
                recheck_at,
            }),
            Some(policy),
            Some(trigger),
            format!(
                "too young: {name} has fired for {}, trigger {t} needs {}; re-evaluated at {} if still firing",
                fmt_dur(firing_for),
                fmt_dur(trigger.for_),
                recheck_at.format("%H:%M:%SZ")
            ),
        );
    }

    // A freeze holds automatic rollbacks only: a manual trigger still asks a person.
    let automatic = !matches!(trigger.mode, Mode::Manual);
    let held = if automatic {
        holds_automatic(policy, history, freezes, global, now)
    } else {
        held_by_guards(policy, history, global, now)
    };
    if let Some((why, reason)) = held {
        return make(Outcome::Suppressed(why), Some(policy), Some(trigger), reason);
    }

    let (outcome, reason) = match trigger.mode {
        Mode::Auto => (
            Outcome::Auto,
            format!(
                "{name} has fired for {} (trigger {t} needs {}): roll back automatically",
                fmt_dur(firing_for),
                fmt_dur(trigger.for_)
            ),
        ),
        Mode::AutoAfter(after) if firing_for >= after => (
            Outcome::Auto,
            format!(
                "{name} is still firing after {} (trigger {t} rolls back automatically after {})",
                fmt_dur(firing_for),
                fmt_dur(after)
            ),
        ),
        Mode::AutoAfter(after) => {
            let Some(auto_at) = checked_after(alert.starts_at, after) else {
                return undecidable(format!(
                    "startsAt {} plus trigger {t}'s auto_after ({}) is past the end of the calendar",
                    alert.starts_at.to_rfc3339(),
                    fmt_dur(after)
                ));
            };
            (
                Outcome::EscalateLater { auto_at },
                format!(
                    "{name} has fired for {}: trigger {t} asks for approval now and rolls back automatically at {} if still firing",
                    fmt_dur(firing_for),
                    auto_at.format("%H:%M:%SZ")
                ),
            )
        }
        Mode::Manual => {
            // A manual trigger without approval settings is refused at load time.
            let (timeout, on_timeout) = policy
                .approval
                .as_ref()
                .map(|a| (a.timeout, a.on_timeout))
                .unwrap_or((Duration::from_secs(900), OnTimeout::Escalate));
            let expires_at = saturating_after(now, timeout);
            (
                Outcome::NeedsApproval { expires_at, on_timeout },
                format!(
                    "{name} has fired for {}: trigger {t} needs a human's approval within {} (then: {})",
                    fmt_dur(firing_for),
                    fmt_dur(timeout),
                    match on_timeout {
                        OnTimeout::Escalate => "escalate",
                        OnTimeout::Rollback => "roll back anyway",
                        OnTimeout::GiveUp => "give up",
                    }
                ),
            )
        }
    };

    if policy.guards.dry_run || global.dry_run {
        let scope = if policy.guards.dry_run { "policy" } else { "global" };
        return make(
            Outcome::Suppressed(Suppression::DryRun {
                would: Box::new(outcome),
            }),
            Some(policy),
            Some(trigger),
            format!("dry run ({scope}): nothing will be changed; would have decided: {reason}"),
        );
    }
    make(outcome, Some(policy), Some(trigger), reason)
}

/// What holds an automatic rollback under `policy` at `now`, whatever starts it (an alert
/// that qualifies, or an approval request that expires with "roll back anyway"): a freeze
/// (the kill switch or one of the policy's windows), then the cooldown and rate limits.
pub fn holds_automatic(
    policy: &Policy,
    history: &History,
    freezes: &FreezeState,
    global: &GlobalGuards,
    now: DateTime<Utc>,
) -> Option<(Suppression, String)> {
    frozen(policy, freezes, now).or_else(|| held_by_guards(policy, history, global, now))
}

/// The freeze that applies to `policy` at `now`, if any: the kill switch first, then the
/// policy's own windows (start inclusive, end exclusive).
fn frozen(policy: &Policy, freezes: &FreezeState, now: DateTime<Utc>) -> Option<(Suppression, String)> {
    let window = policy
        .guards
        .freeze_windows
        .iter()
        .find(|w| w.start <= now && now < w.end);
    let (scope, why, until, by) = freezes
        .applying(&policy.name, now)
        .map(|(scope, f)| (scope, f.reason.clone(), f.until, format!(" by {}", f.by)))
        .or_else(|| {
            window.map(|w| {
                (
                    "freeze window".to_string(),
                    w.reason.clone(),
                    Some(w.end),
                    String::new(),
                )
            })
        })?;
    let until_txt = until
        .map(|u| format!(" until {}", u.format("%Y-%m-%d %H:%M:%SZ")))
        .unwrap_or_default();
    let reason = format!(
        "frozen: automatic rollbacks are frozen ({scope}{by}{until_txt}: {why}); a person can still run /rollback now {}",
        policy.name
    );
    Some((
        Suppression::Frozen {
            scope,
            freeze_reason: why,
            until,
        },
        reason,
    ))
}

/// The cooldown and rate-limit guards, shared by alert-driven and manual rollbacks.
fn held_by_guards(
    policy: &Policy,
    history: &History,
    global: &GlobalGuards,
    now: DateTime<Utc>,
) -> Option<(Suppression, String)> {
    if let Some(last) = history.last_rollback_on_target {
        let until = saturating_after(last, policy.guards.cooldown);
        if now < until {
            return Some((
                Suppression::Cooldown {
                    last_rollback: last,
                    until,
                },
                format!(
                    "cooldown: {} was rolled back at {}; no second rollback before {} (cooldown {})",
                    policy.target.key(),
                    last.format("%H:%M:%SZ"),
                    until.format("%H:%M:%SZ"),
                    fmt_dur(policy.guards.cooldown)
                ),
            ));
        }
    }
    let limits = [
        (
            format!("policy {}", policy.name),
            policy.guards.max_rollbacks,
            history.policy_rollbacks_in_window,
        ),
        (
            "global".to_string(),
            global.max_rollbacks,
            history.global_rollbacks_in_window,
        ),
    ];
    for (scope, limit, count) in limits {
        if let Some(l) = limit {
            if count >= l.count {
                let reason = format!(
                    "rate limit: {scope} already rolled back {count} time(s) in the last {} (max {})",
                    fmt_dur(l.per),
                    l.count
                );
                return Some((
                    Suppression::RateLimited {
                        scope,
                        count,
                        max: l.count,
                        window_secs: l.per.as_secs(),
                    },
                    reason,
                ));
            }
        }
    }
    None
}

/// A person's `/rollback now POLICY`: no alert and no trigger, but the same guards (cooldown,
/// rate limits, dry run). A freeze does not apply: it holds automatic rollbacks only. Under a
/// two-person rule the request is the first approval and waits for a second person; if none
/// comes it escalates (or gives up), never rolls back on one person's word.
pub fn decide_manual(
    policy: &Policy,
    who: &str,
    why: &str,
    now: DateTime<Utc>,
    history: &History,
    global: &GlobalGuards,
    policy_hash: &str,
) -> Decision {
    let make = |outcome, reason| Decision {
        outcome,
        policy: Some(policy.name.clone()),
        trigger: None,
        reason,
        policy_hash: policy_hash.to_string(),
        decided_at: now,
    };
    if let Some((held, reason)) = held_by_guards(policy, history, global, now) {
        return make(Outcome::Suppressed(held), reason);
    }
    let reason = format!(
        "manual rollback requested by {who}{}",
        if why.is_empty() {
            String::new()
        } else {
            format!(": {why}")
        }
    );
    let (outcome, reason) = match &policy.approval {
        Some(a) if a.required_approvals > 1 => {
            let on_timeout = match a.on_timeout {
                OnTimeout::Rollback => OnTimeout::Escalate,
                other => other,
            };
            (
                Outcome::NeedsApproval {
                    expires_at: saturating_after(now, a.timeout),
                    on_timeout,
                },
                format!(
                    "{reason}; the policy needs {} approvers: waiting for another one within {}",
                    a.required_approvals,
                    fmt_dur(a.timeout)
                ),
            )
        }
        _ => (Outcome::Auto, reason),
    };
    if policy.guards.dry_run || global.dry_run {
        let scope = if policy.guards.dry_run { "policy" } else { "global" };
        return make(
            Outcome::Suppressed(Suppression::DryRun {
                would: Box::new(outcome),
            }),
            format!("dry run ({scope}): nothing will be changed; would have decided: {reason}"),
        );
    }
    make(outcome, reason)
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;

#[cfg(test)]
mod serde_tests {
    use super::*;

    proptest::proptest! {
        /// Reasons spell durations exactly as before the hand-written spelling: as humantime
        /// does, in whole seconds, over the whole range (sub-second parts dropped).
        #[test]
        fn fmt_dur_spells_as_humantime(secs in proptest::prop_oneof![0u64..200_000_000, proptest::num::u64::ANY], nanos in 0u32..1_000_000_000) {
            let d = Duration::new(secs, nanos);
            proptest::prop_assert_eq!(fmt_dur(d), humantime::format_duration(Duration::from_secs(secs)).to_string());
        }
    }

    #[test]
    fn fmt_dur_spells_the_edges_as_humantime() {
        for secs in [
            0,
            1,
            59,
            60,
            61,
            3599,
            3600,
            86_399,
            86_400,
            172_800,
            2_630_016,
            5_260_032,
            31_557_600,
            63_115_200,
            u64::MAX,
        ] {
            assert_eq!(
                fmt_dur(Duration::from_secs(secs)),
                humantime::format_duration(Duration::from_secs(secs)).to_string(),
                "{secs}"
            );
        }
    }

    /// Every outcome survives the store's JSON round trip (flattened fields must not collide).
    #[test]
    fn decisions_round_trip_through_json() {
        let at = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let outcomes = [
            Outcome::NoMatch,
            Outcome::Auto,
            Outcome::NeedsApproval {
                expires_at: at,
                on_timeout: OnTimeout::Rollback,
            },
            Outcome::EscalateLater { auto_at: at },
            Outcome::Suppressed(Suppression::TooYoung {
                firing_for_secs: 1,
                required_secs: 2,
                recheck_at: at,
            }),
            Outcome::Suppressed(Suppression::Cooldown {
                last_rollback: at,
                until: at,
            }),
            Outcome::Suppressed(Suppression::RateLimited {
                scope: "global".into(),
                count: 1,
                max: 1,
                window_secs: 60,
            }),
            Outcome::Suppressed(Suppression::Frozen {
                scope: "global".into(),
                freeze_reason: "x".into(),
                until: Some(at),
            }),
            Outcome::Suppressed(Suppression::DryRun {
                would: Box::new(Outcome::Auto),
            }),
        ];
        for outcome in outcomes {
            let d = Decision {
                outcome,
                policy: Some("p".into()),
                trigger: Some("t".into()),
                reason: "because".into(),
                policy_hash: "h".into(),
                decided_at: at,
            };
            let back: Decision = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
            assert_eq!(back, d);
        }
    }
}
