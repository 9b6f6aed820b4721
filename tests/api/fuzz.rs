//! A seeded, bounded mutation fuzzer over every HTTP endpoint: valid requests (signed where
//! the endpoint wants a signature, and signed again after the mutation so that most of them
//! reach the handler's parsing) have their bodies, fields, headers and paths mutated: empty,
//! huge, unicode, NUL, huge numbers, dates and durations past the calendar, wrong types,
//! broken bytes. For each request: an answer (no dropped connection), no 5xx but 503, and a
//! rejected (4xx) request stores nothing. A failure prints the request in full and its seed;
//! the seed replays the same choices of mutation (the incident id and the timestamps differ per
//! run). FUZZ_SEED=<n> FUZZ_CASES=<n> cargo test --test api fuzz:: runs another round.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::edges::{edge_env, slack_sign, API_TOKEN, PD_ACTION_TOKEN, PD_SECRET};
use crate::helpers::*;

const DEFAULT_SEED: u64 = 0x5eed_2026_1203;
const DEFAULT_CASES: usize = 2500;

#[derive(Clone, Copy, PartialEq)]
enum Sign {
    None,
    Slack,
    PagerDuty,
}

#[derive(Clone, Copy, PartialEq)]
enum Shape {
    Json,
    Form,
    /// A form whose `payload` field is JSON (Slack interactions).
    FormJson,
    Empty,
}

#[derive(Clone)]
struct Req {
    method: reqwest::Method,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    sign: Sign,
    shape: Shape,
}

fn req(method: reqwest::Method, path: &str, headers: &[(&str, &str)], body: Vec<u8>, sign: Sign, shape: Shape) -> Req {
    Req {
        method,
        path: path.to_string(),
        headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        body,
        sign,
        shape,
    }
}

fn slack_form(text: &str) -> Vec<u8> {
    serde_urlencoded::to_string([
        ("command", "/rollback"),
        ("text", text),
        ("user_id", "U1"),
        ("channel_id", "C0FUZZ"),
        ("response_url", "http://127.0.0.1:9/unused"),
        ("trigger_id", "t-1"),
    ])
    .unwrap()
    .into_bytes()
}

