//! PagerDuty into the responder.
//!
//! `POST /pagerduty/webhook`: webhooks v3, signed (`X-PagerDuty-Signature: v1=<hex>[,v1=...]`,
//! HMAC-SHA256 of the raw body with any configured secret, so rotation works), de-duplicated
//! by the signed `event.id` (the unsigned `X-Webhook-Id` header only for a body without one),
//! which is stored in the commit of the vote or note it made (`store::Receipt`): a delivery
//! answered 503 left none, so its redelivery is processed. `incident.*`
//! events carrying our dedup key link the PagerDuty incident to ours; acknowledgements and
//! resolutions are recorded on our incident; a note (`incident.annotated`) reading
//! `rollback approve` or `rollback deny [reason]` is a vote by the note's author, mapped to
//! the policy's `pagerduty_users`.
//!
//! `POST /pagerduty/action`: for incident workflows' "send a webhook" step, which PagerDuty
//! does not sign: a bearer token, and a JSON body `{"action": "approve"|"deny",
//! "incident_id": "<PagerDuty incident id>", "user_id": "<PagerDuty user id>", "reason": ".."}`.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};
use crate::approval::{Person, Refusal, Verdict, VoteResult};
use crate::incident::{AuditKind, IncidentId};
use crate::responder::{HumanError, StepError};
use crate::store::{NewEvent, Receipt, StoreError};

/// Secrets for the PagerDuty edge.
#[derive(Default)]
pub struct PagerDutyEdge {
    pub webhook_secrets: Vec<SecretString>,
    pub action_token: Option<SecretString>,
}

/// True when any `v1=` signature in the header is the HMAC of `body` under any secret.
pub fn signature_ok(secrets: &[SecretString], header: &str, body: &[u8]) -> bool {
    let given: Vec<Vec<u8>> = header
        .split(',')
        .filter_map(|s| s.trim().strip_prefix("v1="))
        .filter_map(|h| hex::decode(h).ok())
        .collect();
    // An empty key signs for anybody; config refuses one, and it never verifies here either.
    secrets.iter().filter(|s| !s.expose_secret().is_empty()).any(|secret| {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes()) else {
            return false;
        };
        mac.update(body);
        let expected = mac.finalize().into_bytes();
        given
            .iter()
            .any(|g| bool::from(g.as_slice().ct_eq(expected.as_slice())))
    })
}

const KEY_PREFIX: &str = "rollback-responder/";

