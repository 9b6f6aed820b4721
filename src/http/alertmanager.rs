//! `POST /webhook/alertmanager`: authenticate, parse, store durably, answer, wake the
//! responder. Deciding and acting happen later, never while Alertmanager waits (it cuts a
//! receiver off at 10 s and re-sends).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::alert::{AlertStatus, Notification};

/// Stores a webhook delivery. 2xx only once every alert in it is committed to the store.
pub async fn receive(State(state): State<AppState>, body: Bytes) -> Result<(StatusCode, Json<Value>), ApiError> {
    // The credentials were checked before the body was read (`auth::webhook_credentials`).
    let mut n = Notification::parse(&body).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    // JSON can carry a NUL only as the escape `\u0000`: a body without one has none.
    if may_hold_nul(&body) {
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
    // An intake-only replica (`workers.decide: false`) leaves new alerts to one that decides.
    if stats.stored > 0 && r.decides {
        r.wake.notify_one();
    }
    tracing::debug!(group_key = %n.group_key, stored = stats.stored, duplicates = stats.duplicates, "webhook stored");
    Ok((
        StatusCode::OK,
        Json(json!({ "status": "stored", "stored": stats.stored, "duplicates": stats.duplicates })),
    ))
}

/// Whether a (parsed, so valid) JSON body may hold a NUL: only the escape `\u0000` writes one
/// (an escaped backslash followed by `u0000` also matches; the caller then finds no NUL).
/// Most of a body has no backslash at all: each 64-byte block is tested for one with a
/// comparison the compiler vectorises, and only blocks with one are looked at closely. (The
/// six-byte window compared at every offset cost a quarter of the floor's whole work per
/// delivery.)
fn may_hold_nul(body: &[u8]) -> bool {
    body.chunks(64).enumerate().any(|(k, block)| {
        block.iter().fold(false, |seen, &b| seen | (b == b'\\'))
            && block
                .iter()
                .enumerate()
                .any(|(i, &b)| b == b'\\' && body[k * 64 + i..].starts_with(b"\\u0000"))
    })
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
    fn a_nul_escape_is_found_wherever_it_lies_and_nothing_else_counts() {
        let filler = "x".repeat(200);
        for at in [0, 1, 58, 59, 60, 63, 64, 65, 127, 128, 190] {
            let mut body = filler.clone();
            body.insert_str(at, "\\u0000");
            assert!(may_hold_nul(body.as_bytes()), "escape at {at}");
            // Cut short at the end, or another escape: not a NUL.
            assert!(!may_hold_nul(&body.as_bytes()[..at + 5]), "truncated at {at}");
            let other = body.replace("\\u0000", "\\u0001");
            assert!(!may_hold_nul(other.as_bytes()), "\\u0001 at {at}");
        }
        assert!(!may_hold_nul(b""));
        assert!(!may_hold_nul(br#"{"a":"\\","b":"\n\"\u00e9"}"#));
    }

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
