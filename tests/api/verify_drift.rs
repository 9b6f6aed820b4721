//! Verification as a hold (issue 21): the ALB read-back re-reads moto through the bake and
//! sees a listener put back (drift), a target found already stable is pre-checked all the same,
//! a Prometheus query that turns bad mid-bake fails, and a failed verification stays open
//! (page and status page) until a person closes it, even when the alert already resolved.

use serde_json::{json, Value};

use crate::helpers::*;
use crate::notify::{received, wait_requests, Peers};
use crate::peers::{FakeService, Prometheus};
use crate::support::alb_fixture::{forward, weights, AlbFixture};
use crate::verify::{checks, start, wait_query};

fn check(inc: &Value, name: &str) -> Value {
    checks(inc)
        .into_iter()
        .find(|c| c["check"] == name)
        .unwrap_or_else(|| panic!("no {name} check: {inc:#}"))
}

#[tokio::test]
async fn a_listener_put_back_to_the_canary_during_the_bake_is_drift_and_not_fought() {
    let fx = AlbFixture::start().await;
    let peers = Peers::start().await;
    let (app, _aws) = start(&fx, "  bake: 60s\n  interval: 200ms", vec![], Some(&peers)).await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "dr01", &ago(60), None)],
    ))
    .await;
    let list = app
        .wait_incidents("verifying", |l| l.len() == 1 && l[0]["phase"] == "verifying")
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        weights(&fx.listener_actions().await),
        vec![(fx.stable_tg.clone(), 100), (fx.canary_tg.clone(), 0)]
    );
    // Someone (a deploy pipeline, a person) puts the listener back to 75/25.
    fx.elb
        .modify_listener()
        .listener_arn(&fx.listener_arn)
        .default_actions(forward(&[(&fx.stable_tg, 75), (&fx.canary_tg, 25)], Some(300)))
        .send()
        .await
        .expect("ModifyListener");
    let inc = app
        .wait_incident(&id, "verification failed on drift", |i| {
            i["phase"] == "verification_failed"
        })
        .await;
    let rb = check(&inc, "read_back");
    assert_eq!(rb["passed"], false, "{rb}");
    let drift = rb["drift"].as_str().unwrap();
    assert!(
        drift.starts_with(&format!(
            "{} no longer forwards as written (100% to stable): now [stable=75, canary=25; sticky 300s], 75% stable; \
             ELBv2 does not record who wrote it: look for ModifyListener events on {} in CloudTrail",
            fx.listener_arn, fx.listener_arn
        )),
        "{drift}"
    );
    assert_eq!(rb["samples"][0][2], true, "as written at the start: {rb}");
    assert!(
        rb["detail"].as_str().unwrap().starts_with("DRIFT, not written over"),
        "{rb}"
    );
    // Not fought: moto still has what the other writer wrote, after the verdict.
    assert_eq!(
        weights(&fx.listener_actions().await),
        vec![(fx.stable_tg.clone(), 75), (fx.canary_tg.clone(), 25)]
    );
    assert_eq!(timeline_count(&inc, "action_started"), 1);
    // The status page never said the previous version is serving and healthy.
    app.wait_outbox_drained().await;
    let pd = wait_requests(&peers.pagerduty, 4, "pagerduty").await;
    assert!(
        pd.iter()
            .any(|r| r.2["dedup_key"] == format!("rollback-responder/{id}/escalation")
                && r.2["event_action"] == "trigger")
    );
    let sp = received(&peers.statuspage).await;
    let statuses: Vec<&str> = sp.iter().filter_map(|r| r.2["incident"]["status"].as_str()).collect();
    assert_eq!(statuses, ["identified"], "{sp:#?}");
    // Slack's thread carries the verdict with what decided it.
    let slack = wait_requests(&peers.slack, 6, "slack").await;
    assert!(
        slack.iter().any(|r| {
            let text = r.2["text"].as_str().unwrap_or("");
            text.contains("`verifying` → `verification_failed`")
                && text.contains("read_back: DRIFT: ")
                && text.contains("now [stable=75, canary=25; sticky 300s]")
        }),
        "{:#?}",
        slack.iter().map(|r| r.2["text"].clone()).collect::<Vec<_>>()
    );
}

