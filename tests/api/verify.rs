//! Verification after a rollback: a loopback health endpoint that is healthy, flaps or stays
//! down; a real Prometheus answering the policy's query; a real Alertmanager's resolved
//! notification; and the whole chain from a Prometheus rule to a verified, resolved incident.

use std::time::Duration;

use rollback_responder::action::alb::AlbExecutor;
use rollback_responder::action::Executors;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::notify::{received, wait_requests, Peers};
use crate::peers::{Alertmanager, FakeService, Prometheus};
use crate::support::alb_fixture::{elb_client, fast_settings, weights, AlbFixture};
use crate::support::aws_proxy::AwsProxy;

pub(crate) fn policy(fx: &AlbFixture, verification: &str) -> String {
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
    mode: auto
verification:
{verification}
notify:
  slack: {{channel: "#portal-alerts"}}
  pagerduty: {{severity: error}}
  statuspage: {{components: {{cmp-portal: partial_outage}}}}
  escalation: {{slack_mention: "<!subteam^S0SRE>"}}
"##,
        listener = fx.listener_arn,
        stable = fx.stable_tg
    )
}

/// Polls Prometheus until `query`'s first value satisfies `pred`.
pub(crate) async fn wait_query(url: &str, query: &str, pred: impl Fn(Option<f64>) -> bool) -> Option<f64> {
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let body: Value = http
            .get(format!("{url}/api/v1/query"))
            .query(&[("query", query)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let v = body["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok());
        if pred(v) {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{query} never satisfied the test's condition: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The service with its ELBv2 calls going through a recording proxy in front of moto (keep
/// the proxy alive as long as the service).
pub(crate) async fn start(
    fx: &AlbFixture,
    verification: &str,
    extra_env: Vec<(String, String)>,
    peers: Option<&Peers>,
) -> (TestApp, AwsProxy) {
    let mut env = peers.map(|p| p.env()).unwrap_or_default();
    env.extend(extra_env);
    let aws = AwsProxy::start(&fx.moto.endpoint, 1).await;
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", policy(fx, verification))],
        env,
        executors: Some(Executors {
            alb: Some(AlbExecutor::new(elb_client(aws.endpoint(0)), &fast_settings())),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    (app, aws)
}

/// Waits until the incident has nothing left to do: no work scheduled (`due_at`) and no
/// replica holding it (`owner`). After this nothing more happens to it by itself.
async fn wait_settled(app: &TestApp, id: &str) -> Value {
    app.wait_incident(id, "nothing left to do", |i| {
        i["due_at"].is_null() && i["owner"].is_null()
    })
    .await
}

pub(crate) fn checks(inc: &Value) -> Vec<Value> {
    inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "verification_check")
        .map(|e| e["detail"].clone())
        .collect()
}

#[tokio::test]
async fn a_healthy_endpoint_verifies_only_at_the_end_of_the_bake() {
    let fx = AlbFixture::start().await;
    let svc = FakeService::start("healthy").await;
    let v = format!(
        "  bake: 2s\n  interval: 200ms\n  health_probe: {{url: \"{}\", successes: 3, interval: 100ms, timeout: 1s}}",
        svc.health_url()
    );
    let (app, _aws) = start(&fx, &v, vec![], None).await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "da01", &ago(60), None)],
    ))
    .await;
    let list = app
        .wait_incidents("verified", |l| l.len() == 1 && l[0]["phase"] == "verified")
        .await;
    let inc = app.incident(list[0]["id"].as_str().unwrap()).await;
    let c = checks(&inc);
    assert_eq!(c.len(), 2, "{c:#?}");
    let probe = c.iter().find(|c| c["check"] == "health_probe").unwrap();
    assert_eq!(probe["passed"], true);
    assert!(
        probe["detail"]
            .as_str()
            .unwrap()
            .contains("held to the end of the bake"),
        "{probe}"
    );
    // The probe kept probing through the bake: every request the service saw is a sample.
    let samples = probe["samples"].as_array().unwrap();
    assert!(samples.len() > 3, "{probe}");
    assert_eq!(samples.len(), svc.health_requests());
    assert!(samples.iter().all(|s| s[1] == "HTTP 200" && s[2] == true), "{probe}");
    // The read-back read the listener all along and found it as written.
    let rb = c.iter().find(|c| c["check"] == "read_back").unwrap();
    assert_eq!(rb["passed"], true, "{rb}");
    assert!(rb["samples"].as_array().unwrap().len() > 1, "{rb}");
    assert!(rb["value"].as_str().unwrap().starts_with("as written ["), "{rb}");
    // `verified` only once the whole bake was held.
    let acted = chrono::DateTime::parse_from_rfc3339(inc["acted_at"].as_str().unwrap()).unwrap();
    let verified = chrono::DateTime::parse_from_rfc3339(inc["verified_at"].as_str().unwrap()).unwrap();
    assert!(
        verified - acted >= chrono::TimeDelta::seconds(2),
        "{acted} -> {verified}"
    );
}

/// The probe judges the answer it gets: a redirect (to a login or maintenance page that
/// answers 200) is not the service being healthy.
#[tokio::test]
async fn a_health_probe_does_not_follow_redirects() {
    let fx = AlbFixture::start().await;
    let svc = FakeService::start("moved").await;
    let v = format!(
        "  bake: 1s\n  health_probe: {{url: \"{}\", successes: 2, interval: 100ms, timeout: 1s}}",
        svc.moved_url()
    );
    let (app, _aws) = start(&fx, &v, vec![], None).await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "dg01", &ago(60), None)],
    ))
    .await;
    let list = app
        .wait_incidents("verification failed", |l| {
            l.len() == 1 && l[0]["phase"] == "verification_failed"
        })
        .await;
    let inc = app.incident(list[0]["id"].as_str().unwrap()).await;
    let probe = checks(&inc).into_iter().find(|c| c["check"] == "health_probe").unwrap();
    assert_eq!(probe["passed"], false);
    assert!(probe["detail"].as_str().unwrap().contains("never good in"), "{probe}");
    assert!(
        probe["detail"].as_str().unwrap().contains("last: HTTP 303 at"),
        "{probe}"
    );
}

