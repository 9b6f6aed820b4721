//! Views for people and probes (health, readiness, metrics, incidents, policies) and the
//! operator API (freezes, closing an incident).

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::incident::IncidentId;

/// Alive: the process answers.
pub async fn healthz() -> &'static str {
    "ok"
}

/// How long readiness waits for the store: the shipped probe gives up at 2 s, and a pool
/// waiting for a connection to a database that is down would take its acquire timeout (5 s).
const READY_WITHIN: std::time::Duration = std::time::Duration::from_millis(800);

/// Ready: the store answers and a policy set is loaded. Details say why not, and whether
/// the responder is in dry run or frozen. One query, bounded by [`READY_WITHIN`]: reading
/// the freezes is the store check.
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let r = &state.responder;
    let store = match tokio::time::timeout(READY_WITHIN, r.freezes(chrono::Utc::now())).await {
        // Reads still work after a failed fdatasync, but no write can be acknowledged.
        Ok(Ok(freezes)) => r.store.durability_failure().map_or(Ok(freezes), Err),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("store unavailable: no answer within {READY_WITHIN:?}")),
    };
    let set = r.policies();
    let ready = store.is_ok() && !set.policies.is_empty();
    let (store, freezes) = match store {
        Ok(f) => ("ok".to_string(), Some(f)),
        Err(e) => (e, None),
    };
    let body = json!({
        "ready": ready,
        "store": store,
        // A refused reload leaves the set in force serving (still ready), but says why.
        "policies": { "count": set.policies.len(), "hash": set.hash, "refused": state.policy_reload.refusal() },
        "dry_run": r.global.dry_run,
        "freezes": freezes,
        "replica": r.replica,
        // Real rollbacks waiting for a replica that can run them (not this one): a warning, not
        // unreadiness, since this replica serves everything else.
        "unclaimable_work": r.unclaimable(),
    });
    (
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(body),
    )
}

/// Prometheus exposition; gauges that are facts of the shared store are read at scrape time.
pub async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> impl IntoResponse {
    let r = &state.responder;
    match r.store.incident_gauges().await {
        Ok((open, pending)) => r.metrics.set_incident_gauges(open, pending),
        Err(e) => {
            r.metrics.store_error();
            tracing::warn!(error = %e, "could not read incident gauges for /metrics");
        }
    }
    let now = chrono::Utc::now();
    match r.freezes(now).await {
        Ok(f) => r.metrics.set_freezes(&f, now),
        Err(e) => {
            r.metrics.store_error();
            tracing::warn!(error = %e, "could not read the freezes for /metrics");
        }
    }
    let accept = headers.get(axum::http::header::ACCEPT).and_then(|v| v.to_str().ok());
    let (content_type, body) = state.responder.metrics.render_for(accept);
    ([("content-type", content_type)], body)
}

/// `?open=true&limit=N`
#[derive(Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    open: bool,
    #[serde(default = "default_limit")]
    limit: i64,
}

fn default_limit() -> i64 {
    50
}

fn incident_json(i: &crate::incident::Incident) -> Value {
    let mut v = serde_json::to_value(i).unwrap_or(Value::Null);
    v["executed"] = Value::Bool(i.executed());
    v["open"] = Value::Bool(i.closed_at.is_none());
    v
}

/// Recent incidents, newest first.
pub async fn list_incidents(
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let list = state
        .responder
        .store
        .incidents(q.open, q.limit.clamp(1, 500))
        .await
        .map_err(ApiError::Unavailable)?;
    Ok(Json(
        json!({ "incidents": list.iter().map(incident_json).collect::<Vec<_>>() }),
    ))
}

/// One incident with its alerts and its whole timeline.
pub async fn get_incident(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let store = &state.responder.store;
    let id = IncidentId(id);
    let inc = store
        .incident(&id)
        .await
        .map_err(ApiError::Unavailable)?
        .ok_or_else(|| ApiError::NotFound(format!("no incident {id}")))?;
    let alerts = store.incident_alerts(&id).await.map_err(ApiError::Unavailable)?;
    let events = store.events(&id).await.map_err(ApiError::Unavailable)?;
    let mut v = incident_json(&inc);
    v["alerts"] = alerts
        .iter()
        .map(|a| serde_json::to_value(&a.alert).unwrap_or(Value::Null))
        .collect();
    v["timeline"] = serde_json::to_value(events).unwrap_or(Value::Null);
    Ok(Json(v))
}

