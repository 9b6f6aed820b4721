//! Slack, PagerDuty and Statuspage as wiremock servers on loopback: the exact requests for an
//! automatic and a manual incident, a Slack outage that never delays the rollback, and a
//! restart with notifications pending.

use std::time::{Duration, Instant};

use rollback_responder::action::Executors;
use serde_json::{json, Value};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use crate::helpers::*;
use crate::support::alb_fixture::{elb_client, fast_settings, weights, AlbFixture};
use crate::support::aws_proxy::AwsProxy;
use crate::support::fake_notify::{slack_channel_id, slack_ts, PagerDutyFake, SlackFake, StatuspageFake};
use rollback_responder::action::alb::AlbExecutor;

pub const SLACK_TOKEN: &str = "xoxb-test-token";
pub const PD_KEY: &str = "R0UTINGKEY0000000000000000000000";
pub const SP_KEY: &str = "sp-api-key";

/// The three peers, answering like the real APIs: from the state earlier requests created.
pub struct Peers {
    pub slack: MockServer,
    pub pagerduty: MockServer,
    pub statuspage: MockServer,
    /// Slack's messages so far (each with its own `ts`).
    pub slack_fake: SlackFake,
    /// The status page incidents created so far.
    pub statuspage_fake: StatuspageFake,
}

impl Peers {
    pub async fn start() -> Peers {
        let (slack, slack_fake) = SlackFake::start().await;
        let pagerduty = MockServer::start().await;
        PagerDutyFake::mount(&pagerduty).await;
        let statuspage = MockServer::start().await;
        let statuspage_fake = StatuspageFake::mount(&statuspage, "PAGE1").await;
        Peers {
            slack,
            pagerduty,
            statuspage,
            slack_fake,
            statuspage_fake,
        }
    }

    pub fn env(&self) -> Vec<(String, String)> {
        env(&[
            ("ROLLBACK_RESPONDER__SLACK__API_URL", &self.slack.uri()),
            ("ROLLBACK_RESPONDER__SLACK__BOT_TOKEN", SLACK_TOKEN),
            ("ROLLBACK_RESPONDER__PAGERDUTY__EVENTS_URL", &self.pagerduty.uri()),
            ("ROLLBACK_RESPONDER__PAGERDUTY__ROUTING_KEY", PD_KEY),
            ("ROLLBACK_RESPONDER__STATUSPAGE__API_URL", &self.statuspage.uri()),
            ("ROLLBACK_RESPONDER__STATUSPAGE__API_KEY", SP_KEY),
            ("ROLLBACK_RESPONDER__STATUSPAGE__PAGE_ID", "PAGE1"),
            ("ROLLBACK_RESPONDER__NOTIFICATIONS__INITIAL_BACKOFF", "50ms"),
            ("ROLLBACK_RESPONDER__NOTIFICATIONS__MAX_BACKOFF", "300ms"),
        ])
    }
}

/// Requests a mock server received, as (method, path, json body).
pub async fn received(server: &MockServer) -> Vec<(String, String, Value, Request)> {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|r| {
            (
                r.method.to_string(),
                r.url.path().to_string(),
                serde_json::from_slice(&r.body).unwrap_or(Value::Null),
                r,
            )
        })
        .collect()
}

