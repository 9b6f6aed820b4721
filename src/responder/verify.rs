//! The verification step: hold every check of the incident's policy through its bake, record
//! each check's samples, and settle the incident as verified or verification failed (which
//! escalates and stays open until a human closes it).

use std::collections::BTreeMap;

use serde_json::{json, Value};
use tracing::warn;

use super::lease::{Lease, StopAt};
use super::{Responder, StepError};
use crate::action::Target;
use crate::alert::AlertStatus;
use crate::incident::{AuditKind, Event, Incident, IncidentId};
use crate::notify::Change;
use crate::policy::Verification;
use crate::verify::{self, AlertState, CheckResult};

/// The verification settings the incident was opened with. A context without them, or with
/// settings this build cannot read (a replica of another version), is not "no checks": it is
/// an inconclusive verification that says so.
pub(super) fn settings(context: &Value) -> Result<Verification, String> {
    match context.get("verification") {
        None | Some(Value::Null) => Err(
            "the incident's stored context has no verification settings, so nothing can prove the rollback worked"
                .into(),
        ),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| format!("the incident's stored verification settings are unreadable by this replica: {e}")),
    }
}

/// The incident's notification context. Messages do not need the verification settings: a
/// context whose settings this replica cannot read (another version's) still routes them. A
/// context that does not parse at all routes nothing, and says so in the log.
pub(super) fn notification_context(inc: &Incident) -> crate::notify::Context {
    match serde_json::from_value(inc.context.clone()) {
        Ok(c) => c,
        Err(e) => {
            let mut without = inc.context.clone();
            if let Some(o) = without.as_object_mut() {
                o.remove("verification");
            }
            match serde_json::from_value(without) {
                Ok(c) => {
                    warn!(incident = %inc.id, error = %e, "stored verification settings unreadable; notifying without them");
                    c
                }
                Err(e) => {
                    tracing::error!(incident = %inc.id, error = %e, "stored notification context unreadable: no message can be routed");
                    crate::notify::Context::default()
                }
            }
        }
    }
}

/// What the incident's alerts are doing. Alerts still firing here are checked with the
/// Alertmanager that sent them (the payload's `externalURL`, one request per Alertmanager):
/// when an HA member dies right after sending a firing alert, its peer may never send the
/// resolve, and a rollback that worked must not fail on "still firing" for that.
async fn ask_the_source(http: &reqwest::Client, alerts: &[crate::store::StoredAlert]) -> AlertState {
    let firing: Vec<&crate::store::StoredAlert> = alerts
        .iter()
        .filter(|s| s.alert.status == AlertStatus::Firing)
        .collect();
    if firing.is_empty() {
        return AlertState::Resolved;
    }
    let n = u64::try_from(firing.len()).unwrap_or(u64::MAX);
    let mut held: BTreeMap<&str, Result<Vec<crate::alert::LabelSet>, String>> = BTreeMap::new();
    for s in &firing {
        if !s.external_url.is_empty() && !held.contains_key(s.external_url.as_str()) {
            let answer = verify::alertmanager_alerts(http, &s.external_url).await;
            held.insert(s.external_url.as_str(), answer);
        }
    }
    let mut still = Vec::new();
    let mut gone = Vec::new();
    for s in &firing {
        let name = s.alert.alertname();
        match held.get(s.external_url.as_str()) {
            None => still.push(format!("{name}: no externalURL to ask")),
            Some(Err(e)) => still.push(format!("{name}: could not ask its Alertmanager ({e})")),
            Some(Ok(active)) if active.contains(&s.alert.labels) => {
                still.push(format!("{name}: still active at {}", s.external_url))
            }
            Some(Ok(_)) => gone.push(format!("{name}: no longer held by {}", s.external_url)),
        }
    }
    if still.is_empty() {
        AlertState::ResolvedAtSource(format!("no resolved notification received; {}", gone.join("; ")))
    } else {
        AlertState::FiringPerSource(n, still.join("; "))
    }
}

/// One line per check for the timeline.
fn check_summary(c: &CheckResult) -> String {
    let verdict = if c.passed {
        "passed"
    } else if c.stopped {
        "stopped"
    } else {
        "FAILED"
    };
    format!(
        "check {}: {verdict} after {} sample(s) in {} ms: {}",
        c.check,
        c.samples.len() + c.samples_dropped,
        c.took_ms,
        c.detail
    )
}

