//! Operating it: metrics after a full incident, policy hot reload that refuses a broken set,
//! the kill switch through the authenticated API.

use std::time::{Duration, Instant};

use rollback_responder::action::Executors;
use serde_json::json;

use crate::helpers::*;
use crate::support::alb_fixture::{weights, AlbFixture};

fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name_and_labels} in:\n{text}"))
}

async fn metrics(app: &TestApp) -> String {
    app.http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn alb_policy(fx: &AlbFixture) -> String {
    format!(
        "name: portal-api\nservice: portal-api\nmatchers: ['service=\"portal-api\"']\ntarget:\n  alb:\n    listener_arn: {}\n    stable_target_group_arn: {}\ntriggers:\n  - name: errors\n    matchers: ['alertname=\"HighErrorRate\"']\n    mode: auto\nverification: {{bake: 1s, interval: 200ms}}\n",
        fx.listener_arn, fx.stable_tg
    )
}

#[tokio::test]
async fn the_metrics_endpoint_reflects_a_full_incident() {
    let fx = AlbFixture::start().await;
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", alb_policy(&fx))],
        executors: Some(Executors {
            alb: Some(fx.executor()),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    let body = payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "fa01", &ago(90), None)],
    );
    app.post_webhook(&body).await;
    app.post_webhook(&body).await;
    app.wait_incidents("verified", |l| l.len() == 1 && l[0]["phase"] == "verified")
        .await;
    let m = metrics(&app).await;
    assert_eq!(
        metric(&m, "rollback_responder_notifications_received_total{status=\"firing\"}"),
        2.0
    );
    assert_eq!(
        metric(&m, "rollback_responder_alerts_received_total{status=\"firing\"}"),
        2.0
    );
    assert_eq!(metric(&m, "rollback_responder_alerts_duplicate_total"), 1.0);
    assert_eq!(
        metric(
            &m,
            "rollback_responder_decisions_total{outcome=\"auto\",policy=\"portal-api\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&m, "rollback_responder_actions_total{kind=\"alb\",result=\"changed\"}"),
        1.0
    );
    assert_eq!(
        metric(&m, "rollback_responder_action_duration_seconds_count{kind=\"alb\"}"),
        1.0
    );
    assert_eq!(metric(&m, "rollback_responder_alert_to_action_seconds_count"), 1.0);
    assert!(
        metric(&m, "rollback_responder_alert_to_action_seconds_sum") >= 90.0,
        "alert started 90 s before"
    );
    assert_eq!(metric(&m, "rollback_responder_action_to_verified_seconds_count"), 1.0);
    assert_eq!(metric(&m, "rollback_responder_incidents_open"), 1.0);
    assert_eq!(metric(&m, "rollback_responder_approvals_pending"), 0.0);
    assert_eq!(metric(&m, "rollback_responder_store_errors_total"), 0.0);
}

#[tokio::test]
async fn a_broken_policy_reload_keeps_the_old_set_and_a_good_one_takes_over() {
    let app = spawn_app(Options::default()).await;
    let before = app.get_json("/api/v1/policies").await["hash"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = app.dir.path().join("policies");
    std::fs::write(
        dir.join("broken.yaml"),
        "name: broken\nservice: x\ntriggers: []\nbogus: 1\n",
    )
    .unwrap();
    // Wait for the reload to be refused (logged with the file and line), not a fixed time.
    let broken = dir.join("broken.yaml");
    let refused =
        crate::support::log_capture::wait_logged(&["policy reload rejected", &format!("{}:4:", broken.display())])
            .await;
    assert!(refused[0].contains("bogus"), "{refused:?}");
    assert_eq!(
        app.get_json("/api/v1/policies").await["hash"],
        before.as_str(),
        "a broken set is refused whole"
    );
    assert_eq!(app.get_json("/readyz").await["ready"], true);
    // Fix it: the new set (two policies) takes over, and decisions record its hash.
    let fixed = CHECKOUT_POLICY
        .replace("name: checkout", "name: billing")
        .replace("service=\\\"checkout\\\"", "service=\\\"billing\\\"");
    let fixed = fixed
        .replace("listener/app/checkout/1/2", "listener/app/billing/1/2")
        .replace(
            "matchers: ['service=\"checkout\"']",
            "matchers: ['service=\"billing\"']",
        );
    std::fs::write(dir.join("broken.yaml"), fixed).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let p = app.get_json("/api/v1/policies").await;
        if p["hash"] != before.as_str() {
            assert_eq!(p["policies"].as_array().unwrap().len(), 2);
            break p["hash"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "reload never happened");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "billing", "fb01", &ago(30), None)],
    ))
    .await;
    let list = app.wait_incidents("billing incident", |l| l.len() == 1).await;
    assert_eq!(list[0]["policy"], "billing");
    assert_eq!(list[0]["decision"]["policy_hash"], after.as_str());
}

