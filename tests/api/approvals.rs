//! Human approvals: signed Slack commands and button clicks, PagerDuty webhooks and workflow
//! actions, against the real service with wiremock Slack/PagerDuty/Statuspage and moto.

use std::time::Duration;

use hmac::{Hmac, Mac};
use rollback_responder::action::alb::AlbExecutor;
use rollback_responder::action::Executors;
use serde_json::{json, Value};
use sha2::Sha256;
use wiremock::matchers::{method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;
use crate::notify::{received, wait_requests, Peers};
use crate::pagerduty::{pd_event, pd_post};
use crate::peers::Alertmanager;
use crate::support::alb_fixture::{elb_client, fast_settings, weights, AlbFixture};
use crate::support::aws_proxy::AwsProxy;

const SIGNING_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
pub(crate) const PD_SECRET: &str = "pd-webhook-secret";
pub(crate) const PD_ACTION_TOKEN: &str = "pd-action-token";

fn policy(fx: &AlbFixture, required: u8, timeout: &str) -> String {
    format!(
        r##"
name: portal-api
service: portal-api
matchers: ['service="portal-api"']
target:
  alb:
    listener_arn: {listener}
    stable_target_group_arn: {stable}
triggers:
  - name: p95-latency
    matchers: ['alertname="HighLatency"']
    mode: manual
approval:
  approvers:
    slack_users: [U0APPROVER, U0SECOND]
    slack_groups: [S0SRE]
    pagerduty_users: [P0ONCALL]
  required_approvals: {required}
  timeout: {timeout}
  on_timeout: escalate
verification: {{bake: 1s, interval: 200ms}}
notify:
  slack: {{channel: "#portal-alerts"}}
  pagerduty: {{severity: critical}}
"##,
        listener = fx.listener_arn,
        stable = fx.stable_tg
    )
}

pub(crate) struct World {
    pub(crate) fx: AlbFixture,
    pub(crate) peers: Peers,
    pub(crate) app: TestApp,
    /// In front of moto: every ELBv2 call the service made.
    pub(crate) aws: AwsProxy,
}

pub(crate) async fn world(required: u8, timeout: &str) -> World {
    let fx = AlbFixture::start().await;
    let peers = Peers::start().await;
    Mock::given(method("GET"))
        .and(path("/usergroups.users.list"))
        .and(query_param("usergroup", "S0SRE"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"ok": true, "users": ["U0GROUPIE"]})))
        .mount(&peers.slack)
        .await;
    let mut vars = peers.env();
    vars.extend(env(&[
        ("ROLLBACK_RESPONDER__SLACK__SIGNING_SECRET", SIGNING_SECRET),
        (
            "ROLLBACK_RESPONDER__PAGERDUTY__WEBHOOK_SECRETS",
            &format!("old-secret,{PD_SECRET}"),
        ),
        ("ROLLBACK_RESPONDER__PAGERDUTY__ACTION_TOKEN", PD_ACTION_TOKEN),
    ]));
    let aws = AwsProxy::start(&fx.moto.endpoint, 1).await;
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", policy(&fx, required, timeout))],
        env: vars,
        executors: Some(Executors {
            alb: Some(AlbExecutor::new(elb_client(aws.endpoint(0)), &fast_settings())),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    World { fx, peers, app, aws }
}

impl World {
    pub(crate) async fn pending(&self, fingerprint: &str) -> String {
        self.app
            .post_webhook(&payload(
                "firing",
                vec![alert("HighLatency", "portal-api", fingerprint, &ago(60), None)],
            ))
            .await;
        let list = self
            .app
            .wait_incidents("awaiting approval", |l| {
                l.iter().any(|i| i["phase"] == "awaiting_approval")
            })
            .await;
        list[0]["id"].as_str().unwrap().to_string()
    }

    pub(crate) async fn phase(&self, id: &str) -> String {
        self.app.incident(id).await["phase"].as_str().unwrap().to_string()
    }

    /// What moto holds now and how often the service wrote it: the listener's (group, weight)
    /// pairs and the number of ModifyListener calls that reached moto.
    pub(crate) async fn alb(&self) -> (Vec<(String, i32)>, usize) {
        (
            weights(&self.fx.listener_actions().await),
            self.aws.count("ModifyListener"),
        )
    }

    /// The listener as created (75/25), never written.
    pub(crate) fn untouched(&self) -> (Vec<(String, i32)>, usize) {
        (self.split(75, 25), 0)
    }

    /// The listener rolled back by exactly one write.
    pub(crate) fn rolled_back_once(&self) -> (Vec<(String, i32)>, usize) {
        (self.split(100, 0), 1)
    }

    pub(crate) fn split(&self, stable: i32, canary: i32) -> Vec<(String, i32)> {
        vec![(self.fx.stable_tg.clone(), stable), (self.fx.canary_tg.clone(), canary)]
    }

    /// Waits until Slack holds a thread reply containing `text`: the incident's change was
    /// committed and its notifications delivered.
    pub(crate) async fn slack_says(&self, text: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let said = self.peers.slack_fake.messages().iter().any(|m| m.text.contains(text));
            if said {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "Slack never got {text:?}: {:#?}",
                self.peers.slack_fake.messages()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn sign(secret: &str, ts: &str, body: &str) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    m.update(format!("v0:{ts}:{body}").as_bytes());
    format!("v0={}", hex::encode(m.finalize().into_bytes()))
}

fn now_ts() -> String {
    chrono::Utc::now().timestamp().to_string()
}

async fn slack_post(app: &TestApp, route: &str, body: &str, ts: &str, signature: &str) -> reqwest::Response {
    app.http
        .post(app.url(route))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-slack-request-timestamp", ts)
        .header("x-slack-signature", signature)
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

/// A signed slash command; returns the ephemeral text.
pub(crate) async fn command(app: &TestApp, user: &str, text: &str) -> String {
    let body = serde_urlencoded::to_string([
        ("command", "/rollback"),
        ("text", text),
        ("user_id", user),
        ("channel_id", "C0ALERTS"),
        ("response_url", "http://127.0.0.1:9/unused"),
        ("token", "legacy-ignored"),
        // Slack makes every request unique with its trigger_id (and so its signature).
        ("trigger_id", &uuid::Uuid::now_v7().to_string()),
    ])
    .unwrap();
    let ts = now_ts();
    let r = slack_post(app, "/slack/commands", &body, &ts, &sign(SIGNING_SECRET, &ts, &body)).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["response_type"], "ephemeral");
    v["text"].as_str().unwrap().to_string()
}

fn click_body(user: &str, action: &str, id: &str, response_url: &str) -> String {
    let payload = json!({
        "type": "block_actions", "user": {"id": user, "username": "someone", "team_id": "T0"},
        "api_app_id": "A0", "container": {"type": "message", "message_ts": "1763790000.000100", "channel_id": "C0ALERTS"},
        "channel": {"id": "C0ALERTS", "name": "portal-alerts"}, "response_url": response_url, "trigger_id": uuid::Uuid::now_v7().to_string(),
        "actions": [{"type": "button", "action_id": action, "block_id": "b1", "value": id, "action_ts": "1763790001.0"}],
    });
    serde_urlencoded::to_string([("payload", payload.to_string())]).unwrap()
}

/// A signed button click; the answer to the user arrives at `response_url` (a wiremock).
async fn click(app: &TestApp, user: &str, action: &str, id: &str, response_url: &str) -> reqwest::StatusCode {
    let body = click_body(user, action, id, response_url);
    let ts = now_ts();
    slack_post(
        app,
        "/slack/interactions",
        &body,
        &ts,
        &sign(SIGNING_SECRET, &ts, &body),
    )
    .await
    .status()
}

async fn response_url() -> MockServer {
    let m = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_string("ok"))
        .mount(&m)
        .await;
    m
}

async fn replies(m: &MockServer, n: usize) -> Vec<String> {
    wait_requests(m, n, "response_url")
        .await
        .iter()
        .map(|r| r.2["text"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test]
async fn a_signed_approve_click_rolls_back_and_the_clicker_is_told() {
    let w = world(1, "1h").await;
    let id = w.pending("ea01").await;
    let ru = response_url().await;
    assert_eq!(
        click(
            &w.app,
            "U0APPROVER",
            "rollback_approve",
            &id,
            &format!("{}/r", ru.uri())
        )
        .await,
        200
    );
    w.app.wait_incidents("verified", |l| l[0]["phase"] == "verified").await;
    assert_eq!(w.alb().await, w.rolled_back_once());
    let texts = replies(&ru, 1).await;
    assert!(texts[0].starts_with(":white_check_mark: Approved"), "{texts:?}");
    let r = &received(&ru).await[0].2;
    assert_eq!(
        (r["response_type"].as_str(), r["replace_original"].as_bool()),
        (Some("ephemeral"), Some(false))
    );
    let inc = w.app.incident(&id).await;
    let approved = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "approved")
        .unwrap();
    assert_eq!(approved["summary"], "approved by <@U0APPROVER> via slack button");
    assert_eq!(approved["actor"], "slack:U0APPROVER");
}

#[tokio::test]
async fn deny_by_command_closes_the_request_and_nothing_is_rolled_back() {
    let w = world(1, "1h").await;
    let id = w.pending("eb01").await;
    let text = command(&w.app, "U0APPROVER", &format!("deny {id} error budget is fine")).await;
    assert!(text.starts_with(":no_entry_sign: Denied"), "{text}");
    assert_eq!(w.phase(&id).await, "denied");
    let inc = w.app.incident(&id).await;
    let denied = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "denied")
        .unwrap();
    assert_eq!(
        denied["summary"],
        "denied by <@U0APPROVER> via slack command: error budget is fine"
    );
    // The denial is committed and told in the thread; moto was never called at all.
    w.slack_says("`awaiting_approval` → `denied`").await;
    assert_eq!(w.alb().await, w.untouched());
    assert_eq!(w.aws.calls(), vec![], "no ELBv2 call for a denied rollback");
}

#[tokio::test]
async fn bad_signatures_stale_timestamps_and_replays_get_401_and_change_nothing() {
    let w = world(1, "1h").await;
    let id = w.pending("ec01").await;
    let before = w.app.incident(&id).await;
    let body = click_body("U0APPROVER", "rollback_approve", &id, "http://127.0.0.1:9/r");
    let ts = now_ts();
    let wrong = sign("not-the-secret", &ts, &body);
    assert_eq!(
        slack_post(&w.app, "/slack/interactions", &body, &ts, &wrong)
            .await
            .status(),
        401
    );
    assert_eq!(
        slack_post(&w.app, "/slack/interactions", &body, &ts, "").await.status(),
        401
    );
    let tampered = body.replace("U0APPROVER", "U0APPROVES");
    assert_eq!(
        slack_post(
            &w.app,
            "/slack/interactions",
            &tampered,
            &ts,
            &sign(SIGNING_SECRET, &ts, &body)
        )
        .await
        .status(),
        401
    );
    let stale = (chrono::Utc::now().timestamp() - 301).to_string();
    assert_eq!(
        slack_post(
            &w.app,
            "/slack/interactions",
            &body,
            &stale,
            &sign(SIGNING_SECRET, &stale, &body)
        )
        .await
        .status(),
        401
    );
    // Each refusal was answered before anything was done: the incident is as it was.
    let inc = w.app.incident(&id).await;
    assert_eq!(inc["phase"], "awaiting_approval");
    assert_eq!(inc["timeline"], before["timeline"], "a refused request records nothing");
    // A deny is signed and accepted once; its replay is refused even though the signature is valid.
    let deny = click_body("U0APPROVER", "rollback_deny", &id, "http://127.0.0.1:9/r");
    let sig = sign(SIGNING_SECRET, &ts, &deny);
    assert_eq!(
        slack_post(&w.app, "/slack/interactions", &deny, &ts, &sig)
            .await
            .status(),
        200
    );
    assert_eq!(
        slack_post(&w.app, "/slack/interactions", &deny, &ts, &sig)
            .await
            .status(),
        401
    );
    let cmd = serde_urlencoded::to_string([("text", "list"), ("user_id", "U0APPROVER")]).unwrap();
    assert_eq!(
        slack_post(&w.app, "/slack/commands", &cmd, &ts, "v0=00").await.status(),
        401
    );
    // A click is answered at once and decided in the background: wait for the decision.
    let inc = w.app.wait_incident(&id, "denied", |i| i["phase"] == "denied").await;
    assert_eq!(timeline_count(&inc, "denied"), 1, "the replay decided nothing");
    w.slack_says("`awaiting_approval` → `denied`").await;
    assert_eq!(w.alb().await, w.untouched());
}

#[tokio::test]
async fn unauthorized_users_are_refused_and_the_attempt_is_recorded() {
    let w = world(1, "1h").await;
    let id = w.pending("ed01").await;
    let text = command(&w.app, "U0INTRUDER", &format!("approve {id}")).await;
    assert_eq!(
        text,
        ":warning: <@U0INTRUDER> may not approve or deny rollbacks of policy portal-api"
    );
    let ru = response_url().await;
    click(
        &w.app,
        "U0INTRUDER",
        "rollback_approve",
        &id,
        &format!("{}/r", ru.uri()),
    )
    .await;
    assert!(replies(&ru, 1).await[0].contains("may not approve"));
    let inc = w.app.incident(&id).await;
    let refused: Vec<&Value> = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "approval_refused")
        .collect();
    assert_eq!(refused.len(), 2);
    assert_eq!(refused[0]["actor"], "slack:U0INTRUDER");
    assert_eq!(w.phase(&id).await, "awaiting_approval");
    // Members of an approver user group may approve.
    assert_eq!(w.alb().await, w.untouched(), "refused attempts change nothing");
    let text = command(&w.app, "U0GROUPIE", &format!("approve {id}")).await;
    assert!(text.starts_with(":white_check_mark: Approved"), "{text}");
    w.app.wait_incident(&id, "verified", |i| i["phase"] == "verified").await;
    assert_eq!(w.alb().await, w.rolled_back_once());
}

#[tokio::test]
async fn unknown_ids_double_clicks_and_late_answers_make_one_decision() {
    let w = world(1, "1h").await;
    assert_eq!(
        command(&w.app, "U0APPROVER", "approve 01nothing").await,
        ":warning: there is no incident 01nothing"
    );
    let id = w.pending("ee01").await;
    // Two approvers click at the same moment: one decision.
    let text = format!("approve {id}");
    let (a, b) = tokio::join!(command(&w.app, "U0APPROVER", &text), command(&w.app, "U0SECOND", &text));
    let approved = [&a, &b]
        .iter()
        .filter(|t| t.starts_with(":white_check_mark: Approved"))
        .count();
    assert_eq!(approved, 1, "{a} / {b}");
    assert!(
        [&a, &b].iter().any(|t| t.contains("is not waiting for approval")),
        "{a} / {b}"
    );
    // The same person twice.
    let again = command(&w.app, "U0APPROVER", &format!("approve {id}")).await;
    assert!(
        again.contains("is not waiting for approval") || again.contains("already voted"),
        "{again}"
    );
    w.app.wait_incidents("verified", |l| l[0]["phase"] == "verified").await;
    let inc = w.app.incident(&id).await;
    let decisions = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "approved")
        .count();
    assert_eq!(decisions, 1);
    assert_eq!(
        inc["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "action_started")
            .count(),
        1
    );
    // One decision, one write to the ALB.
    assert_eq!(w.alb().await, w.rolled_back_once());
}

#[tokio::test]
async fn after_the_request_escalated_an_approve_rolls_back_by_hand() {
    let w = world(1, "1s").await;
    let id = w.pending("ef01").await;
    w.app
        .wait_incident(&id, "escalated on timeout", |i| i["phase"] == "escalated")
        .await;
    assert_eq!(
        weights(&w.fx.listener_actions().await)[0].1,
        75,
        "nothing automatic after the escalation"
    );
    // Issue 18 case 3: the approver is not told "already open"; the rollback runs.
    let text = command(&w.app, "U0APPROVER", &format!("approve {id}")).await;
    let inc = w
        .app
        .wait_incident(&id, "rolled back by hand", |i| i["phase"] == "verified")
        .await;
    assert_eq!(weights(&w.fx.listener_actions().await)[0].1, 100, "{text}");
    let by_hand = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "human_rollback")
        .unwrap_or_else(|| panic!("{inc}"));
    assert_eq!(by_hand["actor"], "slack:U0APPROVER");
    assert_eq!(by_hand["phase_from"], "escalated");
    // Exactly one write to the ALB, by hand.
    assert_eq!(w.alb().await, w.rolled_back_once());
}

