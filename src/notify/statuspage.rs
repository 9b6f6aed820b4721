//! Statuspage: an incident with the policy's components degraded when a rollback starts,
//! `monitoring` once it is verified, `resolved` (components operational) when the incident
//! closes. Seed 000 asks for the status page within 15 minutes of a rollback.

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
        (Some(Phase::Executing), _) => vec![Message::StatuspageCreate {
            body: json!({ "incident": {
                "name": format!("{}: degraded service, rolling back a release", inc.service),
                "status": "identified",
                // Customers read this: the service, not our internal alert names.
                "body": format!("We identified a problem with the latest release of {} and are rolling it back.", inc.service),
                "component_ids": route.components.keys().collect::<Vec<_>>(),
                "components": components,
                "deliver_notifications": route.deliver_notifications,
            }}),
        }],
        (Some(Phase::Verified), _) => vec![Message::StatuspageUpdate {
            body: json!({ "incident": {
                "status": "monitoring",
                "body": format!("The previous version of {} is serving all traffic again and is healthy. We are monitoring.", inc.service),
                "deliver_notifications": route.deliver_notifications,
            }}),
        }],
        // Every phase that went through `executing` has a status page incident to close.
        (_, Change::Closed) if matches!(inc.phase, Phase::Verified | Phase::VerificationFailed | Phase::Failed) => {
            let operational: BTreeMap<&String, &str> = route.components.keys().map(|id| (id, "operational")).collect();
            vec![Message::StatuspageUpdate {
                body: json!({ "incident": {
                    "status": "resolved",
                    // A failed action may have changed nothing: say only what is known. After a
                    // failed verification only a person closes the incident, and the checks
                    // said unhealthy: never "recovered".
                    "body": if inc.phase == Phase::VerificationFailed {
                        format!("Our engineers have closed this incident about {}.", inc.service)
                    } else if inc.executed() {
                        format!("{} has recovered; the faulty release stays rolled back.", inc.service)
                    } else {
                        format!("{} has recovered.", inc.service)
                    },
                    "components": operational,
                    "deliver_notifications": route.deliver_notifications,
                }}),
            }]
        }
        _ => vec![],
    }
}

/// Creates or updates the page's incident; the created id is returned as a handle.
pub async fn deliver(
    http: &reqwest::Client,
    base: &str,
    key: &SecretString,
    page: &str,
    msg: &Message,
    refs: &BTreeMap<String, String>,
) -> Result<Refs, DeliveryError> {
    let req = match msg {
        Message::StatuspageCreate { body } => http.post(format!("{base}/pages/{page}/incidents")).json(body),
        Message::StatuspageUpdate { body } => {
            let id = refs.get("incident_id").ok_or_else(|| DeliveryError::Permanent {
                reason: "no status page incident was created for this incident".into(),
            })?;
            http.patch(format!("{base}/pages/{page}/incidents/{id}")).json(body)
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
    if matches!(msg, Message::StatuspageCreate { .. }) {
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
