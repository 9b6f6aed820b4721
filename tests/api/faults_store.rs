//! Store faults, asserted from the outside: a SQLite file on a filesystem that fills up, a
//! PostgreSQL cluster that stops mid-run, bad bytes PostgreSQL refuses. Whatever the service
//! acknowledged with a 2xx must be in the store afterwards (read by a connection of our own,
//! and after a restart); trouble of the store is a 503 (Alertmanager retries), bad input a 400
//! naming the field; when the store is back the service recovers without a restart.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rollback_responder::app::Application;
use rollback_responder::config;
use rollback_responder::responder::Responder;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::helpers::{ago, alert, env, payload, CHECKOUT_POLICY, TOKEN};
use crate::support::pg_cluster::{is_root, PgCluster};

const API_TOKEN: &str = "faults-operator-token";

/// The service on a store URL of the test's choosing (the helpers pick their own).
struct App {
    addr: std::net::SocketAddr,
    responder: Arc<Responder>,
    http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl App {
    async fn start(store_url: &str, policies: &Path) -> App {
        rollback_responder::telemetry::init(rollback_responder::config::LogFormat::Text, "warn");
        std::fs::create_dir_all(policies).unwrap();
        std::fs::write(policies.join("checkout.yaml"), CHECKOUT_POLICY).unwrap();
        let vars = env(&[
            ("ROLLBACK_RESPONDER__STORE__URL", store_url),
            ("ROLLBACK_RESPONDER__POLICIES_DIR", policies.to_str().unwrap()),
            ("ROLLBACK_RESPONDER__WEBHOOK__BEARER_TOKEN", TOKEN),
            ("ROLLBACK_RESPONDER__WORKERS__TICK", "100ms"),
            ("ROLLBACK_RESPONDER__WORKERS__LEASE", "2s"),
            ("ROLLBACK_RESPONDER__SAFETY__DRY_RUN", "true"),
            ("ROLLBACK_RESPONDER__API__BEARER_TOKEN", API_TOKEN),
        ]);
        let cfg = config::load_from(None, Some("127.0.0.1:0".parse().unwrap()), vars).expect("test config");
        let app = Application::build_with(cfg, None).await.expect("service starts");
        let addr = app.addr();
        let responder = app.responder();
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run(async move {
            let _ = rx.await;
        }));
        App {
            addr,
            responder,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Delivers a webhook body; the status the service answered.
    async fn deliver(&self, body: &Value) -> u16 {
        self.http
            .post(self.url("/webhook/alertmanager"))
            .bearer_auth(TOKEN)
            .json(body)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    /// Polls the incident list until `pred` holds (20 s at most).
    async fn wait_incidents(&self, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let list = match self.http.get(self.url("/api/v1/incidents")).send().await {
                Ok(r) if r.status().is_success() => r.json::<Value>().await.unwrap_or(Value::Null)["incidents"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default(),
                _ => Vec::new(),
            };
            if pred(&list) {
                return list;
            }
            assert!(Instant::now() < deadline, "timed out waiting for incidents: {list:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("the service stops");
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A small tmpfs mounted on a fresh directory (we run as root in CI and on the dev machines);
/// unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a {size} tmpfs failed (this test needs root, as in CI): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a filler file until the filesystem is full; returns its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.path().join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0xa5u8; 4096];
        while f.write_all(&chunk).and_then(|_| f.flush()).is_ok() {}
        // Single bytes too: not one free byte is left.
        while f.write_all(&[0]).and_then(|_| f.flush()).is_ok() {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Set in the environment of a test run again by [`rerun_in_namespace`].
const IN_NAMESPACE: &str = "RR_TEST_IN_USER_NAMESPACE";

/// Runs one test of this binary again under `unshare --user --map-root-user --mount` and
/// fails if it fails.
fn rerun_in_namespace(test: &str) {
    let exe = std::env::current_exe().expect("the test binary's path");
    let status = std::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount"])
        .arg(exe)
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(IN_NAMESPACE, "1")
        .status()
        .expect("run unshare (util-linux) to mount a tmpfs without root");
    assert!(
        status.success(),
        "{test} failed inside its namespace ({status}); unprivileged user namespaces must be enabled \
         (sysctl kernel.unprivileged_userns_clone=1), or run the tests as root"
    );
}

/// A firing HighErrorRate on checkout with a unique fingerprint and a sizeable annotation
/// (each one needs new pages).
fn big_alert(fingerprint: &str) -> Value {
    let mut a = alert("HighErrorRate", "checkout", fingerprint, &ago(30), None);
    a["annotations"]["description"] = json!("x".repeat(6000));
    a
}

/// Fingerprints in the SQLite file, read by a connection of our own.
async fn sqlite_fingerprints(db: &Path) -> BTreeSet<String> {
    use sqlx::Row;
    let url = format!("sqlite://{}?mode=ro", db.display());
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&url)
        .await
        .expect("open the store file");
    sqlx::query("SELECT fingerprint FROM alerts")
        .fetch_all(&mut conn)
        .await
        .expect("read the alerts")
        .iter()
        .map(|r| r.get::<String, _>(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_503_never_a_2xx_for_what_was_not_committed_and_the_service_recovers() {
    if !is_root() && std::env::var_os(IN_NAMESPACE).is_none() {
        // Not root: this test alone runs again inside a user and mount namespace of its own,
        // where it may mount its tmpfs (a real full disk, not a page limit inside SQLite).
        return rerun_in_namespace(
            "faults_store::a_full_disk_is_503_never_a_2xx_for_what_was_not_committed_and_the_service_recovers",
        );
    }
    sqlx::any::install_default_drivers();
    let fs = Tmpfs::mount("3m");
    let db = fs.path().join("rr.db");
    let url = format!("sqlite://{}", db.display());
    let policies = tempfile::tempdir().unwrap();
    let app = App::start(&url, policies.path()).await;

    let mut acked = BTreeSet::new();
    let mut refused = 0;
    let deliver = |n: usize| {
        let fp = format!("{n:016x}");
        let body = payload("firing", vec![big_alert(&fp)]);
        (fp, body)
    };
    // One delivery while there is room: an incident opens.
    let (fp, body) = deliver(0);
    assert_eq!(app.deliver(&body).await, 200);
    acked.insert(fp);
    let opened = app.wait_incidents(|l| l.len() == 1).await;

    let filler = fs.fill();
    for n in 1..=20 {
        let (fp, body) = deliver(n);
        match app.deliver(&body).await {
            200 => {
                acked.insert(fp);
            }
            503 => refused += 1,
            other => panic!("delivery {n} on a full disk answered {other}"),
        }
    }
    assert!(refused > 0, "a full disk must refuse some deliveries with 503");
    // Everything answered 200 is visible to another connection now, not only to the
    // service's own (a transaction left open would show it there alone).
    let seen = sqlite_fingerprints(&db).await;
    let lost: Vec<_> = acked.difference(&seen).collect();
    assert!(lost.is_empty(), "acknowledged but not committed: {lost:?}");

    // Space returns: the service recovers without a restart.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 100;
    loop {
        let (fp, body) = deliver(n);
        n += 1;
        match app.deliver(&body).await {
            200 => {
                acked.insert(fp);
                break;
            }
            503 if Instant::now() < deadline => {}
            other => panic!("after space returned, a delivery answered {other}"),
        }
    }
    for k in 0..10 {
        let (fp, body) = deliver(200 + k);
        assert_eq!(app.deliver(&body).await, 200, "recovered, delivery {k}");
        acked.insert(fp);
    }
    let before = app.wait_incidents(|l| l.len() == 1).await;
    assert_eq!(before[0]["id"], opened[0]["id"], "still the one incident for checkout");

    // A restart on the same file: every acknowledged alert and the incident are there.
    app.stop().await;
    let seen = sqlite_fingerprints(&db).await;
    let lost: Vec<_> = acked.difference(&seen).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    let app = App::start(&url, policies.path()).await;
    let after = app.wait_incidents(|l| l.len() == 1).await;
    assert_eq!(after[0]["id"], before[0]["id"]);
    assert_eq!(app.responder.store.alert_count().await.unwrap(), seen.len() as i64);
    app.stop().await;
}

#[tokio::test]
async fn nul_characters_on_postgresql_are_stored_safely_and_never_answered_with_a_5xx() {
    use sqlx::Row;
    let pg = crate::support::pg::PgDb::create().await;
    let policies = tempfile::tempdir().unwrap();
    let app = App::start(&pg.url, policies.path()).await;
    let mut odd = alert("High\u{0}ErrorRate", "checkout", "b001", &ago(30), None);
    odd["generatorURL"] = json!("http://prometheus\u{0}/graph");
    odd["labels"]["team\u{0}"] = json!("pay\u{0}ments");
    odd["annotations"]["summary"] = json!("\u{0}");
    let good = alert("HighErrorRate", "checkout", "b002", &ago(30), None);
    let mut body = payload("firing", vec![odd, good]);
    body["groupKey"] = json!("{}:{alertname=\"\u{0}\"}");
    body["externalURL"] = json!("http://alertmanager\u{0}:9093");
    assert!(serde_json::to_string(&body).unwrap().contains("\\u0000"));
    assert_eq!(
        app.deliver(&body).await,
        200,
        "stored, not a 5xx Alertmanager retries forever"
    );
    assert_eq!(app.deliver(&body).await, 200, "and the re-send is a duplicate");
    // The group's valid alert does its work.
    app.wait_incidents(|l| l.len() == 1).await;

    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&pg.url)
        .await
        .unwrap();
    let rows = sqlx::query(
        "SELECT fingerprint, alertname, generator_url, group_key, external_url, labels, annotations FROM alerts ORDER BY fingerprint",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2, "both alerts of the group, once each");
    let col = |i: usize, c: &str| rows[i].get::<String, _>(c);
    assert_eq!(col(0, "fingerprint"), "b001");
    assert_eq!(col(0, "alertname"), "High\u{FFFD}ErrorRate");
    assert_eq!(col(0, "generator_url"), "http://prometheus\u{FFFD}/graph");
    assert_eq!(col(0, "group_key"), "{}:{alertname=\"\u{FFFD}\"}");
    assert_eq!(col(0, "external_url"), "http://alertmanager\u{FFFD}:9093");
    let labels: Value = serde_json::from_str(&col(0, "labels")).unwrap();
    assert_eq!(labels["team\u{FFFD}"], "pay\u{FFFD}ments");
    let annotations: Value = serde_json::from_str(&col(0, "annotations")).unwrap();
    assert_eq!(annotations["summary"], "\u{FFFD}");
    assert_eq!(col(1, "alertname"), "HighErrorRate");

    // Ids and free text with a NUL elsewhere: found nothing, or stored safely; never a 503.
    let get = app.http.get(app.url("/api/v1/incidents/inc%00x")).send().await.unwrap();
    assert_eq!(get.status(), 404);
    let freeze = app
        .http
        .post(app.url("/api/v1/freezes"))
        .bearer_auth(API_TOKEN)
        .json(&json!({"policy": "checkout", "reason": "deploy\u{0}window", "by": "o\u{0}p"}))
        .send()
        .await
        .unwrap();
    assert_eq!(freeze.status(), 201);
    let reason: String = sqlx::query("SELECT reason FROM freezes WHERE scope = 'checkout'")
        .fetch_one(&mut conn)
        .await
        .unwrap()
        .get(0);
    assert_eq!(reason, "deploy\u{FFFD}window");
    let lift = app
        .http
        .delete(app.url("/api/v1/freezes/check%00out"))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(lift.status(), 200);
    assert_eq!(lift.json::<Value>().await.unwrap()["lifted"], false);
    app.stop().await;
}

/// GET /readyz the way the shipped probe does: an answer within its 2 s timeout, or `None`.
async fn probe(app: &App) -> Option<(u16, Value)> {
    let r = app
        .http
        .get(app.url("/readyz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    let status = r.status().as_u16();
    Some((status, r.json().await.unwrap_or(Value::Null)))
}

/// Webhook notifications Alertmanager counts as failed (its own metric).
async fn am_failed_deliveries(app: &App, am: &str) -> f64 {
    let text = match app.http.get(format!("{am}/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => return 0.0,
    };
    text.lines()
        .filter(|l| l.starts_with("alertmanager_notifications_failed_total{") && l.contains("webhook"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Fingerprints in a PostgreSQL store, read by a connection of our own.
async fn pg_fingerprints(url: &str) -> BTreeSet<String> {
    use sqlx::Row;
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(url).await.unwrap();
    sqlx::query("SELECT fingerprint FROM alerts")
        .fetch_all(&mut conn)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<String, _>(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_going_down_is_503_and_not_ready_at_once_and_the_service_recovers_when_it_returns() {
    sqlx::any::install_default_drivers();
    let pg = PgCluster::start();
    let policies = tempfile::tempdir().unwrap();
    let app = App::start(&pg.url(), policies.path()).await;
    let body = |fp: &str| payload("firing", vec![alert("HighErrorRate", "checkout", fp, &ago(30), None)]);
    let mut acked = BTreeSet::new();
    assert_eq!(app.deliver(&body("c001")).await, 200);
    acked.insert("c001".to_string());
    app.wait_incidents(|l| l.len() == 1).await;
    assert_eq!(probe(&app).await.map(|(s, _)| s), Some(200));

    // A real Alertmanager too: what it delivers during the outage it must retry until stored.
    let am = crate::peers::Alertmanager::start(&app.url("/webhook/alertmanager"), TOKEN).await;
    let run = format!("outage-{}", uuid::Uuid::now_v7().simple());

    pg.ctl("stop");
    am.post(
        json!({"alertname": "HighLatency", "service": "checkout", "severity": "critical", "run": run}),
        &ago(5),
        None,
    )
    .await;
    // Readiness answers in time for the probe, and says why.
    let (status, ready) = probe(&app).await.expect("/readyz answered within the probe's timeout");
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["ready"], false);
    assert!(
        ready["store"].as_str().unwrap().contains("store unavailable"),
        "{ready}"
    );
    // Deliveries during the outage are refused with 503, which Alertmanager retries.
    let (c002, c003) = (body("c002"), body("c003"));
    let (a, b) = tokio::join!(app.deliver(&c002), app.deliver(&c003));
    assert_eq!((a, b), (503, 503));

    // Alertmanager itself counts the refused delivery (it retries it).
    let deadline = Instant::now() + Duration::from_secs(30);
    while am_failed_deliveries(&app, &am.url).await == 0.0 {
        assert!(
            Instant::now() < deadline,
            "Alertmanager never saw a failed delivery during the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    pg.ctl("start");
    // Without a restart: Alertmanager's retry is stored, readiness comes back.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match app.deliver(&body("c002")).await {
            200 => break,
            503 if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
            other => panic!("after PostgreSQL returned, the retry answered {other}"),
        }
    }
    acked.insert("c002".to_string());
    assert_eq!(app.deliver(&body("c003")).await, 200);
    acked.insert("c003".to_string());
    assert_eq!(probe(&app).await.map(|(s, _)| s), Some(200));
    // Alertmanager's retries land once PostgreSQL is back.
    let deadline = Instant::now() + Duration::from_secs(40);
    let from_am = loop {
        let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&pg.url())
            .await
            .unwrap();
        let found: Vec<String> = sqlx::query("SELECT fingerprint FROM alerts WHERE labels LIKE $1")
            .bind(format!("%{run}%"))
            .fetch_all(&mut conn)
            .await
            .unwrap()
            .iter()
            .map(|r| sqlx::Row::get::<String, _>(r, 0))
            .collect();
        if !found.is_empty() {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "Alertmanager's delivery never got stored after the outage"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    acked.extend(from_am);
    let seen = pg_fingerprints(&pg.url()).await;
    assert_eq!(seen, acked, "every acknowledged alert, nothing else");
    app.wait_incidents(|l| l.len() == 1).await;
    app.stop().await;
}
