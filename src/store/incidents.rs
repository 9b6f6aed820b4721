//! The `incidents` table: opening an incident (one per open target), saving each new state
//! under a version check, the lists and gauges that read it, and what the guards need to know
//! about earlier rollbacks. Phases in SQL come from [`Phase`]. The lease on an incident's work
//! is [`super::leases`]; its audit trail is [`super::events`].

use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{
    could_be_stored, from_ms, ms, opt_ms, sql_phases, to_json, Backend, Result, Store, StoreError, StoreTx, REDECIDED,
};
use crate::incident::{Incident, IncidentId, Phase};
use crate::policy::History;

impl Store {
    /// Open incidents whose due time has come: re-decisions and approval expiries. A closed
    /// one is never due (closing clears the due time; the filter keeps it so for rows written
    /// otherwise), so it cannot take a place in the round from open ones.
    pub async fn due_incidents(&self, now: DateTime<Utc>) -> Result<Vec<IncidentId>> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "SELECT id FROM incidents WHERE due_at <= $1 AND closed_at IS NULL AND phase IN ({})
                 ORDER BY due_at LIMIT 100",
                sql_phases(&REDECIDED)
            )
        });
        let rows = sqlx::query(&SQL).bind(ms(now)).fetch_all(&self.pool).await?;
        ids(rows)
    }

    /// One incident.
    pub async fn incident(&self, id: &IncidentId) -> Result<Option<Incident>> {
        if !could_be_stored(&id.0) {
            return Ok(None);
        }
        fetch_incident(&self.pool, id).await
    }

    /// Recent incidents, newest first, optionally only open ones.
    pub async fn incidents(&self, open_only: bool, limit: i64) -> Result<Vec<Incident>> {
        let filter = if open_only { "WHERE closed_at IS NULL" } else { "" };
        let rows = sqlx::query(&format!(
            "SELECT {INCIDENT_COLS} FROM incidents {filter} ORDER BY opened_at DESC, id DESC LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(incident_from_row).collect()
    }

    /// Open incidents and incidents waiting for approval (metrics gauges).
    pub async fn incident_gauges(&self) -> Result<(i64, i64)> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "SELECT COUNT(*), COALESCE(SUM(CASE WHEN phase = {} THEN 1 ELSE 0 END), 0)
                 FROM incidents WHERE closed_at IS NULL",
                sql_phases(&[Phase::AwaitingApproval])
            )
        });
        let row = sqlx::query(&SQL).fetch_one(&self.pool).await?;
        Ok((row.try_get(0)?, row.try_get(1)?))
    }
}

impl StoreTx {
    /// What the guards need to know about earlier rollbacks, in one statement: the decision
    /// loop reads it once per policy and target in every batch, so a storm across targets
    /// pays for it often.
    pub async fn history(
        &mut self,
        policy: &str,
        target_key: &str,
        policy_window: Option<Duration>,
        global_window: Option<Duration>,
        now: DateTime<Utc>,
    ) -> Result<History> {
        // A window longer than the calendar reaches back to its start.
        let since = |w: Duration| ms(now).saturating_sub(i64::try_from(w.as_millis()).unwrap_or(i64::MAX));
        let sql = &HISTORY_SQL[usize::from(policy_window.is_some()) + 2 * usize::from(global_window.is_some())];
        let mut q = sqlx::query(sql).bind(target_key);
        if let Some(w) = policy_window {
            q = q.bind(policy).bind(since(w));
        }
        if let Some(w) = global_window {
            q = q.bind(since(w));
        }
        // Reads incidents only: nothing held back can change it.
        let row = q.fetch_one(self.db_ahead()).await?;
        let count = |i: usize| -> Result<u32> { Ok(u32::try_from(row.try_get::<i64, _>(i)?).unwrap_or(u32::MAX)) };
        Ok(History {
            last_rollback_on_target: opt_ms(row.try_get(0)?),
            policy_rollbacks_in_window: count(1)?,
            global_rollbacks_in_window: count(2)?,
        })
    }

