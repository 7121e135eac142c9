//! Rein's durable store: runs and their hash-chained event logs, in one SQLite file.
//!
//! The event log is the source of truth; the `runs` row is a projection of it, derived by the
//! database from each appended event within the appending statement, so listings never
//! disagree with the log. Every query takes the caller's tenant: a run of another tenant is
//! simply not found.
//!
//! This crate depends on the core for event and run types; it must never depend on providers,
//! tools or the driver.

mod counters;

use rein_core::{
    GENESIS_HASH, JobId, RunId, RunStatus, SealedEvent, SessionId, TenantId, TerminationReason,
    Usage, Usd, UserId,
};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

/// What can go wrong talking to the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened, read or written.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The schema could not be brought up to date.
    #[error(transparent)]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// Someone else appended at this position first (two writers on one run).
    #[error("run {run_id}: event {seq} was already written by another writer")]
    Conflict {
        /// Run.
        run_id: RunId,
        /// Position.
        seq: u64,
    },
    /// No such run for this tenant.
    #[error("run {0} not found")]
    NotFound(RunId),
    /// A stored value is not what Rein wrote.
    #[error("run {run_id}: stored {field} is unreadable: {message}")]
    Corrupt {
        /// Run.
        run_id: RunId,
        /// Column.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// How `SqliteStore::costs` groups spend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CostGroup {
    /// By tenant.
    Tenant,
    /// By user.
    User,
    /// By agent.
    Agent,
    /// By the model that answered.
    Model,
    /// By UTC day of the call.
    Day,
}

/// Spend of one group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CostLine {
    /// The group's key (tenant, user, agent, model or `YYYY-MM-DD`; across tenants a user is
    /// `tenant/user`, since user ids are only unique within their tenant).
    pub key: String,
    /// Model calls answered.
    pub calls: u64,
    /// Tokens used.
    pub usage: Usage,
    /// Money spent.
    pub cost: Usd,
}

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

/// What a run is, fixed when it is created.
#[derive(Clone, Debug, PartialEq)]
pub struct RunInfo {
    /// Id (UUIDv7).
    pub id: RunId,
    /// Owner.
    pub tenant: TenantId,
    /// Attributed user.
    pub user: UserId,
    /// Session.
    pub session: SessionId,
    /// Optional job.
    pub job: Option<JobId>,
    /// Agent name.
    pub agent: String,
    /// Agent version.
    pub agent_version: u32,
    /// Spec source pinned by the run.
    pub spec: String,
    /// The input.
    pub input: String,
    /// Creation time, ms since the epoch.
    pub created_ms: i64,
}

/// A run's counters and outcome, as projected from its log.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    /// Status.
    pub status: RunStatus,
    /// Termination reason, once finished.
    pub reason: Option<TerminationReason>,
    /// Detail of the termination, once finished.
    pub detail: Option<String>,
    /// Final output, once completed.
    pub output: Option<serde_json::Value>,
    /// Model calls answered (responded or failed).
    pub iterations: u32,
    /// Tool calls made or refused.
    pub tool_calls: u32,
    /// Tokens used.
    pub usage: Usage,
    /// Money spent.
    pub cost: Usd,
}

