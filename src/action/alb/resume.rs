//! Resuming a gradual shift after a takeover. A replica that takes over an incident whose
//! earlier attempt died mid-shift reads the listener (the weights there are what counts) and
//! does the remaining steps; this holds what the earlier attempt recorded (each step's plan and
//! write, with how long ago) so the wait before the next step counts from the last step
//! written, not from the takeover: the shift takes its configured time, neither skipping the
//! wait nor doubling it. Pure: the executor reads and sleeps.

use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use super::Resource;
use crate::action::EarlierStep;

/// One gradual step an earlier attempt recorded for an action list.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedStep {
    /// The listener (default actions) or rule ARN the step was planned for.
    pub resource_arn: String,
    /// Stable share of the step.
    pub stable_percent: u8,
    /// How long before [`Resume`] was made the step was recorded (its write if that was
    /// recorded, else its plan, which is committed right before the write is sent).
    pub ago: Duration,
}

/// The steps an interrupted earlier attempt recorded; empty for a first attempt.
#[derive(Debug, Clone)]
pub struct Resume {
    taken: Instant,
    steps: Vec<RecordedStep>,
}

impl Default for Resume {
    fn default() -> Self {
        Resume {
            taken: Instant::now(),
            steps: Vec::new(),
        }
    }
}

/// Where a takeover picks a shift up: the earlier step the listener shows, and the wait left
/// before the next one.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ResumePoint {
    /// The earlier attempt's step the weights read correspond to.
    pub last: RecordedStep,
    /// What is left of the interval since that step (zero when it has passed).
    pub wait: Duration,
}

impl Resume {
    /// From the audit records of earlier attempts (`EarlierStep`: the record as JSON, how long
    /// ago). Only real plans count (a dry run wrote nothing); a `wrote` record moves its
    /// plan's time to when the write answered, as the first attempt's own wait did.
    pub fn from_earlier(earlier: &[EarlierStep]) -> Resume {
        let mut steps: Vec<RecordedStep> = Vec::new();
        for e in earlier {
            let d = &e.detail;
            let percent = d["stable_percent"].as_u64().and_then(|p| u8::try_from(p).ok());
            match (d["step"].as_str(), percent) {
                (Some("planned"), Some(p)) if d["dry_run"] == Value::Bool(false) => {
                    if let Some(arn) = d["actions"]["resource_arn"].as_str() {
                        steps.push(RecordedStep {
                            resource_arn: arn.to_string(),
                            stable_percent: p,
                            ago: e.ago,
                        });
                    }
                }
                (Some("wrote"), Some(p)) => {
                    if let Some(last) = steps.last_mut().filter(|s| s.stable_percent == p) {
                        last.ago = last.ago.min(e.ago);
                    }
                }
                _ => {}
            }
        }
        Resume {
            taken: Instant::now(),
            steps,
        }
    }

    /// Whether an earlier attempt recorded any step to resume from.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// For action list `r` read at `start` % stable: the latest earlier step at or below
    /// `start` (the one the weights show taken; a plan above it never reached AWS), and what
    /// is left of `interval` since. `None` when no earlier step of ours shows there.
    pub(super) fn point(&self, r: &Resource, start: u8, interval: Duration) -> Option<ResumePoint> {
        let last = self
            .steps
            .iter()
            .filter(|s| s.resource_arn == r.arn && s.stable_percent <= start)
            .min_by_key(|s| s.ago)?
            .clone();
        let since = last.ago.saturating_add(self.taken.elapsed());
        Some(ResumePoint {
            wait: interval.saturating_sub(since),
            last,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::alb::ResourceKind;
    use serde_json::json;

    fn rule(arn: &str) -> Resource {
        Resource {
            arn: arn.into(),
            kind: ResourceKind::Rule,
        }
    }

    fn planned(arn: &str, p: u8, dry_run: bool, ago_ms: u64) -> EarlierStep {
        EarlierStep {
            ago: Duration::from_millis(ago_ms),
            detail: json!({"step": "planned", "stable_percent": p, "dry_run": dry_run,
                           "operation": "ModifyRule", "actions": {"resource_arn": arn}}),
        }
    }

    fn wrote(p: u8, ago_ms: u64) -> EarlierStep {
        EarlierStep {
            ago: Duration::from_millis(ago_ms),
            detail: json!({"step": "wrote", "stable_percent": p, "operation": "ModifyRule", "attempt": 1}),
        }
    }

    #[test]
    fn the_wait_counts_from_the_last_step_the_listener_shows() {
        let interval = Duration::from_secs(60);
        let r = Resume::from_earlier(&[
            planned("r1", 10, false, 50_000),
            wrote(10, 49_000),
            planned("r1", 50, false, 9_000),
            wrote(50, 8_000),
            // Planned but never sent (the replica died right after recording it).
            planned("r1", 100, false, 1_000),
        ]);
        // The rule shows 50 %: counted from the 50 % write, 8 s ago.
        let p = r.point(&rule("r1"), 50, interval).expect("a resume point");
        assert_eq!(p.last.stable_percent, 50);
        assert_eq!(p.last.ago, Duration::from_millis(8_000));
        assert!(
            p.wait <= Duration::from_secs(52) && p.wait > Duration::from_secs(51),
            "{p:?}"
        );
        // The 50 % write did not reach AWS: the rule shows 10 %, counted from that write.
        let p = r.point(&rule("r1"), 10, interval).expect("a resume point");
        assert_eq!(p.last.stable_percent, 10);
        assert!(p.wait <= Duration::from_secs(11), "{p:?}");
        // Long past: no wait left.
        assert_eq!(
            r.point(&rule("r1"), 50, Duration::from_secs(5)).unwrap().wait,
            Duration::ZERO
        );
        // Nothing of ours shows (still at the start), or another list: a fresh start.
        assert_eq!(r.point(&rule("r1"), 5, interval), None);
        assert_eq!(r.point(&rule("r2"), 50, interval), None);
    }

    #[test]
    fn dry_run_plans_and_unrelated_records_do_not_count() {
        let r = Resume::from_earlier(&[
            planned("r1", 50, true, 1_000),
            EarlierStep {
                ago: Duration::ZERO,
                detail: json!({"step": "read", "snapshot": {}}),
            },
            wrote(50, 500),
            EarlierStep {
                ago: Duration::ZERO,
                detail: json!("not an object"),
            },
        ]);
        assert!(r.is_empty());
        assert!(Resume::default().is_empty());
    }
}
