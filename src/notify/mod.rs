//! Telling people: a Slack message per incident with a thread, PagerDuty events, the status page.
//!
//! Every state change the responder makes calls [`plan`] (pure) to learn which messages it
//! causes, and stores them in the outbox in the same transaction as the change. The outbox
//! worker ([`outbox::run`]) delivers them in order per incident and channel, with retries;
//! nothing here ever runs on the rollback's path, so an outage of Slack cannot delay a
//! rollback. One file per channel renders its messages and speaks its API.

pub mod mrkdwn;
pub mod outbox;
pub mod pagerduty;
pub mod slack;
pub mod statuspage;

use std::collections::BTreeMap;
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::alert::LabelSet;
use crate::incident::{Incident, Phase};
use crate::policy::{ComponentStatus, Outcome, Policy, Severity, Suppression};

/// The notification channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Slack,
    PagerDuty,
    Statuspage,
}

impl Channel {
    /// Storage and metric-label spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Slack => "slack",
            Channel::PagerDuty => "pagerduty",
            Channel::Statuspage => "statuspage",
        }
    }

    /// Parses the storage spelling.
    pub fn parse(s: &str) -> Option<Channel> {
        [Channel::Slack, Channel::PagerDuty, Channel::Statuspage]
            .into_iter()
            .find(|c| c.as_str() == s)
    }
}

/// Where an incident's messages go, fixed when it opens (policy, else config defaults).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Routes {
    pub slack_channel: Option<String>,
    pub pagerduty: Option<PagerDutyRoute>,
    pub statuspage: Option<StatuspageRoute>,
    pub escalation_mention: Option<String>,
}

/// PagerDuty route of one incident.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PagerDutyRoute {
    pub severity: Severity,
    /// Name of a configured routing key; `None` is the default key.
    pub routing_key: Option<String>,
}

/// Statuspage route of one incident.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatuspageRoute {
    pub components: BTreeMap<String, ComponentStatus>,
    pub deliver_notifications: bool,
}

/// What a message needs to know about an incident beyond its row: the first alert and links.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Context {
    pub labels: LabelSet,
    pub summary: Option<String>,
    pub external_url: Option<String>,
    pub generator_url: Option<String>,
    pub runbook: Option<String>,
    pub dashboard: Option<String>,
    pub target: String,
    pub routes: Routes,
    /// How to prove the rollback worked, as the policy said when the incident opened.
    #[serde(default)]
    pub verification: crate::policy::Verification,
    /// The incident pages' public base URL (`server.public_url`), when configured: Slack and
    /// PagerDuty link to `{pages_url}/incidents/{id}`. Never the public status page: the
    /// pages sit behind the read token or SSO.
    #[serde(default)]
    pub pages_url: Option<String>,
    /// What the opening alert measured (its `description` annotation), clipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured: Option<Measured>,
    /// What the policy leaves to people after the rollback (`follow_ups`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub follow_ups: Vec<String>,
}

/// The value an alert measured, as its rule wrote it ("5xx at 6 %"), and which alert said so.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    pub alert: String,
    pub text: String,
}

impl Measured {
    /// Longest description kept: Prometheus rules write a sentence; an annotation can be
    /// megabytes, and the context is stored with every incident.
    pub const MAX_CHARS: usize = 500;

    /// The `description` annotation of alert `alertname`, when it says something.
    pub fn from_annotations(alertname: &str, annotations: &LabelSet) -> Option<Measured> {
        let d = annotations.get("description")?.trim();
        (!d.is_empty()).then(|| Measured {
            alert: clip(alertname, 200),
            text: clip(d, Self::MAX_CHARS),
        })
    }
}

