//! Against the scripted fake ELBv2: throttling, transient errors, writes that do not take.

use super::*;

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
