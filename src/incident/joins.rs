//! What an incident's timeline says of an alert that joined it.
//!
//! A join that changed nothing of the incident (a *plain* join: the storm's alerts after the
//! first) is not written as an audit row: the alert's own row records it ([`JoinMark`], with
//! the alert's decision beside it), and reading the timeline puts the entry back in its place
//! ([`crate::store::Store::events`]). Deciding a storm then writes one row per alert instead
//! of two. A join that changed the incident (a re-decision, an action) is an audit row as
//! before. Either way the entry reads the same, from the functions here.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::Phase;
use crate::alert::{Fingerprint, LabelSet};
use crate::notify;
use crate::policy::{self, Decision, Outcome, Suppression};

/// A plain join as the alert's row keeps it (JSON in `alerts.joined`): when (`at`, epoch
/// milliseconds; `seq`, its place among the joins of its transaction), where in the
/// incident's audit trail (after the entry with id `after`, 0 before any), and the incident's
/// phase and due time (`due_at`, epoch milliseconds) then, which the entry's words depend on.
/// These are the facts kept; the words are made from them when the timeline is read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinMark {
    pub at: i64,
    #[serde(default)]
    pub seq: u32,
    pub after: i64,
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_at: Option<i64>,
}

impl JoinMark {
    /// The mark as stored: the JSON its `Serialize` writes, written directly (a storm writes
    /// one per joining alert, and serde's struct path cost several times this). The test
    /// `marks_are_written_as_serde_writes_them` holds the two together.
    pub fn to_json(&self) -> String {
        let mut digits = itoa::Buffer::new();
        let mut out = String::with_capacity(96);
        out.push_str("{\"at\":");
        out.push_str(digits.format(self.at));
        out.push_str(",\"seq\":");
        out.push_str(digits.format(self.seq));
        out.push_str(",\"after\":");
        out.push_str(digits.format(self.after));
        out.push_str(",\"phase\":\"");
        out.push_str(self.phase.as_str());
        out.push('"');
        if let Some(due) = self.due_at {
            out.push_str(",\"due_at\":");
            out.push_str(digits.format(due));
        }
        out.push('}');
        out
    }
}

/// An alert for the timeline and the Slack thread: its labels can mention nobody.
pub fn describe_alert(labels: &LabelSet, fingerprint: &Fingerprint) -> String {
    notify::mrkdwn::defuse_mentions(&format!("{} ({})", policy::describe_labels(labels), fingerprint))
}

/// The timeline entry's summary for an alert that joined an incident in `phase` (due again at
/// `due_at`); `note` is what the join changed, if it did.
pub fn summary(
    labels: &LabelSet,
    fingerprint: &Fingerprint,
    d: &Decision,
    phase: Phase,
    due_at: Option<DateTime<Utc>>,
    note: Option<&str>,
) -> String {
    format!(
        "{} joined the incident ({})",
        describe_alert(labels, fingerprint),
        join_note(d, phase, due_at, note)
    )
}

/// What a joining alert means for the incident, in words that promise only what will happen:
/// its own decision's promise ("re-evaluated at", "roll back automatically") is repeated only
/// when the incident acts on it.
fn join_note(d: &Decision, phase: Phase, due_at: Option<DateTime<Utc>>, note: Option<&str>) -> String {
    let t = d.trigger.as_deref().unwrap_or("-");
    let what = match &d.outcome {
        Outcome::Suppressed(Suppression::TooYoung {
            firing_for_secs,
            required_secs,
            ..
        }) => format!("trigger {t}: firing for {firing_for_secs}s of the {required_secs}s it needs"),
        Outcome::Auto => format!("trigger {t} qualifies for an automatic rollback"),
        Outcome::NeedsApproval { .. } | Outcome::EscalateLater { .. } => format!("trigger {t} asks for approval"),
        Outcome::Suppressed(Suppression::DryRun { .. }) => format!("trigger {t}, dry run"),
        Outcome::Suppressed(_) => format!("trigger {t}: {}", d.reason),
        Outcome::NoMatch | Outcome::Undecidable { .. } => d.reason.clone(),
    };
    let then = match (phase, note) {
        (_, Some(n)) => n.to_string(),
        (Phase::Executing | Phase::Verifying, _) => "the rollback in progress covers it".into(),
        (Phase::Verified, _) => "the target was already rolled back for this incident".into(),
        (Phase::DryRun, _) => super::AFTER_DRY_RUN.into(),
        (Phase::Failed | Phase::VerificationFailed, _) => {
            "no automatic rollback follows a failed one: a person must act (Approve, /rollback now)".into()
        }
        (p, _) => match due_at {
            Some(at) => format!("incident {p}, looked at again at {}", at.format("%H:%M:%SZ")),
            None => format!("incident {p}"),
        },
    };
    format!("{what}; {then}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_written_as_serde_writes_them() {
        for phase in Phase::ALL {
            for (at, seq, after, due_at) in [
                (0, 0, 0, None),
                (1_796_327_275_644, 7, 123, Some(-1)),
                (i64::MIN, u32::MAX, i64::MAX, Some(i64::MAX)),
            ] {
                let mark = JoinMark {
                    at,
                    seq,
                    after,
                    phase,
                    due_at,
                };
                assert_eq!(mark.to_json(), serde_json::to_string(&mark).unwrap());
                assert_eq!(serde_json::from_str::<JoinMark>(&mark.to_json()).unwrap(), mark);
            }
        }
    }
}