/// `s` cut to at most `max` characters, marked with an ellipsis when cut.
pub fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Whether the rollback action has run for this incident (changed, found done, failed or
/// rehearsed): from here on the messages list what is left to people.
pub fn action_ran(p: Phase) -> bool {
    matches!(
        p,
        Phase::Verifying | Phase::Verified | Phase::VerificationFailed | Phase::Failed | Phase::DryRun
    )
}

impl Context {
    /// The incident's page, when a public base URL is configured.
    pub fn page(&self, inc: &Incident) -> Option<String> {
        self.pages_url
            .as_deref()
            .map(|base| format!("{}/incidents/{}", base.trim_end_matches('/'), inc.id))
    }
}

/// Which channels are configured on this responder, and their defaults.
#[derive(Debug, Clone, Default)]
pub struct Defaults {
    pub slack: bool,
    pub slack_channel: Option<String>,
    pub pagerduty: bool,
    pub statuspage: bool,
    /// `server.public_url`: where the incident pages are reachable for people.
    pub pages_url: Option<String>,
}

impl Routes {
    /// A policy's routes, with config defaults for what it leaves out; channels that are not
    /// configured on this responder are dropped.
    pub fn resolve(p: &Policy, d: &Defaults) -> Routes {
        Routes {
            slack_channel: if d.slack {
                p.notify
                    .slack
                    .as_ref()
                    .map(|s| s.channel.clone())
                    .or(d.slack_channel.clone())
            } else {
                None
            },
            pagerduty: if d.pagerduty {
                Some(match &p.notify.pagerduty {
                    Some(r) => PagerDutyRoute {
                        severity: r.severity,
                        routing_key: r.routing_key.clone(),
                    },
                    None => PagerDutyRoute {
                        severity: Severity::Critical,
                        routing_key: None,
                    },
                })
            } else {
                None
            },
            statuspage: if d.statuspage {
                p.notify.statuspage.as_ref().map(|s| StatuspageRoute {
                    components: s.components.clone(),
                    deliver_notifications: s.deliver_notifications,
                })
            } else {
                None
            },
            escalation_mention: p.notify.escalation.as_ref().map(|e| e.slack_mention.clone()),
        }
    }
}

/// One outbox entry: what to send; handles (Slack ts, Statuspage id) are looked up at delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Message {
    /// The incident's message: posted the first time, updated in place after that.
    SlackRoot {
        channel: String,
        text: String,
        blocks: Value,
        /// Our incident id, posted as the message's metadata so a retried post can find a
        /// message an earlier attempt made (entries queued before this field have none).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        incident: Option<String>,
        /// What the rollback did to the target (the action's before and after), set by the
        /// change that ended the action. Kept with the message's handles at delivery, so the
        /// later updates of the message (which do not know it) still show it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        state: Option<String>,
    },
    /// A reply in the incident's thread.
    SlackReply { channel: String, text: String },
    /// An Events API v2 event (`path` is `/v2/enqueue` or `/v2/change/enqueue`); the routing
    /// key, a secret, is added at delivery from the named key.
    PagerDuty {
        path: String,
        routing_key: Option<String>,
        body: Value,
    },
    /// Create the status page incident; where the incident already has one (an earlier
    /// attempt's), delivery updates that one with this text instead.
    StatuspageCreate { body: Value },
    /// Update (or resolve) the status page incident created earlier.
    StatuspageUpdate { body: Value },
}

impl Message {
    /// The channel a message goes to (delivery is ordered per incident and channel).
    pub fn channel(&self) -> Channel {
        match self {
            Message::SlackRoot { .. } | Message::SlackReply { .. } => Channel::Slack,
            Message::PagerDuty { .. } => Channel::PagerDuty,
            Message::StatuspageCreate { .. } | Message::StatuspageUpdate { .. } => Channel::Statuspage,
        }
    }
}

/// A change to an incident that people may need to hear about.
#[derive(Debug, Clone)]
pub enum Change<'a> {
    /// The incident opened.
    Opened,
    /// The phase changed (or was confirmed) through `incident::transition`.
    Phase {
        from: Phase,
        to: Phase,
        summary: &'a str,
        actor: &'a str,
        detail: &'a Value,
    },
    /// A note without a phase change: an alert joined or resolved, the action started.
    Note { summary: &'a str },
    /// The incident is over: every alert resolved and nothing is in flight, or a person closed
    /// it (maybe while its alerts still fire).
    Closed {
        /// Every alert of the incident had resolved when it closed: recovery was seen. Always
        /// so when the responder closes it; a person may close one whose alerts still fire.
        alerts_resolved: bool,
        /// An escalation page was triggered for the incident and not resolved since (read from
        /// its outbox in the closing's transaction, see [`pagerduty::escalation_open`]).
        escalation_open: bool,
        /// Something was queued for PagerDuty / created on the status page while the incident
        /// was live: an incident that became a dry run later (dry run switched on under a
        /// waiting request, a person's retry in dry run) still closes what it opened.
        paged: bool,
        status_page_opened: bool,
    },
}

/// Whether the incident's decision is a dry run.
pub fn is_dry_run(inc: &Incident) -> bool {
    matches!(inc.decision.outcome, Outcome::Suppressed(Suppression::DryRun { .. }))
}

/// The phase a change moves the incident into, if it moves it (opening counts).
pub(crate) fn entered(inc: &Incident, change: &Change) -> Option<Phase> {
    match change {
        Change::Opened => Some(inc.phase),
        Change::Phase { from, to, .. } if from != to => Some(*to),
        _ => None,
    }
}

/// Phases that need a human now.
fn is_escalation(p: Phase) -> bool {
    matches!(p, Phase::Failed | Phase::VerificationFailed | Phase::Escalated)
}

