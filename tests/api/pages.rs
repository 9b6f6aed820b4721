//! The incident pages: what a person sees in a real browser (headless Chromium) for an incident
//! that went through a refusal, an approval, a rollback on moto and verification; who may read;
//! the list's filters; bad input.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use rollback_responder::action::Executors;
use serde_json::Value;
use sha2::Sha256;
use wiremock::matchers::{method, path, query_param};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;
use crate::notify::{wait_requests, Peers, PD_KEY, SLACK_TOKEN, SP_KEY};
use crate::support::alb_fixture::{weights, AlbFixture};

const SIGNING_SECRET: &str = "5f1e2d3c4b5a69788796a5b4c3d2e1f0";
/// Attacker-controlled label value: script, markup that runs code when parsed, a quote breakout.
const XSS: &str =
    r#"<script>document.title='pwned'</script><img src=x onerror="document.title='pwned'">" onmouseover="x"#;

fn policy(fx: &AlbFixture) -> String {
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
    slack_users: [U0APPROVER]
  timeout: 1h
  on_timeout: escalate
verification:
  bake: 1s
  interval: 200ms
notify:
  slack: {{channel: "#portal-alerts"}}
  pagerduty: {{severity: critical}}
"##,
        listener = fx.listener_arn,
        stable = fx.stable_tg
    )
}

fn sign(ts: &str, body: &str) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(SIGNING_SECRET.as_bytes()).unwrap();
    m.update(format!("v0:{ts}:{body}").as_bytes());
    format!("v0={}", hex::encode(m.finalize().into_bytes()))
}

