//! PagerDuty Events API v2: a trigger when an incident opens, or when it stops waiting out a
//! trigger's `for` (one dedup_key per incident),
//! acknowledge while a rollback is under way, resolve when the incident closes, a change event
//! when a rollback is executed, and a separate high-severity trigger when a rollback fails or
//! does not verify, so the on-call is paged even if the first alert was acknowledged.
//! Triggers and the change event carry, in `custom_details`, what the opening alert measured
//! and the policy's `follow_ups` (what the rollback leaves to people); `links` say where to look.

use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};

use super::{
    classify_status, entered, headline, is_escalation, transport_error, Change, Context, DeliveryError, Message,
    PagerDutyRoute, Refs,
};
use crate::incident::{Incident, Phase};
use crate::policy::{Outcome, Suppression};

/// The dedup key of an incident's alert (stable across restarts and replicas).
pub fn dedup_key(inc: &Incident) -> String {
    format!("rollback-responder/{}", inc.id)
}

fn links(inc: &Incident, ctx: &Context) -> Value {
    let mut l = Vec::new();
    for (url, text) in [
        (&ctx.page(inc), "Incident page"),
        (&ctx.external_url, "Alertmanager"),
        (&ctx.runbook, "Runbook"),
        (&ctx.dashboard, "Dashboard"),
    ] {
        if let Some(u) = url.as_ref().filter(|u| !u.is_empty()) {
            l.push(json!({ "href": u, "text": text }));
        }
    }
    Value::Array(l)
}

/// `details` with what the opening alert measured and what the policy leaves to people after
/// the rollback, when there is any (the links say where to look).
fn with_next_steps(ctx: &Context, mut details: Value) -> Value {
    if let Some(m) = &ctx.measured {
        details["measured"] = json!({ "alert": m.alert, "value": m.text });
    }
    if !ctx.follow_ups.is_empty() {
        details["follow_ups"] = json!(ctx.follow_ups);
    }
    details
}

fn event(route: &PagerDutyRoute, body: Value) -> Message {
    Message::PagerDuty {
        path: "/v2/enqueue".into(),
        routing_key: route.routing_key.clone(),
        body,
    }
}

fn trigger(
    inc: &Incident,
    ctx: &Context,
    route: &PagerDutyRoute,
    key: String,
    severity: &str,
    summary: String,
) -> Message {
    event(
        route,
        json!({
            "event_action": "trigger",
            "dedup_key": key,
            "payload": {
                "summary": summary.chars().take(1024).collect::<String>(),
                "source": "rollback-responder",
                "severity": severity,
                "timestamp": inc.opened_at.to_rfc3339(),
                "component": inc.service,
                "group": inc.policy,
                "class": inc.alertname,
                "custom_details": with_next_steps(ctx, json!({
                    "incident": inc.id, "phase": inc.phase, "decision": inc.decision.outcome.label(),
                    "reason": inc.decision.reason, "target": ctx.target, "labels": ctx.labels,
                })),
            },
            "links": links(inc, ctx),
            "client": "rollback-responder",
        }),
    )
}

/// Whether the incident's alert was ever triggered. The only incident that never pages is one
/// that waited out its trigger's `for` and was cancelled before it stopped waiting (its
/// decision is still "too young"); every other one paged when it opened or stopped waiting.
fn was_triggered(inc: &Incident) -> bool {
    let too_young = |o: &Outcome| matches!(o, Outcome::Suppressed(Suppression::TooYoung { .. }));
    let outcome = match &inc.decision.outcome {
        Outcome::Suppressed(Suppression::DryRun { would }) => would.as_ref(),
        o => o,
    };
    !(inc.phase == Phase::Cancelled && too_young(outcome))
}

