//! The embedded engine: one SQLite file (WAL), the default store.

use crate::{
    API_KEY_ID_LEN, ApiKeyEntry, Columns, CostGroup, CostLine, Lease, RunFilter, RunInfo,
    RunRecord, Store, StoreError, StoredAgent, TenantEntry, agent_from_row, api_key_from_row,
    check_first, cost_from_row, event_from_row, run_from_row, tenant_from_row,
};
use rein_core::budget::BoxFuture;
use rein_core::{GENESIS_HASH, JobId, RunId, RunStatus, SealedEvent, SessionId, TenantId, UserId};
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// `SELECT <group>, totals FROM model_responded events of <tenants> since ? GROUP BY <group>`,
/// one static statement per grouping: SQL text never carries runtime values.
macro_rules! cost_query {
    ($group:literal, $tenant_filter:literal) => {
        concat!(
            "SELECT ", $group, " AS key, count(*) AS calls,
                    coalesce(sum(e.payload ->> '$.usage.input_tokens'), 0) AS input_tokens,
                    coalesce(sum(e.payload ->> '$.usage.cached_input_tokens'), 0) AS cached_input_tokens,
                    coalesce(sum(e.payload ->> '$.usage.output_tokens'), 0) AS output_tokens,
                    coalesce(sum(e.payload ->> '$.cost'), 0) AS micros
             FROM events e JOIN runs r ON r.id = e.run_id
             WHERE e.kind = 'model_responded' AND e.ts_ms >= ? AND ", $tenant_filter, "
             GROUP BY key ORDER BY micros DESC, key"
        )
    };
}

fn cost_sql(group: CostGroup, all_tenants: bool) -> &'static str {
    match (group, all_tenants) {
        (CostGroup::Tenant, false) => cost_query!("r.tenant", "r.tenant = ?"),
        (CostGroup::User, false) => cost_query!("r.user_id", "r.tenant = ?"),
        (CostGroup::Agent, false) => cost_query!("r.agent", "r.tenant = ?"),
        (CostGroup::Model, false) => cost_query!("e.payload ->> '$.model'", "r.tenant = ?"),
        (CostGroup::Day, false) => cost_query!("date(e.ts_ms / 1000, 'unixepoch')", "r.tenant = ?"),
        (CostGroup::Tenant, true) => cost_query!("r.tenant", "? IS NULL"),
        (CostGroup::User, true) => cost_query!("r.tenant || '/' || r.user_id", "? IS NULL"),
        (CostGroup::Agent, true) => cost_query!("r.agent", "? IS NULL"),
        (CostGroup::Model, true) => cost_query!("e.payload ->> '$.model'", "? IS NULL"),
        (CostGroup::Day, true) => cost_query!("date(e.ts_ms / 1000, 'unixepoch')", "? IS NULL"),
    }
}

/// How hard SQLite works to make a commit survive.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// WAL with `synchronous=NORMAL`: every committed event survives a crash of the process;
    /// a power loss may lose the last few commits (never corrupts). The default.
    #[default]
    Process,
    /// WAL with `synchronous=FULL`: every committed event also survives a power loss, at the
    /// cost of an fsync per event.
    PowerLoss,
}

/// The SQLite store.
///
/// SQLite allows one writer at a time, so all writes go through a single connection (queued
/// in order, never spinning on `SQLITE_BUSY`), while reads use a small pool of their own that
/// WAL lets run beside the writer.
///
/// The writer never checkpoints the write-ahead log itself (a checkpoint in the middle of a
/// write stalls that write, and every write queued behind it, for milliseconds): a background
/// task does, on a connection of its own, every [`CHECKPOINT_EVERY`].
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pub(crate) pool: SqlitePool,
    pub(crate) reader: SqlitePool,
    /// The checkpointing task, stopped when the last clone of the store goes.
    checkpointer: Option<Arc<Checkpointer>>,
}

/// How often the write-ahead log is copied into the database file.
pub const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// The background checkpointing task; aborted on drop.
#[derive(Debug)]
struct Checkpointer(tokio::task::JoinHandle<()>);

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Checkpointer {
    /// Checkpoints `pool`'s database every [`CHECKPOINT_EVERY`], without waiting for readers or
    /// the writer (`PASSIVE`): what it cannot copy now it copies next time.
    fn start(pool: SqlitePool) -> Self {
        Checkpointer(tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // Busy (another process is checkpointing) or failing: the next tick tries again,
                // and the log only grows meanwhile.
                let _ = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                    .execute(&pool)
                    .await;
            }
        }))
    }
}

