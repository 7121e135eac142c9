//! The embedded engine: one SQLite file (WAL), the default store.

use crate::appends::Announcer;
use crate::summary::Appended;
use crate::writer::{Setup, Writer};
use crate::{CostGroup, Lease, RunInfo, Store, StoreError, check_first};
use rein_core::admin_log::{AdminChange, AdminEntry};
use rein_core::budget::BoxFuture;
use rein_core::{GENESIS_HASH, JobId, RunId, RunStatus, SealedEvent, TenantId};
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
        StoreError::Migration(e) if e.migration_failed() => true,
        StoreError::Migration(e) | StoreError::Database(e) => e.sqlx().is_some_and(busy),
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

// The roles' files come after the macros above, which they use.
mod agents;
mod anchors;
mod counters;
mod dashboard;
mod leases;
mod run_log;
mod tenancy;
#[cfg(test)]
mod tests;