/// Polls until `server` has received at least `n` requests. To assert that no more came,
/// wait for the service's outbox to drain first ([`TestApp::wait_outbox_drained`]).
pub async fn wait_requests(server: &MockServer, n: usize, what: &str) -> Vec<(String, String, Value, Request)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = received(server).await;
        if got.len() >= n {
            return got;
        }
        if Instant::now() > deadline {
            let paths: Vec<String> = got.iter().map(|(m, p, b, _)| format!("{m} {p} {b}")).collect();
            panic!(
                "{what}: expected {n} requests, got {}:\n{}",
                got.len(),
                paths.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn policy_with_notify(fx: &AlbFixture, mode: &str) -> String {
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
  - name: errors
    matchers: ['alertname="HighErrorRate"']
    mode: {mode}
approval:
  approvers: {{slack_users: [U0APPROVER]}}
  timeout: 1h
  on_timeout: escalate
verification: {{bake: 1s, interval: 200ms}}
notify:
  slack: {{channel: "#portal-alerts"}}
  pagerduty: {{severity: error}}
  statuspage: {{components: {{cmp-portal: partial_outage}}, deliver_notifications: false}}
  escalation: {{slack_mention: "<!subteam^S0SRE>"}}
links: {{runbook: "https://runbooks.example/portal", dashboard: "https://grafana.example/d/portal"}}
"##,
        listener = fx.listener_arn,
        stable = fx.stable_tg
    )
}

fn slack_texts(reqs: &[(String, String, Value, Request)]) -> Vec<String> {
    reqs.iter()
        .map(|(_, p, b, _)| format!("{p} {}", b["text"].as_str().unwrap_or("")))
        .collect()
}

#[tokio::test]
async fn an_automatic_incident_tells_slack_pagerduty_and_statuspage_exactly() {
    let fx = AlbFixture::start().await;
    let peers = Peers::start().await;
    let aws = AwsProxy::start(&fx.moto.endpoint, 1).await;
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", policy_with_notify(&fx, "auto"))],
        env: peers.env(),
        executors: Some(Executors {
            alb: Some(AlbExecutor::new(elb_client(aws.endpoint(0)), &fast_settings())),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    let starts = ago(60);
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "ca01", &starts, None)],
    ))
    .await;
    let list = app
        .wait_incidents("verified", |l| l.len() == 1 && l[0]["phase"] == "verified")
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    assert_eq!(weights(&fx.listener_actions().await)[0].1, 100);
    assert_eq!(aws.count("ModifyListener"), 1);
    app.post_webhook(&payload(
        "resolved",
        vec![alert("HighErrorRate", "portal-api", "ca01", &starts, Some(&ago(0)))],
    ))
    .await;
    app.wait_incidents("closed", |l| l[0]["open"] == false).await;
    app.wait_outbox_drained().await;

    // Slack: the root message, its thread, root updates as the phase changes.
    let slack = wait_requests(&peers.slack, 12, "slack").await;
    for (m, _, _, r) in &slack {
        assert_eq!(m, "POST");
        assert_eq!(
            r.headers.get("authorization").unwrap().to_str().unwrap(),
            format!("Bearer {SLACK_TOKEN}")
        );
    }
    let texts = slack_texts(&slack);
    let expected_prefixes = [
        "/chat.postMessage :rewind: Rollback executing: portal-api: HighErrorRate",
        "/chat.postMessage *Decision:* `auto`",
        "/chat.postMessage rolling back: forward 100 %",
        // Each write reaches the thread as it happens.
        "/chat.postMessage ModifyListener written: 100% to stable (attempt 1)",
        "/chat.update :mag: Rollback verifying",
        "/chat.postMessage :mag: `executing` → `verifying`:",
        "/chat.update :white_check_mark: Rollback verified",
        "/chat.postMessage :white_check_mark: `verifying` → `verified`",
        "/chat.postMessage HighErrorRate",
        "/chat.postMessage every alert of the incident has resolved",
        "/chat.update :white_check_mark: Rollback verified",
        "/chat.postMessage Incident closed in phase `verified`.",
    ];
    assert_eq!(texts.len(), expected_prefixes.len(), "{texts:#?}");
    for (t, e) in texts.iter().zip(expected_prefixes) {
        assert!(t.starts_with(e), "{t:?} should start with {e:?}\nall: {texts:#?}");
    }
    let root = &slack[0].2;
    assert_eq!(root["channel"], "#portal-alerts");
    assert_eq!(root["blocks"][0]["type"], "header");
    let body = root["blocks"][1]["text"]["text"].as_str().unwrap();
    assert!(
        body.contains("*Policy:* `portal-api` (trigger `errors`)") && body.contains("roll back automatically"),
        "{body}"
    );
    // Then the next steps (where to look, before anything ran), then the links and the id.
    assert_eq!(
        root["blocks"][2]["text"]["text"],
        "*Next steps*\nWhere to look: <https://runbooks.example/portal|Runbook> · <https://grafana.example/d/portal|Dashboard>"
    );
    let ctx = root["blocks"][3]["elements"][0]["text"].as_str().unwrap();
    assert!(
        ctx.contains(&format!("Incident `{id}`")) && ctx.contains("<https://runbooks.example/portal|Runbook>"),
        "{ctx}"
    );
    // Every message Slack accepted has its own ts; the root was the first. Replies hang off
    // the root (not off another reply) in the channel Slack named; updates edit the root.
    let (root_channel, root_ts) = (slack_channel_id("#portal-alerts"), slack_ts(0));
    // The root and 8 replies (the executor's write is one of them); the other 3 are updates.
    let posted = peers.slack_fake.messages();
    assert_eq!(posted.len(), 9, "{posted:#?}");
    let distinct: std::collections::BTreeSet<&String> = posted.iter().map(|m| &m.ts).collect();
    assert_eq!(distinct.len(), posted.len(), "Slack gives every message its own ts");
    assert_eq!(
        (&posted[0].channel, &posted[0].ts, &posted[0].thread_ts),
        (&root_channel, &root_ts, &None)
    );
    for m in &posted[1..] {
        assert_eq!(
            (&m.channel, m.thread_ts.as_ref()),
            (&root_channel, Some(&root_ts)),
            "replies go to the root's thread: {m:?}"
        );
    }
    for (_, p, b, _) in &slack[1..] {
        if p == "/chat.postMessage" {
            assert_eq!(b["thread_ts"], root_ts.as_str(), "replies go to the root's thread: {b}");
            assert_eq!(b["channel"], root_channel.as_str());
        } else {
            assert_eq!(
                (b["channel"].as_str(), b["ts"].as_str()),
                (Some(root_channel.as_str()), Some(root_ts.as_str()))
            );
        }
    }
    let change_summary = texts.iter().find(|t| t.contains("`executing` → `verifying`")).unwrap();
    assert!(
        change_summary.contains("forward changed from") && change_summary.contains("read back OK"),
        "{change_summary}"
    );

    // PagerDuty: trigger, acknowledge, change event, resolve; one dedup key.
    let pd = wait_requests(&peers.pagerduty, 4, "pagerduty").await;
    let dedup = format!("rollback-responder/{id}");
    let inc = app.incident(&id).await;
    assert_eq!(pd.len(), 4);
    assert_eq!(
        (pd[0].1.as_str(), pd[1].1.as_str(), pd[2].1.as_str(), pd[3].1.as_str()),
        ("/v2/enqueue", "/v2/enqueue", "/v2/change/enqueue", "/v2/enqueue")
    );
    assert_eq!(
        pd[0].2,
        json!({
            "routing_key": PD_KEY, "event_action": "trigger", "dedup_key": dedup,
            "payload": {
                "summary": format!("portal-api: HighErrorRate: auto ({})", inc["decision"]["reason"].as_str().unwrap()),
                "source": "rollback-responder", "severity": "error",
                "timestamp": pd[0].2["payload"]["timestamp"], "component": "portal-api", "group": "portal-api", "class": "HighErrorRate",
                "custom_details": {
                    "incident": id, "phase": "executing", "decision": "auto", "reason": inc["decision"]["reason"],
                    "target": inc["context"]["target"], "labels": {"alertname": "HighErrorRate", "service": "portal-api", "severity": "critical"},
                },
            },
            "links": [
                {"href": "http://alertmanager.example:9093", "text": "Alertmanager"},
                {"href": "https://runbooks.example/portal", "text": "Runbook"},
                {"href": "https://grafana.example/d/portal", "text": "Dashboard"},
            ],
            "client": "rollback-responder",
        })
    );
    assert_eq!(
        pd[1].2,
        json!({"routing_key": PD_KEY, "event_action": "acknowledge", "dedup_key": dedup})
    );
    assert_eq!(pd[2].2["routing_key"], PD_KEY);
    assert!(pd[2].2["payload"]["summary"]
        .as_str()
        .unwrap()
        .starts_with("Rollback executed by rollback-responder: forward 100 %"));
    assert_eq!(pd[2].2["payload"]["custom_details"]["detail"]["outcome"], "reverted");
    assert_eq!(
        pd[3].2,
        json!({"routing_key": PD_KEY, "event_action": "resolve", "dedup_key": dedup})
    );

    // Statuspage: created degraded once the rollback took, monitoring, resolved.
    let sp = wait_requests(&peers.statuspage, 3, "statuspage").await;
    assert_eq!(sp.len(), 3);
    for (_, _, _, r) in &sp {
        assert_eq!(
            r.headers.get("authorization").unwrap().to_str().unwrap(),
            format!("OAuth {SP_KEY}")
        );
    }
    assert_eq!((sp[0].0.as_str(), sp[0].1.as_str()), ("POST", "/pages/PAGE1/incidents"));
    assert_eq!(
        sp[0].2,
        json!({"incident": {
            "name": "portal-api: degraded service, release rolled back", "status": "identified",
            "body": "We identified a problem with the latest release of portal-api and rolled it back. We are checking that the service has recovered.",
            "component_ids": ["cmp-portal"], "components": {"cmp-portal": "partial_outage"}, "deliver_notifications": false,
            "metadata": {"rollback_responder": {"incident_id": id}},
        }})
    );
    // Both updates go to the incident the create made (the fake answers 404 for any other).
    assert_eq!(
        peers.statuspage_fake.created(),
        [(
            "sp-inc-1".to_string(),
            "portal-api: degraded service, release rolled back".to_string()
        )]
    );
    for r in &sp[1..] {
        assert_eq!(
            (r.0.as_str(), r.1.as_str()),
            ("PATCH", "/pages/PAGE1/incidents/sp-inc-1")
        );
    }
    assert_eq!(sp[1].2["incident"]["status"], "monitoring");
    assert_eq!(
        sp[2].2,
        json!({"incident": {"status": "resolved", "body": "portal-api has recovered; the faulty release stays rolled back.",
            "components": {"cmp-portal": "operational"}, "deliver_notifications": false}})
    );
    let msgs = app
        .responder
        .store
        .messages(&rollback_responder::incident::IncidentId(id))
        .await
        .unwrap();
    assert!(
        msgs.iter().all(|m| m["state"] == "delivered" && m["attempts"] == 1),
        "{msgs:#?}"
    );
}

