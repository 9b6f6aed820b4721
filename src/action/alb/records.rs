//! The ALB revert's typed step records and outcome, each rendering itself in ALB terms
//! (healthy targets, weights, the ELBv2 call) for the incident's timeline and Slack thread.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{AlbError, AlbTarget, ForwardSnapshot, Resource};
use crate::action::retry::Attempt;
use crate::action::{ActionError, ActionReport};

/// One target's health as seen by the pre-check.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct TargetHealthSeen {
    /// Instance ID, IP address or Lambda ARN.
    pub id: String,
    /// Target port, if any.
    pub port: Option<i32>,
    /// ELB health state (`healthy`, `unhealthy`, `unused`, ...).
    pub state: String,
    /// ELB reason code, if any.
    pub reason: Option<String>,
}

/// A notable step of a revert, for the incident's audit trail (serialize it as JSON).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum AlbStep {
    /// The action list as read before any change (or before a gradual step).
    Read {
        /// What was read.
        snapshot: ForwardSnapshot,
    },
    /// All weight already on stable (and stickiness as wanted): nothing to write.
    AlreadyStable,
    /// Result of the stable group's health pre-check.
    PreCheck {
        /// The stable target group.
        target_group_arn: String,
        /// Targets in state `healthy`.
        healthy: u32,
        /// `min_healthy_targets`.
        required: u32,
        /// Whether the revert may proceed.
        passed: bool,
        /// Count of targets per health state.
        states: BTreeMap<String, u32>,
        /// Up to 20 individual targets.
        targets: Vec<TargetHealthSeen>,
    },
    /// The action list about to be written (or that would be, in a dry run).
    Planned {
        /// Stable share of this step.
        stable_percent: u8,
        /// `ModifyListener` or `ModifyRule`.
        operation: String,
        /// Whether this is only a dry run.
        dry_run: bool,
        /// The planned action list.
        actions: ForwardSnapshot,
    },
    /// A write succeeded.
    Wrote {
        /// `ModifyListener` or `ModifyRule`.
        operation: String,
        /// Stable share written.
        stable_percent: u8,
        /// Attempt that succeeded (1-based).
        attempt: u32,
    },
    /// An AWS call failed (`call` is the operation name); retryable errors are sent again
    /// within the retry window.
    AttemptFailed(Attempt),
    /// Before sending a write again after a failed attempt (which AWS may have applied even
    /// so), the action list was read: `applied` means the earlier attempt took, and the write
    /// is not sent twice.
    ReadBeforeRetry {
        /// `ModifyListener` or `ModifyRule`.
        operation: String,
        /// The attempt about to be made.
        attempt: u32,
        /// The routing read already is what the write would make it.
        applied: bool,
    },
    /// After the last attempt of a write failed without a clear answer, the action list was
    /// read once more: `applied` means that attempt took after all.
    ReadAfterLastAttempt {
        /// `ModifyListener` or `ModifyRule`.
        operation: String,
        /// The routing read is what the write would have made it.
        applied: bool,
    },
    /// State read after a write, and whether it matches what was written.
    ReadBack {
        /// Stable share written.
        stable_percent: u8,
        /// What was read.
        snapshot: ForwardSnapshot,
        /// Whether weights and stickiness match the write.
        matches: bool,
    },
    /// Waiting between two gradual steps.
    Waiting {
        /// Wait in milliseconds.
        interval_ms: u64,
        /// Stable share of the next step.
        next_stable_percent: u8,
    },
    /// A takeover picks up a gradual shift an interrupted earlier attempt had begun: the weights
    /// read show its step `last_stable_percent`, and the next step waits what is left of the
    /// interval since that step was recorded.
    Resumed {
        /// The listener (default actions) or rule.
        resource_arn: String,
        /// Stable share read now.
        stable_percent: u8,
        /// The earlier attempt's step the weights show.
        last_stable_percent: u8,
        /// How long ago that step was recorded, in milliseconds.
        last_step_ago_ms: u64,
        /// The wait left before the next step, in milliseconds (0: the interval has passed).
        wait_ms: u64,
        /// Stable share of the next step.
        next_stable_percent: u8,
    },
    /// `scope: listener`: a forward to canary groups only (a header-based canary rule) gets
    /// the stable group added, so it is reverted like the others with its conditions kept.
    StableAdded {
        /// The rule (or default action).
        resource: Resource,
        /// The canary groups it forwarded to.
        canary_target_groups: Vec<String>,
        /// The stable group added to its forward.
        stable_target_group_arn: String,
    },
    /// `scope: listener`: the forwards found on the listener that send traffic to a canary.
    Scope {
        /// The listener.
        listener_arn: String,
        /// The canary groups (named in the policy, or derived).
        canary_target_groups: Vec<String>,
        /// The action lists to revert, default action first, then rules by priority.
        forwards: Vec<Resource>,
        /// How many other action lists (rules that forward elsewhere, fixed responses,
        /// redirects) are left as they are.
        left_alone: usize,
    },
    /// `scope: listener`: the revert of one forward begins; the steps that follow are its own.
    Forward {
        /// The action list.
        resource: Resource,
        /// 1-based position among the forwards in scope.
        index: usize,
        /// How many forwards are in scope.
        of: usize,
    },
}

