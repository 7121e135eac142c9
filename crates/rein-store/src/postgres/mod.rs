//! The shared engine: PostgreSQL, for several stateless Rein processes (workers, servers) on
//! one database. Same model and guarantees as the SQLite store; concurrency comes from row
//! locks instead of a single writer: claims skip rows another worker has locked
//! (`FOR UPDATE SKIP LOCKED`), appends race on the `(run_id, seq)` key, and budget counters
//! serialise on per-scope advisory locks.

use crate::appends::{Announcer, Task};
use crate::summary::Appended;
use crate::{
    Columns, CostGroup, Lease, RunInfo, Store, StoreError, counters_error, standing_from_row,
    to_i64,
};
use rein_core::admin_log::{AdminChange, AdminEntry};
use rein_core::budget::{Amount, BoxFuture, Counters, CountersError, Reservation, Scope, Standing};
use rein_core::{GENESIS_HASH, JobId, RunId, RunStatus, SealedEvent, TenantId};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The PostgreSQL store.
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
    appends: Arc<PgAppends>,
}

/// Appends on the database, for the runs' followers: this process's are announced as they
/// commit, and told to the other processes on the database with `NOTIFY` (on a channel named
/// after the schema, so that two deployments in one database do not hear each other), in
/// batches, by a task of their own, after the commit: never inside the appending transaction,
/// where `NOTIFY` would serialise every commit on the database's notification queue. The other
/// processes' come back through `LISTEN`, once a first follower asks.
#[derive(Debug)]
struct PgAppends {
    announcer: Announcer,
    /// To the task that tells the other processes; when it is full, an announcement is
    /// dropped (they are hints: followers read the store again after a while anyway).
    outgoing: mpsc::Sender<Told>,
    /// The `NOTIFY` channel.
    channel: String,
    /// Marks this store's own notifications, which its listener skips.
    origin: String,
    teller: Task,
    /// Started by the first follower.
    listener: OnceLock<Task>,
}

/// What one process tells the others.
#[derive(Debug)]
enum Told {
    /// This run's log grew.
    Appended(RunId),
    /// A run became claimable.
    Claimable,
}

/// How many announcements may wait to be told to the other processes.
const OUTGOING: usize = 4096;

/// How long the listener waits before connecting again after its connection failed.
const LISTEN_RETRY: Duration = Duration::from_secs(1);

impl PgAppends {
    fn start(pool: &PgPool, schema: &str) -> Self {
        let mut channel = format!("rein {schema}");
        // PostgreSQL cuts names to 63 bytes; cut it here so that both ends agree.
        while channel.len() > 63 {
            channel.pop();
        }
        let origin = uuid::Uuid::now_v7().simple().to_string();
        let (outgoing, queued) = mpsc::channel(OUTGOING);
        let teller = Task::spawn(tell_others(
            pool.clone(),
            queued,
            channel.clone(),
            origin.clone(),
        ));
        PgAppends {
            announcer: Announcer::new(true),
            outgoing,
            channel,
            origin,
            teller,
            listener: OnceLock::new(),
        }
    }

    /// `events` were just committed.
    fn appended(&self, events: &[SealedEvent]) {
        self.announcer.appended(events);
        if let Some(first) = events.first() {
            let _ = self.outgoing.try_send(Told::Appended(first.run_id.clone()));
        }
    }

    /// A run just became claimable.
    fn claimable(&self) {
        self.announcer.announce_claimable();
        let _ = self.outgoing.try_send(Told::Claimable);
    }
}

/// Tells the other processes on the database which runs this one appended to (`ORIGIN RUN`)
/// and that a run became claimable (`ORIGIN`), a batch per statement (what queued while the
/// last one ran).
async fn tell_others(
    pool: PgPool,
    mut queued: mpsc::Receiver<Told>,
    channel: String,
    origin: String,
) {
    let mut batch = Vec::new();
    while queued.recv_many(&mut batch, 256).await > 0 {
        let mut payloads: Vec<String> = batch
            .drain(..)
            .map(|told| match told {
                Told::Appended(run) => format!("{origin} {run}"),
                Told::Claimable => origin.clone(),
            })
            .collect();
        payloads.sort_unstable();
        payloads.dedup();
        let told = sqlx::query("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p")
            .bind(&channel)
            .bind(&payloads)
            .execute(&pool)
            .await;
        if let Err(e) = told {
            tracing::debug!(error = %e, "other processes were not told of appends");
        }
    }
}

