//! Who runs an incident's work: the lease (`owner`, `lease_until`) on incidents executing or
//! verifying. Only one holder at a time, renewed while the work runs, taken over by another
//! replica when it runs out (its holder died), given back on shutdown.

use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::incidents::ids;
use super::{lease_end, ms, sql_phases, Result, Store, StoreTx};
use crate::incident::{Incident, IncidentId, Phase};

/// Phases with work in flight: the only ones whose incidents are leased.
pub(super) const LEASED: [Phase; 2] = [Phase::Executing, Phase::Verifying];

impl Store {
    /// Incidents with work in flight that no live replica holds (new, or whose owner's lease
    /// ran out: the owner died).
    pub async fn unowned_work(&self, now: DateTime<Utc>) -> Result<Vec<IncidentId>> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "SELECT id FROM incidents WHERE phase IN ({})
                   AND (owner IS NULL OR lease_until < $1) ORDER BY opened_at LIMIT 100",
                sql_phases(&LEASED)
            )
        });
        let rows = sqlx::query(&SQL).bind(ms(now)).fetch_all(&self.pool).await?;
        ids(rows)
    }

    /// Takes the lease on an incident's work. Only one holder at a time: the update is
    /// conditional on the lease being free or expired, so neither another replica nor a second
    /// task on this one can start the same work.
    pub async fn claim(&self, id: &IncidentId, owner: &str, now: DateTime<Utc>, lease: Duration) -> Result<bool> {
        let until = lease_end(now, lease);
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "UPDATE incidents SET owner = $1, lease_until = $2
                 WHERE id = $3 AND phase IN ({}) AND (owner IS NULL OR lease_until < $4)",
                sql_phases(&LEASED)
            )
        });
        let r = sqlx::query(&SQL)
            .bind(owner)
            .bind(ms(until))
            .bind(&id.0)
            .bind(ms(now))
            .execute(&self.pool)
            .await?;
        self.durable().await?;
        Ok(r.rows_affected() == 1)
    }

    /// Extends a lease this owner holds; false if it was lost (expired and taken over).
    pub async fn renew(&self, id: &IncidentId, owner: &str, now: DateTime<Utc>, lease: Duration) -> Result<bool> {
        let until = lease_end(now, lease);
        let r = sqlx::query("UPDATE incidents SET lease_until = $1 WHERE id = $2 AND owner = $3")
            .bind(ms(until))
            .bind(&id.0)
            .bind(owner)
            .execute(&self.pool)
            .await?;
        self.durable().await?;
        Ok(r.rows_affected() == 1)
    }

    /// Gives the lease back (on shutdown, so another replica can take over at once).
    pub async fn release(&self, id: &IncidentId, owner: &str) -> Result<()> {
        sqlx::query("UPDATE incidents SET owner = NULL, lease_until = NULL WHERE id = $1 AND owner = $2")
            .bind(&id.0)
            .bind(owner)
            .execute(&self.pool)
            .await?;
        self.durable().await?;
        Ok(())
    }
}

impl StoreTx {
    /// Extends the lease `owner` holds, inside this transaction: false when `owner` no longer
    /// holds it (taken over, or the work settled). A replica calls it first in every
    /// transaction that records its work, so that what it commits is only ever recorded while
    /// it holds the lease: on PostgreSQL the row stays locked until the commit, so no claim
    /// can slip in between, and on SQLite the one writer serialises it with any claim.
    pub async fn hold_lease(
        &mut self,
        id: &IncidentId,
        owner: &str,
        now: DateTime<Utc>,
        lease: Duration,
    ) -> Result<bool> {
        let r = sqlx::query("UPDATE incidents SET lease_until = $1 WHERE id = $2 AND owner = $3")
            .bind(ms(lease_end(now, lease)))
            .bind(&id.0)
            .bind(owner)
            .execute(self.db().await?)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Takes the lease on an incident this transaction has just moved into `executing` (its
    /// version is the one just written), so the work can start right after the commit.
    pub async fn take_lease(&mut self, i: &Incident) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE incidents SET owner = $1, lease_until = $2, version = version + 1 WHERE id = $3 AND version = $4",
        )
        .bind(i.owner.clone())
        .bind(i.lease_until.map(ms))
        .bind(&i.id.0)
        .bind(i.version)
        .execute(self.db().await?)
        .await?;
        Ok(r.rows_affected() == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::super::intake::tests::sqlite_store;
    use super::*;
    use chrono::Utc;

    /// A copy read before another replica's claim passes the version check (a claim does not
    /// change the version); saving it must not give that replica's lease away, or a third
    /// replica would take the same work while it runs.
    #[tokio::test]
    async fn saving_a_copy_read_before_a_claim_keeps_the_claim() {
        let (_dir, store) = sqlite_store().await;
        let now = Utc::now();
        let inc = Incident::sample(Phase::Executing, now);
        let mut tx = store.begin().await.unwrap();
        tx.insert_incident(&inc).await.unwrap();
        tx.commit().await.unwrap();

        let mut stale = store.incident(&inc.id).await.unwrap().unwrap();
        assert!(store
            .claim(&inc.id, "replica-b", now, Duration::from_secs(30))
            .await
            .unwrap());
        // Another replica's batch applies an event that keeps the phase (its last alert
        // resolved while the rollback runs) and saves its copy.
        stale.updated_at = now;
        let mut tx = store.begin().await.unwrap();
        assert!(tx.save_incident(&stale).await.unwrap(), "the version still matches");
        tx.commit().await.unwrap();
        let after = store.incident(&inc.id).await.unwrap().unwrap();
        assert_eq!(after.owner.as_deref(), Some("replica-b"));
        assert!(after.lease_until.is_some());
        assert!(
            !store
                .claim(&inc.id, "replica-c", now, Duration::from_secs(30))
                .await
                .unwrap(),
            "nobody else can take it"
        );

        // Settling ends the work and frees the lease.
        let mut done = after.clone();
        done.phase = Phase::Failed;
        let mut tx = store.begin().await.unwrap();
        assert!(tx.save_incident(&done).await.unwrap());
        tx.commit().await.unwrap();
        let settled = store.incident(&inc.id).await.unwrap().unwrap();
        assert_eq!(settled.owner, None);
        assert_eq!(settled.lease_until, None);
    }

    #[tokio::test]
    async fn the_deciding_transaction_takes_the_lease_at_the_version_it_wrote() {
        let (_dir, store) = sqlite_store().await;
        let now = Utc::now();
        let mut inc = Incident::sample(Phase::Executing, now);
        let mut tx = store.begin().await.unwrap();
        tx.insert_incident(&inc).await.unwrap();
        inc.owner = Some("replica-a".into());
        inc.lease_until = Some(now + chrono::Duration::seconds(30));
        assert!(tx.take_lease(&inc).await.unwrap());
        inc.version += 1;
        let mut stale = inc.clone();
        stale.version = 0;
        assert!(!tx.take_lease(&stale).await.unwrap(), "an older copy cannot");
        tx.commit().await.unwrap();
        let after = store.incident(&inc.id).await.unwrap().unwrap();
        assert_eq!(after.owner.as_deref(), Some("replica-a"));
        assert_eq!(after.version, 1);
    }
}