/// `SELECT <every run column> FROM runs <tail>`, built at compile time: SQL text never
/// contains runtime values, which always go through `bind`.
macro_rules! select_runs {
    ($tail:literal) => {
        concat!(
            "SELECT id, tenant, user_id, session_id, job_id, agent, agent_version, spec, input, status, ",
            "termination_reason, detail, output, iterations, tool_calls, input_tokens, cached_input_tokens, ",
            "output_tokens, cost_micros, event_count, head_hash, created_ms, updated_ms FROM runs ",
            $tail
        )
    };
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

impl SqliteStore {
    /// Opens (creating if needed) the store at `path` and brings its schema up to date.
    pub async fn open(path: impl AsRef<Path>, durability: Durability) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match durability {
                Durability::Process => SqliteSynchronous::Normal,
                Durability::PowerLoss => SqliteSynchronous::Full,
            })
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        Self::connect(options).await
    }

    /// Opens a private in-memory store (tests, benchmarks of the engine alone).
    pub async fn in_memory() -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str("sqlite::memory:")?.foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(SqliteStore {
            reader: pool.clone(),
            pool,
            checkpointer: None,
        })
    }

    async fn connect(options: SqliteConnectOptions) -> Result<Self, StoreError> {
        // The writer is used back to back; pinging it before every acquire would add a round
        // trip to every append.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options.clone().pragma("wal_autocheckpoint", "0"))
            .await?;
        MIGRATOR.run(&pool).await?;
        let checkpoints = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        Ok(SqliteStore {
            pool,
            reader,
            checkpointer: Some(Arc::new(Checkpointer::start(checkpoints))),
        })
    }
}

