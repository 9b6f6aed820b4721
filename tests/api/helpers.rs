//! Spawning the real service for a test, on port 0, with its own database and policies.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rollback_responder::app::Application;
use rollback_responder::config;
use rollback_responder::responder::Responder;
use serde_json::{json, Value};
use tokio::sync::oneshot;

pub const TOKEN: &str = "test-webhook-token-7f3a";

/// A policy used by most tests: ALB target, short durations so tests run in seconds.
pub const CHECKOUT_POLICY: &str = r#"
name: checkout
service: checkout
matchers: ['service="checkout"']
target:
  alb:
    listener_arn: arn:aws:elasticloadbalancing:us-east-1:123456789012:listener/app/checkout/1/2
    stable_target_group_arn: arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/checkout-stable/1
triggers:
  - name: errors
    matchers: ['alertname="HighErrorRate"']
    for: 0s
    mode: auto
  - name: health
    matchers: ['alertname="HealthCheckFailing"']
    for: 2s
    mode: auto
  - name: latency
    matchers: ['alertname="HighLatency"']
    mode: manual
  - name: breaker
    matchers: ['alertname="CircuitBreakerOpen"']
    mode: {auto_after: 2s}
guards:
  cooldown: 1h
approval:
  approvers: {slack_users: [U1]}
  timeout: 1h
  on_timeout: escalate
"#;

/// How to start the service.
pub struct Options {
    pub policies: Vec<(&'static str, String)>,
    /// `safety.dry_run`. `None`: dry run unless the test hands in executors or sets `aws:` /
    /// `kubernetes:` through `env`, because outside dry run a policy whose executor is not
    /// configured refuses start-up. `Some(false)` without executors asks for that refusal.
    pub dry_run: Option<bool>,
    pub env: Vec<(String, String)>,
    /// Executors built by the test (an ELBv2 client on moto); `None`: from the config.
    pub executors: Option<rollback_responder::action::Executors>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            policies: vec![("checkout.yaml", CHECKOUT_POLICY.to_string())],
            dry_run: None,
            env: vec![],
            executors: None,
        }
    }
}

/// An ALB executor for a test whose ALB policies never act (they are loaded next to the one
/// under test): outside dry run every policy needs its executor, and this one reaches nothing
/// (nothing listens on port 9), so a call it did make would fail loudly.
pub fn alb_never_called() -> rollback_responder::action::alb::AlbExecutor {
    rollback_responder::action::alb::AlbExecutor::new(
        crate::support::alb_fixture::elb_client("http://127.0.0.1:9"),
        &crate::support::alb_fixture::fast_settings(),
    )
}

/// A fresh database per test: a SQLite file, or a PostgreSQL database created for the test
/// when TEST_DATABASE_URL is set (and dropped afterwards).
pub struct TestDb {
    pub url: String,
    _pg: Option<crate::support::pg::PgDb>,
}

impl TestDb {
    pub async fn new(dir: &std::path::Path) -> TestDb {
        match std::env::var("TEST_DATABASE_URL") {
            Ok(admin) if admin.starts_with("postgres") => {
                let pg = crate::support::pg::PgDb::create().await;
                TestDb {
                    url: pg.url.clone(),
                    _pg: Some(pg),
                }
            }
            _ => TestDb {
                url: format!("sqlite://{}", dir.join("rr.db").display()),
                _pg: None,
            },
        }
    }
}

/// The running service.
pub struct TestApp {
    pub addr: SocketAddr,
    pub responder: Arc<Responder>,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
    pub db: TestDb,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

pub fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Starts the service with `opts` on 127.0.0.1:0.
pub async fn spawn_app(opts: Options) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new(dir.path()).await;
    start_in(dir, db, opts).await
}