/// One valid request per endpoint and variant; `incident` is an incident awaiting approval.
fn seeds(incident: &str) -> Vec<Req> {
    use reqwest::Method as M;
    let bearer = format!("Bearer {TOKEN}");
    let api = format!("Bearer {API_TOKEN}");
    let pd_action = format!("Bearer {PD_ACTION_TOKEN}");
    let json_ct = ("content-type", "application/json");
    let form_ct = ("content-type", "application/x-www-form-urlencoded");
    let webhook = payload(
        "firing",
        vec![
            alert("HighErrorRate", "fuzz", "f00d", "2026-11-30T10:00:00Z", None),
            alert(
                "HighLatency",
                "fuzz",
                "f00e",
                "2026-11-30T10:00:00.123456789Z",
                Some("2026-11-30T10:05:00Z"),
            ),
        ],
    );
    let interaction = json!({
        "type": "block_actions", "user": {"id": "U1", "username": "u", "team_id": "T0"},
        "container": {"type": "message", "message_ts": "1763790000.000100", "channel_id": "C0"},
        "response_url": "http://127.0.0.1:9/unused", "trigger_id": "t",
        "actions": [{"type": "button", "action_id": "approve", "block_id": "b", "value": incident, "action_ts": "1763790001.0"}],
    });
    let interaction = serde_urlencoded::to_string([("payload", interaction.to_string())]).unwrap();
    let pd_event = json!({"event": {
        "id": "evt-1", "event_type": "incident.annotated", "occurred_at": "2026-11-30T10:00:00Z",
        "agent": {"id": "P0ONCALL", "summary": "On Call"},
        "data": {"type": "incident_note", "incident": {"id": "PDINC1"}, "content": "rollback approve"}}});
    let pd_ack = json!({"event": {"id": "evt-2", "event_type": "incident.acknowledged",
        "data": {"type": "incident", "id": "PDINC1", "incident_key": incident}}});
    let pd_body = json!({"action": "approve", "incident_id": "PDINC1", "user_id": "P0ONCALL", "reason": "fine"});
    let freeze = json!({"policy": "checkout", "reason": "fuzz", "duration": "2h", "by": "fuzzer"});
    let mut out = vec![
        req(
            M::POST,
            "/webhook/alertmanager",
            &[("authorization", &bearer), json_ct],
            webhook.to_string().into_bytes(),
            Sign::None,
            Shape::Json,
        ),
        req(
            M::POST,
            "/slack/interactions",
            &[form_ct],
            interaction.into_bytes(),
            Sign::Slack,
            Shape::FormJson,
        ),
        req(
            M::POST,
            "/pagerduty/webhook",
            &[json_ct],
            pd_event.to_string().into_bytes(),
            Sign::PagerDuty,
            Shape::Json,
        ),
        req(
            M::POST,
            "/pagerduty/webhook",
            &[json_ct],
            pd_ack.to_string().into_bytes(),
            Sign::PagerDuty,
            Shape::Json,
        ),
        req(
            M::POST,
            "/pagerduty/action",
            &[("authorization", &pd_action), json_ct],
            pd_body.to_string().into_bytes(),
            Sign::None,
            Shape::Json,
        ),
        req(
            M::POST,
            "/api/v1/freezes",
            &[("authorization", &api), json_ct],
            freeze.to_string().into_bytes(),
            Sign::None,
            Shape::Json,
        ),
        req(
            M::GET,
            "/api/v1/freezes",
            &[("authorization", &api)],
            vec![],
            Sign::None,
            Shape::Empty,
        ),
        req(
            M::DELETE,
            "/api/v1/freezes/checkout",
            &[("authorization", &api)],
            vec![],
            Sign::None,
            Shape::Empty,
        ),
        req(
            M::GET,
            "/api/v1/incidents?open=true&limit=5",
            &[],
            vec![],
            Sign::None,
            Shape::Empty,
        ),
        req(
            M::GET,
            &format!("/api/v1/incidents/{incident}"),
            &[],
            vec![],
            Sign::None,
            Shape::Empty,
        ),
        req(M::GET, "/api/v1/policies", &[], vec![], Sign::None, Shape::Empty),
        req(M::GET, "/readyz", &[], vec![], Sign::None, Shape::Empty),
        req(M::GET, "/healthz", &[], vec![], Sign::None, Shape::Empty),
        req(M::GET, "/metrics", &[], vec![], Sign::None, Shape::Empty),
    ];
    for text in [
        "help".to_string(),
        format!("status {incident}"),
        format!("approve {incident}"),
        format!("deny {incident} not now"),
        "freeze 2h checkout".into(),
        "freeze 30m".into(),
        "unfreeze checkout".into(),
        "now checkout fuzzing".into(),
    ] {
        out.push(req(
            M::POST,
            "/slack/commands",
            &[form_ct],
            slack_form(&text),
            Sign::Slack,
            Shape::Form,
        ));
    }
    out
}

/// Values that broke, or could break, something somewhere.
fn odd_string(rng: &mut fastrand::Rng) -> String {
    const ODD: &[&str] = &[
        "",
        " ",
        "\u{0}",
        "a\u{0}b",
        "\u{0}\u{0}\u{0}",
        "ünïcødé 🚀 \u{202e}txet",
        "\u{feff}",
        "\\",
        "\"",
        "%00",
        "1000000years",
        "500000000000years",
        "99999999999999999999years",
        "18446744073709551615s",
        "-1s",
        "0s",
        "1ns",
        "2h",
        "9999-12-31T23:59:59Z",
        "+262143-12-31T23:59:59Z",
        "-262144-01-01T00:00:00Z",
        "0001-01-01T00:00:00Z",
        "1970-01-01T00:00:00Z",
        "2026-13-45T25:61:61Z",
        "99999999999999999999",
        "-9223372036854775808",
        "NaN",
        "freeze 1000000years",
        "freeze 500000000000years checkout",
        "freeze -5h",
        "approve",
        "deny",
        "status",
        "now",
        "unfreeze *",
        "*",
        "../../etc/passwd",
        "<script>",
    ];
    match rng.u8(0..10) {
        0 => "x".repeat(rng.usize(1_000..80_000)),
        1 => (0..rng.usize(1..40)).map(|_| rng.char(..)).collect(),
        _ => ODD[rng.usize(..ODD.len())].to_string(),
    }
}

