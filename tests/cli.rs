//! The command line: `policy check` exit codes and messages, `simulate` output.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_rollback-responder");

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn policy_check_passes_on_the_shipped_policies() {
    let out = Command::new(BIN)
        .args(["policy", "check"])
        .arg(root().join("policies"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("5 policies, 35 triggers"), "{text}");
    assert!(!text.contains("warning"), "{text}");
}

#[test]
fn policy_check_prints_file_line_message_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(root().join("policies/portal-api.yaml")).unwrap();
    std::fs::write(
        dir.path().join("a.yaml"),
        good.replace("    for: 2m\n", "    for: 2m\n    fro: 1m\n"),
    )
    .unwrap();
    std::fs::write(dir.path().join("b.yaml"), "name: b\nservice: b\n").unwrap();
    let out = Command::new(BIN)
        .args(["policy", "check"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("a.yaml:") && lines[0].contains("unknown field `fro`"),
        "{text}"
    );
    assert!(lines[1].contains("b.yaml:1: missing field `target`"), "{text}");
}

#[test]
fn simulate_json_prints_one_decision_per_alert() {
    let out = Command::new(BIN)
        .args([
            "simulate",
            "--format",
            "json",
            "--at",
            "2026-11-22T02:10:00Z",
            "--policies",
        ])
        .arg(root().join("policies"))
        .arg(root().join("tests/fixtures/high-error-rate.json"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["alertname"], "HighErrorRate");
    assert_eq!(lines[0]["fingerprint"], "8c1d3e5f7a9b0c2d");
    assert_eq!(lines[0]["decision"], "auto");
    assert_eq!(lines[0]["policy"], "portal-api");
    assert_eq!(lines[1]["decision"], "suppressed");
    assert!(lines[1]["reason"].as_str().unwrap().starts_with("too young"));
}

#[test]
fn serve_refuses_to_start_on_a_broken_policy_and_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("x.yaml"),
        "name: x\nservice: x\ntarget: {alb: {listener_arn: arn:x, stable_target_group_arn: arn:y}}\ntriggers: []\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("ROLLBACK_RESPONDER__POLICIES_DIR", dir.path())
        .env(
            "ROLLBACK_RESPONDER__STORE__URL",
            format!("sqlite://{}", dir.path().join("db").display()),
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to start") && err.contains("x.yaml:4: triggers: list at least one trigger"),
        "{err}"
    );
}

/// `serve` with `env` on a fresh store in `dir`; its stderr once it has exited.
fn serve_refused(dir: &std::path::Path, env: &[(&str, &str)]) -> String {
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("ROLLBACK_RESPONDER__POLICIES_DIR", dir)
        .env(
            "ROLLBACK_RESPONDER__STORE__URL",
            format!("sqlite://{}", dir.join("db").display()),
        )
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn serve_outside_dry_run_refuses_a_policy_whose_executor_is_not_configured() {
    // The shipped policies revert ALB and Kubernetes targets; this config has neither
    // `aws:` nor `kubernetes:`, so outside dry run their rollbacks could only be recorded.
    let dir = tempfile::tempdir().unwrap();
    for f in ["portal-api.yaml", "portal-api-k8s.yaml"] {
        std::fs::copy(root().join("policies").join(f), dir.path().join(f)).unwrap();
    }
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("ROLLBACK_RESPONDER__POLICIES_DIR", dir.path())
        .env(
            "ROLLBACK_RESPONDER__STORE__URL",
            format!("sqlite://{}", dir.path().join("db").display()),
        )
        .env("ROLLBACK_RESPONDER__SAFETY__DRY_RUN", "false")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "the config exit code: {err}");
    assert!(err.contains("refusing to start"), "{err}");
    for (file, what, section) in [
        ("portal-api.yaml", "an ALB target", "`aws:`"),
        ("portal-api-k8s.yaml", "a Kubernetes target", "`kubernetes:`"),
    ] {
        let line = err
            .lines()
            .find(|l| l.contains(&format!("{}: policy", dir.path().join(file).display())))
            .unwrap_or_else(|| panic!("no line names {file}: {err}"));
        assert!(
            line.contains(what) && line.contains(&format!("add {section} settings")),
            "{line}"
        );
        assert!(line.contains("safety.dry_run: true"), "{line}");
    }
    // The same policies in dry run start (the embedded default is a dry run).
    let cwd = tempfile::tempdir().unwrap();
    std::fs::create_dir(cwd.path().join("policies")).unwrap();
    for f in std::fs::read_dir(root().join("policies")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, cwd.path().join("policies").join(f.file_name().unwrap())).unwrap();
    }
    let port = free_port();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .current_dir(cwd.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let ready = loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the embedded default exited with {status}");
        }
        let body = std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .and_then(|mut c| {
                use std::io::{Read, Write};
                c.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").ok()?;
                let mut s = String::new();
                c.read_to_string(&mut s).ok()?;
                Some(s)
            });
        if let Some(b) = body.filter(|b| b.starts_with("HTTP/1.0 200") || b.starts_with("HTTP/1.1 200")) {
            break b;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the embedded default never became ready"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(ready.contains("\"dry_run\":true"), "{ready}");
}

