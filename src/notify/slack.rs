//! Slack: one message per incident in the policy's channel, updated in place as the phase
//! changes, and a thread reply for every step. Incidents awaiting approval carry Approve and
//! Deny buttons whose value is the incident id. The message shows what the opening alert
//! measured, what the rollback did to the target (known only to the change that ended the
//! action, so kept with the message's handles for later updates) and the next steps: the
//! policy's follow-ups and the post-mortem once the rollback has run, and where to look. Text
//! from alerts, policies and people is escaped (`mrkdwn.rs`). Block Kit is built with
//! slack-morphism's types; the Web API is called with reqwest (slack-morphism has no reqwest
//! connector).

use std::collections::BTreeMap;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use slack_morphism::prelude::*;

use super::mrkdwn::{escape, escape_keeping_mentions, link};
use super::{
    action_ran, classify_status, clip, headline, is_dry_run, is_escalation, transport_error, Change, Context,
    DeliveryError, Message, Refs,
};
use crate::incident::{Incident, Phase};

/// Button action ids; the approval handler matches on them.
pub const APPROVE_ACTION: &str = "rollback_approve";
pub const DENY_ACTION: &str = "rollback_deny";

fn emoji(p: Phase) -> &'static str {
    match p {
        Phase::Waiting => ":hourglass_flowing_sand:",
        Phase::AwaitingApproval => ":raised_hand:",
        Phase::Executing => ":rewind:",
        Phase::Verifying => ":mag:",
        Phase::Verified => ":white_check_mark:",
        Phase::DryRun => ":test_tube:",
        Phase::Suppressed => ":no_bell:",
        Phase::Cancelled => ":heavy_minus_sign:",
        Phase::Denied | Phase::GaveUp => ":no_entry_sign:",
        Phase::Failed | Phase::VerificationFailed | Phase::Escalated => ":rotating_light:",
    }
}

/// Slack's limit for a section block's text.
const SECTION_MAX: usize = 3000;
/// Longest action result the root message repeats (the thread has it whole).
const STATE_MAX: usize = 1500;
/// The block that says what the rollback did to the target, and the handle it is kept under.
const STATE_BLOCK: &str = "rollback_state";

