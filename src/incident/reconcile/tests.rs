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

// ---- Random sequences -------------------------------------------------------------------

/// One input to the incident.
#[derive(Debug, Clone)]
enum Op {
    /// An alert of trigger `NAMES[i]` fires; `age_secs` before now.
    Fire(usize, u32),
    Resolve(usize),
    /// The clock moves on, then due incidents are reconciled (the worker's tick).
    Step(u32),
    Deny,
    /// An authorized person presses Approve / runs `/rollback now`.
    HumanRollback,
    Freeze,
    Unfreeze,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..NAMES.len(), 0u32..1200).prop_map(|(i, a)| Op::Fire(i, a)),
        2 => (0..NAMES.len()).prop_map(Op::Resolve),
        // Clock steps of every scale: within a `for`, across a request's timeout, past a cooldown.
        3 => (1u32..60).prop_map(Op::Step),
        3 => (60u32..600).prop_map(Op::Step),
        2 => (600u32..4000).prop_map(Op::Step),
        1 => Just(Op::Deny),
        1 => Just(Op::HumanRollback),
        1 => Just(Op::Freeze),
        1 => Just(Op::Unfreeze),
    ]
}

/// The incident as the model keeps it.
#[derive(Debug, Clone)]
struct Inc {
    phase: Phase,
    decision: Decision,
    due_at: Option<DateTime<Utc>>,
    denied: Option<BTreeSet<String>>,
}

/// A small responder around the pure function: the same inputs, every change through
/// `transition`, and an action that always succeeds and verifies at once.
struct Model {
    set: PolicySet,
    now: DateTime<Utc>,
    firing: BTreeMap<usize, DateTime<Utc>>,
    inc: Option<Inc>,
    world: World,
    rollbacks: Vec<(DateTime<Utc>, bool)>,
}

impl Model {
    fn new() -> Model {
        Model {
            set: set(),
            now: t0(),
            firing: BTreeMap::new(),
            inc: None,
            world: World::default(),
            rollbacks: Vec::new(),
        }
    }

    fn frozen(&self) -> bool {
        self.world.freezes.global.is_some()
    }

    fn cands(&self) -> Vec<Candidate> {
        self.firing
            .iter()
            .map(|(i, s)| candidate(&self.set, NAMES[*i], *s, self.now, &self.world))
            .collect()
    }

    /// An incident that enters `executing` rolls back (automatically unless `by_human`).
    fn enter(&mut self, phase: Phase, by_human: bool) {
        let inc = self.inc.as_mut().unwrap();
        inc.phase = phase;
        if phase == Phase::Executing {
            self.rollbacks.push((self.now, by_human));
            self.world.history.last_rollback_on_target = Some(self.now);
            let p = transition(
                Phase::Executing,
                &Event::ActionSucceeded {
                    changed: true,
                    dry_run: false,
                },
            )
            .unwrap();
            let p = transition(p, &Event::VerificationPassed).unwrap();
            let inc = self.inc.as_mut().unwrap();
            inc.phase = p;
            inc.due_at = None;
        }
    }

