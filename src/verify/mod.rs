//! Proving the rollback worked, after the action and before anyone is told it is over.
//!
//! The responder calls [`check`] once an action has changed (or confirmed) the target. The bake
//! is a hold: every check the policy configures is sampled at its interval from the start of
//! the bake to its end, at the same time: the executor's read-back of the target (drift: someone
//! changed it back), the executor's readiness (Kubernetes), an HTTP health probe, a Prometheus
//! instant query, and the triggering alert resolving. A bad sample after a check's first good
//! one fails it (the policy may allow a number of them; see [`hold`]); with `fail_fast` (the
//! default) the first failed check ends the bake. `verified` needs every check to hold to the
//! end. Each check's samples and verdict go into the incident's timeline; a failure escalates
//! and never leads to a second automatic rollback.

pub mod hold;
mod sources;

pub use sources::alertmanager_alerts;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{watch, Mutex};
use tokio::time::Instant;

use self::hold::{Hold, Rule, Sample};
use crate::action::{Executors, Target};
use crate::policy::Verification;

/// One check's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckResult {
    pub check: &'static str,
    pub passed: bool,
    /// Ended before the end of the bake because another check failed (never a pass).
    pub stopped: bool,
    /// The verdict with the values that decided it.
    pub detail: String,
    pub took_ms: u64,
    /// The deciding sample's time and value (the failing one, or the last one).
    pub at: Option<DateTime<Utc>>,
    pub value: Option<String>,
    /// Every sample, `[time, value, ok]`.
    pub samples: Vec<Sample>,
    /// Samples taken but left out of `samples` (long bakes).
    #[serde(skip_serializing_if = "is_zero")]
    pub samples_dropped: usize,
    /// The target was changed back during the bake: what and who.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drift: Option<String>,
    /// What the check last read (read-back), or the executor's steps (readiness).
    #[serde(skip_serializing_if = "Value::is_null")]
    pub evidence: Value,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// What the store says about the incident's alerts, for `alert_resolves`.
#[derive(Debug, Clone, PartialEq)]
pub enum AlertState {
    /// This many alerts still fire.
    Firing(u64),
    /// Every alert of the incident has resolved.
    Resolved,
    /// No resolved notification came, but the Alertmanagers that sent the alerts no longer
    /// hold them (an HA peer that died before sending the resolve): what they said.
    ResolvedAtSource(String),
    /// Alerts still fire here, and what their Alertmanagers said when asked.
    FiringPerSource(u64, String),
    /// The incident has no alert (opened by a person): nothing can resolve.
    NoAlerts,
    /// The store could not be read.
    Unreadable(String),
}

/// Ends the bake early when a check fails and the policy says `fail_fast`.
#[derive(Clone)]
struct Stop {
    fail_fast: bool,
    tx: Arc<watch::Sender<bool>>,
}

impl Stop {
    fn failed(&self) {
        if self.fail_fast {
            self.tx.send_replace(true);
        }
    }

    async fn stopped(&self) {
        let mut rx = self.tx.subscribe();
        // An error means the sender is gone, which cannot happen while `self` holds it.
        let _ = rx.wait_for(|s| *s).await;
    }
}

/// What one sample of a check saw.
struct Observed {
    sample: Sample,
    drift: Option<String>,
    evidence: Value,
}

impl From<Sample> for Observed {
    fn from(sample: Sample) -> Self {
        Observed {
            sample,
            drift: None,
            evidence: Value::Null,
        }
    }
}

