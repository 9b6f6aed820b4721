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

use std::collections::BTreeMap;

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
pub(super) struct Left(std::sync::Mutex<BTreeMap<IncidentId, String>>);

impl Left {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<IncidentId, String>> {
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
    pub(super) fn leave(&self, id: &IncidentId, why: String) {
        let mut left = self.left.lock();
        let new = left.insert(id.clone(), why.clone()).is_none();
        self.metrics.set_unclaimable(left.len());
        if new {
            warn!(incident = %id, why, "leaving this incident's work to a replica that can run it as decided");
        }
    }

    /// Forgets left work that is no longer waiting for a claim: `unowned` is every incident
    /// with work in flight that nobody holds now (what another replica took is not in it).
    pub fn still_unowned(&self, unowned: &[IncidentId]) {
        let mut left = self.left.lock();
        left.retain(|id, _| unowned.contains(id));
        self.metrics.set_unclaimable(left.len());
    }

    /// The incidents this replica leaves to others, for `/readyz`.
    pub fn unclaimable(&self) -> Vec<Unclaimable> {
        self.left
            .lock()
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
}
