use std::sync::{Arc, Mutex};

use rollback_responder::action::Executors;
use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use super::*;
use crate::helpers::*;
use crate::notify::{policy_with_notify, received, wait_requests};

/// Statuspage's create: takes the incident, but answers too late for the caller.
struct SlowCreate(Arc<Mutex<Vec<Value>>>);

impl Respond for SlowCreate {
    fn respond(&self, r: &Request) -> ResponseTemplate {
        self.0
            .lock()
            .unwrap()
            .push(serde_json::from_slice(&r.body).unwrap_or(Value::Null));
        ResponseTemplate::new(201)
            .set_body_json(json!({"id": "sp-inc-1"}))
            .set_delay(Duration::from_secs(3))
    }
}

/// Statuspage's unresolved incidents: the ones created so far.
struct Unresolved(Arc<Mutex<Vec<Value>>>);

impl Respond for Unresolved {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let list: Vec<Value> = self
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|b| json!({"id": "sp-inc-1", "name": b["incident"]["name"], "metadata": b["incident"]["metadata"]}))
            .collect();
        ResponseTemplate::new(200).set_body_json(list)
    }
}

#[tokio::test]
async fn a_status_page_create_that_timed_out_is_found_not_sent_again() {
    let fx = AlbFixture::start().await;
    let created = Arc::new(Mutex::new(Vec::new()));
    let sp = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/pages/PAGE1/incidents"))
        .respond_with(SlowCreate(created.clone()))
        .mount(&sp)
        .await;
    Mock::given(method("GET"))
        .and(path("/pages/PAGE1/incidents/unresolved"))
        .respond_with(Unresolved(created.clone()))
        .mount(&sp)
        .await;
    Mock::given(method("PATCH"))
        .and(path("/pages/PAGE1/incidents/sp-inc-1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "sp-inc-1"})))
        .mount(&sp)
        .await;
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", policy_with_notify(&fx, "auto"))],
        env: env(&[
            ("ROLLBACK_RESPONDER__STATUSPAGE__API_URL", &sp.uri()),
            ("ROLLBACK_RESPONDER__STATUSPAGE__API_KEY", "sp-api-key"),
            ("ROLLBACK_RESPONDER__STATUSPAGE__PAGE_ID", "PAGE1"),
            ("ROLLBACK_RESPONDER__NOTIFICATIONS__TIMEOUT", "1s"),
            ("ROLLBACK_RESPONDER__NOTIFICATIONS__INITIAL_BACKOFF", "50ms"),
            ("ROLLBACK_RESPONDER__NOTIFICATIONS__MAX_BACKOFF", "300ms"),
        ]),
        executors: Some(Executors {
            alb: Some(fx.executor()),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "rc01", &ago(60), None)],
    ))
    .await;
    let list = app
        .wait_incidents("verified", |l| l.len() == 1 && l[0]["phase"] == "verified")
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    // create (timed out), look-up, then the verified update on the incident it found.
    let reqs = wait_requests(&sp, 3, "statuspage").await;
    let seen: Vec<(String, String)> = reqs.iter().map(|(m, p, _, _)| (m.clone(), p.clone())).collect();
    assert_eq!(
        seen,
        vec![
            ("POST".to_string(), "/pages/PAGE1/incidents".to_string()),
            ("GET".to_string(), "/pages/PAGE1/incidents/unresolved".to_string()),
            ("PATCH".to_string(), "/pages/PAGE1/incidents/sp-inc-1".to_string()),
        ]
    );
    assert_eq!(
        reqs[0].2["incident"]["metadata"],
        json!({"rollback_responder": {"incident_id": id}})
    );
    assert_eq!(reqs[2].2["incident"]["status"], "monitoring");
    assert_eq!(created.lock().unwrap().len(), 1, "one public incident");
    // The last PATCH has been answered, but its delivery is recorded just after.
    app.wait_outbox_drained().await;
    let msgs = app
        .responder
        .store
        .messages(&rollback_responder::incident::IncidentId(id))
        .await
        .unwrap();
    let sp_msgs: Vec<&Value> = msgs.iter().filter(|m| m["channel"] == "statuspage").collect();
    assert!(sp_msgs.iter().all(|m| m["state"] == "delivered"), "{sp_msgs:#?}");
    assert_eq!(received(&sp).await.len(), 3);
}