/// How a revert ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum AlbOutcome {
    /// Written and confirmed by reading back.
    Reverted {
        /// State before the first write.
        before: ForwardSnapshot,
        /// State read back after the last write.
        after: ForwardSnapshot,
    },
    /// Nothing to do; nothing written.
    AlreadyStable {
        /// State as read.
        state: ForwardSnapshot,
    },
    /// Dry run: nothing written.
    DryRun {
        /// State as read.
        before: ForwardSnapshot,
        /// The final action list a real run would write.
        would_write: ForwardSnapshot,
    },
    /// `scope: listener`: how each forward to the canary ended (none of the others failed).
    Listener {
        /// The listener.
        listener_arn: String,
        /// One outcome per forward in scope, in the order reverted.
        forwards: Vec<AlbOutcome>,
    },
}

impl AlbOutcome {
    /// Whether this revert changed the listener or rule.
    pub fn changed(&self) -> bool {
        match self {
            AlbOutcome::Reverted { .. } => true,
            AlbOutcome::AlreadyStable { .. } | AlbOutcome::DryRun { .. } => false,
            AlbOutcome::Listener { forwards, .. } => forwards.iter().any(AlbOutcome::changed),
        }
    }

    /// The listener (default action or `scope: listener`) or rule this outcome is about.
    pub fn resource_arn(&self) -> &str {
        match self {
            AlbOutcome::Reverted { before: s, .. }
            | AlbOutcome::AlreadyStable { state: s }
            | AlbOutcome::DryRun { before: s, .. } => &s.resource_arn,
            AlbOutcome::Listener { listener_arn, .. } => listener_arn,
        }
    }

    /// One line for people: before and after state, or what a dry run would write.
    pub fn describe(&self, t: &AlbTarget) -> String {
        let stable = t.stable_target_group_arn.as_str();
        match self {
            AlbOutcome::Reverted { before, after } => format!(
                "{}: forward changed from [{}] to [{}], read back OK",
                before.resource_arn,
                forward_of(before),
                forward_of(after)
            ),
            AlbOutcome::AlreadyStable { state } => format!(
                "{}: already forwards everything to the stable group [{}]; nothing written",
                state.resource_arn,
                forward_of(state)
            ),
            AlbOutcome::DryRun { before, would_write } => format!(
                "dry run, nothing written: {} would change from [{}] to [{}] ({}% stable)",
                before.resource_arn,
                forward_of(before),
                forward_of(would_write),
                would_write.stable_percent(stable)
            ),
            AlbOutcome::Listener { listener_arn, forwards } if forwards.is_empty() => {
                format!("listener {listener_arn}: no forward sends traffic to a canary target group; nothing written")
            }
            AlbOutcome::Listener { listener_arn, forwards } => format!(
                "listener {listener_arn}, {} forward(s) to the canary: {}",
                forwards.len(),
                forwards.iter().map(|o| o.describe(t)).collect::<Vec<_>>().join("; ")
            ),
        }
    }

