use std::sync::{Arc, Mutex};

use rollback_responder::action::Executors;
use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use super::*;
use crate::helpers::*;
use crate::notify::{policy_with_notify, received, SLACK_TOKEN};

const TS: &str = "1763790000.000100";

/// chat.postMessage: the incident's first post is taken but answered too late for the
/// caller; thread replies are answered at once.
struct SlowFirstPost(Arc<Mutex<Vec<Value>>>);

impl Respond for SlowFirstPost {
    fn respond(&self, r: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        let ok = ResponseTemplate::new(200).set_body_json(json!({"ok": true, "channel": "C0ALERTS", "ts": TS}));
        if body.get("thread_ts").is_some() {
            return ok;
        }
        self.0.lock().unwrap().push(body);
        ok.set_delay(Duration::from_secs(3))
    }
}

/// conversations.history: the incident posts made so far, with their metadata.
struct History(Arc<Mutex<Vec<Value>>>);

impl Respond for History {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let messages: Vec<Value> = self
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|b| json!({"type": "message", "ts": TS, "text": b["text"], "metadata": b["metadata"]}))
            .collect();
        ResponseTemplate::new(200).set_body_json(json!({"ok": true, "messages": messages}))
    }
}

#[tokio::test]
async fn a_slack_post_that_timed_out_is_found_not_posted_again() {
    let fx = AlbFixture::start().await;
    let posts = Arc::new(Mutex::new(Vec::new()));
    let slack = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/chat.postMessage"))
        .respond_with(SlowFirstPost(posts.clone()))
        .mount(&slack)
        .await;
    Mock::given(method("POST"))
        .and(path("/chat.update"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"ok": true})))
        .mount(&slack)
        .await;
    Mock::given(method("GET"))
        .and(path("/conversations.list"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "ok": true,
            "channels": [{"id": "C0OTHER", "name": "general"}, {"id": "C0ALERTS", "name": "portal-alerts"}],
            "response_metadata": {"next_cursor": ""},
        })))
        .mount(&slack)
        .await;
    Mock::given(method("GET"))
        .and(path("/conversations.history"))
        .respond_with(History(posts.clone()))
        .mount(&slack)
        .await;
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", policy_with_notify(&fx, "auto"))],
        env: env(&[
            ("ROLLBACK_RESPONDER__SLACK__API_URL", &slack.uri()),
            ("ROLLBACK_RESPONDER__SLACK__BOT_TOKEN", SLACK_TOKEN),
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
        vec![alert("HighErrorRate", "portal-api", "rp01", &ago(60), None)],
    ))
    .await;
    let list = app
        .wait_incidents("verified", |l| l.len() == 1 && l[0]["phase"] == "verified")
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    // Wait until every Slack message of the incident so far is delivered.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let msgs = app
            .responder
            .store
            .messages(&rollback_responder::incident::IncidentId(id.clone()))
            .await
            .unwrap();
        if msgs
            .iter()
            .filter(|m| m["channel"] == "slack")
            .all(|m| m["state"] == "delivered")
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{msgs:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reqs = received(&slack).await;
    let roots: Vec<&Value> = reqs
        .iter()
        .filter(|(m, p, b, _)| m == "POST" && p == "/chat.postMessage" && b.get("thread_ts").is_none())
        .map(|r| &r.2)
        .collect();
    assert_eq!(roots.len(), 1, "one incident message: {roots:#?}");
    assert_eq!(
        roots[0]["metadata"],
        json!({"event_type": "rollback_responder_incident", "event_payload": {"incident_id": id}})
    );
    let gets: Vec<String> = reqs
        .iter()
        .filter(|(m, ..)| m == "GET")
        .map(|(_, p, _, r)| format!("{p}?{}", r.url.query().unwrap_or("")))
        .collect();
    assert_eq!(gets.len(), 2, "{gets:#?}");
    assert!(gets[0].starts_with("/conversations.list?"), "{gets:#?}");
    assert_eq!(
        gets[1],
        "/conversations.history?channel=C0ALERTS&limit=200&include_all_metadata=true"
    );
    // Everything after it went to the thread of the message found.
    let replies: Vec<&Value> = reqs
        .iter()
        .filter(|(m, p, b, _)| m == "POST" && p == "/chat.postMessage" && b.get("thread_ts").is_some())
        .map(|r| &r.2)
        .collect();
    assert!(!replies.is_empty());
    for r in replies {
        assert_eq!(
            (r["channel"].as_str(), r["thread_ts"].as_str()),
            (Some("C0ALERTS"), Some(TS)),
            "{r}"
        );
    }
}
