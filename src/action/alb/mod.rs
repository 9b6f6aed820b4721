//! Reverting an AWS Application Load Balancer's weighted forward to the stable target group.
//!
//! This step runs after the responder has decided (from alerts and policies) to roll back a
//! target of kind ALB. It reads the listener's default actions (ModifyListener) or one
//! listener rule's actions (ModifyRule), checks that the stable target group has enough healthy
//! targets, writes the same action list back with all weight on the stable group (optionally in
//! gradual steps), and reads it back to prove the change took. What follows is the caller's
//! business: verification that the alert clears, and notifications. Every notable step is
//! reported through a callback so the caller can keep an audit trail of the incident.
//!
//! Layout: the target schema is `policy::target::alb` (re-exported here); [`plan`] is the pure
//! planning, [`executor`] the ELBv2 calls, [`records`] the step records rendered for people,
//! [`error`] the error classification, [`settings`] the `aws:` config section, [`readback`] the
//! read-back during the bake, [`resume`] where a takeover picks up a gradual shift, and
//! `listener` the view of a `scope: listener` revert (canaries, their partners, rules that
//! forward to a canary only). This file holds the revert itself, step by step.

use std::time::Duration;

use aws_sdk_elasticloadbalancingv2::types as elbv2_types;

use crate::action::retry::BeforeWrite;

pub mod error;
pub mod executor;
mod listener;
pub mod plan;
mod readback;
pub mod records;
pub mod resume;
pub mod settings;

pub use crate::policy::target::alb::{AlbTarget, GradualShift, Scope, Stickiness};
pub use error::{is_retryable_code, AlbError, FailedForward};
pub use executor::AlbExecutor;
pub use plan::{
    canary_groups, in_scope, plan_revert, resource_kind, ActionSnapshot, ForwardSnapshot, ForwardState, Resource,
    ResourceKind, StickinessSnapshot, WeightedGroup, MAX_WEIGHT,
};
pub use records::{report, AlbOutcome, AlbStep, TargetHealthSeen};
pub use resume::{RecordedStep, Resume};
pub use settings::AwsSettings;

use listener::ListenerView;
use plan::needs_write;

/// What the revert of one action list knows besides the target: the listener around it
/// (`scope: listener`) and what an interrupted earlier attempt recorded.
struct Context<'a> {
    view: Option<&'a ListenerView>,
    resume: &'a Resume,
}

impl AlbExecutor {
    /// The whole revert: read, pre-check stable health (DescribeTargetHealth: at least
    /// min_healthy_targets in state "healthy", else AlbError::PreCheckFailed with the states
    /// seen), plan, write (or not, dry_run), read back and compare (AlbError::WeightsDidNotTake
    /// if not), gradual steps with the interval if configured. `on_step` is called for every
    /// notable step so the caller can record it in the incident's audit trail.
    pub async fn revert(
        &self,
        t: &AlbTarget,
        dry_run: bool,
        on_step: &mut (dyn FnMut(AlbStep) + Send),
    ) -> Result<AlbOutcome, AlbError> {
        self.revert_gated(t, dry_run, on_step, &super::retry::no_gate).await
    }

    /// [`AlbExecutor::revert`], awaiting `before_write` after each write is planned (and
    /// reported) and before it is sent.
    pub async fn revert_gated(
        &self,
        t: &AlbTarget,
        dry_run: bool,
        on_step: &mut (dyn FnMut(AlbStep) + Send),
        before_write: BeforeWrite<'_>,
    ) -> Result<AlbOutcome, AlbError> {
        self.revert_resuming(t, dry_run, on_step, before_write, &Resume::default())
            .await
    }

    /// [`AlbExecutor::revert_gated`] for a takeover: a gradual shift that an interrupted
    /// earlier attempt had begun (its steps in `resume`) goes on from the weights read, and
    /// the wait before the next step counts from the last step it recorded (a
    /// [`AlbStep::Resumed`] says where it picked up).
    pub async fn revert_resuming(
        &self,
        t: &AlbTarget,
        dry_run: bool,
        on_step: &mut (dyn FnMut(AlbStep) + Send),
        before_write: BeforeWrite<'_>,
        resume: &Resume,
    ) -> Result<AlbOutcome, AlbError> {
        t.validate().map_err(|message| AlbError::InvalidTarget { message })?;
        match t.scope {
            Scope::One => {
                let cx = Context { view: None, resume };
                self.revert_one(t, &Resource::of(t), dry_run, on_step, before_write, &cx)
                    .await
            }
            Scope::Listener => self.revert_listener(t, dry_run, on_step, before_write, resume).await,
        }
    }

