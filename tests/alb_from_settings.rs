//! `AlbExecutor::from_settings` end to end: default credential chain (from the environment
//! here), endpoint override, the rustls-ring HTTP client, no crypto-provider panic.
//! Alone in its own test binary because it sets process environment variables.

mod support;

use rollback_responder::action::alb::{AlbExecutor, AlbOutcome, AwsSettings};
use support::alb_fixture::{weights, AlbFixture};

#[tokio::test]
async fn from_settings_reverts_through_the_default_chain() {
    // Only test in this binary, set before any other thread reads the environment.
    #[allow(unused_unsafe)]
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        std::env::remove_var("AWS_PROFILE");
    }
    let fx = AlbFixture::start().await;
    let settings = AwsSettings {
        region: Some("us-east-1".into()),
        endpoint_url: Some(fx.moto.endpoint.clone()),
        max_attempts: 2,
        initial_backoff_ms: 10,
        ..AwsSettings::default()
    };
    let exec = AlbExecutor::from_settings(&settings).await;
    let t = fx.listener_target();
    let snapshot = exec.read(&t).await.expect("read through from_settings client");
    assert!(!snapshot.is_fully_stable(&fx.stable_tg));
    let mut sink = |_| {};
    let outcome = exec.revert(&t, false, &mut sink).await.expect("revert");
    assert!(matches!(outcome, AlbOutcome::Reverted { .. }));
    assert_eq!(
        weights(&fx.listener_actions().await),
        vec![(fx.stable_tg.clone(), 100), (fx.canary_tg.clone(), 0)]
    );
}