/// Samples one check at `interval` until `deadline`, a failure, or a stop; then its verdict.
#[allow(clippy::too_many_arguments)]
async fn hold_check<S, Fut>(
    check: &'static str,
    mut hold: Hold,
    interval: Duration,
    deadline: Instant,
    stop: &Stop,
    describe: impl Fn(&hold::Verdict) -> String,
    mut sample: S,
) -> CheckResult
where
    S: FnMut() -> Fut,
    Fut: Future<Output = Observed>,
{
    let started = Instant::now();
    let (mut drift, mut evidence, mut complete) = (None, Value::Null, true);
    loop {
        let o = tokio::select! {
            o = sample() => o,
            _ = stop.stopped() => { complete = false; break; }
        };
        if drift.is_none() {
            drift = o.drift;
        }
        evidence = o.evidence;
        // Without fail-fast a failed check samples on to the end too, for the evidence.
        if hold.push(o.sample) && stop.fail_fast {
            stop.failed();
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let next = (now + interval).min(deadline);
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = stop.stopped() => { complete = false; break; }
        }
    }
    let v = hold.verdict(complete);
    CheckResult {
        check,
        passed: v.passed,
        stopped: !complete && !hold.failed(),
        detail: describe(&v),
        took_ms: millis(started.elapsed()),
        at: v.deciding.as_ref().map(|s| s.at),
        value: v.deciding.as_ref().map(|s| s.value.clone()),
        samples: hold.samples().to_vec(),
        samples_dropped: hold.dropped(),
        drift,
        evidence,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A check that cannot run: failed at once, saying why (never a pass for lack of input).
pub fn inconclusive(check: &'static str, why: String) -> CheckResult {
    CheckResult {
        check,
        passed: false,
        stopped: false,
        detail: format!("inconclusive: {why}"),
        took_ms: 0,
        at: Some(Utc::now()),
        value: None,
        samples: Vec::new(),
        samples_dropped: 0,
        drift: None,
        evidence: Value::Null,
    }
}

/// Runs every configured check through the bake `v.bake` (see the module docs). `alerts`
/// answers what the incident's alerts are doing now.
pub async fn check<F, Fut>(
    v: &Verification,
    target: &Target,
    executors: &Executors,
    http: &reqwest::Client,
    prometheus_url: Option<&str>,
    alerts: F,
) -> Vec<CheckResult>
where
    F: Fn() -> Fut,
    Fut: Future<Output = AlertState>,
{
    let deadline = Instant::now() + v.bake;
    let stop = Stop {
        fail_fast: v.fail_fast,
        tx: Arc::new(watch::channel(false).0),
    };
    let allowed = v.allowed_bad_samples;
    let baseline = Arc::new(Mutex::new(None));
    let read_back = hold_check(
        "read_back",
        Hold::new(Rule::Strict, allowed, 1),
        v.interval,
        deadline,
        &stop,
        |v| match &v.deciding {
            Some(s) if s.fatal => format!("DRIFT, not written over (a human decides): {}", v.reason),
            _ if v.passed => format!("the target stayed as written: {}", v.reason),
            _ => format!("the target was not as written: {}", v.reason),
        },
        || {
            let baseline = baseline.clone();
            async move {
                let mut b = baseline.lock().await;
                let r = executors.read_back(target, &mut b).await;
                let mut sample = Sample::new(Utc::now(), r.value, r.ok);
                sample.fatal = r.drift.is_some();
                Observed {
                    sample,
                    drift: r.drift,
                    evidence: r.evidence,
                }
            }
        },
    );
    let ready = async {
        // Only Kubernetes has a readiness check apart from its read-back.
        if !matches!(target, Target::Kubernetes(_)) {
            return None;
        }
        let run = executors.verify(target);
        let started = Instant::now();
        let out = tokio::select! {
            r = tokio::time::timeout_at(deadline, run) => r,
            _ = stop.stopped() => return Some(CheckResult { stopped: true, ..inconclusive("ready", "not finished: the bake was ended early by a failed check".into()) }),
        };
        let (result, steps) = match out {
            Ok(None) => return None,
            Ok(Some(r)) => r,
            Err(_) => (
                Err(crate::action::ActionError::Failed {
                    message: "not ready by the end of the bake".into(),
                    detail: Value::Null,
                }),
                Vec::new(),
            ),
        };
        let (passed, detail) = match result {
            Ok(d) => (true, d),
            Err(e) => (false, e.to_string()),
        };
        if !passed {
            stop.failed();
        }
        let sample = Sample::new(Utc::now(), if passed { "ready" } else { "not ready" }, passed);
        Some(CheckResult {
            check: "ready",
            passed,
            stopped: false,
            detail,
            took_ms: millis(started.elapsed()),
            at: Some(sample.at),
            value: Some(sample.value.clone()),
            samples: vec![sample],
            samples_dropped: 0,
            drift: None,
            evidence: Value::Array(steps),
        })
    };
    let probe = async {
        let p = v.health_probe.as_ref()?;
        Some(
            hold_check(
                "health_probe",
                Hold::new(Rule::Settle, allowed, p.successes),
                p.interval,
                deadline,
                &stop,
                |v| format!("{} (expected {}): {}", p.url, p.expected_status, v.reason),
                || async { Observed::from(sources::probe(http, p).await) },
            )
            .await,
        )
    };
    let query = async {
        let q = v.prometheus.as_ref()?;
        let Some(base) = prometheus_url else {
            stop.failed();
            return Some(inconclusive(
                "prometheus",
                "the policy has a Prometheus check but verification.prometheus_url is not configured".into(),
            ));
        };
        Some(
            hold_check(
                "prometheus",
                Hold::new(Rule::Settle, allowed, 1),
                v.interval,
                deadline,
                &stop,
                |v| format!("{} {}: {}", q.query, sources::bound(q), v.reason),
                || async { Observed::from(sources::prometheus(http, base, q).await) },
            )
            .await,
        )
    };
    let resolved = async {
        if !v.alert_resolves {
            return None;
        }
        Some(
            hold_check(
                "alert_resolved",
                Hold::new(Rule::Settle, allowed, 1),
                v.interval,
                deadline,
                &stop,
                |v| format!("the incident's alerts: {}", v.reason),
                || async {
                    let at = Utc::now();
                    let mut s = match alerts().await {
                        AlertState::Resolved => Sample::new(at, "resolved", true),
                        AlertState::Firing(n) => Sample::new(at, format!("{n} firing"), false),
                        AlertState::ResolvedAtSource(why) => {
                            Sample::new(at, format!("resolved at the source: {why}"), true)
                        }
                        AlertState::FiringPerSource(n, why) => Sample::new(at, format!("{n} firing: {why}"), false),
                        AlertState::NoAlerts => Sample::new(
                            at,
                            "inconclusive: the incident has no alert (opened by a person), so none can resolve",
                            false,
                        ),
                        AlertState::Unreadable(e) => Sample::new(at, format!("unreadable: {e}"), false),
                    };
                    s.fatal = s.value.starts_with("inconclusive");
                    Observed::from(s)
                },
            )
            .await,
        )
    };
    let (r, k, p, q, a) = tokio::join!(read_back, ready, probe, query, resolved);
    std::iter::once(r).chain(k).chain(p).chain(q).chain(a).collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn alb() -> Target {
        serde_json::from_value(serde_json::json!({"alb": {
            "listener_arn": "arn:aws:elasticloadbalancing:us-east-1:1:listener/app/lb/1/2",
            "stable_target_group_arn": "arn:aws:elasticloadbalancing:us-east-1:1:targetgroup/stable/1",
        }}))
        .unwrap()
    }

    /// No input is no pass: an incident without alerts cannot "resolve", and a replica without
    /// the executor cannot read the target back.
    #[tokio::test]
    async fn nothing_passes_for_lack_of_input() {
        let v = Verification {
            bake: Duration::from_millis(300),
            interval: Duration::from_millis(100),
            alert_resolves: true,
            fail_fast: false,
            ..Verification::default()
        };
        let checks = check(
            &v,
            &alb(),
            &Executors::default(),
            &reqwest::Client::new(),
            None,
            || async { AlertState::NoAlerts },
        )
        .await;
        let names: Vec<&str> = checks.iter().map(|c| c.check).collect();
        assert_eq!(names, ["read_back", "alert_resolved"]);
        assert!(checks.iter().all(|c| !c.passed), "{checks:#?}");
        assert!(
            checks[0]
                .detail
                .contains("no alb executor is configured on this replica"),
            "{}",
            checks[0].detail
        );
        let a = checks.iter().find(|c| c.check == "alert_resolved").unwrap();
        assert!(
            a.detail
                .contains("inconclusive: the incident has no alert (opened by a person)"),
            "{a:#?}"
        );
    }

    /// A Prometheus check without a Prometheus to ask fails at once, saying so.
    #[tokio::test]
    async fn a_query_without_prometheus_is_inconclusive() {
        let v = Verification {
            bake: Duration::from_millis(100),
            fail_fast: false,
            prometheus: Some(crate::policy::PrometheusCheck {
                query: "up".into(),
                below: None,
                above: Some(0.5),
            }),
            ..Verification::default()
        };
        let checks = check(
            &v,
            &alb(),
            &Executors::default(),
            &reqwest::Client::new(),
            None,
            || async { AlertState::Resolved },
        )
        .await;
        let q = checks.iter().find(|c| c.check == "prometheus").unwrap();
        assert!(!q.passed);
        assert!(q.detail.starts_with("inconclusive: "), "{}", q.detail);
    }
}
