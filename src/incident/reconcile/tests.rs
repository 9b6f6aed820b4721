//! The cases of issue 18 as unit tests, then random sequences (proptest) against the
//! invariants, with the real `policy::decide` making the candidates' decisions.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration as D, TimeZone, Utc};
use proptest::prelude::*;

use super::*;
use crate::alert::{Alert, AlertStatus, Fingerprint, LabelSet};
use crate::incident::{transition, Event};
use crate::policy::{self, Freeze, FreezeState, GlobalGuards, History, OnTimeout, PolicySet};

const POLICY: &str = r#"
name: web
service: web
matchers: ['service="web"']
target:
  alb:
    listener_arn: arn:aws:elasticloadbalancing:us-east-1:123456789012:listener/app/web/1/2
    stable_target_group_arn: arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web-stable/1
triggers:
  - name: health
    matchers: ['alertname="HealthCheckFailing"']
    for: 2m
    mode: auto
  - name: errors
    matchers: ['alertname="HighErrorRate"']
    for: 5m
    mode: auto
  - name: latency
    matchers: ['alertname="HighLatency"']
    for: 10m
    mode: manual
  - name: elevated
    matchers: ['alertname="ElevatedErrorRate"']
    for: 10m
    mode: {auto_after: 30m}
guards:
  cooldown: 1h
approval:
  approvers: {slack_users: [U1]}
  timeout: 15m
  on_timeout: escalate
"#;

/// The alert names of the policy's triggers, in trigger order.
const NAMES: [&str; 4] = [
    "HealthCheckFailing",
    "HighErrorRate",
    "HighLatency",
    "ElevatedErrorRate",
];

fn set() -> PolicySet {
    PolicySet::from_sources(Path::new("p"), vec![(PathBuf::from("p/web.yaml"), POLICY.into())]).unwrap()
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 22, 3, 0, 0).unwrap()
}

fn alert(name: &str, starts_at: DateTime<Utc>) -> Alert {
    let labels: LabelSet = [("alertname", name), ("service", "web")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Alert {
        status: AlertStatus::Firing,
        labels,
        annotations: LabelSet::new(),
        starts_at,
        ends_at: None,
        generator_url: String::new(),
        fingerprint: Fingerprint(format!("fp-{name}")),
    }
}

/// What the responder knows besides the alerts: the guards' inputs.
#[derive(Debug, Clone, Default)]
struct World {
    history: History,
    freezes: FreezeState,
}

fn candidate(set: &PolicySet, name: &str, starts_at: DateTime<Utc>, now: DateTime<Utc>, w: &World) -> Candidate {
    let a = alert(name, starts_at);
    let (p, t) = policy::find(&a, set).unwrap();
    let d = policy::decide(
        &a,
        Some((p, t)),
        now,
        &w.history,
        &w.freezes,
        &GlobalGuards::default(),
        &set.hash,
    );
    Candidate::new(d, t)
}

fn candidates(set: &PolicySet, firing: &[(&str, DateTime<Utc>)], now: DateTime<Utc>, w: &World) -> Vec<Candidate> {
    firing.iter().map(|(n, s)| candidate(set, n, *s, now, w)).collect()
}

fn situation<'a>(
    now: DateTime<Utc>,
    phase: Phase,
    current: &'a Decision,
    due_at: Option<DateTime<Utc>>,
    candidates: &'a [Candidate],
) -> Situation<'a> {
    Situation {
        now,
        phase,
        current,
        due_at,
        candidates,
        denied: None,
        frozen: false,
    }
}

fn min(m: i64) -> D {
    D::minutes(m)
}