/// Good, then bad mid-bake: the first bad sample after a good one fails verification with
/// that sample's value and time, and (fail fast) nothing more is probed.
#[tokio::test]
async fn a_probe_that_turns_bad_mid_bake_fails_at_that_sample() {
    let fx = AlbFixture::start().await;
    let svc = FakeService::start("flap").await;
    svc.script_health(&[true, true, true, false]);
    let v = format!(
        "  bake: 30s\n  interval: 200ms\n  health_probe: {{url: \"{}\", successes: 3, interval: 100ms, timeout: 1s}}",
        svc.health_url()
    );
    let (app, _aws) = start(&fx, &v, vec![], None).await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "db01", &ago(60), None)],
    ))
    .await;
    let list = app
        .wait_incidents("verification failed", |l| {
            l.len() == 1 && l[0]["phase"] == "verification_failed"
        })
        .await;
    let inc = app.incident(list[0]["id"].as_str().unwrap()).await;
    let c = checks(&inc);
    let probe = c.iter().find(|c| c["check"] == "health_probe").unwrap();
    assert_eq!(probe["passed"], false, "{probe}");
    assert_eq!(probe["value"], "HTTP 500");
    let samples = probe["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 4, "{probe}");
    // The verdict carries the bad sample's own time, not the verdict's.
    let at = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    assert_eq!(
        at(&samples[3][0]).timestamp_millis(),
        at(&probe["at"]).timestamp_millis(),
        "{probe}"
    );
    assert!(
        probe["detail"]
            .as_str()
            .unwrap()
            .contains("1 bad sample(s) after the first good one"),
        "{probe}"
    );
    // Fail fast: the bad sample ended the bake; the service saw no probe after it.
    assert_eq!(svc.health_requests(), 4);
    let rb = c.iter().find(|c| c["check"] == "read_back").unwrap();
    assert_eq!(rb["stopped"], true, "{rb}");
    assert_eq!(rb["passed"], false, "{rb}");
    assert!(inc["verified_at"].is_null());
}

