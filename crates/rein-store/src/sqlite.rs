//! The embedded engine: one SQLite file (WAL), the default store.

use crate::SealedSecret;
use crate::appends::Announcer;
use crate::summary::Appended;
use crate::writer::{Setup, Writer};
use crate::{
    API_KEY_ID_LEN, ApiKeyEntry, Appends, Columns, CostGroup, CostLine, Hold, KeyGrant, Lease,
    RunCount, RunFilter, RunInfo, RunRecord, SecretEntry, Settlement, Store, StoreError,
    StoredAgent, TenantEntry, admin_entry_from_row, agent_from_row, anchor_from_row,
    anchored_run_from_row, api_key_from_row, api_key_id, check_first, cost_from_row,
    event_from_row, key_grant_from_row, run_from_row, secret_entry_from_row, tenant_from_row,
};
use rein_core::admin_log::{AdminAction, AdminChange, AdminEntry};
use rein_core::budget::{BoxFuture, Reservation, Standing};
use rein_core::{
    GENESIS_HASH, JobId, RunId, RunStatus, SealedEvent, SessionId, TenantId, TerminationReason,
    UserId,
};
use rusqlite::OptionalExtension;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use std::path::Path;
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
/// SQLite allows one writer at a time, so all writes go through a single connection on a
/// thread of its own that commits concurrent writes together ([`crate::writer`]; never spinning
/// on `SQLITE_BUSY`), while reads use a small pool of their own that WAL lets run beside it.
///
/// The writer never checkpoints the write-ahead log itself (a checkpoint in the middle of a
/// write stalls that write, and every write queued behind it, for milliseconds): a background
/// task does, on a connection of its own, every [`CHECKPOINT_EVERY`]; and when the log has
/// grown past [`CHECKPOINT_REST_FRAMES`] it copies the little written meanwhile with writes
/// held, so the log starts over (under steady writes it otherwise never would).
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pub(crate) writer: Arc<Writer>,
    pub(crate) reader: SqlitePool,
    /// The connection checkpoints run on (the background task's, and the last one on close).
    checkpoints: SqlitePool,
    /// The checkpointing task, stopped when the last clone of the store goes.
    checkpointer: Arc<Checkpointer>,
    /// This process's appends, for the runs' followers (other processes' are not heard).
    announcer: Announcer,
}

/// How often the write-ahead log is copied into the database file.
pub const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// The size of the write-ahead log (in pages) past which a checkpoint also copies the rest of
/// it while holding writes back for that long. The log starts over only after a checkpoint has
/// copied all of it, and a background checkpoint, which writes do not wait for, always leaves
/// behind what was written while it ran: under steady writes the log grew without end (a
/// gigabyte in ten seconds at 1,000 gateway calls a second).
pub const CHECKPOINT_REST_FRAMES: i64 = 4096;

/// At most this many pages are left to copy with writes held back.
const HELD_FRAMES: i64 = 256;

/// Writes are held back for a pass once the pass before it had at most this many pages to
/// copy beyond the one before (the pages written while that one ran): that pass was short, so
/// few pages were written during it and the held pass copies only those. A held pass costs two
/// `fsync`s whatever it copies, and every write waits meanwhile: holding right after the first
/// pass (which copies the whole log: 7 ms at 1,000 gateway calls a second) left about 140
/// pages to the held pass, 2 ms with writes held, five times a second.
const SHORT_PASS_FRAMES: i64 = 64;

/// Background passes per checkpoint before it gives up until the next: writes that outrun the
/// copying leave the log growing until they slow down.
const MAX_PASSES: usize = 8;

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
    /// the writer (`PASSIVE`): what it cannot copy now it copies next time. A log past
    /// [`CHECKPOINT_REST_FRAMES`] has the rest copied by `writer`, with writes held.
    fn start(pool: SqlitePool, writer: Arc<Writer>) -> Self {
        Checkpointer(tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // Busy (another process is checkpointing) or failing: the next tick tries again,
                // and the log only grows meanwhile. Each pass copies what was written while the
                // one before it ran; writes are held back only for the last, short one.
                let mut log_before: Option<i64> = None;
                for pass in 1..=MAX_PASSES {
                    let copied: Result<(i64, i64, i64), _> =
                        sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
                            .fetch_one(&pool)
                            .await;
                    let Ok((_, log_frames, copied_frames)) = copied else {
                        break;
                    };
                    if log_frames < CHECKPOINT_REST_FRAMES {
                        break;
                    }
                    let pages = Pass {
                        number: pass,
                        log: log_frames,
                        copied: copied_frames,
                        log_before,
                    };
                    log_before = Some(log_frames);
                    if pages.then_hold_writes() {
                        let _ = writer.checkpoint_rest().await;
                        break;
                    }
                }
            }
        }))
    }
}

/// What one background checkpoint pass found, in pages of the write-ahead log.
struct Pass {
    /// 1 for the first pass of a period.
    number: usize,
    /// The log's length when the pass began.
    log: i64,
    /// Copied into the database by it and the passes before.
    copied: i64,
    /// The log's length when the pass before began.
    log_before: Option<i64>,
}

impl Pass {
    /// Whether the next pass copies the rest of the log with writes held back (the log is
    /// past [`CHECKPOINT_REST_FRAMES`]): once little is left to copy, and this pass was short
    /// ([`SHORT_PASS_FRAMES`]) or is the last of the period (under writes that outrun the
    /// copying the log must still start over).
    fn then_hold_writes(&self) -> bool {
        let short = self
            .log_before
            .is_some_and(|before| self.log - before <= SHORT_PASS_FRAMES);
        self.log - self.copied <= HELD_FRAMES && (short || self.number == MAX_PASSES)
    }
}