#[test]
fn a_stronger_automatic_trigger_is_not_shadowed_by_the_one_that_opened_the_incident() {
    // Case 5: ElevatedErrorRate opens (too young until +10m), HighErrorRate joins at +1m and
    // passes its 5 minutes at +6m.
    let (set, w) = (set(), World::default());
    let firing = [("ElevatedErrorRate", t0()), ("HighErrorRate", t0() + min(1))];
    let opened = candidate(&set, "ElevatedErrorRate", t0(), t0(), &w).decision;
    let at = t0() + min(6);
    let cs = candidates(&set, &firing, at, &w);
    let next = reconcile(&situation(at, Phase::Waiting, &opened, Some(t0() + min(10)), &cs));
    let Next::Decide { decision, why, .. } = next else {
        panic!("{next:?}")
    };
    assert_eq!(decision.outcome, Outcome::Auto);
    // Case 6: the stronger trigger becomes the named one.
    assert_eq!(decision.trigger.as_deref(), Some("errors"));
    assert!(why.contains("trigger errors is stronger than elevated"), "{why}");

    // At +2m the stronger one is still young: the wait ends at the first re-check, +6m.
    let at = t0() + min(2);
    let cs = candidates(&set, &firing, at, &w);
    let next = reconcile(&situation(at, Phase::Waiting, &opened, Some(t0() + min(10)), &cs));
    assert!(
        matches!(&next, Next::Decide { due_at: Some(d), .. } if *d == t0() + min(6)),
        "{next:?}"
    );
}

#[test]
fn a_young_automatic_alert_joining_a_pending_request_is_due_when_it_passes_its_for() {
    // Case 1: a manual HighLatency request is pending (expires +15m after +10m).
    let (set, w) = (set(), World::default());
    let request = candidate(&set, "HighLatency", t0(), t0() + min(10), &w).decision;
    assert!(matches!(request.outcome, Outcome::NeedsApproval { .. }));
    let firing = [("HighLatency", t0()), ("HealthCheckFailing", t0() + min(11))];
    let at = t0() + min(11);
    let cs = candidates(&set, &firing, at, &w);
    let next = reconcile(&situation(
        at,
        Phase::AwaitingApproval,
        &request,
        Some(t0() + min(25)),
        &cs,
    ));
    assert_eq!(
        next,
        Next::Stay {
            due_at: Some(t0() + min(13)),
            note: None
        }
    );
    let at = t0() + min(13);
    let cs = candidates(&set, &firing, at, &w);
    let next = reconcile(&situation(at, Phase::AwaitingApproval, &request, Some(at), &cs));
    assert!(
        matches!(&next, Next::Decide { decision, .. } if decision.outcome == Outcome::Auto && decision.trigger.as_deref() == Some("health")),
        "{next:?}"
    );

    // A young manual alert joining changes nothing: no wake-up for it.
    let firing = [("HighLatency", t0()), ("CircuitBreakerOpen", t0() + min(11))];
    let at = t0() + min(11);
    let cs = candidates(&set, &firing[..1], at, &w);
    let next = reconcile(&situation(
        at,
        Phase::AwaitingApproval,
        &request,
        Some(t0() + min(25)),
        &cs,
    ));
    assert_eq!(
        next,
        Next::Stay {
            due_at: Some(t0() + min(25)),
            note: None
        }
    );
}

#[test]
fn a_deny_covers_the_request_denied_and_a_later_automatic_trigger_still_acts() {
    // Case 2.
    let (set, w) = (set(), World::default());
    let request = candidate(&set, "HighLatency", t0(), t0() + min(10), &w).decision;
    let denied: BTreeSet<String> = ["latency".to_string()].into();
    let firing = [("HighLatency", t0()), ("HealthCheckFailing", t0() + min(12))];
    let at = t0() + min(14);
    let cs = candidates(&set, &firing, at, &w);
    let mut s = situation(at, Phase::Denied, &request, None, &cs);
    s.denied = Some(&denied);
    let Next::Decide { decision, why, .. } = reconcile(&s) else {
        panic!("{:?}", reconcile(&s))
    };
    assert_eq!(decision.trigger.as_deref(), Some("health"));
    assert!(
        why.contains("the deny earlier covered the request of trigger(s) latency"),
        "{why}"
    );
    assert!(why.contains("automatic trigger health"), "{why}");

    // Still young: the thread is told when it is looked at again, and it is due then.
    let at = t0() + min(13);
    let cs = candidates(&set, &firing, at, &w);
    let mut s = situation(at, Phase::Denied, &request, None, &cs);
    s.denied = Some(&denied);
    let next = reconcile(&s);
    assert!(
        matches!(&next, Next::Stay { due_at: Some(d), note: Some(n) } if *d == t0() + min(14) && n.contains("03:14:00Z")),
        "{next:?}"
    );

    // A deny that covered the automatic trigger too (it was firing then) holds it.
    let both: BTreeSet<String> = ["latency".to_string(), "health".to_string()].into();
    let at = t0() + min(20);
    let cs = candidates(&set, &firing, at, &w);
    let mut s = situation(at, Phase::Denied, &request, None, &cs);
    s.denied = Some(&both);
    assert_eq!(
        reconcile(&s),
        Next::Stay {
            due_at: None,
            note: None
        }
    );
}

