//! A fresh PostgreSQL database per test, always PostgreSQL: for tests that run several
//! responder processes on one shared store, which SQLite (a file one process owns) cannot be.
//! Dropped (with its connections) when the test ends.

/// Used when TEST_DATABASE_URL is not a postgres URL (the SQLite pass of tests/run.sh): the
/// local PostgreSQL that tests/setup.sh always installs and starts, with trust/password auth.
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres:postgres@127.0.0.1:5432/postgres";

pub struct PgDb {
    /// URL of the test's own database.
    pub url: String,
    admin: String,
    name: String,
}

impl PgDb {
    /// Creates `rr_test_<uuid>` through TEST_DATABASE_URL, or [`DEFAULT_ADMIN_URL`] when that
    /// is not a postgres URL. Never skips: no PostgreSQL is a failure with the fix.
    pub async fn create() -> PgDb {
        let admin = match std::env::var("TEST_DATABASE_URL") {
            Ok(u) if u.starts_with("postgres") => u,
            _ => DEFAULT_ADMIN_URL.to_string(),
        };
        let name = format!("rr_test_{}", uuid::Uuid::now_v7().simple());
        sqlx::any::install_default_drivers();
        let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&admin)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL is required for multi-replica tests and not reachable at {admin}: {e}\n\
                     run `eval \"$(bash tests/setup.sh)\"` (installs and starts it)"
                )
            });
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create the test database");
        let base = admin
            .rsplit_once('/')
            .map(|(b, _)| b.to_string())
            .unwrap_or(admin.clone());
        PgDb {
            url: format!("{base}/{name}"),
            admin,
            name,
        }
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Its own runtime on its own thread: the test's runtime may be shutting down.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime for dropping the test database");
            rt.block_on(async {
                if let Ok(mut c) = <sqlx::AnyConnection as sqlx::Connection>::connect(&admin).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut c)
                        .await;
                }
            });
        })
        .join();
    }
}
