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

#[tokio::test]
async fn a_slack_outage_never_delays_the_rollback_and_messages_arrive_once_after() {
    let fx = AlbFixture::start().await;
    let peers = Peers::start().await;
    // Slack fails: 500s, then 429 with Retry-After, then recovers (the mounted 200s).
    let outage = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500).set_body_string("oops"))
        .up_to_n_times(4)
        .with_priority(1)
        .mount(&outage)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "1"))
        .up_to_n_times(2)
        .with_priority(2)
        .mount(&outage)
        .await;
    let recovered = SlackFake::default();
    recovered.mount(&outage, 3).await;
    let mut vars = peers.env();
    vars.retain(|(k, _)| k != "ROLLBACK_RESPONDER__SLACK__API_URL");
    vars.push(("ROLLBACK_RESPONDER__SLACK__API_URL".into(), outage.uri()));
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", policy_with_notify(&fx, "auto"))],
        env: vars,
        executors: Some(Executors {
            alb: Some(fx.executor()),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    let sent = Instant::now();
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "cc01", &ago(60), None)],
    ))
    .await;
    app.wait_incidents("verified despite slack", |l| {
        l.len() == 1 && l[0]["phase"] == "verified"
    })
    .await;
    let rollback_took = sent.elapsed();
    assert_eq!(weights(&fx.listener_actions().await)[0].1, 100);
    let slack_ok_so_far = received(&outage)
        .await
        .iter()
        .filter(|r| r.3.url.path() == "/chat.postMessage")
        .count();
    assert!(
        rollback_took < Duration::from_secs(5),
        "rollback took {rollback_took:?} during the outage"
    );

    // Eventually every message gets through, each exactly once after the failures.
    let deadline = Instant::now() + Duration::from_secs(30);
    let id = app.incidents().await[0]["id"].as_str().unwrap().to_string();
    loop {
        let msgs = app
            .responder
            .store
            .messages(&rollback_responder::incident::IncidentId(id.clone()))
            .await
            .unwrap();
        let slack: Vec<&Value> = msgs.iter().filter(|m| m["channel"] == "slack").collect();
        if slack.iter().all(|m| m["state"] == "delivered") {
            assert_eq!(slack.len(), 8, "{slack:#?}");
            assert!(
                slack[0]["attempts"].as_i64().unwrap() >= 3,
                "the first message lived through the outage: {slack:#?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "slack messages never delivered: {msgs:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Posts only: a retried first post looks for an earlier one first (GETs, answered 404 here).
    let reqs: Vec<_> = received(&outage).await.into_iter().filter(|r| r.0 == "POST").collect();
    let roots = reqs
        .iter()
        .filter(|r| r.1 == "/chat.postMessage" && r.2.get("thread_ts").is_none() && r.2.get("blocks").is_some())
        .count();
    let failed_attempts = 6;
    assert_eq!(
        reqs.len(),
        8 + failed_attempts,
        "8 messages plus the failed attempts; slack ok before recovery: {slack_ok_so_far}"
    );
    // Every failed attempt was the root message: nothing overtook it, and it succeeded once.
    assert_eq!(roots, 1 + failed_attempts, "{:#?}", slack_texts(&reqs));
    // After the outage the replies still hang off the root Slack finally accepted.
    let posted = recovered.messages();
    assert_eq!(posted[0].thread_ts, None);
    assert!(
        posted[1..].iter().all(|m| m.thread_ts.as_ref() == Some(&posted[0].ts)),
        "{posted:#?}"
    );
}

#[tokio::test]
async fn notifications_pending_at_shutdown_are_delivered_after_restart_none_twice() {
    let fx = AlbFixture::start().await;
    let peers = Peers::start().await;
    // Slack is down while the first process runs.
    let down = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&down)
        .await;
    let policy = policy_with_notify(&fx, "auto");
    let mut vars = peers.env();
    vars.retain(|(k, _)| k != "ROLLBACK_RESPONDER__SLACK__API_URL");
    let mut first_env = vars.clone();
    first_env.push(("ROLLBACK_RESPONDER__SLACK__API_URL".into(), down.uri()));
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", policy.clone())],
        env: first_env,
        executors: Some(Executors {
            alb: Some(fx.executor()),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "cd01", &ago(60), None)],
    ))
    .await;
    app.wait_incidents("verified", |l| l.len() == 1 && l[0]["phase"] == "verified")
        .await;
    let id = app.incidents().await[0]["id"].as_str().unwrap().to_string();
    let pending = app
        .responder
        .store
        .messages(&rollback_responder::incident::IncidentId(id.clone()))
        .await
        .unwrap();
    assert!(pending
        .iter()
        .any(|m| m["channel"] == "slack" && m["state"] == "pending"));
    // PagerDuty got its events once already: every PagerDuty message is delivered.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let msgs = app
            .responder
            .store
            .messages(&rollback_responder::incident::IncidentId(id.clone()))
            .await
            .unwrap();
        let pd: Vec<&Value> = msgs.iter().filter(|m| m["channel"] == "pagerduty").collect();
        if !pd.is_empty() && pd.iter().all(|m| m["state"] == "delivered") {
            break;
        }
        assert!(Instant::now() < deadline, "PagerDuty messages not delivered: {msgs:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pd_before = received(&peers.pagerduty).await.len();
    assert_eq!(pd_before, 3, "trigger, acknowledge, change");

    let mut second_env = vars;
    second_env.push(("ROLLBACK_RESPONDER__SLACK__API_URL".into(), peers.slack.uri()));
    let app = app
        .restart(Options {
            policies: vec![("portal-api.yaml", policy)],
            env: second_env,
            executors: Some(Executors {
                alb: Some(fx.executor()),
                ..Default::default()
            }),
            ..Options::default()
        })
        .await;
    // The first post failed before the restart, so it looks for an earlier one first (a GET
    // of the channel's history); then the 8 posts.
    wait_requests(&peers.slack, 9, "slack after restart").await;
    app.wait_outbox_drained().await;
    let slack: Vec<_> = received(&peers.slack)
        .await
        .into_iter()
        .filter(|r| r.0 == "POST")
        .collect();
    assert_eq!(slack.len(), 8, "{:#?}", slack_texts(&slack));
    assert_eq!(
        slack
            .iter()
            .filter(|r| r.2.get("blocks").is_some() && r.1 == "/chat.postMessage")
            .count(),
        1
    );
    assert_eq!(
        received(&peers.pagerduty).await.len(),
        pd_before,
        "nothing re-sent to PagerDuty"
    );
    let msgs = app
        .responder
        .store
        .messages(&rollback_responder::incident::IncidentId(id))
        .await
        .unwrap();
    assert!(msgs.iter().all(|m| m["state"] == "delivered"), "{msgs:#?}");
}

#[tokio::test]
async fn a_storm_of_one_alert_joins_quietly_and_each_new_kind_of_alert_is_announced_once() {
    let fx = AlbFixture::start().await;
    let peers = Peers::start().await;
    let policy = policy_with_notify(&fx, "manual").replace(
        "approval:",
        "  - name: health\n    matchers: ['alertname=\"HealthCheckFailing\"']\n    mode: manual\napproval:",
    );
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", policy)],
        env: peers.env(),
        ..Options::default()
    })
    .await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "cb00", &ago(60), None)],
    ))
    .await;
    let list = app
        .wait_incidents("awaiting approval", |l| {
            l.len() == 1 && l[0]["phase"] == "awaiting_approval"
        })
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    // Twenty more instances of the same alert, then two of another kind, in one delivery.
    let mut storm: Vec<Value> = (1..=20)
        .map(|i| alert("HighErrorRate", "portal-api", &format!("cb{i:02}"), &ago(50), None))
        .collect();
    let mut health = alert("HealthCheckFailing", "portal-api", "cc01", &ago(40), None);
    health["annotations"]["description"] = json!("GET /v1/health answered 503 <!channel>");
    storm.push(health.clone());
    // The second instance says the same (whichever of the two is announced).
    health["fingerprint"] = json!("cc02");
    storm.push(health);
    app.post_webhook(&payload("firing", storm)).await;
    app.wait_incident(&id, "every alert joined", |i| {
        i["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "alert_joined")
            .count()
            == 22
    })
    .await;
    app.wait_outbox_drained().await;
    let texts = slack_texts(&received(&peers.slack).await);
    let joined: Vec<&String> = texts.iter().filter(|t| t.contains("joined the incident")).collect();
    assert_eq!(
        joined.len(),
        1,
        "one reply for the new kind, none per instance: {texts:#?}"
    );
    assert!(joined[0].contains("HealthCheckFailing"), "{}", joined[0]);
    // What the new kind of alert measured, escaped like every alert text.
    assert!(
        joined[0].ends_with("\n*Measured:* GET /v1/health answered 503 &lt;!channel&gt;"),
        "{}",
        joined[0]
    );
}

