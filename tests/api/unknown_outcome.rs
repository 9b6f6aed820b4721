//! A write whose outcome is not known is said as unknown: never "nothing was changed" (nor
//! "NOT reverted") for a ModifyListener that AWS may have applied.

use std::time::Duration;

use aws_smithy_types::timeout::TimeoutConfig;
use rollback_responder::action::alb::{AlbError, AlbExecutor, AwsSettings};

use crate::support::alb_fixture::{elb_client, weights, AlbFixture};
use crate::support::aws_proxy::{AwsProxy, HoldPoint};

/// moto applies the ModifyListener but its answer is held past the attempt timeout, and from
/// then on every read of the listener answers 503: no retry can tell whether the write took.
/// Before, the executor returned the last 503 and the incident said "rollback failed, nothing
/// was changed" while the listener had been reverted.
#[tokio::test]
async fn a_write_that_timed_out_and_cannot_be_read_back_is_of_unknown_outcome() {
    let fx = AlbFixture::start().await;
    let proxy = AwsProxy::start(&fx.moto.endpoint, 1).await;
    let mut held = proxy.hold_next("ModifyListener", HoldPoint::AfterForward);
    let client = elb_client(proxy.endpoint(0));
    let conf = client
        .config()
        .to_builder()
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(1))
                .operation_attempt_timeout(Duration::from_secs(1))
                .build(),
        )
        .build();
    let exec = AlbExecutor::new(
        aws_sdk_elasticloadbalancingv2::Client::from_conf(conf),
        &AwsSettings {
            initial_backoff_ms: 10,
            max_attempts: 3,
            ..AwsSettings::default()
        },
    );
    let t = fx.listener_target();
    let task = tokio::spawn(async move { exec.revert(&t, false, &mut |_| {}).await });
    held.caught(Duration::from_secs(20)).await;
    proxy.fail("DescribeListeners", &fx.listener_arn, 503, "ServiceUnavailable");
    let result = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the revert gives up")
        .expect("task");
    held.release();
    let Err(e) = result else {
        panic!("{result:?}");
    };
    assert!(matches!(e, AlbError::OutcomeUnknown { .. }), "{e:?}");
    let said = e.to_string();
    assert!(
        said.starts_with(&format!(
            "ModifyListener on {}: whether it took is UNKNOWN",
            fx.listener_arn
        )),
        "{said}"
    );
    assert!(said.contains("ServiceUnavailable"), "{said}");
    assert_eq!(proxy.count("ModifyListener"), 1);
    // It had taken: saying "not changed" would have been wrong.
    assert_eq!(
        weights(&fx.listener_actions().await),
        vec![(fx.stable_tg.clone(), 100), (fx.canary_tg.clone(), 0)]
    );
}

/// A clear refusal (a 4xx with its code) was not applied: that failure stays "failed", known.
#[tokio::test]
async fn a_write_refused_with_a_clear_answer_is_not_of_unknown_outcome() {
    let fx = AlbFixture::start().await;
    let proxy = AwsProxy::start(&fx.moto.endpoint, 1).await;
    proxy.fail("ModifyListener", &fx.listener_arn, 403, "AccessDenied");
    let exec = AlbExecutor::new(
        elb_client(proxy.endpoint(0)),
        &AwsSettings {
            initial_backoff_ms: 10,
            max_attempts: 3,
            ..AwsSettings::default()
        },
    );
    let e = exec
        .revert(&fx.listener_target(), false, &mut |_| {})
        .await
        .unwrap_err();
    assert!(!e.outcome_unknown(), "{e:?}");
    assert_eq!(e.code(), "AccessDenied");
}
