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
    let mut n = Notification::parse(&body).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    // JSON can carry a NUL only as the escape `\u0000`: a body without one has none.
    if body.windows(6).any(|w| w.eq_ignore_ascii_case(b"\\u0000")) {
        let fields = replace_nul(&mut n);
        if !fields.is_empty() {
            tracing::warn!(group_key = %n.group_key, fields = %fields.join(", "), "NUL characters in a webhook delivery replaced with U+FFFD");
        }
    }
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

/// What a NUL character becomes: PostgreSQL's text cannot hold one (every insert of it fails,
/// and Alertmanager would retry the whole group forever), and a 400 would refuse the group's
/// valid alerts on every re-send. The replacement character keeps the place visible.
const NUL_STANDS_IN: &str = "\u{FFFD}";

/// Replaces every NUL in the delivery's text (labels and annotations keys and values, URLs,
/// group key, receiver); the fields it changed, named as in the payload. Fingerprints and
/// times cannot hold one (the parser checks them).
fn replace_nul(n: &mut Notification) -> Vec<String> {
    fn text(s: &mut String, field: impl FnOnce() -> String, changed: &mut Vec<String>) {
        if s.contains('\0') {
            *s = s.replace('\0', NUL_STANDS_IN);
            changed.push(field());
        }
    }
    fn set(m: &mut crate::alert::LabelSet, field: &str, changed: &mut Vec<String>) {
        if !m.iter().any(|(k, v)| k.contains('\0') || v.contains('\0')) {
            return;
        }
        let old = std::mem::take(m);
        for (mut k, mut v) in old {
            let name = k.clone();
            text(&mut k, || format!("{field}.{}", name.escape_debug()), changed);
            text(&mut v, || format!("{field}.{}", name.escape_debug()), changed);
            m.insert(k, v);
        }
    }
    let mut changed = Vec::new();
    text(&mut n.group_key, || "groupKey".into(), &mut changed);
    text(&mut n.receiver, || "receiver".into(), &mut changed);
    text(&mut n.external_url, || "externalURL".into(), &mut changed);
    if let Some(r) = n.notification_reason.as_mut() {
        text(r, || "notification_reason".into(), &mut changed);
    }
    set(&mut n.group_labels, "groupLabels", &mut changed);
    set(&mut n.common_labels, "commonLabels", &mut changed);
    set(&mut n.common_annotations, "commonAnnotations", &mut changed);
    for (i, a) in n.alerts.iter_mut().enumerate() {
        text(
            &mut a.generator_url,
            || format!("alerts[{i}].generatorURL"),
            &mut changed,
        );
        set(&mut a.labels, &format!("alerts[{i}].labels"), &mut changed);
        set(&mut a.annotations, &format!("alerts[{i}].annotations"), &mut changed);
    }
    changed.dedup();
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_nul_in_the_text_of_a_delivery_is_replaced_and_named() {
        let body = br#"{"version":"4","groupKey":"g\u0000k","status":"firing","receiver":"r\u0000",
            "externalURL":"http://am\u0000","commonLabels":{"a\u0000":"b"},"alerts":[
            {"status":"firing","labels":{"alertname":"High\u0000Rate","ok":"fine"},"annotations":{"s":"\u0000"},
             "startsAt":"2026-11-30T10:00:00Z","generatorURL":"http://p\u0000","fingerprint":"a1"}]}"#;
        let mut n = Notification::parse(body).unwrap();
        let fields = replace_nul(&mut n);
        assert_eq!(
            fields,
            [
                "groupKey",
                "receiver",
                "externalURL",
                "commonLabels.a\\0",
                "alerts[0].generatorURL",
                "alerts[0].labels.alertname",
                "alerts[0].annotations.s"
            ]
        );
        assert_eq!(n.group_key, "g\u{FFFD}k");
        assert_eq!(n.alerts[0].alertname(), "High\u{FFFD}Rate");
        assert_eq!(n.alerts[0].labels["ok"], "fine");
        assert_eq!(n.common_labels["a\u{FFFD}"], "b");
        let text = serde_json::to_string(&n).unwrap();
        assert!(!text.contains("\\u0000") && !text.contains('\0'), "{text}");
    }
}
