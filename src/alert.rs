//! The Alertmanager webhook payload (version 4), typed.
//!
//! This is the first step of the flow: `http::alertmanager` hands the raw body to
//! [`Notification::parse`], the store keeps every alert keyed by [`AlertKey`], and the
//! responder decides on it. Inbound third-party payloads are parsed tolerantly: Alertmanager
//! 0.25 omits `notification_reason`/`routeLabels` that newer versions add, and unknown fields
//! are ignored so that an upgrade on their side never breaks intake on ours.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Label or annotation set; ordered so that hashing and display are stable.
pub type LabelSet = BTreeMap<String, String>;

/// Alertmanager's alert fingerprint (a hex string).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Fingerprint(pub String);

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Firing or resolved, for a whole notification or a single alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertStatus {
    Firing,
    Resolved,
}

impl AlertStatus {
    /// The wire and storage spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertStatus::Firing => "firing",
            AlertStatus::Resolved => "resolved",
        }
    }

    /// Parses the storage spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "firing" => Some(AlertStatus::Firing),
            "resolved" => Some(AlertStatus::Resolved),
            _ => None,
        }
    }
}

/// One webhook delivery from Alertmanager.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Notification {
    pub version: String,
    #[serde(default)]
    pub group_key: String,
    #[serde(default)]
    pub truncated_alerts: u64,
    pub status: AlertStatus,
    #[serde(default)]
    pub receiver: String,
    #[serde(default)]
    pub group_labels: LabelSet,
    #[serde(default)]
    pub common_labels: LabelSet,
    #[serde(default)]
    pub common_annotations: LabelSet,
    #[serde(rename = "externalURL", default)]
    pub external_url: String,
    /// v0.32.0+ only.
    #[serde(default, rename = "notification_reason")]
    pub notification_reason: Option<String>,
    pub alerts: Vec<Alert>,
}

/// One alert inside a notification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    pub status: AlertStatus,
    #[serde(default)]
    pub labels: LabelSet,
    #[serde(default)]
    pub annotations: LabelSet,
    pub starts_at: DateTime<Utc>,
    /// Alertmanager sends `0001-01-01T00:00:00Z` for firing alerts; see [`Alert::ended_at`].
    #[serde(default)]
    pub ends_at: Option<DateTime<Utc>>,
    #[serde(rename = "generatorURL", default)]
    pub generator_url: String,
    pub fingerprint: Fingerprint,
}

/// What identifies one firing episode of one alert: Alertmanager re-sends the same pair on
/// retries, on `repeat_interval`, when the group grows and from every HA peer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct AlertKey {
    pub fingerprint: Fingerprint,
    pub starts_at: DateTime<Utc>,
}

/// Why a payload was rejected; shown to the sender in the 400 body.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("body is not valid Alertmanager webhook JSON: {0}")]
    Json(String),
    #[error("unsupported payload version {0:?}: this receiver speaks version \"4\"")]
    Version(String),
    #[error("alerts[{index}]: {problem}")]
    Alert { index: usize, problem: String },
    #[error("{field}: {problem}")]
    Field { field: &'static str, problem: String },
}

/// The most `groupKey` or `externalURL` may hold, and the most both may add up to over a
/// delivery's alerts: each alert's row keeps a copy of them (what the decision loop and the
/// incident page read), so a long one in a delivery of many small alerts would otherwise write
/// gigabytes from one megabyte of body. Alertmanager's are well under a kilobyte.
pub const MAX_SHARED_FIELD: usize = 4096;
pub const MAX_SHARED_COPIES: usize = 8 << 20;

