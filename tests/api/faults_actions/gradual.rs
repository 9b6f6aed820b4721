use rollback_responder::action::Executors;
use serde_json::Value;

use super::*;
use crate::helpers::*;

#[tokio::test]
async fn each_step_of_a_gradual_shift_is_in_the_timeline_when_it_happens() {
    let fx = AlbFixture::start().await;
    let policy = format!(
        r#"
name: portal-api
service: portal-api
matchers: ['service="portal-api"']
target:
  alb:
    listener_arn: {listener}
    stable_target_group_arn: {stable}
    gradual: {{steps: [90, 100], interval: 1s}}
triggers:
  - name: errors
    matchers: ['alertname="HighErrorRate"']
    mode: auto
verification:
  bake: 1s
  interval: 200ms
"#,
        listener = fx.listener_arn,
        stable = fx.stable_tg
    );
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", policy)],
        executors: Some(Executors {
            alb: Some(fx.executor()),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "gr01", &ago(60), None)],
    ))
    .await;
    // The first step is on record while the action is still running.
    let list = app
        .wait_incidents("executing", |l| l.len() == 1 && l[0]["phase"] == "executing")
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let first = loop {
        let inc = app.incident(&id).await;
        let wrote: Vec<Value> = inc["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "action_step" && e["detail"]["step"] == "wrote")
            .cloned()
            .collect();
        if let Some(w) = wrote.first() {
            assert_eq!(w["summary"], "ModifyListener written: 90% to stable (attempt 1)");
            break (w.clone(), inc["phase"].clone());
        }
        assert!(std::time::Instant::now() < deadline, "{inc:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(first.1, "executing", "recorded before the action ended");
    let list = app.wait_incidents("verified", |l| l[0]["phase"] == "verified").await;
    assert_eq!(list[0]["executed"], true);
    let inc = app.incident(&id).await;
    let timeline = inc["timeline"].as_array().unwrap();
    let wrote: Vec<&Value> = timeline
        .iter()
        .filter(|e| e["kind"] == "action_step" && e["detail"]["step"] == "wrote")
        .collect();
    assert_eq!(
        wrote.iter().map(|e| e["summary"].as_str().unwrap()).collect::<Vec<_>>(),
        vec![
            "ModifyListener written: 90% to stable (attempt 1)",
            "ModifyListener written: 100% to stable (attempt 1)"
        ]
    );
    // Each carries its own time: the second came a wait later than the first.
    let at = |e: &Value| chrono::DateTime::parse_from_rfc3339(e["at"].as_str().unwrap()).unwrap();
    assert!(at(wrote[1]) > at(wrote[0]), "{wrote:#?}");
    // And the incident's acted_at is when traffic first moved.
    assert_eq!(inc["acted_at"], wrote[0]["at"]);
    assert_eq!(
        weights(&fx.listener_actions().await),
        vec![(fx.stable_tg.clone(), 100), (fx.canary_tg.clone(), 0)]
    );
}
