//! Real peers on loopback: Alertmanager 0.25 (Debian's prometheus-alertmanager), and a tiny
//! fault-injecting proxy to put between Alertmanager and the service.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub use crate::support::free_port;

fn binary(env: &str, candidates: &[&str], hint: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    for c in candidates {
        let p = PathBuf::from(c);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{} not found (set {env} or install it: {hint}; tests/setup.sh does it)",
        candidates[0]
    );
}

/// A running Alertmanager delivering to one webhook URL with a bearer token.
pub struct Alertmanager {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl Alertmanager {
    /// Starts Alertmanager with group_wait 0s and group_interval 1s so tests run in seconds.
    pub async fn start(webhook: &str, token: &str) -> Alertmanager {
        Self::start_on(free_port(), webhook, token).await
    }

    /// Starts on a given port (Prometheus needs to know it before Alertmanager runs).
    pub async fn start_on(port: u16, webhook: &str, token: &str) -> Alertmanager {
        let bin = binary(
            "ALERTMANAGER_BIN",
            &["/usr/bin/prometheus-alertmanager", "/usr/local/bin/alertmanager"],
            "apt-get install prometheus-alertmanager",
        );
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "route:\n  receiver: responder\n  group_by: ['alertname', 'service']\n  group_wait: 0s\n  group_interval: 1s\n  repeat_interval: 1h\n\
             receivers:\n  - name: responder\n    webhook_configs:\n      - url: {webhook}\n        send_resolved: true\n        max_alerts: 0\n\
             \x20       http_config:\n          authorization:\n            credentials: {token}\n"
        );
        let cfg_path = dir.path().join("alertmanager.yml");
        std::fs::write(&cfg_path, config).unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("alertmanager.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", cfg_path.display()))
            .arg(format!("--storage.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg(format!("--web.external-url={url}"))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start alertmanager");
        let am = Alertmanager {
            child,
            url,
            _dir: dir,
            http: reqwest::Client::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(r) = am.http.get(format!("{}/-/ready", am.url)).send().await {
                if r.status().is_success() {
                    return am;
                }
            }
            assert!(Instant::now() < deadline, "alertmanager did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Posts one alert (firing, or resolved when `ends_at` is in the past).
    pub async fn post(&self, labels: Value, starts_at: &str, ends_at: Option<&str>) {
        let mut alert = json!({ "labels": labels, "annotations": {"summary": "test"}, "startsAt": starts_at, "generatorURL": "http://prometheus.test/graph" });
        if let Some(e) = ends_at {
            alert["endsAt"] = json!(e);
        }
        let r = self
            .http
            .post(format!("{}/api/v2/alerts", self.url))
            .json(&json!([alert]))
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success(),
            "alertmanager refused the alert: {}",
            r.status()
        );
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Forwards webhooks to the service; answers 503 to the first `fail_first` deliveries after
/// forwarding them (as if the answer was lost), so Alertmanager re-sends what was stored.
pub struct FlakyProxy {
    pub addr: SocketAddr,
    pub deliveries: Arc<AtomicUsize>,
}

impl FlakyProxy {
    pub async fn start(upstream: String, fail_first: usize) -> FlakyProxy {
        let deliveries = Arc::new(AtomicUsize::new(0));
        let counter = deliveries.clone();
        let client = reqwest::Client::new();
        let app = axum::Router::new().route(
            "/webhook/alertmanager",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let counter = counter.clone();
                let client = client.clone();
                let upstream = upstream.clone();
                async move {
                    let n = counter.fetch_add(1, Ordering::SeqCst);
                    let mut req = client
                        .post(&upstream)
                        .body(body)
                        .header("content-type", "application/json");
                    if let Some(a) = headers.get("authorization") {
                        req = req.header("authorization", a.clone());
                    }
                    let status = match req.send().await {
                        Ok(r) => r.status().as_u16(),
                        Err(_) => 502,
                    };
                    let status = if n < fail_first { 503 } else { status };
                    axum::http::StatusCode::from_u16(status).unwrap()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        FlakyProxy { addr, deliveries }
    }

    pub fn url(&self) -> String {
        format!("http://{}/webhook/alertmanager", self.addr)
    }

    pub fn count(&self) -> usize {
        self.deliveries.load(Ordering::SeqCst)
    }
}

/// The service being rolled back, as far as the tests need it: `/health` (200 or 500) and
/// `/metrics` with request counters whose 5xx share the test sets. Counters grow on every
/// scrape so that `rate()` sees the ratio.
pub struct FakeService {
    pub addr: SocketAddr,
    state: Arc<std::sync::Mutex<FakeServiceState>>,
}

#[derive(Default)]
struct FakeServiceState {
    healthy: bool,
    error_ratio: f64,
    total: f64,
    errors: f64,
    health_script: Vec<bool>,
    health_requests: usize,
}

impl FakeService {
    pub async fn start(run: &str) -> FakeService {
        let state = Arc::new(std::sync::Mutex::new(FakeServiceState {
            healthy: true,
            ..Default::default()
        }));
        let (s1, s2) = (state.clone(), state.clone());
        let run = run.to_string();
        let app = axum::Router::new()
            .route(
                "/health",
                axum::routing::get(move || {
                    let s = s1.clone();
                    async move {
                        let mut st = s.lock().unwrap();
                        let n = st.health_requests;
                        st.health_requests += 1;
                        // A scripted sequence first (flapping), then the steady state.
                        let ok = st.health_script.get(n).copied().unwrap_or(st.healthy);
                        if ok {
                            axum::http::StatusCode::OK
                        } else {
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR
                        }
                    }
                }),
            )
            // A health URL that moved (to a login or maintenance page, say).
            .route(
                "/moved",
                axum::routing::get(|| async { axum::response::Redirect::to("/health") }),
            )
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let s = s2.clone();
                    let run = run.clone();
                    async move {
                        let mut st = s.lock().unwrap();
                        st.total += 100.0;
                        st.errors += 100.0 * st.error_ratio;
                        format!(
                            "# TYPE http_requests_total counter\nhttp_requests_total{{run=\"{run}\",code=\"200\"}} {}\nhttp_requests_total{{run=\"{run}\",code=\"500\"}} {}\n",
                            st.total - st.errors,
                            st.errors
                        )
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeService { addr, state }
    }

    pub fn set(&self, healthy: bool, error_ratio: f64) {
        let mut st = self.state.lock().unwrap();
        st.healthy = healthy;
        st.error_ratio = error_ratio;
    }

    /// The next health answers, in order, before the steady state applies.
    pub fn script_health(&self, answers: &[bool]) {
        let mut st = self.state.lock().unwrap();
        let n = st.health_requests;
        st.health_script = vec![true; n];
        st.health_script.extend_from_slice(answers);
    }

    pub fn health_requests(&self) -> usize {
        self.state.lock().unwrap().health_requests
    }

    pub fn health_url(&self) -> String {
        format!("http://{}/health", self.addr)
    }

    /// Answers 303 to [`FakeService::health_url`].
    pub fn moved_url(&self) -> String {
        format!("http://{}/moved", self.addr)
    }
}

/// A running Prometheus 2.x scraping one target every second, evaluating `rules` every second
/// and sending alerts to `alertmanager`.
pub struct Prometheus {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    pub async fn start(target: SocketAddr, alertmanager: &str, rules: &str) -> Prometheus {
        let bin = binary("PROMETHEUS_BIN", &["/usr/bin/prometheus"], "apt-get install prometheus");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rules.yml"), rules).unwrap();
        let am = alertmanager.trim_start_matches("http://");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['{am}']\n\
             rule_files: ['{rules}']\n\
             scrape_configs:\n  - job_name: portal-api\n    static_configs:\n      - targets: ['{target}']\n        labels: {{service: portal-api}}\n",
            rules = dir.path().join("rules.yml").display()
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg(format!("--web.external-url={url}"))
            .arg("--rules.alert.resend-delay=1s")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let p = Prometheus { child, url, _dir: dir };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http.get(format!("{}/-/ready", p.url)).send().await {
                if r.status().is_success() {
                    return p;
                }
            }
            assert!(Instant::now() < deadline, "prometheus did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Prometheus {
    /// Polls the instant query `query` until its first sample satisfies `pred`, or panics
    /// after 30 s with the last answer.
    pub async fn wait_value(&self, query: &str, pred: impl Fn(f64) -> bool) {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answer: Value = match http
                .get(format!("{}/api/v1/query", self.url))
                .query(&[("query", query)])
                .send()
                .await
            {
                Ok(r) => r.json().await.unwrap_or(Value::Null),
                Err(e) => Value::String(e.to_string()),
            };
            let value = answer["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok());
            if value.is_some_and(&pred) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus never answered {query} as expected: {answer}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