/// Flapping within what the policy allows passes; one more bad answer fails.
#[tokio::test]
async fn a_flapping_endpoint_passes_only_within_the_allowed_bad_samples() {
    for (allowed, phase) in [(2, "verified"), (1, "verification_failed")] {
        let fx = AlbFixture::start().await;
        let svc = FakeService::start("flap").await;
        svc.script_health(&[false, true, true, false, true, false, true]);
        let v = format!(
            "  bake: 2s\n  interval: 500ms\n  allowed_bad_samples: {allowed}\n  health_probe: {{url: \"{}\", successes: 2, interval: 100ms, timeout: 1s}}",
            svc.health_url()
        );
        let (app, _aws) = start(&fx, &v, vec![], None).await;
        app.post_webhook(&payload(
            "firing",
            vec![alert("HighErrorRate", "portal-api", "db02", &ago(60), None)],
        ))
        .await;
        let list = app
            .wait_incidents(phase, |l| l.len() == 1 && l[0]["phase"] == phase)
            .await;
        let inc = app.incident(list[0]["id"].as_str().unwrap()).await;
        let probe = checks(&inc).into_iter().find(|c| c["check"] == "health_probe").unwrap();
        let oks: Vec<bool> = probe["samples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s[2].as_bool().unwrap())
            .collect();
        // The first bad answer came before the first good one: it does not count.
        let script = [false, true, true, false, true, false, true];
        assert_eq!(oks[..oks.len().min(7)], script[..oks.len().min(7)], "{probe}");
        if allowed == 2 {
            assert!(
                oks.len() > 7 && oks[7..].iter().all(|ok| *ok),
                "held to the end: {probe}"
            );
        } else {
            assert_eq!(oks.len(), 6, "failed at the second counted bad answer: {probe}");
            assert!(probe["detail"].as_str().unwrap().contains("2 bad sample(s)"), "{probe}");
        }
    }
}

#[tokio::test]
async fn an_endpoint_that_stays_down_fails_verification_escalates_and_never_rolls_back_twice() {
    let fx = AlbFixture::start().await;
    let peers = Peers::start().await;
    let svc = FakeService::start("down").await;
    svc.set(false, 0.0);
    let v = format!(
        "  bake: 1s\n  health_probe: {{url: \"{}\", successes: 2, interval: 100ms, timeout: 1s}}",
        svc.health_url()
    );
    let (app, aws) = start(&fx, &v, vec![], Some(&peers)).await;
    let starts = ago(60);
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "dc01", &starts, None)],
    ))
    .await;
    let list = app
        .wait_incidents("verification failed", |l| {
            l.len() == 1 && l[0]["phase"] == "verification_failed"
        })
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        weights(&fx.listener_actions().await)[0].1,
        100,
        "the rollback itself happened"
    );
    let inc = app.incident(&id).await;
    let probe = checks(&inc).into_iter().find(|c| c["check"] == "health_probe").unwrap();
    assert_eq!(probe["passed"], false);
    assert!(probe["detail"].as_str().unwrap().contains("never good in"), "{probe}");
    assert!(
        probe["detail"].as_str().unwrap().contains("last: HTTP 500 at"),
        "{probe}"
    );
    assert!(timeline_count(&inc, "verification_failed") == 1);

    // The on-call is paged at high severity on a separate alert, and Slack mentions the team.
    app.wait_outbox_drained().await;
    let pd = wait_requests(&peers.pagerduty, 4, "pagerduty").await;
    let esc = pd
        .iter()
        .find(|r| r.2["dedup_key"] == format!("rollback-responder/{id}/escalation"))
        .expect("escalation trigger");
    assert_eq!(esc.2["event_action"], "trigger");
    assert_eq!(esc.2["payload"]["severity"], "critical");
    assert!(esc.2["payload"]["summary"]
        .as_str()
        .unwrap()
        .starts_with("ROLLBACK NEEDS A HUMAN: portal-api: HighErrorRate is verification_failed"));
    let slack = wait_requests(&peers.slack, 6, "slack").await;
    assert!(
        slack.iter().any(|r| r.2["text"]
            .as_str()
            .unwrap_or("")
            .starts_with("<!subteam^S0SRE> :rotating_light: `verifying` → `verification_failed`")),
        "{:#?}",
        slack.iter().map(|r| r.2["text"].clone()).collect::<Vec<_>>()
    );

    // More alerts for the same target join the incident; nothing acts again.
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "dc02", &ago(30), None)],
    ))
    .await;
    app.wait_incident(&id, "second alert joined", |i| timeline_count(i, "alert_joined") == 1)
        .await;
    app.wait_alerts_decided().await;
    let inc = wait_settled(&app, &id).await;
    assert_eq!(timeline_count(&inc, "action_started"), 1);
    assert_eq!(app.incidents().await.len(), 1);
    assert_eq!(inc["phase"], "verification_failed");
    assert_eq!(aws.count("ModifyListener"), 1, "moto was written once");
    assert_eq!(weights(&fx.listener_actions().await)[0].1, 100);
}