    fn dry_run(&self) -> bool {
        match self {
            AlbOutcome::DryRun { .. } => true,
            AlbOutcome::Listener { forwards, .. } => forwards.iter().any(AlbOutcome::dry_run),
            _ => false,
        }
    }
}

/// The executor's result as the action's report (or error) for the audit trail.
pub fn report(t: &AlbTarget, dry_run: bool, result: Result<AlbOutcome, AlbError>) -> Result<ActionReport, ActionError> {
    match result {
        Ok(outcome) => Ok(ActionReport {
            changed: outcome.changed(),
            // Found stable in a dry run is still a dry run: the incident ends in `dry_run`,
            // not in a verification (and an escalation) of a rollback nobody did.
            dry_run: outcome.dry_run() || (dry_run && !outcome.changed()),
            summary: outcome.describe(t),
            detail: serde_json::to_value(&outcome).unwrap_or_default(),
            // ELBv2 keeps no field ownership, so who else reverted it is unknown here.
            found_reverted_by: None,
        }),
        Err(e) => {
            let detail = serde_json::to_value(&e).unwrap_or_default();
            let message = format!("{} (code {})", e, e.code());
            Err(match e {
                AlbError::PreCheckFailed { .. } => ActionError::PreCheck { message, detail },
                e if e.outcome_unknown() => ActionError::Unconfirmed { message, detail },
                _ => ActionError::Failed { message, detail },
            })
        }
    }
}

fn forward_of(s: &ForwardSnapshot) -> String {
    s.forward
        .as_ref()
        .map_or_else(|| "no forward action".to_string(), ToString::to_string)
}

/// `1s 500ms`, for people.
fn human_ms(ms: u64) -> String {
    humantime_serde::re::humantime::format_duration(std::time::Duration::from_millis(ms)).to_string()
}

