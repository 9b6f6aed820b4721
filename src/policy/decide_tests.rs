use std::path::{Path, PathBuf};

use chrono::TimeZone;

use super::*;
use crate::alert::{AlertStatus, Fingerprint, LabelSet};

fn seeds() -> PolicySet {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    PolicySet::load_dir(&dir).unwrap_or_else(|e| panic!("{e:?}"))
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 22, 3, 0, 0).unwrap()
}

fn alert(name: &str, extra: &[(&str, &str)]) -> Alert {
    let mut labels: LabelSet = [("alertname", name), ("service", "portal-api"), ("team", "platform")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    labels.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Alert {
        status: AlertStatus::Firing,
        labels,
        annotations: LabelSet::new(),
        starts_at: t0(),
        ends_at: None,
        generator_url: String::new(),
        fingerprint: Fingerprint("abc123".into()),
    }
}

fn at(set: &PolicySet, a: &Alert, after: Duration) -> Decision {
    at_with(
        set,
        a,
        after,
        &History::default(),
        &FreezeState::default(),
        &GlobalGuards::default(),
    )
}

fn at_with(set: &PolicySet, a: &Alert, after: Duration, h: &History, f: &FreezeState, g: &GlobalGuards) -> Decision {
    decide(a, find(a, set), saturating_after(t0(), after), h, f, g, &set.hash)
}

const S: fn(u64) -> Duration = Duration::from_secs;

#[test]
fn health_check_failing_rolls_back_automatically_from_two_minutes() {
    let set = seeds();
    let a = alert("HealthCheckFailing", &[("severity", "critical")]);
    let d = at(&set, &a, S(119));
    assert_eq!(d.outcome.label(), "suppressed");
    assert!(
        matches!(d.outcome, Outcome::Suppressed(Suppression::TooYoung { recheck_at, .. }) if recheck_at == t0() + chrono::Duration::seconds(120))
    );
    let d = at(&set, &a, S(120));
    assert_eq!(d.outcome, Outcome::Auto, "{}", d.reason);
    assert_eq!(d.policy.as_deref(), Some("portal-api"));
    assert_eq!(d.trigger.as_deref(), Some("health-check-failing"));
}

#[test]
fn five_xx_above_five_percent_waits_until_exactly_five_minutes() {
    let set = seeds();
    let a = alert("HighErrorRate", &[("severity", "critical")]);
    let d = at(&set, &a, S(4 * 60 + 59));
    assert!(
        d.reason
            .starts_with("too young: HighErrorRate has fired for 4m 59s, trigger error-rate-above-5pct needs 5m"),
        "{}",
        d.reason
    );
    assert_eq!(at(&set, &a, S(300)).outcome, Outcome::Auto);
}

#[test]
fn p95_latency_over_budget_for_ten_minutes_needs_approval() {
    let set = seeds();
    for (endpoint, budget) in [
        ("health", "100"),
        ("contacts", "600"),
        ("jobs", "800"),
        ("files", "1000"),
    ] {
        let a = alert("HighLatency", &[("endpoint", endpoint), ("budget_ms", budget)]);
        assert_eq!(at(&set, &a, S(599)).outcome.label(), "suppressed", "{endpoint}");
        let d = at(&set, &a, S(600));
        assert_eq!(d.outcome.label(), "manual", "{endpoint}: {}", d.reason);
        assert_eq!(
            d.trigger.as_deref(),
            Some(format!("p95-over-budget-{endpoint}").as_str())
        );
        let Outcome::NeedsApproval { expires_at, on_timeout } = d.outcome else {
            unreachable!()
        };
        assert_eq!(on_timeout, OnTimeout::Escalate);
        assert_eq!(expires_at, t0() + chrono::Duration::seconds(600 + 15 * 60));
    }
}

fn decide_at(set: &PolicySet, a: &Alert, now: DateTime<Utc>) -> Decision {
    let (h, f, g) = (History::default(), FreezeState::default(), GlobalGuards::default());
    decide(a, find(a, set), now, &h, &f, &g, &set.hash)
}

#[test]
fn a_starts_at_in_the_year_262142_is_undecidable_not_a_panic() {
    let set = seeds();
    let mut a = alert("HealthCheckFailing", &[]);
    a.starts_at = "+262142-01-01T00:00:00Z".parse().unwrap();
    let d = decide_at(&set, &a, t0());
    let Outcome::Undecidable { problem } = &d.outcome else {
        panic!("{d:?}")
    };
    assert!(problem.contains("in the future"), "{problem}");
    assert_eq!(d.outcome.label(), "undecidable");
    assert_eq!(d.trigger.as_deref(), Some("health-check-failing"));
}

#[test]
fn starts_at_plus_for_past_the_calendar_is_undecidable() {
    let set = seeds();
    let mut a = alert("HealthCheckFailing", &[]);
    // At the end of the calendar the clock itself is there too: not "in the future", but
    // the 2-minute re-check would lie past the last representable instant.
    a.starts_at = DateTime::<Utc>::MAX_UTC - chrono::Duration::seconds(30);
    let d = decide_at(&set, &a, DateTime::<Utc>::MAX_UTC - chrono::Duration::seconds(10));
    let Outcome::Undecidable { problem } = &d.outcome else {
        panic!("{d:?}")
    };
    assert!(problem.contains("past the end of the calendar"), "{problem}");
    assert!(d.reason.contains("HealthCheckFailing"), "{}", d.reason);

    let mut a = alert("ElevatedErrorRate", &[]);
    a.starts_at = DateTime::<Utc>::MAX_UTC - chrono::Duration::minutes(11);
    let d = decide_at(&set, &a, DateTime::<Utc>::MAX_UTC - chrono::Duration::seconds(1));
    let Outcome::Undecidable { problem } = &d.outcome else {
        panic!("{d:?}")
    };
    assert!(problem.contains("auto_after"), "{problem}");
}

#[test]
fn a_for_that_overflows_is_undecidable_and_huge_config_durations_saturate() {
    let mut set = seeds();
    // The shipped Portal API policy on the ALB (the seed alerts below fall under it).
    let i = set
        .policies
        .iter()
        .position(|l| l.policy.name == "portal-api")
        .expect("policies/portal-api.yaml");
    let p = &mut set.policies[i].policy;
    assert_eq!(p.triggers[0].name, "health-check-failing");
    p.triggers[0].for_ = Duration::from_secs(u64::MAX);
    p.guards.cooldown = Duration::from_secs(u64::MAX);
    let a = alert("HealthCheckFailing", &[]);
    let d = at(&set, &a, S(3600));
    assert_eq!(d.outcome.label(), "undecidable", "{}", d.reason);

    // A cooldown without end holds forever instead of panicking.
    let h = History {
        last_rollback_on_target: Some(t0()),
        ..History::default()
    };
    let held = held_by_guards(&set.policies[i].policy, &h, &GlobalGuards::default(), t0());
    assert!(
        matches!(held, Some((Suppression::Cooldown { until, .. }, _)) if until == DateTime::<Utc>::MAX_UTC),
        "{held:?}"
    );
}

#[test]
fn a_starts_at_slightly_ahead_of_our_clock_is_still_decided() {
    let set = seeds();
    let mut a = alert("HealthCheckFailing", &[]);
    a.starts_at = t0() + chrono::Duration::minutes(59);
    assert_eq!(decide_at(&set, &a, t0()).outcome.label(), "suppressed");
}

#[test]
fn circuit_breaker_open_five_minutes_needs_approval() {
    let set = seeds();
    let a = alert("CircuitBreakerOpen", &[("breaker", "rpc-backend")]);
    assert_eq!(at(&set, &a, S(299)).outcome.label(), "suppressed");
    assert_eq!(at(&set, &a, S(300)).outcome.label(), "manual");
}

#[test]
fn five_xx_above_one_percent_is_the_high_tier_auto_after_thirty_minutes() {
    let set = seeds();
    let a = alert("ElevatedErrorRate", &[("severity", "warning")]);
    assert_eq!(at(&set, &a, S(599)).outcome.label(), "suppressed");
    let d = at(&set, &a, S(600));
    assert_eq!(
        d.outcome,
        Outcome::EscalateLater {
            auto_at: t0() + chrono::Duration::minutes(30)
        },
        "{}",
        d.reason
    );
    assert_eq!(at(&set, &a, S(29 * 60 + 59)).outcome.label(), "escalate_later");
    assert_eq!(at(&set, &a, S(30 * 60)).outcome, Outcome::Auto);
}

#[test]
fn other_services_and_unknown_alerts_do_not_match() {
    let set = seeds();
    let mut a = alert("HighErrorRate", &[]);
    a.labels.insert("service".into(), "billing".into());
    assert_eq!(at(&set, &a, S(3600)).outcome, Outcome::NoMatch);
    assert_eq!(at(&set, &alert("DiskFull", &[]), S(3600)).outcome.label(), "no_match");
}

#[test]
fn cooldown_holds_a_second_rollback_of_the_same_target() {
    let set = seeds();
    let a = alert("HealthCheckFailing", &[]);
    let h = History {
        last_rollback_on_target: Some(t0() - chrono::Duration::minutes(27)),
        ..Default::default()
    };
    let d = at_with(&set, &a, S(120), &h, &FreezeState::default(), &GlobalGuards::default());
    assert!(
        matches!(d.outcome, Outcome::Suppressed(Suppression::Cooldown { .. })),
        "{}",
        d.reason
    );
    assert!(d.reason.starts_with("cooldown:"));
    // The decision comes 2m after t0: a rollback 28m before t0 is exactly 30m old, cooldown over.
    let h = History {
        last_rollback_on_target: Some(t0() - chrono::Duration::minutes(28)),
        ..Default::default()
    };
    assert_eq!(
        at_with(&set, &a, S(120), &h, &FreezeState::default(), &GlobalGuards::default()).outcome,
        Outcome::Auto
    );
}

#[test]
fn rate_limit_per_policy_and_global() {
    let set = seeds();
    let a = alert("HealthCheckFailing", &[]);
    let h = History {
        policy_rollbacks_in_window: 2,
        ..Default::default()
    };
    let d = at_with(&set, &a, S(120), &h, &FreezeState::default(), &GlobalGuards::default());
    assert!(
        matches!(&d.outcome, Outcome::Suppressed(Suppression::RateLimited { scope, max: 2, .. }) if scope == "policy portal-api"),
        "{}",
        d.reason
    );
    let h = History {
        policy_rollbacks_in_window: 1,
        ..Default::default()
    };
    assert_eq!(
        at_with(&set, &a, S(120), &h, &FreezeState::default(), &GlobalGuards::default()).outcome,
        Outcome::Auto
    );
    let g = GlobalGuards {
        dry_run: false,
        max_rollbacks: Some(RateLimit { count: 5, per: S(3600) }),
    };
    let h = History {
        global_rollbacks_in_window: 5,
        ..Default::default()
    };
    let d = at_with(&set, &a, S(120), &h, &FreezeState::default(), &g);
    assert!(d.reason.starts_with("rate limit: global"), "{}", d.reason);
}

#[test]
fn a_manual_rollback_under_a_two_person_rule_waits_for_a_second_person() {
    let set = seeds();
    let mut p = set.get("portal-api").unwrap().clone();
    let now = |p: &Policy| {
        decide_manual(
            p,
            "U0ONCALL",
            "canary bad",
            t0(),
            &History::default(),
            &GlobalGuards::default(),
            "h",
        )
    };
    let d = now(&p);
    assert_eq!(d.outcome, Outcome::Auto, "one approver is enough: {}", d.reason);

    let a = p.approval.as_mut().unwrap();
    a.required_approvals = 2;
    a.on_timeout = OnTimeout::Rollback;
    let d = now(&p);
    assert_eq!(
        d.outcome,
        Outcome::NeedsApproval {
            expires_at: t0() + chrono::Duration::minutes(15),
            // Never a rollback on one person's word, whatever the policy does for alerts.
            on_timeout: OnTimeout::Escalate,
        }
    );
    assert!(d.reason.contains("needs 2 approvers"), "{}", d.reason);
}

#[test]
fn freeze_suppresses_automatic_but_not_manual_rollbacks() {
    let set = seeds();
    let f = FreezeState {
        global: Some(Freeze {
            reason: "db migration".into(),
            by: "U1".into(),
            until: None,
        }),
        ..Default::default()
    };
    let d = at_with(
        &set,
        &alert("HealthCheckFailing", &[]),
        S(120),
        &History::default(),
        &f,
        &GlobalGuards::default(),
    );
    assert!(matches!(d.outcome, Outcome::Suppressed(Suppression::Frozen { .. })));
    assert!(d.reason.contains("db migration"), "{}", d.reason);
    let d = at_with(
        &set,
        &alert("CircuitBreakerOpen", &[]),
        S(300),
        &History::default(),
        &f,
        &GlobalGuards::default(),
    );
    assert_eq!(d.outcome.label(), "manual");
    // An expired freeze no longer applies; a policy freeze applies only to that policy.
    let mut f = FreezeState::default();
    f.policies.insert(
        "other".into(),
        Freeze {
            reason: "x".into(),
            by: "U1".into(),
            until: None,
        },
    );
    f.global = Some(Freeze {
        reason: "old".into(),
        by: "U1".into(),
        until: Some(t0()),
    });
    assert_eq!(
        at_with(
            &set,
            &alert("HealthCheckFailing", &[]),
            S(120),
            &History::default(),
            &f,
            &GlobalGuards::default()
        )
        .outcome,
        Outcome::Auto
    );
}

#[test]
fn freeze_window_in_the_policy_applies_between_start_and_end() {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/portal-api.yaml")).unwrap();
    let text = text.replace(
        "  freeze_windows: []",
        "  freeze_windows:\n    - {start: 2026-11-22T03:00:00Z, end: 2026-11-22T04:00:00Z, reason: planned failover}",
    );
    let set = PolicySet::from_sources(Path::new("p"), vec![(PathBuf::from("p/portal-api.yaml"), text)]).unwrap();
    let d = at(&set, &alert("HealthCheckFailing", &[]), S(120));
    assert!(d.reason.contains("planned failover"), "{}", d.reason);
    assert_eq!(
        at(&set, &alert("HealthCheckFailing", &[]), S(3600)).outcome,
        Outcome::Auto
    );
}

#[test]
fn dry_run_wraps_what_would_have_happened() {
    let set = seeds();
    let g = GlobalGuards {
        dry_run: true,
        max_rollbacks: None,
    };
    let d = at_with(
        &set,
        &alert("HealthCheckFailing", &[]),
        S(120),
        &History::default(),
        &FreezeState::default(),
        &g,
    );
    assert_eq!(
        d.outcome,
        Outcome::Suppressed(Suppression::DryRun {
            would: Box::new(Outcome::Auto)
        })
    );
    assert!(
        d.reason
            .starts_with("dry run (global): nothing will be changed; would have decided:"),
        "{}",
        d.reason
    );
}

#[test]
fn every_decision_records_the_policy_hash() {
    let set = seeds();
    assert_eq!(at(&set, &alert("HealthCheckFailing", &[]), S(1)).policy_hash, set.hash);
}