/// Announces what other processes tell of, until the store goes. It listens on a connection
/// of its own, outside the store's pool (whose connections stay free for queries).
async fn hear_others(
    options: PgConnectOptions,
    channel: String,
    origin: String,
    announcer: Announcer,
) {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(options);
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(e) => {
                tracing::debug!(error = %e, "cannot listen for other processes' appends");
                tokio::time::sleep(LISTEN_RETRY).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(&channel).await {
            tracing::debug!(error = %e, "cannot listen for other processes' appends");
            tokio::time::sleep(LISTEN_RETRY).await;
            continue;
        }
        // `recv` connects again by itself after a dropped connection (what was told meanwhile
        // is missed); an error means it could not.
        while let Ok(told) = listener.recv().await {
            match told.payload().split_once(' ') {
                Some((from, run)) if from != origin => announcer.announce(&RunId::new(run)),
                None if told.payload() != origin => announcer.announce_claimable(),
                _ => {}
            }
        }
        tokio::time::sleep(LISTEN_RETRY).await;
    }
}

impl PgStore {
    /// Starts hearing the other processes' announcements, if not yet.
    fn listen(&self) {
        let appends = &*self.appends;
        appends.listener.get_or_init(|| {
            Task::spawn(hear_others(
                (*self.pool.connect_options()).clone(),
                appends.channel.clone(),
                appends.origin.clone(),
                appends.announcer.clone(),
            ))
        });
    }

    /// Connects to the database at `url` (`postgres://user@host:port/db`; `?options=-c
    /// search_path=NAME` keeps Rein's tables in a schema of their own) and brings its schema up
    /// to date. Several processes may start at once: migrations take a database lock.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let mut options = PgConnectOptions::from_str(url)?.application_name("rein");
        // PostgreSQL's notices (such as "relation already exists, skipping" from the migrations'
        // `IF NOT EXISTS`, at every start) would reach Rein's log as lines of their own; a URL
        // that sets the level itself keeps it.
        if !url.contains("client_min_messages") {
            options = options.options([("client_min_messages", "warning")]);
        }
        // One direct connection first: a pool only reports that it timed out, while this
        // says why (refused, no such database, authentication failed).
        sqlx::Connection::close(
            <sqlx::PgConnection as sqlx::Connection>::connect_with(&options).await?,
        )
        .await?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await?;
        let schema: Option<String> = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(&pool)
            .await?;
        let appends = PgAppends::start(&pool, schema.as_deref().unwrap_or("public"));
        Ok(PgStore {
            pool,
            appends: Arc::new(appends),
        })
    }

    /// The connection pool (tests reach behind the API with it).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
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

