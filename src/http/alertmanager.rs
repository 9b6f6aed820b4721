//! `POST /webhook/alertmanager`: authenticate, parse, store durably, answer, wake the
//! responder. Deciding and acting happen later, never while Alertmanager waits (it cuts a
//! receiver off at 10 s and re-sends).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::alert::{AlertStatus, Notification};

/// Stores a webhook delivery. 2xx only once every alert in it is committed to the store.
pub async fn receive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    // Checked before parsing: an unauthenticated caller learns nothing about the payload.
    if !state.auth.check(&headers) {
        tracing::warn!("webhook request with missing or wrong credentials rejected");
        return Err(ApiError::Unauthorized);
    }
    let n = Notification::parse(&body).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let r = &state.responder;
    let stats = r.store.ingest(&n, chrono::Utc::now()).await.map_err(|e| {
        r.metrics.store_error();
        ApiError::Unavailable(e)
    })?;
    let firing = n.alerts.iter().filter(|a| a.status == AlertStatus::Firing).count() as u64;
    r.metrics.notification(
        n.status.as_str(),
        firing,
        n.alerts.len() as u64 - firing,
        stats.duplicates,
    );
    if stats.stored > 0 {
        r.wake.notify_one();
    }
    tracing::debug!(group_key = %n.group_key, stored = stats.stored, duplicates = stats.duplicates, "webhook stored");
    Ok((
        StatusCode::OK,
        Json(json!({ "status": "stored", "stored": stats.stored, "duplicates": stats.duplicates })),
    ))
}
