//! Due times: what is held is looked at again when its hold can have changed, and nothing
//! that is over stays due. A person's close ends an incident's due time; a freeze of the
//! config file that a restart removed releases what it held, with no new delivery.

use serde_json::{json, Value};

use crate::helpers::*;

/// A rollback held by a freeze with an end is due when the freeze ends; a person who closes
/// the incident first ends that due time with it.
#[tokio::test]
async fn a_held_incident_closed_by_a_person_keeps_no_due_time() {
    let app = spawn_app(Options {
        env: env(&[("ROLLBACK_RESPONDER__API__BEARER_TOKEN", "operator-token")]),
        ..Options::default()
    })
    .await;
    let r = app
        .http
        .post(app.url("/api/v1/freezes"))
        .bearer_auth("operator-token")
        .json(&json!({"reason": "database failover in progress", "duration": "1h", "by": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "checkout", "dd01", &ago(60), None)],
    ))
    .await;
    let list = app
        .wait_incidents("held", |l| l.len() == 1 && l[0]["phase"] == "suppressed")
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    assert!(list[0]["due_at"].is_string(), "due when the freeze ends: {}", list[0]);

    let r = app
        .http
        .post(app.url(&format!("/api/v1/incidents/{id}/close")))
        .bearer_auth("operator-token")
        .json(&json!({"note": "rolled back by hand", "by": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["result"], "closed");
    let inc = app.incident(&id).await;
    assert_eq!(inc["open"], false);
    assert_eq!(inc["due_at"], Value::Null, "closed, nothing is due: {inc}");
}

/// A global freeze set in the config file holds an automatic rollback with no end (it ends
/// only with the config); started again without it on the same store, the service decides
/// the held incident again on its own: Alertmanager's re-sends of a firing alert are
/// duplicates and would wake nothing.
#[tokio::test]
async fn a_config_freeze_removed_by_a_restart_releases_what_it_held() {
    let app = spawn_app(Options {
        env: env(&[("ROLLBACK_RESPONDER__SAFETY__FREEZE__GLOBAL", "true")]),
        ..Options::default()
    })
    .await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "checkout", "dd02", &ago(60), None)],
    ))
    .await;
    let list = app
        .wait_incidents("held", |l| l.len() == 1 && l[0]["phase"] == "suppressed")
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    assert_eq!(list[0]["decision"]["kind"], "frozen", "{}", list[0]);
    assert_eq!(list[0]["due_at"], Value::Null, "a config freeze has no end");

    let app = app.restart(Options::default()).await;
    let list = app
        .wait_incidents("decided again without the freeze", |l| {
            l.len() == 1 && l[0]["phase"] == "dry_run"
        })
        .await;
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["decision"]["kind"], "dry_run", "{}", list[0]);
    let inc = app.incident(&id).await;
    assert_eq!(inc["alerts"].as_array().unwrap().len(), 1, "no new delivery: {inc}");
}