    /// `scope: listener`: finds the forwards that send traffic to a canary group (the default
    /// action, then each rule by priority), and reverts each in turn with its own read,
    /// pre-check, write and read-back. A failure on one forward does not stop the others (a
    /// rollback takes as much traffic off the canary as it can), except a failed pre-check
    /// before anything was written: the stable group is the same for all, so nothing is
    /// written anywhere. Gradual steps run per forward, one forward after the other. A rule
    /// that forwards to canary groups only gets the stable group added to its forward.
    async fn revert_listener(
        &self,
        t: &AlbTarget,
        dry_run: bool,
        on_step: &mut (dyn FnMut(AlbStep) + Send),
        before_write: BeforeWrite<'_>,
        resume: &Resume,
    ) -> Result<AlbOutcome, AlbError> {
        let lists = self.listener_lists(&t.listener_arn, on_step).await?;
        let forwards = plan::in_scope(t, &lists)?;
        let view = ListenerView::of(t, &lists);
        let cx = Context {
            view: Some(&view),
            resume,
        };
        on_step(AlbStep::Scope {
            listener_arn: t.listener_arn.clone(),
            canary_target_groups: plan::canary_groups(t, &lists).into_iter().collect(),
            forwards: forwards.clone(),
            left_alone: lists.len() - forwards.len(),
        });
        let mut outcomes = Vec::new();
        let mut failed = Vec::new();
        for (i, r) in forwards.iter().enumerate() {
            on_step(AlbStep::Forward {
                resource: r.clone(),
                index: i + 1,
                of: forwards.len(),
            });
            match self.revert_one(t, r, dry_run, on_step, before_write, &cx).await {
                Ok(o) => outcomes.push(o),
                Err(e @ AlbError::PreCheckFailed { .. })
                    if failed.is_empty() && !outcomes.iter().any(AlbOutcome::changed) =>
                {
                    return Err(e)
                }
                Err(e) => failed.push(FailedForward {
                    resource: r.clone(),
                    error: Box::new(e),
                }),
            }
        }
        if failed.is_empty() {
            return Ok(AlbOutcome::Listener {
                listener_arn: t.listener_arn.clone(),
                forwards: outcomes,
            });
        }
        Err(AlbError::Partial {
            done: outcomes.iter().map(|o| o.resource_arn().to_string()).collect(),
            failed,
            dry_run,
        })
    }

