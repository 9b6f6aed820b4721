//! The store's connections and readiness: a connection whose transaction state is in doubt
//! is closed, never reused; the readiness check answers within a bound whatever the database
//! does.

/// Whether a connection coming back to the pool may be used again: only when no transaction
/// is left on it. A transaction that failed to commit, or whose statements failed, may have
/// been rolled back by the database itself (SQLite does so on a full disk) while sqlx still
/// counts it as open; its rollback then fails too, and sqlx would open the next "transaction"
/// on that connection as a savepoint whose release commits nothing, or inside a transaction
/// that never commits: deliveries answered 200 and lost. Such a connection is closed instead
/// (which rolls back whatever is left on it) and the pool opens a fresh one.
pub(super) async fn release_only_if_clean(conn: &mut sqlx::AnyConnection) -> std::result::Result<bool, sqlx::Error> {
    use sqlx::{Connection, TransactionManager};
    let depth =
        |conn: &sqlx::AnyConnection| <sqlx::Any as sqlx::Database>::TransactionManager::get_transaction_depth(conn);
    // Committed, or never in a transaction: nothing to check (the hot path, no round trip).
    if depth(conn) == 0 {
        return Ok(true);
    }
    // The rollback of a dropped transaction is queued, not done: a round trip lets it run
    // first, so the depth read next is the one it left.
    conn.ping().await?;
    let depth = depth(conn);
    if depth != 0 {
        tracing::warn!(
            depth,
            "a store connection came back with a transaction it could not end; closing it"
        );
        return Ok(false);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use crate::store::intake::tests::{delivery, sqlite_store};

    /// Whether the pool still hands out the connection that made the TEMP table `marker`.
    async fn same_connection(store: &crate::store::Store) -> bool {
        sqlx::query("SELECT COUNT(*) FROM temp.marker")
            .execute(&store.pool)
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_rolled_back_transaction_keeps_its_connection() {
        let (_dir, store) = sqlite_store().await;
        sqlx::query("CREATE TEMP TABLE marker (x INTEGER)")
            .execute(&store.pool)
            .await
            .unwrap();
        let tx = store.begin().await.unwrap();
        drop(tx);
        assert!(
            same_connection(&store).await,
            "a clean rollback needs no new connection"
        );
    }

    #[tokio::test]
    async fn a_transaction_the_database_ended_behind_sqlx_throws_its_connection_away() {
        let (dir, store) = sqlite_store().await;
        sqlx::query("CREATE TEMP TABLE marker (x INTEGER)")
            .execute(&store.pool)
            .await
            .unwrap();
        // What SQLite does on a full disk: it rolls the transaction back itself, and the
        // COMMIT fails; sqlx still counts the transaction as open.
        let mut tx = store.begin().await.unwrap();
        sqlx::query("ROLLBACK").execute(&mut *tx.tx).await.unwrap();
        assert!(tx.commit().await.is_err());
        assert!(!same_connection(&store).await, "the connection was closed");
        // The next delivery is committed for real: another connection sees it.
        let stats = store
            .ingest(&delivery(&["a1b2c3d4e5f60718"]), Utc::now())
            .await
            .unwrap();
        assert_eq!(stats.stored, 1);
        let url = format!("sqlite://{}", dir.path().join("s.db").display());
        let mut other = <sqlx::AnyConnection as sqlx::Connection>::connect(&url).await.unwrap();
        let n: i64 = sqlx::Row::get(
            &sqlx::query("SELECT COUNT(*) FROM alerts")
                .fetch_one(&mut other)
                .await
                .unwrap(),
            0,
        );
        assert_eq!(n, 1, "answered as stored, so committed");
    }
}
