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

/// Kubernetes: a patch answered 504 (the API server's own timeout: etcd may have stored it)
/// until the retries end is of unknown outcome; the Service switch before it stays applied and
/// known. Before, the last 504 was returned and the incident said the scale was not done.
#[tokio::test]
async fn a_kubernetes_write_that_never_got_a_clear_answer_is_of_unknown_outcome() {
    use crate::faults_actions::{kube_client, kube_target, kube_world};
    use crate::support::fake_kube::FakeKube;
    use crate::support::fault_proxy::{Fault, FaultProxy};
    use rollback_responder::action::kubernetes::{KubeError, KubeExecutor, KubeSettings, KubeStepRecord};

    let fake = FakeKube::start().await;
    kube_world(&fake);
    let proxy = FaultProxy::start(&fake.url()).await;
    proxy.inject(Fault {
        matching: "PATCH /apis/apps/v1/namespaces/portal/deployments/portal-api-canary/scale".into(),
        status: 504,
        body: serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "Timeout: request did not complete within requested timeout", "reason": "Timeout", "code": 504})
        .to_string(),
        ..Fault::kube_unavailable(1_000)
    });
    let exec = KubeExecutor::new(
        kube_client(&proxy.url),
        &KubeSettings {
            initial_backoff_ms: 10,
            retry_window: Duration::from_millis(500),
            ..KubeSettings::default()
        },
    );
    let mut records = Vec::new();
    let e = exec
        .revert(&kube_target(), false, &mut |r| records.push(r))
        .await
        .expect_err("the scale never gets an answer");
    assert!(matches!(e, KubeError::OutcomeUnknown { .. }), "{e:?}");
    assert!(e.outcome_unknown());
    assert!(
        e.to_string()
            .starts_with("patch deployments/scale/portal-api-canary in portal: whether it took is UNKNOWN"),
        "{e}"
    );
    assert!(records.iter().any(KubeStepRecord::applied), "the Service switch took");
    // A clear refusal stays a known failure: a 503 "unavailable" was not applied.
    let proxy = FaultProxy::start(&fake.url()).await;
    proxy.inject(Fault {
        matching: "PATCH /apis/apps/v1/namespaces/portal/deployments/portal-api-canary/scale".into(),
        ..Fault::kube_unavailable(1_000)
    });
    let exec = KubeExecutor::new(
        kube_client(&proxy.url),
        &KubeSettings {
            initial_backoff_ms: 10,
            retry_window: Duration::from_millis(500),
            ..KubeSettings::default()
        },
    );
    let e = exec
        .revert(&kube_target(), false, &mut |_| {})
        .await
        .expect_err("503 throughout");
    assert!(!e.outcome_unknown(), "{e:?}");
}