    /// The open incident on a target, if any.
    pub async fn open_incident_for(&mut self, target_key: &str) -> Result<Option<Incident>> {
        let row = sqlx::query(&format!("SELECT {INCIDENT_COLS} FROM incidents WHERE open_target = $1"))
            .bind(target_key)
            .fetch_optional(self.db_ahead())
            .await?;
        row.map(|r| incident_from_row(&r)).transpose()
    }

    /// The id and version of the open incident on a target, if any.
    pub async fn open_incident_version(&mut self, target_key: &str) -> Result<Option<(IncidentId, i64)>> {
        let row = sqlx::query("SELECT id, version FROM incidents WHERE open_target = $1")
            .bind(target_key)
            .fetch_optional(self.db_ahead())
            .await?;
        row.map(|r| Ok((IncidentId(r.try_get(0)?), r.try_get(1)?))).transpose()
    }

    /// The first of `ids` that is not open any more (closed, or gone), read in the
    /// transaction in one statement; on PostgreSQL the open ones are share-locked until the
    /// commit, so nobody closes them in between.
    pub async fn first_not_open(&mut self, ids: &[&IncidentId]) -> Result<Option<IncidentId>> {
        if ids.is_empty() {
            return Ok(None);
        }
        let lock = match self.backend {
            Backend::Postgres => " FOR SHARE",
            Backend::Sqlite => "",
        };
        let sql = format!(
            "SELECT id FROM incidents WHERE id IN ({}) AND closed_at IS NULL{lock}",
            super::placeholders(self.backend, ids.len())
        );
        let q = ids.iter().fold(sqlx::query(&sql), |q, id| q.bind(id.0.as_str()));
        // Reads incidents only: nothing held back can change it.
        let open: std::collections::HashSet<String> = q
            .fetch_all(self.db_ahead())
            .await?
            .iter()
            .map(|r| r.try_get::<String, _>(0))
            .collect::<std::result::Result<_, _>>()?;
        Ok(ids.iter().find(|id| !open.contains(&id.0)).map(|id| (*id).clone()))
    }

    /// One incident, read inside the transaction.
    pub async fn incident(&mut self, id: &IncidentId) -> Result<Option<Incident>> {
        if !could_be_stored(&id.0) {
            return Ok(None);
        }
        fetch_incident(self.db_ahead(), id).await
    }

    /// Inserts a new incident; a conflict means another replica opened one for this target.
    pub async fn insert_incident(&mut self, i: &Incident) -> Result<()> {
        sqlx::query(
            "INSERT INTO incidents (id, policy, trigger_name, service, target_key, open_target, phase, decision, plan,
                 alertname, first_alert_starts_at, opened_at, updated_at, closed_at, due_at, acted_at, verified_at,
                 owner, lease_until, version, context)
             VALUES ($1, $2, $3, $4, $5, $5, $6, $7, $8, $9, $10, $11, $12, NULL, $13, NULL, NULL, NULL, NULL, $14, $15)",
        )
        .bind(&i.id.0)
        .bind(&i.policy)
        .bind(i.trigger.clone())
        .bind(&i.service)
        .bind(&i.target_key)
        .bind(i.phase.as_str())
        .bind(to_json(&i.decision))
        .bind(to_json(&i.plan))
        .bind(&i.alertname)
        .bind(ms(i.first_alert_starts_at))
        .bind(ms(i.opened_at))
        .bind(ms(i.updated_at))
        .bind(i.due_at.map(ms))
        .bind(i.version)
        .bind(i.context.to_string())
        .execute(self.db().await?)
        .await?;
        Ok(())
    }

    /// Writes an incident's new state if nobody changed it since it was read (`version`);
    /// returns false when someone did. A closed incident frees its target and is due no more.
    ///
    /// The lease is not part of it: [`Store::claim`], `renew` and `release` change the owner
    /// without changing the version, so a copy read before another replica's claim still
    /// passes the version check, and writing its (empty) owner back would hand that replica's
    /// running work to a third. The lease is only ever cleared here, when the phase is settled
    /// and the work is over; it is taken with [`StoreTx::take_lease`].
    pub async fn save_incident(&mut self, i: &Incident) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE incidents SET phase = $1, decision = $2, trigger_name = $3, updated_at = $4, closed_at = $5,
                 open_target = CASE WHEN $5 IS NULL THEN target_key ELSE NULL END,
                 due_at = CASE WHEN $5 IS NULL THEN $6 ELSE NULL END, acted_at = $7, verified_at = $8,
                 owner = CASE WHEN $9 = 1 THEN NULL ELSE owner END,
                 lease_until = CASE WHEN $9 = 1 THEN NULL ELSE lease_until END, version = version + 1
             WHERE id = $10 AND version = $11",
        )
        .bind(i.phase.as_str())
        .bind(to_json(&i.decision))
        .bind(i.trigger.clone())
        .bind(ms(i.updated_at))
        .bind(i.closed_at.map(ms))
        .bind(i.due_at.map(ms))
        .bind(i.acted_at.map(ms))
        .bind(i.verified_at.map(ms))
        .bind(i64::from(i.phase.is_settled()))
        .bind(&i.id.0)
        .bind(i.version)
        .execute(self.db().await?)
        .await?;
        Ok(r.rows_affected() == 1)
    }
}