fn odd_value(rng: &mut fastrand::Rng) -> Value {
    match rng.u8(0..12) {
        0 => json!(u64::MAX),
        1 => json!(i64::MIN),
        2 => json!(1e308),
        3 => json!(-1),
        4 => json!(0),
        5 => Value::Null,
        6 => json!(true),
        7 => json!([]),
        8 => json!({}),
        9 => json!([odd_string(rng)]),
        _ => json!(odd_string(rng)),
    }
}

/// Mutates one random node of a JSON document.
fn mutate_json(rng: &mut fastrand::Rng, v: &mut Value) {
    let descend = rng.u8(0..3) > 0;
    match v {
        Value::Object(m) if !m.is_empty() && descend => {
            let k = m.keys().nth(rng.usize(..m.len())).cloned().unwrap();
            return mutate_json(rng, m.get_mut(&k).unwrap());
        }
        Value::Array(a) if !a.is_empty() && descend => {
            let i = rng.usize(..a.len());
            return mutate_json(rng, &mut a[i]);
        }
        _ => {}
    }
    let node = v;
    match (rng.u8(0..6), &mut *node) {
        (0, Value::Object(m)) if !m.is_empty() => {
            let k = m.keys().nth(rng.usize(..m.len())).cloned().unwrap();
            m.remove(&k);
        }
        (1, Value::Object(m)) => {
            m.insert(odd_string(rng), odd_value(rng));
        }
        (2, Value::Array(a)) if !a.is_empty() => {
            let dup = a[rng.usize(..a.len())].clone();
            for _ in 0..rng.usize(1..50) {
                a.push(dup.clone());
            }
        }
        (3, Value::String(s)) => {
            let extra = odd_string(rng);
            let at = (0..=s.len())
                .filter(|i| s.is_char_boundary(*i))
                .nth(rng.usize(..=s.chars().count()))
                .unwrap_or(0);
            s.insert_str(at, &extra);
        }
        _ => *node = odd_value(rng),
    }
}

/// Mutates a body according to its shape, or its bytes.
fn mutate_body(rng: &mut fastrand::Rng, r: &mut Req) {
    if rng.u8(0..5) == 0 || r.shape == Shape::Empty {
        // Bytes: truncate, flip, insert, or a body where none belongs.
        let b = &mut r.body;
        match rng.u8(0..4) {
            0 if !b.is_empty() => b.truncate(rng.usize(..b.len())),
            1 if !b.is_empty() => {
                let i = rng.usize(..b.len());
                b[i] = rng.u8(..);
            }
            2 => {
                let i = rng.usize(..=b.len());
                let junk: Vec<u8> = (0..rng.usize(1..16)).map(|_| rng.u8(..)).collect();
                b.splice(i..i, junk);
            }
            _ => *b = odd_string(rng).into_bytes(),
        }
        return;
    }
    match r.shape {
        Shape::Json => {
            if let Ok(mut v) = serde_json::from_slice::<Value>(&r.body) {
                mutate_json(rng, &mut v);
                r.body = v.to_string().into_bytes();
            }
        }
        Shape::Form | Shape::FormJson => {
            let mut pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&r.body).unwrap_or_default();
            if pairs.is_empty() {
                return;
            }
            let i = rng.usize(..pairs.len());
            if r.shape == Shape::FormJson && pairs[i].0 == "payload" && rng.bool() {
                if let Ok(mut v) = serde_json::from_str::<Value>(&pairs[i].1) {
                    mutate_json(rng, &mut v);
                    pairs[i].1 = v.to_string();
                }
            } else if pairs[i].0 == "text" && rng.bool() {
                // Keep the subcommand, mutate its argument.
                let word = pairs[i].1.split(' ').next().unwrap_or("").to_string();
                pairs[i].1 = format!("{word} {}", odd_string(rng));
            } else if rng.u8(0..4) == 0 {
                pairs.remove(i);
            } else {
                pairs[i].1 = odd_string(rng);
            }
            r.body = serde_urlencoded::to_string(&pairs).unwrap_or_default().into_bytes();
        }
        Shape::Empty => {}
    }
}