/// The verdict with the values that decided it, for the phase change (Slack shows it).
pub(super) fn verdict_summary(checks: &[CheckResult], bake: std::time::Duration) -> String {
    let failed: Vec<&CheckResult> = checks.iter().filter(|c| !c.passed && !c.stopped).collect();
    let value = |c: &CheckResult| match (&c.value, c.at) {
        (Some(v), Some(at)) => format!("{v} at {}", at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        _ => c.detail.clone(),
    };
    if checks.iter().all(|c| c.passed) {
        let held: Vec<String> = checks
            .iter()
            .map(|c| {
                format!(
                    "{} ({} samples, last {})",
                    c.check,
                    c.samples.len() + c.samples_dropped,
                    value(c)
                )
            })
            .collect();
        return format!(
            "verified: every check held through the {} bake: {}",
            humantime::format_duration(bake),
            held.join("; ")
        );
    }
    let why: Vec<String> = failed
        .iter()
        .map(|c| match &c.drift {
            Some(d) => format!("{}: DRIFT: {d}", c.check),
            None => format!("{}: {}", c.check, c.detail),
        })
        .collect();
    let names: Vec<&str> = failed.iter().map(|c| c.check).collect();
    format!(
        "verification failed ({}): {}; the rollback is not proven to work; no further automatic rollback of this target, a human must act",
        names.join(", "),
        why.join("; ")
    )
}

impl Responder {
    /// Runs every verification check of the incident's policy through its bake period and
    /// settles the incident as verified or verification failed (which escalates).
    pub(super) async fn verify(&self, inc: &mut Incident) -> Result<(), StepError> {
        let target: Target = inc
            .plan
            .target()
            .map_err(|e| StepError::Plan(inc.id.clone(), e.to_string()))?
            .clone();
        let id = inc.id.clone();
        let lease = Lease::new(self, inc.lease_until.unwrap_or_else(|| self.clock.now()));
        let (checks, bake) = match settings(&inc.context) {
            Ok(v) => {
                let store = self.store.clone();
                let alerts = || {
                    let (store, id, http) = (store.clone(), id.clone(), self.http.clone());
                    async move {
                        match store.incident_alerts(&id).await {
                            Err(e) => AlertState::Unreadable(e.to_string()),
                            Ok(a) if a.is_empty() => AlertState::NoAlerts,
                            Ok(a) => ask_the_source(&http, &a).await,
                        }
                    }
                };
                let checks = self
                    .with_lease(
                        &inc.id,
                        &lease,
                        StopAt::Loss,
                        verify::check(
                            &v,
                            &target,
                            &self.executors,
                            &self.http,
                            self.prometheus_url.as_deref(),
                            alerts,
                        ),
                    )
                    .await;
                // Lost: the holder verifies; nothing of this bake is recorded as ours.
                let Some(checks) = checks else {
                    return Ok(());
                };
                (checks, v.bake)
            }
            Err(why) => (vec![verify::inconclusive("settings", why)], std::time::Duration::ZERO),
        };
        let now = self.clock.now();
        let mut tx = self.store.begin().await?;
        // The bake is over: the lease's new end matters to nobody after this commit.
        if self.hold(&mut tx, &lease, &id).await?.is_none() {
            return Ok(());
        }
        let Some(fresh) = tx.incident(&id).await? else {
            return Ok(());
        };
        *inc = fresh;
        for c in &checks {
            Self::record(
                &mut tx,
                inc,
                AuditKind::VerificationCheck,
                &self.replica,
                check_summary(c),
                serde_json::to_value(c).unwrap_or_default(),
                now,
            )
            .await?;
        }
        let passed = !checks.is_empty() && checks.iter().all(|c| c.passed);
        let summary = verdict_summary(&checks, bake);
        let detail = json!({ "checks": checks });
        if passed {
            inc.verified_at = Some(now);
            if let Some(acted) = inc.acted_at {
                self.metrics
                    .action_to_verified((now - acted).num_milliseconds() as f64 / 1000.0);
            }
            self.apply(
                &mut tx,
                inc,
                Event::VerificationPassed,
                &self.replica,
                summary,
                detail,
                now,
            )
            .await?;
        } else {
            let failed: Vec<&str> = checks.iter().filter(|c| !c.passed).map(|c| c.check).collect();
            warn!(checks = ?failed, "verification failed; escalating, no second rollback");
            self.apply(
                &mut tx,
                inc,
                Event::VerificationFailed,
                &self.replica,
                summary,
                detail,
                now,
            )
            .await?;
        }
        self.close_if_done(&mut tx, inc, now).await?;
        self.commit(tx, inc).await
    }
}

/// What a person's close did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum HumanClose {
    Closed {
        phase: String,
    },
    AlreadyClosed,
    /// The rollback's story is not over (approval pending, action or verification running).
    NotSettled {
        phase: String,
    },
    NotFound,
}

