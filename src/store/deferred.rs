//! Writes a transaction holds back and sends together: what became of each alert
//! ([`StoreTx::set_alert_outcome`], [`StoreTx::settle_alerts`]) and audit entries ([`StoreTx::append_event`]). Deciding a
//! storm is a long run of exactly these two writes per alert; one statement each per alert
//! cost more than the decisions themselves (every statement is a hand-off to sqlx's SQLite
//! thread, a parse-and-bind, a B-tree descent). Held back, a batch's alerts cost one
//! multi-row UPDATE and one multi-row INSERT.
//!
//! Nothing can tell the difference: every other statement of the transaction goes through
//! [`StoreTx::db`], which sends what is held back first, and so does the commit (reads of
//! the `incidents` table alone, which nothing held back touches, may go ahead of it:
//! [`StoreTx::db_ahead`]). Reads inside
//! the transaction see every earlier write, and entries keep the order they were made in.

use foldhash::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use sqlx::AnyConnection;

use super::{Backend, Result, StoreTx};

/// Rows per statement: far below either database's parameter limit (SQLite 32,766,
/// PostgreSQL 65,535), and a statement text that sqlx's statement cache sees again.
const CHUNK: usize = 32;

/// An alert's outcome, held back.
pub(super) struct Outcome {
    pub alert_id: i64,
    pub incident: Option<String>,
    pub decision: Option<Arc<str>>,
    /// A plain join's mark (`alerts.joined`, [`crate::incident::joins::JoinMark`]).
    pub joined: Option<String>,
}

/// An audit entry, held back, as stored.
pub(super) struct EventRow {
    pub incident_id: String,
    pub at: i64,
    pub kind: &'static str,
    pub actor: String,
    pub phase_from: Option<&'static str>,
    pub phase_to: Option<&'static str>,
    pub summary: String,
    pub detail: String,
}

/// What a transaction has not sent yet.
#[derive(Default)]
pub(super) struct Deferred {
    pub outcomes: Vec<Outcome>,
    pub events: Vec<EventRow>,
}

impl Deferred {
    fn is_empty(&self) -> bool {
        self.outcomes.is_empty() && self.events.is_empty()
    }
}

impl StoreTx {
    /// The transaction's connection, for any statement that is not held back: what is held
    /// back is sent first, so the statement sees it and comes after it.
    pub(super) async fn db(&mut self) -> Result<&mut AnyConnection> {
        self.flush().await?;
        Ok(&mut *self.tx)
    }

    /// The transaction's connection without sending what is held back first, for reads that
    /// nothing held back can change: of the `incidents` table (what is held back writes only
    /// `alerts` and `incident_events`), of audit entries when none is held back, or of alerts
    /// none of whose outcomes is held back (a batch's next claim). A batch of alerts across
    /// several targets reads each target's incident and history between its alerts; flushing
    /// before each of those split the batch's writes into many small statements.
    pub(super) fn db_ahead(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }

    /// Sends what is held back (before another statement, and before the commit).
    pub(super) async fn flush(&mut self) -> Result<()> {
        if self.deferred.is_empty() {
            return Ok(());
        }
        let Deferred { outcomes, events } = std::mem::take(&mut self.deferred);
        for chunk in outcomes.chunks(CHUNK) {
            update_outcomes(&mut self.tx, self.backend, chunk).await?;
        }
        for chunk in events.chunks(CHUNK) {
            insert_events(&mut self.tx, self.backend, chunk).await?;
        }
        Ok(())
    }
}

/// One UPDATE for up to [`CHUNK`] alerts: each is decided (not pending any more), and
/// `CASE id WHEN ...` picks its values; a missing value (`NULL`) keeps what the alert had.
/// An alert listed twice (an outcome, then settled) takes its first values.
async fn update_outcomes(conn: &mut AnyConnection, backend: Backend, rows: &[Outcome]) -> Result<()> {
    let sql = statement(backend, Kind::Outcomes, rows.len());
    let q = sqlx::query(&sql);
    let q = match backend {
        // `$n` names each row's id once for all the places it is used.
        Backend::Postgres => rows.iter().fold(q, |q, r| {
            q.bind(r.alert_id)
                .bind(r.incident.as_deref())
                .bind(r.decision.as_deref())
                .bind(r.joined.as_deref())
        }),
        // `?` in the order of the text: each column's CASE, then the ids.
        Backend::Sqlite => {
            let q = rows
                .iter()
                .fold(q, |q, r| q.bind(r.alert_id).bind(r.incident.as_deref()));
            let q = rows
                .iter()
                .fold(q, |q, r| q.bind(r.alert_id).bind(r.decision.as_deref()));
            let q = rows.iter().fold(q, |q, r| q.bind(r.alert_id).bind(r.joined.as_deref()));
            rows.iter().fold(q, |q, r| q.bind(r.alert_id))
        }
    };
    q.execute(&mut *conn).await?;
    Ok(())
}

