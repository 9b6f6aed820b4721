//! Input at the edges that used to panic or overflow: every duration is checked arithmetic
//! answered with a 400 naming the problem, and nothing is changed.

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use crate::helpers::*;

pub const SIGNING_SECRET: &str = "edge-slack-signing-secret-0042";
pub const PD_SECRET: &str = "edge-pd-webhook-secret";
pub const PD_ACTION_TOKEN: &str = "edge-pd-action-token";
pub const API_TOKEN: &str = "edge-operator-api-token";

/// Settings that switch on every edge: Slack (signing secret; its API on a closed port),
/// PagerDuty webhooks and action, the operator API.
pub fn edge_env() -> Vec<(String, String)> {
    env(&[
        ("ROLLBACK_RESPONDER__SLACK__SIGNING_SECRET", SIGNING_SECRET),
        ("ROLLBACK_RESPONDER__SLACK__BOT_TOKEN", "xoxb-edge-test"),
        ("ROLLBACK_RESPONDER__SLACK__API_URL", "http://127.0.0.1:9"),
        ("ROLLBACK_RESPONDER__PAGERDUTY__WEBHOOK_SECRETS", PD_SECRET),
        ("ROLLBACK_RESPONDER__PAGERDUTY__ACTION_TOKEN", PD_ACTION_TOKEN),
        ("ROLLBACK_RESPONDER__API__BEARER_TOKEN", API_TOKEN),
    ])
}

/// Slack's `v0=` signature of a body at a timestamp.
pub fn slack_sign(ts: &str, body: &str) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(SIGNING_SECRET.as_bytes()).unwrap();
    m.update(format!("v0:{ts}:{body}").as_bytes());
    format!("v0={}", hex::encode(m.finalize().into_bytes()))
}

/// A signed slash command with this text; the status and the body.
pub async fn slack_command(app: &TestApp, text: &str) -> (u16, Value) {
    let body = serde_urlencoded::to_string([
        ("command", "/rollback"),
        ("text", text),
        ("user_id", "U0EDGE"),
        ("channel_id", "C0EDGE"),
        ("response_url", "http://127.0.0.1:9/unused"),
        ("trigger_id", &uuid::Uuid::now_v7().to_string()),
    ])
    .unwrap();
    let ts = chrono::Utc::now().timestamp().to_string();
    let r = app
        .http
        .post(app.url("/slack/commands"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-slack-request-timestamp", &ts)
        .header("x-slack-signature", slack_sign(&ts, &body))
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_slack_freeze_past_the_end_of_the_calendar_is_400_and_freezes_nothing() {
    let app = spawn_app(Options {
        env: edge_env(),
        ..Options::default()
    })
    .await;
    for text in [
        "freeze 1000000years",
        "freeze 1000000years checkout",
        "freeze 500000000000years",
    ] {
        let (status, body) = slack_command(&app, text).await;
        assert_eq!(status, 400, "{text}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains("past the calendar's end"), "{text}: {error}");
    }
    // Nothing was frozen, and the service still serves.
    let ready = app.get_json("/readyz").await;
    assert_eq!(ready["freezes"]["global"], Value::Null, "{ready}");
    assert_eq!(ready["freezes"]["policies"], serde_json::json!({}), "{ready}");
    let (status, body) = slack_command(&app, "help").await;
    assert_eq!(status, 200, "{body}");
}
