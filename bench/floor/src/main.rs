//! The floor: what any Alertmanager receiver written with axum must at least do per webhook.
//! Read the body, parse it into the same typed structs as the service (`src/alert.rs`, field
//! layout copied on purpose: the floor must not depend on the service), answer 200.
//! No authentication, no storage, no logging. `bench/run.sh` reports the service's throughput
//! as a ratio to this, measured in the same run on the same pinned core.
//!
//! Usage: bench-floor 127.0.0.1:PORT

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};

type LabelSet = BTreeMap<String, String>;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
enum AlertStatus {
    Firing,
    Resolved,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
struct Notification {
    version: String,
    #[serde(default)]
    group_key: String,
    #[serde(default)]
    truncated_alerts: u64,
    status: AlertStatus,
    #[serde(default)]
    receiver: String,
    #[serde(default)]
    group_labels: LabelSet,
    #[serde(default)]
    common_labels: LabelSet,
    #[serde(default)]
    common_annotations: LabelSet,
    #[serde(rename = "externalURL", default)]
    external_url: String,
    #[serde(default, rename = "notification_reason")]
    notification_reason: Option<String>,
    alerts: Vec<Alert>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
struct Alert {
    status: AlertStatus,
    #[serde(default)]
    labels: LabelSet,
    #[serde(default)]
    annotations: LabelSet,
    starts_at: DateTime<Utc>,
    #[serde(default)]
    ends_at: Option<DateTime<Utc>>,
    #[serde(rename = "generatorURL", default)]
    generator_url: String,
    fingerprint: String,
}

async fn receive(body: Bytes) -> (StatusCode, Json<Value>) {
    match serde_json::from_slice::<Notification>(&body) {
        Ok(n) => (StatusCode::OK, Json(json!({ "status": "parsed", "alerts": n.alerts.len() }))),
        Err(e) => (StatusCode::BAD_REQUEST, Json(json!({ "error": e.to_string() }))),
    }
}

/// Only with `--features mimalloc`: the same allocator as the service.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9096".into());
    let app = Router::new().route("/webhook/alertmanager", post(receive));
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind the floor's address");
    eprintln!("floor listening on {addr}");
    axum::serve(listener, app).await.expect("serve");
}
