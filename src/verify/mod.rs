//! Proving the rollback worked, after the action and before anyone is told it is over.
//!
//! The responder calls [`check`] once an action has changed (or confirmed) the target. Every
//! check the policy configures runs at the same time and must pass within the bake period:
//! the executor's own read-back and readiness check, an HTTP health probe with N consecutive
//! successes, a Prometheus instant query that must hold, and the triggering alert resolving.
//! Each check's result and timing goes into the incident's timeline; a failure escalates and
//! never leads to a second automatic rollback.

use std::future::Future;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::action::{Executors, Target};
use crate::policy::{HealthProbe, PrometheusCheck, Verification};

/// One check's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckResult {
    pub check: &'static str,
    pub passed: bool,
    pub detail: String,
    pub took_ms: u64,
}

/// Runs every configured check concurrently until each passes or `bake` runs out.
/// `alert_resolved` answers whether every alert of the incident has resolved.
pub async fn check<F, Fut>(
    v: &Verification,
    target: &Target,
    executors: &Executors,
    http: &reqwest::Client,
    prometheus_url: Option<&str>,
    alert_resolved: F,
) -> Vec<CheckResult>
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + v.bake;
    let executor = async {
        let started = Instant::now();
        let (result, _) = executors.verify(target).await;
        let (passed, detail) = match result {
            Ok(d) => (true, d),
            Err(e) => (false, e.to_string()),
        };
        CheckResult {
            check: "read_back",
            passed,
            detail,
            took_ms: started.elapsed().as_millis() as u64,
        }
    };
    let probe = async {
        match &v.health_probe {
            Some(p) => Some(health_probe(http, p, deadline).await),
            None => None,
        }
    };
    let query = async {
        match (&v.prometheus, prometheus_url) {
            (Some(q), Some(url)) => Some(prometheus(http, url, q, deadline).await),
            (Some(_), None) => Some(CheckResult {
                check: "prometheus",
                passed: false,
                detail: "the policy has a Prometheus check but verification.prometheus_url is not configured".into(),
                took_ms: 0,
            }),
            (None, _) => None,
        }
    };
    let resolved = async {
        if !v.alert_resolves {
            return None;
        }
        let started = Instant::now();
        loop {
            if alert_resolved().await {
                return Some(CheckResult {
                    check: "alert_resolved",
                    passed: true,
                    detail: "the triggering alert resolved".into(),
                    took_ms: started.elapsed().as_millis() as u64,
                });
            }
            if Instant::now() >= deadline {
                return Some(CheckResult {
                    check: "alert_resolved",
                    passed: false,
                    detail: format!(
                        "still firing after the {} bake period",
                        humantime::format_duration(v.bake)
                    ),
                    took_ms: started.elapsed().as_millis() as u64,
                });
            }
            tokio::time::sleep(Duration::from_millis(250).min(v.bake)).await;
        }
    };
    let (e, p, q, r) = tokio::join!(executor, probe, query, resolved);
    std::iter::once(e).chain(p).chain(q).chain(r).collect()
}

/// `curl -f` until `successes` consecutive answers have the expected status.
async fn health_probe(http: &reqwest::Client, p: &HealthProbe, deadline: Instant) -> CheckResult {
    let started = Instant::now();
    let (mut streak, mut attempts) = (0u32, 0u32);
    loop {
        attempts += 1;
        let last = match http.get(&p.url).timeout(p.timeout).send().await {
            Ok(r) => {
                streak = if r.status().as_u16() == p.expected_status {
                    streak + 1
                } else {
                    0
                };
                format!("HTTP {}", r.status().as_u16())
            }
            Err(e) => {
                streak = 0;
                if e.is_timeout() {
                    "timed out".into()
                } else {
                    format!("failed: {e}")
                }
            }
        };
        if streak >= p.successes {
            return CheckResult {
                check: "health_probe",
                passed: true,
                detail: format!(
                    "{} answered {} {} times in a row ({attempts} probes)",
                    p.url, p.expected_status, p.successes
                ),
                took_ms: started.elapsed().as_millis() as u64,
            };
        }
        if Instant::now() + p.interval > deadline {
            return CheckResult {
                check: "health_probe",
                passed: false,
                detail: format!(
                    "{} did not answer {} {} times in a row within the bake period ({attempts} probes, last: {last})",
                    p.url, p.expected_status, p.successes
                ),
                took_ms: started.elapsed().as_millis() as u64,
            };
        }
        tokio::time::sleep(p.interval).await;
    }
}

