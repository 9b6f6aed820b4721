//! `POST /slack/commands` (the `/rollback` slash command) and `POST /slack/interactions`
//! (the Approve and Deny buttons). Every request's signature is checked over the raw body
//! (v0, signing secret, 5-minute window, constant time: slack-morphism's verifier) and a
//! replayed signature is refused; anything else gets 401 and changes nothing. Answers come
//! within Slack's 3 seconds: the work is a few store writes, the rollback itself runs in the
//! background and reports in the incident's thread.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use slack_morphism::prelude::SlackSigningSecret;
use slack_morphism::signature_verifier::SlackEventSignatureVerifier;

use super::{ApiError, AppState};
use crate::approval::{Person, Verdict, VoteResult};
use crate::incident::IncidentId;
use crate::notify::slack::{Directory, APPROVE_ACTION, DENY_ACTION};
use crate::responder::{HumanError, Responder};

/// What the Slack edge needs: the verifier (None: Slack is not set up, 401) and the group
/// directory for approvers named by user group.
pub struct SlackEdge {
    verifier: Option<SlackEventSignatureVerifier>,
    directory: Option<Directory>,
    http: reqwest::Client,
}

impl SlackEdge {
    /// From the signing secret and, when a bot token is configured, the directory.
    pub fn new(secret: Option<&secrecy::SecretString>, directory: Option<Directory>) -> SlackEdge {
        use secrecy::ExposeSecret;
        SlackEdge {
            verifier: secret
                .map(|s| SlackEventSignatureVerifier::new(&SlackSigningSecret::new(s.expose_secret().to_string()))),
            directory,
            http: reqwest::Client::new(),
        }
    }
}

/// Checks signature, timestamp window and replay; the raw body as text on success.
async fn verified(state: &AppState, headers: &HeaderMap, body: &Bytes) -> Result<String, ApiError> {
    let verifier = state.slack.verifier.as_ref().ok_or(ApiError::Unauthorized)?;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
    let signature = header(SlackEventSignatureVerifier::SLACK_SIGNED_HASH_HEADER);
    let ts = header(SlackEventSignatureVerifier::SLACK_SIGNED_TIMESTAMP);
    let text = std::str::from_utf8(body).map_err(|_| ApiError::Unauthorized)?;
    // The verifier's own window check overflows (and panics) on a timestamp far from now:
    // refused here first, with checked arithmetic.
    if !timestamp_fresh(ts, chrono::Utc::now().timestamp()) {
        tracing::warn!("Slack request with a missing or stale timestamp rejected");
        return Err(ApiError::Unauthorized);
    }
    if let Err(e) = verifier.verify(signature, text, ts) {
        tracing::warn!(error = %e, "Slack request with a bad signature or timestamp rejected");
        return Err(ApiError::Unauthorized);
    }
    // Slack has no nonce: the signature identifies the request within its 5-minute window.
    let first = state
        .responder
        .store
        .first_receipt("slack", signature, chrono::Utc::now())
        .await
        .map_err(ApiError::Unavailable)?;
    if !first {
        tracing::warn!("replayed Slack request rejected");
        return Err(ApiError::Unauthorized);
    }
    Ok(text.to_string())
}

/// Whether Slack's request timestamp is within the 5-minute replay window of `now`.
fn timestamp_fresh(ts: &str, now: i64) -> bool {
    ts.parse::<i64>()
        .ok()
        .and_then(|t| now.checked_sub(t))
        .and_then(i64::checked_abs)
        .is_some_and(|age| age <= 300)
}

/// The slash command's form fields we use.
#[derive(Debug, Deserialize)]
struct CommandForm {
    user_id: String,
    #[serde(default)]
    text: String,
    #[serde(default)]
    command: String,
}

fn ephemeral(text: String) -> Json<Value> {
    Json(json!({ "response_type": "ephemeral", "text": text }))
}

const HELP: &str = "*/rollback* commands:\n\
    • `list`: pending and recent incidents\n\
    • `status ID`: one incident\n\
    • `approve ID` / `deny ID [reason]`: answer an approval request\n\
    • `now POLICY [reason]`: roll back by hand (authorization and guards apply)\n\
    • `freeze [DURATION] [POLICY]` / `unfreeze [POLICY]`: hold automatic rollbacks (all policies without POLICY)\n\
    • `help`";

/// The person behind a Slack user id, with the user groups that matter for `policies`.
async fn person(state: &AppState, user: &str, groups: Vec<String>) -> Person {
    let member_of = match &state.slack.directory {
        Some(d) if !groups.is_empty() => d.groups_of(user, &groups).await,
        _ => vec![],
    };
    Person::slack(user, member_of)
}

fn groups_of_policy(r: &Responder, policy: Option<&str>) -> Vec<String> {
    let set = r.policies();
    let mut groups: Vec<String> = set
        .iter()
        .filter(|p| policy.is_none_or(|n| p.name == n))
        .filter_map(|p| p.approval.as_ref())
        .flat_map(|a| a.approvers.slack_groups.clone())
        .collect();
    groups.sort();
    groups.dedup();
    groups
}