/// A stored run, as listed and shown.
#[derive(Clone, Debug, PartialEq)]
pub struct RunRecord {
    /// What the run is.
    pub info: RunInfo,
    /// State after the last event.
    pub progress: Progress,
    /// Events written.
    pub event_count: u64,
    /// Hash of the last event.
    pub head_hash: String,
    /// Last event, ms since the epoch.
    pub updated_ms: i64,
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
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    reader: SqlitePool,
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
            .connect_with(options.clone())
            .await?;
        MIGRATOR.run(&pool).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        Ok(SqliteStore { pool, reader })
    }

    /// Flushes the write-ahead log into the main file and closes every connection.
    pub async fn close(&self) {
        let _ = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.pool)
            .await;
        self.pool.close().await;
    }

    /// Records a new run together with the first events of its log (`run_started`, and the
    /// session context it starts from) in one transaction: a run is never stored without the
    /// events that start it, so a process killed at any point leaves either nothing or a run
    /// that can be resumed.
    /// `lease` is `None` for a queued run (a worker will claim it), or its holder and expiry.
    pub async fn create_run(
        &self,
        run: &RunInfo,
        first: &[SealedEvent],
        lease: Option<Lease<'_>>,
    ) -> Result<(), StoreError> {
        let starts = first
            .first()
            .is_some_and(|e| e.seq == 0 && e.kind == "run_started");
        if !starts || first.iter().any(|e| e.run_id != run.id) {
            return Err(StoreError::Conflict {
                run_id: run.id.clone(),
                seq: 0,
            });
        }
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
        for event in first {
            insert_event(&mut *tx, &run.tenant, event).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Appends one sealed event; the run's summary row follows from it atomically (see the
    /// `events_update_run` trigger). One statement, one commit: appends are on every step's
    /// critical path.
    ///
    /// Fails with [`StoreError::Conflict`] if the run is not `tenant`'s or its log does not end
    /// just before `event.seq` (another writer got there first), so two writers can never
    /// interleave events in one run.
    pub async fn append(&self, tenant: &TenantId, event: &SealedEvent) -> Result<(), StoreError> {
        insert_event(&self.pool, tenant, event).await
    }

    /// Claims the oldest run a worker may drive: a queued one, a running one whose lease
    /// expired (its holder died), or one awaiting an approval that timed out (so its policy
    /// happens). One statement, so two workers never claim the same run.
    pub async fn claim(
        &self,
        lease: Lease<'_>,
        now_ms: i64,
    ) -> Result<Option<(TenantId, RunId)>, StoreError> {
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
        row.map(|r| {
            Ok((
                TenantId::new(r.try_get::<String, _>("tenant")?),
                RunId::new(r.try_get::<String, _>("id")?),
            ))
        })
        .transpose()
    }

    /// Takes the lease on `run` for `lease.owner` if no one else holds a live one; `false` when
    /// another process is driving it.
    pub async fn acquire(
        &self,
        run: &RunId,
        lease: Lease<'_>,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
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
    }

    /// Extends `lease.owner`'s lease on `run`; `false` when the lease is no longer theirs.
    pub async fn renew(&self, run: &RunId, lease: Lease<'_>) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE runs SET lease_until_ms = ? WHERE id = ? AND lease_owner = ? AND status IN ('running', 'queued', 'awaiting_approval')",
        )
        .bind(lease.until_ms)
        .bind(run.as_str())
        .bind(lease.owner)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives `owner`'s lease on `run` up (the run finished, or waits for a person).
    pub async fn release(&self, run: &RunId, owner: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE runs SET lease_until_ms = 0 WHERE id = ? AND lease_owner = ?")
            .bind(run.as_str())
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// How many runs, of every tenant, are queued or running (an operator's view for workers).
    pub async fn unfinished(&self) -> Result<u64, StoreError> {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM runs WHERE status IN ('queued', 'running')")
                .fetch_one(&self.reader)
                .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The newest run of `tenant`'s `session`, if any.
    pub async fn latest_in_session(
        &self,
        tenant: &TenantId,
        session: &SessionId,
    ) -> Result<Option<RunRecord>, StoreError> {
        let row = sqlx::query(select_runs!(
            "WHERE tenant = ? AND session_id = ? ORDER BY created_ms DESC, id DESC LIMIT 1"
        ))
        .bind(tenant.as_str())
        .bind(session.as_str())
        .fetch_optional(&self.reader)
        .await?;
        row.map(|r| run_from_row(&r)).transpose()
    }

    /// One run of `tenant`.
    pub async fn run(&self, tenant: &TenantId, id: &RunId) -> Result<RunRecord, StoreError> {
        let row = sqlx::query(select_runs!("WHERE tenant = ? AND id = ?"))
            .bind(tenant.as_str())
            .bind(id.as_str())
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(|| StoreError::NotFound(id.clone()))?;
        run_from_row(&row)
    }

    /// The newest runs of `tenant`, newest first.
    pub async fn list_runs(
        &self,
        tenant: &TenantId,
        status: Option<RunStatus>,
        limit: u32,
    ) -> Result<Vec<RunRecord>, StoreError> {
        let status = status.map(RunStatus::as_str);
        let rows = sqlx::query(select_runs!(
            "WHERE tenant = ? AND (? IS NULL OR status = ?) ORDER BY created_ms DESC, id DESC LIMIT ?"
        ))
        .bind(tenant.as_str())
        .bind(status)
        .bind(status)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    /// The ids of every run of `tenant`, oldest first (for audits).
    pub async fn run_ids(&self, tenant: &TenantId) -> Result<Vec<RunId>, StoreError> {
        let rows = sqlx::query("SELECT id FROM runs WHERE tenant = ? ORDER BY created_ms, id")
            .bind(tenant.as_str())
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|r| Ok(RunId::new(r.try_get::<String, _>("id")?)))
            .collect()
    }

    /// Every tenant that owns at least one run (operator audits only: this is the one query
    /// that is not scoped to a tenant).
    pub async fn tenants(&self) -> Result<Vec<TenantId>, StoreError> {
        let rows = sqlx::query("SELECT DISTINCT tenant FROM runs ORDER BY tenant")
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|r| Ok(TenantId::new(r.try_get::<String, _>("tenant")?)))
            .collect()
    }

    /// Spend from recorded model calls since `since_ms`, grouped: for one tenant, or for every
    /// tenant when `tenant` is `None` (an operator query).
    pub async fn costs(
        &self,
        tenant: Option<&TenantId>,
        group: CostGroup,
        since_ms: i64,
    ) -> Result<Vec<CostLine>, StoreError> {
        let rows = sqlx::query(cost_sql(group, tenant.is_none()))
            .bind(since_ms)
            .bind(tenant.map(TenantId::as_str))
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|r| {
                let n = |name: &str| -> Result<u64, sqlx::Error> {
                    Ok(r.try_get::<i64, _>(name)?.max(0) as u64)
                };
                Ok(CostLine {
                    key: r.try_get::<Option<String>, _>("key")?.unwrap_or_default(),
                    calls: n("calls")?,
                    usage: Usage {
                        input_tokens: n("input_tokens")?,
                        cached_input_tokens: n("cached_input_tokens")?,
                        cache_write_tokens: 0,
                        output_tokens: n("output_tokens")?,
                    },
                    cost: Usd::from_micros(r.try_get("micros")?),
                })
            })
            .collect()
    }

    /// Runs that have events but no run row (its row was removed behind Rein's back).
    /// An operator query for audits, like [`SqliteStore::tenants`].
    pub async fn orphaned_logs(&self) -> Result<Vec<RunId>, StoreError> {
        let rows = sqlx::query(
            "SELECT DISTINCT run_id FROM events WHERE run_id NOT IN (SELECT id FROM runs) ORDER BY run_id",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| Ok(RunId::new(r.try_get::<String, _>("run_id")?)))
            .collect()
    }

    /// A run's events in log order.
    pub async fn events(
        &self,
        tenant: &TenantId,
        id: &RunId,
    ) -> Result<Vec<SealedEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT e.seq, e.ts_ms, e.kind, e.payload, e.payload_sha256, e.prev_hash, e.hash
             FROM events e JOIN runs r ON r.id = e.run_id
             WHERE r.tenant = ? AND e.run_id = ? ORDER BY e.seq",
        )
        .bind(tenant.as_str())
        .bind(id.as_str())
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(SealedEvent {
                    run_id: id.clone(),
                    seq: r.try_get::<i64, _>("seq")?.max(0) as u64,
                    ts_ms: r.try_get("ts_ms")?,
                    kind: r.try_get("kind")?,
                    payload: r.try_get("payload")?,
                    payload_sha256: r.try_get("payload_sha256")?,
                    prev_hash: r.try_get("prev_hash")?,
                    hash: r.try_get("hash")?,
                })
            })
            .collect()
    }
}