/// Whether every sample of an instant query's answer satisfies the bound; `None` when the
/// answer has no samples (no traffic yet: keep asking).
fn holds(body: &serde_json::Value, q: &PrometheusCheck) -> Option<(bool, Vec<f64>)> {
    let result = &body["data"]["result"];
    let values: Vec<f64> = match body["data"]["resultType"].as_str() {
        Some("vector") => result
            .as_array()?
            .iter()
            .filter_map(|s| s["value"][1].as_str().and_then(|v| v.parse().ok()))
            .collect(),
        Some("scalar") => result[1].as_str().and_then(|v| v.parse().ok()).into_iter().collect(),
        _ => vec![],
    };
    if values.is_empty() {
        return None;
    }
    let ok = values
        .iter()
        .all(|v| q.below.is_none_or(|b| *v < b) && q.above.is_none_or(|a| *v > a));
    Some((ok, values))
}

/// Polls an instant query until it holds or the bake period ends.
async fn prometheus(http: &reqwest::Client, base: &str, q: &PrometheusCheck, deadline: Instant) -> CheckResult {
    let started = Instant::now();
    let bound = match (q.below, q.above) {
        (Some(b), _) => format!("< {b}"),
        (_, Some(a)) => format!("> {a}"),
        _ => String::new(),
    };
    loop {
        let url = format!("{}/api/v1/query", base.trim_end_matches('/'));
        let last = match http
            .get(&url)
            .query(&[("query", q.query.as_str())])
            .timeout(Duration::from_secs(10))
            .send()
            .await
        {
            Ok(r) => match r.json::<serde_json::Value>().await {
                Ok(body) if body["status"] == "success" => match holds(&body, q) {
                    Some((true, values)) => {
                        return CheckResult {
                            check: "prometheus",
                            passed: true,
                            detail: format!("{} = {values:?} holds {bound}", q.query),
                            took_ms: started.elapsed().as_millis() as u64,
                        }
                    }
                    Some((false, values)) => format!("{values:?} not {bound}"),
                    None => "empty result".into(),
                },
                Ok(body) => format!("query error: {}", body["error"]),
                Err(e) => format!("unreadable answer: {e}"),
            },
            Err(e) => format!("request failed: {e}"),
        };
        if Instant::now() + Duration::from_secs(1) > deadline {
            return CheckResult {
                check: "prometheus",
                passed: false,
                detail: format!("{} did not hold {bound} within the bake period (last: {last})", q.query),
                took_ms: started.elapsed().as_millis() as u64,
            };
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn q(below: Option<f64>, above: Option<f64>) -> PrometheusCheck {
        PrometheusCheck {
            query: "x".into(),
            below,
            above,
        }
    }

    #[test]
    fn instant_query_bounds() {
        let v = json!({"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1.0, "0.004"]}]}});
        assert_eq!(holds(&v, &q(Some(0.01), None)), Some((true, vec![0.004])));
        assert_eq!(holds(&v, &q(Some(0.001), None)), Some((false, vec![0.004])));
        assert_eq!(holds(&v, &q(None, Some(0.001))), Some((true, vec![0.004])));
        let empty = json!({"status": "success", "data": {"resultType": "vector", "result": []}});
        assert_eq!(holds(&empty, &q(Some(0.01), None)), None);
        let scalar = json!({"status": "success", "data": {"resultType": "scalar", "result": [1.0, "3"]}});
        assert_eq!(holds(&scalar, &q(None, Some(2.0))), Some((true, vec![3.0])));
        let two = json!({"status": "success", "data": {"resultType": "vector", "result": [
            {"value": [1.0, "0.001"]}, {"value": [1.0, "0.5"]}]}});
        assert_eq!(
            holds(&two, &q(Some(0.01), None)).map(|h| h.0),
            Some(false),
            "every series must hold"
        );
    }
}