/// [`StoreTx::history`]'s statement for each combination of windows (index: 1 with the
/// policy's, + 2 with the global one); a count without its window is 0. A rollback still
/// executing counts too: its acted_at is only set when it is done, and a storm across several
/// targets must not start more rollbacks than the limit while the first ones are still running.
static HISTORY_SQL: LazyLock<[String; 4]> = LazyLock::new(|| {
    let executing = sql_phases(&[Phase::Executing]);
    let counted = |since: &str| format!("(acted_at >= {since} OR (phase = {executing} AND acted_at IS NULL))");
    let policy = format!(
        "(SELECT COUNT(*) FROM incidents WHERE policy = $2 AND {})",
        counted("$3")
    );
    [(false, false), (true, false), (false, true), (true, true)].map(|(p, g)| {
        let global = if g {
            format!(
                "(SELECT COUNT(*) FROM incidents WHERE {})",
                counted(if p { "$4" } else { "$2" })
            )
        } else {
            "CAST(0 AS BIGINT)".into()
        };
        format!(
            "SELECT (SELECT MAX(acted_at) FROM incidents WHERE target_key = $1), {}, {global}",
            if p { policy.as_str() } else { "CAST(0 AS BIGINT)" }
        )
    })
});

/// One incident, through the pool or inside a transaction.
pub(super) async fn fetch_incident<'e, E: sqlx::Executor<'e, Database = sqlx::Any>>(
    e: E,
    id: &IncidentId,
) -> Result<Option<Incident>> {
    let row = sqlx::query(&format!("SELECT {INCIDENT_COLS} FROM incidents WHERE id = $1"))
        .bind(&id.0)
        .fetch_optional(e)
        .await?;
    row.map(|r| incident_from_row(&r)).transpose()
}

pub(super) fn ids(rows: Vec<AnyRow>) -> Result<Vec<IncidentId>> {
    rows.iter()
        .map(|r| Ok(IncidentId(r.try_get::<String, _>(0)?)))
        .collect()
}

pub(super) const INCIDENT_COLS: &str =
    "id, policy, trigger_name, service, target_key, phase, decision, plan, alertname, first_alert_starts_at,
    opened_at, updated_at, closed_at, due_at, acted_at, verified_at, owner, lease_until, version, context";