impl Store for SqliteStore {
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(checkpointer) = &self.checkpointer {
                checkpointer.0.abort();
            }
            // Flush the write-ahead log into the main file first.
            let _ = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(&self.pool)
                .await;
            self.pool.close().await;
        })
    }

    fn create_run<'a>(
        &'a self,
        run: &'a RunInfo,
        first: &'a [SealedEvent],
        lease: Option<Lease<'a>>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            check_first(run, first)?;
            let mut tx = self.pool.begin().await?;
            sqlx::query(
                "INSERT INTO runs (id, tenant, user_id, session_id, job_id, agent, agent_version, spec, input, status, head_hash, created_ms, updated_ms, lease_owner, lease_until_ms)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(run.id.as_str())
            .bind(run.tenant.as_str())
            .bind(run.user.as_str())
            .bind(run.session.as_str())
            .bind(run.job.as_ref().map(JobId::as_str))
            .bind(&run.agent)
            .bind(i64::from(run.agent_version))
            .bind(&run.spec)
            .bind(&run.input)
            .bind(match lease {
                Some(_) => RunStatus::Running.as_str(),
                None => RunStatus::Queued.as_str(),
            })
            .bind(GENESIS_HASH)
            .bind(run.created_ms)
            .bind(run.created_ms)
            .bind(lease.map(|l| l.owner))
            .bind(lease.map_or(0, |l| l.until_ms))
            .execute(&mut *tx)
            .await?;
            match first {
                [one] => insert_event(&mut *tx, &run.tenant, one).await?,
                [head, ..] => insert_events(&mut *tx, &run.tenant, head, first).await?,
                [] => {}
            }
            tx.commit().await?;
            Ok(())
        })
    }

    // One statement, one commit: appends are on every step's critical path. The run's row
    // follows from the `events_update_run` triggers.
    fn append<'a>(
        &'a self,
        tenant: &'a TenantId,
        event: &'a SealedEvent,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(insert_event(&self.pool, tenant, event))
    }

    // One statement for all of them: on the single writer connection, each statement is a round
    // trip that every other write of the process waits behind.
    fn append_all<'a>(
        &'a self,
        tenant: &'a TenantId,
        events: &'a [SealedEvent],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            match events {
                [] => Ok(()),
                [one] => insert_event(&self.pool, tenant, one).await,
                [first, ..] => insert_events(&self.pool, tenant, first, events).await,
            }
        })
    }

    // One statement on the single writer connection, so two workers never claim one run.
    fn claim<'a>(
        &'a self,
        lease: Lease<'a>,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<Option<(TenantId, RunId)>, StoreError>> {
        Box::pin(async move {
            let row = sqlx::query(
                "UPDATE runs SET lease_owner = ?, lease_until_ms = ?
                 WHERE id = (SELECT id FROM runs
                             WHERE status IN ('queued', 'running') AND lease_until_ms < ?
                                OR (status = 'awaiting_approval' AND approval_expires_ms <= ? AND lease_until_ms < ?)
                             ORDER BY created_ms LIMIT 1)
                   AND (status IN ('queued', 'running') AND lease_until_ms < ?
                        OR (status = 'awaiting_approval' AND approval_expires_ms <= ? AND lease_until_ms < ?))
                 RETURNING tenant, id",
            )
            .bind(lease.owner)
            .bind(lease.until_ms)
            .bind(now_ms)
            .bind(now_ms)
            .bind(now_ms)
            .bind(now_ms)
            .bind(now_ms)
            .bind(now_ms)
            .fetch_optional(&self.pool)
            .await?;
            row.map(|r| Ok((TenantId::new(r.text("tenant")?), RunId::new(r.text("id")?))))
                .transpose()
        })
    }

    fn acquire<'a>(
        &'a self,
        run: &'a RunId,
        lease: Lease<'a>,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let done = sqlx::query(
                "UPDATE runs SET lease_owner = ?, lease_until_ms = ?,
                                 status = CASE status WHEN 'queued' THEN 'running' ELSE status END
                 WHERE id = ? AND (lease_until_ms < ? OR lease_owner = ?)",
            )
            .bind(lease.owner)
            .bind(lease.until_ms)
            .bind(run.as_str())
            .bind(now_ms)
            .bind(lease.owner)
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn renew<'a>(
        &'a self,
        run: &'a RunId,
        lease: Lease<'a>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let done = sqlx::query(
                "UPDATE runs SET lease_until_ms = ? WHERE id = ? AND lease_owner = ? AND status IN ('running', 'queued', 'awaiting_approval')",
            )
            .bind(lease.until_ms)
            .bind(run.as_str())
            .bind(lease.owner)
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn release<'a>(
        &'a self,
        run: &'a RunId,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            sqlx::query("UPDATE runs SET lease_until_ms = 0 WHERE id = ? AND lease_owner = ?")
                .bind(run.as_str())
                .bind(owner)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
    }

    fn unfinished(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM runs WHERE status IN ('queued', 'running')",
            )
            .fetch_one(&self.reader)
            .await?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }

    fn latest_in_session<'a>(
        &'a self,
        tenant: &'a TenantId,
        session: &'a SessionId,
    ) -> BoxFuture<'a, Result<Option<RunRecord>, StoreError>> {
        Box::pin(async move {
            let row = sqlx::query(select_runs!(
                "WHERE tenant = ? AND session_id = ? ORDER BY created_ms DESC, id DESC LIMIT 1"
            ))
            .bind(tenant.as_str())
            .bind(session.as_str())
            .fetch_optional(&self.reader)
            .await?;
            row.map(|r| run_from_row(&r)).transpose()
        })
    }

    fn run<'a>(
        &'a self,
        tenant: &'a TenantId,
        id: &'a RunId,
    ) -> BoxFuture<'a, Result<RunRecord, StoreError>> {
        Box::pin(async move {
            let row = sqlx::query(select_runs!("WHERE tenant = ? AND id = ?"))
                .bind(tenant.as_str())
                .bind(id.as_str())
                .fetch_optional(&self.reader)
                .await?
                .ok_or_else(|| StoreError::NotFound(id.clone()))?;
            run_from_row(&row)
        })
    }

    fn list_runs<'a>(
        &'a self,
        tenant: &'a TenantId,
        filter: &'a RunFilter,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<RunRecord>, StoreError>> {
        Box::pin(async move {
            let status = filter.status.map(RunStatus::as_str);
            let agent = filter.agent.as_deref();
            let user = filter.user.as_ref().map(UserId::as_str);
            let rows = sqlx::query(select_runs!(
                "WHERE tenant = ? AND (? IS NULL OR status = ?) AND (? IS NULL OR agent = ?) AND (? IS NULL OR user_id = ?)
                 ORDER BY created_ms DESC, id DESC LIMIT ?"
            ))
            .bind(tenant.as_str())
            .bind(status)
            .bind(status)
            .bind(agent)
            .bind(agent)
            .bind(user)
            .bind(user)
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
            rows.iter().map(run_from_row).collect()
        })
    }

    fn run_ids<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> BoxFuture<'a, Result<Vec<RunId>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query("SELECT id FROM runs WHERE tenant = ? ORDER BY created_ms, id")
                .bind(tenant.as_str())
                .fetch_all(&self.reader)
                .await?;
            rows.iter().map(|r| Ok(RunId::new(r.text("id")?))).collect()
        })
    }

    fn tenants(&self) -> BoxFuture<'_, Result<Vec<TenantId>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query("SELECT DISTINCT tenant FROM runs ORDER BY tenant")
                .fetch_all(&self.reader)
                .await?;
            rows.iter()
                .map(|r| Ok(TenantId::new(r.text("tenant")?)))
                .collect()
        })
    }

    fn costs<'a>(
        &'a self,
        tenant: Option<&'a TenantId>,
        group: CostGroup,
        since_ms: i64,
    ) -> BoxFuture<'a, Result<Vec<CostLine>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(cost_sql(group, tenant.is_none()))
                .bind(since_ms)
                .bind(tenant.map(TenantId::as_str))
                .fetch_all(&self.reader)
                .await?;
            rows.iter().map(cost_from_row).collect()
        })
    }

    fn orphaned_logs(&self) -> BoxFuture<'_, Result<Vec<RunId>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT DISTINCT run_id FROM events WHERE run_id NOT IN (SELECT id FROM runs) ORDER BY run_id",
            )
            .fetch_all(&self.reader)
            .await?;
            rows.iter()
                .map(|r| Ok(RunId::new(r.text("run_id")?)))
                .collect()
        })
    }

    fn events_from<'a>(
        &'a self,
        tenant: &'a TenantId,
        id: &'a RunId,
        from: u64,
    ) -> BoxFuture<'a, Result<Vec<SealedEvent>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT e.seq, e.ts_ms, e.kind, e.payload, e.payload_sha256, e.prev_hash, e.hash
                 FROM events e JOIN runs r ON r.id = e.run_id
                 WHERE r.tenant = ? AND e.run_id = ? AND e.seq >= ? ORDER BY e.seq",
            )
            .bind(tenant.as_str())
            .bind(id.as_str())
            .bind(i64::try_from(from).unwrap_or(i64::MAX))
            .fetch_all(&self.reader)
            .await?;
            rows.iter().map(|r| event_from_row(id, r)).collect()
        })
    }

    fn create_tenant<'a>(
        &'a self,
        tenant: &'a TenantId,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let done = sqlx::query(
                "INSERT INTO tenants (name, created_ms) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
            )
            .bind(tenant.as_str())
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn add_api_key<'a>(
        &'a self,
        tenant: &'a TenantId,
        key_sha256: &'a str,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let done = sqlx::query(
                "INSERT INTO api_keys (key_sha256, tenant, created_ms) SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM tenants WHERE name = ?)",
            )
            .bind(key_sha256)
            .bind(tenant.as_str())
            .bind(now_ms)
            .bind(tenant.as_str())
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn tenant_by_key<'a>(
        &'a self,
        key_sha256: &'a str,
    ) -> BoxFuture<'a, Result<Option<TenantId>, StoreError>> {
        Box::pin(async move {
            let row = sqlx::query("SELECT tenant FROM api_keys WHERE key_sha256 = ?")
                .bind(key_sha256)
                .fetch_optional(&self.reader)
                .await?;
            row.map(|r| Ok(TenantId::new(r.text("tenant")?)))
                .transpose()
        })
    }

    fn registered_tenants(&self) -> BoxFuture<'_, Result<Vec<TenantEntry>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT t.name, t.created_ms, (SELECT COUNT(*) FROM api_keys k WHERE k.tenant = t.name) AS keys FROM tenants t ORDER BY t.name",
            )
            .fetch_all(&self.reader)
            .await?;
            rows.iter().map(tenant_from_row).collect()
        })
    }

    fn api_keys<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> BoxFuture<'a, Result<Vec<ApiKeyEntry>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT key_sha256, created_ms FROM api_keys WHERE tenant = ? ORDER BY created_ms, key_sha256",
            )
            .bind(tenant.as_str())
            .fetch_all(&self.reader)
            .await?;
            rows.iter().map(api_key_from_row).collect()
        })
    }

    fn revoke_api_key<'a>(
        &'a self,
        tenant: &'a TenantId,
        key_id: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            if key_id.len() != API_KEY_ID_LEN {
                return Ok(false);
            }
            let done = sqlx::query(
                "DELETE FROM api_keys WHERE tenant = ? AND substr(key_sha256, 1, 16) = ?",
            )
            .bind(tenant.as_str())
            .bind(key_id)
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected() > 0)
        })
    }

    fn register_agent<'a>(
        &'a self,
        tenant: &'a TenantId,
        name: &'a str,
        spec: &'a str,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<u32, StoreError>> {
        Box::pin(async move {
            let version: i64 = sqlx::query_scalar(
                "INSERT INTO agents (tenant, name, version, spec, created_ms) SELECT ?, ?, coalesce(max(version), 0) + 1, ?, ? FROM agents WHERE tenant = ? AND name = ? RETURNING version",
            )
            .bind(tenant.as_str())
            .bind(name)
            .bind(spec)
            .bind(now_ms)
            .bind(tenant.as_str())
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
            Ok(u32::try_from(version).unwrap_or(u32::MAX))
        })
    }

    fn agent<'a>(
        &'a self,
        tenant: &'a TenantId,
        name: &'a str,
        version: Option<u32>,
    ) -> BoxFuture<'a, Result<Option<StoredAgent>, StoreError>> {
        Box::pin(async move {
            let version = version.map(i64::from);
            let row = sqlx::query(
                "SELECT name, version, spec, created_ms FROM agents WHERE tenant = ? AND name = ? AND (? IS NULL OR version = ?) ORDER BY version DESC LIMIT 1",
            )
            .bind(tenant.as_str())
            .bind(name)
            .bind(version)
            .bind(version)
            .fetch_optional(&self.reader)
            .await?;
            row.map(|r| agent_from_row(&r)).transpose()
        })
    }

    fn agents<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> BoxFuture<'a, Result<Vec<StoredAgent>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT a.name, a.version, a.spec, a.created_ms FROM agents a WHERE a.tenant = ? AND a.version = (SELECT max(version) FROM agents b WHERE b.tenant = a.tenant AND b.name = a.name) ORDER BY a.name",
            )
            .bind(tenant.as_str())
            .fetch_all(&self.reader)
            .await?;
            rows.iter().map(agent_from_row).collect()
        })
    }
}