#[test]
fn no_second_automatic_rollback_after_a_failed_one_or_a_failed_verification() {
    let (set, w) = (set(), World::default());
    let request = candidate(&set, "HealthCheckFailing", t0(), t0() + min(3), &w).decision;
    let firing = [("HealthCheckFailing", t0()), ("HighErrorRate", t0())];
    let at = t0() + min(30);
    let cs = candidates(&set, &firing, at, &w);
    for phase in [Phase::Failed, Phase::VerificationFailed] {
        let next = reconcile(&situation(at, phase, &request, None, &cs));
        assert!(
            matches!(&next, Next::Stay { due_at: None, note: Some(n) } if n.contains("a person must act")),
            "{phase}: {next:?}"
        );
    }
}

#[test]
fn a_held_incident_is_due_when_the_hold_ends_and_acts_then() {
    // Case 4: a rollback of the target at t0 holds HealthCheckFailing for the 1h cooldown.
    let set = set();
    let w = World {
        history: History {
            last_rollback_on_target: Some(t0()),
            ..History::default()
        },
        ..World::default()
    };
    let firing = [("HealthCheckFailing", t0() + min(10))];
    let at = t0() + min(20);
    let cs = candidates(&set, &firing, at, &w);
    let held = cs[0].decision.clone();
    assert!(matches!(
        held.outcome,
        Outcome::Suppressed(Suppression::Cooldown { .. })
    ));
    let next = reconcile(&situation(at, Phase::Suppressed, &held, None, &cs));
    assert!(
        matches!(&next, Next::Stay { due_at: Some(d), note: Some(_) } if *d == t0() + min(60)),
        "{next:?}"
    );
    let at = t0() + min(60);
    let cs = candidates(&set, &firing, at, &w);
    let next = reconcile(&situation(at, Phase::Suppressed, &held, Some(at), &cs));
    assert!(
        matches!(&next, Next::Decide { decision, .. } if decision.outcome == Outcome::Auto),
        "{next:?}"
    );

    // An open-ended freeze has no end to wait for: re-decided when it is lifted.
    let frozen = World {
        freezes: FreezeState {
            global: Some(Freeze {
                reason: "db failover".into(),
                by: "ops".into(),
                until: None,
            }),
            ..FreezeState::default()
        },
        ..World::default()
    };
    let cs = candidates(&set, &firing, at, &frozen);
    let next = reconcile(&situation(at, Phase::Suppressed, &cs[0].decision, None, &cs));
    assert_eq!(
        next,
        Next::Stay {
            due_at: None,
            note: None
        }
    );
}

#[test]
fn a_request_held_by_a_freeze_on_expiry_is_not_asked_again_until_the_freeze_is_lifted() {
    let (set, w) = (set(), World::default());
    let asked = candidate(&set, "HighLatency", t0(), t0() + min(10), &w).decision;
    // The request expired with "roll back anyway" during a freeze: held, same trigger.
    let held = Decision {
        outcome: Outcome::Suppressed(Suppression::Frozen {
            scope: "global".into(),
            freeze_reason: "change freeze".into(),
            until: None,
        }),
        ..asked
    };
    let at = t0() + min(30);
    let cs = candidates(&set, &[("HighLatency", t0())], at, &w);
    let mut s = situation(at, Phase::Suppressed, &held, None, &cs);
    s.frozen = true;
    assert_eq!(
        reconcile(&s),
        Next::Stay {
            due_at: None,
            note: None
        }
    );
    s.frozen = false;
    let next = reconcile(&s);
    assert!(
        matches!(&next, Next::Decide { decision, why, .. } if matches!(decision.outcome, Outcome::NeedsApproval { .. }) && why.starts_with("the hold has ended")),
        "{next:?}"
    );
}