async fn incident_groups(r: &Responder, id: &str) -> Vec<String> {
    match r.store.incident(&IncidentId(id.to_string())).await {
        Ok(Some(inc)) => groups_of_policy(r, Some(&inc.policy)),
        _ => vec![],
    }
}

fn vote_text(id: &str, r: Result<VoteResult, HumanError>) -> String {
    match r {
        Ok(VoteResult::Approved { .. }) => {
            format!(":white_check_mark: Approved: incident `{id}` is rolling back; follow its thread.")
        }
        Ok(VoteResult::NeedsMore { have, need }) => {
            format!(":ballot_box_with_check: Counted ({have} of {need}); incident `{id}` needs another approver.")
        }
        Ok(VoteResult::Denied) => format!(":no_entry_sign: Denied: incident `{id}` will not be rolled back."),
        Err(HumanError::Refused(r)) => format!(":warning: {r}"),
        Err(HumanError::Step(e)) => {
            tracing::warn!(error = %e, "approval failed");
            ":warning: Could not record that right now (store unavailable); try again.".to_string()
        }
    }
}

/// `POST /slack/commands`
pub async fn command(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Result<Json<Value>, ApiError> {
    let text = verified(&state, &headers, &body).await?;
    let form: CommandForm =
        serde_urlencoded::from_str(&text).map_err(|e| ApiError::BadRequest(format!("slash command form: {e}")))?;
    let r = &state.responder;
    let words: Vec<&str> = form.text.split_whitespace().collect();
    let rest = |from: usize| words.get(from..).map(|w| w.join(" ")).unwrap_or_default();
    tracing::info!(user = %form.user_id, command = %form.command, sub = words.first().copied().unwrap_or("help"), "slash command");
    let reply = match words.as_slice() {
        [] | ["help", ..] => HELP.to_string(),
        ["list", ..] => {
            let list = r.store.incidents(false, 15).await.map_err(ApiError::Unavailable)?;
            if list.is_empty() {
                "No incidents.".to_string()
            } else {
                list.iter()
                    .map(|i| {
                        format!(
                            "• `{}` *{}* {} ({}){}",
                            i.id,
                            i.phase,
                            i.alertname,
                            i.policy,
                            if i.closed_at.is_none() { "" } else { ", closed" }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            }
        }
        ["status", id, ..] => match r
            .store
            .incident(&IncidentId(id.to_string()))
            .await
            .map_err(ApiError::Unavailable)?
        {
            Some(i) => format!(
                "Incident `{}`: *{}*, policy `{}`, decision `{}`: {}{}",
                i.id,
                i.phase,
                i.policy,
                i.decision.outcome.label(),
                i.decision.reason,
                if i.executed() { " (the target was changed)" } else { "" }
            ),
            None => format!("There is no incident `{id}`."),
        },
        ["approve", id, ..] => {
            let who = person(&state, &form.user_id, incident_groups(r, id).await).await;
            vote_text(
                id,
                r.vote(&IncidentId(id.to_string()), &who, Verdict::Approve, "slack command")
                    .await,
            )
        }
        ["deny", id, ..] => {
            let who = person(&state, &form.user_id, incident_groups(r, id).await).await;
            let reason = Some(rest(2)).filter(|s| !s.is_empty());
            vote_text(
                id,
                r.vote(
                    &IncidentId(id.to_string()),
                    &who,
                    Verdict::Deny { reason },
                    "slack command",
                )
                .await,
            )
        }
        ["now", policy, ..] => {
            let who = person(&state, &form.user_id, groups_of_policy(r, Some(policy))).await;
            match r.start_manual(policy, &who, &rest(2)).await {
                Ok((id, reason)) => format!(":rewind: Incident `{id}`: {reason}. Follow its thread."),
                Err(HumanError::Refused(e)) => format!(":warning: {e}"),
                Err(HumanError::Step(e)) => {
                    tracing::warn!(error = %e, "manual rollback failed");
                    ":warning: Could not start that right now (store unavailable); try again.".to_string()
                }
            }
        }
        ["freeze", args @ ..] => {
            // `freeze [DURATION] [POLICY]`, in either order: `freeze checkout 2h` is 2 hours too.
            let duration = |w: &str| humantime::parse_duration(w).ok();
            let (until, policy) = match args {
                [d, p, ..] if duration(d).is_some() => (duration(d), Some(*p)),
                [p, d, ..] if duration(d).is_some() => (duration(d), Some(*p)),
                [d] if duration(d).is_some() => (duration(d), None),
                [p, ..] => (None, Some(*p)),
                [] => (None, None),
            };
            let until_at = match until {
                Some(d) => match super::api::freeze_end(chrono::Utc::now(), d) {
                    Ok(t) => Some(t),
                    Err(e) => return Err(ApiError::BadRequest(format!("freeze: {e}"))),
                },
                None => None,
            };
            let who = person(&state, &form.user_id, groups_of_policy(r, policy)).await;
            match r
                .freeze(
                    policy,
                    &who,
                    until_at,
                    &format!("frozen from Slack by <@{}>", form.user_id),
                )
                .await
            {
                Ok(scope) => format!(
                    ":ice_cube: Automatic rollbacks frozen ({}){}.",
                    if scope == "*" {
                        "all policies".to_string()
                    } else {
                        format!("policy `{scope}`")
                    },
                    until
                        .map(|d| format!(" for {}", humantime::format_duration(d)))
                        .unwrap_or_else(|| " until unfrozen".into())
                ),
                Err(e) => format!(":warning: {e}"),
            }
        }
        ["unfreeze", args @ ..] => {
            let policy = args.first().copied();
            let who = person(&state, &form.user_id, groups_of_policy(r, policy)).await;
            match r.unfreeze(policy, &who).await {
                Ok(true) => ":sunny: Freeze lifted.".to_string(),
                Ok(false) => "There was no such freeze.".to_string(),
                Err(e) => format!(":warning: {e}"),
            }
        }
        [other, ..] => format!("Unknown subcommand `{other}`.\n{HELP}"),
    };
    Ok(ephemeral(reply))
}

/// `POST /slack/interactions`: the Approve and Deny buttons. Slack ignores this answer's body,
/// so the outcome goes to the clicking user through `response_url` and to everyone through
/// the incident's message (its buttons disappear once it is decided).
pub async fn interaction(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let text = verified(&state, &headers, &body).await?;
    #[derive(Deserialize)]
    struct Form {
        payload: String,
    }
    let form: Form =
        serde_urlencoded::from_str(&text).map_err(|e| ApiError::BadRequest(format!("interaction form: {e}")))?;
    let payload: Value =
        serde_json::from_str(&form.payload).map_err(|e| ApiError::BadRequest(format!("interaction payload: {e}")))?;
    if payload["type"] != "block_actions" {
        return Ok(StatusCode::OK);
    }
    let user = payload["user"]["id"].as_str().unwrap_or_default().to_string();
    let response_url = payload["response_url"].as_str().map(str::to_string);
    let Some(action) = payload["actions"].as_array().and_then(|a| a.first()).cloned() else {
        return Err(ApiError::BadRequest("interaction without actions".into()));
    };
    let id = action["value"].as_str().unwrap_or_default().to_string();
    let verdict = match action["action_id"].as_str() {
        Some(APPROVE_ACTION) => Verdict::Approve,
        Some(DENY_ACTION) => Verdict::Deny { reason: None },
        _ => return Ok(StatusCode::OK),
    };
    let state2 = state.clone();
    // Answer Slack at once; the vote and the reply to the user happen right after.
    tokio::spawn(async move {
        let r = &state2.responder;
        let who = person(&state2, &user, incident_groups(r, &id).await).await;
        let result = r.vote(&IncidentId(id.clone()), &who, verdict, "slack button").await;
        let reply = vote_text(&id, result);
        if let Some(url) = response_url {
            let body = json!({ "response_type": "ephemeral", "replace_original": false, "text": reply });
            if let Err(e) = respond(&state2.slack.http, &url, &body).await {
                tracing::warn!(error = %e, "could not answer through response_url");
            }
        }
    });
    Ok(StatusCode::OK)
}

/// Posts to a `response_url`. That URL is a credential (whoever holds it can post in the
/// channel as the app), so an error comes back without it: reqwest's Display includes it.
async fn respond(http: &reqwest::Client, url: &str, body: &Value) -> Result<(), reqwest::Error> {
    http.post(url)
        .json(body)
        .send()
        .await
        .map(drop)
        .map_err(reqwest::Error::without_url)
}

/// Shared handle type for the state.
pub type Edge = Arc<SlackEdge>;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_response_url_post_does_not_carry_the_url() {
        // A port nobody listens on: the request fails with a connection error.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/actions/T0/1234/s3cr3tT0ken");
        let e = respond(&reqwest::Client::new(), &url, &json!({"text": "x"}))
            .await
            .unwrap_err();
        assert!(e.url().is_none());
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains("s3cr3tT0ken"), "{shown}");
    }

    #[test]
    fn timestamps_far_from_now_are_stale_not_an_overflow() {
        let now = 1_764_000_000;
        assert!(timestamp_fresh("1764000000", now));
        assert!(timestamp_fresh("1763999700", now));
        assert!(!timestamp_fresh("1763999699", now));
        for ts in [
            "-9223372036854775808",
            "9223372036854775807",
            "99999999999999999999",
            "",
            "1e9",
            "abc",
        ] {
            assert!(!timestamp_fresh(ts, now), "{ts}");
        }
        assert!(!timestamp_fresh("1764000000", i64::MIN));
    }
}