/// Appends the admin log's entry for `change`, in the transaction that made it: SQLite's one
/// writer (per process; across processes, the database's write lock) serialises the appends,
/// and the log's primary key refuses a second entry at one position.
fn append_admin_entry(
    c: &rusqlite::Connection,
    change: &AdminChange<'_>,
    now_ms: i64,
) -> Result<(), StoreError> {
    let last: Option<(i64, String)> = c
        .prepare_cached("SELECT seq, hash FROM admin_log ORDER BY seq DESC LIMIT 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let last = last
        .as_ref()
        .map(|(seq, hash)| (u64::try_from(*seq).unwrap_or(0), hash.as_str()));
    let entry = AdminEntry::after(last, change, now_ms);
    c.prepare_cached(
        "INSERT INTO admin_log (seq, ts_ms, action, tenant, key_id, actor, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )?
    .execute(rusqlite::params![
        i64::try_from(entry.seq).unwrap_or(i64::MAX),
        entry.ts_ms,
        entry.action,
        entry.tenant,
        entry.key_id,
        entry.actor,
        entry.prev_hash,
        entry.hash,
    ])?;
    Ok(())
}

/// `SELECT <every run column> FROM runs <tail>`, built at compile time: SQL text never
/// contains runtime values, which always go through `bind`.
macro_rules! select_runs {
    ($tail:literal) => {
        concat!(
            "SELECT id, tenant, user_id, session_id, job_id, agent, agent_version, spec, input, status, ",
            "termination_reason, detail, output, iterations, tool_calls, input_tokens, cached_input_tokens, ",
            "output_tokens, cost_micros, event_count, head_hash, created_ms, updated_ms, cancel_requested_by, parent_run_id, lease_owner, lease_until_ms FROM runs ",
            $tail
        )
    };
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// How many times opening a store tries to bring its schema up to date.
const MIGRATION_TRIES: u64 = 10;

/// Brings the schema up to date. Another process opening the same new file at the same moment
/// may be applying the same migrations (SQLite has no lock for the migrator to take): one it
/// applied first fails here, its tables being there already, rolls back, and is found applied
/// on the next try, since each migration is one transaction with its record.
async fn migrate(options: &SqliteConnectOptions) -> Result<(), StoreError> {
    let mut tries = 1;
    loop {
        let done = async {
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(options.clone())
                .await?;
            let done = MIGRATOR.run(&pool).await;
            pool.close().await;
            Ok::<_, StoreError>(done?)
        }
        .await;
        match done {
            Err(e) if tries < MIGRATION_TRIES && first_open_race(&e) => {
                tokio::time::sleep(Duration::from_millis(10 * tries)).await;
                tries += 1;
            }
            done => return done,
        }
    }
}

/// Whether `e` is what a process meets when another is creating the same file's schema: a
/// migration the other applied first, or the file locked while it does.
fn first_open_race(e: &StoreError) -> bool {
    let busy = |e: &sqlx::Error| {
        e.as_database_error()
            .and_then(|d| d.code())
            .is_some_and(|code| code == "5" || code == "6")
    };
    match e {
        StoreError::Migration(sqlx::migrate::MigrateError::ExecuteMigration(..)) => true,
        StoreError::Migration(sqlx::migrate::MigrateError::Execute(e))
        | StoreError::Database(e) => busy(e),
        _ => false,
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path` and brings its schema up to date.
    pub async fn open(path: impl AsRef<Path>, durability: Durability) -> Result<Self, StoreError> {
        let path = path.as_ref();
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match durability {
                Durability::Process => SqliteSynchronous::Normal,
                Durability::PowerLoss => SqliteSynchronous::Full,
            })
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        // The schema is brought up to date on a connection of its own, before the writer opens.
        migrate(&options).await?;
        let writer = Writer::start(
            path,
            Setup {
                fsync_every_commit: durability == Durability::PowerLoss,
                busy_timeout: BUSY_TIMEOUT,
            },
        )
        .await?;
        let checkpoints = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        let writer = Arc::new(writer);
        Ok(SqliteStore {
            checkpointer: Arc::new(Checkpointer::start(checkpoints.clone(), writer.clone())),
            writer,
            reader,
            checkpoints,
            announcer: Announcer::new(false),
        })
    }

    /// One write job: `first` (on the counters, or nothing), then as many of `events` as it
    /// says (with `new_run`, unless that is none).
    async fn write_after<T, F>(
        &self,
        tenant: &TenantId,
        new_run: Option<(&RunInfo, Option<Lease<'_>>)>,
        events: &[SealedEvent],
        first: F,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> Result<(T, usize), StoreError> + Send + 'static,
    {
        if let Some((run, _)) = new_run {
            check_first(run, events)?;
        }
        let new_run = new_run.map(|(run, lease)| {
            let lease = lease.map(|l| (l.owner.to_string(), l.until_ms));
            (run.clone(), lease)
        });
        let (tenant, owned) = (tenant.clone(), events.to_vec());
        let (answer, written) = self
            .write(move |c| {
                let (answer, writes) = first(c)?;
                let events = &owned[..writes.min(owned.len())];
                if !events.is_empty() {
                    if let Some((run, lease)) = new_run {
                        insert_run(c, &run, lease)?;
                    }
                    insert_events(c, &tenant, events)?;
                }
                Ok((answer, events.len()))
            })
            .await?;
        self.announcer.appended(&events[..written]);
        Ok(answer)
    }

    /// Runs `write` on the writer connection (see [`Writer::write`]).
    pub(crate) async fn write<T, F>(&self, write: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.writer.write(write).await
    }
}

/// How long a write waits for another process's write to finish.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

impl Store for SqliteStore {
    fn follow(&self, id: &RunId) -> Appends {
        self.announcer.follow(id)
    }

    fn follow_claimable(&self) -> Appends {
        self.announcer.claimable()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.checkpointer.0.abort();
            // Flush the write-ahead log into the main file first.
            let _ = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(&self.checkpoints)
                .await;
            self.checkpoints.close().await;
            self.reader.close().await;
        })
    }

    fn create_run<'a>(
        &'a self,
        run: &'a RunInfo,
        first: &'a [SealedEvent],
        lease: Option<Lease<'a>>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let queued = lease.is_none();
        let new_run = Some((run, lease));
        Box::pin(async move {
            self.write_after(&run.tenant, new_run, first, |_| Ok(((), usize::MAX)))
                .await?;
            if queued {
                self.announcer.announce_claimable();
            }
            Ok(())
        })
    }

    // One job on the writer: the counters' statements, then the run and its events.
    fn reserve_and_write<'a>(
        &'a self,
        tenant: &'a TenantId,
        new_run: Option<(&'a RunInfo, Option<Lease<'a>>)>,
        events: &'a [SealedEvent],
        hold: Hold<'a>,
    ) -> BoxFuture<'a, Result<Reservation, StoreError>> {
        let (id, scopes) = (hold.id.to_string(), hold.scopes.to_vec());
        Box::pin(self.write_after(tenant, new_run, events, move |c| {
            let answer = crate::counters::reserve(
                c,
                &id,
                &scopes,
                hold.amount,
                hold.now_ms,
                hold.expires_ms,
            )?;
            let writes = if answer == Reservation::Granted {
                usize::MAX
            } else {
                0
            };
            Ok((answer, writes))
        }))
    }

    fn settle_and_write<'a>(
        &'a self,
        tenant: &'a TenantId,
        new_run: Option<(&'a RunInfo, Option<Lease<'a>>)>,
        events: &'a [SealedEvent],
        settlement: Settlement<'a>,
    ) -> BoxFuture<'a, Result<Vec<Standing>, StoreError>> {
        let (id, scopes) = (settlement.id.to_string(), settlement.scopes.to_vec());
        let (count, actual, percent, end) = (
            events.len(),
            settlement.actual,
            settlement.warn_percent,
            settlement.end,
        );
        Box::pin(self.write_after(tenant, new_run, events, move |c| {
            let after = crate::counters::settle(c, &id, &scopes, actual)?;
            let settlement = Settlement {
                id: &id,
                scopes: &scopes,
                actual,
                warn_percent: percent,
                end,
            };
            let writes = settlement.writes(count, &after);
            Ok((after, writes))
        }))
    }

    // One write, one commit: appends are on every step's critical path. The run's row is
    // brought up to date in the same write (`insert_events`).
    fn append<'a>(
        &'a self,
        tenant: &'a TenantId,
        event: &'a SealedEvent,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.append_all(tenant, std::slice::from_ref(event))
    }

    // One statement for all of them, in the writer's next commit.
    fn append_all<'a>(
        &'a self,
        tenant: &'a TenantId,
        events: &'a [SealedEvent],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if events.is_empty() {
                return Ok(());
            }
            let (tenant, owned) = (tenant.clone(), events.to_vec());
            self.write(move |c| insert_events(c, &tenant, &owned))
                .await?;
            self.announcer.appended(events);
            Ok(())
        })
    }

    // One statement on the single writer connection, so two workers never claim one run.
    fn claim<'a>(
        &'a self,
        lease: Lease<'a>,
        now_ms: i64,
        per_tenant: Option<u32>,
    ) -> BoxFuture<'a, Result<Option<(TenantId, RunId)>, StoreError>> {
        Box::pin(async move {
            let (owner, until_ms) = (lease.owner.to_string(), lease.until_ms);
            self.write(move |c| {
                let claimed = c
                    .prepare_cached(
                        "WITH driven AS (SELECT tenant, count(*) AS n FROM runs
                                         WHERE status IN ('queued', 'running') AND parent_run_id IS NULL
                                           AND lease_until_ms >= ?3
                                         GROUP BY tenant)
                         UPDATE runs SET lease_owner = ?1, lease_until_ms = ?2
                         WHERE id = (SELECT r.id FROM runs r LEFT JOIN driven d ON d.tenant = r.tenant
                                     WHERE (r.status IN ('queued', 'running') AND r.lease_until_ms < ?3
                                            OR (r.status = 'awaiting_approval' AND r.approval_expires_ms <= ?3 AND r.lease_until_ms < ?3))
                                       AND r.parent_run_id IS NULL
                                       AND (?4 IS NULL OR coalesce(d.n, 0) < ?4)
                                     ORDER BY coalesce(d.n, 0), r.created_ms LIMIT 1)
                           AND (status IN ('queued', 'running') AND lease_until_ms < ?3
                                OR (status = 'awaiting_approval' AND approval_expires_ms <= ?3 AND lease_until_ms < ?3))
                         RETURNING tenant, id",
                    )?
                    .query_row(rusqlite::params![owner, until_ms, now_ms, per_tenant], |r| {
                        Ok((TenantId::new(r.get::<_, String>(0)?), RunId::new(r.get::<_, String>(1)?)))
                    })
                    .optional()?;
                Ok(claimed)
            })
            .await
        })
    }

    fn acquire<'a>(
        &'a self,
        run: &'a RunId,
        lease: Lease<'a>,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let (run, owner, until_ms) = (run.clone(), lease.owner.to_string(), lease.until_ms);
        Box::pin(self.write(move |c| {
            let changed = c
                .prepare_cached(
                    "UPDATE runs SET lease_owner = ?1, lease_until_ms = ?2,
                                     status = CASE status WHEN 'queued' THEN 'running' ELSE status END
                     WHERE id = ?3 AND (lease_until_ms < ?4 OR lease_owner = ?1)",
                )?
                .execute(rusqlite::params![owner, until_ms, run.as_str(), now_ms])?;
            Ok(changed == 1)
        }))
    }

    fn renew<'a>(
        &'a self,
        run: &'a RunId,
        lease: Lease<'a>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let (run, owner, until_ms) = (run.clone(), lease.owner.to_string(), lease.until_ms);
        Box::pin(self.write(move |c| {
            let changed = c
                .prepare_cached(
                    "UPDATE runs SET lease_until_ms = ? WHERE id = ? AND lease_owner = ? AND status IN ('running', 'queued', 'awaiting_approval')",
                )?
                .execute(rusqlite::params![until_ms, run.as_str(), owner])?;
            Ok(changed == 1)
        }))
    }

    fn request_cancel<'a>(
        &'a self,
        tenant: &'a TenantId,
        run: &'a RunId,
        by: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let (tenant, run, by) = (tenant.to_string(), run.clone(), by.to_string());
        Box::pin(self.write(move |c| {
            let changed = c
                .prepare_cached(
                    "UPDATE runs SET cancel_requested_by = coalesce(cancel_requested_by, ?1)
                     WHERE tenant = ?2 AND id = ?3 AND status IN ('running', 'queued', 'awaiting_approval')",
                )?
                .execute(rusqlite::params![by, tenant, run.as_str()])?;
            Ok(changed == 1)
        }))
    }

    fn cancel_requests<'a>(
        &'a self,
        runs: &'a [RunId],
    ) -> BoxFuture<'a, Result<Vec<(RunId, String)>, StoreError>> {
        Box::pin(async move {
            let ids: Vec<&str> = runs.iter().map(RunId::as_str).collect();
            let ids = serde_json::Value::from(ids).to_string();
            let rows: Vec<(String, String)> = sqlx::query_as(
                "SELECT id, cancel_requested_by FROM runs
                 WHERE id IN (SELECT value FROM json_each(?1)) AND cancel_requested_by IS NOT NULL",
            )
            .bind(ids)
            .fetch_all(&self.reader)
            .await?;
            Ok(rows
                .into_iter()
                .map(|(id, by)| (RunId::new(id), by))
                .collect())
        })
    }

    fn release<'a>(
        &'a self,
        run: &'a RunId,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let (run, owner) = (run.clone(), owner.to_string());
        Box::pin(async move {
            // A run given up while it runs is claimable now; one awaiting a person, ended, or
            // a worker's (continued by its caller only) is not.
            let claimable: Option<bool> = self
                .write(move |c| {
                    Ok(c.prepare_cached(
                        "UPDATE runs SET lease_until_ms = 0 WHERE id = ? AND lease_owner = ?
                         RETURNING status = 'running' AND parent_run_id IS NULL",
                    )?
                    .query_row(rusqlite::params![run.as_str(), owner], |r| r.get(0))
                    .optional()?)
                })
                .await?;
            if claimable == Some(true) {
                self.announcer.announce_claimable();
            }
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
            let reason = filter.reason.map(TerminationReason::as_str);
            let session = filter.session.as_ref().map(SessionId::as_str);
            let before = filter.before.as_ref().map(RunId::as_str);
            let rows = sqlx::query(select_runs!(
                "WHERE tenant = ?1 AND (?2 IS NULL OR status = ?2) AND (?3 IS NULL OR agent = ?3) AND (?4 IS NULL OR user_id = ?4)
                   AND (?5 IS NULL OR termination_reason = ?5) AND (?6 IS NULL OR session_id = ?6)
                   AND (?7 IS NULL OR (created_ms, id) < (SELECT created_ms, id FROM runs WHERE tenant = ?1 AND id = ?7))
                 ORDER BY created_ms DESC, id DESC LIMIT ?8"
            ))
            .bind(tenant.as_str())
            .bind(status)
            .bind(agent)
            .bind(user)
            .bind(reason)
            .bind(session)
            .bind(before)
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
            rows.iter().map(run_from_row).collect()
        })
    }

    fn run_ids<'a>(
        &'a self,
        tenant: &'a TenantId,
        after: Option<&'a RunId>,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<RunId>, StoreError>> {
        Box::pin(async move {
            // The page starts after the cursor's (created_ms, id), the order it is read in;
            // a cursor that is not this tenant's run compares with NULL and matches nothing.
            let query = match after {
                None => sqlx::query(
                    "SELECT id FROM runs WHERE tenant = ?1 ORDER BY created_ms, id LIMIT ?2",
                )
                .bind(tenant.as_str())
                .bind(i64::from(limit)),
                Some(after) => sqlx::query(
                    "SELECT id FROM runs WHERE tenant = ?1 AND (created_ms, id) > \
                     (SELECT created_ms, id FROM runs WHERE tenant = ?1 AND id = ?3) \
                     ORDER BY created_ms, id LIMIT ?2",
                )
                .bind(tenant.as_str())
                .bind(i64::from(limit))
                .bind(after.as_str()),
            };
            let rows = query.fetch_all(&self.reader).await?;
            rows.iter().map(|r| Ok(RunId::new(r.text("id")?))).collect()
        })
    }

    fn open_run_counts(&self) -> BoxFuture<'_, Result<Vec<RunCount>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(crate::OPEN_RUN_COUNTS)
                .fetch_all(&self.reader)
                .await?;
            rows.iter().map(crate::open_run_count_from_row).collect()
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
        actor: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let (tenant, actor) = (tenant.clone(), actor.to_string());
        Box::pin(self.write(move |c| {
            let added = c
                .prepare_cached(
                    "INSERT INTO tenants (name, created_ms) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                )?
                .execute(rusqlite::params![tenant.as_str(), now_ms])?;
            if added == 1 {
                let change = AdminChange {
                    action: AdminAction::TenantCreated,
                    tenant: tenant.as_str(),
                    key_id: None,
                    actor: &actor,
                };
                append_admin_entry(c, &change, now_ms)?;
            }
            Ok(added == 1)
        }))
    }

    fn add_api_key<'a>(
        &'a self,
        tenant: &'a TenantId,
        key_sha256: &'a str,
        now_ms: i64,
        expires_ms: Option<i64>,
        actor: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let (tenant, key, actor) = (tenant.clone(), key_sha256.to_string(), actor.to_string());
        Box::pin(self.write(move |c| {
            let added = c
                .prepare_cached(
                    "INSERT INTO api_keys (key_sha256, tenant, created_ms, expires_ms) SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM tenants WHERE name = ?2)",
                )?
                .execute(rusqlite::params![key, tenant.as_str(), now_ms, expires_ms])?;
            if added == 1 {
                let change = AdminChange {
                    action: AdminAction::KeyCreated,
                    tenant: tenant.as_str(),
                    key_id: Some(api_key_id(&key)),
                    actor: &actor,
                };
                append_admin_entry(c, &change, now_ms)?;
            }
            Ok(added == 1)
        }))
    }

    fn tenant_by_key<'a>(
        &'a self,
        key_sha256: &'a str,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<Option<KeyGrant>, StoreError>> {
        Box::pin(async move {
            let row = sqlx::query(
                "SELECT tenant, expires_ms FROM api_keys WHERE key_sha256 = ? AND (expires_ms IS NULL OR expires_ms > ?)",
            )
            .bind(key_sha256)
            .bind(now_ms)
            .fetch_optional(&self.reader)
            .await?;
            row.as_ref().map(key_grant_from_row).transpose()
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
                "SELECT key_sha256, created_ms, expires_ms FROM api_keys WHERE tenant = ? ORDER BY created_ms, key_sha256",
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
        now_ms: i64,
        actor: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            if key_id.len() != API_KEY_ID_LEN {
                return Ok(false);
            }
            let (tenant, key_id, actor) = (tenant.clone(), key_id.to_string(), actor.to_string());
            self.write(move |c| {
                let removed = c
                    .prepare_cached(
                        "DELETE FROM api_keys WHERE tenant = ? AND substr(key_sha256, 1, 16) = ?",
                    )?
                    .execute(rusqlite::params![tenant.as_str(), key_id])?;
                if removed > 0 {
                    let change = AdminChange {
                        action: AdminAction::KeyRevoked,
                        tenant: tenant.as_str(),
                        key_id: Some(&key_id),
                        actor: &actor,
                    };
                    append_admin_entry(c, &change, now_ms)?;
                }
                Ok(removed > 0)
            })
            .await
        })
    }

    fn set_secret<'a>(
        &'a self,
        tenant: &'a TenantId,
        name: &'a str,
        sealed: &'a [u8],
        now_ms: i64,
        actor: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let (tenant, name, sealed, actor) = (
            tenant.clone(),
            name.to_string(),
            sealed.to_vec(),
            actor.to_string(),
        );
        Box::pin(self.write(move |c| {
            let set = c
                .prepare_cached(
                    "INSERT INTO tenant_secrets (tenant, name, sealed, updated_ms) SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM tenants WHERE name = ?1) ON CONFLICT (tenant, name) DO UPDATE SET sealed = excluded.sealed, updated_ms = excluded.updated_ms",
                )?
                .execute(rusqlite::params![tenant.as_str(), name, sealed, now_ms])?;
            if set > 0 {
                let change = AdminChange {
                    action: AdminAction::SecretSet,
                    tenant: tenant.as_str(),
                    key_id: Some(&name),
                    actor: &actor,
                };
                append_admin_entry(c, &change, now_ms)?;
            }
            Ok(set > 0)
        }))
    }

    fn delete_secret<'a>(
        &'a self,
        tenant: &'a TenantId,
        name: &'a str,
        now_ms: i64,
        actor: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let (tenant, name, actor) = (tenant.clone(), name.to_string(), actor.to_string());
        Box::pin(self.write(move |c| {
            let removed = c
                .prepare_cached("DELETE FROM tenant_secrets WHERE tenant = ? AND name = ?")?
                .execute(rusqlite::params![tenant.as_str(), name])?;
            if removed > 0 {
                let change = AdminChange {
                    action: AdminAction::SecretDeleted,
                    tenant: tenant.as_str(),
                    key_id: Some(&name),
                    actor: &actor,
                };
                append_admin_entry(c, &change, now_ms)?;
            }
            Ok(removed > 0)
        }))
    }

    fn secret_names<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> BoxFuture<'a, Result<Vec<SecretEntry>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT name, updated_ms FROM tenant_secrets WHERE tenant = ? ORDER BY name",
            )
            .bind(tenant.as_str())
            .fetch_all(&self.reader)
            .await?;
            rows.iter().map(secret_entry_from_row).collect()
        })
    }

    fn sealed_secrets<'a>(
        &'a self,
        tenant: &'a TenantId,
        names: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<SealedSecret>, StoreError>> {
        Box::pin(async move {
            let mut found = Vec::with_capacity(names.len());
            for name in names {
                let sealed: Option<Vec<u8>> = sqlx::query_scalar(
                    "SELECT sealed FROM tenant_secrets WHERE tenant = ? AND name = ?",
                )
                .bind(tenant.as_str())
                .bind(name)
                .fetch_optional(&self.reader)
                .await?;
                if let Some(sealed) = sealed {
                    found.push((name.clone(), sealed));
                }
            }
            Ok(found)
        })
    }

    fn admin_baseline(&self) -> BoxFuture<'_, Result<Vec<crate::BaselineItem>, StoreError>> {
        Box::pin(async move {
            let rows: Vec<crate::BaselineItem> =
                sqlx::query_as("SELECT tenant, key_id FROM admin_baseline ORDER BY tenant, key_id")
                    .fetch_all(&self.reader)
                    .await?;
            Ok(rows)
        })
    }

    fn anchor_runs<'a>(
        &'a self,
        cutoff_ms: i64,
        after: Option<&'a RunId>,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<rein_core::anchor::AnchoredRun>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT id, tenant,
                        CASE WHEN status IN ('completed', 'failed', 'limit_exceeded', 'cancelled', 'escalated')
                                  AND updated_ms <= ?1 THEN event_count END AS end_count,
                        CASE WHEN status IN ('completed', 'failed', 'limit_exceeded', 'cancelled', 'escalated')
                                  AND updated_ms <= ?1 THEN head_hash END AS end_hash
                 FROM runs WHERE created_ms <= ?1 AND id > ?2 ORDER BY id LIMIT ?3",
            )
            .bind(cutoff_ms)
            .bind(after.map_or("", RunId::as_str))
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
            rows.iter().map(anchored_run_from_row).collect()
        })
    }

    fn append_anchor<'a>(
        &'a self,
        anchor: &'a rein_core::anchor::Anchor,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let anchor = anchor.clone();
        Box::pin(self.write(move |c| {
            let added = c
                .prepare_cached(
                    "INSERT INTO audit_anchors (seq, ts_ms, cutoff_ms, admin_seq, admin_hash, runs, runs_sha256, prev_hash, hash)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT (seq) DO NOTHING",
                )?
                .execute(rusqlite::params![
                    i64::try_from(anchor.seq).unwrap_or(i64::MAX),
                    anchor.ts_ms,
                    anchor.cutoff_ms,
                    anchor.admin_head.as_ref().map(|(s, _)| i64::try_from(*s).unwrap_or(i64::MAX)),
                    anchor.admin_head.as_ref().map(|(_, h)| h.clone()),
                    i64::try_from(anchor.runs).unwrap_or(i64::MAX),
                    anchor.runs_sha256,
                    anchor.prev_hash,
                    anchor.hash,
                ])?;
            Ok(added == 1)
        }))
    }

    fn anchors(
        &self,
        from: u64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<rein_core::anchor::Anchor>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT seq, ts_ms, cutoff_ms, admin_seq, admin_hash, runs, runs_sha256, prev_hash, hash
                 FROM audit_anchors WHERE seq >= ? ORDER BY seq LIMIT ?",
            )
            .bind(i64::try_from(from).unwrap_or(i64::MAX))
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
            rows.iter().map(anchor_from_row).collect()
        })
    }

    fn last_anchor(&self) -> BoxFuture<'_, Result<Option<rein_core::anchor::Anchor>, StoreError>> {
        Box::pin(async move {
            let row = sqlx::query(
                "SELECT seq, ts_ms, cutoff_ms, admin_seq, admin_hash, runs, runs_sha256, prev_hash, hash
                 FROM audit_anchors ORDER BY seq DESC LIMIT 1",
            )
            .fetch_optional(&self.reader)
            .await?;
            row.as_ref().map(anchor_from_row).transpose()
        })
    }

    fn admin_log(
        &self,
        from: u64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<AdminEntry>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT seq, ts_ms, action, tenant, key_id, actor, prev_hash, hash FROM admin_log WHERE seq >= ? ORDER BY seq LIMIT ?",
            )
            .bind(i64::try_from(from).unwrap_or(i64::MAX))
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
            rows.iter().map(admin_entry_from_row).collect()
        })
    }

    fn admin_log_head(&self) -> BoxFuture<'_, Result<Option<u64>, StoreError>> {
        Box::pin(async move {
            let head: Option<i64> = sqlx::query_scalar("SELECT max(seq) FROM admin_log")
                .fetch_one(&self.reader)
                .await?;
            Ok(head.and_then(|h| u64::try_from(h).ok()))
        })
    }

    fn open_dashboard_session<'a>(
        &'a self,
        token_sha256: &'a str,
        key_sha256: &'a str,
        now_ms: i64,
        expires_ms: i64,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let (token, key) = (token_sha256.to_string(), key_sha256.to_string());
        Box::pin(self.write(move |c| {
            c.prepare_cached("DELETE FROM dashboard_sessions WHERE expires_ms <= ?")?
                .execute([now_ms])?;
            let opened = c
                .prepare_cached(
                    "INSERT INTO dashboard_sessions (token_sha256, key_sha256, expires_ms) SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM api_keys WHERE key_sha256 = ?2 AND (expires_ms IS NULL OR expires_ms > ?4))",
                )?
                .execute(rusqlite::params![token, key, expires_ms, now_ms])?;
            Ok(opened == 1)
        }))
    }

    fn dashboard_session<'a>(
        &'a self,
        token_sha256: &'a str,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<Option<TenantId>, StoreError>> {
        Box::pin(async move {
            let row = sqlx::query(
                "SELECT k.tenant FROM dashboard_sessions s JOIN api_keys k ON k.key_sha256 = s.key_sha256 WHERE s.token_sha256 = ?1 AND s.expires_ms > ?2 AND (k.expires_ms IS NULL OR k.expires_ms > ?2)",
            )
            .bind(token_sha256)
            .bind(now_ms)
            .fetch_optional(&self.reader)
            .await?;
            row.map(|r| Ok(TenantId::new(r.text("tenant")?)))
                .transpose()
        })
    }

    fn sweep_dashboard_sessions(&self, now_ms: i64) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(self.write(move |c| {
            let swept = c
                .prepare_cached("DELETE FROM dashboard_sessions WHERE expires_ms <= ?")?
                .execute([now_ms])?;
            Ok(u64::try_from(swept).unwrap_or(u64::MAX))
        }))
    }

    fn close_dashboard_session<'a>(
        &'a self,
        token_sha256: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let token = token_sha256.to_string();
        Box::pin(self.write(move |c| {
            let closed = c
                .prepare_cached("DELETE FROM dashboard_sessions WHERE token_sha256 = ?")?
                .execute([token])?;
            Ok(closed > 0)
        }))
    }

    fn register_agent<'a>(
        &'a self,
        tenant: &'a TenantId,
        name: &'a str,
        spec: &'a str,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<u32, StoreError>> {
        Box::pin(async move {
            let (tenant, name, spec) = (tenant.clone(), name.to_string(), spec.to_string());
            let version: i64 = self
                .write(move |c| {
                    Ok(c.prepare_cached(
                        "INSERT INTO agents (tenant, name, version, spec, created_ms) SELECT ?1, ?2, coalesce(max(version), 0) + 1, ?3, ?4 FROM agents WHERE tenant = ?1 AND name = ?2 RETURNING version",
                    )?
                    .query_row(rusqlite::params![tenant.as_str(), name, spec, now_ms], |r| r.get(0))?)
                })
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

/// Inserts a new run's row, running under `lease` (holder, expiry) or queued without one.
fn insert_run(
    c: &rusqlite::Connection,
    run: &RunInfo,
    lease: Option<(String, i64)>,
) -> Result<(), StoreError> {
    c.prepare_cached(
        "INSERT INTO runs (id, tenant, user_id, session_id, job_id, agent, agent_version, spec, input, status, head_hash, created_ms, updated_ms, lease_owner, lease_until_ms, parent_run_id)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )?
    .execute(rusqlite::params![
        run.id.as_str(),
        run.tenant.as_str(),
        run.user.as_str(),
        run.session.as_str(),
        run.job.as_ref().map(JobId::as_str),
        run.agent,
        i64::from(run.agent_version),
        run.spec,
        run.input,
        match lease {
            Some(_) => RunStatus::Running.as_str(),
            None => RunStatus::Queued.as_str(),
        },
        GENESIS_HASH,
        run.created_ms,
        run.created_ms,
        lease.as_ref().map(|l| l.0.as_str()),
        lease.as_ref().map_or(0, |l| l.1),
        run.parent.as_ref().map(RunId::as_str),
    ])?;
    Ok(())
}

/// Appends consecutive events: all of them if the run is `tenant`'s and its log ends just
/// before the first, else none. The run's row is brought up to date first (its position is
/// the check), then the events go in with one statement; a failure of either rolls back both
/// with the write.
fn insert_events(
    c: &rusqlite::Connection,
    tenant: &TenantId,
    events: &[SealedEvent],
) -> Result<(), StoreError> {
    let Some(first) = events.first() else {
        return Ok(());
    };
    let conflict = || StoreError::Conflict {
        run_id: first.run_id.clone(),
        seq: first.seq,
    };
    // Consecutive positions of one run, or the batch is refused before it reaches the store.
    if !crate::consecutive(events) {
        return Err(conflict());
    }
    let run = first.run_id.as_str();
    if update_run(
        c,
        tenant,
        run,
        crate::to_i64(first.seq),
        &Appended::of(events)?,
    )? == 0
    {
        return Err(conflict());
    }
    let mut sql = String::from(
        "INSERT INTO events (run_id, seq, ts_ms, kind, payload, payload_sha256, prev_hash, hash) VALUES ",
    );
    for i in 0..events.len() {
        sql.push_str(if i == 0 { "(" } else { ", (" });
        sql.push_str("?, ?, ?, ?, ?, ?, ?, ?)");
    }
    let seqs: Vec<i64> = events.iter().map(|e| crate::to_i64(e.seq)).collect();
    let mut params: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(events.len() * 8);
    for (event, seq) in events.iter().zip(&seqs) {
        params.extend([
            &run as &dyn rusqlite::ToSql,
            seq,
            &event.ts_ms,
            &event.kind,
            &event.payload,
            &event.payload_sha256,
            &event.prev_hash,
            &event.hash,
        ]);
    }
    let inserted = c
        .prepare_cached(&sql)?
        .execute(rusqlite::params_from_iter(params));
    match inserted {
        Ok(n) if n == events.len() => Ok(()),
        Ok(_) => Err(conflict()),
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                || e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE =>
        {
            Err(conflict())
        }
        Err(e) => Err(e.into()),
    }
}

/// `UPDATE runs SET <what every append changes> <tail>`.
macro_rules! update_run {
    ($tail:literal) => {
        concat!(
            "UPDATE runs SET event_count = ?1, head_hash = ?2, updated_ms = ?3, ",
            "iterations = iterations + ?4, tool_calls = tool_calls + ?5, ",
            "input_tokens = input_tokens + ?6, cached_input_tokens = cached_input_tokens + ?7, ",
            "output_tokens = output_tokens + ?8, cost_micros = cost_micros + ?9",
            $tail
        )
    };
}

/// Applies `appended` to `tenant`'s run `run` if its log has `at` events; returns the rows
/// changed (0: not the tenant's run, or another writer appended first). The status columns are
/// assigned only by a batch that changes them: assigning `status`, even to its own value,
/// rewrites the run's entry in `runs_claimable`.
fn update_run(
    c: &rusqlite::Connection,
    tenant: &TenantId,
    run: &str,
    at: i64,
    appended: &Appended,
) -> Result<usize, StoreError> {
    let a = appended;
    let counts = rusqlite::params![
        a.event_count,
        a.head_hash,
        a.updated_ms,
        a.iterations,
        a.tool_calls,
        a.input_tokens,
        a.cached_input_tokens,
        a.output_tokens,
        a.cost_micros,
        run,
        tenant.as_str(),
        at,
    ];
    let Some((status, expires)) = &a.status else {
        return Ok(c
            .prepare_cached(update_run!(
                " WHERE id = ?10 AND tenant = ?11 AND event_count = ?12"
            ))?
            .execute(counts)?);
    };
    let finished = a.finished.as_ref();
    let (ended, reason, detail, output) = (
        finished.is_some(),
        finished.and_then(|f| f.reason.as_deref()),
        finished.and_then(|f| f.detail.as_deref()),
        finished.and_then(|f| f.output.as_deref()),
    );
    let mut params: Vec<&dyn rusqlite::ToSql> = counts.to_vec();
    params.extend([
        status as &dyn rusqlite::ToSql,
        expires,
        &ended,
        &reason,
        &detail,
        &output,
    ]);
    Ok(c.prepare_cached(update_run!(
        ", status = ?13, approval_expires_ms = ?14, \
         termination_reason = CASE WHEN ?15 THEN ?16 ELSE termination_reason END, \
         detail = CASE WHEN ?15 THEN ?17 ELSE detail END, \
         output = CASE WHEN ?15 THEN ?18 ELSE output END \
         WHERE id = ?10 AND tenant = ?11 AND event_count = ?12"
    ))?
    .execute(rusqlite::params_from_iter(params))?)
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
            parent: None,
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
                trace_parent: None,
                fence: None,
                parent: None,
                trust: Some(rein_core::Trust::Operator),
            },
        }
    }

    /// Processes that open a new database at the same moment (`rein serve` and `rein worker`
    /// started together) each bring its schema up to date or find it done; none fails.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stores_opened_at_once_on_a_new_file_all_open() {
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("rein.db");
            let opens: Vec<_> = (0..6)
                .map(|_| {
                    let path = path.clone();
                    tokio::spawn(async move { SqliteStore::open(path, Durability::Process).await })
                })
                .collect();
            for open in opens {
                let store = open.await.unwrap().unwrap();
                store.close().await;
            }
        }
    }

    /// Writes are held back only after a short pass: never after the first (which copies
    /// the whole log, so many pages are written while it runs), unless it is the last.
    #[test]
    fn writes_are_held_back_only_after_a_short_pass_or_the_last() {
        let pass = |number, log, copied, log_before| Pass {
            number,
            log,
            copied,
            log_before,
        };
        assert!(!pass(1, 5000, 5000, None).then_hold_writes());
        assert!(!pass(2, 5140, 5140, Some(5000)).then_hold_writes());
        assert!(pass(3, 5170, 5170, Some(5140)).then_hold_writes());
        assert!(pass(2, 5000, 5000, Some(5000)).then_hold_writes());
        // Readers kept too much of the log from being copied.
        assert!(!pass(3, 5170, 4000, Some(5140)).then_hold_writes());
        assert!(pass(MAX_PASSES, 9000, 9000, Some(8000)).then_hold_writes());
        assert!(!pass(MAX_PASSES, 9000, 8000, Some(8000)).then_hold_writes());
    }

    /// Under writes that never pause, the log still starts over: a background checkpoint
    /// always leaves behind what was written while it ran, so past [`CHECKPOINT_REST_FRAMES`]
    /// the rest is copied with writes held back for that long.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_write_ahead_log_starts_over_under_writes_that_never_pause() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store = SqliteStore::open(&path, Durability::Process).await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        for w in 0..2 {
            let (store, stop) = (store.clone(), stop.clone());
            writers.push(tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("w{w}-{i}");
                    let first = started(0).seal(&RunId::new(&id), GENESIS_HASH);
                    store
                        .create_run(&new_run(&id, "t1"), std::slice::from_ref(&first), None)
                        .await
                        .unwrap();
                    i += 1;
                }
            }));
        }
        // A log that starts over gets a new salt in its header.
        let wal = dir.path().join("s.db-wal");
        let salt = || {
            std::fs::read(&wal)
                .ok()
                .and_then(|b| b.get(16..20).map(<[u8]>::to_vec))
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut first = None;
        while first.is_none() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
            first = salt();
        }
        let mut started_over = false;
        while !started_over && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            started_over = first.is_some() && salt() != first;
        }
        stop.store(true, Ordering::Relaxed);
        for writer in writers {
            writer.await.unwrap();
        }
        assert!(
            started_over,
            "the log never started over under steady writes ({} bytes)",
            std::fs::metadata(&wal).map_or(0, |m| m.len())
        );
        store.close().await;
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
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("f.db"), Durability::Process)
            .await
            .unwrap();
        let first = started(0).seal(&RunId::new("r1"), GENESIS_HASH);
        store
            .create_run(&new_run("r1", "t1"), std::slice::from_ref(&first), None)
            .await
            .unwrap();
        assert!(
            store
                .create_tenant(&TenantId::new("t1"), 1, "cli")
                .await
                .unwrap()
        );
        for forbidden in [
            "DELETE FROM events",
            "UPDATE events SET hash = 'x'",
            "UPDATE events SET payload = NULL",
            "UPDATE runs SET tenant = 't2'",
            "UPDATE runs SET parent_run_id = 'r0'",
            "DELETE FROM runs",
            "UPDATE admin_log SET actor = 'someone else'",
            "DELETE FROM admin_log",
        ] {
            let refused = store.write(move |c| Ok(c.execute(forbidden, [])?)).await;
            assert!(refused.is_err(), "{forbidden}");
        }
        // A refused write undoes only itself: the writer goes on.
        let second = started(1).seal(&RunId::new("r1"), &first.hash);
        store.append(&TenantId::new("t1"), &second).await.unwrap();
        assert_eq!(
            store
                .events(&TenantId::new("t1"), &RunId::new("r1"))
                .await
                .unwrap()
                .len(),
            2
        );
        assert!(store.orphaned_logs().await.unwrap().is_empty());
        assert_eq!(store.admin_log(0, 10).await.unwrap().len(), 1);
    }
}