#[tokio::test]
async fn the_kill_switch_api_suppresses_automatic_rollbacks_and_says_so() {
    let fx = AlbFixture::start().await;
    let aws = crate::support::aws_proxy::AwsProxy::start(&fx.moto.endpoint, 1).await;
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", alb_policy(&fx))],
        executors: Some(Executors {
            alb: Some(rollback_responder::action::alb::AlbExecutor::new(
                crate::support::alb_fixture::elb_client(aws.endpoint(0)),
                &crate::support::alb_fixture::fast_settings(),
            )),
            ..Default::default()
        }),
        env: env(&[("ROLLBACK_RESPONDER__API__BEARER_TOKEN", "operator-token")]),
        ..Options::default()
    })
    .await;
    let url = app.url("/api/v1/freezes");
    let body = json!({"reason": "database failover in progress", "duration": "1h", "by": "alice"});
    assert_eq!(app.http.post(&url).json(&body).send().await.unwrap().status(), 401);
    assert_eq!(
        app.http
            .post(&url)
            .bearer_auth("nope")
            .json(&body)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let r = app
        .http
        .post(&url)
        .bearer_auth("operator-token")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(
        app.get_json("/readyz").await["freezes"]["global"]["reason"],
        "database failover in progress"
    );
    assert_eq!(
        metric(&metrics(&app).await, "rollback_responder_frozen{scope=\"*\"}"),
        1.0
    );

    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "fc01", &ago(60), None)],
    ))
    .await;
    let list = app
        .wait_incidents("suppressed", |l| l.len() == 1 && l[0]["phase"] == "suppressed")
        .await;
    let reason = list[0]["decision"]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("frozen: automatic rollbacks are frozen (global by api:alice until"),
        "{reason}"
    );
    assert!(reason.contains("database failover in progress"), "{reason}");
    assert_eq!(list[0]["decision"]["kind"], "frozen");
    assert_eq!(
        weights(&fx.listener_actions().await)[0].1,
        75,
        "nothing was rolled back"
    );
    assert_eq!(aws.calls(), vec![], "a frozen rollback makes no ELBv2 call at all");

    let r = app
        .http
        .delete(app.url("/api/v1/freezes/*"))
        .bearer_auth("operator-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["lifted"], true);
    assert_eq!(
        metric(&metrics(&app).await, "rollback_responder_frozen{scope=\"*\"}"),
        0.0
    );
}

#[tokio::test]
async fn a_freeze_in_the_config_file_holds_a_policy() {
    let app = spawn_app(Options {
        env: env(&[
            ("ROLLBACK_RESPONDER__SAFETY__FREEZE__POLICIES", "checkout"),
            ("ROLLBACK_RESPONDER__SAFETY__FREEZE__REASON", "quarterly close"),
        ]),
        ..Options::default()
    })
    .await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "checkout", "fd01", &ago(60), None)],
    ))
    .await;
    let list = app
        .wait_incidents("suppressed", |l| l.len() == 1 && l[0]["phase"] == "suppressed")
        .await;
    assert!(
        list[0]["decision"]["reason"]
            .as_str()
            .unwrap()
            .contains("policy checkout by config"),
        "{}",
        list[0]
    );
}