/// Inserts `event` if it extends `tenant`'s run by exactly one (see [`SqliteStore::append`]).
async fn insert_event<'e>(
    executor: impl sqlx::Executor<'e, Database = sqlx::Sqlite>,
    tenant: &TenantId,
    event: &SealedEvent,
) -> Result<(), StoreError> {
    let seq = i64::try_from(event.seq).unwrap_or(i64::MAX);
    let inserted = sqlx::query(
        "INSERT INTO events (run_id, seq, ts_ms, kind, payload, payload_sha256, prev_hash, hash)
         SELECT ?, ?, ?, ?, ?, ?, ?, ?
         WHERE EXISTS (SELECT 1 FROM runs WHERE id = ? AND tenant = ? AND event_count = ?)",
    )
    .bind(event.run_id.as_str())
    .bind(seq)
    .bind(event.ts_ms)
    .bind(&event.kind)
    .bind(event.payload.as_deref())
    .bind(&event.payload_sha256)
    .bind(&event.prev_hash)
    .bind(&event.hash)
    .bind(event.run_id.as_str())
    .bind(tenant.as_str())
    .bind(seq)
    .execute(executor)
    .await;
    match inserted {
        Ok(done) if done.rows_affected() == 1 => Ok(()),
        Ok(_) => Err(StoreError::Conflict {
            run_id: event.run_id.clone(),
            seq: event.seq,
        }),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(StoreError::Conflict {
            run_id: event.run_id.clone(),
            seq: event.seq,
        }),
        Err(e) => Err(e.into()),
    }
}

