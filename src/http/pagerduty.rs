//! PagerDuty into the responder.
//!
//! `POST /pagerduty/webhook`: webhooks v3, signed (`X-PagerDuty-Signature: v1=<hex>[,v1=...]`,
//! HMAC-SHA256 of the raw body with any configured secret, so rotation works), de-duplicated
//! by `X-Webhook-Id`. `incident.*` events carrying our dedup key link the PagerDuty incident
//! to ours; acknowledgements and resolutions are recorded on our incident; a note
//! (`incident.annotated`) reading `rollback approve` or `rollback deny [reason]` is a vote by
//! the note's author, mapped to the policy's `pagerduty_users`.
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
use crate::incident::IncidentId;
use crate::responder::HumanError;

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
    secrets.iter().any(|secret| {
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
        let ours = IncidentId(key.trim_end_matches("/escalation").to_string());
        if store.incident(&ours).await.map_err(ApiError::Unavailable)?.is_some() {
            store
                .set_ref(&ours, "pagerduty", "incident_id", pd_incident)
                .await
                .map_err(ApiError::Unavailable)?;
            return Ok(Some(ours));
        }
    }
    store
        .incident_by_ref("pagerduty", "incident_id", pd_incident)
        .await
        .map_err(ApiError::Unavailable)
}

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
    let receipt = headers
        .get("x-webhook-id")
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| event["id"].as_str().map(str::to_string))
        .ok_or_else(|| ApiError::BadRequest("no X-Webhook-Id header and no event.id".into()))?;
    let now = chrono::Utc::now();
    let store = &state.responder.store;
    // A redelivery is answered 2xx (else PagerDuty retries for 48 h) and changes nothing.
    if !store
        .first_receipt("pagerduty", &receipt, now)
        .await
        .map_err(ApiError::Unavailable)?
    {
        return Ok(Json(json!({ "status": "duplicate" })));
    }
    let kind = event["event_type"].as_str().unwrap_or_default();
    let data = &event["data"];
    let agent = event["agent"]["id"].as_str().unwrap_or_default().to_string();
    let agent_name = event["agent"]["summary"].as_str().unwrap_or(agent.as_str()).to_string();
    let (pd_incident, key) = match data["type"].as_str() {
        Some("incident_note") => (data["incident"]["id"].as_str().unwrap_or_default(), None),
        _ => (data["id"].as_str().unwrap_or_default(), data["incident_key"].as_str()),
    };
    let Some(ours) = our_incident(&state, pd_incident, key).await? else {
        return Ok(Json(
            json!({ "status": "ignored", "reason": "not an incident of this responder" }),
        ));
    };
    let detail = json!({ "event_type": kind, "pagerduty_incident": pd_incident, "agent": agent });
    match kind {
        "incident.acknowledged"
        | "incident.resolved"
        | "incident.unacknowledged"
        | "incident.reopened"
        | "incident.escalated" => {
            let summary = format!(
                "PagerDuty: {} by {}",
                kind.trim_start_matches("incident."),
                if agent.is_empty() { "PagerDuty" } else { &agent_name }
            );
            store
                .note(
                    &ours,
                    now,
                    &format!("pagerduty_{}", kind.trim_start_matches("incident.")),
                    &format!("pagerduty:{agent}"),
                    &summary,
                    &detail,
                )
                .await
                .map_err(ApiError::Unavailable)?;
            Ok(Json(json!({ "status": "recorded" })))
        }
        "incident.annotated" => {
            let Some(verdict) = parse_note(data["content"].as_str().unwrap_or_default()) else {
                return Ok(Json(
                    json!({ "status": "ignored", "reason": "note is not a rollback command" }),
                ));
            };
            let who = Person::pagerduty(&agent);
            let result = state.responder.vote(&ours, &who, verdict, "pagerduty note").await;
            Ok(Json(vote_json(&ours, result)?))
        }
        _ => Ok(Json(json!({ "status": "ignored" }))),
    }
}

fn vote_json(id: &IncidentId, r: Result<VoteResult, HumanError>) -> Result<Value, ApiError> {
    match r {
        Ok(VoteResult::Approved { by }) => Ok(json!({ "status": "approved", "incident": id, "by": by })),
        Ok(VoteResult::NeedsMore { have, need }) => {
            Ok(json!({ "status": "counted", "incident": id, "have": have, "need": need }))
        }
        Ok(VoteResult::Denied) => Ok(json!({ "status": "denied", "incident": id })),
        // Refusals are answered 200 on the webhook: PagerDuty must not retry them.
        Err(HumanError::Refused(e)) => Ok(json!({ "status": "refused", "incident": id, "reason": e.to_string() })),
        Err(HumanError::Step(crate::responder::StepError::Store(e))) => Err(ApiError::Unavailable(e)),
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
pub async fn action(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if !super::auth::bearer_matches(&headers, state.pagerduty.action_token.as_ref()) {
        return Err(ApiError::Unauthorized);
    }
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