#[test]
fn a_pending_request_expires_at_its_own_time_not_at_an_earlier_re_check() {
    let (set, w) = (set(), World::default());
    let request = candidate(&set, "HighLatency", t0(), t0() + min(10), &w).decision;
    let cs = candidates(&set, &[("HighLatency", t0())], t0() + min(20), &w);
    let s = situation(
        t0() + min(20),
        Phase::AwaitingApproval,
        &request,
        Some(t0() + min(20)),
        &cs,
    );
    assert_eq!(
        reconcile(&s),
        Next::Stay {
            due_at: Some(t0() + min(25)),
            note: None
        }
    );
    let cs = candidates(&set, &[("HighLatency", t0())], t0() + min(25), &w);
    let s = situation(
        t0() + min(25),
        Phase::AwaitingApproval,
        &request,
        Some(t0() + min(25)),
        &cs,
    );
    assert_eq!(reconcile(&s), Next::Expire);
    assert_eq!(request_expiry(&request.outcome), Some(t0() + min(25)));
}

/// `auto_after` rolls back when its time comes for the trigger that asked, only while that
/// trigger still fires: once its alert resolved, the request stands on what still fires (here
/// a manual trigger, which needs a person) and the timer goes. Before, the request expired
/// into a rollback although its alert had resolved.
#[test]
fn a_request_whose_asking_trigger_resolved_does_not_roll_back_on_its_timer() {
    let (set, w) = (set(), World::default());
    let asked = candidate(&set, "ElevatedErrorRate", t0(), t0() + min(10), &w).decision;
    assert!(matches!(asked.outcome, Outcome::EscalateLater { .. }), "{asked:?}");
    let auto_at = request_expiry(&asked.outcome).unwrap();
    let now = auto_at + min(1);
    // Still firing: the request expires (and the caller rolls back).
    let both = candidates(
        &set,
        &[("ElevatedErrorRate", t0()), ("HighLatency", t0() + min(1))],
        now,
        &w,
    );
    let s = situation(now, Phase::AwaitingApproval, &asked, Some(auto_at), &both);
    assert_eq!(reconcile(&s), Next::Expire);
    // Resolved: re-decided on the latency trigger, a request for a person, no timer of its own.
    let latency = candidates(&set, &[("HighLatency", t0() + min(1))], now, &w);
    let s = situation(now, Phase::AwaitingApproval, &asked, Some(auto_at), &latency);
    let Next::Decide { decision, why, .. } = reconcile(&s) else {
        panic!("{:?}", reconcile(&s));
    };
    assert_eq!(decision.trigger.as_deref(), Some("latency"));
    assert!(
        matches!(
            decision.outcome,
            Outcome::NeedsApproval {
                on_timeout: OnTimeout::Escalate,
                ..
            }
        ),
        "{decision:?}"
    );
    assert!(why.starts_with("trigger elevated no longer fires"), "{why}");
    assert_eq!(
        transition(
            Phase::AwaitingApproval,
            &Event::Decided {
                outcome: decision.outcome.clone()
            }
        ),
        Ok(Phase::AwaitingApproval)
    );
    // And the request then stands: asked again, it stays until its own expiry.
    let s = situation(now, Phase::AwaitingApproval, &decision, None, &latency);
    assert!(matches!(reconcile(&s), Next::Stay { .. }), "{:?}", reconcile(&s));
}

#[test]
fn nothing_firing_cancels_a_wait_and_leaves_a_settled_incident_alone() {
    let (set, w) = (set(), World::default());
    let d = candidate(&set, "HighLatency", t0(), t0(), &w).decision;
    assert_eq!(reconcile(&situation(t0(), Phase::Waiting, &d, None, &[])), Next::Cancel);
    assert_eq!(
        reconcile(&situation(t0(), Phase::Verified, &d, None, &[])),
        Next::Stay {
            due_at: None,
            note: None
        }
    );
}

mod model;