/// Two incidents at once, each with its own Slack channel and status page components: every
/// message stays in its own incident's channel and thread, and each has its own status page
/// incident and PagerDuty dedup key.
#[tokio::test]
async fn two_incidents_keep_their_own_thread_channel_and_status_page_incident() {
    let fx = AlbFixture::start().await;
    let peers = Peers::start().await;
    let portal = policy_with_notify(&fx, "auto");
    let search = portal
        .replace("portal-api", "search-api")
        .replace("#portal-alerts", "#search-alerts")
        .replace("cmp-portal", "cmp-search")
        .replace(
            &format!("    listener_arn: {}\n", fx.listener_arn),
            &format!("    listener_arn: {}\n    rule_arn: {}\n", fx.listener_arn, fx.rule_arn),
        );
    assert!(search.contains("rule_arn:"), "{search}");
    let aws = AwsProxy::start(&fx.moto.endpoint, 1).await;
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", portal), ("search-api.yaml", search)],
        env: peers.env(),
        executors: Some(Executors {
            alb: Some(AlbExecutor::new(elb_client(aws.endpoint(0)), &fast_settings())),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    let starts = ago(60);
    let firing = |service: &str, fp: &str, ends: Option<&str>| alert("HighErrorRate", service, fp, &starts, ends);
    for (service, fp) in [("portal-api", "cf01"), ("search-api", "cf02")] {
        app.post_webhook(&payload("firing", vec![firing(service, fp, None)]))
            .await;
    }
    let list = app
        .wait_incidents("both verified", |l| {
            l.len() == 2 && l.iter().all(|i| i["phase"] == "verified")
        })
        .await;
    assert_eq!(weights(&fx.listener_actions().await)[0].1, 100);
    assert_eq!(weights(&fx.rule_actions().await)[0].1, 100);
    assert_eq!((aws.count("ModifyListener"), aws.count("ModifyRule")), (1, 1));
    let now = ago(0);
    for (service, fp) in [("portal-api", "cf01"), ("search-api", "cf02")] {
        app.post_webhook(&payload("resolved", vec![firing(service, fp, Some(&now))]))
            .await;
    }
    app.wait_incidents("both closed", |l| l.iter().all(|i| i["open"] == false))
        .await;
    app.wait_outbox_drained().await;
    let id_of = |service: &str| {
        list.iter()
            .find(|i| i["service"] == service || i["policy"] == service)
            .and_then(|i| i["id"].as_str())
            .unwrap_or_else(|| panic!("no incident for {service}: {list:#?}"))
            .to_string()
    };

    // Slack: one root per channel, every reply in its root's channel and thread.
    let slack = wait_requests(&peers.slack, 24, "slack for two incidents").await;
    assert_eq!(slack.len(), 24, "12 requests per incident: {:#?}", slack_texts(&slack));
    let posted = peers.slack_fake.messages();
    for (service, channel, write) in [
        (
            "portal-api",
            "#portal-alerts",
            "ModifyListener written: 100% to stable (attempt 1)",
        ),
        (
            "search-api",
            "#search-alerts",
            "ModifyRule written: 100% to stable (attempt 1)",
        ),
    ] {
        let channel = slack_channel_id(channel);
        let mine: Vec<_> = posted.iter().filter(|m| m.channel == channel).collect();
        let roots: Vec<_> = mine.iter().filter(|m| m.thread_ts.is_none()).collect();
        assert_eq!(roots.len(), 1, "one root in {channel}: {posted:#?}");
        assert!(
            roots[0].text.contains(&format!("Rollback executing: {service}")),
            "{channel} root is about {service}: {:?}",
            roots[0].text
        );
        assert_eq!(mine.len(), 9, "the root and 8 replies in {channel}: {posted:#?}");
        // Each incident's own write, and its own incident's story, in its own channel.
        let texts: Vec<&str> = mine.iter().map(|m| m.text.as_str()).collect();
        let expected_prefixes = [
            ":rewind: Rollback executing: ",
            "*Decision:* `auto`",
            "rolling back: forward 100 %",
            write,
            ":mag: `executing` → `verifying`:",
            ":white_check_mark: `verifying` → `verified`",
            "HighErrorRate service=",
            "every alert of the incident has resolved",
            "Incident closed in phase `verified`.",
        ];
        for (t, e) in texts.iter().zip(expected_prefixes) {
            assert!(
                t.starts_with(e),
                "{t:?} should start with {e:?}\nall in {channel}: {texts:#?}"
            );
        }
        assert!(
            texts[6].starts_with(&format!("HighErrorRate service={service} ")),
            "{channel}: {texts:#?}"
        );
        for m in &mine {
            assert!(
                m.thread_ts.is_none() || m.thread_ts.as_ref() == Some(&roots[0].ts),
                "a reply in {channel} threaded on something else than its root: {m:?}\n{posted:#?}"
            );
        }
    }
    for (_, p, b, _) in received(&peers.slack).await.iter().filter(|r| r.1 == "/chat.update") {
        let root = posted
            .iter()
            .find(|m| m.thread_ts.is_none() && Some(m.ts.as_str()) == b["ts"].as_str())
            .unwrap_or_else(|| panic!("{p} of a message that is no root: {b}"));
        assert_eq!(b["channel"].as_str(), Some(root.channel.as_str()), "{b}");
    }

    // Statuspage: one incident per rollback, each updated under its own id.
    let sp = wait_requests(&peers.statuspage, 6, "statuspage for two incidents").await;
    let created = peers.statuspage_fake.created();
    assert_eq!(created.len(), 2, "{created:?}");
    for service in ["portal-api", "search-api"] {
        let (sp_id, _) = created
            .iter()
            .find(|(_, name)| name.starts_with(&format!("{service}:")))
            .unwrap_or_else(|| panic!("no status page incident for {service}: {created:?}"));
        let own = format!("/pages/PAGE1/incidents/{sp_id}");
        let patches: Vec<&str> = sp
            .iter()
            .filter(|r| r.0 == "PATCH" && r.2["incident"]["body"].as_str().unwrap_or("").contains(service))
            .map(|r| r.1.as_str())
            .collect();
        assert_eq!(
            patches,
            [own.as_str(); 2],
            "{service}'s updates go to its own status page incident"
        );
    }

    // PagerDuty: each incident triggers and resolves under its own dedup key.
    let pd = wait_requests(&peers.pagerduty, 8, "pagerduty for two incidents").await;
    for service in ["portal-api", "search-api"] {
        let key = format!("rollback-responder/{}", id_of(service));
        let actions: Vec<&str> = pd
            .iter()
            .filter(|r| r.2["dedup_key"] == key.as_str())
            .map(|r| r.2["event_action"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(actions, ["trigger", "acknowledge", "resolve"], "{service}");
    }
}

/// Statuspage is down (503) for the create and the look-up that its retry makes first: the
/// outbox retries until the create goes through, and the rollback gets exactly one status page
/// incident, updated and resolved under its id.
#[tokio::test]
async fn a_statuspage_outage_at_create_still_gives_one_status_page_incident() {
    let fx = AlbFixture::start().await;
    let peers = Peers::start().await;
    peers.statuspage_fake.fail_next(2, 503);
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
        vec![alert("HighErrorRate", "portal-api", "cg01", &starts, None)],
    ))
    .await;
    app.wait_incidents("verified", |l| l.len() == 1 && l[0]["phase"] == "verified")
        .await;
    app.post_webhook(&payload(
        "resolved",
        vec![alert("HighErrorRate", "portal-api", "cg01", &starts, Some(&ago(0)))],
    ))
    .await;
    app.wait_incidents("closed", |l| l[0]["open"] == false).await;
    app.wait_outbox_drained().await;
    let sp = received(&peers.statuspage).await;
    let calls: Vec<(&str, &str)> = sp.iter().map(|r| (r.0.as_str(), r.1.as_str())).collect();
    assert_eq!(
        calls,
        [
            ("POST", "/pages/PAGE1/incidents"),
            ("GET", "/pages/PAGE1/incidents/unresolved"),
            ("GET", "/pages/PAGE1/incidents/unresolved"),
            ("POST", "/pages/PAGE1/incidents"),
            ("PATCH", "/pages/PAGE1/incidents/sp-inc-1"),
            ("PATCH", "/pages/PAGE1/incidents/sp-inc-1"),
        ],
        "a failed create; its retry looks for an incident the create may have made (503, then \
         none of ours), then creates; the two updates go to the one incident"
    );
    for (_, _, _, r) in &sp {
        assert_eq!(
            r.headers.get("authorization").unwrap().to_str().unwrap(),
            format!("OAuth {SP_KEY}")
        );
    }
    // The create sent again is the same create, carrying our incident id to be found by.
    assert_eq!(sp[3].2, sp[0].2);
    let id = app.incidents().await[0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        sp[0].2["incident"]["metadata"],
        json!({"rollback_responder": {"incident_id": id}})
    );
    assert_eq!(
        peers.statuspage_fake.created(),
        [(
            "sp-inc-1".to_string(),
            "portal-api: degraded service, release rolled back".to_string()
        )]
    );
    let statuses: Vec<&str> = sp[4..]
        .iter()
        .map(|r| r.2["incident"]["status"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(statuses, ["monitoring", "resolved"]);
}

/// `policy_with_notify` with follow-ups, and without `links`, so where to look comes from the
/// alert's `runbook_url` and `dashboard` annotations.
fn policy_with_follow_ups(fx: &AlbFixture) -> String {
    let p = policy_with_notify(fx, "auto");
    let links = p.find("links:").expect("links");
    format!(
        "{}follow_ups:\n  - Restore the database from the pre-release snapshot if migrations ran\n  - Purge the CDN cache\n",
        &p[..links]
    )
}

/// An alert as Prometheus rules write it: the measured value in `description`, where to look in
/// `runbook_url` and `dashboard`.
fn measured_alert(fingerprint: &str, starts: &str, description: &str) -> Value {
    let mut a = alert("HighErrorRate", "portal-api", fingerprint, starts, None);
    a["annotations"]["description"] = json!(description);
    a["annotations"]["runbook_url"] = json!("https://runbooks.example.com/portal-api/HighErrorRate");
    a["annotations"]["dashboard"] = json!("https://grafana.example.com/d/portal-api-slo/slo-tracking");
    a
}

#[tokio::test]
async fn the_root_shows_the_measured_value_the_rollback_and_next_steps_and_the_thread_lists_the_follow_ups() {
    let fx = AlbFixture::start().await;
    let peers = Peers::start().await;
    let mut env = peers.env();
    env.push((
        "ROLLBACK_RESPONDER__SERVER__PUBLIC_URL".into(),
        "https://rr.example.com".into(),
    ));
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", policy_with_follow_ups(&fx))],
        env,
        executors: Some(Executors {
            alb: Some(fx.executor()),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    app.post_webhook(&payload(
        "firing",
        vec![measured_alert("cd01", &ago(60), "5xx at 6 % over the last 5 minutes")],
    ))
    .await;
    let list = app
        .wait_incidents("verified", |l| l.len() == 1 && l[0]["phase"] == "verified")
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    app.wait_outbox_drained().await;
    let inc = app.incident(&id).await;
    let result = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["phase_from"] == "executing" && e["phase_to"] == "verifying")
        .unwrap_or_else(|| panic!("no end of the action: {inc:#}"))["summary"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(result.contains("forward changed from ["), "{result}");

    let slack = received(&peers.slack).await;
    let page = format!("https://rr.example.com/incidents/{id}");
    let look = format!(
        "Where to look: <https://runbooks.example.com/portal-api/HighErrorRate|Runbook> · \
         <https://grafana.example.com/d/portal-api-slo/slo-tracking|Dashboard> · <{page}|Incident page>"
    );
    // The first post: what was measured, and where to look.
    let root = &slack[0].2;
    let body = root["blocks"][1]["text"]["text"].as_str().unwrap();
    assert!(
        body.contains("\n*Measured:* 5xx at 6 % over the last 5 minutes (alert `HighErrorRate`)"),
        "{body}"
    );
    assert_eq!(
        root["blocks"][2],
        json!({"type": "section", "text": {"type": "mrkdwn", "text": format!("*Next steps*\n{look}")}})
    );
    // Every update after the action: what the rollback did, then the follow-ups and the
    // post-mortem; the updates after it (verified, closed) keep saying what it did.
    let updates: Vec<&Value> = slack
        .iter()
        .filter(|(_, p, _, _)| p == "/chat.update")
        .map(|(_, _, b, _)| b)
        .collect();
    assert_eq!(updates.len(), 2, "verifying, verified: {slack:#?}");
    let done_steps = format!(
        "*Next steps*\nLeft to people (the responder does not do these):\n\
         • Restore the database from the pre-release snapshot if migrations ran\n• Purge the CDN cache\n\
         • Post-mortem: write it up from the timeline on the <{page}|incident page>\n{look}"
    );
    for u in &updates {
        assert_eq!(
            u["blocks"][2],
            json!({"type": "section", "block_id": "rollback_state", "text": {"type": "mrkdwn", "text": format!("*Rollback:* {result}")}}),
            "{u:#}"
        );
        assert_eq!(u["blocks"][3]["text"]["text"], done_steps.as_str(), "{u:#}");
    }
    // The thread: the follow-ups right after the action's result, once.
    let texts = slack_texts(&slack);
    let at = texts
        .iter()
        .position(|t| t.contains("`executing` → `verifying`"))
        .unwrap();
    let follow_ups = &slack[at + 1].2;
    assert_eq!(
        follow_ups,
        &json!({
            "channel": slack_channel_id("#portal-alerts"), "thread_ts": slack_ts(0), "unfurl_links": false,
            "text": "*Left to people* now that the rollback has run (the responder does not do these):\n\
                     • Restore the database from the pre-release snapshot if migrations ran\n• Purge the CDN cache",
        })
    );
    assert_eq!(
        texts.iter().filter(|t| t.contains("*Left to people*")).count(),
        1,
        "{texts:#?}"
    );

    // PagerDuty: the measured value and the follow-ups in the trigger and the change event.
    let pd = received(&peers.pagerduty).await;
    let details: Vec<&Value> = pd
        .iter()
        .filter(|(_, _, b, _)| b["payload"]["custom_details"].is_object())
        .map(|(_, _, b, _)| &b["payload"]["custom_details"])
        .collect();
    assert_eq!(details.len(), 2, "trigger and change event: {pd:#?}");
    for d in details {
        assert_eq!(
            d["follow_ups"],
            json!([
                "Restore the database from the pre-release snapshot if migrations ran",
                "Purge the CDN cache"
            ])
        );
        assert_eq!(
            d["measured"],
            json!({"alert": "HighErrorRate", "value": "5xx at 6 % over the last 5 minutes"})
        );
    }
}

#[tokio::test]
async fn a_hostile_description_reaches_slack_clipped_and_escaped() {
    let fx = AlbFixture::start().await;
    let peers = Peers::start().await;
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", policy_with_notify(&fx, "manual"))],
        env: peers.env(),
        ..Options::default()
    })
    .await;
    let hostile = format!(
        "<!channel> 5xx at 6 % <http://evil.example/login|click to keep your job> & {}",
        "A".repeat(3000)
    );
    let mut a = measured_alert("ce01", &ago(60), &hostile);
    a["annotations"]["runbook_url"] = json!("javascript:alert(1)");
    a["annotations"]["summary"] = json!("<!here> look");
    app.post_webhook(&payload("firing", vec![a])).await;
    app.wait_incidents("awaiting approval", |l| {
        l.len() == 1 && l[0]["phase"] == "awaiting_approval"
    })
    .await;
    app.wait_outbox_drained().await;
    let slack = received(&peers.slack).await;
    let root = &slack[0].2;
    let body = root["blocks"][1]["text"]["text"].as_str().unwrap();
    let measured = body
        .lines()
        .find(|l| l.starts_with("*Measured:*"))
        .unwrap_or_else(|| panic!("{body}"));
    let kept: String = hostile.chars().take(499).collect();
    let escaped = kept.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    assert_eq!(measured, format!("*Measured:* {escaped}… (alert `HighErrorRate`)"));
    assert!(body.contains("*Alert:* &lt;!here&gt; look"), "{body}");
    for (_, _, b, _) in &slack {
        let all = b.to_string();
        assert!(
            !all.contains("<!channel>") && !all.contains("<!here>") && !all.contains("<http://evil"),
            "{all}"
        );
        assert!(!all.contains("javascript:"), "a non-http runbook is no link: {all}");
    }
    // The policy's own runbook wins over the annotation anyway: the link is the policy's.
    assert!(
        root.to_string().contains("<https://runbooks.example/portal|Runbook>"),
        "{root}"
    );
}
