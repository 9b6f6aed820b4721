//! The `freezes` table: the kill switch set at run time (API, Slack), global (`*`) or per
//! policy, with an optional end.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{could_be_stored, ms, opt_ms, storable, Result, Store};
use crate::policy::{Freeze, FreezeState};

impl Store {
    /// Freezes in force (the kill switch).
    pub async fn freezes(&self, now: DateTime<Utc>) -> Result<FreezeState> {
        let rows =
            sqlx::query("SELECT scope, reason, by_whom, until_at FROM freezes WHERE until_at IS NULL OR until_at > $1")
                .bind(ms(now))
                .fetch_all(&self.pool)
                .await?;
        let mut state = FreezeState::default();
        for r in rows {
            let scope: String = r.try_get("scope")?;
            let f = Freeze {
                reason: r.try_get("reason")?,
                by: r.try_get("by_whom")?,
                until: opt_ms(r.try_get("until_at")?),
            };
            if scope == "*" {
                state.global = Some(f);
            } else {
                state.policies.insert(scope, f);
            }
        }
        Ok(state)
    }

    /// Sets or replaces a freeze; `scope` is `*` (global) or a policy name.
    pub async fn freeze(&self, scope: &str, f: &Freeze, now: DateTime<Utc>) -> Result<()> {
        sqlx::query(
            "INSERT INTO freezes (scope, reason, by_whom, at, until_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (scope) DO UPDATE SET reason = excluded.reason, by_whom = excluded.by_whom, at = excluded.at, until_at = excluded.until_at",
        )
        .bind(storable(scope))
        .bind(storable(&f.reason))
        .bind(storable(&f.by))
        .bind(ms(now))
        .bind(f.until.map(ms))
        .execute(&self.pool)
        .await?;
        self.durable().await?;
        Ok(())
    }

    /// Lifts a freeze; true if there was one.
    pub async fn unfreeze(&self, scope: &str) -> Result<bool> {
        if !could_be_stored(scope) {
            return Ok(false);
        }
        let r = sqlx::query("DELETE FROM freezes WHERE scope = $1")
            .bind(scope)
            .execute(&self.pool)
            .await?;
        self.durable().await?;
        Ok(r.rows_affected() > 0)
    }
}
