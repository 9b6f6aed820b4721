//! The `incident_events` table: each incident's append-only audit trail, written in the
//! transaction of the change it records (or on its own for notes such as a refused approval).

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::Row;

use super::{from_ms, ms, storable, Result, Store, StoreTx};
use crate::incident::{IncidentId, Phase};

/// One entry of an incident's audit trail.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EventRecord {
    pub at: DateTime<Utc>,
    pub kind: String,
    pub actor: String,
    pub phase_from: Option<Phase>,
    pub phase_to: Option<Phase>,
    pub summary: String,
    pub detail: Value,
}

/// A new audit entry, appended within a state change's transaction.
#[derive(Debug, Clone)]
pub struct NewEvent<'a> {
    pub kind: &'a str,
    pub actor: &'a str,
    pub phase_from: Option<Phase>,
    pub phase_to: Option<Phase>,
    pub summary: String,
    pub detail: Value,
}

impl Store {
    /// An incident's audit trail, oldest first.
    pub async fn events(&self, id: &IncidentId) -> Result<Vec<EventRecord>> {
        let rows = sqlx::query(
            "SELECT at, kind, actor, phase_from, phase_to, summary, detail FROM incident_events WHERE incident_id = $1 ORDER BY id",
        )
        .bind(&id.0)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(EventRecord {
                    at: from_ms(r.try_get("at")?),
                    kind: r.try_get("kind")?,
                    actor: r.try_get("actor")?,
                    phase_from: r
                        .try_get::<Option<String>, _>("phase_from")?
                        .as_deref()
                        .and_then(Phase::parse),
                    phase_to: r
                        .try_get::<Option<String>, _>("phase_to")?
                        .as_deref()
                        .and_then(Phase::parse),
                    summary: r.try_get("summary")?,
                    detail: serde_json::from_str(&r.try_get::<String, _>("detail")?).unwrap_or(Value::Null),
                })
            })
            .collect()
    }

    /// Appends an audit entry on its own (a refused approval, a PagerDuty acknowledgement).
    pub async fn note(
        &self,
        id: &IncidentId,
        now: DateTime<Utc>,
        kind: &str,
        actor: &str,
        summary: &str,
        detail: &Value,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO incident_events (incident_id, at, kind, actor, phase_from, phase_to, summary, detail)
             VALUES ($1, $2, $3, $4, NULL, NULL, $5, $6)",
        )
        .bind(&id.0)
        .bind(ms(now))
        .bind(kind)
        .bind(storable(actor))
        .bind(storable(summary))
        .bind(detail.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

impl StoreTx {
    /// Appends to an incident's audit trail.
    pub async fn append_event(&mut self, id: &IncidentId, at: DateTime<Utc>, e: NewEvent<'_>) -> Result<()> {
        sqlx::query(
            "INSERT INTO incident_events (incident_id, at, kind, actor, phase_from, phase_to, summary, detail)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&id.0)
        .bind(ms(at))
        .bind(e.kind)
        .bind(storable(e.actor))
        .bind(e.phase_from.map(|p| p.as_str()))
        .bind(e.phase_to.map(|p| p.as_str()))
        .bind(storable(&e.summary))
        .bind(e.detail.to_string())
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }
}
