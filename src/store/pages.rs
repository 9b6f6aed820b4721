//! Queries for the people-facing views (the incident pages and the terminal view): incidents
//! filtered by service and phase with the open ones first, the services seen so far, and an
//! incident's notifications with their delivery state. Read-only; nothing here writes.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::incidents::{incident_from_row, INCIDENT_COLS};
use super::{from_ms, opt_ms, Result, Store};
use crate::incident::{Incident, IncidentId, Phase};

/// Which incidents a list shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IncidentFilter {
    /// Only this service (exact match).
    pub service: Option<String>,
    /// Only incidents in this phase.
    pub phase: Option<Phase>,
    /// Only incidents that are still open.
    pub open_only: bool,
}

/// One notification of an incident as the outbox holds it.
#[derive(Debug, Clone)]
pub struct Notice {
    pub channel: String,
    /// The queued message (JSON of `notify::Message`).
    pub message: serde_json::Value,
    /// `pending`, `delivered` or `failed`.
    pub state: String,
    pub attempts: i64,
    pub queued_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

impl Store {
    /// Incidents matching `filter`: open ones first, then newest first; at most `limit`.
    pub async fn incidents_filtered(&self, filter: &IncidentFilter, limit: i64) -> Result<Vec<Incident>> {
        let mut conditions: Vec<String> = Vec::new();
        let mut binds: Vec<String> = Vec::new();
        if let Some(s) = &filter.service {
            binds.push(s.clone());
            conditions.push(format!("service = ${}", binds.len()));
        }
        if let Some(p) = filter.phase {
            binds.push(p.as_str().to_string());
            conditions.push(format!("phase = ${}", binds.len()));
        }
        if filter.open_only {
            conditions.push("closed_at IS NULL".into());
        }
        let filter_sql = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        let sql = format!(
            "SELECT {INCIDENT_COLS} FROM incidents {filter_sql}
             ORDER BY CASE WHEN closed_at IS NULL THEN 0 ELSE 1 END, opened_at DESC, id DESC LIMIT ${}",
            binds.len() + 1
        );
        let mut q = sqlx::query(&sql);
        for b in &binds {
            q = q.bind(b.as_str());
        }
        let rows = q.bind(limit).fetch_all(&self.pool).await?;
        rows.iter().map(incident_from_row).collect()
    }

    /// The services that have had incidents, sorted (for the list's filter).
    pub async fn incident_services(&self, limit: i64) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT DISTINCT service FROM incidents ORDER BY service LIMIT $1")
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(r.try_get::<String, _>(0)?)).collect()
    }

    /// Every notification of an incident with its delivery state, oldest first.
    pub async fn notices(&self, id: &IncidentId) -> Result<Vec<Notice>> {
        let rows = sqlx::query(
            "SELECT channel, payload, state, attempts, created_at, delivered_at FROM outbox
             WHERE incident_id = $1 ORDER BY id",
        )
        .bind(&id.0)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Notice {
                    channel: r.try_get("channel")?,
                    message: serde_json::from_str(&r.try_get::<String, _>("payload")?)
                        .unwrap_or(serde_json::Value::Null),
                    state: r.try_get("state")?,
                    attempts: r.try_get("attempts")?,
                    queued_at: from_ms(r.try_get("created_at")?),
                    delivered_at: opt_ms(r.try_get("delivered_at")?),
                })
            })
            .collect()
    }
}
