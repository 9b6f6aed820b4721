//! The next step of an open incident, computed from everything it depends on: the decisions
//! of its firing alerts (one per trigger, made by `policy::decide` at `now`, so the guards,
//! freezes and `for` are already in them), the decision it stands on, its phase and due time,
//! and what a human denied. Pure: the clock is passed in, nothing is read or written.
//!
//! The responder calls [`reconcile`] whenever an input changes (an alert joins or resolves, a
//! vote, an expiry, a hold ending, an operator command, a policy reload, a due time) and applies
//! the answer through `incident::transition`. docs/policies.md has the same rules as a table.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};

use super::Phase;
use crate::policy::{Decision, Outcome, Suppression};

/// How strongly an outcome acts; a stronger trigger promotes the incident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Strength {
    /// No policy matches any more, or the alert's data cannot be decided.
    Nothing,
    /// Not firing long enough yet.
    TooYoung,
    /// Would act, but a guard holds it (cooldown, rate limit, freeze).
    Held,
    /// Ask a human.
    Approval,
    /// Ask a human now, roll back on its own later.
    EscalateLater,
    /// Roll back now.
    Rollback,
}

impl Strength {
    /// The strength of a decision's outcome (a dry run counts as what it would have done).
    pub fn of(outcome: &Outcome) -> Strength {
        match outcome {
            Outcome::NoMatch | Outcome::Undecidable { .. } => Strength::Nothing,
            Outcome::Auto => Strength::Rollback,
            Outcome::EscalateLater { .. } => Strength::EscalateLater,
            Outcome::NeedsApproval { .. } => Strength::Approval,
            Outcome::Suppressed(Suppression::TooYoung { .. }) => Strength::TooYoung,
            Outcome::Suppressed(Suppression::DryRun { would }) => Strength::of(would),
            Outcome::Suppressed(_) => Strength::Held,
        }
    }
}

/// One firing trigger of the incident: the decision for its oldest firing alert, and what
/// the trigger does once its `for` has passed (to know whether waiting for it is worth it).
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub decision: Decision,
    /// [`Strength::Rollback`] for an automatic trigger, [`Strength::EscalateLater`] for
    /// `auto_after`, [`Strength::Approval`] for a manual one.
    pub matures_to: Strength,
}

impl Candidate {
    /// The candidate for a firing alert of `trigger`, decided as `decision`.
    pub fn new(decision: Decision, trigger: &crate::policy::Trigger) -> Candidate {
        let matures_to = match trigger.mode {
            crate::policy::Mode::Auto => Strength::Rollback,
            crate::policy::Mode::AutoAfter(_) => Strength::EscalateLater,
            crate::policy::Mode::Manual => Strength::Approval,
        };
        Candidate { decision, matures_to }
    }
}

/// Everything the next step depends on.
#[derive(Debug, Clone)]
pub struct Situation<'a> {
    pub now: DateTime<Utc>,
    pub phase: Phase,
    /// The decision the incident stands on (its named trigger).
    pub current: &'a Decision,
    pub due_at: Option<DateTime<Utc>>,
    /// One per firing trigger; empty when no alert fires any more.
    pub candidates: &'a [Candidate],
    /// The triggers that were firing when a human denied the request (the deny covers them).
    pub denied: Option<&'a BTreeSet<String>>,
    /// Whether a freeze holds the policy's automatic rollbacks now.
    pub frozen: bool,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// No phase change. `due_at`: when to look again (`None`: only when an input changes);
    /// `note`: what the thread should say instead of the joining alert's own promise.
    Stay {
        due_at: Option<DateTime<Utc>>,
        note: Option<String>,
    },
    /// Re-decide on `decision` (`Event::Decided`): promotes, acts, or waits on a new trigger.
    /// `due_at` replaces the due time the decision alone would give.
    Decide {
        decision: Decision,
        due_at: Option<DateTime<Utc>>,
        why: String,
    },
    /// The approval request has expired: the caller applies the policy's `on_timeout`.
    Expire,
    /// Nothing fires any more and nothing was started: cancel.
    Cancel,
}

