//! Due times: what is held is looked at again when its hold can have changed, and nothing
//! that is over stays due. A person's close ends an incident's due time.

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