#[tokio::test]
async fn a_prometheus_query_must_hold_within_the_bake_period() {
    let fx = AlbFixture::start().await;
    let run = format!("q{}", uuid::Uuid::now_v7().simple());
    let svc = FakeService::start(&run).await;
    let prom = Prometheus::start(svc.addr, "127.0.0.1:9", "groups: []\n").await;
    let query = format!(
        "sum(rate(http_requests_total{{run=\\\"{run}\\\",code=~\\\"5..\\\"}}[5s])) / sum(rate(http_requests_total{{run=\\\"{run}\\\"}}[5s]))"
    );
    let v = format!("  bake: 4s\n  interval: 1s\n  prometheus: {{query: \"{query}\", below: 0.01}}");
    let env = env(&[("ROLLBACK_RESPONDER__VERIFICATION__PROMETHEUS_URL", &prom.url)]);

    // Healthy: the ratio is 0 once Prometheus has two samples; the bake starts after that.
    let raw = query.replace("\\\"", "\"");
    wait_query(&prom.url, &raw, |v| v == Some(0.0)).await;
    let (app, _aws) = start(&fx, &v, env.clone(), None).await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "dd01", &ago(60), None)],
    ))
    .await;
    let list = app
        .wait_incidents("verified by prometheus", |l| {
            l.len() == 1 && l[0]["phase"] == "verified"
        })
        .await;
    let inc = app.incident(list[0]["id"].as_str().unwrap()).await;
    let q = checks(&inc).into_iter().find(|c| c["check"] == "prometheus").unwrap();
    assert_eq!(q["passed"], true, "{q}");
    assert!(
        q["detail"]
            .as_str()
            .unwrap()
            .contains("< 0.01: held to the end of the bake"),
        "{q}"
    );
    assert!(
        q["samples"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s[1] == "0" && s[2] == true),
        "{q}"
    );
    drop(app);

    // Unhealthy: half the requests fail; the query never holds.
    svc.set(true, 0.5);
    let fx2 = AlbFixture::start().await;
    let v = format!("  bake: 4s\n  interval: 1s\n  prometheus: {{query: \"{query}\", below: 0.01}}");
    let (app, _aws) = start(&fx2, &v, env, None).await;
    // Wait until Prometheus itself sees the failures, not a fixed time.
    prom.wait_value(&raw, |v| (v - 0.5).abs() < 1e-6).await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "dd02", &ago(60), None)],
    ))
    .await;
    let list = app
        .wait_incidents("failed by prometheus", |l| {
            l.len() == 1 && l[0]["phase"] == "verification_failed"
        })
        .await;
    let inc = app.incident(list[0]["id"].as_str().unwrap()).await;
    let q = checks(&inc).into_iter().find(|c| c["check"] == "prometheus").unwrap();
    assert_eq!(q["passed"], false);
    assert!(q["detail"].as_str().unwrap().contains("never good in"), "{q}");
    assert!(q["detail"].as_str().unwrap().contains("last: 0.5 not < 0.01 at"), "{q}");
}

#[tokio::test]
async fn the_resolved_notification_from_alertmanager_completes_verification() {
    let fx = AlbFixture::start().await;
    let (app, _aws) = start(
        &fx,
        "  bake: 8s\n  interval: 200ms\n  alert_resolves: true",
        vec![],
        None,
    )
    .await;
    let am = Alertmanager::start(&app.url("/webhook/alertmanager"), TOKEN).await;
    let labels = json!({"alertname": "HighErrorRate", "service": "portal-api", "run": uuid::Uuid::now_v7().simple().to_string()});
    let starts = ago(60);
    am.post(labels.clone(), &starts, None).await;
    app.wait_incidents("verifying, waiting for the alert", |l| {
        l.len() == 1 && l[0]["phase"] == "verifying"
    })
    .await;
    am.post(labels, &starts, Some(&ago(0))).await;
    let list = app
        .wait_incidents("verified and closed", |l| {
            l[0]["phase"] == "verified" && l[0]["open"] == false
        })
        .await;
    let inc = app.incident(list[0]["id"].as_str().unwrap()).await;
    let r = checks(&inc)
        .into_iter()
        .find(|c| c["check"] == "alert_resolved")
        .unwrap();
    assert_eq!(r["passed"], true);
}

const RULES: &str = r#"groups:
  - name: portal-api-rollback
    rules:
      - alert: HighErrorRate
        expr: sum by (service) (rate(http_requests_total{run="RUN",code=~"5.."}[5s])) / sum by (service) (rate(http_requests_total{run="RUN"}[5s])) > 0.05
        labels: {severity: critical, team: platform}
        annotations: {summary: "Portal API high error rate detected"}
"#;