impl Responder {
    /// A person closes a settled incident (after a failed verification nothing else closes
    /// it): the page and the escalation resolve, the status page resolves. Conditional on the
    /// incident's version; retried on a concurrent change.
    pub async fn close_by_human(&self, id: &IncidentId, by: &str, note: &str) -> Result<HumanClose, StepError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.try_close_by_human(id, by, note).await {
                Err(StepError::Conflict(_)) if attempt < 5 => continue,
                Err(StepError::Store(e)) if e.is_conflict() && attempt < 5 => continue,
                other => return other,
            }
        }
    }

    async fn try_close_by_human(&self, id: &IncidentId, by: &str, note: &str) -> Result<HumanClose, StepError> {
        let now = self.clock.now();
        let mut tx = self.store.begin().await?;
        let Some(mut inc) = tx.incident(id).await? else {
            return Ok(HumanClose::NotFound);
        };
        if inc.closed_at.is_some() {
            return Ok(HumanClose::AlreadyClosed);
        }
        if !inc.phase.is_settled() {
            return Ok(HumanClose::NotSettled {
                phase: inc.phase.to_string(),
            });
        }
        inc.close(now);
        if !tx.save_incident(&inc).await? {
            return Err(StepError::Conflict(inc.id.clone()));
        }
        inc.version += 1;
        let summary = format!("incident closed by {by} in phase {}: {note}", inc.phase);
        Self::record(
            &mut tx,
            &inc,
            AuditKind::Closed,
            by,
            summary.clone(),
            json!({ "by": by, "note": note }),
            now,
        )
        .await?;
        self.tell(&mut tx, &inc, Change::Note { summary: &summary }, now)
            .await?;
        let closed = Self::closing(&mut tx, &inc).await?;
        self.tell(&mut tx, &inc, closed, now).await?;
        self.commit(tx, &inc).await?;
        Ok(HumanClose::Closed {
            phase: inc.phase.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_unreadable_settings_are_not_no_checks() {
        assert!(settings(&json!({})).unwrap_err().contains("no verification settings"));
        assert!(settings(&json!({"verification": null})).is_err());
        let e = settings(&json!({"verification": {"bake": "5m", "from_the_future": true}})).unwrap_err();
        assert!(e.contains("unreadable by this replica"), "{e}");
        assert_eq!(
            settings(&json!({"verification": {"bake": "5m"}})).unwrap().bake,
            std::time::Duration::from_secs(300)
        );
    }

    #[test]
    fn notifications_do_not_depend_on_readable_verification_settings() {
        let mut inc = Incident::sample(crate::incident::Phase::VerificationFailed, chrono::Utc::now());
        inc.context = json!({
            "labels": {}, "target": "t",
            "routes": {"slack_channel": "#portal", "pagerduty": null, "statuspage": null, "escalation_mention": null},
            "verification": {"bake": "5m", "from_a_newer_version": 1}
        });
        let ctx = notification_context(&inc);
        assert_eq!(ctx.routes.slack_channel.as_deref(), Some("#portal"));
    }

    #[test]
    fn an_inconclusive_setting_fails_with_its_reason() {
        let c = verify::inconclusive("settings", "no settings".into());
        let s = verdict_summary(&[c], std::time::Duration::ZERO);
        assert!(
            s.starts_with("verification failed (settings): settings: inconclusive: no settings;"),
            "{s}"
        );
    }
}
