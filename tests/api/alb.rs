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
async fn gradual_shift_steps_to_fifty_then_hundred() {
    let fx = AlbFixture::start().await;
    let interval = Duration::from_millis(300);
    let gradual = Some(GradualShift {
        steps: vec![50, 100],
        interval,
    });
    // The rule starts at stable 10 %: both steps are written.
    let t = AlbTarget {
        gradual: gradual.clone(),
        ..fx.rule_target()
    };
    let started = Instant::now();
    let (result, steps) = revert(&fx.executor(), &t, false).await;
    assert!(matches!(result, Ok(AlbOutcome::Reverted { .. })), "{result:?}");
    assert!(started.elapsed() >= interval);
    let written: Vec<u8> = steps
        .iter()
        .filter_map(|s| match s {
            AlbStep::Wrote { stable_percent, .. } => Some(*stable_percent),
            _ => None,
        })
        .collect();
    assert_eq!(written, vec![50, 100]);
    let halfway = steps
        .iter()
        .find_map(|s| match s {
            AlbStep::ReadBack {
                stable_percent: 50,
                snapshot,
                matches: true,
            } => Some(snapshot.clone()),
            _ => None,
        })
        .expect("read-back after the 50 % step");
    let fwd = halfway.forward.expect("forward");
    let ws: Vec<Option<i32>> = fwd.target_groups.iter().map(|g| g.weight).collect();
    assert_eq!(ws, vec![Some(50), Some(50)]);
    assert!(steps.iter().any(|s| matches!(
        s,
        AlbStep::Waiting {
            interval_ms: 300,
            next_stable_percent: 100
        }
    )));
    assert_eq!(weights(&fx.rule_actions().await), w(&fx, 100, 0));

    // The listener is already at stable 75 %: the 50 % step is skipped, never moving
    // traffic back towards the canary.
    let t = AlbTarget {
        gradual,
        ..fx.listener_target()
    };
    let (result, steps) = revert(&fx.executor(), &t, false).await;
    assert!(matches!(result, Ok(AlbOutcome::Reverted { .. })), "{result:?}");
    assert_eq!(wrote(&steps), 1);
    assert_eq!(weights(&fx.listener_actions().await), w(&fx, 100, 0));
}