/// Found already stable, nothing to write: the stable group is checked all the same, and
/// with no healthy target the incident does not end `verified`.
#[tokio::test]
async fn a_target_found_already_stable_is_pre_checked_in_verification() {
    let fx = AlbFixture::start().await;
    fx.elb
        .modify_listener()
        .listener_arn(&fx.listener_arn)
        .default_actions(forward(&[(&fx.stable_tg, 100), (&fx.canary_tg, 0)], Some(300)))
        .send()
        .await
        .expect("ModifyListener");
    fx.stop_instances(&fx.stable_instances).await;
    let (app, _aws) = start(&fx, "  bake: 2s\n  interval: 200ms", vec![], None).await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "dr02", &ago(60), None)],
    ))
    .await;
    let list = app
        .wait_incidents("verification failed", |l| {
            l.len() == 1 && l[0]["phase"] == "verification_failed"
        })
        .await;
    let inc = app.incident(list[0]["id"].as_str().unwrap()).await;
    assert!(timeline_count(&inc, "action_succeeded") == 1);
    let rb = check(&inc, "read_back");
    assert_eq!(rb["passed"], false, "{rb}");
    let value = rb["value"].as_str().unwrap();
    assert!(
        value.starts_with(
            "as written [stable=100, canary=0; sticky 300s], stable group stable: 0 of 1 required healthy"
        ),
        "{value}"
    );
    assert!(rb["drift"].is_null(), "{rb}");
}

/// Good, then bad mid-bake, read from a real Prometheus scraping the test app: the first bad
/// sample after the good ones fails verification with its value and time.
#[tokio::test]
async fn a_prometheus_query_that_turns_bad_mid_bake_fails_verification() {
    let fx = AlbFixture::start().await;
    let run = format!("g{}", uuid::Uuid::now_v7().simple());
    let svc = FakeService::start(&run).await;
    let prom = Prometheus::start(svc.addr, "127.0.0.1:9", "groups: []\n").await;
    let raw = format!(
        "sum(rate(http_requests_total{{run=\"{run}\",code=~\"5..\"}}[5s])) / sum(rate(http_requests_total{{run=\"{run}\"}}[5s]))"
    );
    wait_query(&prom.url, &raw, |v| v == Some(0.0)).await;
    let v = format!(
        "  bake: 60s\n  interval: 500ms\n  prometheus: {{query: \"{}\", below: 0.01}}",
        raw.replace('"', "\\\"")
    );
    let env = env(&[("ROLLBACK_RESPONDER__VERIFICATION__PROMETHEUS_URL", &prom.url)]);
    let (app, _aws) = start(&fx, &v, env, None).await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "dr03", &ago(60), None)],
    ))
    .await;
    let list = app
        .wait_incidents("verifying", |l| l.len() == 1 && l[0]["phase"] == "verifying")
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    svc.set(true, 0.5);
    // What Prometheus itself says once the errors are scraped.
    let bad = wait_query(&prom.url, &raw, |v| v.is_some_and(|v| v > 0.01)).await;
    let inc = app
        .wait_incident(&id, "verification failed", |i| i["phase"] == "verification_failed")
        .await;
    let q = check(&inc, "prometheus");
    assert_eq!(q["passed"], false, "{q}");
    let samples = q["samples"].as_array().unwrap();
    assert_eq!(samples[0][1], "0", "good at the start: {q}");
    assert_eq!(samples[0][2], true, "{q}");
    let last = samples.last().unwrap();
    assert_eq!(last[2], false, "{q}");
    assert!(last[1].as_str().unwrap().ends_with(" not < 0.01"), "{q}");
    assert_eq!(q["value"], last[1], "the verdict carries the bad sample's value");
    assert!(
        q["detail"]
            .as_str()
            .unwrap()
            .contains("1 bad sample(s) after the first good one"),
        "{q}"
    );
    assert!(bad.unwrap() > 0.01);
    assert!(inc["verified_at"].is_null());
}