/// When a pending request expires (an approval's timeout, or `auto_after`'s automatic time).
pub fn request_expiry(outcome: &Outcome) -> Option<DateTime<Utc>> {
    match outcome {
        Outcome::NeedsApproval { expires_at, .. } => Some(*expires_at),
        Outcome::EscalateLater { auto_at } => Some(*auto_at),
        Outcome::Suppressed(Suppression::DryRun { would }) => request_expiry(would),
        _ => None,
    }
}

/// Whether a pending request rolls back on its own when it expires.
fn acts_on_expiry(outcome: &Outcome) -> bool {
    match outcome {
        Outcome::EscalateLater { .. } => true,
        Outcome::NeedsApproval { on_timeout, .. } => *on_timeout == crate::policy::OnTimeout::Rollback,
        Outcome::Suppressed(Suppression::DryRun { would }) => acts_on_expiry(would),
        _ => false,
    }
}

/// When the hold in `outcome` ends, if it is a hold with a known end. A rate limit is looked
/// at again one window later (by then the oldest counted rollback has left the window).
pub fn hold_ends(outcome: &Outcome, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    match outcome {
        Outcome::Suppressed(Suppression::Cooldown { until, .. }) => Some(*until),
        Outcome::Suppressed(Suppression::Frozen { until, .. }) => *until,
        Outcome::Suppressed(Suppression::RateLimited { window_secs, .. }) => Some(crate::policy::saturating_after(
            now,
            std::time::Duration::from_secs(*window_secs),
        )),
        _ => None,
    }
    .filter(|t| *t < DateTime::<Utc>::MAX_UTC)
}

fn recheck_at(outcome: &Outcome) -> Option<DateTime<Utc>> {
    match outcome {
        Outcome::Suppressed(Suppression::TooYoung { recheck_at, .. }) => Some(*recheck_at),
        Outcome::Suppressed(Suppression::DryRun { would }) => recheck_at(would),
        _ => None,
    }
}