#[tokio::test]
async fn a_resolved_alert_cancels_the_request_and_updates_the_buttons() {
    let w = world(1, "1h").await;
    let starts = ago(60);
    w.app
        .post_webhook(&payload(
            "firing",
            vec![alert("HighLatency", "portal-api", "eg01", &starts, None)],
        ))
        .await;
    let list = w
        .app
        .wait_incidents("pending", |l| l.len() == 1 && l[0]["phase"] == "awaiting_approval")
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    w.app
        .post_webhook(&payload(
            "resolved",
            vec![alert("HighLatency", "portal-api", "eg01", &starts, Some(&ago(0)))],
        ))
        .await;
    w.app
        .wait_incident(&id, "cancelled", |i| i["phase"] == "cancelled")
        .await;
    let text = command(&w.app, "U0APPROVER", &format!("approve {id}")).await;
    assert!(text.contains("is not waiting for approval (it is cancelled)"), "{text}");
    // The incident message was updated in place without its buttons.
    let slack = wait_requests(&w.peers.slack, 5, "slack").await;
    let update = slack
        .iter()
        .rev()
        .find(|r| r.1 == "/chat.update")
        .expect("root updated");
    assert!(
        update.2["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["type"] != "actions"),
        "{}",
        update.2
    );
    assert!(update.2["text"].as_str().unwrap().contains("cancelled"));
}

#[tokio::test]
async fn a_two_person_rule_needs_two_distinct_approvers() {
    let w = world(2, "1h").await;
    let id = w.pending("eh01").await;
    let first = command(&w.app, "U0APPROVER", &format!("approve {id}")).await;
    assert!(first.starts_with(":ballot_box_with_check: Counted (1 of 2)"), "{first}");
    let again = command(&w.app, "U0APPROVER", &format!("approve {id}")).await;
    assert_eq!(again, format!(":warning: <@U0APPROVER> already voted on incident {id}"));
    assert_eq!(w.phase(&id).await, "awaiting_approval");
    assert_eq!(w.alb().await, w.untouched(), "one approver moves nothing");
    let second = command(&w.app, "U0SECOND", &format!("approve {id}")).await;
    assert!(second.starts_with(":white_check_mark: Approved"), "{second}");
    w.app.wait_incidents("verified", |l| l[0]["phase"] == "verified").await;
    assert_eq!(w.alb().await, w.rolled_back_once());
    let inc = w.app.incident(&id).await;
    let approved = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "approved")
        .unwrap();
    assert_eq!(
        approved["summary"],
        "approved by <@U0APPROVER> and <@U0SECOND> via slack command"
    );
}

mod commands;