fn parse_enum<T: for<'de> serde::Deserialize<'de>>(
    id: &RunId,
    field: &'static str,
    text: &str,
) -> Result<T, StoreError> {
    serde_json::from_value(serde_json::Value::String(text.to_string())).map_err(|e| {
        StoreError::Corrupt {
            run_id: id.clone(),
            field,
            message: e.to_string(),
        }
    })
}

fn run_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<RunRecord, StoreError> {
    let id = RunId::new(r.try_get::<String, _>("id")?);
    let status: String = r.try_get("status")?;
    let reason: Option<String> = r.try_get("termination_reason")?;
    let output: Option<String> = r.try_get("output")?;
    let output = output
        .map(|o| serde_json::from_str(&o))
        .transpose()
        .map_err(|e| StoreError::Corrupt {
            run_id: id.clone(),
            field: "output",
            message: e.to_string(),
        })?;
    let count =
        |name: &str| -> Result<u64, sqlx::Error> { Ok(r.try_get::<i64, _>(name)?.max(0) as u64) };
    let info = RunInfo {
        id: id.clone(),
        tenant: TenantId::new(r.try_get::<String, _>("tenant")?),
        user: UserId::new(r.try_get::<String, _>("user_id")?),
        session: SessionId::new(r.try_get::<String, _>("session_id")?),
        job: r.try_get::<Option<String>, _>("job_id")?.map(JobId::new),
        agent: r.try_get("agent")?,
        agent_version: count("agent_version")? as u32,
        spec: r.try_get("spec")?,
        input: r.try_get("input")?,
        created_ms: r.try_get("created_ms")?,
    };
    Ok(RunRecord {
        progress: Progress {
            status: parse_enum(&id, "status", &status)?,
            reason: reason
                .map(|r| parse_enum(&id, "termination_reason", &r))
                .transpose()?,
            detail: r.try_get("detail")?,
            output,
            iterations: count("iterations")? as u32,
            tool_calls: count("tool_calls")? as u32,
            usage: Usage {
                input_tokens: count("input_tokens")?,
                cached_input_tokens: count("cached_input_tokens")?,
                cache_write_tokens: 0,
                output_tokens: count("output_tokens")?,
            },
            cost: Usd::from_micros(r.try_get("cost_micros")?),
        },
        event_count: count("event_count")?,
        head_hash: r.try_get("head_hash")?,
        updated_ms: r.try_get("updated_ms")?,
        info,
    })
}