/// The alert resolved while verification failed: the escalation page stays open, the status
/// page stays `identified`; only a person's close resolves them.
#[tokio::test]
async fn a_failed_verification_stays_open_until_a_person_closes_it() {
    let fx = AlbFixture::start().await;
    let peers = Peers::start().await;
    let svc = FakeService::start("down").await;
    svc.set(false, 0.0);
    let v = format!(
        "  bake: 1s\n  interval: 200ms\n  health_probe: {{url: \"{}\", successes: 1, interval: 100ms, timeout: 1s}}",
        svc.health_url()
    );
    let mut e = peers.env();
    e.extend(env(&[("ROLLBACK_RESPONDER__API__BEARER_TOKEN", "operator-token")]));
    let (app, _aws) = start(&fx, &v, e, None).await;
    let starts = ago(60);
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "dr04", &starts, None)],
    ))
    .await;
    let list = app
        .wait_incidents("verifying", |l| l.len() == 1 && l[0]["phase"] == "verifying")
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    // The alert resolves during the bake.
    app.post_webhook(&payload(
        "resolved",
        vec![alert("HighErrorRate", "portal-api", "dr04", &starts, Some(&ago(0)))],
    ))
    .await;
    let inc = app
        .wait_incident(&id, "verification failed", |i| i["phase"] == "verification_failed")
        .await;
    assert_eq!(inc["open"], true);
    let escalation = format!("rollback-responder/{id}/escalation");
    app.wait_outbox_drained().await;
    let pd = wait_requests(&peers.pagerduty, 4, "pagerduty").await;
    assert!(pd
        .iter()
        .any(|r| r.2["dedup_key"] == escalation.as_str() && r.2["event_action"] == "trigger"));
    assert!(
        !pd.iter().any(|r| r.2["event_action"] == "resolve"),
        "no resolve before a person closes it: {pd:#?}"
    );
    let sp = received(&peers.statuspage).await;
    let statuses: Vec<&str> = sp.iter().filter_map(|r| r.2["incident"]["status"].as_str()).collect();
    assert_eq!(statuses, ["identified"]);

    // Closing needs the operator token, a note, and an incident that exists.
    let url = app.url(&format!("/api/v1/incidents/{id}/close"));
    let body = json!({"note": "fixed by hand, checked the dashboard", "by": "alice"});
    assert_eq!(app.http.post(&url).json(&body).send().await.unwrap().status(), 401);
    let r = app
        .http
        .post(&url)
        .bearer_auth("operator-token")
        .json(&json!({"note": " "}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = app
        .http
        .post(app.url("/api/v1/incidents/nope/close"))
        .bearer_auth("operator-token")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(app.incident(&id).await["open"], true, "bad requests changed nothing");
    let r = app
        .http
        .post(&url)
        .bearer_auth("operator-token")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["result"], "closed");
    let inc = app.wait_incident(&id, "closed", |i| i["open"] == false).await;
    let closed = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "closed")
        .unwrap();
    assert_eq!(closed["actor"], "api:alice");

    // Now the page and the escalation resolve, and the status page resolves without "recovered".
    app.wait_outbox_drained().await;
    let pd = wait_requests(&peers.pagerduty, pd.len() + 2, "pagerduty resolves").await;
    let resolved: Vec<&str> = pd
        .iter()
        .filter(|r| r.2["event_action"] == "resolve")
        .filter_map(|r| r.2["dedup_key"].as_str())
        .collect();
    assert_eq!(resolved, [format!("rollback-responder/{id}"), escalation]);
    app.wait_outbox_drained().await;
    let sp = wait_requests(&peers.statuspage, sp.len() + 1, "statuspage resolve").await;
    let last = &sp.last().unwrap().2["incident"];
    assert_eq!(last["status"], "resolved");
    assert!(!last["body"].as_str().unwrap().contains("recovered"), "{last}");
    // A second close says so.
    let r = app
        .http
        .post(&url)
        .bearer_auth("operator-token")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["result"], "already_closed");
}

/// A listener rule's forward changed back during the bake is drift too (ModifyRule).
#[tokio::test]
async fn a_rule_put_back_during_the_bake_is_drift() {
    use rollback_responder::action::Executors;

    let fx = AlbFixture::start().await;
    let policy = crate::verify::policy(&fx, "  bake: 60s\n  interval: 200ms").replace(
        &format!("    listener_arn: {}\n", fx.listener_arn),
        &format!("    listener_arn: {}\n    rule_arn: {}\n", fx.listener_arn, fx.rule_arn),
    );
    assert!(policy.contains("rule_arn"));
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", policy)],
        executors: Some(Executors {
            alb: Some(fx.executor()),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "dr05", &ago(60), None)],
    ))
    .await;
    let list = app
        .wait_incidents("verifying", |l| l.len() == 1 && l[0]["phase"] == "verifying")
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        weights(&fx.rule_actions().await),
        vec![(fx.stable_tg.clone(), 100), (fx.canary_tg.clone(), 0)]
    );
    fx.elb
        .modify_rule()
        .rule_arn(&fx.rule_arn)
        .actions(forward(&[(&fx.stable_tg, 10), (&fx.canary_tg, 90)], Some(120)))
        .send()
        .await
        .expect("ModifyRule");
    let inc = app
        .wait_incident(&id, "verification failed on drift", |i| {
            i["phase"] == "verification_failed"
        })
        .await;
    let drift = check(&inc, "read_back")["drift"].as_str().unwrap().to_string();
    assert!(
        drift.starts_with(&format!(
            "{} no longer forwards as written (100% to stable): now [stable=10, canary=90; sticky 120s], 10% stable; \
             ELBv2 does not record who wrote it: look for ModifyRule events on {}",
            fx.rule_arn, fx.rule_arn
        )),
        "{drift}"
    );
    assert_eq!(
        weights(&fx.rule_actions().await),
        vec![(fx.stable_tg.clone(), 10), (fx.canary_tg.clone(), 90)],
        "not written over"
    );
}