#[test]
fn serve_refuses_an_empty_policy_directory_and_a_freeze_on_an_unknown_policy() {
    // No policy means no rollback, ever.
    let dir = tempfile::tempdir().unwrap();
    let err = serve_refused(dir.path(), &[]);
    assert!(
        err.contains("refusing to start") && err.contains("no policy files"),
        "{err}"
    );
    assert_eq!(
        Command::new(BIN)
            .args(["policy", "check"])
            .arg(dir.path())
            .output()
            .unwrap()
            .status
            .code(),
        Some(1)
    );
    // A freeze on a name no policy has would freeze nothing while the log says FROZEN.
    std::fs::copy(
        root().join("policies/portal-api.yaml"),
        dir.path().join("portal-api.yaml"),
    )
    .unwrap();
    let err = serve_refused(
        dir.path(),
        &[("ROLLBACK_RESPONDER__SAFETY__FREEZE__POLICIES", "portal_api")],
    );
    assert!(
        err.contains("safety.freeze.policies names \"portal_api\", which no policy")
            && err.contains("(policies: portal-api)"),
        "{err}"
    );
}

/// A running `rollback-responder serve` child process with its log file; killed on drop.
struct Serve {
    child: std::process::Child,
    pub url: String,
    pub log: std::path::PathBuf,
    pub dir: tempfile::TempDir,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const POLICY: &str = r##"name: checkout
service: checkout
matchers: ['service="checkout"']
target:
  alb:
    listener_arn: arn:aws:elasticloadbalancing:us-east-1:123456789012:listener/app/checkout/1/2
    stable_target_group_arn: arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/checkout-stable/1
triggers:
  - name: errors
    matchers: ['alertname="HighErrorRate"']
    mode: auto
notify:
  slack: {channel: "#checkout"}
  pagerduty: {severity: critical}
"##;

async fn serve(env: &[(&str, String)]) -> Serve {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/checkout.yaml"), POLICY).unwrap();
    let port = free_port();
    let log = dir.path().join("serve.log");
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("ROLLBACK_RESPONDER__POLICIES_DIR", dir.path().join("policies"))
        .env(
            "ROLLBACK_RESPONDER__STORE__URL",
            format!("sqlite://{}", dir.path().join("rr.db").display()),
        )
        .env("ROLLBACK_RESPONDER__LOG__FORMAT", "json")
        .env("ROLLBACK_RESPONDER__WORKERS__TICK", "100ms")
        .env("ROLLBACK_RESPONDER__WORKERS__LEASE", "2s")
        // No `aws:` settings here: outside dry run the ALB policy would refuse start-up.
        .env("ROLLBACK_RESPONDER__SAFETY__DRY_RUN", "true")
        .env(
            "RUST_LOG",
            "debug,hyper=info,h2=info,sqlx=warn,reqwest=info,rustls=info",
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    let s = Serve {
        child,
        url: format!("http://127.0.0.1:{port}"),
        log,
        dir,
    };
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while http
        .get(format!("{}/readyz", s.url))
        .send()
        .await
        .map(|r| !r.status().is_success())
        .unwrap_or(true)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "serve never became ready:\n{}",
            std::fs::read_to_string(&s.log).unwrap_or_default()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    s
}

async fn wait_for(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !f().await {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn sighup_reloads_policies_and_a_broken_set_is_refused_with_file_and_line() {
    let s = serve(&[]).await;
    let http = reqwest::Client::new();
    let hash = |v: serde_json::Value| v["hash"].as_str().unwrap().to_string();
    let before = hash(
        http.get(format!("{}/api/v1/policies", s.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap(),
    );
    std::fs::write(
        s.dir.path().join("policies/checkout.yaml"),
        POLICY.replace("    mode: auto", "    mode: auto\n    moed: x"),
    )
    .unwrap();
    Command::new("kill")
        .args(["-HUP", &s.child.id().to_string()])
        .status()
        .unwrap();
    wait_for("the rejection in the log", async || {
        std::fs::read_to_string(&s.log)
            .unwrap()
            .contains("policy reload rejected")
    })
    .await;
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(
        log.contains("checkout.yaml:12: triggers[0]: unknown field `moed`") || log.contains("checkout.yaml:12:"),
        "{log}"
    );
    let now = hash(
        http.get(format!("{}/api/v1/policies", s.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap(),
    );
    assert_eq!(now, before, "the old set stays in force");
    std::fs::write(
        s.dir.path().join("policies/checkout.yaml"),
        POLICY.replace("mode: auto", "mode: manual\n    for: 1m").replace(
            "notify:",
            "approval: {approvers: {slack_users: [U1]}, on_timeout: escalate}\nnotify:",
        ),
    )
    .unwrap();
    Command::new("kill")
        .args(["-HUP", &s.child.id().to_string()])
        .status()
        .unwrap();
    let url = format!("{}/api/v1/policies", s.url);
    wait_for("the new set", async || {
        let v: serde_json::Value = http.get(&url).send().await.unwrap().json().await.unwrap();
        v["hash"].as_str() != Some(before.as_str())
    })
    .await;
    assert!(std::fs::read_to_string(&s.log).unwrap().contains("policies reloaded"));
}

#[tokio::test]
async fn logs_of_a_full_run_carry_incident_ids_and_never_a_secret() {
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};
    // A dry run goes to Slack only; Slack's first answer is a 503, so a retry is logged.
    let slack = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .mount(&slack)
        .await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(serde_json::json!({"ok": true, "channel": "C1", "ts": "1.2"})),
        )
        .mount(&slack)
        .await;
    let pd = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(202))
        .mount(&pd)
        .await;
    let secrets = [
        ("ROLLBACK_RESPONDER__WEBHOOK__BEARER_TOKEN", "whk-SECRET-1f2e3d"),
        ("ROLLBACK_RESPONDER__SLACK__BOT_TOKEN", "xoxb-SECRET-9a8b7c"),
        ("ROLLBACK_RESPONDER__SLACK__SIGNING_SECRET", "sign-SECRET-5e6f7a"),
        ("ROLLBACK_RESPONDER__PAGERDUTY__ROUTING_KEY", "pdkey-SECRET-0c1d2e"),
        ("ROLLBACK_RESPONDER__API__BEARER_TOKEN", "api-SECRET-3b4c5d"),
    ];
    let mut env: Vec<(&str, String)> = secrets.iter().map(|(k, v)| (*k, v.to_string())).collect();
    env.push(("ROLLBACK_RESPONDER__SLACK__API_URL", slack.uri()));
    env.push(("ROLLBACK_RESPONDER__PAGERDUTY__EVENTS_URL", pd.uri()));
    env.push(("ROLLBACK_RESPONDER__NOTIFICATIONS__INITIAL_BACKOFF", "50ms".into()));
    let s = serve(&env).await;
    let http = reqwest::Client::new();
    let body = std::fs::read_to_string(root().join("tests/fixtures/high-error-rate.json"))
        .unwrap()
        .replace("portal-api", "checkout");
    // A wrong token first (logged as rejected, without the token), then the real delivery.
    let r = http
        .post(format!("{}/webhook/alertmanager", s.url))
        .bearer_auth("wrong")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(format!("{}/webhook/alertmanager", s.url))
        .bearer_auth("whk-SECRET-1f2e3d")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let incidents = format!("{}/api/v1/incidents", s.url);
    wait_for("a settled incident with its notifications", async || {
        let v: serde_json::Value = http.get(&incidents).send().await.unwrap().json().await.unwrap();
        v["incidents"][0]["phase"] == "dry_run" && slack.received_requests().await.unwrap_or_default().len() >= 2
    })
    .await;
    let id = {
        let v: serde_json::Value = http.get(&incidents).send().await.unwrap().json().await.unwrap();
        v["incidents"][0]["id"].as_str().unwrap().to_string()
    };
    // Slack's first answer is a 503, logged as a retry: wait for that line, not a time.
    wait_for("the failed notification in the log", async || {
        std::fs::read_to_string(&s.log)
            .unwrap()
            .contains("notification not delivered; will retry")
    })
    .await;
    let log = std::fs::read_to_string(&s.log).unwrap();
    for (key, secret) in secrets {
        assert!(!log.contains(secret), "{key}'s value appears in the logs");
    }
    let lines: Vec<serde_json::Value> = log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let not_json: Vec<&str> = log
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_err())
        .collect();
    assert!(
        lines.len() > 5 && not_json.is_empty(),
        "every log line is JSON: {not_json:#?}"
    );
    let about_incident: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| ["incident opened", "incident phase changed"].contains(&l["message"].as_str().unwrap_or("")))
        .collect();
    assert!(!about_incident.is_empty());
    for l in about_incident {
        assert_eq!(l["incident"].as_str(), Some(id.as_str()), "{l}");
    }
    assert!(lines
        .iter()
        .any(|l| l["message"] == "notification not delivered; will retry" && l["incident"] == id.as_str()));
}

/// Runs the binary with `args`; (exit code, stdout, stderr).
fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("ROLLBACK_RESPONDER_URL")
        .env_remove("ROLLBACK_RESPONDER_TOKEN")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn incidents_and_incident_print_tables_from_a_running_service() {
    let s = serve(&[]).await;
    let http = reqwest::Client::new();
    let starts = chrono::Utc::now().to_rfc3339();
    let alert = |status: &str, ends: &str| {
        serde_json::json!({
            "version": "4", "groupKey": "{}:{}", "status": status, "receiver": "rr", "groupLabels": {},
            "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://am:9093",
            "alerts": [{
                "status": status, "startsAt": starts, "endsAt": ends, "fingerprint": "cli01",
                "generatorURL": "http://prom/graph",
                // An escape sequence in a label must not reach the terminal as one.
                "labels": {"alertname": "HighErrorRate", "service": "checkout", "pod": "web-1\u{1b}[2J\u{1b}[31mowned"},
                "annotations": {},
            }],
        })
    };
    let r = http
        .post(format!("{}/webhook/alertmanager", s.url))
        .json(&alert("firing", "0001-01-01T00:00:00Z"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let api = format!("{}/api/v1/incidents", s.url);
    wait_for("the incident settles", async || {
        let v: serde_json::Value = http.get(&api).send().await.unwrap().json().await.unwrap();
        v["incidents"][0]["phase"] == "dry_run"
    })
    .await;
    let v: serde_json::Value = http.get(&api).send().await.unwrap().json().await.unwrap();
    let id = v["incidents"][0]["id"].as_str().unwrap().to_string();

    let (code, out, err) = run(&["incidents", "--url", &s.url]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        ["ID", "PHASE", "STATE", "SERVICE", "ALERT", "OPENED", "(UTC)", "CHANGED"]
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        (row[0], row[1], row[2], row[3], row[4], row[7]),
        (id.as_str(), "dry_run", "open", "checkout", "HighErrorRate", "no")
    );
    // Columns line up: each header starts where its values start.
    assert_eq!(lines[0].find("PHASE"), lines[1].find("dry_run"));
    let (_, out, _) = run(&["incidents", "--url", &s.url, "--service", "search"]);
    assert_eq!(out, "No incidents.\n");
    let (_, out, _) = run(&["incidents", "--url", &s.url, "--service", "checkout", "--open"]);
    assert!(out.contains(&id), "{out}");

    let (code, out, err) = run(&["incident", "--url", &s.url, &id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with(&format!("Incident     {id}\n")), "{out}");
    assert!(out.contains("\nPhase        dry_run\n"), "{out}");
    assert!(out.contains("Decision     suppressed: dry run (global)"), "{out}");
    assert!(out.contains("\nTimeline ("), "{out}");
    assert!(out.contains("opened") && out.contains("executing -> dry_run"), "{out}");
    assert!(
        !out.contains('\u{1b}'),
        "an escape sequence reached the terminal: {out:?}"
    );
    assert!(out.contains("pod=web-1\\u{1b}[2J\\u{1b}[31mowned"), "{out}");

    // Unknown incident: 1; not an id: 2; nobody listening: 3.
    let (code, _, err) = run(&["incident", "--url", &s.url, "0193a0b4-2f4e-7c1a-9d2b-000000000000"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no incident 0193a0b4"), "{err}");
    let (code, _, err) = run(&["incident", "--url", &s.url, "../../etc"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not an incident id"), "{err}");
    let nobody = format!("http://127.0.0.1:{}", free_port());
    let (code, _, err) = run(&["incidents", "--url", &nobody]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("cannot reach"), "{err}");

    // Resolved and closed: --open lists nothing.
    let r = http
        .post(format!("{}/webhook/alertmanager", s.url))
        .json(&alert("resolved", &chrono::Utc::now().to_rfc3339()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_for("the incident closes", async || {
        let v: serde_json::Value = http.get(&api).send().await.unwrap().json().await.unwrap();
        v["incidents"][0]["open"] == false
    })
    .await;
    let (code, out, _) = run(&["incidents", "--url", &s.url, "--open"]);
    assert_eq!((code, out.as_str()), (0, "No incidents.\n"));
    let (_, out, _) = run(&["incidents", "--url", &s.url]);
    assert!(out.contains(" closed "), "{out}");
}

#[test]
fn every_subcommand_documents_the_same_exit_codes() {
    for args in [vec!["--help"], vec!["incidents", "--help"], vec!["incident", "--help"]] {
        let (code, out, _) = run(&args);
        assert_eq!(code, 0);
        assert!(
            out.contains("Exit codes (every subcommand):") && out.contains("3  unavailable"),
            "{args:?}: {out}"
        );
    }
    let (code, _, err) = run(&["incidents", "--no-such-flag"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn text_logs_carry_no_colour_codes_when_not_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let err = serve_refused(dir.path(), &[("ROLLBACK_RESPONDER__LOG__FORMAT", "text")]);
    // The refusal went through the text log (stderr is a pipe here).
    assert!(err.contains(" ERROR ") && err.contains("refusing to start"), "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "colour codes in a log that is not a terminal: {err:?}"
    );
}

#[tokio::test]
async fn the_terminal_view_sends_the_read_token_when_the_service_wants_one() {
    let s = serve(&[("ROLLBACK_RESPONDER__API__READ_TOKEN", "cli-read-7d1e".to_string())]).await;
    let (code, _, err) = run(&["incidents", "--url", &s.url]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("needs the read token") && !err.contains("cli-read-7d1e"),
        "{err}"
    );
    let (code, out, err) = run(&["incidents", "--url", &s.url, "--token", "cli-read-7d1e"]);
    assert_eq!((code, out.as_str()), (0, "No incidents.\n"), "{err}");
    let out = Command::new(BIN)
        .args(["incidents", "--url", &s.url])
        .env("ROLLBACK_RESPONDER_TOKEN", "cli-read-7d1e")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `simulate` over the shipped policies with one fixture per seed system: each alert falls
/// under its own service's policy, with the trigger and decision the seed asks for. The two
/// Portal API deployments are told apart by the `platform` label alone.
#[test]
fn each_seed_systems_alerts_fall_under_its_own_shipped_policy() {
    // (fingerprint, policy, trigger, decision) per alert of each fixture.
    type Expected = &'static [(&'static str, &'static str, &'static str, &'static str)];
    let cases: &[(&str, Expected)] = &[
        (
            "portal-api-alb",
            &[("a000000000000001", "portal-api", "error-rate-above-5pct", "auto")],
        ),
        (
            "portal-api-k8s",
            &[("a000000000000002", "portal-api-k8s", "health-check-failing", "auto")],
        ),
        (
            "squad-api",
            &[("a000000000000003", "squad-api", "error-rate-above-0.1pct", "manual")],
        ),
        (
            "x0tta6bl4",
            &[
                ("a000000000000004", "x0tta6bl4", "critical", "auto"),
                ("a000000000000005", "x0tta6bl4", "high", "escalate_later"),
                ("a000000000000006", "x0tta6bl4", "medium", "manual"),
            ],
        ),
        (
            "go-cutover",
            &[
                ("a000000000000007", "go-cutover", "error-rate-above-5pct", "auto"),
                ("a000000000000008", "go-cutover", "latency-above-1s", "manual"),
            ],
        ),
    ];
    for (fixture, expected) in cases {
        let out = Command::new(BIN)
            .args([
                "simulate",
                "--format",
                "json",
                "--at",
                "2026-11-22T03:00:00Z",
                "--policies",
            ])
            .arg(root().join("policies"))
            .arg(root().join(format!("tests/fixtures/seeds/{fixture}.json")))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{fixture}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let got: Vec<(String, String, String, String)> = lines
            .iter()
            .map(|l| {
                (
                    l["fingerprint"].as_str().unwrap_or_default().to_string(),
                    l["policy"].as_str().unwrap_or_default().to_string(),
                    l["trigger"].as_str().unwrap_or_default().to_string(),
                    l["decision"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        let want: Vec<(String, String, String, String)> = expected
            .iter()
            .map(|(f, p, t, d)| (f.to_string(), p.to_string(), t.to_string(), d.to_string()))
            .collect();
        assert_eq!(got, want, "{fixture}");
    }
}

/// An alert of the Kubernetes Portal API falls under the Kubernetes policy whichever file
/// comes first: the ALB policy excludes `platform="kubernetes"` itself.
#[test]
fn the_portal_api_policies_split_on_the_platform_label_in_any_file_order() {
    let dir = tempfile::tempdir().unwrap();
    // "0-" sorts the ALB policy first.
    std::fs::copy(root().join("policies/portal-api.yaml"), dir.path().join("0-alb.yaml")).unwrap();
    std::fs::copy(
        root().join("policies/portal-api-k8s.yaml"),
        dir.path().join("1-k8s.yaml"),
    )
    .unwrap();
    for (fixture, policy) in [("portal-api-k8s", "portal-api-k8s"), ("portal-api-alb", "portal-api")] {
        let out = Command::new(BIN)
            .args([
                "simulate",
                "--format",
                "json",
                "--at",
                "2026-11-22T03:00:00Z",
                "--policies",
            ])
            .arg(dir.path())
            .arg(root().join(format!("tests/fixtures/seeds/{fixture}.json")))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let line: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap();
        assert_eq!(line["policy"], policy, "{fixture}");
    }
}

/// Issue 20: a copy of a policy with the same matchers passes the check but can never match;
/// `policy check` says so as a warning, names both files, and still exits 0.
#[test]
fn policy_check_warns_about_a_policy_that_can_never_match() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(root().join("policies/portal-api.yaml")).unwrap();
    std::fs::write(dir.path().join("a-listener.yaml"), &good).unwrap();
    std::fs::write(
        dir.path().join("b-rule.yaml"),
        good.replacen("name: portal-api\n", "name: portal-api-rule\n", 1),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["policy", "check"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].contains("2 policies"), "{text}");
    assert!(
        lines[1].contains("b-rule.yaml:")
            && lines[1].contains("warning: policy \"portal-api-rule\" can never match: policy \"portal-api\"")
            && lines[1].contains("a-listener.yaml"),
        "{text}"
    );
}