/// Who drives a run, and until when (ms since the epoch) unless renewed.
#[derive(Clone, Copy, Debug)]
pub struct Lease<'a> {
    /// The holder (a worker's or process's id).
    pub owner: &'a str,
    /// Expiry.
    pub until_ms: i64,
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

#[cfg(test)]
mod tests {
    use super::*;
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

    fn progress() -> Progress {
        Progress {
            status: RunStatus::Running,
            reason: None,
            detail: None,
            output: None,
            iterations: 0,
            tool_calls: 0,
            usage: Usage::default(),
            cost: Usd::ZERO,
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

    #[tokio::test]
    async fn events_round_trip_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("r.db"), Durability::Process)
            .await
            .unwrap();
        let t1 = TenantId::new("t1");
        let first = started(0).seal(&RunId::new("r1"), GENESIS_HASH);
        store
            .create_run(&new_run("r1", "t1"), std::slice::from_ref(&first), None)
            .await
            .unwrap();
        let finished = Event {
            seq: 1,
            ts_ms: 11,
            kind: EventKind::RunFinished {
                status: RunStatus::Completed,
                reason: TerminationReason::Completed,
                detail: None,
                output: Some(serde_json::json!({"a": 1})),
            },
        };
        let second = finished.seal(&RunId::new("r1"), &first.hash);
        store.append(&t1, &second).await.unwrap();
        let mut done = progress();
        done.status = RunStatus::Completed;
        done.reason = Some(TerminationReason::Completed);
        done.output = Some(serde_json::json!({"a": 1}));

        let events = store.events(&t1, &RunId::new("r1")).await.unwrap();
        assert_eq!(events, vec![first, second.clone()]);
        let run = store.run(&t1, &RunId::new("r1")).await.unwrap();
        assert_eq!(run.progress, done);
        assert_eq!(run.event_count, 2);
        assert_eq!(run.head_hash, second.hash);
        rein_core::verify_chain(&events, Some((run.event_count, &run.head_hash))).unwrap();
    }