/// Alerts that could not be decided (bad data, a decision that panicked), newest first, with
/// the reason each was set aside.
pub async fn undecidable_alerts(
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let list = state
        .responder
        .store
        .undecidable_alerts(q.limit.clamp(1, 500))
        .await
        .map_err(ApiError::Unavailable)?;
    Ok(Json(json!({ "alerts": list })))
}

/// The policy set in force and its hash.
pub async fn policies(State(state): State<AppState>) -> Json<Value> {
    let set = state.responder.policies();
    Json(json!({ "hash": set.hash, "dir": set.dir, "policies": set.policies }))
}

/// `POST /api/v1/freezes` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreezeBody {
    /// A policy name; absent: every policy.
    #[serde(default)]
    policy: Option<String>,
    reason: String,
    /// e.g. "2h"; absent: until lifted.
    #[serde(default, with = "humantime_serde")]
    duration: Option<std::time::Duration>,
    /// Who asks, for the audit (default "api").
    #[serde(default)]
    by: Option<String>,
}

/// When a freeze of `d` from `now` ends, or what is wrong with `d`: past the calendar's end (a
/// checked sum: `now + d` panics there), or under a second. A freeze that has ended when it is
/// stored would replace the one in force (a freeze per scope) and so lift it, while its
/// answer says "frozen".
pub(super) fn freeze_end(
    now: chrono::DateTime<chrono::Utc>,
    d: std::time::Duration,
) -> Result<chrono::DateTime<chrono::Utc>, String> {
    if d < std::time::Duration::from_secs(1) {
        return Err(format!(
            "duration: {} freezes nothing; give at least 1s (e.g. 2h), or omit it to freeze until lifted",
            humantime::format_duration(d)
        ));
    }
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .ok_or_else(|| {
            format!(
                "duration: {} would end past the calendar's end; use a shorter one (e.g. 2h, 3days), or omit it to freeze until lifted",
                humantime::format_duration(d)
            )
        })
}

/// Freezes automatic rollbacks (the kill switch), globally or for one policy.
///
/// The body is read raw and parsed only after the credentials are checked: an unauthenticated
/// caller gets 401 whatever it sends, never a parse error that names the fields.
pub async fn freeze(State(state): State<AppState>, body: Bytes) -> Result<(StatusCode, Json<Value>), ApiError> {
    let b: FreezeBody = serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("freeze body: {e}")))?;
    let until = match b.duration {
        None => None,
        Some(d) => Some(freeze_end(chrono::Utc::now(), d).map_err(ApiError::BadRequest)?),
    };
    let r = &state.responder;
    if let Some(p) = &b.policy {
        if r.policies().get(p).is_none() {
            return Err(ApiError::NotFound(format!("no policy {p}")));
        }
    }
    let scope = b.policy.clone().unwrap_or_else(|| "*".into());
    let f = crate::policy::Freeze {
        reason: b.reason,
        by: format!("api:{}", b.by.unwrap_or_else(|| "operator".into())),
        until,
    };
    r.set_freeze(&scope, &f).await.map_err(ApiError::Unavailable)?;
    Ok((StatusCode::CREATED, Json(json!({ "scope": scope, "freeze": f }))))
}

/// Lifts a freeze; `*` is the global one.
pub async fn unfreeze(
    State(state): State<AppState>,
    scope: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    // The credentials were checked first (`auth::operator_credentials`): a malformed path is a
    // 400 only for an operator.
    let Path(scope) = scope.map_err(|e| ApiError::BadRequest(format!("scope: {}", e.body_text())))?;
    let lifted = state
        .responder
        .lift_freeze(&scope, "api")
        .await
        .map_err(ApiError::Unavailable)?;
    Ok(Json(json!({ "scope": scope, "lifted": lifted })))
}

/// The freezes in force (config and run time).
pub async fn freezes(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let f = state
        .responder
        .freezes(chrono::Utc::now())
        .await
        .map_err(ApiError::Unavailable)?;
    Ok(Json(serde_json::to_value(f).unwrap_or(Value::Null)))
}

