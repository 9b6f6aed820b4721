use rollback_responder::action::Executors;
use rollback_responder::incident::IncidentId;
use serde_json::Value;

use super::*;
use crate::helpers::*;
use crate::notify::{policy_with_notify, received, wait_requests, Peers};
use crate::support::alb_fixture::forward;

#[tokio::test]
async fn a_listener_found_already_reverted_never_tells_the_public_it_was_rolled_back() {
    let fx = AlbFixture::start().await;
    // Someone already put all traffic back on stable.
    fx.elb
        .modify_listener()
        .listener_arn(&fx.listener_arn)
        .default_actions(forward(&[(&fx.stable_tg, 100), (&fx.canary_tg, 0)], Some(300)))
        .send()
        .await
        .expect("ModifyListener");
    let peers = Peers::start().await;
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", policy_with_notify(&fx, "auto"))],
        env: peers.env(),
        executors: Some(Executors {
            alb: Some(fx.executor()),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    let starts = ago(60);
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "sp01", &starts, None)],
    ))
    .await;
    let list = app
        .wait_incidents("verified", |l| l.len() == 1 && l[0]["phase"] == "verified")
        .await;
    assert_eq!(list[0]["executed"], false);
    app.post_webhook(&payload(
        "resolved",
        vec![alert("HighErrorRate", "portal-api", "sp01", &starts, Some(&ago(0)))],
    ))
    .await;
    app.wait_incidents("closed", |l| l[0]["open"] == false).await;

    let sp = wait_requests(&peers.statuspage, 3, "statuspage").await;
    let bodies: Vec<(String, String, Value)> = sp
        .iter()
        .map(|(m, p, b, _)| (m.clone(), p.clone(), b["incident"].clone()))
        .collect();
    assert_eq!(bodies.len(), 3, "{bodies:#?}");
    assert_eq!(
        (bodies[0].0.as_str(), bodies[0].1.as_str()),
        ("POST", "/pages/PAGE1/incidents")
    );
    assert_eq!(bodies[0].2["name"], "portal-api: degraded service");
    assert_eq!(bodies[0].2["status"], "investigating");
    assert_eq!(
        bodies[0].2["body"],
        "We identified a problem with portal-api and are investigating."
    );
    assert_eq!(bodies[1].2["status"], "monitoring");
    assert_eq!(bodies[1].2["body"], "portal-api is healthy again. We are monitoring.");
    assert_eq!(bodies[2].2["status"], "resolved");
    assert_eq!(bodies[2].2["body"], "portal-api has recovered.");
    for (_, _, b) in &bodies {
        let text = b.to_string();
        assert!(
            !text.contains("rolling") && !text.contains("rolled back") && !text.contains("serving all traffic"),
            "{text}"
        );
    }
    // Nor does PagerDuty hear of a rollback we did not execute.
    let pd = received(&peers.pagerduty).await;
    assert!(
        pd.iter().all(|(_, p, _, _)| p != "/v2/change/enqueue"),
        "{:#?}",
        pd.iter().map(|r| r.2.clone()).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn an_incident_that_never_paged_sends_pagerduty_no_resolve() {
    let fx = AlbFixture::start().await;
    let peers = Peers::start().await;
    // The trigger waits 10 minutes: the alert resolves long before it would page.
    let policy = policy_with_notify(&fx, "auto").replace(
        "    matchers: ['alertname=\"HighErrorRate\"']\n    mode: auto",
        "    matchers: ['alertname=\"HighErrorRate\"']\n    for: 10m\n    mode: auto",
    );
    assert!(policy.contains("for: 10m"), "{policy}");
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", policy)],
        env: peers.env(),
        executors: Some(Executors {
            alb: Some(fx.executor()),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    let starts = ago(5);
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "pd01", &starts, None)],
    ))
    .await;
    app.wait_incidents("waiting", |l| l.len() == 1 && l[0]["phase"] == "waiting")
        .await;
    app.post_webhook(&payload(
        "resolved",
        vec![alert("HighErrorRate", "portal-api", "pd01", &starts, Some(&ago(0)))],
    ))
    .await;
    let list = app
        .wait_incidents("cancelled and closed", |l| {
            l[0]["phase"] == "cancelled" && l[0]["open"] == false
        })
        .await;
    // Everything the incident will ever send was queued with its changes: no PagerDuty.
    let msgs = app
        .responder
        .store
        .messages(&IncidentId(list[0]["id"].as_str().unwrap().to_string()))
        .await
        .unwrap();
    let pd: Vec<&Value> = msgs.iter().filter(|m| m["channel"] == "pagerduty").collect();
    assert!(pd.is_empty(), "{pd:#?}");
    assert!(
        msgs.iter().any(|m| m["channel"] == "slack"),
        "the closing was told: {msgs:#?}"
    );
    assert!(received(&peers.pagerduty).await.is_empty());
    assert_eq!(
        weights(&fx.listener_actions().await)[0].1,
        75,
        "nothing was rolled back"
    );
}