#[tokio::test]
async fn a_manual_incident_carries_approve_and_deny_buttons() {
    let fx = AlbFixture::start().await;
    let peers = Peers::start().await;
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", policy_with_notify(&fx, "manual"))],
        env: peers.env(),
        executors: Some(Executors {
            alb: Some(fx.executor()),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "cb01", &ago(60), None)],
    ))
    .await;
    let list = app
        .wait_incidents("awaiting approval", |l| {
            l.len() == 1 && l[0]["phase"] == "awaiting_approval"
        })
        .await;
    let id = list[0]["id"].as_str().unwrap();
    app.wait_outbox_drained().await;
    let slack = wait_requests(&peers.slack, 2, "slack").await;
    assert_eq!(slack.len(), 2);
    let actions = &slack[0].2["blocks"][2];
    assert_eq!(actions["type"], "actions");
    assert_eq!(actions["elements"][0]["action_id"], "rollback_approve");
    assert_eq!(actions["elements"][0]["value"], id);
    assert_eq!(actions["elements"][0]["style"], "primary");
    assert_eq!(actions["elements"][0]["confirm"]["confirm"]["text"], "Roll back");
    assert_eq!(actions["elements"][1]["action_id"], "rollback_deny");
    assert_eq!(actions["elements"][1]["style"], "danger");
    let pd = wait_requests(&peers.pagerduty, 1, "pagerduty").await;
    assert_eq!(pd.len(), 1);
    assert_eq!(pd[0].2["event_action"], "trigger");
    assert_eq!(pd[0].2["payload"]["custom_details"]["decision"], "manual");
    // Nothing was rolled back, so the status page is left alone.
    assert!(received(&peers.statuspage).await.is_empty());
    assert_eq!(weights(&fx.listener_actions().await)[0].1, 75);
}

mod content;
mod delivery;
