//! Fair order for the decision loop: the oldest pending alert of each Alertmanager group, found
//! with a loose index scan (one index probe per group, whatever the backlog), so a group's flood
//! never holds up another group's alert.

use sqlx::Row;

use super::{Result, Store};

impl Store {
    /// The oldest pending alert of up to `limit` groups, taking groups in key order after
    /// `after` (a rotating cursor, so every group gets its turn), as `(group_key, alert id)`.
    pub async fn pending_group_heads(&self, after: &str, limit: i64) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "WITH RECURSIVE g(k, n) AS (
                 SELECT (SELECT MIN(group_key) FROM alerts WHERE pending = 1 AND group_key > $1), 1
                 UNION ALL
                 SELECT (SELECT MIN(group_key) FROM alerts WHERE pending = 1 AND group_key > g.k), g.n + 1
                 FROM g WHERE g.k IS NOT NULL AND g.n < $2
             )
             SELECT k, (SELECT MIN(id) FROM alerts WHERE pending = 1 AND group_key = g.k) AS head
             FROM g WHERE k IS NOT NULL",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .filter_map(|r| {
                let k: std::result::Result<String, _> = r.try_get(0);
                let id: std::result::Result<Option<i64>, _> = r.try_get(1);
                match (k, id) {
                    (Ok(k), Ok(Some(id))) => Some(Ok((k, id))),
                    (Ok(_), Ok(None)) => None,
                    (Err(e), _) | (_, Err(e)) => Some(Err(e.into())),
                }
            })
            .collect()
    }
}
