//! The `incident_events` table: each incident's append-only audit trail, written in the
//! transaction of the change it records (or on its own for notes such as a refused approval).

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::Row;

use super::{from_ms, ms, opt_ms, storable, Backend, Receipt, Result, Store, StoreError, StoreTx};
use crate::alert::{Fingerprint, LabelSet};
use crate::incident::joins::{self, JoinMark};
use crate::incident::{AuditKind, IncidentId, Phase, SYSTEM_ACTOR};
use crate::policy::Decision;

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
    /// An incident's timeline, oldest first: its audit rows, and each plain join kept on its
    /// alert's row put back after the audit row it followed ([`crate::incident::joins`]).
    pub async fn events(&self, id: &IncidentId) -> Result<Vec<EventRecord>> {
        // Both reads from one snapshot: a join committed between them could follow an audit
        // row the first read did not see.
        let mut tx = self.pool.begin().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *tx)
                .await?;
        }
        let audit = audit_rows(&mut *tx, id).await?;
        let joins = plain_joins(&mut *tx, id).await?;
        tx.rollback().await?;
        let mut joins = joins.into_iter().peekable();
        let mut out = Vec::with_capacity(audit.len() + joins.len());
        for (row_id, entry) in audit {
            while let Some((after, _)) = joins.peek() {
                if *after >= row_id {
                    break;
                }
                out.extend(joins.next().map(|(_, e)| e));
            }
            out.push(entry);
        }
        out.extend(joins.map(|(_, e)| e));
        Ok(out)
    }

    /// An incident's audit rows alone, oldest first: what the action path reads to find an
    /// interrupted action, without the storm of plain joins.
    pub async fn audit_events(&self, id: &IncidentId) -> Result<Vec<EventRecord>> {
        Ok(audit_rows(&self.pool, id).await?.into_iter().map(|(_, e)| e).collect())
    }

    /// Appends an audit entry on its own, outside any transaction.
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
        insert(&self.pool, id, now, &entry).await?;
        self.durable().await
    }

    /// [`Store::note`] in a transaction, with the receipt of the webhook that said it (if any)
    /// in the same commit; false (and nothing written) if that webhook was already processed.
    pub async fn note_event(
        &self,
        receipt: Option<&Receipt>,
        id: &IncidentId,
        now: DateTime<Utc>,
        entry: NewEvent<'_>,
    ) -> Result<bool> {
        let mut tx = self.begin().await?;
        if let Some(r) = receipt {
            if !tx.take_receipt(r, now).await? {
                return Ok(false);
            }
        }
        tx.append_event(id, now, entry).await?;
        tx.commit().await?;
        Ok(true)
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
        self.event_marks.remove(id);
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

impl StoreTx {
    /// The id of the incident's latest audit entry (0 for none), this transaction's own
    /// included: read once, and again only after this transaction appended to it.
    pub(super) async fn last_event_id(&mut self, id: &IncidentId) -> Result<i64> {
        if let Some(&mark) = self.event_marks.get(id) {
            return Ok(mark);
        }
        let q = sqlx::query("SELECT COALESCE(MAX(id), 0) FROM incident_events WHERE incident_id = $1").bind(&id.0);
        // Held-back entries of this incident must be written first to be counted; held-back
        // outcomes change nothing here, and sending them now would split the batch's UPDATE.
        let row = if self.deferred.events.iter().any(|e| e.incident_id == id.0) {
            q.fetch_one(self.db().await?).await?
        } else {
            q.fetch_one(self.db_ahead()).await?
        };
        let mark: i64 = row.try_get(0)?;
        self.event_marks.insert(id.clone(), mark);
        Ok(mark)
    }
}

/// An incident's audit rows with their ids, oldest first.
async fn audit_rows<'e, E: sqlx::Executor<'e, Database = sqlx::Any>>(
    e: E,
    id: &IncidentId,
) -> Result<Vec<(i64, EventRecord)>> {
    let rows = sqlx::query(
        "SELECT id, at, kind, actor, phase_from, phase_to, summary, detail FROM incident_events WHERE incident_id = $1 ORDER BY id",
    )
    .bind(&id.0)
    .fetch_all(e)
    .await?;
    rows.iter()
        .map(|r| {
            let kind: String = r.try_get("kind")?;
            let entry = EventRecord {
                at: from_ms(r.try_get("at")?),
                kind: AuditKind::parse(&kind).ok_or_else(|| StoreError::Corrupt(format!("audit kind {kind:?}")))?,
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
            };
            Ok((r.try_get("id")?, entry))
        })
        .collect()
}

/// The incident's plain joins as timeline entries, each with the id of the audit row it
/// follows, in the order they were made.
async fn plain_joins<'e, E: sqlx::Executor<'e, Database = sqlx::Any>>(
    e: E,
    id: &IncidentId,
) -> Result<Vec<(i64, EventRecord)>> {
    let rows = sqlx::query(
        "SELECT id, fingerprint, labels, decision, joined FROM alerts WHERE incident_id = $1 AND joined IS NOT NULL",
    )
    .bind(&id.0)
    .fetch_all(e)
    .await?;
    let mut joins = Vec::with_capacity(rows.len());
    for r in &rows {
        let alert_id: i64 = r.try_get("id")?;
        let fingerprint = Fingerprint(r.try_get("fingerprint")?);
        let Ok(mark) = serde_json::from_str::<JoinMark>(&r.try_get::<String, _>("joined")?) else {
            // Not this version's mark (a newer replica's, or damaged): the alert's join is
            // still in the incident's alerts; one unreadable row never hides the timeline.
            tracing::warn!(incident = %id.0, alert = alert_id, "unreadable join mark; left out of the timeline");
            continue;
        };
        let labels = serde_json::from_str::<LabelSet>(&r.try_get::<String, _>("labels")?).ok();
        let decision = r
            .try_get::<Option<String>, _>("decision")?
            .and_then(|d| serde_json::from_str::<Decision>(&d).ok());
        let summary = match (&labels, &decision) {
            (Some(labels), Some(d)) => joins::summary(labels, &fingerprint, d, mark.phase, opt_ms(mark.due_at), None),
            // A decision or labels this version cannot read (a newer replica's outcome):
            // the entry says what is certain.
            _ => format!("alert {fingerprint} joined the incident (incident {})", mark.phase),
        };
        let entry = EventRecord {
            at: from_ms(mark.at),
            kind: AuditKind::AlertJoined,
            actor: SYSTEM_ACTOR.into(),
            phase_from: None,
            phase_to: None,
            summary: storable(&summary),
            detail: serde_json::json!({ "alert_id": alert_id, "fingerprint": fingerprint }),
        };
        joins.push(((mark.after, mark.at, mark.seq, alert_id), entry));
    }
    // Joins between the same two audit rows in the order they were made: by time, and within
    // one transaction (one time) in the order it decided them.
    joins.sort_by_key(|(order, _)| *order);
    Ok(joins.into_iter().map(|((after, ..), e)| (after, e)).collect())
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

    /// Plain joins are kept on the alerts' rows, not as audit rows, and the timeline puts each
    /// back where it happened: after the entries before it (this transaction's own held-back
    /// ones included), before those after it, across transactions and notes made outside one.
    #[tokio::test]
    async fn plain_joins_read_back_in_their_place_in_the_timeline() {
        let (_dir, store) = sqlite_store().await;
        let now = Utc::now();
        let fps = [
            "a1b2c3d4e5f60701",
            "a1b2c3d4e5f60702",
            "a1b2c3d4e5f60703",
            "a1b2c3d4e5f60704",
        ];
        store
            .ingest(&super::super::intake::tests::delivery(&fps), now)
            .await
            .unwrap();
        let ids = store.pending_alert_ids(10).await.unwrap();
        let inc = Incident::sample(Phase::AwaitingApproval, now);
        let entry = |summary: &str| NewEvent {
            kind: AuditKind::Decided,
            actor: "test",
            phase_from: None,
            phase_to: None,
            summary: summary.into(),
            detail: Value::Null,
        };
        let d = inc.decision.clone();
        let mut tx = store.begin().await.unwrap();
        tx.insert_incident(&inc).await.unwrap();
        tx.claim_alerts(&ids).await.unwrap();
        tx.append_event(&inc.id, now, entry("first")).await.unwrap();
        // Decided in this order (a batch puts other groups' alerts first), not by id.
        for &a in [ids[1], ids[0]].iter() {
            tx.join_alert(a, &inc.id, &d, now, inc.phase, None).await.unwrap();
        }
        tx.append_event(&inc.id, now, entry("between")).await.unwrap();
        tx.join_alert(ids[2], &inc.id, &d, now, inc.phase, None).await.unwrap();
        tx.settle_alerts(&ids[..3]);
        tx.commit().await.unwrap();
        store
            .note(&inc.id, now, AuditKind::ApprovalRefused, "u", "outside", &Value::Null)
            .await
            .unwrap();
        let mut tx = store.begin().await.unwrap();
        tx.claim_alerts(&ids[3..]).await.unwrap();
        tx.join_alert(ids[3], &inc.id, &d, now, inc.phase, None).await.unwrap();
        tx.settle_alerts(&ids[3..]);
        tx.commit().await.unwrap();

        let read = store.events(&inc.id).await.unwrap();
        let said: Vec<String> = read
            .iter()
            .map(|e| match e.kind {
                AuditKind::AlertJoined => e.detail["fingerprint"].as_str().unwrap_or("?").to_string(),
                _ => e.summary.clone(),
            })
            .collect();
        assert_eq!(said, ["first", fps[1], fps[0], "between", fps[2], "outside", fps[3]]);
        let joined = &read[2];
        assert_eq!(joined.detail["alert_id"], ids[0]);
        assert_eq!(joined.actor, SYSTEM_ACTOR);
        assert!(
            joined.summary.starts_with(
                "HighErrorRate service=checkout (a1b2c3d4e5f60701) joined the incident (trigger t qualifies"
            ),
            "{}",
            joined.summary
        );
        let audit_rows: i64 = sqlx::query("SELECT COUNT(*) FROM incident_events WHERE kind = 'alert_joined'")
            .fetch_one(&store.pool)
            .await
            .unwrap()
            .get(0);
        assert_eq!(audit_rows, 0, "a plain join writes no audit row");
        assert_eq!(
            store.audit_events(&inc.id).await.unwrap().len(),
            3,
            "the audit rows alone"
        );

        // A row this version cannot read (a newer replica's decision, a damaged mark) never
        // hides the rest of the timeline.
        sqlx::query("UPDATE alerts SET decision = '{\"outcome\":\"from_the_future\"}' WHERE id = $1")
            .bind(ids[2])
            .execute(&store.pool)
            .await
            .unwrap();
        sqlx::query("UPDATE alerts SET joined = 'not a mark' WHERE id = $1")
            .bind(ids[3])
            .execute(&store.pool)
            .await
            .unwrap();
        let read = store.events(&inc.id).await.unwrap();
        assert_eq!(read.len(), 6, "the unreadable mark left out, nothing else");
        assert_eq!(
            read[4].summary,
            "alert a1b2c3d4e5f60703 joined the incident (incident awaiting_approval)"
        );
    }

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