/// A replica dies while waiting between two gradual steps (its revert is dropped after the
/// 50 % step) and another takes over: it goes on from the weights at the rule, waits only what
/// is left of the interval since the 50 % write (neither skipping the wait nor starting it
/// again), then waits the full interval before the last step, and says where it resumed.
#[tokio::test]
async fn a_takeover_mid_shift_resumes_from_the_weights_read_and_keeps_the_interval() {
    use rollback_responder::action::alb::Resume;
    use rollback_responder::action::retry::no_gate;
    use rollback_responder::action::EarlierStep;

    let fx = AlbFixture::start().await;
    let interval = Duration::from_millis(1500);
    let t = AlbTarget {
        gradual: Some(GradualShift {
            steps: vec![50, 80, 100],
            interval,
        }),
        ..fx.rule_target()
    };
    let exec = fx.executor();

    // The first attempt: every step kept with the instant it was reported; it dies (is
    // dropped) once it starts waiting for the 80 % step.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, AlbStep)>();
    let first = async {
        let mut record = |s: AlbStep| {
            let _ = tx.send((Instant::now(), s));
        };
        exec.revert(&t, false, &mut record).await
    };
    let mut seen: Vec<(Instant, AlbStep)> = Vec::new();
    tokio::select! {
        r = first => panic!("the first attempt ran to its end: {r:?}"),
        _ = async {
            while let Some(s) = rx.recv().await {
                let waiting = matches!(s.1, AlbStep::Waiting { .. });
                seen.push(s);
                if waiting {
                    break;
                }
            }
        } => {}
    }
    assert_eq!(weights(&fx.rule_actions().await), w(&fx, 50, 50));
    let wrote_50 = seen
        .iter()
        .find(|(_, s)| matches!(s, AlbStep::Wrote { stable_percent: 50, .. }))
        .map(|(at, _)| *at)
        .expect("the 50 % write");

    // The takeover comes a while later, with what the first attempt recorded.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let earlier: Vec<EarlierStep> = seen
        .iter()
        .map(|(at, s)| EarlierStep {
            ago: at.elapsed(),
            detail: serde_json::to_value(s).unwrap(),
        })
        .collect();
    let resume = Resume::from_earlier(&earlier);
    let taken_over = Instant::now();
    let mut steps: Vec<(Instant, AlbStep)> = Vec::new();
    let mut record = |s: AlbStep| steps.push((Instant::now(), s));
    let result = exec.revert_resuming(&t, false, &mut record, &no_gate, &resume).await;
    assert!(matches!(result, Ok(AlbOutcome::Reverted { .. })), "{result:?}");
    assert_eq!(weights(&fx.rule_actions().await), w(&fx, 100, 0));

    let written: Vec<(Instant, u8)> = steps
        .iter()
        .filter_map(|(at, s)| match s {
            AlbStep::Wrote { stable_percent, .. } => Some((*at, *stable_percent)),
            _ => None,
        })
        .collect();
    assert_eq!(
        written.iter().map(|w| w.1).collect::<Vec<_>>(),
        vec![80, 100],
        "{steps:?}"
    );
    // The wait before 80 % counts from the 50 % write, not from the takeover.
    let gap = written[0].0 - wrote_50;
    assert!(gap >= interval, "80 % came {gap:?} after 50 %: the wait was skipped");
    assert!(
        written[0].0 - taken_over < interval,
        "80 % came {:?} after the takeover: the wait began again",
        written[0].0 - taken_over
    );
    assert!(written[1].0 - written[0].0 >= interval, "the interval before 100 %");
    let resumed = steps
        .iter()
        .find_map(|(_, s)| match s {
            AlbStep::Resumed {
                stable_percent,
                last_stable_percent,
                next_stable_percent,
                wait_ms,
                ..
            } => Some((*stable_percent, *last_stable_percent, *next_stable_percent, *wait_ms)),
            _ => None,
        })
        .expect("a resumed step");
    assert_eq!((resumed.0, resumed.1, resumed.2), (50, 50, 80));
    assert!(resumed.3 > 0 && resumed.3 < 1500 - 600, "{resumed:?}");
    let said = steps
        .iter()
        .find(|(_, s)| matches!(s, AlbStep::Resumed { .. }))
        .map(|(_, s)| s.describe())
        .unwrap();
    assert!(
        said.starts_with(&format!(
            "resuming the interrupted gradual shift of {} at 50% stable (the earlier attempt's 50% step, recorded ",
            fx.rule_arn
        )) && said.contains("before shifting to 80% stable"),
        "{said}"
    );
    assert!(steps
        .iter()
        .all(|(_, s)| !matches!(s, AlbStep::Planned { stable_percent: 50, .. })));

    // A dry-run takeover describes the remaining steps without waiting or writing.
    fx.set_rule_weights(50, 50).await;
    let mut dry = Vec::new();
    let started = Instant::now();
    let result = exec
        .revert_resuming(
            &t,
            true,
            &mut |s| dry.push(s),
            &no_gate,
            &Resume::from_earlier(&earlier),
        )
        .await;
    assert!(matches!(result, Ok(AlbOutcome::DryRun { .. })), "{result:?}");
    assert!(started.elapsed() < interval);
    assert_eq!(wrote(&dry), 0);
    assert_eq!(weights(&fx.rule_actions().await), w(&fx, 50, 50));
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

fn fake_weights(stable: i32, canary: i32) -> Vec<(String, i32)> {
    vec![(FAKE_STABLE.into(), stable), (FAKE_CANARY.into(), canary)]
}

#[tokio::test]
async fn throttling_is_retried_and_every_attempt_reported() {
    let fake = fake_listener(1).await;
    fake.error_next(None, usize::MAX, 400, "Throttling");
    let exec = AlbExecutor::new(elb_client(&fake.endpoint), &fast_settings());
    let (result, steps) = revert(&exec, &fake_target(), false).await;
    let err = result.expect_err("throttled");
    assert_eq!(err.code(), "Throttling");
    assert!(err.is_retryable());
    // max_attempts 3, SDK retries off: exactly three requests, each for our listener.
    assert_eq!(fake.actions(), vec!["DescribeListeners"; 3]);
    for r in fake.requests() {
        assert_eq!(r.param("ListenerArns.member.1"), Some(FAKE_LISTENER), "{r:?}");
    }
    assert_eq!((fake.writes(), fake.weights()), (0, fake_weights(75, 25)));
    let failed: Vec<(u32, bool)> = steps
        .iter()
        .filter_map(|s| match s {
            AlbStep::AttemptFailed(a) => {
                assert_eq!(a.code, "Throttling");
                Some((a.attempt, a.will_retry))
            }
            _ => None,
        })
        .collect();
    assert_eq!(failed, vec![(1, true), (2, true), (3, false)]);
}

#[tokio::test]
async fn transient_errors_then_success() {
    // The first request fails; everything after is answered from the listener's state, so the
    // read-back shows what the write really sent.
    let fake = fake_listener(1).await;
    fake.error_next(None, 1, 503, "ServiceUnavailable");
    let exec = AlbExecutor::new(elb_client(&fake.endpoint), &fast_settings());
    let (result, steps) = revert(&exec, &fake_target(), false).await;
    assert!(matches!(result, Ok(AlbOutcome::Reverted { .. })), "{result:?}");
    assert_eq!(
        fake.actions(),
        vec![
            "DescribeListeners",
            "DescribeListeners",
            "DescribeTargetHealth",
            "ModifyListener",
            "DescribeListeners"
        ]
    );
    // The one write went to our listener and sent stable 100 / canary 0, canary still listed.
    let modify = fake.requests_of("ModifyListener");
    assert_eq!(modify.len(), 1);
    assert_eq!(modify[0].param("ListenerArn"), Some(FAKE_LISTENER));
    assert_eq!(modify[0].param("DefaultActions.member.1.Type"), Some("forward"));
    assert_eq!(modify[0].forward_weights(), fake_weights(100, 0));
    let health = fake.requests_of("DescribeTargetHealth");
    assert_eq!(health[0].param("TargetGroupArn"), Some(FAKE_STABLE));
    assert_eq!((fake.writes(), fake.weights()), (1, fake_weights(100, 0)));
    assert!(matches!(
        &steps[0],
        AlbStep::AttemptFailed(a) if a.attempt == 1 && a.will_retry && a.code == "ServiceUnavailable"
    ));
}

#[tokio::test]
async fn a_transient_error_on_the_write_is_retried_and_written_once() {
    let fake = fake_listener(1).await;
    fake.error_next(Some("ModifyListener"), 1, 500, "InternalFailure");
    let exec = AlbExecutor::new(elb_client(&fake.endpoint), &fast_settings());
    let (result, steps) = revert(&exec, &fake_target(), false).await;
    assert!(matches!(result, Ok(AlbOutcome::Reverted { .. })), "{result:?}");
    let modify = fake.requests_of("ModifyListener");
    assert_eq!(modify.len(), 2, "the failed write and its retry");
    assert_eq!(
        modify[0].params, modify[1].params,
        "the retry writes the same full list"
    );
    assert_eq!((fake.writes(), fake.weights()), (1, fake_weights(100, 0)));
    assert_eq!(wrote(&steps), 1);
}

#[tokio::test]
async fn access_denied_is_not_retried() {
    let fake = fake_listener(1).await;
    fake.error_next(None, usize::MAX, 403, "AccessDenied");
    let exec = AlbExecutor::new(elb_client(&fake.endpoint), &fast_settings());
    let (result, _) = revert(&exec, &fake_target(), false).await;
    let err = result.expect_err("denied");
    assert!(
        matches!(err, AlbError::Aws { ref code, retryable: false, .. } if code == "AccessDenied"),
        "{err:?}"
    );
    assert_eq!(fake.actions().len(), 1);
    assert_eq!((fake.writes(), fake.weights()), (0, fake_weights(75, 25)));
}

#[tokio::test]
async fn a_write_that_does_not_take_is_reported() {
    // ModifyListener "succeeds" but the listener keeps 75/25.
    let fake = fake_listener(2).await;
    fake.fail_next(Some("ModifyListener"), 1, fake_elb::Fault::IgnoreWrite);
    let exec = AlbExecutor::new(elb_client(&fake.endpoint), &fast_settings());
    let (result, steps) = revert(&exec, &fake_target(), false).await;
    match result {
        Err(AlbError::WeightsDidNotTake { expected, got }) => {
            assert_eq!(expected.target_groups[0].weight, Some(100));
            assert_eq!(got.target_groups[0].weight, Some(75));
        }
        other => panic!("expected WeightsDidNotTake, got {other:?}"),
    }
    assert_eq!(
        count(&steps, |s| matches!(s, AlbStep::ReadBack { matches: false, .. })),
        3
    );
    // One write was sent (and not repeated), with the weights the read-back expected.
    let modify = fake.requests_of("ModifyListener");
    assert_eq!(modify.len(), 1);
    assert_eq!(modify[0].forward_weights(), fake_weights(100, 0));
    assert_eq!((fake.writes(), fake.weights()), (0, fake_weights(75, 25)));
}

#[tokio::test]
async fn weights_changed_by_someone_else_are_what_the_next_read_sees() {
    // The fake can move the listener mid-test, as an operator editing the ALB would.
    let fake = fake_listener(1).await;
    let exec = AlbExecutor::new(elb_client(&fake.endpoint), &fast_settings());
    let weights_read = |s: rollback_responder::action::alb::ForwardSnapshot| {
        let f = s.forward.expect("a forward action");
        f.target_groups
            .iter()
            .map(|g| (g.target_group_arn.clone(), g.weight.unwrap_or(-1)))
            .collect::<Vec<_>>()
    };
    let before = exec.read(&fake_target()).await.expect("read");
    assert_eq!(weights_read(before), fake_weights(75, 25));
    fake.set_weights(&[(FAKE_STABLE, 40), (FAKE_CANARY, 60)]);
    let after = exec.read(&fake_target()).await.expect("read");
    assert_eq!(weights_read(after), fake_weights(40, 60));
    assert_eq!(fake.writes(), 0);
}

#[tokio::test]
async fn an_unknown_listener_is_listener_not_found_and_nothing_is_written() {
    let fake = fake_listener(1).await;
    let exec = AlbExecutor::new(elb_client(&fake.endpoint), &fast_settings());
    let t = AlbTarget {
        listener_arn: FAKE_LISTENER.replace("2222222222222222", "9999999999999999"),
        ..fake_target()
    };
    let (result, _) = revert(&exec, &t, false).await;
    let err = result.expect_err("no such listener");
    assert_eq!(err.code(), "ListenerNotFound", "{err:?}");
    assert_eq!(fake.actions(), vec!["DescribeListeners"]);
    assert_eq!((fake.writes(), fake.weights()), (0, fake_weights(75, 25)));
}

/// The rustls provider trap (testing.md): kube and the AWS SDK in one process must not panic
/// choosing a crypto provider. Both clients are built here, TLS configs included.
#[tokio::test]
async fn a_kube_client_and_an_elbv2_client_live_in_one_binary() {
    let settings = rollback_responder::action::alb::AwsSettings {
        region: Some("us-east-1".into()),
        endpoint_url: Some("https://127.0.0.1:1".into()),
        ..Default::default()
    };
    let _elb = AlbExecutor::from_settings(&settings).await;
    let cfg = kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
    let kube = kube::Client::try_from(cfg).expect("kube client builds next to the ELBv2 client");
    assert_eq!(kube.default_namespace(), "default");
}

#[tokio::test]
async fn a_describe_rules_marker_that_repeats_is_an_error_not_an_endless_loop() {
    let fake = FakeElb::start(Box::new(|_, action| match action {
        "DescribeListeners" => (
            200,
            fake_elb::describe_listeners_xml(FAKE_LISTENER, &[(FAKE_STABLE, 75), (FAKE_CANARY, 25)]),
        ),
        "DescribeRules" => (
            200,
            format!(
                "<DescribeRulesResponse xmlns=\"{}\"><DescribeRulesResult><Rules/>\
                 <NextMarker>again</NextMarker></DescribeRulesResult>\
                 <ResponseMetadata><RequestId>fake</RequestId></ResponseMetadata></DescribeRulesResponse>",
                fake_elb::NS
            ),
        ),
        other => (400, fake_elb::error_xml("Unexpected", other)),
    }))
    .await;
    let exec = AlbExecutor::new(elb_client(&fake.endpoint), &fast_settings());
    let t = AlbTarget {
        scope: Scope::Listener,
        ..fake_target()
    };
    let (result, _) = tokio::time::timeout(Duration::from_secs(20), revert(&exec, &t, false))
        .await
        .expect("DescribeRules must not loop forever");
    let err = result.expect_err("a repeating marker");
    assert_eq!(err.code(), "DescribeRulesPagination");
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("again"), "{err}");
    assert_eq!(fake.writes(), 0);
    // The first page, then the repeat: two reads, not a hundred.
    assert_eq!(fake.requests_of("DescribeRules").len(), 2);
}