/// One INSERT for up to [`CHUNK`] audit entries, in the order they were made.
async fn insert_events(conn: &mut AnyConnection, backend: Backend, rows: &[EventRow]) -> Result<()> {
    let sql = statement(backend, Kind::Events, rows.len());
    let q = rows.iter().fold(sqlx::query(&sql), |q, r| {
        q.bind(r.incident_id.as_str())
            .bind(r.at)
            .bind(r.kind)
            .bind(r.actor.as_str())
            .bind(r.phase_from)
            .bind(r.phase_to)
            .bind(r.summary.as_str())
            .bind(r.detail.as_str())
    });
    q.execute(&mut *conn).await?;
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Outcomes,
    Events,
}

/// The statement for `n` rows of a kind, written once per (backend, kind, n) and kept: at
/// most 4 x [`CHUNK`] texts. PostgreSQL numbers its parameters (`$n`); SQLite gets anonymous
/// ones (`?`), bound in the order of the text, since sqlx looks every `$n` up by name with a
/// linear search, which made a statement of many rows quadratic in its parameters.
fn statement(backend: Backend, kind: Kind, n: usize) -> Arc<str> {
    type Kept = Mutex<HashMap<(Backend, Kind, usize), Arc<str>>>;
    static KEPT: OnceLock<Kept> = OnceLock::new();
    let mut kept = KEPT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    kept.entry((backend, kind, n))
        .or_insert_with(|| write_statement(backend, kind, n).into())
        .clone()
}

