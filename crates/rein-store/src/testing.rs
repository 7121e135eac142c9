//! Test support (feature `testing`): a PostgreSQL schema of its own per test, on the server
//! the tests use (`REIN_TEST_POSTGRES`, else `postgres://postgres@127.0.0.1:5432/test`), so
//! tests run side by side and leave nothing behind.

use crate::StoreError;

/// Where the PostgreSQL tests connect.
pub fn postgres_url() -> String {
    std::env::var("REIN_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// A fresh, empty schema; [`TestSchema::url`] points a store (or a `rein` process) at it.
#[derive(Debug)]
pub struct TestSchema {
    server: String,
    name: String,
}

impl TestSchema {
    /// Creates the schema. Fails with a message naming the server when it is not reachable.
    pub async fn create() -> Result<Self, StoreError> {
        let server = postgres_url();
        let name = format!(
            "rein_test_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let admin = sqlx::PgPool::connect(&server).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}")))
            .execute(&admin)
            .await?;
        admin.close().await;
        Ok(TestSchema { server, name })
    }

    /// The server's URL with this schema as the search path.
    pub fn url(&self) -> String {
        let sep = if self.server.contains('?') { '&' } else { '?' };
        format!(
            "{}{sep}options=-c%20search_path%3D{}",
            self.server, self.name
        )
    }

    /// How many connections listen for the announcements of the stores on this schema.
    pub async fn listeners(&self) -> Result<i64, StoreError> {
        let admin = sqlx::PgPool::connect(&self.server).await?;
        let count = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN %' AND strpos(query, $1) > 0",
        )
        .bind(format!("rein {}", self.name))
        .fetch_one(&admin)
        .await?;
        admin.close().await;
        Ok(count)
    }

    /// Drops the schema and everything in it.
    pub async fn drop_schema(self) -> Result<(), StoreError> {
        let admin = sqlx::PgPool::connect(&self.server).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA {} CASCADE",
            self.name
        )))
        .execute(&admin)
        .await?;
        admin.close().await;
        Ok(())
    }
}