/// PagerDuty events for a change.
pub fn plan(inc: &Incident, ctx: &Context, change: &Change, route: &PagerDutyRoute) -> Vec<Message> {
    let severity = serde_json::to_value(route.severity)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or("critical".into());
    let simple = |action: &str| event(route, json!({ "event_action": action, "dedup_key": dedup_key(inc) }));
    let mut out = Vec::new();
    // A page is for something to act on. An incident still waiting out its trigger's `for`
    // may be a blip that clears by itself: it pages when it stops waiting, and never if its
    // alerts resolve first.
    let pages = match change {
        Change::Opened => inc.phase != Phase::Waiting,
        Change::Phase {
            from: Phase::Waiting,
            to,
            ..
        } => !matches!(to, Phase::Waiting | Phase::Cancelled),
        _ => false,
    };
    if pages {
        out.push(trigger(
            inc,
            ctx,
            route,
            dedup_key(inc),
            &severity,
            format!(
                "{}: {} ({})",
                headline(inc, ctx),
                inc.decision.outcome.label(),
                inc.decision.reason
            ),
        ));
    }
    let entered = entered(inc, change);
    // A rollback under way is somebody (us) working on it.
    if entered == Some(Phase::Executing) {
        out.push(simple("acknowledge"));
    }
    if let Change::Phase {
        from: Phase::Executing,
        to,
        summary,
        actor,
        detail,
    } = change
    {
        if *to != Phase::Executing && inc.executed() {
            out.push(Message::PagerDuty {
                path: "/v2/change/enqueue".into(),
                routing_key: route.routing_key.clone(),
                body: json!({
                    "payload": {
                        "summary": format!("Rollback executed by rollback-responder: {}", ctx.target).chars().take(1024).collect::<String>(),
                        "source": "rollback-responder",
                        "timestamp": inc.acted_at.unwrap_or(inc.updated_at).to_rfc3339(),
                        "custom_details": with_next_steps(ctx, json!({ "incident": inc.id, "policy": inc.policy, "by": actor, "summary": summary, "detail": detail })),
                    },
                    "links": links(inc, ctx),
                }),
            });
        }
    }
    if let (Some(to), Change::Phase { summary, .. }) = (entered, change) {
        if is_escalation(to) {
            out.push(trigger(
                inc,
                ctx,
                route,
                format!("{}/escalation", dedup_key(inc)),
                "critical",
                format!("ROLLBACK NEEDS A HUMAN: {} is {to}: {summary}", headline(inc, ctx)),
            ));
        }
    }
    if let Change::Closed = change {
        // A resolve for a dedup key PagerDuty never saw a trigger for is noise at best.
        if was_triggered(inc) {
            out.push(simple("resolve"));
        }
        // The escalation page is its own alert: it closes with the incident too, or it would
        // page on after every alert has cleared.
        if is_escalation(inc.phase) {
            out.push(event(
                route,
                json!({ "event_action": "resolve", "dedup_key": format!("{}/escalation", dedup_key(inc)) }),
            ));
        }
    }
    out
}

