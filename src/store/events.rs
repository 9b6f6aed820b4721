//! The `incident_events` table: each incident's append-only audit trail, written in the
//! transaction of the change it records (or on its own for notes such as a refused approval).

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::Row;

use super::{from_ms, ms, storable, Result, Store, StoreError, StoreTx};
use crate::incident::{AuditKind, IncidentId, Phase};

/// One entry of an incident's audit trail.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EventRecord {
    pub at: DateTime<Utc>,
    pub kind: AuditKind,
    pub actor: String,
    pub phase_from: Option<Phase>,
    pub phase_to: Option<Phase>,
    pub summary: String,
    pub detail: Value,
}

/// A new audit entry, appended within a state change's transaction.
#[derive(Debug, Clone)]
pub struct NewEvent<'a> {
    pub kind: AuditKind,
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
                    kind: {
                        let kind: String = r.try_get("kind")?;
                        AuditKind::parse(&kind).ok_or_else(|| StoreError::Corrupt(format!("audit kind {kind:?}")))?
                    },
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
        kind: AuditKind,
        actor: &str,
        summary: &str,
        detail: &Value,
    ) -> Result<()> {
        let entry = NewEvent {
            kind,
            actor,
            phase_from: None,
            phase_to: None,
            summary: summary.to_string(),
            detail: detail.clone(),
        };
        insert(&self.pool, id, now, &entry).await
    }
}

impl StoreTx {
    /// Appends to an incident's audit trail. Held back and sent with the transaction's next
    /// statement or its commit ([`super::deferred`]), in order.
    pub async fn append_event(&mut self, id: &IncidentId, at: DateTime<Utc>, e: NewEvent<'_>) -> Result<()> {
        let detail = e.detail.to_string();
        self.append_event_json(id, at, e, detail);
        Ok(())
    }

    /// [`StoreTx::append_event`] with the detail already serialised; `e.detail` is ignored.
    pub fn append_event_json(&mut self, id: &IncidentId, at: DateTime<Utc>, e: NewEvent<'_>, detail: String) {
        self.deferred.events.push(super::deferred::EventRow {
            incident_id: id.0.clone(),
            at: ms(at),
            kind: e.kind.as_str(),
            actor: storable(e.actor),
            phase_from: e.phase_from.map(|p| p.as_str()),
            phase_to: e.phase_to.map(|p| p.as_str()),
            summary: storable(&e.summary),
            detail,
        });
    }
}

/// Appends one audit entry, through the pool or inside a transaction.
pub(super) async fn insert<'e, E: sqlx::Executor<'e, Database = sqlx::Any>>(
    executor: E,
    id: &IncidentId,
    at: DateTime<Utc>,
    e: &NewEvent<'_>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO incident_events (incident_id, at, kind, actor, phase_from, phase_to, summary, detail)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&id.0)
    .bind(ms(at))
    .bind(e.kind.as_str())
    .bind(storable(e.actor))
    .bind(e.phase_from.map(|p| p.as_str()))
    .bind(e.phase_to.map(|p| p.as_str()))
    .bind(storable(&e.summary))
    .bind(e.detail.to_string())
    .execute(executor)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::intake::tests::sqlite_store;
    use super::*;
    use crate::incident::Incident;

    /// Every kind is stored by its name and read back as itself; a name this version does not
    /// know is reported as corrupt data, never taken for another kind.
    #[tokio::test]
    async fn audit_kinds_are_stored_by_name_and_read_back() {
        let (_dir, store) = sqlite_store().await;
        let now = Utc::now();
        let inc = Incident::sample(Phase::Executing, now);
        let mut tx = store.begin().await.unwrap();
        tx.insert_incident(&inc).await.unwrap();
        for kind in AuditKind::ALL {
            let entry = NewEvent {
                kind,
                actor: "test",
                phase_from: None,
                phase_to: None,
                summary: kind.to_string(),
                detail: Value::Null,
            };
            tx.append_event(&inc.id, now, entry).await.unwrap();
        }
        tx.commit().await.unwrap();
        store
            .note(&inc.id, now, AuditKind::ApprovalRefused, "u", "refused", &Value::Null)
            .await
            .unwrap();
        let read: Vec<AuditKind> = store.events(&inc.id).await.unwrap().iter().map(|e| e.kind).collect();
        let mut expected = AuditKind::ALL.to_vec();
        expected.push(AuditKind::ApprovalRefused);
        assert_eq!(read, expected);
        let names: Vec<String> = sqlx::query("SELECT kind FROM incident_events ORDER BY id")
            .fetch_all(&store.pool)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<String, _>(0))
            .collect();
        assert_eq!(names[0], "opened", "stored as its name");

        sqlx::query("UPDATE incident_events SET kind = 'from_the_future' WHERE kind = 'closed'")
            .execute(&store.pool)
            .await
            .unwrap();
        let err = store.events(&inc.id).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt(m) if m.contains("from_the_future")),
            "{err}"
        );
    }
}
