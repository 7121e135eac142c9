//! The shared engine: PostgreSQL, for several stateless Rein processes (workers, servers) on
//! one database. Same model and guarantees as the SQLite store; concurrency comes from row
//! locks instead of a single writer: claims skip rows another worker has locked
//! (`FOR UPDATE SKIP LOCKED`), appends race on the `(run_id, seq)` key, and budget counters
//! serialise on per-scope advisory locks.

use crate::SealedSecret;
use crate::appends::{Announcer, Task};
use crate::summary::Appended;
use crate::{
    API_KEY_ID_LEN, ApiKeyEntry, Appends, Columns, CostGroup, CostLine, Hold, KeyGrant, Lease,
    RunCount, RunFilter, RunInfo, RunRecord, SecretEntry, Settlement, Store, StoreError,
    StoredAgent, TenantEntry, admin_entry_from_row, agent_from_row, anchor_from_row,
    anchored_run_from_row, api_key_from_row, api_key_id, check_first, cost_from_row,
    counters_error, event_from_row, key_grant_from_row, run_from_row, secret_entry_from_row,
    standing_from_row, tenant_from_row, to_i64,
};
use rein_core::admin_log::{AdminAction, AdminChange, AdminEntry};
use rein_core::budget::{Amount, BoxFuture, Counters, CountersError, Reservation, Scope, Standing};
use rein_core::{
    GENESIS_HASH, JobId, RunId, RunStatus, SealedEvent, SessionId, TenantId, TerminationReason,
    UserId,
};
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
    fn create_run<'a>(
        &'a self,
        run: &'a RunInfo,
        first: &'a [SealedEvent],
        lease: Option<Lease<'a>>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            check_first(run, first)?;
            let queued = lease.is_none();
            let mut tx = self.pool.begin().await?;
            write_in(&mut tx, &run.tenant, Some((run, lease)), first).await?;
            tx.commit().await?;
            self.appends.appended(first);
            if queued {
                self.appends.claimable();
            }
            Ok(())
        })
    }

    // One transaction: the counters' statements (under their scopes' locks), then the run and
    // its events.
    fn reserve_and_write<'a>(
        &'a self,
        tenant: &'a TenantId,
        new_run: Option<(&'a RunInfo, Option<Lease<'a>>)>,
        events: &'a [SealedEvent],
        hold: Hold<'a>,
    ) -> BoxFuture<'a, Result<Reservation, StoreError>> {
        Box::pin(async move {
            if let Some((run, _)) = new_run {
                check_first(run, events)?;
            }
            let mut tx = self.pool.begin().await?;
            let answer = reserve_in(
                &mut tx,
                hold.id,
                hold.scopes,
                hold.amount,
                hold.now_ms,
                hold.expires_ms,
            )
            .await?;
            if answer != Reservation::Granted {
                tx.rollback().await?;
                return Ok(answer);
            }
            write_in(&mut tx, tenant, new_run, events).await?;
            tx.commit().await?;
            self.appends.appended(events);
            Ok(answer)
        })
    }

    fn settle_and_write<'a>(
        &'a self,
        tenant: &'a TenantId,
        new_run: Option<(&'a RunInfo, Option<Lease<'a>>)>,
        events: &'a [SealedEvent],
        settlement: Settlement<'a>,
    ) -> BoxFuture<'a, Result<Vec<Standing>, StoreError>> {
        Box::pin(async move {
            if let Some((run, _)) = new_run {
                check_first(run, events)?;
            }
            let mut tx = self.pool.begin().await?;
            let after =
                settle_in(&mut tx, settlement.id, settlement.scopes, settlement.actual).await?;
            let events = &events[..settlement.writes(events.len(), &after)];
            write_in(&mut tx, tenant, new_run, events).await?;
            tx.commit().await?;
            self.appends.appended(events);
            Ok(after)
        })
    }

    fn append<'a>(
        &'a self,
        tenant: &'a TenantId,
        event: &'a SealedEvent,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.append_all(tenant, std::slice::from_ref(event))
    }

    fn append_all<'a>(
        &'a self,
        tenant: &'a TenantId,
        events: &'a [SealedEvent],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            insert_events(&self.pool, tenant, events).await?;
            self.appends.appended(events);
            Ok(())
        })
    }

    // The oldest claimable row no other worker has locked; the outer condition is checked again
    // on the locked row.
    fn claim<'a>(
        &'a self,
        lease: Lease<'a>,
        now_ms: i64,
        per_tenant: Option<u32>,
    ) -> BoxFuture<'a, Result<Option<(TenantId, RunId)>, StoreError>> {
        Box::pin(async move {
            // With a cap, claims take turns (an advisory lock held to the commit), so two
            // claims racing, in one process or several, cannot both see a tenant just under it.
            let mut tx = self.pool.begin().await?;
            if per_tenant.is_some() {
                lock_scopes(&mut tx, &["rein:claims"]).await?;
            }
            let row = sqlx::query(concat!(
                "WITH driven AS (SELECT tenant AS driven_tenant, count(*) AS n FROM runs
                                 WHERE status IN ('queued', 'running') AND parent_run_id IS NULL
                                   AND lease_until_ms >= $3
                                 GROUP BY tenant)
                 UPDATE runs SET lease_owner = $1, lease_until_ms = $2
                 WHERE id = (SELECT id FROM runs LEFT JOIN driven ON driven_tenant = tenant WHERE ",
                claimable!(),
                " AND ($4::bigint IS NULL OR coalesce(n, 0) < $4)
                   ORDER BY coalesce(n, 0), created_ms LIMIT 1 FOR UPDATE OF runs SKIP LOCKED) AND ",
                claimable!(),
                " RETURNING tenant, id"
            ))
            .bind(lease.owner)
            .bind(lease.until_ms)
            .bind(now_ms)
            .bind(per_tenant.map(i64::from))
            .fetch_optional(&mut *tx)
            .await?;
            tx.commit().await?;
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
                "UPDATE runs SET lease_owner = $1, lease_until_ms = $2,
                                 status = CASE status WHEN 'queued' THEN 'running' ELSE status END
                 WHERE id = $3 AND (lease_until_ms < $4 OR lease_owner = $1)",
            )
            .bind(lease.owner)
            .bind(lease.until_ms)
            .bind(run.as_str())
            .bind(now_ms)
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
                "UPDATE runs SET lease_until_ms = $1 WHERE id = $2 AND lease_owner = $3 AND status IN ('running', 'queued', 'awaiting_approval')",
            )
            .bind(lease.until_ms)
            .bind(run.as_str())
            .bind(lease.owner)
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn request_cancel<'a>(
        &'a self,
        tenant: &'a TenantId,
        run: &'a RunId,
        by: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let done = sqlx::query(
                "UPDATE runs SET cancel_requested_by = coalesce(cancel_requested_by, $1)
                 WHERE tenant = $2 AND id = $3 AND status IN ('running', 'queued', 'awaiting_approval')",
            )
            .bind(by)
            .bind(tenant.as_str())
            .bind(run.as_str())
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn cancel_requests<'a>(
        &'a self,
        runs: &'a [RunId],
    ) -> BoxFuture<'a, Result<Vec<(RunId, String)>, StoreError>> {
        Box::pin(async move {
            let ids: Vec<&str> = runs.iter().map(RunId::as_str).collect();
            let rows: Vec<(String, String)> = sqlx::query_as(
                "SELECT id, cancel_requested_by FROM runs
                 WHERE id = ANY($1) AND cancel_requested_by IS NOT NULL",
            )
            .bind(ids)
            .fetch_all(&self.pool)
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
        Box::pin(async move {
            // A run given up while it runs is claimable now; one awaiting a person, ended, or
            // a worker's (continued by its caller only) is not.
            let claimable: Option<bool> = sqlx::query_scalar(
                "UPDATE runs SET lease_until_ms = 0 WHERE id = $1 AND lease_owner = $2
                 RETURNING status = 'running' AND parent_run_id IS NULL",
            )
            .bind(run.as_str())
            .bind(owner)
            .fetch_optional(&self.pool)
            .await?;
            if claimable == Some(true) {
                self.appends.claimable();
            }
            Ok(())
        })
    }

    fn unfinished(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM runs WHERE status IN ('queued', 'running')",
            )
            .fetch_one(&self.pool)
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
                "WHERE tenant = $1 AND session_id = $2 ORDER BY created_ms DESC, id DESC LIMIT 1"
            ))
            .bind(tenant.as_str())
            .bind(session.as_str())
            .fetch_optional(&self.pool)
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
            let row = sqlx::query(select_runs!("WHERE tenant = $1 AND id = $2"))
                .bind(tenant.as_str())
                .bind(id.as_str())
                .fetch_optional(&self.pool)
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
            let rows = sqlx::query(select_runs!(
                "WHERE tenant = $1 AND ($2::text IS NULL OR status = $2) AND ($3::text IS NULL OR agent = $3)
                   AND ($4::text IS NULL OR user_id = $4) AND ($5::text IS NULL OR termination_reason = $5)
                   AND ($6::text IS NULL OR session_id = $6)
                   AND ($7::text IS NULL OR (created_ms, id) < (SELECT created_ms, id FROM runs WHERE tenant = $1 AND id = $7))
                 ORDER BY created_ms DESC, id DESC LIMIT $8"
            ))
            .bind(tenant.as_str())
            .bind(filter.status.map(RunStatus::as_str))
            .bind(filter.agent.as_deref())
            .bind(filter.user.as_ref().map(UserId::as_str))
            .bind(filter.reason.map(TerminationReason::as_str))
            .bind(filter.session.as_ref().map(SessionId::as_str))
            .bind(filter.before.as_ref().map(RunId::as_str))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
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
                    "SELECT id FROM runs WHERE tenant = $1 ORDER BY created_ms, id LIMIT $2",
                )
                .bind(tenant.as_str())
                .bind(i64::from(limit)),
                Some(after) => sqlx::query(
                    "SELECT id FROM runs WHERE tenant = $1 AND (created_ms, id) > \
                     (SELECT created_ms, id FROM runs WHERE tenant = $1 AND id = $3) \
                     ORDER BY created_ms, id LIMIT $2",
                )
                .bind(tenant.as_str())
                .bind(i64::from(limit))
                .bind(after.as_str()),
            };
            let rows = query.fetch_all(&self.pool).await?;
            rows.iter().map(|r| Ok(RunId::new(r.text("id")?))).collect()
        })
    }

    fn open_run_counts(&self) -> BoxFuture<'_, Result<Vec<RunCount>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(crate::OPEN_RUN_COUNTS)
                .fetch_all(&self.pool)
                .await?;
            rows.iter().map(crate::open_run_count_from_row).collect()
        })
    }

    fn tenants(&self) -> BoxFuture<'_, Result<Vec<TenantId>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query("SELECT DISTINCT tenant FROM runs ORDER BY tenant")
                .fetch_all(&self.pool)
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
                .fetch_all(&self.pool)
                .await?;
            rows.iter().map(cost_from_row).collect()
        })
    }

    fn orphaned_logs(&self) -> BoxFuture<'_, Result<Vec<RunId>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT DISTINCT run_id FROM events WHERE run_id NOT IN (SELECT id FROM runs) ORDER BY run_id",
            )
            .fetch_all(&self.pool)
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
                 WHERE r.tenant = $1 AND e.run_id = $2 AND e.seq >= $3 ORDER BY e.seq",
            )
            .bind(tenant.as_str())
            .bind(id.as_str())
            .bind(i64::try_from(from).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(|r| event_from_row(id, r)).collect()
        })
    }

    fn follow(&self, id: &RunId) -> Appends {
        self.listen();
        self.appends.announcer.follow(id)
    }

    fn follow_claimable(&self) -> Appends {
        self.listen();
        self.appends.announcer.claimable()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        self.appends.teller.stop();
        // A follower that comes after the close finds a stopped task and starts no listener.
        self.appends
            .listener
            .get_or_init(|| Task::spawn(async {}))
            .stop();
        Box::pin(self.pool.close())
    }

    fn create_tenant<'a>(
        &'a self,
        tenant: &'a TenantId,
        now_ms: i64,
        actor: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await?;
            let done = sqlx::query(
                "INSERT INTO tenants (name, created_ms) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            )
            .bind(tenant.as_str())
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
            let created = done.rows_affected() == 1;
            if created {
                let change = AdminChange {
                    action: AdminAction::TenantCreated,
                    tenant: tenant.as_str(),
                    key_id: None,
                    actor,
                };
                append_admin_entry(&mut tx, &change, now_ms).await?;
            }
            tx.commit().await?;
            Ok(created)
        })
    }

    fn add_api_key<'a>(
        &'a self,
        tenant: &'a TenantId,
        key_sha256: &'a str,
        now_ms: i64,
        expires_ms: Option<i64>,
        actor: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await?;
            let done = sqlx::query(
                "INSERT INTO api_keys (key_sha256, tenant, created_ms, expires_ms) SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM tenants WHERE name = $2)",
            )
            .bind(key_sha256)
            .bind(tenant.as_str())
            .bind(now_ms)
            .bind(expires_ms)
            .execute(&mut *tx)
            .await?;
            let added = done.rows_affected() == 1;
            if added {
                let change = AdminChange {
                    action: AdminAction::KeyCreated,
                    tenant: tenant.as_str(),
                    key_id: Some(api_key_id(key_sha256)),
                    actor,
                };
                append_admin_entry(&mut tx, &change, now_ms).await?;
            }
            tx.commit().await?;
            Ok(added)
        })
    }

    fn tenant_by_key<'a>(
        &'a self,
        key_sha256: &'a str,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<Option<KeyGrant>, StoreError>> {
        Box::pin(async move {
            let row = sqlx::query(
                "SELECT tenant, expires_ms FROM api_keys WHERE key_sha256 = $1 AND (expires_ms IS NULL OR expires_ms > $2)",
            )
            .bind(key_sha256)
            .bind(now_ms)
            .fetch_optional(&self.pool)
            .await?;
            row.as_ref().map(key_grant_from_row).transpose()
        })
    }

    fn registered_tenants(&self) -> BoxFuture<'_, Result<Vec<TenantEntry>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT t.name, t.created_ms, (SELECT COUNT(*) FROM api_keys k WHERE k.tenant = t.name) AS keys FROM tenants t ORDER BY t.name",
            )
            .fetch_all(&self.pool)
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
                "SELECT key_sha256, created_ms, expires_ms FROM api_keys WHERE tenant = $1 ORDER BY created_ms, key_sha256",
            )
            .bind(tenant.as_str())
            .fetch_all(&self.pool)
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
            let mut tx = self.pool.begin().await?;
            let done = sqlx::query(
                "DELETE FROM api_keys WHERE tenant = $1 AND substr(key_sha256, 1, 16) = $2",
            )
            .bind(tenant.as_str())
            .bind(key_id)
            .execute(&mut *tx)
            .await?;
            let revoked = done.rows_affected() > 0;
            if revoked {
                let change = AdminChange {
                    action: AdminAction::KeyRevoked,
                    tenant: tenant.as_str(),
                    key_id: Some(key_id),
                    actor,
                };
                append_admin_entry(&mut tx, &change, now_ms).await?;
            }
            tx.commit().await?;
            Ok(revoked)
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
        Box::pin(async move {
            let mut tx = self.pool.begin().await?;
            let done = sqlx::query(
                "INSERT INTO tenant_secrets (tenant, name, sealed, updated_ms) SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM tenants WHERE name = $1) ON CONFLICT (tenant, name) DO UPDATE SET sealed = excluded.sealed, updated_ms = excluded.updated_ms",
            )
            .bind(tenant.as_str())
            .bind(name)
            .bind(sealed)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
            let set = done.rows_affected() > 0;
            if set {
                let change = AdminChange {
                    action: AdminAction::SecretSet,
                    tenant: tenant.as_str(),
                    key_id: Some(name),
                    actor,
                };
                append_admin_entry(&mut tx, &change, now_ms).await?;
            }
            tx.commit().await?;
            Ok(set)
        })
    }

    fn delete_secret<'a>(
        &'a self,
        tenant: &'a TenantId,
        name: &'a str,
        now_ms: i64,
        actor: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await?;
            let done = sqlx::query("DELETE FROM tenant_secrets WHERE tenant = $1 AND name = $2")
                .bind(tenant.as_str())
                .bind(name)
                .execute(&mut *tx)
                .await?;
            let removed = done.rows_affected() > 0;
            if removed {
                let change = AdminChange {
                    action: AdminAction::SecretDeleted,
                    tenant: tenant.as_str(),
                    key_id: Some(name),
                    actor,
                };
                append_admin_entry(&mut tx, &change, now_ms).await?;
            }
            tx.commit().await?;
            Ok(removed)
        })
    }

    fn secret_names<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> BoxFuture<'a, Result<Vec<SecretEntry>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT name, updated_ms FROM tenant_secrets WHERE tenant = $1 ORDER BY name",
            )
            .bind(tenant.as_str())
            .fetch_all(&self.pool)
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
            let rows: Vec<SealedSecret> = sqlx::query_as(
                "SELECT name, sealed FROM tenant_secrets WHERE tenant = $1 AND name = ANY($2) ORDER BY name",
            )
            .bind(tenant.as_str())
            .bind(names)
            .fetch_all(&self.pool)
            .await?;
            Ok(rows)
        })
    }

    fn admin_baseline(&self) -> BoxFuture<'_, Result<Vec<crate::BaselineItem>, StoreError>> {
        Box::pin(async move {
            let rows: Vec<crate::BaselineItem> =
                sqlx::query_as("SELECT tenant, key_id FROM admin_baseline ORDER BY tenant, key_id")
                    .fetch_all(&self.pool)
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
                                  AND updated_ms <= $1 THEN event_count END AS end_count,
                        CASE WHEN status IN ('completed', 'failed', 'limit_exceeded', 'cancelled', 'escalated')
                                  AND updated_ms <= $1 THEN head_hash END AS end_hash
                 FROM runs WHERE created_ms <= $1 AND id COLLATE \"C\" > $2 ORDER BY id COLLATE \"C\" LIMIT $3",
            )
            .bind(cutoff_ms)
            .bind(after.map_or("", RunId::as_str))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(anchored_run_from_row).collect()
        })
    }

    fn append_anchor<'a>(
        &'a self,
        anchor: &'a rein_core::anchor::Anchor,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let done = sqlx::query(
                "INSERT INTO audit_anchors (seq, ts_ms, cutoff_ms, admin_seq, admin_hash, runs, runs_sha256, prev_hash, hash)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (seq) DO NOTHING",
            )
            .bind(i64::try_from(anchor.seq).unwrap_or(i64::MAX))
            .bind(anchor.ts_ms)
            .bind(anchor.cutoff_ms)
            .bind(
                anchor
                    .admin_head
                    .as_ref()
                    .map(|(s, _)| i64::try_from(*s).unwrap_or(i64::MAX)),
            )
            .bind(anchor.admin_head.as_ref().map(|(_, h)| h.as_str()))
            .bind(i64::try_from(anchor.runs).unwrap_or(i64::MAX))
            .bind(&anchor.runs_sha256)
            .bind(&anchor.prev_hash)
            .bind(&anchor.hash)
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn anchors(
        &self,
        from: u64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<rein_core::anchor::Anchor>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT seq, ts_ms, cutoff_ms, admin_seq, admin_hash, runs, runs_sha256, prev_hash, hash
                 FROM audit_anchors WHERE seq >= $1 ORDER BY seq LIMIT $2",
            )
            .bind(i64::try_from(from).unwrap_or(i64::MAX))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
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
            .fetch_optional(&self.pool)
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
                "SELECT seq, ts_ms, action, tenant, key_id, actor, prev_hash, hash FROM admin_log WHERE seq >= $1 ORDER BY seq LIMIT $2",
            )
            .bind(i64::try_from(from).unwrap_or(i64::MAX))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(admin_entry_from_row).collect()
        })
    }

    fn admin_log_head(&self) -> BoxFuture<'_, Result<Option<u64>, StoreError>> {
        Box::pin(async move {
            let head: Option<i64> = sqlx::query_scalar("SELECT max(seq) FROM admin_log")
                .fetch_one(&self.pool)
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
        Box::pin(async move {
            sqlx::query("DELETE FROM dashboard_sessions WHERE expires_ms <= $1")
                .bind(now_ms)
                .execute(&self.pool)
                .await?;
            let done = sqlx::query(
                "INSERT INTO dashboard_sessions (token_sha256, key_sha256, expires_ms) SELECT $1, key_sha256, $2 FROM api_keys WHERE key_sha256 = $3 AND (expires_ms IS NULL OR expires_ms > $4)",
            )
            .bind(token_sha256)
            .bind(expires_ms)
            .bind(key_sha256)
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn dashboard_session<'a>(
        &'a self,
        token_sha256: &'a str,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<Option<TenantId>, StoreError>> {
        Box::pin(async move {
            let row = sqlx::query(
                "SELECT k.tenant FROM dashboard_sessions s JOIN api_keys k ON k.key_sha256 = s.key_sha256 WHERE s.token_sha256 = $1 AND s.expires_ms > $2 AND (k.expires_ms IS NULL OR k.expires_ms > $2)",
            )
            .bind(token_sha256)
            .bind(now_ms)
            .fetch_optional(&self.pool)
            .await?;
            row.map(|r| Ok(TenantId::new(r.text("tenant")?)))
                .transpose()
        })
    }

    fn sweep_dashboard_sessions(&self, now_ms: i64) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let done = sqlx::query("DELETE FROM dashboard_sessions WHERE expires_ms <= $1")
                .bind(now_ms)
                .execute(&self.pool)
                .await?;
            Ok(done.rows_affected())
        })
    }

    fn close_dashboard_session<'a>(
        &'a self,
        token_sha256: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let done = sqlx::query("DELETE FROM dashboard_sessions WHERE token_sha256 = $1")
                .bind(token_sha256)
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
                "INSERT INTO agents (tenant, name, version, spec, created_ms) SELECT $1, $2, coalesce(max(version), 0) + 1, $3, $4 FROM agents WHERE tenant = $5 AND name = $6 RETURNING version",
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
                "SELECT name, version, spec, created_ms FROM agents WHERE tenant = $1 AND name = $2 AND ($3::bigint IS NULL OR version = $4) ORDER BY version DESC LIMIT 1",
            )
            .bind(tenant.as_str())
            .bind(name)
            .bind(version)
            .bind(version)
            .fetch_optional(&self.pool)
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
                "SELECT a.name, a.version, a.spec, a.created_ms FROM agents a WHERE a.tenant = $1 AND a.version = (SELECT max(version) FROM agents b WHERE b.tenant = a.tenant AND b.name = a.name) ORDER BY a.name",
            )
            .bind(tenant.as_str())
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(agent_from_row).collect()
        })
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
