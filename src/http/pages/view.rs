//! The templates of the incident pages (maud: checked at compile time, and every `(value)`
//! spliced in is HTML-escaped). Links taken from alerts are shown only when they are http(s),
//! so a `javascript:` URL in an annotation never becomes a link.

use chrono::{DateTime, Utc};
use maud::{html, Markup, PreEscaped, DOCTYPE};
use serde_json::Value;

use crate::alert::AlertStatus;
use crate::incident::{Incident, Phase};
use crate::notify::{action_ran, clip, Measured};
use crate::store::{EventRecord, IncidentFilter, Notice, StoredAlert};

/// Seconds between refreshes of a page that shows something still moving.
pub const REFRESH_SECS: u32 = 10;

const STYLE: &str = include_str!("pages.css");

fn layout(title: &str, refresh: bool, viewer: Option<&str>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="referrer" content="no-referrer";
                @if refresh {
                    meta http-equiv="refresh" content=(REFRESH_SECS);
                }
                title { (title) " · rollback-responder" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header.top {
                    a.brand href="/incidents" { "rollback-responder" }
                    @if let Some(v) = viewer {
                        span.viewer { "signed in as " (v) }
                    }
                }
                main { (body) }
                footer {
                    "Read-only view."
                    @if refresh {
                        " Refreshes every " (REFRESH_SECS) " s while something is still open."
                    }
                }
            }
        }
    }
}

/// A page for an error: what is wrong, and the way back.
pub fn problem(status: axum::http::StatusCode, message: &str) -> Markup {
    layout(
        status.canonical_reason().unwrap_or("Error"),
        false,
        None,
        html! {
            h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
            p.problem { (message) }
            p { a href="/incidents" { "All incidents" } }
        },
    )
}

fn ts(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// "3 min ago", from whole seconds (no arithmetic that can overflow on odd stored times).
fn ago(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = now.signed_duration_since(t).num_seconds();
    match secs {
        s if s < 0 => "in the future".into(),
        s if s < 60 => format!("{s} s ago"),
        s if s < 3600 => format!("{} min ago", s / 60),
        s if s < 86_400 => format!("{} h {} min ago", s / 3600, (s % 3600) / 60),
        s => format!("{} d ago", s / 86_400),
    }
}

fn time(t: DateTime<Utc>, now: DateTime<Utc>) -> Markup {
    html! { time datetime=(t.to_rfc3339()) title=(ts(t)) { (ts(t)) " " span.ago { "(" (ago(t, now)) ")" } } }
}

/// The colour family of a phase badge.
fn tone(p: Phase) -> &'static str {
    match p {
        Phase::Verified => "good",
        Phase::Failed | Phase::VerificationFailed | Phase::Escalated => "bad",
        Phase::Waiting | Phase::AwaitingApproval | Phase::Executing | Phase::Verifying => "busy",
        Phase::DryRun | Phase::Suppressed | Phase::Denied | Phase::GaveUp | Phase::Cancelled => "quiet",
    }
}

fn badge(p: Phase) -> Markup {
    html! { span class={ "badge " (tone(p)) } { (p.as_str().replace('_', " ")) } }
}

/// A link only for http(s) URLs; anything else is shown as text.
fn safe_link(url: &str, text: &str) -> Markup {
    let lower = url.trim_start().to_ascii_lowercase();
    html! {
        @if lower.starts_with("https://") || lower.starts_with("http://") {
            a href=(url) rel="noopener noreferrer" { (text) }
        } @else {
            code { (url) }
        }
    }
}

fn list_query(service: Option<&str>, phase: Option<Phase>, open_only: bool) -> String {
    let mut pairs: Vec<(&str, String)> = Vec::new();
    if let Some(s) = service {
        pairs.push(("service", s.to_string()));
    }
    if let Some(p) = phase {
        pairs.push(("phase", p.as_str().to_string()));
    }
    if open_only {
        pairs.push(("open", "true".into()));
    }
    if pairs.is_empty() {
        "/incidents".into()
    } else {
        format!("/incidents?{}", serde_urlencoded::to_string(pairs).unwrap_or_default())
    }
}

/// The list page.
pub struct List<'a> {
    pub incidents: &'a [Incident],
    pub services: &'a [String],
    pub filter: &'a IncidentFilter,
    pub limit: i64,
    pub viewer: Option<&'a str>,
    pub now: DateTime<Utc>,
}