async fn prometheus_chain(run: &str, heal: bool) {
    let fx = AlbFixture::start().await;
    let peers = Peers::start().await;
    let svc = FakeService::start(run).await;
    svc.set(false, 0.5);
    let bake = if heal { "20s" } else { "3s" };
    // Placeholder Prometheus URL; the real one is known once Prometheus runs.
    let mut app_env = vec![];
    let am_port = crate::peers::free_port();
    let prom = Prometheus::start(svc.addr, &format!("127.0.0.1:{am_port}"), &RULES.replace("RUN", run)).await;
    app_env.push((
        "ROLLBACK_RESPONDER__VERIFICATION__PROMETHEUS_URL".to_string(),
        prom.url.clone(),
    ));
    let query = format!(
        "sum(rate(http_requests_total{{run=\\\"{run}\\\",code=~\\\"5..\\\"}}[5s])) / sum(rate(http_requests_total{{run=\\\"{run}\\\"}}[5s]))"
    );
    let v = format!(
        "  bake: {bake}\n  interval: 1s\n  health_probe: {{url: \"{}\", successes: 2, interval: 200ms, timeout: 1s}}\n  prometheus: {{query: \"{query}\", below: 0.01}}\n  alert_resolves: true",
        svc.health_url()
    );
    let (app, aws) = start(&fx, &v, app_env, Some(&peers)).await;
    let _am = Alertmanager::start_on(am_port, &app.url("/webhook/alertmanager"), TOKEN).await;

    let list = app
        .wait_incidents_for(Duration::from_secs(40), "rule -> alertmanager -> rollback", |l| {
            l.len() == 1
                && ["verifying", "verified", "verification_failed"].contains(&l[0]["phase"].as_str().unwrap_or(""))
        })
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        weights(&fx.listener_actions().await),
        vec![(fx.stable_tg.clone(), 100), (fx.canary_tg.clone(), 0)]
    );
    if heal {
        assert_eq!(aws.count("ModifyListener"), 1);
        svc.set(true, 0.0);
        let list = app
            .wait_incidents_for(Duration::from_secs(40), "verified and resolved", |l| {
                l[0]["phase"] == "verified" && l[0]["open"] == false
            })
            .await;
        app.wait_outbox_drained().await;
        assert_eq!(list.len(), 1);
        let inc = app.incident(&id).await;
        let passed: Vec<String> = checks(&inc)
            .iter()
            .filter(|c| c["passed"] == true)
            .map(|c| c["check"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(passed, ["read_back", "health_probe", "prometheus", "alert_resolved"]);
        app.wait_outbox_drained().await;
        let sp = wait_requests(&peers.statuspage, 3, "statuspage").await;
        let statuses: Vec<&str> = sp.iter().map(|r| r.2["incident"]["status"].as_str().unwrap()).collect();
        assert_eq!(statuses, ["identified", "monitoring", "resolved"]);
        let pd = wait_requests(&peers.pagerduty, 4, "pagerduty").await;
        let actions: Vec<String> = pd
            .iter()
            .map(|r| r.2["event_action"].as_str().unwrap_or("change").to_string())
            .collect();
        assert_eq!(actions, ["trigger", "acknowledge", "change", "resolve"]);
        let slack = received(&peers.slack).await;
        assert!(slack
            .iter()
            .any(|r| r.2["text"].as_str().unwrap_or("").contains("`verifying` → `verified`")));
        assert!(slack
            .iter()
            .any(|r| r.2["text"].as_str().unwrap_or("").starts_with("Incident closed")));
    } else {
        let list = app
            .wait_incidents_for(Duration::from_secs(40), "verification failed", |l| {
                l[0]["phase"] == "verification_failed"
            })
            .await;
        assert_eq!(list.len(), 1);
        let inc = app.incident(&id).await;
        assert_eq!(timeline_count(&inc, "action_started"), 1, "exactly one rollback");
        app.wait_outbox_drained().await;
        let pd = wait_requests(&peers.pagerduty, 4, "pagerduty").await;
        assert!(pd
            .iter()
            .any(|r| r.2["dedup_key"] == format!("rollback-responder/{id}/escalation")));
        app.wait_alerts_decided().await;
        let inc = wait_settled(&app, &id).await;
        assert_eq!(timeline_count(&inc, "action_started"), 1, "still exactly one rollback");
        assert_eq!(app.incidents().await.len(), 1);
        assert_eq!(aws.count("ModifyListener"), 1, "moto was written once");
    }
}

#[tokio::test]
async fn a_prometheus_rule_fires_through_alertmanager_the_alb_is_reverted_and_the_incident_verified_and_resolved() {
    prometheus_chain(&format!("e{}", uuid::Uuid::now_v7().simple()), true).await;
}

#[tokio::test]
async fn when_the_endpoint_stays_unhealthy_verification_fails_and_escalates_after_one_rollback() {
    prometheus_chain(&format!("f{}", uuid::Uuid::now_v7().simple()), false).await;
}