fn earliest(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The strongest candidate; among equals the one that is due first (the earliest re-check).
fn strongest(candidates: &[Candidate]) -> Option<&Candidate> {
    candidates.iter().reduce(|best, c| {
        let (sb, sc) = (Strength::of(&best.decision.outcome), Strength::of(&c.decision.outcome));
        let earlier = || match (recheck_at(&c.decision.outcome), recheck_at(&best.decision.outcome)) {
            (Some(a), Some(b)) => a < b,
            _ => false,
        };
        if sc > sb || (sc == sb && earlier()) {
            c
        } else {
            best
        }
    })
}

/// When a young trigger that would act more strongly than `than` has passed its `for`.
fn maturing(candidates: &[Candidate], than: Strength, may_act: impl Fn(&Candidate) -> bool) -> Option<DateTime<Utc>> {
    candidates
        .iter()
        .filter(|c| c.matures_to > than && may_act(c))
        .filter_map(|c| recheck_at(&c.decision.outcome))
        .min()
}

fn trigger(d: &Decision) -> &str {
    d.trigger.as_deref().unwrap_or("-")
}

/// Whether an alert joining an incident in `phase` could change its next step; when it cannot
/// (most of a storm: more of the same), the responder records the join and skips re-deciding.
pub fn may_change(
    phase: Phase,
    current: &Decision,
    due_at: Option<DateTime<Utc>>,
    joining: &Candidate,
    now: DateTime<Utc>,
) -> bool {
    let strength = Strength::of(&joining.decision.outcome);
    let current = Strength::of(&current.outcome);
    let sooner = || next_change(joining, now).is_some_and(|t| due_at.is_none_or(|d| t < d));
    match phase {
        Phase::Waiting => strength > Strength::TooYoung || sooner(),
        Phase::AwaitingApproval => strength > current || (joining.matures_to > current && sooner()),
        Phase::Suppressed => strength >= Strength::Approval || sooner(),
        Phase::Denied | Phase::Escalated | Phase::GaveUp => {
            strength == Strength::Rollback || (joining.matures_to >= Strength::EscalateLater && sooner())
        }
        _ => false,
    }
}

/// The incident's next step. See the module comment and docs/policies.md.
pub fn reconcile(s: &Situation<'_>) -> Next {
    use Phase as P;
    let stay = |due_at, note: Option<String>| Next::Stay { due_at, note };
    let best = strongest(s.candidates);
    let Some(best) = best else {
        return match s.phase {
            // A person's request (`/rollback now` under a two-person rule: a decision of no
            // trigger) stands on no alert, so none firing is no reason to cancel it: it waits
            // for its second approver until it expires, then its `on_timeout` applies.
            P::AwaitingApproval if s.current.trigger.is_none() => match request_expiry(&s.current.outcome) {
                Some(e) if e <= s.now => Next::Expire,
                expiry => stay(expiry, None),
            },
            P::Waiting | P::AwaitingApproval => Next::Cancel,
            _ => stay(None, None),
        };
    };
    let strength = Strength::of(&best.decision.outcome);
    let current = Strength::of(&s.current.outcome);
    match s.phase {
        P::Waiting => match strength {
            Strength::TooYoung => {
                // Still too young everywhere: only an earlier re-check is news.
                let first = recheck_at(&best.decision.outcome);
                if s.due_at.is_some_and(|d| d > s.now) && first >= s.due_at {
                    return stay(s.due_at, None);
                }
                Next::Decide {
                    decision: best.decision.clone(),
                    due_at: first,
                    why: format!("re-evaluated: {}", best.decision.reason),
                }
            }
            // A reload removed the trigger: the transition cancels the wait.
            Strength::Nothing => Next::Decide {
                decision: best.decision.clone(),
                due_at: None,
                why: format!("re-evaluated: {}", best.decision.reason),
            },
            _ => Next::Decide {
                decision: best.decision.clone(),
                due_at: due_after(s, best),
                why: promoted_why(s, best),
            },
        },
        P::AwaitingApproval => {
            // The request's own time comes first (its on_timeout); what fires is decided again
            // right after (the caller does, see `Next::Expire`).
            let expiry = request_expiry(&s.current.outcome);
            // A request that rolls back on its own when its time comes (`auto_after`, or
            // `on_timeout: rollback`) does so for the trigger that asked: once that trigger no
            // longer fires (its alerts resolved), the request stands on what still fires
            // instead, and its timer goes with it.
            if acts_on_expiry(&s.current.outcome)
                && !s.candidates.iter().any(|c| trigger(&c.decision) == trigger(s.current))
            {
                return Next::Decide {
                    decision: best.decision.clone(),
                    due_at: due_after(s, best),
                    why: format!(
                        "trigger {} no longer fires, so its request's timer is off; re-decided on {}: {}",
                        trigger(s.current),
                        trigger(&best.decision),
                        best.decision.reason
                    ),
                };
            }
            if expiry.is_some_and(|e| e <= s.now) {
                return Next::Expire;
            }
            if strength > current && strength >= Strength::Approval {
                return Next::Decide {
                    decision: best.decision.clone(),
                    due_at: due_after(s, best),
                    why: promoted_why(s, best),
                };
            }
            let held = s
                .candidates
                .iter()
                .filter(|c| c.matures_to > current)
                .filter_map(|c| held_until(c, s.now))
                .min();
            stay(
                earliest(earliest(expiry, maturing(s.candidates, current, |_| true)), held),
                None,
            )
        }
        // The request was answered or ran out: only an automatic trigger (one the deny did
        // not cover) acts on its own now; a person can still roll back by hand.
        P::Denied | P::Escalated | P::GaveUp => {
            let covered = |c: &Candidate| s.denied.is_some_and(|d| d.contains(trigger(&c.decision)));
            let acting = s
                .candidates
                .iter()
                .filter(|c| !covered(c) && Strength::of(&c.decision.outcome) == Strength::Rollback)
                .min_by_key(|c| c.decision.trigger.clone());
            if let Some(c) = acting {
                return Next::Decide {
                    decision: c.decision.clone(),
                    due_at: None,
                    why: after_settled_why(s, c),
                };
            }
            // When an uncovered trigger that acts on its own (automatic, or `auto_after` once
            // its time comes) could act: it passes its `for`, its automatic time comes, or the
            // hold on it ends.
            let due = s
                .candidates
                .iter()
                .filter(|c| !covered(c) && c.matures_to >= Strength::EscalateLater)
                .filter_map(|c| next_change(c, s.now))
                .min();
            stay(
                due,
                due.map(|at| format!("re-evaluated at {} if still firing", at.format("%H:%M:%SZ"))),
            )
        }
        P::Suppressed => {
            // Held by a freeze when an approval request expired with "roll back anyway":
            // asking again for the same trigger while the freeze lasts would only be held
            // again. Another (manual) trigger still asks: a freeze holds automatic rollbacks.
            let freeze_holds = s.frozen
                && matches!(s.current.outcome, Outcome::Suppressed(Suppression::Frozen { .. }))
                && best.decision.trigger == s.current.trigger;
            if strength >= Strength::Approval && !(freeze_holds && strength < Strength::EscalateLater) {
                return Next::Decide {
                    decision: best.decision.clone(),
                    due_at: due_after(s, best),
                    why: if s.frozen {
                        format!(
                            "re-evaluated (automatic rollbacks stay frozen, a person can still approve): {}",
                            best.decision.reason
                        )
                    } else {
                        format!("the hold has ended: {}", best.decision.reason)
                    },
                };
            }
            let due = earliest(
                held_until(best, s.now),
                maturing(s.candidates, Strength::Held, |_| true),
            );
            stay(
                due,
                due.map(|at| format!("held; re-evaluated at {} if still firing", at.format("%H:%M:%SZ"))),
            )
        }
        // Work in flight finishes; after a rollback (verified, dry run), a failed action or a
        // failed verification nothing more happens automatically: a person decides.
        P::Executing | P::Verifying | P::Verified | P::DryRun | P::Failed | P::VerificationFailed | P::Cancelled => {
            let note = match s.phase {
                P::Failed | P::VerificationFailed => Some(
                    "no automatic rollback follows a failed one: a person must act (Approve, /rollback now)".into(),
                ),
                P::Verified => Some("the target was already rolled back for this incident".into()),
                P::DryRun => Some(super::AFTER_DRY_RUN.into()),
                _ => None,
            };
            stay(None, note)
        }
    }
}

/// When an incident that takes `best`'s decision must be looked at again: its request
/// expires, its hold ends, it or a stronger young trigger passes its `for`.
fn due_after(s: &Situation<'_>, best: &Candidate) -> Option<DateTime<Utc>> {
    let strength = Strength::of(&best.decision.outcome);
    [
        request_expiry(&best.decision.outcome),
        held_until(best, s.now),
        recheck_at(&best.decision.outcome),
        maturing(s.candidates, strength, |_| true),
    ]
    .into_iter()
    .flatten()
    .min()
}

/// The next time a candidate's decision changes on its own: it passes its `for`, its automatic
/// time comes, or its hold ends.
fn next_change(c: &Candidate, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    [
        recheck_at(&c.decision.outcome),
        request_expiry(&c.decision.outcome),
        held_until(c, now),
    ]
    .into_iter()
    .flatten()
    .min()
}

fn held_until(c: &Candidate, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    hold_ends(&c.decision.outcome, now)
}

fn promoted_why(s: &Situation<'_>, best: &Candidate) -> String {
    if best.decision.trigger != s.current.trigger && Strength::of(&s.current.outcome) > Strength::Nothing {
        format!(
            "trigger {} is stronger than {}: {}",
            trigger(&best.decision),
            trigger(s.current),
            best.decision.reason
        )
    } else {
        format!("re-evaluated: {}", best.decision.reason)
    }
}

fn after_settled_why(s: &Situation<'_>, c: &Candidate) -> String {
    let earlier = match (s.phase, s.denied) {
        (Phase::Denied, Some(d)) if !d.is_empty() => format!(
            "the deny earlier covered the request of trigger(s) {}",
            d.iter().cloned().collect::<Vec<_>>().join(", ")
        ),
        (Phase::Denied, _) => "a person denied the earlier request".to_string(),
        (p, _) => format!("the earlier request ended as {p}"),
    };
    format!(
        "{earlier}; automatic trigger {} was not part of it and acts now: {}",
        trigger(&c.decision),
        c.decision.reason
    )
}

#[cfg(test)]
mod tests;