/// A signed `/rollback` slash command; returns the ephemeral text.
async fn command(app: &TestApp, user: &str, text: &str) -> String {
    let body = serde_urlencoded::to_string([
        ("command", "/rollback"),
        ("text", text),
        ("user_id", user),
        ("channel_id", "C0ALERTS"),
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
        .header("x-slack-signature", sign(&ts, &body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["text"].as_str().unwrap().to_string()
}

async fn get(app: &TestApp, path: &str) -> (u16, String) {
    let r = app.http.get(app.url(path)).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

// ---- the browser ----

/// Headless Chromium (Debian `chromium`, installed by tests/setup.sh), one fresh profile per run.
struct Browser {
    bin: PathBuf,
    profile: tempfile::TempDir,
}

impl Browser {
    fn new() -> Browser {
        let bin = std::env::var_os("CHROMIUM_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
        assert!(
            bin.exists(),
            "{} not found: run `eval \"$(bash tests/setup.sh)\"` (installs Debian's chromium) or set CHROMIUM_BIN",
            bin.display()
        );
        Browser {
            bin,
            profile: tempfile::tempdir().unwrap(),
        }
    }

    async fn run(&self, args: &[String], url: &str) -> String {
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", self.profile.path().display()))
        .args(args)
        .arg(url)
        .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
            .await
            .expect("chromium finished within 90 s")
            .expect("chromium runs");
        assert!(
            out.status.success(),
            "chromium {args:?} {url}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The DOM after the page loaded (scripts, if any had been injected, have run).
    async fn dom(&self, url: &str) -> String {
        self.run(&["--dump-dom".to_string()], url).await
    }

    async fn screenshot(&self, url: &str, to: &Path, width: u32, height: u32) {
        self.run(
            &[
                format!("--screenshot={}", to.display()),
                format!("--window-size={width},{height}"),
            ],
            url,
        )
        .await;
        let png = std::fs::read(to).unwrap();
        assert!(
            png.len() > 10_000 && png.starts_with(b"\x89PNG"),
            "{} is no screenshot",
            to.display()
        );
    }
}

/// The text a person reads: the DOM without tags, entities decoded, whitespace collapsed.
fn visible_text(dom: &str) -> String {
    let body = dom.split_once("<body").map(|(_, b)| b).unwrap_or(dom);
    let mut out = String::new();
    let mut in_tag = false;
    for c in body.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                out.push(' ');
            }
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    let out = out
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&");
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn title(dom: &str) -> &str {
    dom.split_once("<title>")
        .and_then(|(_, r)| r.split_once("</title>"))
        .map(|(t, _)| t)
        .unwrap_or("")
}

/// Where screenshots go: target/ always; docs/ too when UPDATE_DOCS_SCREENSHOTS=1.
fn shot_path(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/pages-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn publish(shot: &Path) {
    if std::env::var("UPDATE_DOCS_SCREENSHOTS").as_deref() == Ok("1") {
        let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs");
        std::fs::copy(shot, docs.join(shot.file_name().unwrap())).unwrap();
    }
}

#[tokio::test]
async fn a_person_follows_a_refused_then_approved_rollback_in_a_real_browser() {
    let browser = Browser::new();
    let fx = AlbFixture::start().await;
    let peers = Peers::start().await;
    Mock::given(method("GET"))
        .and(path("/usergroups.users.list"))
        .and(query_param("usergroup", "S0NONE"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({"ok": true, "users": []})))
        .mount(&peers.slack)
        .await;
    let mut vars = peers.env();
    vars.extend(env(&[
        ("ROLLBACK_RESPONDER__SLACK__SIGNING_SECRET", SIGNING_SECRET),
        (
            "ROLLBACK_RESPONDER__SERVER__PUBLIC_URL",
            "https://rollback.example.com/",
        ),
    ]));
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", policy(&fx))],
        env: vars,
        executors: Some(Executors {
            alb: Some(fx.executor()),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;

    // An alert whose label carries markup opens the incident; a second one joins it.
    let mut first = alert("HighLatency", "portal-api", "pg01", &ago(120), None);
    first["labels"]["pod"] = Value::String(XSS.into());
    first["annotations"]["summary"] = Value::String(format!("p95 over budget {XSS}"));
    first["generatorURL"] = Value::String("javascript:document.title='pwned'".into());
    app.post_webhook(&payload("firing", vec![first.clone()])).await;
    let list = app
        .wait_incidents("awaiting approval", |l| {
            l.len() == 1 && l[0]["phase"] == "awaiting_approval"
        })
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    let second = alert("HighLatency", "portal-api", "pg02", &ago(60), None);
    app.post_webhook(&payload("firing", vec![second.clone()])).await;
    app.wait_incident(&id, "the second alert joined", |i| {
        timeline_count(i, "alert_joined") == 1
    })
    .await;

    // While it waits for a human, the page is open and refreshes itself.
    let page = app.url(&format!("/incidents/{id}"));
    let dom = browser.dom(&page).await;
    assert!(dom.contains("http-equiv=\"refresh\""), "{dom}");
    assert!(visible_text(&dom).contains("awaiting approval"));

    // Someone who may not approve is refused; the approver approves; moto is rolled back.
    let refused = command(&app, "U0INTRUDER", &format!("approve {id}")).await;
    assert!(refused.contains("may not approve"), "{refused}");
    let approved = command(&app, "U0APPROVER", &format!("approve {id}")).await;
    assert!(approved.starts_with(":white_check_mark: Approved"), "{approved}");
    let inc = app.wait_incident(&id, "verified", |i| i["phase"] == "verified").await;
    assert_eq!(weights(&fx.listener_actions().await)[0].1, 100);
    // Every notification of the story delivered (the page says so only after the peers had them).
    wait_requests(&peers.pagerduty, 2, "PagerDuty trigger and acknowledge").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = app
            .responder
            .store
            .messages(&rollback_responder::incident::IncidentId(id.clone()))
            .await
            .unwrap();
        if !m.is_empty() && m.iter().all(|m| m["state"] == "delivered") {
            break;
        }
        assert!(Instant::now() < deadline, "notifications not delivered: {m:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The timeline, as a person sees it.
    let dom = browser.dom(&page).await;
    assert_eq!(title(&dom), "HighLatency on portal-api · rollback-responder");
    let text = visible_text(&dom);
    let reason = inc["decision"]["reason"].as_str().unwrap();
    let hash = inc["decision"]["policy_hash"].as_str().unwrap();
    for expected in [
        "HighLatency on portal-api verified",
        &format!("Decision manual : {reason}"),
        &hash[..12],
        "alert joined",
        "approval refused",
        "by slack:U0INTRUDER",
        "approved by <@U0APPROVER>",
        "by slack:U0APPROVER",
        "action step",
        "verification check",
        "check read_back: passed",
        "verification passed",
        "slack delivered message in #portal-alerts",
        "pagerduty delivered trigger:",
        "permanent link",
    ] {
        assert!(text.contains(expected), "the page does not show {expected:?}:\n{text}");
    }
    // Events in the order they happened.
    let pos = |s: &str| text.find(s).unwrap_or_else(|| panic!("{s} missing"));
    assert!(pos("approval refused") < pos("approved by <@U0APPROVER>"));
    assert!(pos("approved by <@U0APPROVER>") < pos("verification passed"));
    assert!(dom.contains("href=\"https://rollback.example.com/incidents/"));
    // The label's markup is text on the page, not markup: nothing ran, nothing was injected.
    assert!(text.contains("<script>document.title='pwned'</script>"), "{text}");
    assert!(!dom.contains("<img src=\"x\""), "{dom}");
    assert!(!dom.contains("href=\"javascript:"), "{dom}");
    assert!(!dom.to_lowercase().contains("<script"), "{dom}");
    // No secret of any configured peer appears.
    for secret in [SLACK_TOKEN, PD_KEY, SP_KEY, SIGNING_SECRET] {
        assert!(!dom.contains(secret), "the page shows a secret");
    }
    let shot = shot_path("incident-timeline.png");
    browser.screenshot(&page, &shot, 420, 2600).await;
    publish(&shot);

    // The list: the incident, open, with its phase; the filter form.
    let list_dom = browser.dom(&app.url("/incidents")).await;
    let list_text = visible_text(&list_dom);
    assert!(
        list_text.contains(&format!("HighLatency open {id}")) && list_text.contains("verified portal-api"),
        "{list_text}"
    );
    assert!(list_text.contains("1 shown, 1 open"), "{list_text}");
    assert!(list_dom.contains("http-equiv=\"refresh\""));
    let shot = shot_path("incident-list.png");
    browser.screenshot(&app.url("/incidents"), &shot, 1100, 700).await;
    publish(&shot);
    // The same list on a phone (target/ only): the table becomes one card per incident.
    browser
        .screenshot(&app.url("/incidents"), &shot_path("incident-list-phone.png"), 400, 700)
        .await;

    // Once every alert resolved the incident closes and its page stops refreshing.
    let mut r1 = first;
    r1["status"] = Value::String("resolved".into());
    r1["endsAt"] = Value::String(ago(1));
    let mut r2 = second;
    r2["status"] = Value::String("resolved".into());
    r2["endsAt"] = Value::String(ago(1));
    app.post_webhook(&payload("resolved", vec![r1, r2])).await;
    app.wait_incident(&id, "closed", |i| i["open"] == false).await;
    let dom = browser.dom(&page).await;
    assert!(!dom.contains("http-equiv=\"refresh\""), "{dom}");
    let text = visible_text(&dom);
    assert!(
        text.contains("alert resolved") && text.contains("State closed"),
        "{text}"
    );
}

fn portal(service: &str, listener: &str) -> String {
    format!(
        r#"
name: {service}
service: {service}
matchers: ['service="{service}"']
target:
  alb:
    listener_arn: arn:aws:elasticloadbalancing:us-east-1:123456789012:listener/app/{listener}/1/2
    stable_target_group_arn: arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/{listener}-stable/1
triggers:
  - name: errors
    matchers: ['alertname="HighErrorRate"']
    mode: auto
  - name: latency
    matchers: ['alertname="HighLatency"']
    mode: manual
approval:
  approvers: {{slack_users: [U1]}}
  timeout: 1h
  on_timeout: escalate
"#
    )
}

/// Two incidents: checkout waiting for approval (older, open), search rolled back in dry run
/// and closed (newer).
async fn two_incidents(extra_env: Vec<(String, String)>, http: reqwest::Client) -> (TestApp, String, String) {
    let mut app = spawn_app(Options {
        policies: vec![
            ("checkout.yaml", portal("checkout", "checkout")),
            ("search.yaml", portal("search", "search")),
        ],
        dry_run: Some(true),
        env: extra_env,
        ..Options::default()
    })
    .await;
    app.http = http;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighLatency", "checkout", "f001", &ago(60), None)],
    ))
    .await;
    app.wait_incidents("checkout waits", |l| {
        l.len() == 1 && l[0]["phase"] == "awaiting_approval"
    })
    .await;
    let starts = ago(30);
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "search", "f002", &starts, None)],
    ))
    .await;
    app.wait_incidents("search dry run", |l| {
        l.iter().any(|i| i["service"] == "search" && i["phase"] == "dry_run")
    })
    .await;
    app.post_webhook(&payload(
        "resolved",
        vec![alert("HighErrorRate", "search", "f002", &starts, Some(&ago(1)))],
    ))
    .await;
    let list = app
        .wait_incidents("search closed", |l| {
            l.iter().any(|i| i["service"] == "search" && i["open"] == false)
        })
        .await;
    let id_of = |s: &str| {
        list.iter().find(|i| i["service"] == s).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (checkout, search) = (id_of("checkout"), id_of("search"));
    (app, checkout, search)
}

#[tokio::test]
async fn the_list_shows_open_incidents_first_and_filters_by_service_and_phase() {
    let (app, checkout, search) = two_incidents(vec![], reqwest::Client::new()).await;
    // Newest first would put search (closed) on top; open ones come first.
    let (status, all) = get(&app, "/incidents").await;
    assert_eq!(status, 200);
    let (c, s) = (all.find(&checkout).unwrap(), all.find(&search).unwrap());
    assert!(c < s, "the open incident is not listed first");
    assert!(all.contains("2 shown, 1 open"), "{all}");
    let only = |html: &str, yes: &str, no: &str| html.contains(yes) && !html.contains(no);
    let (_, by_service) = get(&app, "/incidents?service=search").await;
    assert!(only(&by_service, &search, &checkout), "{by_service}");
    let (_, by_phase) = get(&app, "/incidents?phase=awaiting_approval&service=").await;
    assert!(only(&by_phase, &checkout, &search), "{by_phase}");
    let (_, open) = get(&app, "/incidents?open=true").await;
    assert!(only(&open, &checkout, &search), "{open}");
    let (_, none) = get(&app, "/incidents?service=checkout&phase=dry_run").await;
    assert!(none.contains("No incidents match."), "{none}");
    // The filter form keeps what was chosen.
    assert!(
        by_service.contains("<option value=\"search\" selected>search</option>"),
        "{by_service}"
    );
}

#[tokio::test]
async fn bad_filters_and_ids_are_400_naming_what_is_wrong_and_unknown_ids_404() {
    let (app, checkout, _) = two_incidents(vec![], reqwest::Client::new()).await;
    let before = app.incidents().await;
    for (path, names) in [
        ("/incidents?phase=exploded", "phase: unknown phase &quot;exploded&quot;"),
        ("/incidents?open=maybe", "open: &quot;maybe&quot; is not true or false"),
        ("/incidents?colour=red", "unknown field `colour`"),
        ("/incidents/not-an-id", "incident id: not an incident id"),
        ("/incidents/%3Cscript%3E", "incident id: not an incident id"),
    ] {
        let (status, body) = get(&app, path).await;
        assert_eq!(status, 400, "{path}");
        assert!(body.contains(names), "{path}: {body}");
        assert!(!body.to_lowercase().contains("<script"), "{path}: {body}");
    }
    let (status, body) = get(&app, &format!("/incidents/{}", uuid::Uuid::now_v7())).await;
    assert_eq!(status, 404);
    assert!(body.contains("No incident"), "{body}");
    let (status, _) = get(&app, &format!("/incidents/{checkout}")).await;
    assert_eq!(status, 200);
    // Reading changes nothing.
    let after = app.incidents().await;
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(&after) {
        assert_eq!((&b["phase"], &b["version"]), (&a["phase"], &a["version"]));
    }
    // `/` leads to the list.
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(app.url("/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/incidents");
}

#[tokio::test]
async fn with_a_read_token_pages_and_read_api_need_it_or_the_sso_proxy_header() {
    const READ: &str = "read-token-3c9d";
    const OPERATOR: &str = "operator-token-71aa";
    let mut auth = reqwest::header::HeaderMap::new();
    auth.insert("authorization", format!("Bearer {READ}").parse().unwrap());
    let (mut app, checkout, _) = two_incidents(
        env(&[
            ("ROLLBACK_RESPONDER__API__READ_TOKEN", READ),
            ("ROLLBACK_RESPONDER__API__BEARER_TOKEN", OPERATOR),
            ("ROLLBACK_RESPONDER__API__TRUSTED_USER_HEADER", "X-Auth-Request-User"),
        ]),
        reqwest::Client::builder().default_headers(auth).build().unwrap(),
    )
    .await;
    // From here on, a client without credentials of its own.
    app.http = reqwest::Client::new();
    let page = format!("/incidents/{checkout}");
    // A path that does not decode is judged after the credentials too.
    let r = app.http.get(app.url("/incidents/%FF")).send().await.unwrap();
    assert_eq!(r.status(), 401, "a malformed incident path without credentials");
    for path in ["/incidents", page.as_str(), "/api/v1/incidents", "/api/v1/policies"] {
        let r = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} without credentials");
        assert!(r.headers()["www-authenticate"].to_str().unwrap().contains("Basic"));
        let body = r.text().await.unwrap();
        assert!(!body.contains(READ) && !body.contains(OPERATOR), "{body}");
        for bad in [
            app.http.get(app.url(path)).bearer_auth("wrong"),
            app.http.get(app.url(path)).basic_auth("alice", Some("wrong")),
            app.http.get(app.url(path)).header("X-Forwarded-User", "mallory"),
        ] {
            assert_eq!(bad.send().await.unwrap().status(), 401, "{path}");
        }
        for good in [
            app.http.get(app.url(path)).bearer_auth(READ),
            app.http.get(app.url(path)).basic_auth("alice", Some(READ)),
            app.http.get(app.url(path)).bearer_auth(OPERATOR),
            app.http
                .get(app.url(path))
                .header("X-Auth-Request-User", "alice@example.com"),
        ] {
            let r = good.send().await.unwrap();
            assert_eq!(r.status(), 200, "{path}");
            let body = r.text().await.unwrap();
            assert!(!body.contains(READ) && !body.contains(OPERATOR), "{path} shows a token");
        }
    }
    let r = app
        .http
        .get(app.url("/incidents"))
        .header("X-Auth-Request-User", "alice@example.com")
        .send()
        .await
        .unwrap();
    assert!(r.text().await.unwrap().contains("signed in as alice@example.com"));
    // Probes stay open.
    assert_eq!(get(&app, "/healthz").await.0, 200);
}

#[tokio::test]
async fn a_store_outage_is_a_503_page_that_says_retry() {
    let (app, checkout, _) = two_incidents(vec![], reqwest::Client::new()).await;
    app.responder.store.close().await;
    for path in ["/incidents".to_string(), format!("/incidents/{checkout}")] {
        let r = app.http.get(app.url(&path)).send().await.unwrap();
        assert_eq!(r.status(), 503, "{path}");
        assert_eq!(r.headers()["retry-after"], "5");
        let body = r.text().await.unwrap();
        assert!(body.contains("The store is unavailable; retry in a moment."), "{body}");
        assert!(!body.contains("sqlite") && !body.contains("postgres"), "{body}");
    }
}