/// An approval request that expires with "roll back anyway" (here `auto_after`) is an
/// automatic rollback decided at that moment: a freeze switched on while the request was open
/// holds it, as it would hold a fresh alert.
#[tokio::test]
async fn a_freeze_holds_the_rollback_of_an_approval_request_that_expires() {
    let app = spawn_app(Options {
        env: env(&[("ROLLBACK_RESPONDER__API__BEARER_TOKEN", "operator-token")]),
        ..Options::default()
    })
    .await;
    // The checkout policy's breaker trigger asks for approval and rolls back after 2 s.
    app.post_webhook(&payload(
        "firing",
        vec![alert("CircuitBreakerOpen", "checkout", "fe01", &ago(0), None)],
    ))
    .await;
    let list = app
        .wait_incidents("awaiting approval", |l| {
            l.len() == 1 && l[0]["phase"] == "awaiting_approval"
        })
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    let r = app
        .http
        .post(app.url("/api/v1/freezes"))
        .bearer_auth("operator-token")
        .json(&json!({"reason": "database failover in progress", "duration": "1h", "by": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    let list = app
        .wait_incidents("held at expiry", |l| l.len() == 1 && l[0]["phase"] == "suppressed")
        .await;
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["decision"]["kind"], "frozen");
    let reason = list[0]["decision"]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("approval request expired; policy says rollback, but frozen: automatic rollbacks are frozen (global by api:alice"),
        "{reason}"
    );
    assert_eq!(list[0]["executed"], false);
    let timeline = app.incident(&id).await;
    let events = timeline["timeline"].as_array().unwrap();
    assert!(
        events.iter().all(|e| e["kind"] != "action_started"),
        "no action was started: {events:?}"
    );
}

/// The credentials are checked before the body is read: whatever an unauthenticated caller
/// sends (no JSON, wrong content type, unknown fields), it gets 401 and learns nothing of the
/// body's shape.
#[tokio::test]
async fn the_freeze_api_checks_credentials_before_it_reads_the_body() {
    let app = spawn_app(Options {
        env: env(&[("ROLLBACK_RESPONDER__API__BEARER_TOKEN", "operator-token")]),
        ..Options::default()
    })
    .await;
    let url = app.url("/api/v1/freezes");
    // Over the body limit too: 401, not a 413 that tells an unauthenticated caller the limit.
    let huge = format!(r#"{{"reason": "{}"}}"#, "x".repeat(3 << 20));
    let bodies: [(&str, &str); 5] = [
        ("text/plain", "freeze everything"),
        ("application/json", "{not json"),
        ("application/json", r#"{"bogus": 1}"#),
        ("application/json", r#"{"reason": "x", "duration": "soon"}"#),
        ("application/json", &huge),
    ];
    for (ct, body) in bodies {
        for token in [None, Some("nope")] {
            let mut req = app.http.post(&url).header("content-type", ct).body(body.to_string());
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 401, "{token:?} {ct} {}", &body[..body.len().min(80)]);
            let text = r.text().await.unwrap();
            assert!(!text.contains("reason") && !text.contains("duration"), "{text}");
        }
    }
    // An operator with a malformed body is told what is wrong.
    let r = app
        .http
        .post(&url)
        .bearer_auth("operator-token")
        .header("content-type", "application/json")
        .body(r#"{"bogus": 1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e = r.json::<serde_json::Value>().await.unwrap()["error"].to_string();
    assert!(e.contains("freeze body") && e.contains("bogus"), "{e}");
    // The same order on lifting a freeze.
    let r = app.http.delete(app.url("/api/v1/freezes/%FF")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        app.get_json("/readyz").await["freezes"]["global"],
        serde_json::Value::Null
    );
}

/// A duration past the calendar's end is refused with 400 naming the field: neither a panic
/// (`now + d` overflows) nor a freeze without end (chrono's Duration overflows first).
#[tokio::test]
async fn a_freeze_longer_than_the_calendar_is_refused_and_nothing_is_frozen() {
    let app = spawn_app(Options {
        env: env(&[("ROLLBACK_RESPONDER__API__BEARER_TOKEN", "operator-token")]),
        ..Options::default()
    })
    .await;
    for duration in ["1000000y", "1000000000y"] {
        let r = app
            .http
            .post(app.url("/api/v1/freezes"))
            .bearer_auth("operator-token")
            .json(&json!({"reason": "forever", "duration": duration, "by": "alice"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{duration}");
        let e = r.json::<serde_json::Value>().await.unwrap()["error"].to_string();
        assert!(e.contains("duration"), "{duration}: {e}");
        let ready = app.get_json("/readyz").await;
        assert_eq!(
            ready["freezes"]["global"],
            serde_json::Value::Null,
            "{duration}: {ready}"
        );
        assert_eq!(ready["freezes"]["policies"], json!({}), "{duration}: {ready}");
    }
    // The service still answers, and an ordinary duration still freezes.
    let r = app
        .http
        .post(app.url("/api/v1/freezes"))
        .bearer_auth("operator-token")
        .json(&json!({"reason": "failover", "duration": "2h"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(app.get_json("/readyz").await["freezes"]["global"]["reason"], "failover");
}

/// A freeze that would end at once is refused: there is one freeze per scope, so storing it
/// replaced the freeze in force (the kill switch) with one already over, while the answer said
/// "frozen". And lifting a freeze by an arbitrary scope changes nothing, the gauge included
/// (before, the scope went unescaped into `/metrics` and broke every scrape after it).
#[tokio::test]
async fn a_freeze_that_ends_at_once_is_refused_and_the_kill_switch_stays() {
    let app = spawn_app(Options {
        env: env(&[("ROLLBACK_RESPONDER__API__BEARER_TOKEN", "operator-token")]),
        ..Options::default()
    })
    .await;
    let post = |body: serde_json::Value| {
        app.http
            .post(app.url("/api/v1/freezes"))
            // The scheme in any case, as RFC 7235 has it.
            .header("authorization", "bearer  operator-token")
            .json(&body)
            .send()
    };
    let r = post(json!({"reason": "kill switch"})).await.unwrap();
    assert_eq!(r.status(), 201);
    for duration in ["0s", "1ns", "999ms"] {
        let r = post(json!({"reason": "oops", "duration": duration})).await.unwrap();
        assert_eq!(r.status(), 400, "{duration}");
        let e = r.json::<serde_json::Value>().await.unwrap()["error"].to_string();
        assert!(
            e.contains("duration") && e.contains("freezes nothing"),
            "{duration}: {e}"
        );
    }
    let global = &app.get_json("/readyz").await["freezes"]["global"];
    assert_eq!(global["reason"], "kill switch", "{global}");
    assert_eq!(global["until"], serde_json::Value::Null, "{global}");
    let metrics = || async {
        app.http
            .get(app.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    assert!(metrics().await.contains("rollback_responder_frozen{scope=\"*\"} 1\n"));
    let r = app
        .http
        .delete(app.url("/api/v1/freezes/x%22%7D%201%0Afoo"))
        .bearer_auth("operator-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["lifted"], false);
    let text = metrics().await;
    assert!(
        !text.lines().any(|l| l.starts_with("foo") || l.contains("scope=\"x")),
        "{text}"
    );
    assert!(text.contains("rollback_responder_frozen{scope=\"*\"} 1\n"), "{text}");
    let r = app
        .http
        .delete(app.url("/api/v1/freezes/%2A"))
        .bearer_auth("operator-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["lifted"], true);
    assert!(metrics().await.contains("rollback_responder_frozen{scope=\"*\"} 0\n"));
}

/// A dry run that finds the listener already stable is still a dry run: it ends in `dry_run`,
/// not in a verification (and possibly an escalation) of a rollback nobody did.
#[tokio::test]
async fn a_dry_run_that_finds_the_target_already_stable_ends_as_a_dry_run() {
    let fx = AlbFixture::start().await;
    fx.elb
        .modify_listener()
        .listener_arn(&fx.listener_arn)
        .default_actions(crate::support::alb_fixture::forward(
            &[(&fx.stable_tg, 100), (&fx.canary_tg, 0)],
            None,
        ))
        .send()
        .await
        .expect("ModifyListener");
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", alb_policy(&fx))],
        dry_run: Some(true),
        executors: Some(Executors {
            alb: Some(fx.executor()),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "fd01", &ago(60), None)],
    ))
    .await;
    let list = app
        .wait_incidents("settled", |l| {
            l.len() == 1 && !["executing", "waiting"].contains(&l[0]["phase"].as_str().unwrap())
        })
        .await;
    assert_eq!(list[0]["phase"], "dry_run", "{}", list[0]);
    assert_eq!(list[0]["executed"], false);
}