/// The messages a change causes, per the incident's routes. Pure.
pub fn plan(inc: &Incident, ctx: &Context, change: &Change) -> Vec<Message> {
    let mut out = Vec::new();
    let dry = is_dry_run(inc);
    if let Some(channel) = &ctx.routes.slack_channel {
        out.extend(slack::plan(inc, ctx, change, channel));
    }
    // Dry runs rehearse: Slack shows them, nobody is paged and the status page is untouched;
    // but what the incident opened while it was live is closed with it.
    if dry {
        if let Change::Closed {
            paged,
            status_page_opened,
            ..
        } = change
        {
            if let Some(route) = ctx.routes.pagerduty.as_ref().filter(|_| *paged) {
                out.extend(pagerduty::plan(inc, ctx, change, route));
            }
            if let Some(route) = ctx.routes.statuspage.as_ref().filter(|_| *status_page_opened) {
                out.extend(statuspage::plan(inc, change, route));
            }
        }
        return out;
    }
    if let Some(route) = &ctx.routes.pagerduty {
        out.extend(pagerduty::plan(inc, ctx, change, route));
    }
    if let Some(route) = &ctx.routes.statuspage {
        out.extend(statuspage::plan(inc, change, route));
    }
    out
}

/// Why a delivery did not go through.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeliveryError {
    /// Try again later (5xx, 429, timeouts, Slack `ratelimited`); `after` from Retry-After.
    #[error("{reason} (will retry)")]
    Retry { reason: String, after: Option<Duration> },
    /// Retrying cannot help (bad token, unknown channel, invalid payload).
    #[error("{reason}")]
    Permanent { reason: String },
}

/// Handles returned by a delivery, stored for later messages of the incident.
pub type Refs = Vec<(String, String)>;

/// Outbound clients and their secrets.
pub struct Notifiers {
    pub http: reqwest::Client,
    pub slack: Option<(String, SecretString)>,
    pub pagerduty: Option<(String, Option<SecretString>, BTreeMap<String, SecretString>)>,
    pub statuspage: Option<(String, SecretString, String)>,
}