fn mutate_path(rng: &mut fastrand::Rng, r: &mut Req) {
    let odd = urlencode(&odd_string(rng));
    r.path = match rng.u8(0..6) {
        0 => format!(
            "/api/v1/incidents?limit={}",
            ["-1", "0", "99999999999999999999", "x", "9223372036854775807"][rng.usize(..5)]
        ),
        1 => format!("/api/v1/incidents?open={odd}"),
        2 => format!("/api/v1/incidents/{odd}"),
        3 => format!("/api/v1/freezes/{odd}"),
        4 => format!("{}?{odd}={odd}", r.path.split('?').next().unwrap_or("/")),
        _ => format!("{}/{odd}", r.path.trim_end_matches('/')),
    };
    r.path.truncate(8_000);
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn mutate_headers(rng: &mut fastrand::Rng, r: &mut Req) {
    match rng.u8(0..4) {
        0 if !r.headers.is_empty() => {
            let i = rng.usize(..r.headers.len());
            r.headers.remove(i);
        }
        1 => r.headers.push((
            "content-type".into(),
            [
                "text/plain",
                "application/json; charset=utf-16",
                "",
                "multipart/form-data",
            ][rng.usize(..4)]
            .into(),
        )),
        2 => r.headers.push((
            "authorization".into(),
            format!(
                "Bearer {}",
                odd_string(rng)
                    .chars()
                    .filter(|c| c.is_ascii_graphic())
                    .take(200)
                    .collect::<String>()
            ),
        )),
        _ => r.headers.push((
            "x-webhook-id".into(),
            odd_string(rng)
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .take(200)
                .collect(),
        )),
    }
}

fn pd_sign(body: &[u8]) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(PD_SECRET.as_bytes()).unwrap();
    m.update(body);
    format!("v1={}", hex::encode(m.finalize().into_bytes()))
}

/// Signs the request as the endpoint wants, with a timestamp that is sometimes odd.
fn sign(rng: &mut fastrand::Rng, r: &mut Req, odd_timestamp: bool) {
    match r.sign {
        Sign::None => {}
        Sign::Slack => {
            let ts = if odd_timestamp {
                ["99999999999999999999", "-9223372036854775808", "abc", "", "0", "1e10"][rng.usize(..6)].to_string()
            } else {
                chrono::Utc::now().timestamp().to_string()
            };
            let body = String::from_utf8_lossy(&r.body).into_owned();
            r.headers.push(("x-slack-request-timestamp".into(), ts.clone()));
            r.headers.push(("x-slack-signature".into(), slack_sign(&ts, &body)));
        }
        Sign::PagerDuty => r.headers.push(("x-pagerduty-signature".into(), pd_sign(&r.body))),
    }
}

