//! Statuspage: an incident with the policy's components degraded once the rollback action has
//! run, `monitoring` once it is verified, `resolved` (components operational) when the
//! incident closes. Seed 000 asks for the status page within 15 minutes of a rollback. The
//! public text says only what happened: "rolled back" when the action changed the target,
//! "investigating" when it did not (already reverted, pre-check refused, failed), nothing at
//! all when nothing could act (a dry run); "recovered" at the end only when recovery was seen
//! (verified, or every alert resolved). One status page incident per incident: a person's
//! retry after a failed rollback updates it with what the retry did.

use std::collections::BTreeMap;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};

use super::{classify_status, entered, transport_error, Change, DeliveryError, Message, Refs, StatuspageRoute};
use crate::incident::{Incident, Phase};

/// Statuspage messages for a change.
pub fn plan(inc: &Incident, change: &Change, route: &StatuspageRoute) -> Vec<Message> {
    let components: BTreeMap<&String, Value> = route
        .components
        .iter()
        .map(|(id, st)| (id, serde_json::to_value(st).unwrap_or(Value::Null)))
        .collect();
    match (entered(inc, change), change) {
        // Once the action has run, so the text can say what it did. Each attempt (a person's
        // retry after a failed one) says it; delivery updates the incident an earlier one made.
        (
            Some(to),
            Change::Phase {
                from: Phase::Executing, ..
            },
        ) if to != Phase::DryRun => {
            let rolled_back = to == Phase::Verifying && inc.executed();
            // Customers read this: the service, not our internal alert names.
            let (name, status, body) = if rolled_back {
                (
                    format!("{}: degraded service, release rolled back", inc.service),
                    "identified",
                    format!(
                        "We identified a problem with the latest release of {} and rolled it back. \
                         We are checking that the service has recovered.",
                        inc.service
                    ),
                )
            } else {
                (
                    format!("{}: degraded service", inc.service),
                    "investigating",
                    format!("We identified a problem with {} and are investigating.", inc.service),
                )
            };
            vec![Message::StatuspageCreate {
                body: json!({ "incident": {
                    "name": name,
                    "status": status,
                    "body": body,
                    "component_ids": route.components.keys().collect::<Vec<_>>(),
                    "components": components,
                    "deliver_notifications": route.deliver_notifications,
                    // Lets a retried create find the incident an earlier attempt made.
                    "metadata": { METADATA_KEY: { "incident_id": inc.id } },
                }}),
            }]
        }
        (Some(Phase::Verified), _) => vec![Message::StatuspageUpdate {
            body: json!({ "incident": {
                "status": "monitoring",
                "body": if inc.executed() {
                    format!("The previous version of {} is serving all traffic again and is healthy. We are monitoring.", inc.service)
                } else {
                    format!("{} is healthy again. We are monitoring.", inc.service)
                },
                "deliver_notifications": route.deliver_notifications,
            }}),
        }],
        // Every phase that left `executing` (but for a dry run) has a status page incident.
        (
            _,
            Change::Closed {
                alerts_resolved,
                status_page_opened,
                ..
            },
        ) if *status_page_opened
            || matches!(inc.phase, Phase::Verified | Phase::VerificationFailed | Phase::Failed) =>
        {
            let operational: BTreeMap<&String, &str> = route.components.keys().map(|id| (id, "operational")).collect();
            vec![Message::StatuspageUpdate {
                body: json!({ "incident": {
                    "status": "resolved",
                    "body": closing_text(inc, *alerts_resolved),
                    "components": operational,
                    "deliver_notifications": route.deliver_notifications,
                }}),
            }]
        }
        _ => vec![],
    }
}

/// The public last word on an incident: "recovered" only where recovery was seen (the
/// rollback verified, or every alert resolved), "stays rolled back" only after a rollback
/// that completed and verified; otherwise only that our engineers closed it.
fn closing_text(inc: &Incident, alerts_resolved: bool) -> String {
    match inc.phase {
        Phase::Verified if inc.executed() => {
            format!("{} has recovered; the faulty release stays rolled back.", inc.service)
        }
        Phase::Verified => format!("{} has recovered.", inc.service),
        // A failed verification: the checks said unhealthy, whatever the alerts say now.
        Phase::VerificationFailed => closed_by_engineers(inc),
        // A failed rollback (maybe partial: some of it took): "recovered" once its alerts
        // resolved, never "rolled back"; closed by a person while they fire, neither.
        _ if alerts_resolved => format!("{} has recovered.", inc.service),
        _ => closed_by_engineers(inc),
    }
}