impl Notifiers {
    /// From resolved settings.
    pub fn from_config(cfg: &crate::config::Resolved) -> Notifiers {
        crate::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(cfg.settings.notifications.timeout)
            .user_agent(concat!("rollback-responder/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        let s = &cfg.settings;
        Notifiers {
            http,
            slack: s
                .slack
                .as_ref()
                .zip(cfg.slack_token.clone())
                .map(|(s, t)| (s.api_url.trim_end_matches('/').to_string(), t)),
            pagerduty: s.pagerduty.as_ref().map(|p| {
                (
                    p.events_url.trim_end_matches('/').to_string(),
                    cfg.pagerduty_key.clone(),
                    p.routing_keys.clone(),
                )
            }),
            statuspage: s
                .statuspage
                .as_ref()
                .zip(cfg.statuspage_key.clone())
                .map(|(s, k)| (s.api_url.trim_end_matches('/').to_string(), k, s.page_id.clone())),
        }
    }

    /// Which channels are configured, for routing.
    pub fn defaults(&self, slack_channel: Option<String>) -> Defaults {
        Defaults {
            slack: self.slack.is_some(),
            slack_channel,
            pagerduty: self.pagerduty.is_some(),
            statuspage: self.statuspage.is_some(),
            pages_url: None,
        }
    }

    /// Sends one message; `refs` are the handles stored for this incident and channel;
    /// `retried`: an earlier attempt at this message may have reached the channel.
    pub async fn deliver(
        &self,
        msg: &Message,
        refs: &BTreeMap<String, String>,
        retried: bool,
    ) -> Result<Refs, DeliveryError> {
        let not_configured = |c: &str| DeliveryError::Permanent {
            reason: format!("{c} is not configured on this responder"),
        };
        match msg {
            Message::SlackRoot { .. } | Message::SlackReply { .. } => {
                let (url, token) = self.slack.as_ref().ok_or_else(|| not_configured("slack"))?;
                slack::deliver(&self.http, url, token, msg, refs, retried).await
            }
            Message::PagerDuty {
                path,
                routing_key,
                body,
            } => {
                let (url, default, named) = self.pagerduty.as_ref().ok_or_else(|| not_configured("pagerduty"))?;
                let key = match routing_key {
                    Some(name) => named.get(name).ok_or_else(|| DeliveryError::Permanent {
                        reason: format!("routing key {name:?} is not in pagerduty.routing_keys"),
                    })?,
                    None => default.as_ref().ok_or_else(|| DeliveryError::Permanent {
                        reason: "pagerduty.routing_key is not set".into(),
                    })?,
                };
                pagerduty::deliver(&self.http, url, key, path, body).await
            }
            Message::StatuspageCreate { .. } | Message::StatuspageUpdate { .. } => {
                let (url, key, page) = self.statuspage.as_ref().ok_or_else(|| not_configured("statuspage"))?;
                statuspage::deliver(&self.http, url, key, page, msg, refs, retried).await
            }
        }
    }
}

/// The longest a Retry-After is waited for.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);

/// Classifies an HTTP status the way every channel here needs it: 429 and 5xx retry (with
/// Retry-After when given, up to [`MAX_RETRY_AFTER`]), other 4xx are permanent.
pub(crate) fn classify_status(
    status: reqwest::StatusCode,
    retry_after: Option<&reqwest::header::HeaderValue>,
    body: &str,
) -> DeliveryError {
    // Respected, within reason: a peer's (or a proxy's) absurd Retry-After must not park a
    // message for years, nor overflow the time it is due at.
    let after = retry_after
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(|secs| Duration::from_secs(secs.min(MAX_RETRY_AFTER.as_secs())));
    let snippet: String = body.chars().take(300).collect();
    let reason = format!("HTTP {status}: {snippet}");
    // Statuspage answers its rate limit with 420 as well as 429.
    if status.as_u16() == 429 || status.as_u16() == 420 || status.is_server_error() || status.as_u16() == 408 {
        DeliveryError::Retry { reason, after }
    } else {
        DeliveryError::Permanent { reason }
    }
}

/// Network trouble is always worth another try.
pub(crate) fn transport_error(e: reqwest::Error) -> DeliveryError {
    DeliveryError::Retry {
        reason: format!("request failed: {e}"),
        after: None,
    }
}

/// A short line for an incident, used by every channel.
pub(crate) fn headline(inc: &Incident, ctx: &Context) -> String {
    let what = ctx
        .labels
        .get("alertname")
        .cloned()
        .unwrap_or_else(|| inc.alertname.clone());
    format!("{}: {what}", inc.service)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An incident that became a dry run after it paged or opened a status page while live
    /// (dry run switched on under a waiting request, a person's retry in dry run) still closes
    /// them; one that never did pages nobody, as any dry run.
    #[test]
    fn a_dry_run_closes_what_the_incident_opened_while_live_and_nothing_else() {
        let mut inc = Incident::sample(Phase::DryRun, chrono::Utc::now());
        inc.decision.outcome = Outcome::Suppressed(Suppression::DryRun {
            would: Box::new(Outcome::Auto),
        });
        let ctx = Context {
            routes: Routes {
                slack_channel: None,
                pagerduty: Some(PagerDutyRoute {
                    severity: Severity::Critical,
                    routing_key: None,
                }),
                statuspage: Some(StatuspageRoute {
                    components: [("cmp".to_string(), ComponentStatus::PartialOutage)].into(),
                    deliver_notifications: false,
                }),
                escalation_mention: None,
            },
            ..Context::default()
        };
        let closed = |paged, status_page_opened| Change::Closed {
            alerts_resolved: true,
            escalation_open: paged,
            paged,
            status_page_opened,
        };
        assert!(plan(&inc, &ctx, &closed(false, false)).is_empty());
        let sent = plan(&inc, &ctx, &closed(true, true));
        let resolves: Vec<String> = sent
            .iter()
            .map(|m| match m {
                Message::PagerDuty { body, .. } => format!("pagerduty {} {}", body["event_action"], body["dedup_key"]),
                Message::StatuspageUpdate { body } => format!("statuspage {}", body["incident"]["status"]),
                other => format!("{other:?}"),
            })
            .collect();
        let key = pagerduty::dedup_key(&inc);
        assert_eq!(
            resolves,
            [
                format!("pagerduty \"resolve\" \"{key}\""),
                format!("pagerduty \"resolve\" \"{key}/escalation\""),
                "statuspage \"resolved\"".to_string()
            ]
        );
        // Nothing else of a dry run reaches them.
        let detail = serde_json::Value::Null;
        let moved = Change::Phase {
            from: Phase::Executing,
            to: Phase::DryRun,
            summary: "s",
            actor: "a",
            detail: &detail,
        };
        assert!(plan(&inc, &ctx, &moved).is_empty());
    }

    /// Retry-After is respected within reason: an absurd one (a hostile or broken peer or
    /// proxy) waits at most [`MAX_RETRY_AFTER`], never years, and never overflows the time the
    /// message is due at.
    #[test]
    fn a_retry_after_is_capped() {
        let status = reqwest::StatusCode::TOO_MANY_REQUESTS;
        for (given, want) in [
            ("7", Some(Duration::from_secs(7))),
            ("99999999999999", Some(MAX_RETRY_AFTER)),
            (&u64::MAX.to_string(), Some(MAX_RETRY_AFTER)),
            ("Wed, 21 Oct 2015 07:28:00 GMT", None),
            ("-1", None),
        ] {
            let v = reqwest::header::HeaderValue::from_str(given).unwrap();
            let DeliveryError::Retry { after, .. } = classify_status(status, Some(&v), "") else {
                panic!("429 is retried");
            };
            assert_eq!(after, want, "{given}");
        }
    }
}
