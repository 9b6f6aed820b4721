//! Whole flows that start at a real Alertmanager 0.25 delivering webhooks with bearer auth.

use std::time::Duration;

use rollback_responder::action::Executors;
use serde_json::json;

use crate::helpers::*;
use crate::peers::{Alertmanager, FlakyProxy};
use crate::support::alb_fixture::{weights, AlbFixture};

fn uniq(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

#[tokio::test]
async fn alertmanager_fires_and_resolves_and_a_redelivery_opens_no_second_incident() {
    let app = spawn_app(Options::default()).await;
    // The first delivery is stored, then answered 503: Alertmanager must send it again.
    let proxy = FlakyProxy::start(app.url("/webhook/alertmanager"), 1).await;
    let am = Alertmanager::start(&proxy.url(), TOKEN).await;
    let labels = json!({"alertname": "HighLatency", "service": "checkout", "severity": "critical", "run": uniq("am")});
    let starts = ago(5);
    am.post(labels.clone(), &starts, None).await;

    let list = app
        .wait_incidents("incident from alertmanager", |l| {
            l.len() == 1 && l[0]["phase"] == "awaiting_approval"
        })
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while proxy.count() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "alertmanager never re-sent after the 503"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let inc = app.incident(&id).await;
    // No `aws:` here, so the test app runs in dry run: the decision it would have made.
    assert_eq!(inc["decision"]["would"]["outcome"], "needs_approval");
    assert_eq!(inc["alerts"].as_array().unwrap().len(), 1);
    assert!(inc["timeline"][0]["detail"]["external_url"]
        .as_str()
        .unwrap()
        .starts_with("http://127.0.0.1:"));

    am.post(labels, &starts, Some(&ago(0))).await;
    let list = app
        .wait_incidents("resolved by alertmanager", |l| {
            l[0]["phase"] == "cancelled" && l[0]["open"] == false
        })
        .await;
    assert_eq!(list.len(), 1, "re-delivery must not open a second incident");
    assert_eq!(app.responder.store.alert_count().await.unwrap(), 1);
}

fn alb_policy(fx: &AlbFixture) -> String {
    format!(
        r#"
name: portal-api
service: portal-api
matchers: ['service="portal-api"']
target:
  alb:
    listener_arn: {}
    stable_target_group_arn: {}
    stickiness: disable
triggers:
  - name: error-rate-above-5pct
    matchers: ['alertname="HighErrorRate"']
    for: 0s
    mode: auto
verification: {{bake: 1s, interval: 200ms}}
"#,
        fx.listener_arn, fx.stable_tg
    )
}

#[tokio::test]
async fn high_error_rate_from_alertmanager_reverts_the_listener_in_moto() {
    let fx = AlbFixture::start().await;
    let opts = Options {
        policies: vec![("portal-api.yaml", alb_policy(&fx))],
        executors: Some(Executors {
            alb: Some(fx.executor()),
            ..Default::default()
        }),
        ..Options::default()
    };
    let app = spawn_app(opts).await;
    let am = Alertmanager::start(&app.url("/webhook/alertmanager"), TOKEN).await;
    assert_eq!(
        weights(&fx.listener_actions().await),
        vec![(fx.stable_tg.clone(), 75), (fx.canary_tg.clone(), 25)]
    );
    am.post(
        json!({"alertname": "HighErrorRate", "service": "portal-api", "severity": "critical", "run": uniq("alb")}),
        &ago(60),
        None,
    )
    .await;

    let list = app
        .wait_incidents("verified rollback", |l| l.len() == 1 && l[0]["phase"] == "verified")
        .await;
    assert_eq!(
        weights(&fx.listener_actions().await),
        vec![(fx.stable_tg.clone(), 100), (fx.canary_tg.clone(), 0)]
    );
    let inc = app.incident(list[0]["id"].as_str().unwrap()).await;
    assert_eq!(inc["executed"], true);
    let done = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "action_succeeded")
        .unwrap();
    assert_eq!(done["detail"]["outcome"], "reverted");
    let before = &done["detail"]["before"]["forward"]["target_groups"];
    let after = &done["detail"]["after"]["forward"]["target_groups"];
    assert_eq!(before[0]["weight"], 75);
    assert_eq!(before[1]["weight"], 25);
    assert_eq!(after[0]["weight"], 100);
    assert_eq!(after[1]["weight"], 0);
    assert_eq!(done["detail"]["after"]["forward"]["stickiness"]["enabled"], false);
    assert!(
        done["summary"].as_str().unwrap().contains("read back OK"),
        "{}",
        done["summary"]
    );
    let kinds: Vec<&str> = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"action_step"), "{kinds:?}");
}