fn states_of(states: &BTreeMap<String, u32>) -> String {
    if states.is_empty() {
        return "no targets registered".to_string();
    }
    states
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl AlbStep {
    /// One line in ALB terms: healthy targets, weights, the ELBv2 call.
    pub fn describe(&self) -> String {
        match self {
            AlbStep::Read { snapshot } => format!("read {}: [{}]", snapshot.resource_arn, forward_of(snapshot)),
            AlbStep::AlreadyStable => "already forwards everything to the stable target group: nothing to write".into(),
            AlbStep::PreCheck {
                target_group_arn,
                healthy,
                required,
                passed,
                states,
                ..
            } => format!(
                "pre-check: {healthy} healthy target(s) in stable target group {target_group_arn}, {required} required ({}): {}",
                states_of(states),
                if *passed { "passed" } else { "FAILED, nothing written" }
            ),
            AlbStep::Planned {
                stable_percent,
                operation,
                dry_run,
                actions,
            } => format!(
                "{operation} planned: {stable_percent}% to stable [{}]{}",
                forward_of(actions),
                if *dry_run { " (dry run, not sent)" } else { "" }
            ),
            AlbStep::Wrote {
                operation,
                stable_percent,
                attempt,
            } => format!("{operation} written: {stable_percent}% to stable (attempt {attempt})"),
            AlbStep::AttemptFailed(a) => a.describe(),
            AlbStep::ReadBeforeRetry {
                operation,
                attempt,
                applied,
            } => {
                if *applied {
                    format!("before resending {operation} (attempt {attempt}): read back, the earlier attempt took; not sent again")
                } else {
                    format!("before resending {operation} (attempt {attempt}): read back, not written yet; sending again")
                }
            }
            AlbStep::ReadAfterLastAttempt { operation, applied } => {
                if *applied {
                    format!("after the last attempt of {operation}: read back, it took")
                } else {
                    format!("after the last attempt of {operation}: read back, not written")
                }
            }
            AlbStep::ReadBack {
                stable_percent,
                snapshot,
                matches,
            } => format!(
                "read back: [{}]: {}",
                forward_of(snapshot),
                if *matches {
                    format!("{stable_percent}% to stable as written")
                } else {
                    format!("NOT the {stable_percent}% to stable written")
                }
            ),
            AlbStep::Waiting {
                interval_ms,
                next_stable_percent,
            } => format!(
                "waiting {} before shifting to {next_stable_percent}% stable",
                human_ms(*interval_ms)
            ),
            AlbStep::Resumed {
                resource_arn,
                stable_percent,
                last_stable_percent,
                last_step_ago_ms,
                wait_ms,
                next_stable_percent,
            } => format!(
                "resuming the interrupted gradual shift of {resource_arn} at {stable_percent}% stable (the earlier \
                 attempt's {last_stable_percent}% step, recorded {} ago): {}",
                human_ms(*last_step_ago_ms),
                if *wait_ms == 0 {
                    format!("the interval has passed, shifting to {next_stable_percent}% stable now")
                } else {
                    format!(
                        "waiting the {} left of the interval before shifting to {next_stable_percent}% stable",
                        human_ms(*wait_ms)
                    )
                }
            ),
            AlbStep::StableAdded {
                resource,
                canary_target_groups,
                stable_target_group_arn,
            } => format!(
                "{} forwards only to canary group(s) {}: stable group {stable_target_group_arn} added to its forward \
                 (conditions kept), to take that traffic",
                resource.describe(),
                canary_target_groups.join(", ")
            ),
            AlbStep::Scope {
                listener_arn,
                canary_target_groups,
                forwards,
                left_alone,
            } => format!(
                "listener {listener_arn}: {} forward(s) send traffic to canary group(s) {}: {}; {left_alone} other action list(s) left as they are",
                forwards.len(),
                canary_target_groups.join(", "),
                if forwards.is_empty() {
                    "nothing to revert".to_string()
                } else {
                    forwards.iter().map(Resource::describe).collect::<Vec<_>>().join(", ")
                }
            ),
            AlbStep::Forward { resource, index, of } => {
                format!("forward {index} of {of}: {} ({})", resource.describe(), resource.kind.write_operation())
            }
        }
    }

    /// Worth a line in the incident's Slack thread as it happens (writes, failed calls, waits,
    /// which forwards a listener-wide revert takes on).
    pub fn notable(&self) -> bool {
        match self {
            AlbStep::Wrote { .. }
            | AlbStep::Waiting { .. }
            | AlbStep::Resumed { .. }
            | AlbStep::StableAdded { .. }
            | AlbStep::ReadBeforeRetry { applied: true, .. }
            | AlbStep::ReadAfterLastAttempt { applied: true, .. }
            | AlbStep::Scope { .. }
            | AlbStep::Forward { .. } => true,
            AlbStep::AttemptFailed(a) => a.is_notable(),
            _ => false,
        }
    }

    /// Whether this step changed the listener or rule.
    pub fn applied(&self) -> bool {
        matches!(
            self,
            AlbStep::Wrote { .. }
                | AlbStep::ReadBeforeRetry { applied: true, .. }
                | AlbStep::ReadAfterLastAttempt { applied: true, .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::alb::{AlbError, ResourceKind};
    use aws_sdk_elasticloadbalancingv2::types::{
        Action, ActionTypeEnum, ForwardActionConfig, TargetGroupStickinessConfig, TargetGroupTuple,
    };

    const LISTENER: &str =
        "arn:aws:elasticloadbalancing:us-east-1:123456789012:listener/app/lb/50dc6c495c0c9188/f2f7dc8efc522ab2";
    const STABLE: &str = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/stable/73e2d6bc24d8a067";
    const CANARY: &str = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/canary/2453ed029918f21f";

    fn snapshot(arn: &str, kind: ResourceKind, stable: i32, canary: i32) -> ForwardSnapshot {
        ForwardSnapshot::from_actions(
            arn,
            kind,
            &[Action::builder()
                .r#type(ActionTypeEnum::Forward)
                .forward_config(
                    ForwardActionConfig::builder()
                        .target_groups(
                            TargetGroupTuple::builder()
                                .target_group_arn(STABLE)
                                .weight(stable)
                                .build(),
                        )
                        .target_groups(
                            TargetGroupTuple::builder()
                                .target_group_arn(CANARY)
                                .weight(canary)
                                .build(),
                        )
                        .build(),
                )
                .build()],
        )
    }

    fn listener_target() -> AlbTarget {
        serde_json::from_value(serde_json::json!({
            "listener_arn": LISTENER, "stable_target_group_arn": STABLE, "scope": "listener"
        }))
        .unwrap()
    }

    #[test]
    fn a_listener_wide_revert_reports_each_forward_and_a_partial_one_names_what_failed() {
        let t = listener_target();
        let rule = "arn:aws:elasticloadbalancing:us-east-1:123456789012:listener-rule/app/lb/50dc6c495c0c9188/f2f7dc8efc522ab2/1";
        let outcome = AlbOutcome::Listener {
            listener_arn: LISTENER.into(),
            forwards: vec![
                AlbOutcome::Reverted {
                    before: snapshot(LISTENER, ResourceKind::ListenerDefaultActions, 75, 25),
                    after: snapshot(LISTENER, ResourceKind::ListenerDefaultActions, 100, 0),
                },
                AlbOutcome::AlreadyStable {
                    state: snapshot(rule, ResourceKind::Rule, 100, 0),
                },
            ],
        };
        let r = report(&t, false, Ok(outcome)).expect("a report");
        assert!(r.changed && !r.dry_run);
        assert!(
            r.summary.starts_with(&format!(
                "listener {LISTENER}, 2 forward(s) to the canary: {LISTENER}: forward changed from ["
            )),
            "{}",
            r.summary
        );
        assert!(
            r.summary.contains(&format!("; {rule}: already forwards everything")),
            "{}",
            r.summary
        );

        // Nothing in scope: not changed, said plainly.
        let none = report(
            &t,
            false,
            Ok(AlbOutcome::Listener {
                listener_arn: LISTENER.into(),
                forwards: vec![],
            }),
        )
        .unwrap();
        assert!(!none.changed);
        assert!(
            none.summary
                .contains("no forward sends traffic to a canary target group"),
            "{}",
            none.summary
        );

        let partial = AlbError::Partial {
            done: vec![LISTENER.into()],
            failed: vec![crate::action::alb::FailedForward {
                resource: Resource {
                    arn: rule.into(),
                    kind: ResourceKind::Rule,
                },
                error: Box::new(AlbError::from_code("AccessDenied", "no", Some(403))),
            }],
            dry_run: false,
        };
        // A dry run wrote nothing: its partial says what would have been reverted.
        let AlbError::Partial { done, failed, .. } = partial.clone() else {
            unreachable!()
        };
        let dry = AlbError::Partial {
            done,
            failed,
            dry_run: true,
        };
        let Err(ActionError::Failed { message, .. }) = report(&t, true, Err(dry)) else {
            panic!("a failure, not a pre-check");
        };
        assert_eq!(
            message,
            format!(
                "1 of 2 forward(s) to the canary would NOT be reverted (dry run): rule {rule}: AWS error AccessDenied: no (code AccessDenied); \
                 would be reverted (dry run) or already stable: {LISTENER} (code PartialRevert)"
            )
        );
        let Err(ActionError::Failed { message, detail }) = report(&t, false, Err(partial)) else {
            panic!("a failure, not a pre-check");
        };
        assert_eq!(
            message,
            format!(
                "1 of 2 forward(s) to the canary NOT reverted: rule {rule}: AWS error AccessDenied: no (code AccessDenied); \
                 reverted or already stable: {LISTENER} (code PartialRevert)"
            )
        );
        assert_eq!(detail["error"], "partial");
        assert_eq!(detail["failed"][0]["resource"]["kind"], "rule");
    }

    #[test]
    fn scope_and_forward_steps_speak_of_the_listener_and_are_told_in_slack() {
        let scope = AlbStep::Scope {
            listener_arn: LISTENER.into(),
            canary_target_groups: vec![CANARY.into()],
            forwards: vec![Resource {
                arn: LISTENER.into(),
                kind: ResourceKind::ListenerDefaultActions,
            }],
            left_alone: 2,
        };
        assert_eq!(
            scope.describe(),
            format!(
                "listener {LISTENER}: 1 forward(s) send traffic to canary group(s) {CANARY}: the default action of {LISTENER}; \
                 2 other action list(s) left as they are"
            )
        );
        assert!(scope.notable() && !scope.applied());
        let one = AlbStep::Forward {
            resource: Resource {
                arn: "r".into(),
                kind: ResourceKind::Rule,
            },
            index: 2,
            of: 3,
        };
        assert_eq!(one.describe(), "forward 2 of 3: rule r (ModifyRule)");
    }

    #[test]
    fn a_resumed_shift_says_where_it_picked_up_and_what_it_waits() {
        let step = |wait_ms| AlbStep::Resumed {
            resource_arn: LISTENER.into(),
            stable_percent: 50,
            last_stable_percent: 50,
            last_step_ago_ms: 2_500,
            wait_ms,
            next_stable_percent: 100,
        };
        assert_eq!(
            step(27_500).describe(),
            format!(
                "resuming the interrupted gradual shift of {LISTENER} at 50% stable (the earlier attempt's 50% step, \
                 recorded 2s 500ms ago): waiting the 27s 500ms left of the interval before shifting to 100% stable"
            )
        );
        assert!(step(0)
            .describe()
            .ends_with("the interval has passed, shifting to 100% stable now"));
        assert!(step(0).notable() && !step(0).applied());
        assert_eq!(serde_json::to_value(step(0)).unwrap()["step"], "resumed");
    }

    #[test]
    fn steps_and_outcomes_serialize() {
        let snap = ForwardSnapshot::from_actions(
            LISTENER,
            ResourceKind::ListenerDefaultActions,
            &[Action::builder()
                .r#type(ActionTypeEnum::Forward)
                .forward_config(
                    ForwardActionConfig::builder()
                        .target_groups(TargetGroupTuple::builder().target_group_arn(STABLE).weight(75).build())
                        .target_groups(TargetGroupTuple::builder().target_group_arn(CANARY).weight(25).build())
                        .target_group_stickiness_config(
                            TargetGroupStickinessConfig::builder()
                                .enabled(true)
                                .duration_seconds(300)
                                .build(),
                        )
                        .build(),
                )
                .build()],
        );
        let v = serde_json::to_value(AlbStep::Read { snapshot: snap.clone() }).unwrap();
        assert_eq!(v["step"], "read");
        assert_eq!(v["snapshot"]["actions"][0]["type"], "forward");
        assert_eq!(v["snapshot"]["forward"]["stickiness"]["duration_seconds"], 300);
        let v = serde_json::to_value(AlbOutcome::AlreadyStable { state: snap }).unwrap();
        assert_eq!(v["outcome"], "already_stable");
        let v = serde_json::to_value(AlbError::from_code("Throttling", "slow down", Some(400))).unwrap();
        assert_eq!(v["error"], "aws");
        assert_eq!(v["retryable"], true);
    }
}
