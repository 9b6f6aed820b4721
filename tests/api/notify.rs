//! Slack, PagerDuty and Statuspage as wiremock servers on loopback: the exact requests for an
//! automatic and a manual incident, a Slack outage that never delays the rollback, and a
//! restart with notifications pending.

use std::time::{Duration, Instant};

use rollback_responder::action::Executors;
use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use crate::helpers::*;
use crate::support::alb_fixture::{weights, AlbFixture};

pub const SLACK_TOKEN: &str = "xoxb-test-token";
pub const PD_KEY: &str = "R0UTINGKEY0000000000000000000000";
pub const SP_KEY: &str = "sp-api-key";

/// The three peers, answering like the real APIs.
pub struct Peers {
    pub slack: MockServer,
    pub pagerduty: MockServer,
    pub statuspage: MockServer,
}

impl Peers {
    pub async fn start() -> Peers {
        let slack = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/chat.postMessage"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(json!({"ok": true, "channel": "C0ALERTS", "ts": "1763790000.000100"})),
            )
            .mount(&slack)
            .await;
        Mock::given(method("POST"))
            .and(path("/chat.update"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(json!({"ok": true, "channel": "C0ALERTS", "ts": "1763790000.000100"})),
            )
            .mount(&slack)
            .await;
        let pagerduty = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(202).set_body_json(json!({"status": "success", "message": "Event processed"})),
            )
            .mount(&pagerduty)
            .await;
        let statuspage = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/pages/PAGE1/incidents"))
            .respond_with(ResponseTemplate::new(201).set_body_json(json!({"id": "sp-inc-1", "status": "identified"})))
            .mount(&statuspage)
            .await;
        Mock::given(method("PATCH"))
            .and(path("/pages/PAGE1/incidents/sp-inc-1"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "sp-inc-1"})))
            .mount(&statuspage)
            .await;
        Peers {
            slack,
            pagerduty,
            statuspage,
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

/// Polls until `server` has received `n` requests (then a short quiet period to catch extras).
pub async fn wait_requests(server: &MockServer, n: usize, what: &str) -> Vec<(String, String, Value, Request)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = received(server).await;
        if got.len() >= n {
            tokio::time::sleep(Duration::from_millis(400)).await;
            return received(server).await;
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
        vec![alert("HighErrorRate", "portal-api", "ca01", &starts, None)],
    ))
    .await;
    let list = app
        .wait_incidents("verified", |l| l.len() == 1 && l[0]["phase"] == "verified")
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    assert_eq!(weights(&fx.listener_actions().await)[0].1, 100);
    app.post_webhook(&payload(
        "resolved",
        vec![alert("HighErrorRate", "portal-api", "ca01", &starts, Some(&ago(0)))],
    ))
    .await;
    app.wait_incidents("closed", |l| l[0]["open"] == false).await;

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
    let ctx = root["blocks"][2]["elements"][0]["text"].as_str().unwrap();
    assert!(
        ctx.contains(&format!("Incident `{id}`")) && ctx.contains("<https://runbooks.example/portal|Runbook>"),
        "{ctx}"
    );
    for (_, p, b, _) in &slack[1..] {
        if p == "/chat.postMessage" {
            assert_eq!(b["thread_ts"], "1763790000.000100", "replies go to the thread: {b}");
            assert_eq!(b["channel"], "C0ALERTS");
        } else {
            assert_eq!(
                (b["channel"].as_str(), b["ts"].as_str()),
                (Some("C0ALERTS"), Some("1763790000.000100"))
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
    assert_eq!(
        (sp[1].0.as_str(), sp[1].1.as_str()),
        ("PATCH", "/pages/PAGE1/incidents/sp-inc-1")
    );
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
    Mock::given(method("POST"))
        .and(path("/chat.postMessage"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"ok": true, "channel": "C0ALERTS", "ts": "1763790000.000100"})),
        )
        .with_priority(3)
        .mount(&outage)
        .await;
    Mock::given(method("POST"))
        .and(path("/chat.update"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"ok": true})))
        .with_priority(3)
        .mount(&outage)
        .await;
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
    // PagerDuty got its events once already.
    let pd_before = wait_requests(&peers.pagerduty, 3, "pagerduty before restart")
        .await
        .len();

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
    // The first post failed before the restart, so it looks for an earlier one first (one
    // GET, unanswered here); then the 8 posts.
    let slack: Vec<_> = wait_requests(&peers.slack, 9, "slack after restart")
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
    tokio::time::sleep(Duration::from_millis(500)).await;
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
    storm.push(alert("HealthCheckFailing", "portal-api", "cc01", &ago(40), None));
    storm.push(alert("HealthCheckFailing", "portal-api", "cc02", &ago(40), None));
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
    tokio::time::sleep(Duration::from_millis(500)).await;
    let texts = slack_texts(&received(&peers.slack).await);
    let joined: Vec<&String> = texts.iter().filter(|t| t.contains("joined the incident")).collect();
    assert_eq!(
        joined.len(),
        1,
        "one reply for the new kind, none per instance: {texts:#?}"
    );
    assert!(joined[0].contains("HealthCheckFailing"), "{}", joined[0]);
}