/// Inserts consecutive events in one statement: all of them if the run is `tenant`'s and its log
/// ends just before the first (checked once, before the first row goes in), else none.
async fn insert_events<'e>(
    executor: impl sqlx::Executor<'e, Database = sqlx::Sqlite>,
    tenant: &TenantId,
    first: &SealedEvent,
    events: &[SealedEvent],
) -> Result<(), StoreError> {
    let conflict = || StoreError::Conflict {
        run_id: first.run_id.clone(),
        seq: first.seq,
    };
    // Consecutive positions of one run, or the batch is refused before it reaches the store.
    if !crate::consecutive(events) {
        return Err(conflict());
    }
    let mut query = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
        "INSERT INTO events (run_id, seq, ts_ms, kind, payload, payload_sha256, prev_hash, hash) SELECT * FROM (",
    );
    query.push_values(events, |mut row, event| {
        row.push_bind(event.run_id.as_str())
            .push_bind(i64::try_from(event.seq).unwrap_or(i64::MAX))
            .push_bind(event.ts_ms)
            .push_bind(&event.kind)
            .push_bind(event.payload.as_deref())
            .push_bind(&event.payload_sha256)
            .push_bind(&event.prev_hash)
            .push_bind(&event.hash);
    });
    query
        .push(") WHERE EXISTS (SELECT 1 FROM runs WHERE id = ")
        .push_bind(first.run_id.as_str())
        .push(" AND tenant = ")
        .push_bind(tenant.as_str())
        .push(" AND event_count = ")
        .push_bind(i64::try_from(first.seq).unwrap_or(i64::MAX))
        .push(")");
    let inserted = query.build().execute(executor).await;
    match inserted {
        Ok(done) if done.rows_affected() == events.len() as u64 => Ok(()),
        Ok(_) => Err(conflict()),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(conflict()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;
    use rein_core::UserId;
    use rein_core::{Event, EventKind};

    fn new_run(id: &str, tenant: &str) -> RunInfo {
        RunInfo {
            id: RunId::new(id),
            tenant: TenantId::new(tenant),
            user: UserId::new("u"),
            session: SessionId::new("s"),
            job: None,
            agent: "a".into(),
            agent_version: 1,
            spec: "name: a".into(),
            input: "hi".into(),
            created_ms: 1,
        }
    }

    fn started(seq: u64) -> Event {
        Event {
            seq,
            ts_ms: 10 + seq as i64,
            kind: EventKind::RunStarted {
                agent: "a".into(),
                agent_version: 1,
                spec_sha256: String::new(),
                input: "hi".into(),
                tenant: TenantId::new("t1"),
                user: UserId::new("u"),
                session: SessionId::new("s"),
                job: None,
                granted_scopes: Vec::new(),
            },
        }
    }

    /// The writer never checkpoints; the background task does, so the log is reused rather than
    /// growing for as long as the process writes.
    #[tokio::test]
    async fn the_write_ahead_log_is_checkpointed_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let store = SqliteStore::open(&path, Durability::Process).await.unwrap();
        let wal = dir.path().join("c.db-wal");
        let write = |from: usize| {
            let store = store.clone();
            async move {
                for i in from..from + 300 {
                    let id = format!("r{i}");
                    let first = started(0).seal(&RunId::new(&id), GENESIS_HASH);
                    store
                        .create_run(&new_run(&id, "t1"), std::slice::from_ref(&first), None)
                        .await
                        .unwrap();
                }
            }
        };
        write(0).await;
        let grown = std::fs::metadata(&wal).unwrap().len();
        assert!(grown > 0);
        // Three checkpoint periods: the log is copied into the database, and the writes that
        // follow start it over from the beginning instead of appending to it.
        tokio::time::sleep(CHECKPOINT_EVERY * 3).await;
        write(300).await;
        let after = std::fs::metadata(&wal).unwrap().len();
        assert!(
            after <= grown + grown / 5,
            "the log grew from {grown} to {after} bytes: it was not checkpointed"
        );
        store.close().await;
    }

    #[tokio::test]
    async fn stored_events_and_run_identities_cannot_be_changed_through_sql() {
        let store = SqliteStore::in_memory().await.unwrap();
        let first = started(0).seal(&RunId::new("r1"), GENESIS_HASH);
        store
            .create_run(&new_run("r1", "t1"), std::slice::from_ref(&first), None)
            .await
            .unwrap();
        assert!(
            sqlx::query("DELETE FROM events")
                .execute(&store.pool)
                .await
                .is_err()
        );
        assert!(
            sqlx::query("UPDATE events SET hash = 'x'")
                .execute(&store.pool)
                .await
                .is_err()
        );
        for forbidden in [
            "UPDATE events SET payload = NULL",
            "UPDATE runs SET tenant = 't2'",
            "DELETE FROM runs",
        ] {
            assert!(
                sqlx::query(forbidden).execute(&store.pool).await.is_err(),
                "{forbidden}"
            );
        }
        assert!(store.orphaned_logs().await.unwrap().is_empty());
    }
}