/// `POST /api/v1/incidents/{id}/close` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloseBody {
    /// Why it can be closed (e.g. "fixed by hand, verified on the dashboard").
    note: String,
    /// Who closes it, for the audit (default "operator").
    #[serde(default)]
    by: Option<String>,
}

/// A person closes a settled incident: after a failed verification, nothing else does.
pub async fn close_incident(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::BadRequest(format!("id: {}", e.body_text())))?;
    let b: CloseBody = serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("close body: {e}")))?;
    if b.note.trim().is_empty() {
        return Err(ApiError::BadRequest("note: say why the incident can be closed".into()));
    }
    let by = format!("api:{}", b.by.unwrap_or_else(|| "operator".into()));
    let id = IncidentId(id);
    let out = state
        .responder
        .close_by_human(&id, &by, b.note.trim())
        .await
        .map_err(|e| match e {
            crate::responder::StepError::Store(e) => ApiError::Unavailable(e),
            // Concurrent changes outlasted the retries: transient, try again.
            other => ApiError::Unavailable(crate::store::StoreError::Unavailable(other.to_string())),
        })?;
    match out {
        crate::responder::HumanClose::NotFound => Err(ApiError::NotFound(format!("no incident {id}"))),
        crate::responder::HumanClose::NotSettled { phase } => Err(ApiError::BadRequest(format!(
            "incident {id} is {phase}: only an incident whose rollback is settled can be closed"
        ))),
        other => Ok(Json(serde_json::to_value(other).unwrap_or(Value::Null))),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// After a failed fdatasync the store refuses every write until a restart (`store::durable`):
    /// `/readyz` answers 503 and says so, so that the orchestrator restarts the replica and the
    /// load balancer sends it nothing meanwhile.
    #[tokio::test]
    async fn readiness_fails_after_a_failed_sync_and_says_to_restart() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;

        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        let fail = Arc::new(AtomicBool::new(false));
        let store = crate::store::Store::connect_failing_sync_when(&url, fail.clone())
            .await
            .unwrap();
        let responder = crate::responder::tests::responder_on(store.clone(), crate::responder::Clock::System);
        let state = AppState::new(Arc::new(responder), None, None);
        let ready = |state: AppState| async move {
            let r = readyz(State(state)).await.into_response();
            let status = r.status();
            let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
            (status, serde_json::from_slice::<serde_json::Value>(&body).unwrap())
        };
        let (status, body) = ready(state.clone()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["store"], "ok");
        fail.store(true, Ordering::SeqCst);
        let now = chrono::Utc::now();
        let freeze = crate::policy::Freeze {
            reason: "test".into(),
            by: "me".into(),
            until: None,
        };
        assert!(store.freeze("*", &freeze, now).await.is_err());
        // The disk answers again; the replica stays unready all the same.
        fail.store(false, Ordering::SeqCst);
        let (status, body) = ready(state).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["ready"], false);
        let why = body["store"].as_str().unwrap();
        assert!(why.contains("injected EIO") && why.contains("restart"), "{why}");
    }

    #[test]
    fn a_freeze_past_the_calendar_has_no_end_instead_of_a_panic() {
        let now = chrono::Utc::now();
        let hour = freeze_end(now, Duration::from_secs(3600)).unwrap();
        assert_eq!(hour - now, chrono::Duration::hours(1));
        let year = 365 * 24 * 3600;
        // 1,000,000 years overflows the date; 10^9 years overflows chrono's Duration itself.
        for d in [1_000_000 * year, 1_000_000_000 * year] {
            let e = freeze_end(now, Duration::from_secs(d)).unwrap_err();
            assert!(e.contains("past the calendar's end"), "{e}");
        }
    }

    #[test]
    fn a_freeze_that_would_end_at_once_is_refused() {
        let now = chrono::Utc::now();
        for d in [Duration::ZERO, Duration::from_nanos(1), Duration::from_millis(999)] {
            let e = freeze_end(now, d).unwrap_err();
            assert!(e.starts_with("duration: ") && e.contains("freezes nothing"), "{e}");
        }
        assert_eq!(
            freeze_end(now, Duration::from_secs(1)),
            Ok(now + chrono::Duration::seconds(1))
        );
    }
}