/// `SELECT <group>, totals FROM model_responded events of <tenants> since $1 GROUP BY <group>`.
macro_rules! cost_query {
    ($group:literal, $tenant_filter:literal) => {
        concat!(
            "SELECT ", $group, " AS key, count(*) AS calls,
                    coalesce(sum((e.payload::jsonb #>> '{usage,input_tokens}')::bigint), 0)::bigint AS input_tokens,
                    coalesce(sum((e.payload::jsonb #>> '{usage,cached_input_tokens}')::bigint), 0)::bigint AS cached_input_tokens,
                    coalesce(sum((e.payload::jsonb #>> '{usage,output_tokens}')::bigint), 0)::bigint AS output_tokens,
                    coalesce(sum((e.payload::jsonb ->> 'cost')::bigint), 0)::bigint AS micros
             FROM events e JOIN runs r ON r.id = e.run_id
             WHERE e.kind = 'model_responded' AND e.ts_ms >= $1 AND ", $tenant_filter, "
             GROUP BY 1 ORDER BY micros DESC, key"
        )
    };
}

fn cost_sql(group: CostGroup, all_tenants: bool) -> &'static str {
    match (group, all_tenants) {
        (CostGroup::Tenant, false) => cost_query!("r.tenant", "r.tenant = $2"),
        (CostGroup::User, false) => cost_query!("r.user_id", "r.tenant = $2"),
        (CostGroup::Agent, false) => cost_query!("r.agent", "r.tenant = $2"),
        (CostGroup::Model, false) => cost_query!("e.payload::jsonb ->> 'model'", "r.tenant = $2"),
        (CostGroup::Day, false) => cost_query!(
            "to_char(to_timestamp(e.ts_ms / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
            "r.tenant = $2"
        ),
        (CostGroup::Tenant, true) => cost_query!("r.tenant", "$2::text IS NULL"),
        (CostGroup::User, true) => cost_query!("r.tenant || '/' || r.user_id", "$2::text IS NULL"),
        (CostGroup::Agent, true) => cost_query!("r.agent", "$2::text IS NULL"),
        (CostGroup::Model, true) => {
            cost_query!("e.payload::jsonb ->> 'model'", "$2::text IS NULL")
        }
        (CostGroup::Day, true) => cost_query!(
            "to_char(to_timestamp(e.ts_ms / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
            "$2::text IS NULL"
        ),
    }
}

/// Appends consecutive events in one statement: all of them if the run is `tenant`'s and its
/// log ends just before the first, else none. The statement first brings the run's row up to
/// date (`summary::Appended`; its position is the check, and its row lock makes a second
/// writer at the same position find the position taken), then inserts the events only if it
/// did.
async fn insert_events<'e>(
    executor: impl sqlx::Executor<'e, Database = Postgres>,
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
    if !crate::consecutive(events) {
        return Err(conflict());
    }
    let a = Appended::of(events)?;
    let mut query =
        sqlx::QueryBuilder::<Postgres>::new("WITH moved AS (UPDATE runs SET event_count = ");
    query
        .push_bind(a.event_count)
        .push(", head_hash = ")
        .push_bind(&a.head_hash)
        .push(", updated_ms = ")
        .push_bind(a.updated_ms)
        .push(", iterations = iterations + ")
        .push_bind(a.iterations)
        .push(", tool_calls = tool_calls + ")
        .push_bind(a.tool_calls)
        .push(", input_tokens = input_tokens + ")
        .push_bind(a.input_tokens)
        .push(", cached_input_tokens = cached_input_tokens + ")
        .push_bind(a.cached_input_tokens)
        .push(", output_tokens = output_tokens + ")
        .push_bind(a.output_tokens)
        .push(", cost_micros = cost_micros + ")
        .push_bind(a.cost_micros);
    // The status columns only when the batch changes them: an update of an indexed column
    // rewrites the row's index entries.
    if let Some((status, expires)) = &a.status {
        query
            .push(", status = ")
            .push_bind(status)
            .push(", approval_expires_ms = ")
            .push_bind(*expires);
    }
    if let Some(finished) = &a.finished {
        query
            .push(", termination_reason = ")
            .push_bind(finished.reason.as_deref())
            .push(", detail = ")
            .push_bind(finished.detail.as_deref())
            .push(", output = ")
            .push_bind(finished.output.as_deref());
    }
    query
        .push(" WHERE id = ")
        .push_bind(first.run_id.as_str())
        .push(" AND tenant = ")
        .push_bind(tenant.as_str())
        .push(" AND event_count = ")
        .push_bind(crate::to_i64(first.seq))
        .push(" RETURNING 1) INSERT INTO events (run_id, seq, ts_ms, kind, payload, payload_sha256, prev_hash, hash) SELECT * FROM (");
    query.push_values(events, |mut row, event| {
        row.push_bind(event.run_id.as_str())
            .push_bind(crate::to_i64(event.seq))
            .push_bind(event.ts_ms)
            .push_bind(&event.kind)
            .push_bind(event.payload.as_deref())
            .push_bind(&event.payload_sha256)
            .push_bind(&event.prev_hash)
            .push_bind(&event.hash);
    });
    query.push(") AS v WHERE EXISTS (SELECT 1 FROM moved)");
    match query.build().execute(executor).await {
        Ok(done) if done.rows_affected() == events.len() as u64 => Ok(()),
        Ok(_) => Err(conflict()),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(conflict()),
        Err(e) => Err(e.into()),
    }
}

/// Inserts a new run's row, running under `lease` or queued without one.
async fn insert_run(
    tx: &mut Transaction<'_, Postgres>,
    run: &RunInfo,
    lease: Option<Lease<'_>>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO runs (id, tenant, user_id, session_id, job_id, agent, agent_version, spec, input, status, head_hash, created_ms, updated_ms, lease_owner, lease_until_ms, parent_run_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12, $13, $14, $15)",
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
    .bind(lease.map(|l| l.owner))
    .bind(lease.map_or(0, |l| l.until_ms))
    .bind(run.parent.as_ref().map(RunId::as_str))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Within `tx`: `new_run`'s row if it is new, then `events` (nothing when there are none).
async fn write_in(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &TenantId,
    new_run: Option<(&RunInfo, Option<Lease<'_>>)>,
    events: &[SealedEvent],
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    if let Some((run, lease)) = new_run {
        insert_run(tx, run, lease).await?;
    }
    insert_events(&mut **tx, tenant, events).await
}

/// Which runs a worker may claim at `$3`: queued, running under an expired lease, or awaiting
/// an approval that timed out.
macro_rules! claimable {
    () => {
        "((status IN ('queued', 'running') AND lease_until_ms < $3)
          OR (status = 'awaiting_approval' AND approval_expires_ms <= $3 AND lease_until_ms < $3))
         AND parent_run_id IS NULL"
    };
}

impl Store for PgStore {
    fn close(&self) -> BoxFuture<'_, ()> {
        self.appends.teller.stop();
        // A follower that comes after the close finds a stopped task and starts no listener.
        self.appends
            .listener
            .get_or_init(|| Task::spawn(async {}))
            .stop();
        Box::pin(self.pool.close())
    }
}

// ---- Budget counters ------------------------------------------------------------------------

/// FNV-1a: a stable 64-bit lock id for a scope key (the same in every process and build).
fn lock_id(key: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_ne_bytes(h.to_ne_bytes())
}

/// Appends the admin log's entry for `change`, in the transaction that made it, after taking
/// the log's advisory lock: concurrent admin changes append one after another, never both
/// after the same entry.
async fn append_admin_entry(
    tx: &mut Transaction<'_, Postgres>,
    change: &AdminChange<'_>,
    now_ms: i64,
) -> Result<(), StoreError> {
    lock_scopes(tx, &["rein:admin_log"]).await?;
    let last: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, hash FROM admin_log ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut **tx)
            .await?;
    let last = last
        .as_ref()
        .map(|(seq, hash)| (u64::try_from(*seq).unwrap_or(0), hash.as_str()));
    let entry = AdminEntry::after(last, change, now_ms);
    sqlx::query(
        "INSERT INTO admin_log (seq, ts_ms, action, tenant, key_id, actor, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(i64::try_from(entry.seq).unwrap_or(i64::MAX))
    .bind(entry.ts_ms)
    .bind(&entry.action)
    .bind(&entry.tenant)
    .bind(&entry.key_id)
    .bind(&entry.actor)
    .bind(&entry.prev_hash)
    .bind(&entry.hash)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Serialises this transaction with every other counter transaction on any of `keys`, until it
/// ends. Locks are always taken in one global order (by lock id), so two transactions never
/// wait on each other in a cycle.
async fn lock_scopes(tx: &mut Transaction<'_, Postgres>, keys: &[&str]) -> Result<(), sqlx::Error> {
    let mut ids: Vec<i64> = keys.iter().map(|k| lock_id(k)).collect();
    ids.sort_unstable();
    ids.dedup();
    for id in ids {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(id)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Releases the expired reservations of `keys` (whose locks this transaction holds).
async fn release_expired(
    tx: &mut Transaction<'_, Postgres>,
    keys: &[&str],
    now_ms: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH gone AS (DELETE FROM budget_reservations WHERE scope = ANY($1) AND expires_ms <= $2
                       RETURNING scope, micros, tokens),
              totals AS (SELECT scope, sum(micros)::bigint AS micros, sum(tokens)::bigint AS tokens
                         FROM gone GROUP BY scope)
         UPDATE budget_counters c SET reserved_micros = c.reserved_micros - t.micros,
                                      reserved_tokens = c.reserved_tokens - t.tokens
         FROM totals t WHERE c.scope = t.scope",
    )
    .bind(keys)
    .bind(now_ms)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn standing_in(
    tx: &mut Transaction<'_, Postgres>,
    scope: &str,
) -> Result<Standing, sqlx::Error> {
    let row = sqlx::query(
        "SELECT spent_micros, spent_tokens, reserved_micros, reserved_tokens FROM budget_counters WHERE scope = $1",
    )
    .bind(scope)
    .fetch_optional(&mut **tx)
    .await?;
    row.as_ref()
        .map_or(Ok(Standing::default()), standing_from_row)
}

fn keys(scopes: &[Scope]) -> Vec<&str> {
    scopes.iter().map(|s| s.key.as_str()).collect()
}

/// Reserves (see [`Counters::reserve`]) within `tx`, under the scopes' locks; on a refusal the
/// caller rolls `tx` back.
async fn reserve_in(
    tx: &mut Transaction<'_, Postgres>,
    id: &str,
    scopes: &[Scope],
    amount: Amount,
    now_ms: i64,
    expires_ms: i64,
) -> Result<Reservation, sqlx::Error> {
    let keys = keys(scopes);
    lock_scopes(tx, &keys).await?;
    release_expired(tx, &keys, now_ms).await?;
    for scope in scopes {
        let standing = standing_in(tx, &scope.key).await?;
        if !standing.admits(&scope.cap, &amount) {
            return Ok(Reservation::Refused {
                scope: scope.clone(),
                standing,
            });
        }
    }
    for scope in scopes {
        sqlx::query(
            "INSERT INTO budget_counters (scope, reserved_micros, reserved_tokens) VALUES ($1, $2, $3)
             ON CONFLICT (scope) DO UPDATE SET reserved_micros = budget_counters.reserved_micros + excluded.reserved_micros,
                                               reserved_tokens = budget_counters.reserved_tokens + excluded.reserved_tokens",
        )
        .bind(&scope.key)
        .bind(amount.usd.micros())
        .bind(to_i64(amount.tokens))
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            "INSERT INTO budget_reservations (id, scope, micros, tokens, expires_ms) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(&scope.key)
        .bind(amount.usd.micros())
        .bind(to_i64(amount.tokens))
        .bind(expires_ms)
        .execute(&mut **tx)
        .await?;
    }
    Ok(Reservation::Granted)
}

/// Settles (see [`Counters::settle`]) within `tx`, under the scopes' locks.
async fn settle_in(
    tx: &mut Transaction<'_, Postgres>,
    id: &str,
    scopes: &[Scope],
    actual: Amount,
) -> Result<Vec<Standing>, sqlx::Error> {
    lock_scopes(tx, &keys(scopes)).await?;
    let first =
        sqlx::query("INSERT INTO budget_settlements (id) VALUES ($1) ON CONFLICT (id) DO NOTHING")
            .bind(id)
            .execute(&mut **tx)
            .await?
            .rows_affected()
            == 1;
    if first {
        for scope in scopes {
            sqlx::query(
                "INSERT INTO budget_counters (scope, spent_micros, spent_tokens) VALUES ($1, $2, $3)
                 ON CONFLICT (scope) DO UPDATE SET
                     spent_micros = budget_counters.spent_micros + excluded.spent_micros,
                     spent_tokens = budget_counters.spent_tokens + excluded.spent_tokens,
                     reserved_micros = budget_counters.reserved_micros - coalesce((SELECT micros FROM budget_reservations WHERE id = $4 AND scope = excluded.scope), 0),
                     reserved_tokens = budget_counters.reserved_tokens - coalesce((SELECT tokens FROM budget_reservations WHERE id = $4 AND scope = excluded.scope), 0)",
            )
            .bind(&scope.key)
            .bind(actual.usd.micros())
            .bind(to_i64(actual.tokens))
            .bind(id)
            .execute(&mut **tx)
            .await?;
        }
        sqlx::query("DELETE FROM budget_reservations WHERE id = $1")
            .bind(id)
            .execute(&mut **tx)
            .await?;
    }
    // Already settled: report the standings, change nothing.
    let mut after = Vec::with_capacity(scopes.len());
    for scope in scopes {
        after.push(standing_in(tx, &scope.key).await?);
    }
    Ok(after)
}

impl PgStore {
    async fn reserve_in_store(
        &self,
        id: &str,
        scopes: &[Scope],
        amount: Amount,
        now_ms: i64,
        expires_ms: i64,
    ) -> Result<Reservation, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let answer = reserve_in(&mut tx, id, scopes, amount, now_ms, expires_ms).await?;
        if answer == Reservation::Granted {
            tx.commit().await?;
        } else {
            tx.rollback().await?;
        }
        Ok(answer)
    }

    async fn settle_in_store(
        &self,
        id: &str,
        scopes: &[Scope],
        actual: Amount,
    ) -> Result<Vec<Standing>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let after = settle_in(&mut tx, id, scopes, actual).await?;
        tx.commit().await?;
        Ok(after)
    }
    async fn standing_in_store(&self, scope: &str, now_ms: i64) -> Result<Standing, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        lock_scopes(&mut tx, &[scope]).await?;
        release_expired(&mut tx, &[scope], now_ms).await?;
        let standing = standing_in(&mut tx, scope).await?;
        tx.commit().await?;
        Ok(standing)
    }

    async fn swap_cell_in_store(
        &self,
        key: &str,
        expected: Option<&str>,
        new: &str,
    ) -> Result<bool, sqlx::Error> {
        let done = match expected {
            None => sqlx::query(
                "INSERT INTO counter_cells (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
            )
            .bind(key)
            .bind(new)
            .execute(&self.pool)
            .await?,
            Some(expected) => {
                sqlx::query("UPDATE counter_cells SET value = $1 WHERE key = $2 AND value = $3")
                    .bind(new)
                    .bind(key)
                    .bind(expected)
                    .execute(&self.pool)
                    .await?
            }
        };
        Ok(done.rows_affected() == 1)
    }
}

impl Counters for PgStore {
    fn cell<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, CountersError>> {
        Box::pin(async move {
            let row = sqlx::query("SELECT value FROM counter_cells WHERE key = $1")
                .bind(key)
                .fetch_optional(&self.pool)
                .await
                .map_err(counters_error)?;
            row.map(|r| r.text("value"))
                .transpose()
                .map_err(counters_error)
        })
    }

    fn swap_cell<'a>(
        &'a self,
        key: &'a str,
        expected: Option<&'a str>,
        new: &'a str,
    ) -> BoxFuture<'a, Result<bool, CountersError>> {
        Box::pin(async move {
            self.swap_cell_in_store(key, expected, new)
                .await
                .map_err(counters_error)
        })
    }

    fn reserve<'a>(
        &'a self,
        id: &'a str,
        scopes: &'a [Scope],
        amount: Amount,
        now_ms: i64,
        expires_ms: i64,
    ) -> BoxFuture<'a, Result<Reservation, CountersError>> {
        Box::pin(async move {
            self.reserve_in_store(id, scopes, amount, now_ms, expires_ms)
                .await
                .map_err(counters_error)
        })
    }

    fn settle<'a>(
        &'a self,
        id: &'a str,
        scopes: &'a [Scope],
        actual: Amount,
    ) -> BoxFuture<'a, Result<Vec<Standing>, CountersError>> {
        Box::pin(async move {
            self.settle_in_store(id, scopes, actual)
                .await
                .map_err(counters_error)
        })
    }

    fn standing<'a>(
        &'a self,
        scope_key: &'a str,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<Standing, CountersError>> {
        Box::pin(async move {
            self.standing_in_store(scope_key, now_ms)
                .await
                .map_err(counters_error)
        })
    }
}

// The roles' files come after the macros above, which they use.
mod agents;
mod anchors;
mod dashboard;
mod leases;
mod run_log;
mod tenancy;