/// Sends one event; 202 is success, 400 permanent, 429 and 5xx retried.
pub async fn deliver(
    http: &reqwest::Client,
    base: &str,
    key: &SecretString,
    path: &str,
    body: &Value,
) -> Result<Refs, DeliveryError> {
    let mut body = body.clone();
    body["routing_key"] = Value::String(key.expose_secret().to_string());
    let resp = http
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
        .map_err(transport_error)?;
    let status = resp.status();
    let retry_after = resp.headers().get("retry-after").cloned();
    if status.is_success() {
        return Ok(vec![]);
    }
    let text = resp.text().await.unwrap_or_default();
    Err(classify_status(status, retry_after.as_ref(), &text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Severity;

    fn dedup_keys(messages: &[Message], action: &str) -> Vec<String> {
        messages
            .iter()
            .filter_map(|m| match m {
                Message::PagerDuty { body, .. } if body["event_action"] == action => {
                    body["dedup_key"].as_str().map(str::to_string)
                }
                _ => None,
            })
            .collect()
    }

    fn actions(messages: &[Message]) -> Vec<String> {
        messages
            .iter()
            .filter_map(|m| match m {
                Message::PagerDuty { body, .. } => body["event_action"].as_str().map(str::to_string),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_page_links_to_the_incident_page_only_when_a_public_url_is_configured() {
        let route = PagerDutyRoute {
            severity: Severity::Critical,
            routing_key: None,
        };
        let inc = Incident::sample(Phase::Executing, chrono::Utc::now());
        let hrefs = |ctx: &Context| -> Vec<String> {
            let sent = plan(&inc, ctx, &Change::Opened, &route);
            let Some(Message::PagerDuty { body, .. }) = sent.iter().find(|m| matches!(m, Message::PagerDuty { .. }))
            else {
                panic!("no trigger: {sent:?}");
            };
            body["links"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| format!("{} {}", l["text"].as_str().unwrap(), l["href"].as_str().unwrap()))
                .collect()
        };
        assert!(hrefs(&Context::default()).is_empty());
        let ctx = Context {
            pages_url: Some("https://rr.example.com/".into()),
            ..Context::default()
        };
        assert_eq!(
            hrefs(&ctx),
            [format!("Incident page https://rr.example.com/incidents/{}", inc.id)]
        );
    }

    #[test]
    fn an_incident_waiting_out_its_for_pages_only_once_it_stops_waiting() {
        let route = PagerDutyRoute {
            severity: Severity::Critical,
            routing_key: None,
        };
        let ctx = Context::default();
        let now = chrono::Utc::now();
        let waiting = Incident::sample(Phase::Waiting, now);
        assert!(actions(&plan(&waiting, &ctx, &Change::Opened, &route)).is_empty());
        let detail = Value::Null;
        let moved = |from, to| Change::Phase {
            from,
            to,
            summary: "s",
            actor: "a",
            detail: &detail,
        };
        let still = Incident::sample(Phase::Waiting, now);
        assert!(actions(&plan(&still, &ctx, &moved(Phase::Waiting, Phase::Waiting), &route)).is_empty());
        let blip = Incident::sample(Phase::Cancelled, now);
        assert!(actions(&plan(&blip, &ctx, &moved(Phase::Waiting, Phase::Cancelled), &route)).is_empty());
        let acting = Incident::sample(Phase::Executing, now);
        assert_eq!(
            actions(&plan(&acting, &ctx, &moved(Phase::Waiting, Phase::Executing), &route)),
            ["trigger", "acknowledge"]
        );
        let asking = Incident::sample(Phase::AwaitingApproval, now);
        assert_eq!(actions(&plan(&asking, &ctx, &Change::Opened, &route)), ["trigger"]);
    }

    #[test]
    fn closing_an_incident_that_never_paged_sends_no_resolve() {
        let route = PagerDutyRoute {
            severity: Severity::Critical,
            routing_key: None,
        };
        let ctx = Context::default();
        let now = chrono::Utc::now();
        let mut blip = Incident::sample(Phase::Cancelled, now);
        blip.decision.outcome = Outcome::Suppressed(Suppression::TooYoung {
            firing_for_secs: 10,
            required_secs: 120,
            recheck_at: now,
        });
        assert!(actions(&plan(&blip, &ctx, &Change::Closed, &route)).is_empty());
        // Cancelled after it paged (it stopped waiting): resolved.
        let paged = Incident::sample(Phase::Cancelled, now);
        assert_eq!(actions(&plan(&paged, &ctx, &Change::Closed, &route)), ["resolve"]);
    }

    #[test]
    fn closing_an_escalated_incident_resolves_its_escalation_page_too() {
        let route = PagerDutyRoute {
            severity: Severity::Critical,
            routing_key: None,
        };
        let ctx = Context::default();
        let failed = Incident::sample(Phase::Failed, chrono::Utc::now());
        let key = dedup_key(&failed);
        assert_eq!(
            dedup_keys(&plan(&failed, &ctx, &Change::Closed, &route), "resolve"),
            [key.clone(), format!("{key}/escalation")]
        );
        let verified = Incident::sample(Phase::Verified, chrono::Utc::now());
        assert_eq!(
            dedup_keys(&plan(&verified, &ctx, &Change::Closed, &route), "resolve"),
            [dedup_key(&verified)]
        );
    }
}