    /// One action list: read, pre-check, plan, write and read back, in gradual steps if set.
    async fn revert_one(
        &self,
        t: &AlbTarget,
        r: &Resource,
        dry_run: bool,
        on_step: &mut (dyn FnMut(AlbStep) + Send),
        before_write: BeforeWrite<'_>,
        cx: &Context<'_>,
    ) -> Result<AlbOutcome, AlbError> {
        let kind = r.kind;
        let resource = r.arn.as_str();
        let stable = t.stable_target_group_arn.as_str();

        let read = self.read_actions(r, on_step).await?;
        let before = ForwardSnapshot::from_actions(resource, kind, &read);
        on_step(AlbStep::Read {
            snapshot: before.clone(),
        });
        if !needs_write(&before, t) {
            on_step(AlbStep::AlreadyStable);
            return Ok(AlbOutcome::AlreadyStable { state: before });
        }
        let mut current = with_stable(t, r, read, cx, on_step)?;
        // Plan the final state first: a forward without the stable group fails here, before
        // any further AWS call.
        let final_plan = plan_revert(&current, t, 100)?;
        self.precheck(t, on_step).await?;

        let start = before.stable_percent(stable);
        let steps: Vec<u8> = match &t.gradual {
            // Never move traffic back towards the canary: skip steps already exceeded.
            Some(g) => g.steps.iter().copied().filter(|&p| p == 100 || p > start).collect(),
            None => vec![100],
        };
        let interval = t.gradual.as_ref().map_or(Duration::ZERO, |g| g.interval);

        if dry_run {
            for &p in &steps {
                let plan = plan_revert(&current, t, p)?;
                on_step(AlbStep::Planned {
                    stable_percent: p,
                    operation: kind.write_operation().to_string(),
                    dry_run: true,
                    actions: ForwardSnapshot::from_actions(resource, kind, &plan),
                });
            }
            return Ok(AlbOutcome::DryRun {
                before,
                would_write: ForwardSnapshot::from_actions(resource, kind, &final_plan),
            });
        }

        // A takeover mid-shift: the first remaining step waits what is left of the interval
        // since the earlier attempt's last step, as the steps after it wait the interval.
        let resumed = cx.resume.point(r, start, interval);
        let mut after = before.clone();
        let mut wrote_any = false;
        for (i, &p) in steps.iter().enumerate() {
            let wait = if i > 0 {
                on_step(AlbStep::Waiting {
                    interval_ms: crate::action::retry::millis(interval),
                    next_stable_percent: p,
                });
                interval
            } else if let Some(point) = &resumed {
                on_step(AlbStep::Resumed {
                    resource_arn: resource.to_string(),
                    stable_percent: start,
                    last_stable_percent: point.last.stable_percent,
                    last_step_ago_ms: crate::action::retry::millis(point.last.ago),
                    wait_ms: crate::action::retry::millis(point.wait),
                    next_stable_percent: p,
                });
                point.wait
            } else {
                Duration::ZERO
            };
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
                // Re-read so changes made by someone else during the wait are not overwritten.
                let read = self.read_actions(r, on_step).await?;
                let snap = ForwardSnapshot::from_actions(resource, kind, &read);
                on_step(AlbStep::Read { snapshot: snap.clone() });
                if !needs_write(&snap, t) {
                    if !wrote_any {
                        // Somebody else finished it while a takeover waited: not our write.
                        on_step(AlbStep::AlreadyStable);
                        return Ok(AlbOutcome::AlreadyStable { state: snap });
                    }
                    after = snap;
                    break;
                }
                current = with_stable(t, r, read, cx, on_step)?;
                if p < 100 && snap.stable_percent(stable) >= p {
                    after = snap;
                    continue;
                }
            }
            let plan = plan_revert(&current, t, p)?;
            let expected = ForwardSnapshot::from_actions(resource, kind, &plan);
            on_step(AlbStep::Planned {
                stable_percent: p,
                operation: kind.write_operation().to_string(),
                dry_run: false,
                actions: expected.clone(),
            });
            before_write().await;
            let attempt = self.write(r, &plan, &expected, on_step, before_write).await?;
            wrote_any = true;
            on_step(AlbStep::Wrote {
                operation: kind.write_operation().to_string(),
                stable_percent: p,
                attempt,
            });
            let (actions, snap) = self.read_back(r, &expected, p, on_step).await?;
            current = actions;
            after = snap;
        }
        Ok(AlbOutcome::Reverted { before, after })
    }
}

/// `scope: listener`: the action list to plan from, with the stable group added to a forward
/// that sends traffic to canaries only (reported as [`AlbStep::StableAdded`]).
fn with_stable(
    t: &AlbTarget,
    r: &Resource,
    read: Vec<elbv2_types::Action>,
    cx: &Context<'_>,
    on_step: &mut (dyn FnMut(AlbStep) + Send),
) -> Result<Vec<elbv2_types::Action>, AlbError> {
    let Some(view) = cx.view else {
        return Ok(read);
    };
    match view.add_stable(t, r, &read)? {
        Some(added) => {
            on_step(AlbStep::StableAdded {
                resource: r.clone(),
                canary_target_groups: added.canaries,
                stable_target_group_arn: t.stable_target_group_arn.clone(),
            });
            Ok(added.actions)
        }
        None => Ok(read),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_elasticloadbalancingv2 as elbv2;

    fn target() -> AlbTarget {
        serde_json::from_value(serde_json::json!({
            "listener_arn": "arn:aws:elasticloadbalancing:us-east-1:123456789012:listener/app/lb/50dc6c495c0c9188/f2f7dc8efc522ab2",
            "stable_target_group_arn": "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/stable/73e2d6bc24d8a067",
        }))
        .unwrap()
    }

    #[test]
    fn revert_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let client = elbv2::Client::from_conf(
            elbv2::Config::builder()
                .behavior_version(elbv2::config::BehaviorVersion::latest())
                .region(elbv2::config::Region::new("us-east-1"))
                .build(),
        );
        let exec = AlbExecutor::new(client, &AwsSettings::default());
        let t = target();
        let mut sink = |_: AlbStep| {};
        let fut = exec.revert(&t, true, &mut sink);
        assert_send(&fut);
    }
}