    /// Reconciles the incident (or opens one) and applies the answer. Returns the phase
    /// before and the step taken.
    fn reconcile(&mut self) -> Result<(), TestCaseError> {
        let cands = self.cands();
        let Some(inc) = self.inc.clone() else {
            // No incident: the first firing alert opens one, in the phase its decision says.
            let Some(best) = strongest(&cands).cloned() else {
                return Ok(());
            };
            let Some(phase) = Phase::for_outcome(&best.decision.outcome) else {
                return Ok(());
            };
            let due_at = match phase {
                Phase::Waiting | Phase::AwaitingApproval | Phase::Suppressed => {
                    super::due_after(&situation(self.now, phase, &best.decision, None, &cands), &best)
                }
                _ => None,
            };
            self.inc = Some(Inc {
                phase: Phase::Waiting,
                decision: best.decision.clone(),
                due_at,
                denied: None,
            });
            self.enter(phase, false);
            return self.close_if_done();
        };
        let s = Situation {
            now: self.now,
            phase: inc.phase,
            current: &inc.decision,
            due_at: inc.due_at,
            candidates: &cands,
            denied: inc.denied.as_ref(),
            frozen: self.frozen(),
        };
        match reconcile(&s) {
            Next::Stay { due_at, note } => {
                if let Some(n) = &note {
                    if n.contains("re-evaluated at") {
                        prop_assert!(due_at.is_some(), "a promise of a re-evaluation needs a due time: {n}");
                    }
                }
                self.inc.as_mut().unwrap().due_at = due_at;
            }
            Next::Decide { decision, due_at, why } => {
                let next = transition(
                    inc.phase,
                    &Event::Decided {
                        outcome: decision.outcome.clone(),
                    },
                )
                .map_err(|e| TestCaseError::fail(format!("{e}: {why}")))?;
                // The message matches what then happens.
                if next == Phase::Executing {
                    prop_assert!(
                        why.contains("roll back automatically") || why.contains("rolls back automatically"),
                        "acting, but the message says otherwise: {why}"
                    );
                } else {
                    prop_assert!(
                        !why.contains("roll back automatically"),
                        "the message promises a rollback that does not happen ({next}): {why}"
                    );
                }
                let i = self.inc.as_mut().unwrap();
                i.decision = decision;
                i.due_at = due_at;
                self.enter(next, false);
            }
            Next::Expire => {
                // A request that rolls back on its own expires only while the trigger that
                // asked still fires.
                if acts_on_expiry(&inc.decision.outcome) {
                    prop_assert!(
                        cands.iter().any(|c| c.decision.trigger == inc.decision.trigger),
                        "{:?} expired into a rollback although it no longer fires",
                        inc.decision.trigger
                    );
                }
                let next = transition(
                    inc.phase,
                    &Event::ApprovalExpired {
                        on_timeout: OnTimeout::Escalate,
                    },
                )
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let i = self.inc.as_mut().unwrap();
                i.due_at = None;
                self.enter(next, false);
                // The request is over: what fires now is decided again at once.
                return self.reconcile();
            }
            Next::Cancel => {
                let next =
                    transition(inc.phase, &Event::AllAlertsResolved).map_err(|e| TestCaseError::fail(e.to_string()))?;
                self.enter(next, false);
            }
        }
        self.close_if_done()
    }

    fn close_if_done(&mut self) -> Result<(), TestCaseError> {
        if let Some(inc) = &self.inc {
            if crate::incident::should_close(inc.phase, self.firing.len() as u64) {
                self.inc = None;
            }
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Fire(i, age) => {
                if self.firing.contains_key(i) {
                    return Ok(()); // a re-send: same startsAt, wakes nothing
                }
                let starts = self.now - D::seconds(i64::from(*age));
                self.firing.insert(*i, starts);
                self.reconcile()
            }
            Op::Resolve(i) => {
                if self.firing.remove(i).is_none() {
                    return Ok(());
                }
                self.reconcile()
            }
            Op::Step(secs) => {
                // The worker ticks through every due time on the way.
                let end = self.now + D::seconds(i64::from(*secs));
                loop {
                    let due = self.inc.as_ref().and_then(|i| i.due_at).filter(|d| *d <= end);
                    match due {
                        Some(d) => {
                            self.now = self.now.max(d);
                            self.reconcile()?;
                            let again = self.inc.as_ref().and_then(|i| i.due_at);
                            prop_assert!(
                                again.is_none_or(|a| a > self.now),
                                "the due time does not move on: {again:?} at {}",
                                self.now
                            );
                        }
                        None => break,
                    }
                }
                self.now = end;
                self.check_tick()
            }
            Op::Deny => {
                let Some(inc) = &self.inc else { return Ok(()) };
                if inc.phase != Phase::AwaitingApproval {
                    return Ok(());
                }
                let covered: BTreeSet<String> =
                    self.cands().iter().filter_map(|c| c.decision.trigger.clone()).collect();
                let next = transition(inc.phase, &Event::Denied { by: "U1".into() }).unwrap();
                let i = self.inc.as_mut().unwrap();
                i.denied = Some(covered);
                i.due_at = None;
                self.enter(next, true);
                self.reconcile()
            }
            Op::HumanRollback => {
                let Some(inc) = &self.inc else { return Ok(()) };
                let before = inc.phase;
                match transition(before, &Event::HumanRollback { by: "U1".into() }) {
                    Ok(next) => {
                        prop_assert_eq!(next, Phase::Executing);
                        self.enter(next, true);
                        prop_assert_eq!(self.rollbacks.last().map(|r| r.0), Some(self.now));
                    }
                    Err(_) => {
                        prop_assert!(
                            !matches!(
                                before,
                                Phase::Escalated
                                    | Phase::Failed
                                    | Phase::VerificationFailed
                                    | Phase::GaveUp
                                    | Phase::Denied
                            ),
                            "a human rollback on an incident {} must act",
                            before
                        );
                    }
                }
                self.close_if_done()
            }
            Op::Freeze => {
                self.world.freezes.global = Some(Freeze {
                    reason: "change freeze".into(),
                    by: "ops".into(),
                    until: None,
                });
                self.reconcile()
            }
            Op::Unfreeze => {
                if self.world.freezes.global.take().is_none() {
                    return Ok(());
                }
                self.reconcile()
            }
        }
    }