/// `fail_fast: false`: a bad sample still fails verification, but every check is sampled to
/// the end of the bake for the evidence.
#[tokio::test]
async fn without_fail_fast_every_check_is_sampled_to_the_end() {
    let fx = AlbFixture::start().await;
    let svc = FakeService::start("late").await;
    svc.script_health(&[true, true, false]);
    let v = format!(
        "  bake: 2s\n  interval: 200ms\n  fail_fast: false\n  health_probe: {{url: \"{}\", successes: 2, interval: 100ms, timeout: 1s}}",
        svc.health_url()
    );
    let (app, _aws) = start(&fx, &v, vec![], None).await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "dr06", &ago(60), None)],
    ))
    .await;
    let list = app
        .wait_incidents("verification failed", |l| {
            l.len() == 1 && l[0]["phase"] == "verification_failed"
        })
        .await;
    let inc = app.incident(list[0]["id"].as_str().unwrap()).await;
    let probe = check(&inc, "health_probe");
    assert_eq!(probe["passed"], false);
    assert_eq!(
        probe["value"], "HTTP 500",
        "the deciding sample is the bad one: {probe}"
    );
    let samples = probe["samples"].as_array().unwrap();
    assert!(samples.len() > 3, "probed on after the bad answer: {probe}");
    assert_eq!(samples.len(), svc.health_requests());
    let rb = check(&inc, "read_back");
    assert_eq!(rb["stopped"], false, "{rb}");
    assert_eq!(rb["passed"], true, "the read-back held to the end: {rb}");
}

/// Item 5 of issue 21: before failing on "still firing", the Alertmanager that sent the alert
/// (the payload's `externalURL`) is asked. Its resolved notification is lost here (its webhook
/// goes nowhere), as when an HA member dies before sending it.
async fn lost_resolve(resolve_at_source: bool) -> Value {
    let fx = AlbFixture::start().await;
    let nowhere = format!("http://127.0.0.1:{}/nowhere", crate::peers::free_port());
    let am = crate::peers::Alertmanager::start(&nowhere, TOKEN).await;
    let (app, _aws) = start(
        &fx,
        "  bake: 3s\n  interval: 200ms\n  alert_resolves: true",
        vec![],
        None,
    )
    .await;
    let run = uuid::Uuid::now_v7().simple().to_string();
    let labels = json!({"alertname": "HighErrorRate", "service": "portal-api", "severity": "critical", "run": run});
    let starts = ago(60);
    am.post(labels.clone(), &starts, None).await;
    let mut p = payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "dr07", &starts, None)],
    );
    p["externalURL"] = json!(am.url);
    p["alerts"][0]["labels"] = labels.clone();
    app.post_webhook(&p).await;
    let list = app
        .wait_incidents("verifying", |l| l.len() == 1 && l[0]["phase"] == "verifying")
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    if resolve_at_source {
        am.post(labels, &starts, Some(&ago(0))).await;
    }
    let inc = app
        .wait_incident(&id, "verdict", |i| {
            i["phase"] == "verified" || i["phase"] == "verification_failed"
        })
        .await;
    let a = check(&inc, "alert_resolved");
    json!({"phase": inc["phase"], "check": a, "am": am.url})
}

#[tokio::test]
async fn a_lost_resolve_is_checked_with_the_alertmanager_that_sent_the_alert() {
    let out = lost_resolve(true).await;
    assert_eq!(out["phase"], "verified", "{out:#}");
    let value = out["check"]["value"].as_str().unwrap();
    assert_eq!(
        value,
        format!(
            "resolved at the source: no resolved notification received; HighErrorRate: no longer held by {}",
            out["am"].as_str().unwrap()
        ),
        "{out:#}"
    );
}

#[tokio::test]
async fn an_alert_its_alertmanager_still_holds_fails_verification() {
    let out = lost_resolve(false).await;
    assert_eq!(out["phase"], "verification_failed", "{out:#}");
    let value = out["check"]["value"].as_str().unwrap();
    assert_eq!(
        value,
        format!(
            "1 firing: HighErrorRate: still active at {}",
            out["am"].as_str().unwrap()
        ),
        "{out:#}"
    );
}