fn closed_by_engineers(inc: &Incident) -> String {
    format!("Our engineers have closed this incident about {}.", inc.service)
}

/// Metadata key under which a created incident carries our incident id.
const METADATA_KEY: &str = "rollback_responder";

/// Creates or updates the page's incident; the created id is returned as a handle. One
/// incident per incident of ours: a create for an incident that already has one (a person's
/// retry after a failed rollback leaves `executing` a second time) updates that one with the
/// create's text instead. A create sent before (`retried`: an earlier attempt timed out or its
/// answer was lost) may have reached Statuspage: the page's unresolved incidents are looked
/// through first, and one carrying this incident's id is taken instead of creating a second.
pub async fn deliver(
    http: &reqwest::Client,
    base: &str,
    key: &SecretString,
    page: &str,
    msg: &Message,
    refs: &BTreeMap<String, String>,
    retried: bool,
) -> Result<Refs, DeliveryError> {
    let created = refs.get("incident_id");
    if let (Message::StatuspageCreate { body }, None, true) = (msg, created, retried) {
        let ours = &body["incident"]["metadata"][METADATA_KEY]["incident_id"];
        if let Some(id) = find_created(http, base, key, page, ours).await? {
            return Ok(vec![("incident_id".into(), id)]);
        }
    }
    let req = match (msg, created) {
        (Message::StatuspageCreate { body }, None) => http.post(format!("{base}/pages/{page}/incidents")).json(body),
        (Message::StatuspageCreate { body } | Message::StatuspageUpdate { body }, Some(id)) => {
            http.patch(format!("{base}/pages/{page}/incidents/{id}")).json(body)
        }
        (Message::StatuspageUpdate { .. }, None) => {
            return Err(DeliveryError::Permanent {
                reason: "no status page incident was created for this incident".into(),
            })
        }
        _ => {
            return Err(DeliveryError::Permanent {
                reason: "not a Statuspage message".into(),
            })
        }
    };
    // The key goes in the header: `?api_key=` would leak into access logs.
    let resp = req
        .header("authorization", format!("OAuth {}", key.expose_secret()))
        .send()
        .await
        .map_err(transport_error)?;
    let status = resp.status();
    let retry_after = resp.headers().get("retry-after").cloned();
    let text = resp.text().await.map_err(transport_error)?;
    if !status.is_success() {
        return Err(classify_status(status, retry_after.as_ref(), &text));
    }
    if matches!((msg, created), (Message::StatuspageCreate { .. }, None)) {
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if let Some(id) = v["id"].as_str() {
            return Ok(vec![("incident_id".into(), id.to_string())]);
        }
        return Err(DeliveryError::Permanent {
            reason: format!("Statuspage created an incident but returned no id: {text:.200}"),
        });
    }
    Ok(vec![])
}

