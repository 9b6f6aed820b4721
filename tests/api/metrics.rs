//! `/metrics` as the ecosystem expects it: `promtool check metrics` finds nothing to complain
//! about, before and after traffic, and series with known labels exist at zero before first use.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::helpers::*;

fn promtool() -> std::path::PathBuf {
    let bin = std::env::var_os("PROMTOOL_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/promtool".into());
    assert!(
        bin.exists(),
        "{} not found: run `eval \"$(bash tests/setup.sh)\"` (Debian's prometheus package has promtool)",
        bin.display()
    );
    bin
}

/// `promtool check metrics` on `text`: (success, what it said).
fn check(text: &str) -> (bool, String) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn scrape(app: &TestApp, accept: Option<&str>) -> (String, String) {
    let mut req = app.http.get(app.url("/metrics"));
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    (ct, r.text().await.unwrap())
}

fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn promtool_passes_on_metrics_and_known_series_start_at_zero() {
    let app = spawn_app(Options::default()).await;
    let (ct, fresh) = scrape(&app, None).await;
    assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8");
    let (ok, said) = check(&fresh);
    assert!(ok && said.is_empty(), "promtool on a fresh service: {said}\n{fresh}");
    for series in [
        "rollback_responder_notifications_received_total{status=\"firing\"}",
        "rollback_responder_decisions_total{outcome=\"auto\",policy=\"checkout\"}",
        "rollback_responder_actions_total{kind=\"alb\",result=\"failed\"}",
        "rollback_responder_outbox_delivery_failures_total{channel=\"slack\"}",
        "rollback_responder_policy_reloads_total{result=\"refused\"}",
        "rollback_responder_frozen{scope=\"*\"}",
        "rollback_responder_store_errors_total",
    ] {
        assert_eq!(sample(&fresh, series), Some(0.0), "{series} is not at zero:\n{fresh}");
    }

    // After a delivery and a decision: still clean, and the counters moved.
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "checkout", "m001", &ago(30), None)],
    ))
    .await;
    app.wait_incidents("a settled incident", |l| l.len() == 1 && l[0]["phase"] != "executing")
        .await;
    let (_, after) = scrape(&app, None).await;
    let (ok, said) = check(&after);
    assert!(ok && said.is_empty(), "promtool after traffic: {said}\n{after}");
    assert_eq!(
        sample(
            &after,
            "rollback_responder_notifications_received_total{status=\"firing\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &after,
            // No executor: the test app runs in dry run, which suppresses the decision.
            "rollback_responder_decisions_total{outcome=\"suppressed\",policy=\"checkout\"}"
        ),
        Some(1.0)
    );

    // Prometheus asks for OpenMetrics and gets it.
    let (ct, om) = scrape(
        &app,
        Some("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"),
    )
    .await;
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    assert!(om.ends_with("# EOF\n"));
}