impl List<'_> {
    pub fn render(&self) -> Markup {
        let open = self.incidents.iter().filter(|i| i.closed_at.is_none()).count();
        let f = self.filter;
        let body = html! {
            h1 { "Incidents" }
            form.filters method="get" action="/incidents" {
                label {
                    "Service "
                    select name="service" {
                        option value="" { "any" }
                        @for s in self.services {
                            option value=(s) selected[f.service.as_deref() == Some(s.as_str())] { (s) }
                        }
                    }
                }
                label {
                    "Phase "
                    select name="phase" {
                        option value="" { "any" }
                        @for p in Phase::ALL {
                            option value=(p.as_str()) selected[f.phase == Some(p)] { (p.as_str().replace('_', " ")) }
                        }
                    }
                }
                label.check {
                    input type="checkbox" name="open" value="true" checked[f.open_only];
                    " open only"
                }
                button type="submit" { "Filter" }
                @if *f != IncidentFilter::default() {
                    " " a href="/incidents" { "clear" }
                }
            }
            p.summary {
                (self.incidents.len()) " shown, " (open) " open"
                @if self.incidents.len() as i64 >= self.limit { " (the " (self.limit) " most relevant)" }
            }
            @if self.incidents.is_empty() {
                p.empty { "No incidents match." }
            } @else {
                table.incidents {
                    thead { tr { th { "Incident" } th { "Phase" } th { "Service" } th { "Opened" } th { "Target" } } }
                    tbody {
                        @for i in self.incidents {
                            tr class=(if i.closed_at.is_none() { "open" } else { "closed" }) {
                                td data-label="Incident" {
                                    a href={ "/incidents/" (i.id) } { (i.alertname) }
                                    @if i.closed_at.is_none() { " " span.badge.live { "open" } }
                                    br; small.id { (i.id) }
                                }
                                td data-label="Phase" { (badge(i.phase)) }
                                td data-label="Service" {
                                    a href=(list_query(Some(&i.service), f.phase, f.open_only)) { (i.service) }
                                }
                                td data-label="Opened" { (time(i.opened_at, self.now)) }
                                td data-label="Target" { code { (i.target_key) } }
                            }
                        }
                    }
                }
            }
        };
        layout("Incidents", open > 0, self.viewer, body)
    }
}

/// One incident's page.
pub struct Detail<'a> {
    pub incident: &'a Incident,
    pub alerts: &'a [StoredAlert],
    pub events: &'a [EventRecord],
    pub notices: &'a [Notice],
    pub public_url: Option<&'a str>,
    pub viewer: Option<&'a str>,
    pub now: DateTime<Utc>,
}

