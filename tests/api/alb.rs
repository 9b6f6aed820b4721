//! The ALB revert against moto (real ELBv2 wire protocol) and, for failure modes moto cannot
//! produce, against a scripted fake endpoint. Every test starts its own moto or fake.

use std::time::{Duration, Instant};

use crate::support::alb_fixture::{
    elb_client, fast_settings, forward, stickiness, weights, AlbFixture, LISTENER_WEIGHTS, RULE_WEIGHTS,
};
use crate::support::fake_elb::{self, FakeElb};
use rollback_responder::action::alb::{
    AlbError, AlbExecutor, AlbOutcome, AlbStep, AlbTarget, GradualShift, Scope, Stickiness,
};

const FAKE_LISTENER: &str =
    "arn:aws:elasticloadbalancing:us-east-1:123456789012:listener/app/fake/1111111111111111/2222222222222222";
const FAKE_STABLE: &str = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/stable/3333333333333333";
const FAKE_CANARY: &str = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/canary/4444444444444444";

async fn revert(exec: &AlbExecutor, t: &AlbTarget, dry_run: bool) -> (Result<AlbOutcome, AlbError>, Vec<AlbStep>) {
    let mut steps = Vec::new();
    let mut record = |s: AlbStep| steps.push(s);
    let result = exec.revert(t, dry_run, &mut record).await;
    (result, steps)
}

fn count(steps: &[AlbStep], pred: impl Fn(&AlbStep) -> bool) -> usize {
    steps.iter().filter(|s| pred(s)).count()
}

fn wrote(steps: &[AlbStep]) -> usize {
    count(steps, |s| matches!(s, AlbStep::Wrote { .. }))
}

fn w(fx: &AlbFixture, stable: i32, canary: i32) -> Vec<(String, i32)> {
    vec![(fx.stable_tg.clone(), stable), (fx.canary_tg.clone(), canary)]
}

#[tokio::test]
async fn listener_is_reverted_and_stickiness_kept() {
    let fx = AlbFixture::start().await;
    let t = fx.listener_target();
    assert_eq!(
        weights(&fx.listener_actions().await),
        w(&fx, LISTENER_WEIGHTS.0, LISTENER_WEIGHTS.1)
    );

    let (result, steps) = revert(&fx.executor(), &t, false).await;
    let outcome = result.expect("revert");
    let AlbOutcome::Reverted { before, after } = &outcome else {
        panic!("expected Reverted, got {outcome:?}");
    };
    assert!(!before.is_fully_stable(&fx.stable_tg));
    assert!(after.is_fully_stable(&fx.stable_tg));

    // Independent read through the SDK: 100/0, canary still listed, stickiness survived.
    let actions = fx.listener_actions().await;
    assert_eq!(weights(&actions), w(&fx, 100, 0));
    assert_eq!(stickiness(&actions), (true, Some(300)));
    assert_eq!(fx.executor().read(&t).await.expect("read"), *after);

    assert!(matches!(steps[0], AlbStep::Read { .. }));
    assert!(steps.iter().any(|s| matches!(
        s,
        AlbStep::PreCheck {
            passed: true,
            healthy: 2,
            required: 1,
            ..
        }
    )));
    assert_eq!(wrote(&steps), 1);
    assert!(matches!(
        steps.last(),
        Some(AlbStep::ReadBack {
            matches: true,
            stable_percent: 100,
            ..
        })
    ));
    // The audit trail and outcome serialize.
    let json = serde_json::to_value(&steps).expect("steps to JSON");
    assert_eq!(json[0]["step"], "read");
    assert_eq!(serde_json::to_value(&outcome).unwrap()["outcome"], "reverted");
}

#[tokio::test]
async fn rule_is_reverted_and_the_listener_left_alone() {
    let fx = AlbFixture::start().await;
    let before_rule = fx.rule(&fx.rule_arn).await;
    let (result, steps) = revert(&fx.executor(), &fx.rule_target(), false).await;
    assert!(matches!(result, Ok(AlbOutcome::Reverted { .. })), "{result:?}");
    assert_eq!(wrote(&steps), 1);
    assert!(steps
        .iter()
        .any(|s| matches!(s, AlbStep::Wrote { operation, .. } if operation == "ModifyRule")));

    let rule = fx.rule(&fx.rule_arn).await;
    assert_eq!(weights(rule.actions()), w(&fx, 100, 0));
    assert_eq!(stickiness(rule.actions()), (true, Some(120)));
    assert_eq!(rule.conditions(), before_rule.conditions());
    assert_eq!(rule.priority(), before_rule.priority());
    assert_eq!(
        weights(&fx.listener_actions().await),
        w(&fx, LISTENER_WEIGHTS.0, LISTENER_WEIGHTS.1)
    );
}