impl Notification {
    /// Parses and checks a raw webhook body. Unknown fields are ignored; missing required
    /// ones, a wrong version, or alerts without a fingerprint are errors.
    pub fn parse(body: &[u8]) -> Result<Self, PayloadError> {
        // Tracking the path costs on every field, so only a body that fails is parsed again
        // with it: the path (`alerts[0].startsAt`) tells the sender which field is wrong.
        // The body is checked as UTF-8 once, in one pass, and parsed as text: parsing bytes
        // checks every string on its own, which cost more than the rest of the parse's
        // string handling (docs/benchmarks.md, eighth round). Bytes that are not UTF-8 are
        // parsed as bytes again, for the error that says where.
        let parsed = std::str::from_utf8(body)
            .ok()
            .and_then(|text| serde_json::from_str(text).ok());
        let n: Notification = match parsed {
            Some(n) => n,
            None => {
                let de = &mut serde_json::Deserializer::from_slice(body);
                match serde_path_to_error::deserialize::<_, Notification>(&mut *de) {
                    // Bytes that are not UTF-8 only where nothing reads them (an unknown
                    // field), as parsing bytes always allowed.
                    Ok(n) if de.end().is_ok() => n,
                    Err(e) if e.path().to_string() != "." => {
                        let path = e.path().to_string();
                        return Err(PayloadError::Json(format!("{path}: {}", e.into_inner())));
                    }
                    Err(e) => return Err(PayloadError::Json(e.into_inner().to_string())),
                    Ok(_) => return Err(PayloadError::Json("unreadable body".into())),
                }
            }
        };
        if n.version != "4" {
            return Err(PayloadError::Version(n.version));
        }
        for (field, value) in [("groupKey", &n.group_key), ("externalURL", &n.external_url)] {
            if value.len() > MAX_SHARED_FIELD {
                return Err(PayloadError::Field {
                    field,
                    problem: format!("{} bytes, at most {MAX_SHARED_FIELD} are accepted", value.len()),
                });
            }
        }
        let copies = n.alerts.len() * (n.group_key.len() + n.external_url.len());
        if copies > MAX_SHARED_COPIES {
            return Err(PayloadError::Field {
                field: "groupKey and externalURL",
                problem: format!(
                    "{copies} bytes once copied to each of the {} alerts, at most {MAX_SHARED_COPIES}; \
                     send fewer alerts per delivery or shorter keys",
                    n.alerts.len()
                ),
            });
        }
        for (index, a) in n.alerts.iter().enumerate() {
            let problem = if a.fingerprint.0.is_empty() {
                Some("fingerprint is empty")
            } else if a.fingerprint.0.len() > 64 || !a.fingerprint.0.chars().all(|c| c.is_ascii_alphanumeric()) {
                Some("fingerprint is not a hex string")
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(PayloadError::Alert {
                    index,
                    problem: problem.to_string(),
                });
            }
        }
        Ok(n)
    }
}

impl Alert {
    /// The `alertname` label, or "" when absent.
    pub fn alertname(&self) -> &str {
        self.labels.get("alertname").map(String::as_str).unwrap_or("")
    }

    /// The dedup identity of this firing episode.
    pub fn key(&self) -> AlertKey {
        AlertKey {
            fingerprint: self.fingerprint.clone(),
            starts_at: self.starts_at,
        }
    }