/// What people do next: once the rollback has run, what the policy leaves to them and the
/// post-mortem; always, where to look.
fn next_steps(inc: &Incident, ctx: &Context) -> Option<String> {
    let mut lines = Vec::new();
    if action_ran(inc.phase) {
        let dry = inc.phase == Phase::DryRun;
        let mut todo: Vec<String> = ctx.follow_ups.iter().map(|f| format!("• {}", escape(f))).collect();
        if !dry {
            todo.push(match link(&ctx.page(inc), "incident page") {
                Some(page) => format!("• Post-mortem: write it up from the timeline on the {page}"),
                None => format!(
                    "• Post-mortem: write it up from the incident's timeline (`incident {}`)",
                    inc.id
                ),
            });
        }
        if !todo.is_empty() {
            lines.push(if dry {
                "After a real rollback, left to people (the responder does not do these):".to_string()
            } else {
                "Left to people (the responder does not do these):".to_string()
            });
            lines.extend(todo);
        }
    }
    let look: Vec<String> = [
        link(&ctx.runbook, "Runbook"),
        link(&ctx.dashboard, "Dashboard"),
        link(&ctx.page(inc), "Incident page"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !look.is_empty() {
        lines.push(format!("Where to look: {}", look.join(" · ")));
    }
    (!lines.is_empty()).then(|| format!("*Next steps*\n{}", lines.join("\n")))
}

/// The thread's list of follow-ups when the action has just run, if the policy has any.
fn follow_ups_reply(to: Phase, ctx: &Context) -> Option<String> {
    if ctx.follow_ups.is_empty() || !action_ran(to) {
        return None;
    }
    let head = match to {
        Phase::DryRun => "*After a real rollback, left to people* (a dry run changed nothing):",
        Phase::Failed => "*Left to people* (the rollback failed: revert the target by hand first, then):",
        _ => "*Left to people* now that the rollback has run (the responder does not do these):",
    };
    let items: Vec<String> = ctx.follow_ups.iter().map(|f| format!("• {}", escape(f))).collect();
    Some(format!("{head}\n{}", items.join("\n")))
}

/// The incident message: what fired and what it measured, which policy decided what and why,
/// the target, the next steps and links. What the rollback did is added at delivery
/// ([`with_state`]): only the change that ended the action knows it.
pub fn root(inc: &Incident, ctx: &Context) -> (String, Value) {
    let dry = if is_dry_run(inc) {
        " (DRY RUN: nothing is changed)"
    } else {
        ""
    };
    let title = headline(inc, ctx);
    let text = format!("{} Rollback {}: {}{dry}", emoji(inc.phase), inc.phase, escape(&title));
    let mut body = format!(
        "*Phase:* `{}`{dry}\n*Decision:* {} ({})\n*Policy:* `{}` (trigger `{}`)\n*Target:* {}",
        inc.phase,
        inc.decision.outcome.label(),
        escape_keeping_mentions(&inc.decision.reason),
        escape(&inc.policy),
        escape(inc.trigger.as_deref().unwrap_or("-")),
        escape(&ctx.target),
    );
    if let Some(s) = &ctx.summary {
        body.push_str(&format!("\n*Alert:* {}", escape(s)));
    }
    if let Some(m) = &ctx.measured {
        body.push_str(&format!(
            "\n*Measured:* {} (alert `{}`)",
            escape(&m.text),
            escape(&m.alert)
        ));
    }
    if inc.executed() {
        body.push_str("\n*Executed:* yes, the target was changed");
    }
    let mut blocks: Vec<SlackBlock> = vec![
        SlackHeaderBlock::new(pt!(format!("{} {title}", emoji(inc.phase))
            .chars()
            .take(150)
            .collect::<String>()))
        .into(),
        // Slack refuses a section over 3,000 characters (invalid_blocks, for good): an alert's
        // summary or a person's reason can be longer.
        SlackSectionBlock::new().with_text(md!(clip(&body, SECTION_MAX))).into(),
    ];
    if inc.phase == Phase::AwaitingApproval {
        let id = inc.id.0.clone();
        let confirm = SlackBlockConfirmItem::new(
            pt!("Roll back?"),
            pt!(format!("Revert {}?", ctx.target)),
            pt!("Roll back"),
            pt!("Cancel"),
        );
        blocks.push(
            SlackActionsBlock::new(vec![
                SlackBlockButtonElement::new(pt!("Approve rollback"))
                    .with_action_id(SlackActionId(APPROVE_ACTION.into()))
                    .with_value(id.clone())
                    .with_style(SlackBlockButtonStyle::Primary)
                    .with_confirm(confirm)
                    .into(),
                SlackBlockButtonElement::new(pt!("Deny"))
                    .with_action_id(SlackActionId(DENY_ACTION.into()))
                    .with_value(id)
                    .with_style(SlackBlockButtonStyle::Danger)
                    .into(),
            ])
            .into(),
        );
    }
    if let Some(steps) = next_steps(inc, ctx) {
        blocks.push(
            SlackSectionBlock::new()
                .with_text(md!(clip(&steps, SECTION_MAX)))
                .into(),
        );
    }
    let links: Vec<String> = [
        Some(format!("Incident `{}`", inc.id)),
        link(&ctx.page(inc), "Incident page"),
        link(&ctx.external_url, "Alertmanager"),
        link(&ctx.generator_url, "Prometheus"),
        link(&ctx.runbook, "Runbook"),
        link(&ctx.dashboard, "Dashboard"),
    ]
    .into_iter()
    .flatten()
    .collect();
    blocks.push(
        SlackContextBlock::new(vec![SlackContextBlockElement::MarkDown(SlackBlockMarkDownText::new(
            links.join(" · "),
        ))])
        .into(),
    );
    (text, serde_json::to_value(blocks).unwrap_or(Value::Null))
}

/// The root's blocks with the block saying what the rollback did (`state`) after the main
/// section, when known (empty: an attempt is under way, nothing to say yet).
fn with_state(blocks: &Value, state: Option<&str>) -> Value {
    let mut blocks = blocks.clone();
    if let (Some(state), Some(list)) = (state.filter(|s| !s.is_empty()), blocks.as_array_mut()) {
        let at = list.len().min(2);
        list.insert(
            at,
            json!({ "type": "section", "block_id": STATE_BLOCK, "text": { "type": "mrkdwn", "text": state } }),
        );
    }
    blocks
}

/// Slack messages for a change.
pub fn plan(inc: &Incident, ctx: &Context, change: &Change, channel: &str) -> Vec<Message> {
    let root_msg = |state: Option<String>| {
        let (text, blocks) = root(inc, ctx);
        Message::SlackRoot {
            channel: channel.to_string(),
            text,
            blocks,
            incident: Some(inc.id.0.clone()),
            state,
        }
    };
    let reply = |text: String| Message::SlackReply {
        channel: channel.to_string(),
        text,
    };
    match change {
        Change::Opened => vec![
            root_msg(None),
            reply(format!(
                "*Decision:* `{}`: {}",
                inc.decision.outcome.label(),
                escape_keeping_mentions(&inc.decision.reason)
            )),
        ],
        Change::Phase {
            from,
            to,
            summary,
            actor,
            ..
        } => {
            let mention = match (&ctx.routes.escalation_mention, is_escalation(*to)) {
                (Some(m), true) => format!("{m} "),
                _ => String::new(),
            };
            let (summary, actor) = (escape_keeping_mentions(summary), escape_keeping_mentions(actor));
            if from == to {
                return vec![reply(format!("{summary} ({actor})"))];
            }
            let line = format!("{mention}{} `{from}` → `{to}`: {summary} ({actor})", emoji(*to));
            // The change that ends the action is the one that knows what it did; a new
            // attempt (a person's rollback after a failed one) forgets the last one's result.
            let ended_action = *from == Phase::Executing;
            let state = if ended_action {
                Some(format!("*Rollback:* {}", clip(&summary, STATE_MAX)))
            } else {
                (*to == Phase::Executing).then(String::new)
            };
            let mut out = vec![root_msg(state), reply(line)];
            if ended_action {
                out.extend(follow_ups_reply(*to, ctx).map(reply));
            }
            out
        }
        Change::Note { summary } => vec![reply(escape_keeping_mentions(summary))],
        Change::Closed { .. } => vec![
            root_msg(None),
            reply(format!("Incident closed in phase `{}`.", inc.phase)),
        ],
    }
}

/// Slack `ok:false` errors worth retrying; everything else will fail the same way again.
fn retryable_error(code: &str) -> bool {
    matches!(
        code,
        "ratelimited" | "rate_limited" | "internal_error" | "fatal_error" | "service_unavailable" | "request_timeout"
    )
}

/// `event_type` of the metadata our incident messages carry.
const METADATA_EVENT: &str = "rollback_responder_incident";

/// Posts or updates through the Web API. The incident's first post carries the incident id
/// as message metadata; when it is sent again (`retried`: an earlier attempt timed out or its
/// answer was lost), the channel's recent history is looked through first, and a message an
/// earlier attempt made is taken instead of posting a second one.
pub async fn deliver(
    http: &reqwest::Client,
    api: &str,
    token: &SecretString,
    msg: &Message,
    refs: &BTreeMap<String, String>,
    retried: bool,
) -> Result<Refs, DeliveryError> {
    let (method, body) = match msg {
        Message::SlackRoot {
            channel,
            text,
            blocks,
            incident,
            state,
        } => {
            let blocks = with_state(blocks, state.as_deref().or(refs.get(STATE_BLOCK).map(String::as_str)));
            match (refs.get("channel"), refs.get("ts")) {
                (Some(c), Some(ts)) => (
                    "chat.update",
                    json!({ "channel": c, "ts": ts, "text": text, "blocks": blocks }),
                ),
                _ => {
                    if let (true, Some(id)) = (retried, incident) {
                        match find_posted(http, api, token, channel, id).await {
                            Ok(Some(found)) => return Ok(found.into_iter().chain(kept_state(msg)).collect()),
                            Ok(None) => {}
                            // Best effort: without the scopes to look, post (a duplicate at worst).
                            Err(e) => {
                                tracing::warn!(error = %e, "could not look for an earlier post of this incident; posting")
                            }
                        }
                    }
                    let mut body = json!({ "channel": channel, "text": text, "blocks": blocks, "unfurl_links": false });
                    if let Some(id) = incident {
                        body["metadata"] =
                            json!({ "event_type": METADATA_EVENT, "event_payload": { "incident_id": id } });
                    }
                    ("chat.postMessage", body)
                }
            }
        }
        Message::SlackReply { channel, text } => {
            let c = refs.get("channel").cloned().unwrap_or_else(|| channel.clone());
            match refs.get("ts") {
                Some(ts) => (
                    "chat.postMessage",
                    json!({ "channel": c, "text": text, "thread_ts": ts, "unfurl_links": false }),
                ),
                // The incident message never made it: say it on the channel rather than not at all.
                None => (
                    "chat.postMessage",
                    json!({ "channel": c, "text": text, "unfurl_links": false }),
                ),
            }
        }
        _ => {
            return Err(DeliveryError::Permanent {
                reason: "not a Slack message".into(),
            })
        }
    };
    let resp = http
        .post(format!("{api}/{method}"))
        .bearer_auth(token.expose_secret())
        .header("content-type", "application/json; charset=utf-8")
        .body(body.to_string())
        .send()
        .await
        .map_err(transport_error)?;
    let status = resp.status();
    let retry_after = resp.headers().get("retry-after").cloned();
    let text = resp.text().await.map_err(transport_error)?;
    if !status.is_success() {
        return Err(classify_status(status, retry_after.as_ref(), &text));
    }
    let v: Value = serde_json::from_str(&text).map_err(|_| DeliveryError::Retry {
        reason: format!("Slack answered non-JSON: {text:.200}"),
        after: None,
    })?;
    if v["ok"].as_bool() != Some(true) {
        let code = v["error"].as_str().unwrap_or("unknown_error").to_string();
        return Err(if retryable_error(&code) {
            DeliveryError::Retry {
                reason: format!("Slack {method}: {code}"),
                after: None,
            }
        } else {
            DeliveryError::Permanent {
                reason: format!("Slack {method}: {code}"),
            }
        });
    }
    // Only the incident's first post creates the handles the thread and updates hang off.
    let mut handles = Vec::new();
    if matches!(msg, Message::SlackRoot { .. }) && method == "chat.postMessage" {
        let channel = v["channel"].as_str().unwrap_or_default().to_string();
        let ts = v["ts"].as_str().unwrap_or_default().to_string();
        if !channel.is_empty() && !ts.is_empty() {
            handles = vec![("channel".into(), channel), ("ts".into(), ts)];
        }
    }
    handles.extend(kept_state(msg));
    Ok(handles)
}

/// The root's "what the rollback did", kept with its handles for the later updates.
fn kept_state(msg: &Message) -> Option<(String, String)> {
    match msg {
        Message::SlackRoot { state: Some(s), .. } => Some((STATE_BLOCK.to_string(), s.clone())),
        _ => None,
    }
}

/// A Web API read; `Err` names the method and Slack's error.
async fn api_get(
    http: &reqwest::Client,
    api: &str,
    token: &SecretString,
    method: &str,
    query: &[(&str, &str)],
) -> Result<Value, String> {
    let resp = http
        .get(format!("{api}/{method}"))
        .query(query)
        .bearer_auth(token.expose_secret())
        .send()
        .await
        .map_err(|e| format!("{method}: {e}"))?;
    let status = resp.status();
    let v: Value = resp.json().await.map_err(|e| format!("{method}: HTTP {status}: {e}"))?;
    if v["ok"].as_bool() == Some(true) {
        Ok(v)
    } else {
        Err(format!("{method}: {}", v["error"].as_str().unwrap_or("unknown_error")))
    }
}

/// The handles of a message in `channel` (a name `#x` or an id) whose metadata names
/// `incident`, among the channel's latest 200 (scopes `channels:history`, and `channels:read`
/// to resolve a name).
async fn find_posted(
    http: &reqwest::Client,
    api: &str,
    token: &SecretString,
    channel: &str,
    incident: &str,
) -> Result<Option<Refs>, String> {
    let id = match channel.strip_prefix('#') {
        None => channel.to_string(),
        Some(name) => {
            let mut cursor = String::new();
            let mut found = None;
            // At most ten pages of a thousand channels.
            for _ in 0..10 {
                let v = api_get(
                    http,
                    api,
                    token,
                    "conversations.list",
                    &[
                        ("types", "public_channel,private_channel"),
                        ("exclude_archived", "true"),
                        ("limit", "1000"),
                        ("cursor", &cursor),
                    ],
                )
                .await?;
                found = v["channels"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|c| c["name"] == name)
                    .and_then(|c| c["id"].as_str())
                    .map(str::to_string);
                cursor = v["response_metadata"]["next_cursor"].as_str().unwrap_or("").to_string();
                if found.is_some() || cursor.is_empty() {
                    break;
                }
            }
            match found {
                Some(id) => id,
                None => return Ok(None),
            }
        }
    };
    let v = api_get(
        http,
        api,
        token,
        "conversations.history",
        &[("channel", &id), ("limit", "200"), ("include_all_metadata", "true")],
    )
    .await?;
    Ok(v["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| {
            m["metadata"]["event_type"] == METADATA_EVENT && m["metadata"]["event_payload"]["incident_id"] == incident
        })
        .and_then(|m| m["ts"].as_str())
        .map(|ts| vec![("channel".into(), id.clone()), ("ts".into(), ts.to_string())]))
}

/// Slack user-group membership, for approvers named by group (`usergroups.users.list`,
/// scope `usergroups:read`), cached briefly so a burst of clicks costs one call per group.
pub struct Directory {
    http: reqwest::Client,
    api: String,
    token: SecretString,
    cache: std::sync::Mutex<BTreeMap<String, (std::time::Instant, Vec<String>)>>,
}

impl Directory {
    const TTL: std::time::Duration = std::time::Duration::from_secs(60);

    /// A directory on the Web API at `api`.
    pub fn new(http: reqwest::Client, api: &str, token: SecretString) -> Directory {
        Directory {
            http,
            api: api.trim_end_matches('/').to_string(),
            token,
            cache: Default::default(),
        }
    }

    /// The groups among `groups` that `user` belongs to. A group Slack cannot list counts as
    /// "not a member": authorization fails closed.
    pub async fn groups_of(&self, user: &str, groups: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        for g in groups {
            if self.members(g).await.iter().any(|m| m == user) {
                out.push(g.clone());
            }
        }
        out
    }

    async fn members(&self, group: &str) -> Vec<String> {
        if let Ok(c) = self.cache.lock() {
            if let Some((at, m)) = c.get(group) {
                if at.elapsed() < Self::TTL {
                    return m.clone();
                }
            }
        }
        let resp = self
            .http
            .get(format!("{}/usergroups.users.list", self.api))
            .query(&[("usergroup", group)])
            .bearer_auth(self.token.expose_secret())
            .timeout(std::time::Duration::from_secs(2))
            .send()
            .await;
        let members: Vec<String> = match resp {
            Ok(r) => match r.json::<Value>().await {
                Ok(v) if v["ok"].as_bool() == Some(true) => v["users"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|u| u.as_str().map(str::to_string)).collect())
                    .unwrap_or_default(),
                Ok(v) => {
                    tracing::warn!(group, error = %v["error"], "Slack refused usergroups.users.list; treating as no members");
                    return vec![];
                }
                Err(e) => {
                    tracing::warn!(group, error = %e, "unreadable usergroups.users.list answer");
                    return vec![];
                }
            },
            Err(e) => {
                tracing::warn!(group, error = %e, "usergroups.users.list failed");
                return vec![];
            }
        };
        if let Ok(mut c) = self.cache.lock() {
            c.insert(group.to_string(), (std::time::Instant::now(), members.clone()));
        }
        members
    }
}

#[cfg(test)]
#[path = "slack_tests.rs"]
mod tests;
