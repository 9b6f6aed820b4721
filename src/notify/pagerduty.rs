//! PagerDuty Events API v2: a trigger when an incident opens, or when it stops waiting out a
//! trigger's `for` (one dedup_key per incident),
//! acknowledge while a rollback is under way, resolve when the incident closes, a change event
//! when a rollback is executed, and a separate high-severity trigger when a rollback fails or
//! does not verify, so the on-call is paged even if the first alert was acknowledged. That
//! escalation page resolves when a person (or an automatic trigger) takes the incident over,
//! and at the latest when the incident closes.
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

/// The dedup key of an incident's escalation page ("ROLLBACK NEEDS A HUMAN").
pub fn escalation_key(inc: &Incident) -> String {
    format!("{}/escalation", dedup_key(inc))
}

/// Whether an escalation page of `inc` was triggered and not resolved since, from the
/// PagerDuty messages queued for it so far, oldest first. Their delivery state does not
/// matter: one still pending is delivered before anything queued after it.
pub fn escalation_open(inc: &Incident, queued: &[Message]) -> bool {
    let key = escalation_key(inc);
    queued
        .iter()
        .rev()
        .find_map(|m| match m {
            Message::PagerDuty { body, .. } if body["dedup_key"] == key.as_str() => {
                Some(body["event_action"] == "trigger")
            }
            _ => None,
        })
        .unwrap_or(false)
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
    // A person (or an automatic trigger) took the incident over: the escalation page asked
    // for exactly that. Should this attempt fail too, its own trigger pages afresh instead of
    // folding into an alert that is already there.
    if let Change::Phase { from, to, .. } = change {
        if is_escalation(*from) && !is_escalation(*to) {
            out.push(event(
                route,
                json!({ "event_action": "resolve", "dedup_key": escalation_key(inc) }),
            ));
        }
    }
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
                escalation_key(inc),
                "critical",
                format!("ROLLBACK NEEDS A HUMAN: {} is {to}: {summary}", headline(inc, ctx)),
            ));
        }
    }
    if let Change::Closed { escalation_open, .. } = change {
        // A resolve for a dedup key PagerDuty never saw a trigger for is noise at best.
        if was_triggered(inc) {
            out.push(simple("resolve"));
        }
        // The escalation page is its own alert: it closes with the incident too, or it would
        // page on after every alert has cleared. Whatever the phase the incident closes in:
        // what counts is that one was triggered and is still open.
        if *escalation_open {
            out.push(event(
                route,
                json!({ "event_action": "resolve", "dedup_key": escalation_key(inc) }),
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
        let closed = Change::Closed {
            alerts_resolved: true,
            escalation_open: false,
            paged: false,
            status_page_opened: false,
        };
        assert!(actions(&plan(&blip, &ctx, &closed, &route)).is_empty());
        // Cancelled after it paged (it stopped waiting): resolved.
        let paged = Incident::sample(Phase::Cancelled, now);
        assert_eq!(actions(&plan(&paged, &ctx, &closed, &route)), ["resolve"]);
    }

    #[test]
    fn an_escalation_page_resolves_when_the_incident_is_taken_over_and_at_close_if_still_open() {
        let route = PagerDutyRoute {
            severity: Severity::Critical,
            routing_key: None,
        };
        let ctx = Context::default();
        let now = chrono::Utc::now();
        let detail = Value::Null;
        let moved = |from, to| Change::Phase {
            from,
            to,
            summary: "s",
            actor: "a",
            detail: &detail,
        };
        let mut inc = Incident::sample(Phase::Failed, now);
        let key = dedup_key(&inc);
        let escalation = escalation_key(&inc);
        // What the incident queues as it goes: failed, a person retries, it fails again, a
        // person retries once more and it verifies.
        let mut queued = Vec::new();
        let failed = plan(&inc, &ctx, &moved(Phase::Executing, Phase::Failed), &route);
        assert_eq!(dedup_keys(&failed, "trigger"), [escalation.as_str()]);
        queued.extend(failed);
        assert!(escalation_open(&inc, &queued));
        inc.phase = Phase::Executing;
        let retried = plan(&inc, &ctx, &moved(Phase::Failed, Phase::Executing), &route);
        assert_eq!(actions(&retried), ["resolve", "acknowledge"]);
        assert_eq!(dedup_keys(&retried, "resolve"), [escalation.as_str()]);
        queued.extend(retried);
        assert!(!escalation_open(&inc, &queued));
        inc.phase = Phase::Failed;
        queued.extend(plan(&inc, &ctx, &moved(Phase::Executing, Phase::Failed), &route));
        assert!(escalation_open(&inc, &queued), "a second failure pages afresh");
        inc.phase = Phase::Executing;
        queued.extend(plan(&inc, &ctx, &moved(Phase::Failed, Phase::Executing), &route));
        inc.phase = Phase::Verified;
        queued.extend(plan(&inc, &ctx, &moved(Phase::Verifying, Phase::Verified), &route));
        assert!(!escalation_open(&inc, &queued));
        // Approve on an escalated request, and an automatic trigger after it: taken over too.
        for from in [Phase::Escalated, Phase::VerificationFailed] {
            let took = plan(&inc, &ctx, &moved(from, Phase::Executing), &route);
            assert_eq!(dedup_keys(&took, "resolve"), [escalation.as_str()], "{from}");
        }
        // Nothing of the kind when no escalation phase is left.
        let approved = plan(&inc, &ctx, &moved(Phase::AwaitingApproval, Phase::Executing), &route);
        assert_eq!(actions(&approved), ["acknowledge"]);
        assert!(!escalation_open(&inc, &[]));

        // At close: the escalation page resolves whenever one is open, whatever the phase
        // (before, only a close in an escalation phase resolved it).
        let open = Change::Closed {
            alerts_resolved: true,
            escalation_open: true,
            paged: false,
            status_page_opened: false,
        };
        for p in [Phase::Failed, Phase::Verified] {
            inc.phase = p;
            assert_eq!(
                dedup_keys(&plan(&inc, &ctx, &open, &route), "resolve"),
                [key.clone(), escalation.clone()],
                "{p}"
            );
        }
        let none = Change::Closed {
            alerts_resolved: true,
            escalation_open: false,
            paged: false,
            status_page_opened: false,
        };
        assert_eq!(dedup_keys(&plan(&inc, &ctx, &none, &route), "resolve"), [key]);
    }
}
