//! The webhook edge: bad input gets a clear error and changes nothing.

use base64::Engine;
use serde_json::json;

use crate::helpers::*;

async fn stored(app: &TestApp) -> i64 {
    app.responder.store.alert_count().await.unwrap()
}

#[tokio::test]
async fn missing_or_wrong_credentials_get_401_and_store_nothing() {
    let app = spawn_app(Options::default()).await;
    let body = payload(
        "firing",
        vec![alert("HighErrorRate", "checkout", "aa01", &ago(60), None)],
    );
    let url = app.url("/webhook/alertmanager");
    let none = app.http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(none.status(), 401);
    assert_eq!(
        none.headers()["www-authenticate"],
        "Bearer, Basic realm=\"rollback-responder\""
    );
    let wrong = app
        .http
        .post(&url)
        .bearer_auth("test-webhook-token-7f3b")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let prefix = app
        .http
        .post(&url)
        .bearer_auth(&TOKEN[..TOKEN.len() - 1])
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(prefix.status(), 401);
    let basic = app
        .http
        .post(&url)
        .basic_auth("am", Some(TOKEN))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 401, "basic auth is not configured here");
    // A body over the limit without credentials is a 401 too: the credentials are checked
    // before the body is read, so no stranger learns the limit or gets a megabyte buffered.
    let oversized = app
        .http
        .post(&url)
        .header("content-type", "application/json")
        .body(vec![b' '; 3 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(oversized.status(), 401);
    assert_eq!(stored(&app).await, 0);
    assert!(app.incidents().await.is_empty());
}

/// `groupKey` and `externalURL` are copied into every alert's row: one far longer than
/// Alertmanager's is refused with the field named, and nothing is stored.
#[tokio::test]
async fn a_delivery_whose_group_key_would_be_copied_into_gigabytes_is_400() {
    let app = spawn_app(Options::default()).await;
    let mut body = payload(
        "firing",
        vec![alert("HighErrorRate", "checkout", "ab01", &ago(60), None)],
    );
    body["groupKey"] = json!("k".repeat(500_000));
    let r = app.post_webhook(&body).await;
    assert_eq!(r.status(), 400);
    let e = r.json::<serde_json::Value>().await.unwrap()["error"].to_string();
    assert!(e.contains("groupKey: 500000 bytes"), "{e}");
    assert_eq!(stored(&app).await, 0);
}

#[tokio::test]
async fn basic_auth_works_when_configured() {
    let opts = Options {
        env: env(&[
            ("ROLLBACK_RESPONDER__WEBHOOK__BASIC_AUTH__USERNAME", "alertmanager"),
            ("ROLLBACK_RESPONDER__WEBHOOK__BASIC_AUTH__PASSWORD", "pa55"),
        ]),
        ..Options::default()
    };
    let app = spawn_app(opts).await;
    let body = payload("firing", vec![alert("HighLatency", "checkout", "ab01", &ago(1), None)]);
    let url = app.url("/webhook/alertmanager");
    let bad = app
        .http
        .post(&url)
        .basic_auth("alertmanager", Some("pa56"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    let raw = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alertmanager:pa55")
    );
    let ok = app
        .http
        .post(&url)
        .header("authorization", raw)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    // The bearer token keeps working alongside basic auth.
    assert_eq!(app.post_webhook(&body).await.status(), 200);
    assert_eq!(stored(&app).await, 1);
}

#[tokio::test]
async fn malformed_payloads_get_400_saying_what_is_wrong() {
    let app = spawn_app(Options::default()).await;
    let url = app.url("/webhook/alertmanager");
    let cases = [
        ("{not json".to_string(), "not valid Alertmanager webhook JSON"),
        (
            json!({"version": "4", "status": "firing"}).to_string(),
            "missing field `alerts`",
        ),
        (
            payload("firing", vec![])
                .to_string()
                .replace("\"version\":\"4\"", "\"version\":\"5\""),
            "unsupported payload version \"5\"",
        ),
        (
            payload(
                "firing",
                vec![alert("HighErrorRate", "checkout", "ac02", "yesterday", None)],
            )
            .to_string(),
            "startsAt",
        ),
    ];
    for (body, expected) in cases {
        let r = app
            .http
            .post(&url)
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(v["error"].as_str().unwrap().contains(expected), "{body} -> {v}");
    }
    assert_eq!(stored(&app).await, 0);
}

#[tokio::test]
async fn oversized_payload_gets_413_and_stores_nothing() {
    let opts = Options {
        env: env(&[("ROLLBACK_RESPONDER__SERVER__BODY_LIMIT_BYTES", "4096")]),
        ..Options::default()
    };
    let app = spawn_app(opts).await;
    let alerts = (0..20)
        .map(|i| alert("HighErrorRate", "checkout", &format!("ad{i:02}"), &ago(1), None))
        .collect();
    let r = app.post_webhook(&payload("firing", alerts)).await;
    assert_eq!(r.status(), 413);
    assert_eq!(stored(&app).await, 0);
}

#[tokio::test]
async fn store_outage_answers_503_so_alertmanager_retries() {
    let app = spawn_app(Options::default()).await;
    app.responder.store.close().await;
    let r = app
        .post_webhook(&payload(
            "firing",
            vec![alert("HighErrorRate", "checkout", "ae01", &ago(1), None)],
        ))
        .await;
    assert_eq!(r.status(), 503);
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
}

#[tokio::test]
async fn health_readiness_and_policies_endpoints() {
    let app = spawn_app(Options::default()).await;
    assert_eq!(
        app.http
            .get(app.url("/healthz"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "ok"
    );
    let ready = app.get_json("/readyz").await;
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["store"], "ok");
    // No executor configured: the test app runs in dry run, and says so.
    assert_eq!(ready["dry_run"], true);
    let p = app.get_json("/api/v1/policies").await;
    assert_eq!(p["policies"][0]["name"], "checkout");
    assert_eq!(p["hash"], ready["policies"]["hash"]);
}

/// Alertmanager does not require `alertname`: an alert without it is stored (it matches no
/// trigger that names one) and does not take the valid alerts of its group down with it.
#[tokio::test]
async fn an_alert_without_alertname_is_stored_with_the_rest_of_its_group() {
    let app = spawn_app(Options::default()).await;
    let mut nameless = alert("HighErrorRate", "checkout", "ac01", &ago(1), None);
    nameless["labels"].as_object_mut().unwrap().remove("alertname");
    let valid = alert("HighErrorRate", "checkout", "ac03", &ago(1), None);
    let r = app.post_webhook(&payload("firing", vec![nameless, valid])).await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.responder.store.alert_count().await.unwrap(), 2);
    app.wait_incidents("the valid alert's incident", |l| l.len() == 1).await;
}

/// `workers.decide: false` (an intake-only replica; bench/callgrind.sh counts intake alone
/// with it): deliveries are stored and answered, nothing is decided, and the alerts wait,
/// pending, for a replica that decides.
#[tokio::test]
async fn an_intake_only_replica_stores_and_answers_and_leaves_the_deciding_to_another() {
    let opts = || Options {
        env: env(&[("ROLLBACK_RESPONDER__WORKERS__DECIDE", "false")]),
        ..Options::default()
    };
    let app = spawn_app(opts()).await;
    let body = payload(
        "firing",
        vec![alert("HighErrorRate", "checkout", "ab01", &ago(60), None)],
    );
    let r = app.post_webhook(&body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["stored"], 1);
    // Several ticks (100 ms each) and wakes go by: nothing is decided.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(app.incidents().await.is_empty(), "an intake-only replica decided");
    assert_eq!(app.responder.store.pending_alert_ids(10).await.unwrap().len(), 1);

    // A replica that decides (here: the same one restarted with the default) takes it over.
    let app = app.restart(Options::default()).await;
    let incidents = app.wait_incidents("the alert decided", |i| i.len() == 1).await;
    assert_eq!(incidents[0]["policy"], "checkout");
    app.wait_alerts_decided().await;
}