    #[tokio::test]
    async fn a_second_writer_at_the_same_position_is_refused() {
        let store = SqliteStore::in_memory().await.unwrap();
        let t1 = TenantId::new("t1");
        let first = started(0).seal(&RunId::new("r1"), GENESIS_HASH);
        store
            .create_run(&new_run("r1", "t1"), std::slice::from_ref(&first), None)
            .await
            .unwrap();
        let err = store.append(&t1, &first).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict { seq: 0, .. }), "{err}");
    }

    #[tokio::test]
    async fn a_run_is_claimed_by_one_worker_and_taken_over_only_once_its_lease_expires() {
        let store = SqliteStore::in_memory().await.unwrap();
        let first = started(0).seal(&RunId::new("r1"), GENESIS_HASH);
        store
            .create_run(&new_run("r1", "t1"), std::slice::from_ref(&first), None)
            .await
            .unwrap();
        let lease = |owner, until_ms| Lease { owner, until_ms };
        let claimed = store.claim(lease("w1", 1_000), 1).await.unwrap();
        assert_eq!(claimed, Some((TenantId::new("t1"), RunId::new("r1"))));
        assert_eq!(
            store.claim(lease("w2", 1_000), 10).await.unwrap(),
            None,
            "w1 holds it"
        );
        let r1 = RunId::new("r1");
        assert!(!store.acquire(&r1, lease("w2", 2_000), 500).await.unwrap());
        assert!(store.renew(&r1, lease("w1", 1_500)).await.unwrap());
        assert_eq!(
            store.claim(lease("w2", 3_000), 1_200).await.unwrap(),
            None,
            "renewed"
        );
        // w1 died: once its lease runs out, w2 takes the run over, and w1 cannot renew it.
        let taken = store.claim(lease("w2", 3_000), 1_600).await.unwrap();
        assert_eq!(taken.map(|(_, id)| id), Some(r1.clone()));
        assert!(!store.renew(&r1, lease("w1", 4_000)).await.unwrap());
        assert_eq!(store.unfinished().await.unwrap(), 1);
    }

    #[tokio::test]
    async fn another_tenants_runs_are_invisible() {
        let store = SqliteStore::in_memory().await.unwrap();
        let first = started(0).seal(&RunId::new("r1"), GENESIS_HASH);
        store
            .create_run(&new_run("r1", "t1"), std::slice::from_ref(&first), None)
            .await
            .unwrap();
        let other = TenantId::new("t2");
        assert!(matches!(
            store.run(&other, &RunId::new("r1")).await,
            Err(StoreError::NotFound(_))
        ));
        assert!(store.list_runs(&other, None, 10).await.unwrap().is_empty());
        assert!(
            store.append(&other, &first).await.is_err(),
            "cannot write into another tenant's run"
        );
        assert!(
            store
                .events(&other, &RunId::new("r1"))
                .await
                .unwrap()
                .is_empty()
        );
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