async fn start_in(dir: tempfile::TempDir, db: TestDb, opts: Options) -> TestApp {
    // Logs go to stderr: `cargo test -- --nocapture` with RUST_LOG=debug shows the service's.
    crate::support::log_capture::install();
    rollback_responder::telemetry::init(rollback_responder::config::LogFormat::Text, "warn");
    let policies: PathBuf = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    for (name, text) in &opts.policies {
        std::fs::write(policies.join(name), text).unwrap();
    }
    let executes = opts.executors.is_some()
        || opts.env.iter().any(|(k, _)| {
            k.starts_with("ROLLBACK_RESPONDER__AWS__") || k.starts_with("ROLLBACK_RESPONDER__KUBERNETES__")
        });
    let dry_run = opts.dry_run.unwrap_or(!executes);
    let mut vars = env(&[
        ("ROLLBACK_RESPONDER__STORE__URL", &db.url),
        ("ROLLBACK_RESPONDER__POLICIES_DIR", policies.to_str().unwrap()),
        ("ROLLBACK_RESPONDER__WEBHOOK__BEARER_TOKEN", TOKEN),
        ("ROLLBACK_RESPONDER__WORKERS__TICK", "100ms"),
        ("ROLLBACK_RESPONDER__WORKERS__LEASE", "2s"),
        (
            "ROLLBACK_RESPONDER__SAFETY__DRY_RUN",
            if dry_run { "true" } else { "false" },
        ),
    ]);
    vars.extend(opts.env);
    let cfg = config::load_from(None, Some("127.0.0.1:0".parse().unwrap()), vars).expect("test config");
    let app = Application::build_with(cfg, opts.executors)
        .await
        .expect("service starts");
    let addr = app.addr();
    let responder = app.responder();
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run(async move {
        let _ = rx.await;
    }));
    TestApp {
        addr,
        responder,
        http: reqwest::Client::new(),
        dir,
        db,
        stop: Some(stop),
        task: Some(task),
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// POSTs a webhook body with the test token.
    pub async fn post_webhook(&self, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url("/webhook/alertmanager"))
            .bearer_auth(TOKEN)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// GETs JSON. A 503 ("store unavailable, retry later": the single SQLite connection was
    /// busy past the pool's acquire timeout, seen on a loaded machine) is the service's
    /// documented transient answer, so it is retried for a while like any client would;
    /// anything else that is not a 2xx fails the test at once.
    pub async fn get_json(&self, path: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = self.http.get(self.url(path)).send().await.unwrap();
            let status = r.status();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            if status == reqwest::StatusCode::SERVICE_UNAVAILABLE && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            assert!(status.is_success(), "GET {path}: {status} {body}");
            return body;
        }
    }

    pub async fn incidents(&self) -> Vec<Value> {
        self.get_json("/api/v1/incidents").await["incidents"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub async fn incident(&self, id: &str) -> Value {
        self.get_json(&format!("/api/v1/incidents/{id}")).await
    }

    /// Polls `/api/v1/incidents` until `pred` holds for the list, or panics at the deadline.
    pub async fn wait_incidents(&self, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        self.wait_incidents_for(Duration::from_secs(20), what, pred).await
    }

    /// [`TestApp::wait_incidents`] with a longer deadline (flows through Prometheus).
    pub async fn wait_incidents_for(&self, limit: Duration, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let list = self.incidents().await;
            if pred(&list) {
                return list;
            }
            if Instant::now() > deadline {
                let mut details = Vec::new();
                for i in &list {
                    let inc = self.incident(i["id"].as_str().unwrap_or_default()).await;
                    let lines: Vec<String> = inc["timeline"]
                        .as_array()
                        .map(|t| {
                            t.iter()
                                .map(|e| format!("  {} {}: {}", e["at"], e["kind"], e["summary"]))
                                .collect()
                        })
                        .unwrap_or_default();
                    details.push(format!("{} {}\n{}", i["id"], i["phase"], lines.join("\n")));
                }
                panic!("timed out waiting for {what}; incidents:\n{}", details.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls one incident's detail until `pred` holds, or panics at the deadline.
    pub async fn wait_incident(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let inc = self.incident(id).await;
            if pred(&inc) {
                return inc;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; incident: {}",
                    serde_json::to_string_pretty(&inc).unwrap()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every stored alert has been decided (none is pending any more): after this,
    /// an alert that would open or change an incident has done so. The deliveries themselves
    /// are stored before they are answered, so call it after the webhook POSTs returned.
    pub async fn wait_alerts_decided(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let pending = self
                .responder
                .store
                .pending_alert_ids(100)
                .await
                .expect("read pending alerts");
            if pending.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "alerts {pending:?} were never decided");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the outbox holds no pending notification: every message the incidents so
    /// far queued has been delivered (or given up). Call it after the phase the test waits
    /// for; then the peers have received everything they are going to.
    pub async fn wait_outbox_drained(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let depth = self.responder.store.outbox_depth().await.expect("read the outbox");
            if depth.iter().all(|(_, n)| *n == 0) {
                return;
            }
            assert!(Instant::now() < deadline, "notifications still pending: {depth:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the service gracefully and returns its directory and database (for restarts).
    pub async fn stop(mut self) -> (tempfile::TempDir, TestDb) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        let db = std::mem::replace(
            &mut self.db,
            TestDb {
                url: String::new(),
                _pg: None,
            },
        );
        (dir, db)
    }

    /// Stops and starts the service again on the same database and policies.
    pub async fn restart(self, opts: Options) -> TestApp {
        let (dir, db) = self.stop().await;
        start_in(dir, db, opts).await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// An Alertmanager v4 payload with the given alerts.
pub fn payload(status: &str, alerts: Vec<Value>) -> Value {
    json!({
        "version": "4", "groupKey": "{}:{alertname=\"test\"}", "truncatedAlerts": 0, "status": status,
        "receiver": "rollback-responder", "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
        "externalURL": "http://alertmanager.example:9093", "alerts": alerts,
    })
}

/// One alert; `ends_at` None means firing.
pub fn alert(name: &str, service: &str, fingerprint: &str, starts_at: &str, ends_at: Option<&str>) -> Value {
    json!({
        "status": if ends_at.is_some() { "resolved" } else { "firing" },
        "labels": {"alertname": name, "service": service, "severity": "critical"},
        "annotations": {"summary": format!("{name} on {service}")},
        "startsAt": starts_at, "endsAt": ends_at.unwrap_or("0001-01-01T00:00:00Z"),
        "generatorURL": "http://prometheus.example/graph", "fingerprint": fingerprint,
    })
}

/// An RFC 3339 time `secs_ago` seconds before now.
pub fn ago(secs_ago: i64) -> String {
    (chrono::Utc::now() - chrono::Duration::seconds(secs_ago)).to_rfc3339()
}

/// How many entries of `kind` an incident's timeline (as the API shows it) holds.
pub fn timeline_count(inc: &Value, kind: &str) -> usize {
    inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == kind)
        .count()
}
