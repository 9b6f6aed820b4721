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
//! read-back during the bake. This file holds the revert itself, step by step.

use std::time::Duration;

use crate::action::retry::BeforeWrite;

pub mod error;
pub mod executor;
pub mod plan;
mod readback;
pub mod records;
pub mod settings;

pub use crate::policy::target::alb::{AlbTarget, GradualShift, Scope, Stickiness};
pub use error::{is_retryable_code, AlbError, FailedForward};
pub use executor::AlbExecutor;
pub use plan::{
    canary_groups, in_scope, plan_revert, resource_kind, ActionSnapshot, ForwardSnapshot, ForwardState, Resource,
    ResourceKind, StickinessSnapshot, WeightedGroup, MAX_WEIGHT,
};
pub use records::{report, AlbOutcome, AlbStep, TargetHealthSeen};
pub use settings::AwsSettings;

use plan::needs_write;

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
        t.validate().map_err(|message| AlbError::InvalidTarget { message })?;
        match t.scope {
            Scope::One => {
                self.revert_one(t, &Resource::of(t), dry_run, on_step, before_write)
                    .await
            }
            Scope::Listener => self.revert_listener(t, dry_run, on_step, before_write).await,
        }
    }

    /// `scope: listener`: finds the forwards that send traffic to a canary group (the default
    /// action, then each rule by priority), and reverts each in turn with its own read,
    /// pre-check, write and read-back. A failure on one forward does not stop the others (a
    /// rollback takes as much traffic off the canary as it can), except a failed pre-check
    /// before anything was written: the stable group is the same for all, so nothing is
    /// written anywhere. Gradual steps run per forward, one forward after the other.
    async fn revert_listener(
        &self,
        t: &AlbTarget,
        dry_run: bool,
        on_step: &mut (dyn FnMut(AlbStep) + Send),
        before_write: BeforeWrite<'_>,
    ) -> Result<AlbOutcome, AlbError> {
        let lists = self.listener_lists(&t.listener_arn, on_step).await?;
        let forwards = plan::in_scope(t, &lists)?;
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
            match self.revert_one(t, r, dry_run, on_step, before_write).await {
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
    ) -> Result<AlbOutcome, AlbError> {
        let kind = r.kind;
        let resource = r.arn.as_str();
        let stable = t.stable_target_group_arn.as_str();

        let mut current = self.read_actions(r, on_step).await?;
        let before = ForwardSnapshot::from_actions(resource, kind, &current);
        on_step(AlbStep::Read {
            snapshot: before.clone(),
        });
        if !needs_write(&before, t) {
            on_step(AlbStep::AlreadyStable);
            return Ok(AlbOutcome::AlreadyStable { state: before });
        }
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

        let mut after = before.clone();
        for (i, &p) in steps.iter().enumerate() {
            if i > 0 {
                on_step(AlbStep::Waiting {
                    interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
                    next_stable_percent: p,
                });
                tokio::time::sleep(interval).await;
                // Re-read so changes made by someone else during the wait are not overwritten.
                current = self.read_actions(r, on_step).await?;
                let snap = ForwardSnapshot::from_actions(resource, kind, &current);
                on_step(AlbStep::Read { snapshot: snap.clone() });
                if !needs_write(&snap, t) {
                    after = snap;
                    break;
                }
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
            let attempt = self.write(r, &plan, &expected, on_step).await?;
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
