//! One sample of each outside check: a health probe request and a Prometheus instant query.

use std::time::Duration;

use chrono::Utc;

use super::hold::Sample;
use crate::alert::LabelSet;
use crate::policy::{HealthProbe, PrometheusCheck};

/// How long one Prometheus query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// `curl -f` once: good when the status is the expected one. Redirects are not followed (the
/// client is built that way): a login page answering 200 is not the service being healthy.
pub async fn probe(http: &reqwest::Client, p: &HealthProbe) -> Sample {
    let (value, ok) = match http.get(&p.url).timeout(p.timeout).send().await {
        Ok(r) => (
            format!("HTTP {}", r.status().as_u16()),
            r.status().as_u16() == p.expected_status,
        ),
        Err(e) if e.is_timeout() => ("timed out".into(), false),
        Err(e) => (format!("failed: {e}"), false),
    };
    Sample::new(Utc::now(), value, ok)
}

/// The bound as people read it: `< 0.01`.
pub fn bound(q: &PrometheusCheck) -> String {
    match (q.below, q.above) {
        (Some(b), _) => format!("< {b}"),
        (_, Some(a)) => format!("> {a}"),
        _ => String::new(),
    }
}

/// Whether every sample of an instant query's answer satisfies the bound; `None` when the
/// answer has no samples.
pub fn holds(body: &serde_json::Value, q: &PrometheusCheck) -> Option<(bool, Vec<f64>)> {
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
        .all(|v| !v.is_nan() && q.below.is_none_or(|b| *v < b) && q.above.is_none_or(|a| *v > a));
    Some((ok, values))
}

fn show(values: &[f64]) -> String {
    let v: Vec<String> = values.iter().map(f64::to_string).collect();
    v.join(",")
}

/// One instant query. An empty answer, an error or no answer is a bad sample that says so: a
/// check never passes for lack of input.
pub async fn prometheus(http: &reqwest::Client, base: &str, q: &PrometheusCheck) -> Sample {
    let url = format!("{}/api/v1/query", base.trim_end_matches('/'));
    let (value, ok) = match http
        .get(&url)
        .query(&[("query", q.query.as_str())])
        .timeout(QUERY_TIMEOUT)
        .send()
        .await
    {
        Ok(r) => match r.json::<serde_json::Value>().await {
            Ok(body) if body["status"] == "success" => match holds(&body, q) {
                Some((true, values)) => (show(&values), true),
                Some((false, values)) => (format!("{} not {}", show(&values), bound(q)), false),
                None => ("empty result".into(), false),
            },
            Ok(body) => (format!("query error: {}", body["error"]), false),
            Err(e) => (format!("unreadable answer: {e}"), false),
        },
        Err(e) => (format!("request failed: {e}"), false),
    };
    Sample::new(Utc::now(), value, ok)
}

/// How long asking an Alertmanager may take.
const ALERTMANAGER_TIMEOUT: Duration = Duration::from_secs(3);

/// The label sets of the alerts Alertmanager at `base` (a payload's `externalURL`) holds as
/// active, silenced, inhibited or not yet processed: everything it has not resolved.
pub async fn alertmanager_alerts(http: &reqwest::Client, base: &str) -> Result<Vec<LabelSet>, String> {
    let url = format!("{}/api/v2/alerts", base.trim_end_matches('/'));
    let r = http
        .get(&url)
        .query(&[
            ("active", "true"),
            ("silenced", "true"),
            ("inhibited", "true"),
            ("unprocessed", "true"),
        ])
        .timeout(ALERTMANAGER_TIMEOUT)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !r.status().is_success() {
        return Err(format!("{url}: HTTP {}", r.status().as_u16()));
    }
    let body: Vec<AmAlert> = r.json().await.map_err(|e| format!("{url}: unreadable answer: {e}"))?;
    Ok(body.into_iter().map(|a| a.labels).collect())
}

/// The part of an Alertmanager v2 alert we read.
#[derive(serde::Deserialize)]
struct AmAlert {
    #[serde(default)]
    labels: LabelSet,
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
        let nan = json!({"status": "success", "data": {"resultType": "vector", "result": [{"value": [1.0, "NaN"]}]}});
        assert_eq!(
            holds(&nan, &q(None, Some(0.5))).map(|h| h.0),
            Some(false),
            "NaN (0/0: no traffic) holds no bound"
        );
    }
}