#[tokio::test]
async fn stickiness_is_disabled_when_asked() {
    let fx = AlbFixture::start().await;
    let t = AlbTarget {
        stickiness: Stickiness::Disable,
        ..fx.listener_target()
    };
    let (result, _) = revert(&fx.executor(), &t, false).await;
    assert!(matches!(result, Ok(AlbOutcome::Reverted { .. })), "{result:?}");
    let actions = fx.listener_actions().await;
    assert_eq!(weights(&actions), w(&fx, 100, 0));
    assert!(!stickiness(&actions).0);

    // Already 100/0 but sticky: Disable still has something to write.
    fx.elb
        .modify_listener()
        .listener_arn(&fx.listener_arn)
        .default_actions(forward(&[(&fx.stable_tg, 100), (&fx.canary_tg, 0)], Some(300)))
        .send()
        .await
        .expect("ModifyListener");
    let (result, steps) = revert(&fx.executor(), &t, false).await;
    assert!(matches!(result, Ok(AlbOutcome::Reverted { .. })), "{result:?}");
    assert_eq!(wrote(&steps), 1);
    assert!(!stickiness(&fx.listener_actions().await).0);
}

#[tokio::test]
async fn already_stable_is_a_no_op() {
    let fx = AlbFixture::start().await;
    let t = fx.listener_target();
    let exec = fx.executor();
    revert(&exec, &t, false).await.0.expect("first revert");
    let first = fx.listener_actions().await;

    let (result, steps) = revert(&exec, &t, false).await;
    let state = match result {
        Ok(AlbOutcome::AlreadyStable { state }) => state,
        other => panic!("expected AlreadyStable, got {other:?}"),
    };
    assert!(state.is_fully_stable(&fx.stable_tg));
    assert_eq!(wrote(&steps), 0);
    assert_eq!(count(&steps, |s| matches!(s, AlbStep::Planned { .. })), 0);
    assert!(steps.iter().any(|s| matches!(s, AlbStep::AlreadyStable)));
    assert_eq!(fx.listener_actions().await, first);
}

#[tokio::test]
async fn dry_run_writes_nothing() {
    let fx = AlbFixture::start().await;
    let t = fx.listener_target();
    let original = fx.listener_actions().await;
    let (result, steps) = revert(&fx.executor(), &t, true).await;
    let (before, would_write) = match result {
        Ok(AlbOutcome::DryRun { before, would_write }) => (before, would_write),
        other => panic!("expected DryRun, got {other:?}"),
    };
    assert!(!before.is_fully_stable(&fx.stable_tg));
    assert!(would_write.is_fully_stable(&fx.stable_tg));
    let fwd = would_write.forward.as_ref().expect("forward");
    assert_eq!(fwd.target_groups.len(), 2);
    assert_eq!(fwd.target_groups[1].weight, Some(0));
    assert_eq!(wrote(&steps), 0);
    assert!(steps
        .iter()
        .any(|s| matches!(s, AlbStep::Planned { dry_run: true, .. })));
    assert_eq!(fx.listener_actions().await, original);
}

#[tokio::test]
async fn precheck_fails_for_stopped_targets_and_writes_nothing() {
    let fx = AlbFixture::start().await;
    fx.stop_instances(&fx.stable_instances).await;
    let original = fx.listener_actions().await;
    let (result, steps) = revert(&fx.executor(), &fx.listener_target(), false).await;
    match result {
        Err(AlbError::PreCheckFailed {
            healthy,
            required,
            states,
            targets,
            ..
        }) => {
            assert_eq!(healthy, 0);
            assert_eq!(required, 1);
            assert_eq!(states.get("unused"), Some(&2), "{states:?}");
            assert_eq!(targets.len(), 2);
            assert_eq!(targets[0].reason.as_deref(), Some("Target.InvalidState"));
        }
        other => panic!("expected PreCheckFailed, got {other:?}"),
    }
    assert!(steps
        .iter()
        .any(|s| matches!(s, AlbStep::PreCheck { passed: false, .. })));
    assert_eq!(wrote(&steps), 0);
    assert_eq!(fx.listener_actions().await, original);
}

#[tokio::test]
async fn precheck_fails_for_an_empty_group_or_too_few_targets() {
    let fx = AlbFixture::start().await;
    let empty = fx.empty_target_group("empty").await;
    fx.elb
        .modify_listener()
        .listener_arn(&fx.listener_arn)
        .default_actions(forward(&[(&empty, 50), (&fx.canary_tg, 50)], None))
        .send()
        .await
        .expect("ModifyListener");
    let original = fx.listener_actions().await;
    let t = AlbTarget {
        stable_target_group_arn: empty.clone(),
        ..fx.listener_target()
    };
    let (result, steps) = revert(&fx.executor(), &t, false).await;
    match result {
        Err(e @ AlbError::PreCheckFailed { healthy: 0, .. }) => {
            assert_eq!(e.code(), "PreCheckFailed")
        }
        other => panic!("expected PreCheckFailed, got {other:?}"),
    }
    assert_eq!(wrote(&steps), 0);
    assert_eq!(fx.listener_actions().await, original);

    // The rule's stable group has 2 healthy targets; asking for 3 fails.
    let t = AlbTarget {
        min_healthy_targets: 3,
        ..fx.rule_target()
    };
    let (result, _) = revert(&fx.executor(), &t, false).await;
    assert!(
        matches!(
            result,
            Err(AlbError::PreCheckFailed {
                healthy: 2,
                required: 3,
                ..
            })
        ),
        "{result:?}"
    );
    assert_eq!(
        weights(&fx.rule_actions().await),
        w(&fx, RULE_WEIGHTS.0, RULE_WEIGHTS.1)
    );
}