/// Our incident for a PagerDuty incident: by its key (our dedup key) or a link stored earlier.
async fn our_incident(
    state: &AppState,
    pd_incident: &str,
    incident_key: Option<&str>,
) -> Result<Option<IncidentId>, ApiError> {
    let store = &state.responder.store;
    if let Some(key) = incident_key.and_then(|k| k.strip_prefix(KEY_PREFIX)) {
        // An escalated incident has two PagerDuty incidents, the first page's and the
        // escalation's: each keeps its own link, so a note on either is a vote on ours.
        let (id, link) = match key.strip_suffix("/escalation") {
            Some(id) => (id, ESCALATION_LINK),
            None => (key, LINK),
        };
        let ours = IncidentId(id.to_string());
        if store.incident(&ours).await.map_err(ApiError::Unavailable)?.is_some() {
            store
                .set_ref(&ours, "pagerduty", link, pd_incident)
                .await
                .map_err(ApiError::Unavailable)?;
            return Ok(Some(ours));
        }
    }
    for link in [LINK, ESCALATION_LINK] {
        let found = store
            .incident_by_ref("pagerduty", link, pd_incident)
            .await
            .map_err(ApiError::Unavailable)?;
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

/// The stored links (`notification_refs.ref_key`) from a PagerDuty incident to ours: the
/// first page's, and the escalation's.
const LINK: &str = "incident_id";
const ESCALATION_LINK: &str = "escalation_incident_id";

fn parse_note(content: &str) -> Option<Verdict> {
    let mut words = content.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("rollback") {
        return None;
    }
    match words.next()?.to_ascii_lowercase().as_str() {
        "approve" => Some(Verdict::Approve),
        "deny" => {
            let reason: Vec<&str> = words.collect();
            Some(Verdict::Deny {
                reason: Some(reason.join(" ")).filter(|r| !r.is_empty()),
            })
        }
        _ => None,
    }
}

/// `POST /pagerduty/webhook`
pub async fn webhook(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Result<Json<Value>, ApiError> {
    let sig = headers
        .get("x-pagerduty-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !signature_ok(&state.pagerduty.webhook_secrets, sig, &body) {
        tracing::warn!("PagerDuty webhook with a missing or wrong signature rejected");
        return Err(ApiError::Unauthorized);
    }
    let v: Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("webhook body is not JSON: {e}")))?;
    let event = &v["event"];
    // The signed event.id first: the header is not covered by the signature, so a captured
    // body re-sent with a fresh X-Webhook-Id must still count as seen.
    let receipt = event["id"]
        .as_str()
        .filter(|id| !id.is_empty())
        .or_else(|| headers.get("x-webhook-id").and_then(|h| h.to_str().ok()))
        .map(|key| Receipt::new(RECEIPTS, key))
        .ok_or_else(|| ApiError::BadRequest("no event.id and no X-Webhook-Id header".into()))?;
    // A redelivery is answered 2xx (else PagerDuty retries for 48 h) and changes nothing. The
    // receipt is written in the transaction of what the event changes (a vote, a note), so
    // both are durable or neither is: after a 503, whatever failed, the redelivery is
    // processed, never taken for a duplicate of a change that was not made.
    let seen = state
        .responder
        .store
        .receipt_seen(&receipt)
        .await
        .map_err(ApiError::Unavailable)?;
    if seen {
        return Ok(Json(duplicate()));
    }
    let now = chrono::Utc::now();
    let (answer, taken) = process(&state, event, &receipt, now).await?;
    if taken {
        return Ok(answer);
    }
    // Refused or ignored: nothing to commit the receipt with, so it is stored on its own. A
    // replay of this signed body stays a duplicate however the incident moves on (a refused
    // "approve" must not roll back once the incident is escalated), and a copy that lost to
    // another one processed at the same moment (refused as no longer pending) is its duplicate.
    // Losing this receipt loses nothing: the answer stands.
    match state.responder.store.first_receipt(RECEIPTS, receipt.key(), now).await {
        Ok(false) => Ok(Json(duplicate())),
        Ok(true) => Ok(answer),
        Err(e) => {
            tracing::warn!(error = %e, "receipt of a PagerDuty webhook that changed nothing not stored; a replay of it will be processed again");
            Ok(answer)
        }
    }
}

/// The `webhook_receipts` source of PagerDuty's events.
const RECEIPTS: &str = "pagerduty";

fn duplicate() -> Value {
    json!({ "status": "duplicate" })
}

/// One first-seen, verified PagerDuty event: the answer, and whether its receipt is in the
/// store (taken with the change it made, or already taken by another copy of it).
async fn process(
    state: &AppState,
    event: &Value,
    receipt: &Receipt,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(Json<Value>, bool), ApiError> {
    let store = &state.responder.store;
    let kind = event["event_type"].as_str().unwrap_or_default();
    let data = &event["data"];
    let agent = event["agent"]["id"].as_str().unwrap_or_default().to_string();
    let agent_name = event["agent"]["summary"].as_str().unwrap_or(agent.as_str()).to_string();
    let (pd_incident, key) = match data["type"].as_str() {
        Some("incident_note") => (data["incident"]["id"].as_str().unwrap_or_default(), None),
        _ => (data["id"].as_str().unwrap_or_default(), data["incident_key"].as_str()),
    };
    let Some(ours) = our_incident(state, pd_incident, key).await? else {
        return Ok((
            Json(json!({ "status": "ignored", "reason": "not an incident of this responder" })),
            false,
        ));
    };
    let detail = json!({ "event_type": kind, "pagerduty_incident": pd_incident, "agent": agent });
    if let Some(entry) = AuditKind::for_pagerduty(kind) {
        let summary = format!(
            "PagerDuty: {} by {}",
            kind.trim_start_matches("incident."),
            if agent.is_empty() { "PagerDuty" } else { &agent_name }
        );
        let actor = format!("pagerduty:{agent}");
        let entry = NewEvent {
            kind: entry,
            actor: &actor,
            phase_from: None,
            phase_to: None,
            summary,
            detail,
        };
        let recorded = store
            .note_event(Some(receipt), &ours, now, entry)
            .await
            .map_err(ApiError::Unavailable)?;
        let answer = if recorded {
            json!({ "status": "recorded" })
        } else {
            duplicate()
        };
        return Ok((Json(answer), true));
    }
    match kind {
        "incident.annotated" => {
            let Some(verdict) = parse_note(data["content"].as_str().unwrap_or_default()) else {
                return Ok((
                    Json(json!({ "status": "ignored", "reason": "note is not a rollback command" })),
                    false,
                ));
            };
            let who = Person::pagerduty(&agent);
            let result = state
                .responder
                .vote_once(&ours, &who, verdict, "pagerduty note", receipt)
                .await;
            // A vote, and a refusal written to the incident's trail (not authorized), took the
            // receipt with what they wrote; other refusals wrote nothing.
            let taken = !matches!(
                &result,
                Err(HumanError::Refused(r)) if !matches!(r, Refusal::NotAuthorized { .. } | Refusal::Redelivered(_))
            );
            Ok((Json(vote_json(&ours, result)?), taken))
        }
        _ => Ok((Json(json!({ "status": "ignored" })), false)),
    }
}

fn vote_json(id: &IncidentId, r: Result<VoteResult, HumanError>) -> Result<Value, ApiError> {
    match r {
        Ok(VoteResult::Approved { by }) => Ok(json!({ "status": "approved", "incident": id, "by": by })),
        Ok(VoteResult::NeedsMore { have, need }) => {
            Ok(json!({ "status": "counted", "incident": id, "have": have, "need": need }))
        }
        Ok(VoteResult::Denied) => Ok(json!({ "status": "denied", "incident": id })),
        Err(HumanError::Refused(Refusal::Redelivered(_))) => Ok(duplicate()),
        // Refusals are answered 200 on the webhook: PagerDuty must not retry them.
        Err(HumanError::Refused(e)) => Ok(json!({ "status": "refused", "incident": id, "reason": e.to_string() })),
        Err(HumanError::Step(StepError::Store(e))) => Err(ApiError::Unavailable(e)),
        // Lost the race to other writers even after the responder's retries: transient, so 503
        // and a redelivery. A 4xx is dropped by PagerDuty (three drops disable the subscription).
        Err(HumanError::Step(e @ StepError::Conflict(_))) => {
            Err(ApiError::Unavailable(StoreError::Unavailable(e.to_string())))
        }
        Err(HumanError::Step(e)) => Err(ApiError::BadRequest(e.to_string())),
    }
}

/// The body an incident workflow's "send a webhook" step is configured to send.
#[derive(Debug, Deserialize)]
pub struct ActionBody {
    pub action: String,
    pub incident_id: String,
    pub user_id: String,
    #[serde(default)]
    pub reason: Option<String>,
}

/// `POST /pagerduty/action`
pub async fn action(State(state): State<AppState>, body: Bytes) -> Result<(StatusCode, Json<Value>), ApiError> {
    // The token was checked before the body was read (`auth::pagerduty_action_credentials`).
    let b: ActionBody = serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("action body: {e}")))?;
    let verdict = match b.action.as_str() {
        "approve" => Verdict::Approve,
        "deny" => Verdict::Deny {
            reason: b.reason.clone(),
        },
        other => return Err(ApiError::BadRequest(format!("action {other:?}: use approve or deny"))),
    };
    let Some(ours) = our_incident(&state, &b.incident_id, None).await? else {
        return Err(ApiError::NotFound(format!(
            "PagerDuty incident {} is not linked to any rollback incident",
            b.incident_id
        )));
    };
    let result = state
        .responder
        .vote(&ours, &Person::pagerduty(&b.user_id), verdict, "pagerduty workflow")
        .await;
    let status = match &result {
        Err(HumanError::Refused(Refusal::NotAuthorized { .. })) => StatusCode::FORBIDDEN,
        Err(HumanError::Refused(_)) => StatusCode::CONFLICT,
        _ => StatusCode::OK,
    };
    Ok((status, Json(vote_json(&ours, result)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_with_rotation() {
        let secrets = vec![SecretString::from("old"), SecretString::from("new")];
        let body = br#"{"event":{}}"#;
        let sign = |k: &str| {
            let mut m = Hmac::<Sha256>::new_from_slice(k.as_bytes()).unwrap();
            m.update(body);
            hex::encode(m.finalize().into_bytes())
        };
        assert!(signature_ok(&secrets, &format!("v1={}", sign("new")), body));
        assert!(signature_ok(
            &secrets,
            &format!("v1={},v1={}", sign("other"), sign("old")),
            body
        ));
        assert!(!signature_ok(&secrets, &format!("v1={}", sign("other")), body));
        assert!(!signature_ok(&secrets, "", body));
        assert!(!signature_ok(&[], &format!("v1={}", sign("new")), body));
    }

    #[test]
    fn an_empty_secret_verifies_nothing() {
        let body = br#"{"event":{}}"#;
        let mut m = Hmac::<Sha256>::new_from_slice(b"").unwrap();
        m.update(body);
        let forged = format!("v1={}", hex::encode(m.finalize().into_bytes()));
        assert!(!signature_ok(&[SecretString::from("")], &forged, body));
        assert!(!signature_ok(
            &[SecretString::from("real"), SecretString::from("")],
            &forged,
            body
        ));
    }

    #[test]
    fn a_conflict_that_outlasts_the_retries_is_answered_503_so_pagerduty_redelivers() {
        let id = IncidentId("i1".into());
        let r = vote_json(&id, Err(HumanError::Step(StepError::Conflict(id.clone()))));
        assert!(matches!(r, Err(ApiError::Unavailable(_))), "{r:?}");
        let r = vote_json(
            &id,
            Err(HumanError::Step(StepError::Store(StoreError::Unavailable(
                "down".into(),
            )))),
        );
        assert!(matches!(r, Err(ApiError::Unavailable(_))), "{r:?}");
        let r = vote_json(&id, Err(HumanError::Refused(Refusal::UnknownIncident("i1".into()))));
        assert_eq!(r.unwrap()["status"], "refused");
    }

    #[test]
    fn notes_that_vote() {
        assert_eq!(parse_note("rollback approve"), Some(Verdict::Approve));
        assert_eq!(
            parse_note("Rollback DENY too risky now"),
            Some(Verdict::Deny {
                reason: Some("too risky now".into())
            })
        );
        assert_eq!(parse_note("looking into it"), None);
        assert_eq!(parse_note("rollback maybe"), None);
    }
}