    /// When the alert ended, if it has: Alertmanager's zero time means "still firing".
    pub fn ended_at(&self) -> Option<DateTime<Utc>> {
        self.ends_at.filter(|t| t.timestamp() > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AM_025: &str = r#"{
      "receiver": "rollback\\-responder", "status": "firing",
      "alerts": [{"status": "firing",
        "labels": {"alertname": "HighErrorRate", "service": "portal-api", "severity": "critical"},
        "annotations": {"summary": "Portal API high error rate detected"},
        "startsAt": "2026-11-22T06:00:00.123456789Z", "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus/graph", "fingerprint": "a1b2c3d4e5f60718"}],
      "groupLabels": {"alertname": "HighErrorRate"}, "commonLabels": {"alertname": "HighErrorRate"},
      "commonAnnotations": {}, "externalURL": "http://alertmanager:9093", "version": "4",
      "groupKey": "{}:{alertname=\"HighErrorRate\"}", "truncatedAlerts": 0}"#;

    #[test]
    fn alertmanager_025_payload_parses_with_zero_end_time_as_still_firing() {
        let n = Notification::parse(AM_025.as_bytes()).unwrap();
        assert_eq!(n.alerts.len(), 1);
        assert_eq!(n.alerts[0].alertname(), "HighErrorRate");
        assert_eq!(n.alerts[0].ended_at(), None);
        assert_eq!(n.receiver, "rollback\\-responder");
    }

    #[test]
    fn newer_fields_are_accepted() {
        let body = AM_025.replace(
            "\"version\": \"4\"",
            "\"version\": \"4\", \"notification_reason\": \"first notification\", \"routeLabels\": {\"a\": \"b\"}",
        );
        let n = Notification::parse(body.as_bytes()).unwrap();
        assert_eq!(n.notification_reason.as_deref(), Some("first notification"));
    }

    #[test]
    fn wrong_version_is_named_and_a_missing_alertname_is_accepted() {
        let e = Notification::parse(AM_025.replace("\"version\": \"4\"", "\"version\": \"3\"").as_bytes());
        assert!(e.unwrap_err().to_string().contains("version \"3\""));
        // Alertmanager does not require the label (alerts posted by other tools may lack it);
        // refusing would refuse the whole group, valid alerts included, on every re-send.
        let n = Notification::parse(
            AM_025
                .replace("\"alertname\": \"HighErrorRate\", \"service\"", "\"service\"")
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(n.alerts[0].alertname(), "");
        let e = Notification::parse(b"{\"version\":\"4\"}").unwrap_err();
        assert!(e.to_string().contains("missing field"), "{e}");
    }

    /// `groupKey` and `externalURL` are copied into every alert's row: a long one is refused
    /// with the field named, and so is a delivery whose copies would add up past the bound
    /// (before, half a megabyte of groupKey with 6,000 small alerts wrote about 3 GB).
    #[test]
    fn delivery_fields_copied_to_every_alert_are_bounded() {
        let at_limit = "k".repeat(MAX_SHARED_FIELD);
        let ok = AM_025.replace("{}:{alertname=\\\"HighErrorRate\\\"}", &at_limit);
        assert!(ok.contains(&at_limit));
        assert!(Notification::parse(ok.as_bytes()).is_ok());
        let long = "k".repeat(MAX_SHARED_FIELD + 1);
        let e = Notification::parse(AM_025.replace("{}:{alertname=\\\"HighErrorRate\\\"}", &long).as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("groupKey: 4097 bytes"), "{e}");
        let e = Notification::parse(AM_025.replace("http://alertmanager:9093", &long).as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("externalURL: 4097 bytes"), "{e}");
        // 4 KiB of key is fine on a few alerts, not on 3,000 of them.
        let alert = r#"{"status":"firing","startsAt":"2026-11-22T06:00:00Z","fingerprint":"a1"}"#;
        let many = |n: usize| {
            format!(
                r#"{{"version":"4","status":"firing","groupKey":"{at_limit}","alerts":[{}]}}"#,
                vec![alert; n].join(",")
            )
        };
        assert!(Notification::parse(many(10).as_bytes()).is_ok());
        let e = Notification::parse(many(3_000).as_bytes()).unwrap_err().to_string();
        assert!(
            e.starts_with("groupKey and externalURL: ") && e.contains("3000 alerts"),
            "{e}"
        );
    }

    /// Parsing as text after one UTF-8 check accepts and refuses what parsing bytes did:
    /// bytes that are not UTF-8 where nothing reads them (an unknown field) are let through,
    /// in a label they are refused with the path, and trailing garbage is refused either way.
    #[test]
    fn bytes_that_are_not_utf8_are_judged_as_when_parsed_as_bytes() {
        let mut bad_unknown = AM_025
            .replacen("\"version\": \"4\"", "\"version\": \"4\", \"extra\": \"@\"", 1)
            .into_bytes();
        let at = bad_unknown.iter().position(|&b| b == b'@').unwrap();
        bad_unknown[at] = 0xff;
        let n = Notification::parse(&bad_unknown).unwrap();
        assert_eq!(n.alerts.len(), 1);

        let mut bad_label = AM_025.as_bytes().to_vec();
        let at = AM_025.find("portal-api").unwrap();
        bad_label[at] = 0xff;
        let e = Notification::parse(&bad_label).unwrap_err().to_string();
        assert!(e.contains("alerts[0].labels"), "{e}");

        let mut trailing = bad_unknown.clone();
        trailing.extend_from_slice(b" x");
        assert!(Notification::parse(&trailing).is_err());
        assert!(Notification::parse(format!("{AM_025} x").as_bytes()).is_err());
    }
}