/// The id of the page's unresolved incident whose metadata names `ours`, if any.
async fn find_created(
    http: &reqwest::Client,
    base: &str,
    key: &SecretString,
    page: &str,
    ours: &Value,
) -> Result<Option<String>, DeliveryError> {
    if !ours.is_string() {
        return Ok(None);
    }
    let resp = http
        .get(format!("{base}/pages/{page}/incidents/unresolved"))
        .header("authorization", format!("OAuth {}", key.expose_secret()))
        .send()
        .await
        .map_err(transport_error)?;
    let status = resp.status();
    let retry_after = resp.headers().get("retry-after").cloned();
    let text = resp.text().await.map_err(transport_error)?;
    if !status.is_success() {
        return Err(classify_status(status, retry_after.as_ref(), &text));
    }
    let list: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    Ok(list
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| &i["metadata"][METADATA_KEY]["incident_id"] == ours)
        .and_then(|i| i["id"].as_str())
        .map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::ComponentStatus;

    fn route() -> StatuspageRoute {
        StatuspageRoute {
            components: [("cmp".to_string(), ComponentStatus::PartialOutage)].into(),
            deliver_notifications: false,
        }
    }

    fn left_executing(inc: &Incident, to: Phase) -> Vec<Message> {
        let detail = Value::Null;
        let change = Change::Phase {
            from: Phase::Executing,
            to,
            summary: "s",
            actor: "a",
            detail: &detail,
        };
        plan(inc, &change, &route())
    }

    fn texts(messages: &[Message]) -> Vec<String> {
        messages
            .iter()
            .filter_map(|m| match m {
                Message::StatuspageCreate { body } | Message::StatuspageUpdate { body } => {
                    Some(format!("{} | {}", body["incident"]["name"], body["incident"]["body"]))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn public_text_says_rolled_back_only_when_the_action_changed_the_target() {
        let now = chrono::Utc::now();
        let started = Incident::sample(Phase::Executing, now);
        let detail = Value::Null;
        let entering = Change::Phase {
            from: Phase::AwaitingApproval,
            to: Phase::Executing,
            summary: "s",
            actor: "a",
            detail: &detail,
        };
        assert!(
            plan(&started, &entering, &route()).is_empty(),
            "nothing is said before the action ran"
        );

        let mut wrote = Incident::sample(Phase::Verifying, now);
        wrote.acted_at = Some(now);
        assert_eq!(
            texts(&left_executing(&wrote, Phase::Verifying)),
            ["\"svc: degraded service, release rolled back\" | \"We identified a problem with the latest release of svc \
              and rolled it back. We are checking that the service has recovered.\""]
        );
        // Found already reverted (someone else did it): nothing rolled back by us.
        let found = Incident::sample(Phase::Verifying, now);
        let said = texts(&left_executing(&found, Phase::Verifying));
        assert_eq!(
            said,
            ["\"svc: degraded service\" | \"We identified a problem with svc and are investigating.\""]
        );
        let verified = Incident::sample(Phase::Verified, now);
        let detail = Value::Null;
        let passed = Change::Phase {
            from: Phase::Verifying,
            to: Phase::Verified,
            summary: "s",
            actor: "a",
            detail: &detail,
        };
        let said = texts(&plan(&verified, &passed, &route())).join("\n");
        assert!(
            said.contains("svc is healthy again") && !said.contains("serving all traffic"),
            "{said}"
        );
        // The pre-check refused: failed, never "rolled back"; a dry run says nothing at all.
        let refused = Incident::sample(Phase::Failed, now);
        let said = texts(&left_executing(&refused, Phase::Failed)).join("\n");
        assert!(!said.contains("roll"), "{said}");
        let dry = Incident::sample(Phase::DryRun, now);
        assert!(left_executing(&dry, Phase::DryRun).is_empty());
        assert!(plan(
            &dry,
            &Change::Closed {
                alerts_resolved: true,
                escalation_open: false,
                paged: false,
                status_page_opened: false
            },
            &route()
        )
        .is_empty());
    }

    fn closed(inc: &Incident, alerts_resolved: bool) -> String {
        let change = Change::Closed {
            alerts_resolved,
            escalation_open: false,
            paged: false,
            status_page_opened: false,
        };
        let sent = plan(inc, &change, &route());
        let [Message::StatuspageUpdate { body }] = sent.as_slice() else {
            panic!("one update: {sent:?}");
        };
        assert_eq!(body["incident"]["status"], "resolved");
        assert_eq!(body["incident"]["components"]["cmp"], "operational");
        body["incident"]["body"].as_str().unwrap().to_string()
    }

    #[test]
    fn the_last_word_says_recovered_only_when_recovery_was_seen_and_rolled_back_only_after_a_whole_rollback() {
        let now = chrono::Utc::now();
        let mut verified = Incident::sample(Phase::Verified, now);
        assert_eq!(closed(&verified, true), "svc has recovered.");
        verified.acted_at = Some(now);
        assert_eq!(
            closed(&verified, true),
            "svc has recovered; the faulty release stays rolled back."
        );
        // A person closes a verified incident whose alert still fires: the checks saw it recover.
        assert_eq!(
            closed(&verified, false),
            "svc has recovered; the faulty release stays rolled back."
        );

        let neutral = "Our engineers have closed this incident about svc.";
        let mut failed = Incident::sample(Phase::Failed, now);
        // A person closes a failed incident while its alert fires: nothing recovered.
        assert_eq!(closed(&failed, false), neutral);
        // Its alerts resolved (the responder closes it): recovered, but never "rolled back".
        assert_eq!(closed(&failed, true), "svc has recovered.");
        // A partial rollback (some writes took, then it failed) changed the target, yet the
        // release does not "stay rolled back".
        failed.acted_at = Some(now);
        assert_eq!(closed(&failed, false), neutral);
        assert_eq!(closed(&failed, true), "svc has recovered.");

        // A failed verification: the checks said unhealthy, whatever the alerts say.
        let mut unverified = Incident::sample(Phase::VerificationFailed, now);
        unverified.acted_at = Some(now);
        assert_eq!(closed(&unverified, true), neutral);
        assert_eq!(closed(&unverified, false), neutral);
    }
}