    /// After a tick: an automatic trigger past its `for` with no hold in force has rolled back,
    /// unless the incident's story rules it out (a rollback already done or failed, a deny
    /// that covered it).
    fn check_tick(&self) -> Result<(), TestCaseError> {
        let cooling = self
            .world
            .history
            .last_rollback_on_target
            .is_some_and(|l| self.now < l + D::hours(1));
        if self.frozen() || cooling {
            return Ok(());
        }
        let ripe: Vec<String> = self
            .cands()
            .into_iter()
            .filter(|c| c.decision.outcome == Outcome::Auto)
            .filter_map(|c| c.decision.trigger)
            .collect();
        if ripe.is_empty() {
            return Ok(());
        }
        if let Some(inc) = &self.inc {
            let ruled_out = matches!(
                inc.phase,
                Phase::Verified | Phase::Failed | Phase::VerificationFailed | Phase::DryRun
            ) || inc.denied.as_ref().is_some_and(|d| ripe.iter().all(|t| d.contains(t)));
            prop_assert!(
                ruled_out,
                "automatic trigger(s) {ripe:?} ripe at {} with no hold, but the incident is {} ({:?})",
                self.now,
                inc.phase,
                inc.decision.reason
            );
        }
        Ok(())
    }

    fn check_always(&self) -> Result<(), TestCaseError> {
        // Never more than one automatic rollback of the target within the cooldown.
        let auto: Vec<DateTime<Utc>> = self.rollbacks.iter().filter(|r| !r.1).map(|r| r.0).collect();
        for w in auto.windows(2) {
            prop_assert!(
                w[1] - w[0] >= D::hours(1),
                "two rollbacks within the cooldown: {auto:?}"
            );
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_keep_the_invariants(ops in proptest::collection::vec(op(), 1..30)) {
        let mut m = Model::new();
        for o in &ops {
            let frozen = m.frozen();
            let before = m.rollbacks.len();
            m.apply(o)?;
            // Nothing acts on its own through a freeze.
            if frozen && m.frozen() {
                prop_assert!(
                    m.rollbacks[before..].iter().all(|r| r.1),
                    "an automatic rollback went through a freeze at {} after {o:?}",
                    m.now
                );
            }
            m.check_always()?;
        }
        // The next tick after the last input.
        m.apply(&Op::Step(1))?;
        m.check_tick()?;
    }
}

#[test]
fn the_model_rolls_back_a_young_automatic_alert_joining_a_pending_request() {
    let mut m = Model::new();
    for o in [Op::Fire(2, 700), Op::Fire(0, 0), Op::Step(200)] {
        m.apply(&o).unwrap();
    }
    assert_eq!(m.rollbacks.len(), 1, "{:?}", m.inc);
}
