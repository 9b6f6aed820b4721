//! Random sequences (proptest) against the invariants, on a model of the incident.

use super::*;

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