/// A JSON value as short text: strings as they are, the rest as compact JSON.
fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// An event's detail as a list of its fields (nested values as compact JSON).
fn fields(detail: &Value) -> Markup {
    html! {
        @if let Value::Object(map) = detail {
            @if !map.is_empty() {
                details {
                    summary { "details" }
                    dl.fields {
                        @for (k, v) in map {
                            dt { (k) }
                            dd {
                                @if let Some(labels) = v.get("labels").and_then(Value::as_object) {
                                    (chips(labels.iter().map(|(k, v)| (k.as_str(), plain(v)))))
                                } @else {
                                    code { (plain(v)) }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn chips<'a>(labels: impl Iterator<Item = (&'a str, String)>) -> Markup {
    html! {
        ul.labels {
            @for (k, v) in labels {
                li { span.k { (k) } "=" span.v { (v) } }
            }
        }
    }
}

/// What a queued message says, in a line (never a secret: routing keys are added at delivery).
fn notice_text(n: &Notice) -> String {
    let m = &n.message;
    let kind = m["kind"].as_str().unwrap_or("message");
    let text = match kind {
        "slack_root" => format!("message in {}: {}", plain(&m["channel"]), plain(&m["text"])),
        "slack_reply" => format!("thread reply: {}", plain(&m["text"])),
        "pager_duty" => {
            let body = &m["body"];
            let action = body["event_action"].as_str().unwrap_or("change event");
            let summary = body["payload"]["summary"].as_str().unwrap_or("");
            format!("{action}: {summary}")
        }
        "statuspage_create" | "statuspage_update" => {
            let inc = &m["body"]["incident"];
            format!(
                "{} ({})",
                if kind == "statuspage_create" {
                    "incident created"
                } else {
                    "incident updated"
                },
                inc["status"].as_str().unwrap_or("?")
            )
        }
        other => other.to_string(),
    };
    let mut short: String = text.chars().take(300).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    short
}

/// What the opening alert measured, as stored with the incident: "5xx at 6 % (HighErrorRate)".
fn measured(context: &Value) -> Option<String> {
    let m: Measured = serde_json::from_value(context.get("measured")?.clone()).ok()?;
    Some(format!("{} ({})", m.text, m.alert))
}

/// What the last rollback action did (its before and after), from the phase change that ended it.
fn rollback_result(events: &[EventRecord]) -> Option<&str> {
    events
        .iter()
        .rev()
        .find(|e| e.phase_from == Some(Phase::Executing) && e.phase_to.is_some_and(|p| p != Phase::Executing))
        .map(|e| e.summary.as_str())
}

/// What people do next: the policy's follow-ups, the post-mortem, and where to look.
fn next_steps(i: &Incident, public_url: Option<&str>) -> Markup {
    let follow_ups: Vec<&str> = i.context["follow_ups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let ran = action_ran(i.phase);
    let look: Vec<(&str, &str)> = [("runbook", "Runbook"), ("dashboard", "Dashboard")]
        .into_iter()
        .filter_map(|(k, text)| i.context[k].as_str().filter(|u| !u.is_empty()).map(|u| (u, text)))
        .collect();
    let post_mortem = ran && i.phase != Phase::DryRun;
    html! {
        @if !follow_ups.is_empty() || post_mortem || !look.is_empty() {
        section.next {
            h2 { "Next steps" }
            @if !follow_ups.is_empty() {
                p {
                    @if ran { "Left to people (the responder does not do these):" }
                    @else { "Once the target is rolled back, left to people (the responder does not do these):" }
                }
                ul.follow-ups { @for f in &follow_ups { li { (f) } } }
            }
            @if post_mortem {
                p { "Post-mortem: write it up from the timeline below"
                    @if let Some(base) = public_url { " (" a href={ (base) "/incidents/" (i.id) } { "permanent link" } ")" }
                    "." }
            }
            @if !look.is_empty() {
                p { "Where to look: "
                    @for (n, (url, text)) in look.iter().enumerate() { @if n > 0 { " · " } (safe_link(url, text)) } }
            }
        }
        }
    }
}

impl Detail<'_> {
    pub fn render(&self) -> Markup {
        let i = self.incident;
        let d = &i.decision;
        let now = self.now;
        let title = format!("{} on {}", i.alertname, i.service);
        let body = html! {
            p.crumbs { a href="/incidents" { "← All incidents" } }
            h1 { (i.alertname) " on " (i.service) " " (badge(i.phase)) }
            dl.facts {
                dt { "State" }
                dd {
                    @if let Some(c) = i.closed_at { "closed " (time(c, now)) } @else { span.badge.live { "open" } }
                }
                dt { "Target" } dd { code { (i.target_key) } }
                dt { "Changed" } dd {
                    @if let Some(a) = i.acted_at { "yes, " (time(a, now)) } @else { "no: nothing was changed on a real system" }
                }
                @if let Some(m) = measured(&i.context) { dt { "Measured" } dd { (m) } }
                @if let Some(r) = rollback_result(self.events) { dt { "Rollback" } dd { (r) } }
                @if let Some(v) = i.verified_at { dt { "Verified" } dd { (time(v, now)) } }
                dt { "Opened" } dd { (time(i.opened_at, now)) }
                dt { "Policy" } dd { (i.policy) @if let Some(t) = &i.trigger { " · trigger " (t) } }
                dt { "Incident" } dd {
                    code { (i.id) }
                    @if let Some(base) = self.public_url {
                        " · " a href={ (base) "/incidents/" (i.id) } { "permanent link" }
                    }
                }
            }
            section.decision {
                h2 { "Decision" }
                p { strong { (d.outcome.label().replace('_', " ")) } ": " (d.reason) }
                p.meta {
                    (time(d.decided_at, now))
                    " · policy set " code title=(d.policy_hash) { (d.policy_hash.chars().take(12).collect::<String>()) }
                }
            }
            (next_steps(i, self.public_url))
            section {
                h2 { "Alerts (" (self.alerts.len()) ")" }
                ul.alerts {
                    @for a in self.alerts {
                        li class=(a.alert.status.as_str()) {
                            strong { (a.alert.labels.get("alertname").map(String::as_str).unwrap_or("?")) }
                            " "
                            @match a.alert.status {
                                AlertStatus::Firing => span.badge.bad { "firing" },
                                AlertStatus::Resolved => span.badge.good { "resolved" },
                            }
                            " since " (time(a.alert.starts_at, now))
                            @if let Some(e) = a.alert.ended_at() { ", ended " (time(e, now)) }
                            @if let Some(s) = a.alert.annotations.get("summary") { p.summary { (s) } }
                            @if let Some(d) = a.alert.annotations.get("description").filter(|d| !d.trim().is_empty()) {
                                p.measured { (clip(d, Measured::MAX_CHARS)) }
                            }
                            (chips(a.alert.labels.iter().map(|(k, v)| (k.as_str(), v.clone()))))
                            @if !a.alert.generator_url.is_empty() { p.meta { (safe_link(&a.alert.generator_url, "source")) } }
                        }
                    }
                }
            }
            section {
                h2 { "Timeline" }
                ol.timeline {
                    @for e in self.events {
                        li class={ "ev " (e.kind.as_str()) } {
                            div.when { (time(e.at, now)) }
                            div.what {
                                span.kind { (e.kind.as_str().replace('_', " ")) }
                                @if let Some(to) = e.phase_to {
                                    @if e.phase_from != Some(to) {
                                        " " @if let Some(from) = e.phase_from { (badge(from)) " → " } (badge(to))
                                    }
                                }
                                p.summary { (e.summary) }
                                p.meta { "by " span.actor { (e.actor) } }
                                (fields(&e.detail))
                            }
                        }
                    }
                }
            }
            section {
                h2 { "Notifications (" (self.notices.len()) ")" }
                @if self.notices.is_empty() {
                    p.empty { "None: no notifier is configured for this incident." }
                } @else {
                    ul.notices {
                        @for n in self.notices {
                            li {
                                span.channel { (n.channel) } " "
                                @match n.state.as_str() {
                                    "delivered" => span.badge.good { "delivered" },
                                    "failed" => span.badge.bad { "failed" },
                                    other => span.badge.busy { (other) },
                                }
                                " " (notice_text(n))
                                p.meta {
                                    "queued " (time(n.queued_at, now))
                                    @if let Some(d) = n.delivered_at { ", delivered " (time(d, now)) }
                                    ", " (n.attempts) " attempt" @if n.attempts != 1 { "s" }
                                }
                            }
                        }
                    }
                }
            }
        };
        layout(&title, i.closed_at.is_none(), self.viewer, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_links_become_links() {
        let a = safe_link("javascript:alert(1)", "source").into_string();
        assert!(!a.contains("href"), "{a}");
        let b = safe_link("https://prometheus.example/graph?g0.expr=up", "source").into_string();
        assert!(
            b.contains("href=\"https://prometheus.example/graph?g0.expr=up\""),
            "{b}"
        );
    }

    #[test]
    fn the_incident_page_shows_what_was_measured_what_the_rollback_did_and_the_next_steps() {
        let now = Utc::now();
        let mut inc = Incident::sample(Phase::Verified, now);
        inc.context = serde_json::json!({
            "measured": {"alert": "HighErrorRate", "text": "5xx at 6 % <script>x</script>"},
            "follow_ups": ["Purge the <CDN> cache"],
            "runbook": "https://runbooks.example/portal",
            "dashboard": "javascript:alert(1)",
        });
        let ended = EventRecord {
            at: now,
            kind: crate::incident::AuditKind::ActionSucceeded,
            actor: "r1".into(),
            phase_from: Some(Phase::Executing),
            phase_to: Some(Phase::Verifying),
            summary: "forward changed from [canary 50] to [prod 100]".into(),
            detail: Value::Null,
        };
        let page = |inc: &Incident| {
            Detail {
                incident: inc,
                alerts: &[],
                events: std::slice::from_ref(&ended),
                notices: &[],
                public_url: None,
                viewer: None,
                now,
            }
            .render()
            .into_string()
        };
        let html = page(&inc);
        assert!(
            html.contains("<dt>Measured</dt><dd>5xx at 6 % &lt;script&gt;x&lt;/script&gt; (HighErrorRate)</dd>"),
            "{html}"
        );
        assert!(
            html.contains("<dt>Rollback</dt><dd>forward changed from [canary 50] to [prod 100]</dd>"),
            "{html}"
        );
        assert!(
            html.contains("Left to people (the responder does not do these):"),
            "{html}"
        );
        assert!(html.contains("<li>Purge the &lt;CDN&gt; cache</li>"), "{html}");
        assert!(html.contains("Post-mortem: write it up"), "{html}");
        assert!(html.contains("<a href=\"https://runbooks.example/portal\""), "{html}");
        assert!(!html.contains("href=\"javascript:"), "{html}");
        // Before the rollback the follow-ups are what comes after it, and no post-mortem yet.
        inc.phase = Phase::AwaitingApproval;
        let html = page(&inc);
        assert!(
            html.contains("Once the target is rolled back, left to people"),
            "{html}"
        );
        assert!(!html.contains("Post-mortem"), "{html}");
    }

    #[test]
    fn ages_read_naturally_and_never_overflow() {
        let now = Utc::now();
        assert_eq!(ago(now - chrono::Duration::seconds(30), now), "30 s ago");
        assert_eq!(
            ago(now - chrono::Duration::seconds(3 * 3600 + 120), now),
            "3 h 2 min ago"
        );
        assert!(ago(DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC).ends_with("d ago"));
        assert_eq!(ago(now + chrono::Duration::seconds(5), now), "in the future");
    }
}