#[tokio::test]
async fn unknown_listener_and_rule_are_not_found_without_retry() {
    let fx = AlbFixture::start().await;
    let exec = fx.executor();
    // The real ARN with its last hex digit changed (moto's ids are random: a fixed "0" was the
    // real ARN one run in sixteen).
    let (head, last) = fx.listener_arn.split_at(fx.listener_arn.len() - 1);
    let missing_listener = format!("{head}{}", if last == "0" { "1" } else { "0" });
    let t = AlbTarget {
        listener_arn: missing_listener,
        ..fx.listener_target()
    };
    let (result, steps) = revert(&exec, &t, false).await;
    let err = result.expect_err("missing listener");
    assert!(
        matches!(err, AlbError::NotFound { ref code, .. } if code == "ListenerNotFound"),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    let failed: Vec<_> = steps
        .iter()
        .filter_map(|s| match s {
            AlbStep::AttemptFailed(a) => Some((a.attempt, a.code.clone(), a.will_retry)),
            _ => None,
        })
        .collect();
    assert_eq!(failed, vec![(1, "ListenerNotFound".to_string(), false)]);

    let missing_rule = format!(
        "{}/0123456789abcdef",
        fx.listener_arn.replace(":listener/", ":listener-rule/")
    );
    let t = AlbTarget {
        rule_arn: Some(missing_rule),
        ..fx.listener_target()
    };
    let (result, steps) = revert(&exec, &t, false).await;
    let err = result.expect_err("missing rule");
    assert!(
        matches!(err, AlbError::NotFound { ref code, .. } if code == "RuleNotFound"),
        "{err:?}"
    );
    assert_eq!(count(&steps, |s| matches!(s, AlbStep::AttemptFailed { .. })), 1);
    assert!(matches!(exec.read(&t).await, Err(AlbError::NotFound { .. })));
}

#[tokio::test]
async fn default_rule_is_refused() {
    let fx = AlbFixture::start().await;
    let t = AlbTarget {
        rule_arn: Some(fx.default_rule_arn.clone()),
        ..fx.listener_target()
    };
    let original = fx.listener_actions().await;
    let (result, steps) = revert(&fx.executor(), &t, false).await;
    match result {
        Err(AlbError::InvalidTarget { message: msg }) => assert!(msg.contains("default rule"), "{msg}"),
        other => panic!("expected InvalidTarget, got {other:?}"),
    }
    assert_eq!(wrote(&steps), 0);
    assert_eq!(fx.listener_actions().await, original);
}

#[tokio::test]
async fn stable_group_missing_from_the_forward_is_an_error() {
    let fx = AlbFixture::start().await;
    let other = fx.empty_target_group("other").await;
    let t = AlbTarget {
        stable_target_group_arn: other,
        ..fx.listener_target()
    };
    let original = fx.listener_actions().await;
    let (result, steps) = revert(&fx.executor(), &t, false).await;
    assert!(
        matches!(result, Err(AlbError::StableGroupNotInForward { .. })),
        "{result:?}"
    );
    assert_eq!(count(&steps, |s| matches!(s, AlbStep::PreCheck { .. })), 0);
    assert_eq!(fx.listener_actions().await, original);
}

#[tokio::test]
async fn weights_changed_on_moto_mid_test_are_what_the_executor_reads() {
    let fx = AlbFixture::start().await;
    fx.set_listener_weights(40, 60).await;
    fx.set_rule_weights(0, 100).await;
    assert_eq!(weights(&fx.listener_actions().await), w(&fx, 40, 60));
    assert_eq!(
        stickiness(&fx.listener_actions().await),
        (true, Some(300)),
        "stickiness kept"
    );
    assert_eq!(weights(&fx.rule_actions().await), w(&fx, 0, 100));
    let read = fx.executor().read(&fx.listener_target()).await.expect("read");
    let got: Vec<(String, i32)> = read
        .forward
        .expect("a forward")
        .target_groups
        .iter()
        .map(|g| (g.target_group_arn.clone(), g.weight.unwrap_or(-1)))
        .collect();
    assert_eq!(got, w(&fx, 40, 60));
}

// ---- scripted endpoint: failure modes moto does not produce ----

fn fake_target() -> AlbTarget {
    AlbTarget {
        listener_arn: FAKE_LISTENER.into(),
        rule_arn: None,
        stable_target_group_arn: FAKE_STABLE.into(),
        stickiness: Stickiness::Keep,
        min_healthy_targets: 1,
        gradual: None,
        scope: Scope::One,
        canary_target_group_arns: Vec::new(),
    }
}

/// The stateful fake with the listener at 75/25 and `healthy` healthy targets per group.
async fn fake_listener(healthy: usize) -> FakeElb {
    FakeElb::listener(FAKE_LISTENER, &[(FAKE_STABLE, 75), (FAKE_CANARY, 25)], healthy).await
}

mod gradual;
mod scripted;