/// What only request handlers write: alerts (and their status), freezes, votes. (Background
/// work writes incidents, events and the outbox on its own time; Slack's replay receipts are
/// written before the request is read, by design.)
async fn snapshot(conn: &mut sqlx::AnyConnection) -> Vec<String> {
    use sqlx::Row;
    let mut out = Vec::new();
    for q in [
        "SELECT COUNT(*) FROM alerts",
        "SELECT COUNT(*) FROM alerts WHERE status = 'resolved'",
        "SELECT COUNT(*) FROM approvals",
    ] {
        let row = sqlx::query(q)
            .fetch_one(&mut *conn)
            .await
            .unwrap_or_else(|e| panic!("{q}: {e}"));
        out.push(format!(
            "{q}: {}",
            row.try_get::<i64, _>(0).unwrap_or_else(|e| panic!("{q}: {e}"))
        ));
    }
    let freezes = sqlx::query("SELECT scope, reason, by_whom, at, until_at FROM freezes ORDER BY scope")
        .fetch_all(&mut *conn)
        .await
        .expect("read the freezes");
    for f in freezes {
        out.push(format!(
            "freeze {} {} {} {} {:?}",
            f.get::<String, _>(0),
            f.get::<String, _>(1),
            f.get::<String, _>(2),
            f.get::<i64, _>(3),
            f.get::<Option<i64>, _>(4)
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_requests_never_panic_never_5xx_but_503_and_store_nothing_when_rejected() {
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    let cases: usize = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    let app = spawn_app(Options {
        env: edge_env(),
        ..Options::default()
    })
    .await;
    // An incident waiting for approval, for the approve/deny paths to act on.
    let r = app
        .post_webhook(&payload(
            "firing",
            vec![alert("HighLatency", "checkout", "f001", &ago(60), None)],
        ))
        .await;
    assert_eq!(r.status(), 200);
    let list = app
        .wait_incidents("awaiting approval", |l| {
            l.iter().any(|i| i["phase"] == "awaiting_approval")
        })
        .await;
    let incident = list[0]["id"].as_str().unwrap().to_string();
    let seeds = seeds(&incident);
    sqlx::any::install_default_drivers();
    let mut db = <sqlx::AnyConnection as sqlx::Connection>::connect(&app.db.url)
        .await
        .unwrap();
    // A connection per request: a server may close a kept-alive connection after a response
    // (hyper does after a request whose body it did not read to the end), and a request the
    // client sends on it at that moment fails with "error sending request" though the server
    // never saw it. Seen 2 runs in 4 at case 660 after this round's merge, with nothing logged
    // by the server; with a connection per request, 3 runs in 3 passed. A request that reaches
    // the server and gets no answer is still a failure, as before.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for case in 0..cases {
        let mut r = seeds[rng.usize(..seeds.len())].clone();
        let mutations = rng.usize(1..4);
        for _ in 0..mutations {
            match rng.u8(0..10) {
                0 => mutate_path(&mut rng, &mut r),
                1 => mutate_headers(&mut rng, &mut r),
                _ => mutate_body(&mut rng, &mut r),
            }
        }
        let odd_ts = rng.u8(0..10) == 0;
        // Mostly signed after the mutation (reaches the handler), sometimes before (must be
        // refused), sometimes with an odd timestamp.
        if rng.u8(0..10) == 0 {
            let body = std::mem::take(&mut r.body);
            let mut signed = r.clone();
            signed.body = seeds[0].body.clone();
            sign(&mut rng, &mut signed, odd_ts);
            r.headers = signed.headers;
            r.body = body;
        } else {
            sign(&mut rng, &mut r, odd_ts);
        }
        let before = snapshot(&mut db).await;
        let mut rb = http.request(r.method.clone(), app.url(&r.path)).body(r.body.clone());
        for (k, v) in &r.headers {
            if let (Ok(k), Ok(v)) = (
                reqwest::header::HeaderName::from_bytes(k.as_bytes()),
                reqwest::header::HeaderValue::from_str(v),
            ) {
                rb = rb.header(k, v);
            }
        }
        let what = || {
            format!(
                "case {case} (FUZZ_SEED={seed}): {} {} headers {:?} body {:?}",
                r.method,
                r.path,
                r.headers,
                String::from_utf8_lossy(&r.body).chars().take(600).collect::<String>()
            )
        };
        let resp = rb
            .send()
            .await
            .unwrap_or_else(|e| panic!("no answer ({e:?}) to {}", what()));
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        *statuses.entry(status).or_default() += 1;
        assert!(status < 500 || status == 503, "{status} {text} for {}", what());
        if status == 503 {
            eprintln!("fuzz: 503 {text} for {}", what());
        }
        if (400..500).contains(&status) {
            let after = snapshot(&mut db).await;
            assert_eq!(
                before,
                after,
                "a rejected request ({status} {text}) changed the store: {}",
                what()
            );
        }
    }
    eprintln!("fuzz: seed {seed}, {cases} cases, statuses {statuses:?}");
    // Every endpoint was reached past its checks at least sometimes, and nothing panicked.
    assert!(statuses.get(&200).copied().unwrap_or(0) > cases / 20, "{statuses:?}");
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!metrics.contains("rollback_responder_panics_total{"), "{metrics}");
    assert_eq!(app.get_json("/readyz").await["ready"], true);
}
