//! Sequences that real incidents produce: bad data next to good, alerts joining, holds
//! ending. Each test asserts on what the peer saw (moto's listener weights), not only on the
//! incident's phase.

use rollback_responder::action::Executors;
use serde_json::json;

use crate::helpers::*;
use crate::support::alb_fixture::{weights, AlbFixture};

fn uniq(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// A policy for the ALB on moto, service `svc`, with the shipped error-rate triggers.
fn alb_policy(fx: &AlbFixture, svc: &str) -> String {
    format!(
        r#"
name: {svc}
service: {svc}
matchers: ['service="{svc}"']
target:
  alb:
    listener_arn: {}
    stable_target_group_arn: {}
triggers:
  - name: error-rate-above-5pct
    matchers: ['alertname="HighErrorRate"']
    for: 0s
    mode: auto
"#,
        fx.listener_arn, fx.stable_tg
    )
}

/// The isolation case: an alert whose `startsAt + for` lies past the end of the calendar
/// comes first, an automatic alert of another service right behind it. The bad one is set
/// aside with its reason (API and metric); the good one is decided and rolls back in moto.
#[tokio::test]
async fn an_alert_past_the_calendar_is_set_aside_and_another_service_still_rolls_back() {
    let fx = AlbFixture::start().await;
    let app = spawn_app(Options {
        policies: vec![
            ("checkout.yaml", CHECKOUT_POLICY.to_string()),
            ("portal.yaml", alb_policy(&fx, "portal")),
        ],
        executors: Some(Executors {
            alb: Some(fx.executor()),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    let before = weights(&fx.listener_actions().await);
    assert_eq!(before, vec![(fx.stable_tg.clone(), 75), (fx.canary_tg.clone(), 25)]);

    let mut bad = alert(
        "HealthCheckFailing",
        "checkout",
        "badbadbadbad0001",
        "+262142-12-31T23:59:59Z",
        None,
    );
    bad["labels"]["run"] = json!(uniq("bad"));
    let good = alert("HighErrorRate", "portal", "600d600d600d0001", &ago(60), None);
    let r = app.post_webhook(&payload("firing", vec![bad, good])).await;
    assert!(r.status().is_success(), "{}", r.status());

    let list = app
        .wait_incidents("the portal rollback verified", |l| {
            l.iter().any(|i| i["service"] == "portal" && i["phase"] == "verified")
        })
        .await;
    assert_eq!(list.len(), 1, "the bad alert opens nothing: {list:?}");
    assert_eq!(
        weights(&fx.listener_actions().await),
        vec![(fx.stable_tg.clone(), 100), (fx.canary_tg.clone(), 0)],
        "moto saw the rollback"
    );

    let undecidable = app.get_json("/api/v1/alerts/undecidable").await;
    let alerts = undecidable["alerts"].as_array().unwrap();
    assert_eq!(alerts.len(), 1, "{undecidable}");
    assert_eq!(alerts[0]["fingerprint"], "badbadbadbad0001");
    assert_eq!(alerts[0]["alertname"], "HealthCheckFailing");
    let problem = alerts[0]["problem"].as_str().unwrap();
    assert!(
        problem.contains("+262142") || problem.contains("panicked"),
        "the reason names the bad data: {problem}"
    );
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("decisions_total{") && l.contains("outcome=\"undecidable\"") && !l.ends_with(" 0")),
        "counted in a metric:\n{metrics}"
    );
    assert_eq!(
        app.responder.store.pending_alert_ids(10).await.unwrap(),
        Vec::<i64>::new(),
        "nothing left pending: the loop is not stuck on the bad alert"
    );
}
