//! Which work in flight this replica may claim: only what it can run as it was decided.
//!
//! Replicas on one store may be configured differently: one in global dry run, one without
//! the executor a policy needs (`aws:` or `kubernetes:`). The incident says how it was decided
//! (its decision: a real run or a dry run) and what it needs (its planned target's kind). A
//! replica that cannot run a real rollback as decided never claims it, so it never records
//! "not executing" or a dry run for somebody else's real incident: it leaves the incident to a
//! replica that can, says so once in the log, and shows it in `/readyz` and in
//! `rollback_responder_work_unclaimable` for as long as nobody has taken it. Comes before
//! `Responder::run_work`'s claim; the claim itself is `Store::claim`.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use tracing::warn;

use super::Responder;
use crate::incident::{Incident, IncidentId, Phase};
use crate::notify;

/// An incident this replica leaves to others, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unclaimable {
    pub incident: String,
    pub why: String,
}

/// The incidents this replica currently leaves to others (for `/readyz` and the gauge).
#[derive(Default)]
pub(super) struct Left(std::sync::Mutex<LeftState>);

#[derive(Default)]
struct LeftState {
    /// What this replica leaves, and why.
    why: BTreeMap<IncidentId, String>,
    /// Unowned work as of the worker's latest look ([`Responder::still_unowned`]).
    unowned: BTreeSet<IncidentId>,
}

impl Left {
    fn lock(&self) -> std::sync::MutexGuard<'_, LeftState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Responder {
    /// Why this replica cannot run `inc`'s work as it was decided; `None` when it can. A dry
    /// run can be rehearsed anywhere; a real run needs this replica out of dry run (to act) and
    /// the target's executor (to act and to read back during verification).
    pub(super) fn cannot_run(&self, inc: &Incident) -> Option<String> {
        if notify::is_dry_run(inc) || !matches!(inc.phase, Phase::Executing | Phase::Verifying) {
            return None;
        }
        let target = inc.plan.target().ok()?;
        if !self.executors.can_execute(target) {
            return Some(format!(
                "decided for a real rollback of a {} target, but this replica has no {} executor configured",
                target.kind().as_str(),
                target.kind().as_str()
            ));
        }
        if inc.phase == Phase::Executing && self.global.dry_run {
            return Some(
                "decided for a real rollback, but this replica is in dry run (safety.dry_run): it would only record \
                 what it would do"
                    .into(),
            );
        }
        None
    }

    /// Leaves `id` to other replicas because of `why`: logged and counted once per incident.
    /// Only while the worker's latest look still found it unowned: the task that decided to
    /// leave it was started by an earlier look and may come late (a slow store, a busy
    /// machine), after a later look saw another replica take it; recording it then would
    /// show taken work as waiting until the next look, and log it a second time.
    pub(super) fn leave(&self, id: &IncidentId, why: String) {
        let mut left = self.left.lock();
        if !left.unowned.contains(id) {
            return;
        }
        let new = left.why.insert(id.clone(), why.clone()).is_none();
        self.metrics.set_unclaimable(left.why.len());
        if new {
            warn!(incident = %id, why, "leaving this incident's work to a replica that can run it as decided");
        }
    }

    /// Forgets left work that is no longer waiting for a claim: `unowned` is every incident
    /// with work in flight that nobody holds now (what another replica took is not in it).
    pub fn still_unowned(&self, unowned: &[IncidentId]) {
        let mut left = self.left.lock();
        left.unowned = unowned.iter().cloned().collect();
        let LeftState { why, unowned } = &mut *left;
        why.retain(|id, _| unowned.contains(id));
        self.metrics.set_unclaimable(why.len());
    }

    /// The incidents this replica leaves to others, for `/readyz`.
    pub fn unclaimable(&self) -> Vec<Unclaimable> {
        self.left
            .lock()
            .why
            .iter()
            .map(|(id, why)| Unclaimable {
                incident: id.0.clone(),
                why: why.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::Target;
    use crate::policy::{Outcome, Suppression};
    use crate::responder::tests::responder;
    use crate::responder::Clock;

    fn kube_incident(phase: Phase) -> Incident {
        let t: Target = serde_json::from_value(serde_json::json!({"kubernetes": {
            "namespace": "portal", "steps": [{"scale": {"deployment": "web", "replicas": 0}}]
        }}))
        .expect("target");
        let mut inc = Incident::sample(phase, chrono::Utc::now());
        inc.plan = t.into();
        inc
    }

    #[tokio::test]
    async fn a_real_rollback_needs_the_executor_and_a_dry_run_can_be_rehearsed_anywhere() {
        // No executor configured here.
        let (_dir, r) = responder(Clock::System).await;
        let real = kube_incident(Phase::Executing);
        let why = r.cannot_run(&real).expect("left to others");
        assert_eq!(
            why,
            "decided for a real rollback of a kubernetes target, but this replica has no kubernetes executor configured"
        );
        assert!(
            r.cannot_run(&kube_incident(Phase::Verifying)).is_some(),
            "it cannot read back either"
        );
        let mut dry = kube_incident(Phase::Executing);
        dry.decision.outcome = Outcome::Suppressed(Suppression::DryRun {
            would: Box::new(Outcome::Auto),
        });
        assert_eq!(r.cannot_run(&dry), None);
        // Nothing in flight: nothing to claim or leave.
        assert_eq!(r.cannot_run(&kube_incident(Phase::Verified)), None);
    }

    #[tokio::test]
    async fn left_work_is_shown_until_nobody_needs_to_claim_it() {
        let (_dir, r) = responder(Clock::System).await;
        let (a, b) = (kube_incident(Phase::Executing), kube_incident(Phase::Executing));
        // The worker's look found both unowned and started a task for each.
        r.still_unowned(&[a.id.clone(), b.id.clone()]);
        r.leave(&a.id, "why a".into());
        r.leave(&a.id, "why a".into());
        r.leave(&b.id, "why b".into());
        assert_eq!(r.unclaimable().len(), 2);
        assert!(r.metrics.render().contains("rollback_responder_work_unclaimable 2"));
        // `b` was taken by a replica that can run it: only `a` is still waiting.
        r.still_unowned(std::slice::from_ref(&a.id));
        assert_eq!(
            r.unclaimable(),
            vec![Unclaimable {
                incident: a.id.0.clone(),
                why: "why a".into()
            }]
        );
        assert!(r.metrics.render().contains("rollback_responder_work_unclaimable 1"));
    }

    /// The task a look started comes late: the next look already saw another replica take
    /// the work. It must not show the taken work as waiting again (nor log it a second time,
    /// which the logging follows: it logs only what it adds).
    #[tokio::test]
    async fn a_late_task_does_not_leave_work_a_later_look_saw_taken() {
        let (_dir, r) = responder(Clock::System).await;
        let a = kube_incident(Phase::Executing);
        r.still_unowned(std::slice::from_ref(&a.id));
        r.leave(&a.id, "why a".into());
        assert_eq!(r.unclaimable().len(), 1);
        // Another replica takes it; the next look starts no task, but the one started by the
        // look before is slow and reaches its leave only now.
        r.still_unowned(&[]);
        r.leave(&a.id, "why a".into());
        assert_eq!(r.unclaimable(), vec![], "taken work shown as waiting again");
        assert!(r.metrics.render().contains("rollback_responder_work_unclaimable 0"));
        // Never looked at as unowned (its look failed): nothing recorded either.
        let b = kube_incident(Phase::Executing);
        r.leave(&b.id, "why b".into());
        assert_eq!(r.unclaimable(), vec![]);
    }
}