fn write_statement(backend: Backend, kind: Kind, n: usize) -> String {
    // The parameter at 1-based position `i` of PostgreSQL's numbering.
    let p = |i: usize| match backend {
        Backend::Postgres => format!("${i}"),
        Backend::Sqlite => "?".to_string(),
    };
    // On SQLite, `OR FAIL`: a statement of many rows that may abort (a NOT NULL column) inside
    // a transaction gets a statement journal, a copy of every page it touches so that it can
    // undo itself alone; that copying was a twentieth of a decided delivery. These statements
    // are never undone alone: any error abandons the whole transaction, which undoes them
    // with it (they are sent before the intake's savepoint opens, never inside it).
    // PostgreSQL has no such clause and no such cost.
    let fail = match backend {
        Backend::Postgres => "",
        Backend::Sqlite => " OR FAIL",
    };
    match kind {
        Kind::Outcomes => {
            let mut incident = String::from("CASE id");
            let mut decision = String::from("CASE id");
            let mut joined = String::from("CASE id");
            for i in 0..n {
                let (id, inc, dec, join) = (4 * i + 1, 4 * i + 2, 4 * i + 3, 4 * i + 4);
                incident.push_str(&format!(" WHEN {} THEN {}", p(id), p(inc)));
                decision.push_str(&format!(" WHEN {} THEN {}", p(id), p(dec)));
                joined.push_str(&format!(" WHEN {} THEN {}", p(id), p(join)));
            }
            let ids = (0..n).map(|i| p(4 * i + 1)).collect::<Vec<_>>().join(", ");
            format!(
                "UPDATE{fail} alerts SET pending = 0, incident_id = COALESCE({incident} END, incident_id),
                     decision = COALESCE({decision} END, decision), joined = COALESCE({joined} END, joined)
                 WHERE id IN ({ids})"
            )
        }
        Kind::Events => {
            let values = (0..n)
                .map(|i| format!("({})", (8 * i + 1..=8 * i + 8).map(p).collect::<Vec<_>>().join(", ")))
                .collect::<Vec<_>>()
                .join(", ");
            format!(
                "INSERT{fail} INTO incident_events (incident_id, at, kind, actor, phase_from, phase_to, summary, detail) VALUES {values}"
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::intake::tests::{delivery, sqlite_store};
    use super::super::NewEvent;
    use super::*;
    use crate::incident::{AuditKind, Incident, Phase};
    use chrono::Utc;
    use sqlx::Row;

    /// Held-back writes are invisible from outside only: a read in the same transaction sees
    /// them, entries keep their order across the flushes, a settled alert is no longer
    /// pending, and a transaction that does not commit leaves nothing.
    #[tokio::test]
    async fn held_back_writes_are_seen_by_the_transactions_reads_and_committed_in_order() {
        let (_dir, store) = sqlite_store().await;
        let now = Utc::now();
        store
            .ingest(
                &delivery(&["a1b2c3d4e5f60701", "a1b2c3d4e5f60702", "a1b2c3d4e5f60703"]),
                now,
            )
            .await
            .unwrap();
        let ids = store.pending_alert_ids(10).await.unwrap();
        let inc = Incident::sample(Phase::AwaitingApproval, now);
        let mut tx = store.begin().await.unwrap();
        tx.insert_incident(&inc).await.unwrap();
        let claimed = tx.claim_alerts(&ids).await.unwrap();
        assert_eq!(claimed.len(), 3);
        tx.set_alert_outcome(ids[0], Some(&inc.id), None).await.unwrap();
        let event = |n: usize| NewEvent {
            kind: AuditKind::AlertJoined,
            actor: "test",
            phase_from: None,
            phase_to: None,
            summary: format!("entry {n}"),
            detail: serde_json::Value::Null,
        };
        tx.append_event(&inc.id, now, event(1)).await.unwrap();
        assert!(
            tx.incident_has_alertname(&inc.id, "HighErrorRate", ids[2])
                .await
                .unwrap(),
            "the read sees the held-back outcome"
        );
        tx.append_event(&inc.id, now, event(2)).await.unwrap();
        tx.settle_alerts(&ids[..2]);
        tx.commit().await.unwrap();

        let summaries: Vec<String> = store
            .events(&inc.id)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.summary)
            .collect();
        assert_eq!(summaries, ["entry 1", "entry 2"]);
        assert_eq!(
            store.pending_alert_ids(10).await.unwrap(),
            ids[2..].to_vec(),
            "only the settled ones left"
        );
        let joined: Vec<i64> = sqlx::query("SELECT id FROM alerts WHERE incident_id = $1")
            .bind(&inc.id.0)
            .fetch_all(&store.pool)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<i64, _>(0))
            .collect();
        assert_eq!(
            joined,
            ids[..1].to_vec(),
            "settling kept the outcome recorded before it"
        );

        let mut tx = store.begin().await.unwrap();
        tx.claim_alerts(&ids).await.unwrap();
        tx.settle_alerts(&ids[2..]);
        tx.append_event(&inc.id, now, event(3)).await.unwrap();
        drop(tx);
        assert_eq!(
            store.events(&inc.id).await.unwrap().len(),
            2,
            "nothing of a dropped transaction"
        );
        assert_eq!(store.pending_alert_ids(10).await.unwrap(), ids[2..].to_vec());
    }

    #[test]
    fn statements_number_every_row_and_are_kept() {
        let two = statement(Backend::Postgres, Kind::Outcomes, 2);
        assert!(
            two.contains("CASE id WHEN $1 THEN $2 WHEN $5 THEN $6 END")
                && two.contains("CASE id WHEN $1 THEN $3 WHEN $5 THEN $7 END")
                && two.contains("CASE id WHEN $1 THEN $4 WHEN $5 THEN $8 END")
                && two.contains("WHERE id IN ($1, $5)"),
            "{two}"
        );
        assert!(
            Arc::ptr_eq(&two, &statement(Backend::Postgres, Kind::Outcomes, 2)),
            "written once"
        );
        let lite = statement(Backend::Sqlite, Kind::Outcomes, 2);
        assert!(
            lite.contains("CASE id WHEN ? THEN ? WHEN ? THEN ? END") && lite.contains("WHERE id IN (?, ?)"),
            "{lite}"
        );
        assert!(!lite.contains('$'), "{lite}");
        let events = statement(Backend::Postgres, Kind::Events, 2);
        assert!(
            events.ends_with("($1, $2, $3, $4, $5, $6, $7, $8), ($9, $10, $11, $12, $13, $14, $15, $16)"),
            "{events}"
        );
    }
}