pub(super) fn incident_from_row(r: &AnyRow) -> Result<Incident> {
    let phase: String = r.try_get("phase")?;
    let decision: String = r.try_get("decision")?;
    let plan: String = r.try_get("plan")?;
    Ok(Incident {
        id: IncidentId(r.try_get("id")?),
        policy: r.try_get("policy")?,
        trigger: r.try_get("trigger_name")?,
        service: r.try_get("service")?,
        target_key: r.try_get("target_key")?,
        phase: Phase::parse(&phase).ok_or_else(|| StoreError::Corrupt(format!("phase {phase:?}")))?,
        decision: serde_json::from_str(&decision).map_err(|e| StoreError::Corrupt(format!("decision: {e}")))?,
        plan: serde_json::from_str(&plan).map_err(|e| StoreError::Corrupt(format!("plan: {e}")))?,
        alertname: r.try_get("alertname")?,
        first_alert_starts_at: from_ms(r.try_get("first_alert_starts_at")?),
        opened_at: from_ms(r.try_get("opened_at")?),
        updated_at: from_ms(r.try_get("updated_at")?),
        closed_at: opt_ms(r.try_get("closed_at")?),
        due_at: opt_ms(r.try_get("due_at")?),
        acted_at: opt_ms(r.try_get("acted_at")?),
        verified_at: opt_ms(r.try_get("verified_at")?),
        owner: r.try_get("owner")?,
        lease_until: opt_ms(r.try_get("lease_until")?),
        version: r.try_get("version")?,
        context: serde_json::from_str(&r.try_get::<String, _>("context")?).unwrap_or(Value::Null),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::super::intake::tests::sqlite_store;
    use super::super::leases::LEASED;
    use super::super::NewEvent;
    use super::*;

    /// One incident per phase, each on its own target, due and unowned as of `now`.
    async fn one_incident_per_phase(store: &Store, now: DateTime<Utc>) -> Vec<Incident> {
        let mut tx = store.begin().await.unwrap();
        let mut all = Vec::new();
        for p in Phase::ALL {
            let mut inc = Incident::sample(p, now);
            inc.target_key = format!("alb:listener/{p}");
            inc.due_at = Some(now - chrono::Duration::seconds(1));
            tx.insert_incident(&inc).await.unwrap();
            all.push(inc);
        }
        tx.commit().await.unwrap();
        all
    }

    fn phases_of(store_ids: &[IncidentId], all: &[Incident]) -> BTreeSet<&'static str> {
        all.iter()
            .filter(|i| store_ids.contains(&i.id))
            .map(|i| i.phase.as_str())
            .collect()
    }

    #[tokio::test]
    async fn every_phase_round_trips_through_the_store() {
        let (_dir, store) = sqlite_store().await;
        let now = Utc::now();
        let all = one_incident_per_phase(&store, now).await;
        for inc in &all {
            let back = store.incident(&inc.id).await.unwrap().unwrap();
            assert_eq!(back.phase, inc.phase, "inserted");
        }
        // Saved into every phase, and named in the audit trail as both ends of a change.
        let first = &all[0];
        let mut inc = store.incident(&first.id).await.unwrap().unwrap();
        for p in Phase::ALL {
            let from = inc.phase;
            inc.phase = p;
            let mut tx = store.begin().await.unwrap();
            assert!(tx.save_incident(&inc).await.unwrap());
            tx.append_event(
                &inc.id,
                now,
                NewEvent {
                    kind: crate::incident::AuditKind::Decided,
                    actor: "test",
                    phase_from: Some(from),
                    phase_to: Some(p),
                    summary: String::new(),
                    detail: Value::Null,
                },
            )
            .await
            .unwrap();
            tx.commit().await.unwrap();
            inc.version += 1;
            assert_eq!(store.incident(&inc.id).await.unwrap().unwrap().phase, p, "saved");
        }
        let events = store.events(&first.id).await.unwrap();
        assert_eq!(
            events.iter().map(|e| e.phase_to).collect::<Vec<_>>(),
            Phase::ALL.map(Some).to_vec()
        );
        assert_eq!(events[1].phase_from, Some(Phase::ALL[0]));
    }

    /// The phase lists in the SQL select exactly the phases they name: a misspelled phase
    /// would silently leave its incidents out.
    #[tokio::test]
    async fn queries_by_phase_find_exactly_their_phases() {
        let (_dir, store) = sqlite_store().await;
        let now = Utc::now();
        let all = one_incident_per_phase(&store, now).await;

        let due = store.due_incidents(now).await.unwrap();
        assert_eq!(phases_of(&due, &all), REDECIDED.iter().map(|p| p.as_str()).collect());
        let unowned = store.unowned_work(now).await.unwrap();
        assert_eq!(phases_of(&unowned, &all), LEASED.iter().map(|p| p.as_str()).collect());
        let (open, awaiting) = store.incident_gauges().await.unwrap();
        assert_eq!((open, awaiting), (Phase::ALL.len() as i64, 1));
        let mut tx = store.begin().await.unwrap();
        let window = Some(Duration::from_secs(3600));
        let h = tx.history("p", "none", window, window, now).await.unwrap();
        assert_eq!(
            (h.policy_rollbacks_in_window, h.global_rollbacks_in_window),
            (1, 1),
            "the one still executing counts"
        );
        drop(tx);
        for inc in &all {
            let claimed = store.claim(&inc.id, "r", now, Duration::from_secs(30)).await.unwrap();
            assert_eq!(claimed, LEASED.contains(&inc.phase), "{}", inc.phase);
        }
        let made_due = store
            .make_due(&REDECIDED, now + chrono::Duration::hours(1))
            .await
            .unwrap();
        assert_eq!(made_due, 0, "all were due already");
    }

    /// A closed incident is never due, however it was closed: more closed incidents than one
    /// round takes, each with a due time older than an open incident's, leave that one due.
    #[tokio::test]
    async fn closed_incidents_leave_the_due_queue() {
        let (_dir, store) = sqlite_store().await;
        let now = Utc::now();
        let mut tx = store.begin().await.unwrap();
        for n in 0..105 {
            let mut inc = Incident::sample(Phase::Suppressed, now);
            inc.target_key = format!("alb:listener/held-{n}");
            inc.due_at = Some(now - chrono::Duration::minutes(10));
            tx.insert_incident(&inc).await.unwrap();
            // Closed as a caller that only sets `closed_at` would close it.
            inc.closed_at = Some(now);
            assert!(tx.save_incident(&inc).await.unwrap());
        }
        let mut open = Incident::sample(Phase::Waiting, now);
        open.due_at = Some(now - chrono::Duration::minutes(1));
        tx.insert_incident(&open).await.unwrap();
        tx.commit().await.unwrap();

        assert_eq!(store.due_incidents(now).await.unwrap(), vec![open.id.clone()]);
        let (due_and_closed,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM incidents WHERE closed_at IS NOT NULL AND due_at IS NOT NULL")
                .fetch_one(&store.pool)
                .await
                .unwrap();
        assert_eq!(due_and_closed, 0, "closing clears the due time");
    }

    /// The plan is parsed once, when the incident is read: a target comes back as the target
    /// it was; a plan this version cannot read still leaves the incident readable.
    #[tokio::test]
    async fn an_incidents_plan_is_read_back_typed_and_an_unknown_one_as_stored() {
        use crate::incident::Plan;
        let (_dir, store) = sqlite_store().await;
        let now = Utc::now();
        let target: crate::policy::Target = serde_json::from_value(serde_json::json!({
            "kubernetes": { "namespace": "shop", "steps": [ { "scale": { "deployment": "api-canary", "replicas": 0 } } ] }
        }))
        .unwrap();
        let mut inc = Incident::sample(Phase::Executing, now);
        inc.plan = Plan::Target(target.clone());
        let mut tx = store.begin().await.unwrap();
        tx.insert_incident(&inc).await.unwrap();
        tx.commit().await.unwrap();
        let back = store.incident(&inc.id).await.unwrap().unwrap();
        assert_eq!(back.plan.target(), Ok(&target));

        sqlx::query("UPDATE incidents SET plan = '{\"gcp\":{}}' WHERE id = $1")
            .bind(&inc.id.0)
            .execute(&store.pool)
            .await
            .unwrap();
        let odd = store.incident(&inc.id).await.unwrap().expect("still readable");
        assert!(odd.plan.target().unwrap_err().contains("gcp"), "{:?}", odd.plan);
        let mut tx = store.begin().await.unwrap();
        assert!(tx.save_incident(&odd).await.unwrap());
        tx.commit().await.unwrap();
        let stored: String = sqlx::query("SELECT plan FROM incidents WHERE id = $1")
            .bind(&inc.id.0)
            .fetch_one(&store.pool)
            .await
            .unwrap()
            .get(0);
        assert_eq!(stored, "{\"gcp\":{}}");
    }
}
