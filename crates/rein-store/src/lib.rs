//! Rein's durable store: runs and their hash-chained event logs.
//!
//! Two engines behind one [`Store`] trait: SQLite, embedded, the default ([`SqliteStore`]),
//! and PostgreSQL for several stateless workers on one database ([`PgStore`]). Both pass one
//! conformance suite (`tests/conformance.rs`).
//!
//! The event log is the source of truth; the `runs` row is a projection of it, brought up to
//! date by the write that appends the events (`summary::Appended`, once per append, on both
//! engines), so listings never disagree with the log. Every query takes the caller's tenant: a
//! run of another tenant is simply not found.
//!
//! This crate depends on the core for event and run types; it must never depend on providers,
//! tools or the driver.

mod appends;
mod counters;
mod postgres;
mod sqlite;
mod summary;
#[cfg(feature = "testing")]
pub mod testing;
mod writer;

pub use appends::Appends;
pub use postgres::PgStore;
pub use sqlite::{Durability, SqliteStore};

use rein_core::admin_log::AdminEntry;
use rein_core::budget::{Amount, BoxFuture, Counters, Reservation, Scope, Standing};
use rein_core::{
    JobId, RunId, RunStatus, SealedEvent, SessionId, TenantId, TerminationReason, Usage, Usd,
    UserId,
};
use std::sync::Arc;

/// What can go wrong talking to the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened, read or written.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The schema could not be brought up to date.
    #[error(transparent)]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// SQLite's writer connection could not write.
    #[error(transparent)]
    Write(#[from] rusqlite::Error),
    /// SQLite's writer thread could not take or answer a write.
    #[error("the SQLite writer: {0}")]
    Writer(String),
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

/// How [`Store::costs`] groups spend.
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

impl CostGroup {
    /// Every grouping, in the order `rein costs --by` lists them.
    pub const ALL: [CostGroup; 5] = [
        CostGroup::Tenant,
        CostGroup::User,
        CostGroup::Agent,
        CostGroup::Model,
        CostGroup::Day,
    ];

    /// The grouping's name, as `--by` and `?by=` take it.
    pub fn name(self) -> &'static str {
        match self {
            CostGroup::Tenant => "tenant",
            CostGroup::User => "user",
            CostGroup::Agent => "agent",
            CostGroup::Model => "model",
            CostGroup::Day => "day",
        }
    }

    /// The grouping named `name`, if any.
    pub fn named(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|g| g.name() == name)
    }
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
    /// For a worker agent's run, the run that called it: only that run continues it, so it is
    /// never claimed on its own.
    pub parent: Option<RunId>,
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
    /// Who asked to cancel the run while another process drove it ([`Store::request_cancel`]),
    /// if anyone has.
    pub cancel_requested_by: Option<String>,
    /// Who holds (or last held) the run's lease, and until when, ms since the epoch.
    pub lease: Option<(String, i64)>,
}

/// A tenant created for `rein serve` (by the CLI or the admin API).
#[derive(Clone, Debug, PartialEq)]
pub struct TenantEntry {
    /// Its name.
    pub name: TenantId,
    /// Created, ms since the epoch.
    pub created_ms: i64,
    /// How many API keys it has.
    pub keys: u64,
}

/// One of a tenant's API keys, as listed: never the key, nor its whole hash.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiKeyEntry {
    /// The key's id: the first 16 hex digits of its SHA-256, enough to revoke it by.
    pub id: String,
    /// Created, ms since the epoch.
    pub created_ms: i64,
    /// When it stops authenticating, ms since the epoch; `None`: never.
    pub expires_ms: Option<i64>,
}

/// One of a tenant's secrets, as listed: its name and when it was last set, never its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretEntry {
    /// The name specs refer to it by (`${NAME}`, `api_key_env: NAME`).
    pub name: String,
    /// Last set, ms since the epoch.
    pub updated_ms: i64,
}

/// A tenant (`(tenant, None)`) or key (`(tenant, Some(key id))`) stored before the admin log
/// began.
pub type BaselineItem = (String, Option<String>);

/// A secret's name and its value as sealed by the caller.
pub type SealedSecret = (String, Vec<u8>);

/// What a valid API key grants: its tenant, until `expires_ms` (`None`: for good).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyGrant {
    /// The key's tenant.
    pub tenant: TenantId,
    /// When the key stops authenticating, ms since the epoch.
    pub expires_ms: Option<i64>,
}

impl KeyGrant {
    /// Whether the key still authenticates at `now_ms`.
    pub fn valid_at(&self, now_ms: i64) -> bool {
        self.expires_ms.is_none_or(|until| now_ms < until)
    }
}

/// The id of the API key whose SHA-256 (hex) is `key_sha256`.
pub fn api_key_id(key_sha256: &str) -> &str {
    key_sha256.get(..API_KEY_ID_LEN).unwrap_or(key_sha256)
}

/// Hex digits in an API key's id.
pub const API_KEY_ID_LEN: usize = 16;

/// Who drives a run, and until when (ms since the epoch) unless renewed.
#[derive(Clone, Copy, Debug)]
pub struct Lease<'a> {
    /// The holder (a worker's or process's id).
    pub owner: &'a str,
    /// Expiry.
    pub until_ms: i64,
}

/// A reservation to make on a store's own budget counters ([`Store::reserve_and_write`]); the
/// arguments of [`Counters::reserve`].
#[derive(Clone, Copy, Debug)]
pub struct Hold<'a> {
    /// The reservation's id.
    pub id: &'a str,
    /// Every capped scope it holds in.
    pub scopes: &'a [Scope],
    /// The worst case held.
    pub amount: Amount,
    /// Now, ms since the epoch (expired holds are released against it).
    pub now_ms: i64,
    /// When the hold expires if never settled.
    pub expires_ms: i64,
}

/// A settlement to make on a store's own budget counters ([`Store::settle_and_write`]); the
/// arguments of [`Counters::settle`].
#[derive(Clone, Copy, Debug)]
pub struct Settlement<'a> {
    /// The reservation's id.
    pub id: &'a str,
    /// Its scopes.
    pub scopes: &'a [Scope],
    /// What the call actually spent.
    pub actual: Amount,
    /// A `budget_warning` is due when the settlement crosses this percentage of a scope's cap.
    pub warn_percent: u8,
    /// How many of the events, at their end, end the run: they are written only if the
    /// settlement crosses no warning line (the warning must be recorded before the run ends);
    /// otherwise the events before them are written without them.
    pub end: usize,
}

impl Settlement<'_> {
    /// Whether the settlement crossed a warning line, given the standings right after it.
    pub fn warns(&self, standings: &[Standing]) -> bool {
        !rein_core::budget::warnings(self.scopes, standings, &self.actual, self.warn_percent)
            .is_empty()
    }

    /// How many of `count` events to write, given the standings after the settlement.
    pub fn writes(&self, count: usize, standings: &[Standing]) -> usize {
        if self.warns(standings) {
            count.saturating_sub(self.end)
        } else {
            count
        }
    }
}

/// Where runs and their logs live. Object safe, so a process picks its engine at start-up
/// (`--db PATH` or `--db postgres://...`) and everything above holds an `Arc<dyn Store>`.
///
/// Every store is also the embedded [`Counters`] (budgets, breakers) for the processes that
/// share it.
pub trait Store: Counters + std::fmt::Debug + Send + Sync + 'static {
    /// Records a new run together with the first events of its log (`run_started`, and the
    /// session context it starts from) in one transaction: a run is never stored without the
    /// events that start it, so a process killed at any point leaves either nothing or a run
    /// that can be resumed. `lease` is `None` for a queued run (a worker will claim it), or
    /// its holder and expiry.
    fn create_run<'a>(
        &'a self,
        run: &'a RunInfo,
        first: &'a [SealedEvent],
        lease: Option<Lease<'a>>,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Appends one sealed event; the run's summary row follows from it atomically. Fails with
    /// [`StoreError::Conflict`] if the run is not `tenant`'s or its log does not end just
    /// before `event.seq` (another writer got there first), so two writers can never
    /// interleave events in one run.
    fn append<'a>(
        &'a self,
        tenant: &'a TenantId,
        event: &'a SealedEvent,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Appends consecutive sealed events, as [`Store::append`] does each, in order. A store may
    /// write them in one statement (all or none); the default appends them one by one, so
    /// after a failure a prefix may be written, each event of it valid.
    fn append_all<'a>(
        &'a self,
        tenant: &'a TenantId,
        events: &'a [SealedEvent],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            for event in events {
                self.append(tenant, event).await?;
            }
            Ok(())
        })
    }

    /// Reserves `hold` on this store's own budget counters and, if every scope grants it,
    /// writes `events` in the same transaction: `new_run` first, with its lease, as
    /// [`Store::create_run`] stores it, else appended as [`Store::append_all`] appends them.
    /// A refusal writes nothing (the run is not created either). For a driver whose counters
    /// are this store: a model call's reservation goes in with the events before the call, one
    /// commit instead of two.
    fn reserve_and_write<'a>(
        &'a self,
        tenant: &'a TenantId,
        new_run: Option<(&'a RunInfo, Option<Lease<'a>>)>,
        events: &'a [SealedEvent],
        hold: Hold<'a>,
    ) -> BoxFuture<'a, Result<Reservation, StoreError>>;

    /// Settles on this store's own budget counters, as [`Counters::settle`] does, and writes
    /// `events` as [`Store::reserve_and_write`] does (without the last `settlement.end` of them
    /// when the settlement crosses a warning line: [`Settlement::writes`]), all in one
    /// transaction or none of it. Returns the scopes' standings after the settlement.
    fn settle_and_write<'a>(
        &'a self,
        tenant: &'a TenantId,
        new_run: Option<(&'a RunInfo, Option<Lease<'a>>)>,
        events: &'a [SealedEvent],
        settlement: Settlement<'a>,
    ) -> BoxFuture<'a, Result<Vec<Standing>, StoreError>>;

    /// Claims a run a worker may drive: a queued one, a running one whose lease expired (its
    /// holder died), or one awaiting an approval that timed out (so its policy happens). Fair
    /// between tenants: the oldest run of the tenant with the fewest runs being driven now
    /// (leased and not ended, in any process), so no tenant's backlog delays another's first
    /// run; and, with `per_tenant`, none of a tenant that already has that many driven (claims
    /// with a cap take turns, so racing ones cannot pass it). Two workers never claim the same
    /// run.
    fn claim<'a>(
        &'a self,
        lease: Lease<'a>,
        now_ms: i64,
        per_tenant: Option<u32>,
    ) -> BoxFuture<'a, Result<Option<(TenantId, RunId)>, StoreError>>;

    /// Takes the lease on `run` for `lease.owner` if no one else holds a live one; `false`
    /// when another process is driving it.
    fn acquire<'a>(
        &'a self,
        run: &'a RunId,
        lease: Lease<'a>,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Extends `lease.owner`'s lease on `run`; `false` when the lease is no longer theirs.
    fn renew<'a>(
        &'a self,
        run: &'a RunId,
        lease: Lease<'a>,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Records that `by` asks to cancel `tenant`'s `run`, which another process drives: that
    /// process finds the request among its runs' ([`Store::cancel_requests`]) and ends the run
    /// before its next step. `false` when the run has ended (nothing is recorded). A second
    /// request changes nothing: the first one's author is the one kept.
    fn request_cancel<'a>(
        &'a self,
        tenant: &'a TenantId,
        run: &'a RunId,
        by: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Of `runs`, those someone asked to cancel ([`Store::request_cancel`]), each with who asked.
    fn cancel_requests<'a>(
        &'a self,
        runs: &'a [RunId],
    ) -> BoxFuture<'a, Result<Vec<(RunId, String)>, StoreError>>;

    /// Gives `owner`'s lease on `run` up (the run finished, or waits for a person).
    fn release<'a>(
        &'a self,
        run: &'a RunId,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// How many runs, of every tenant, are queued or running (an operator's view for workers).
    fn unfinished(&self) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// The newest run of `tenant`'s `session`, if any.
    fn latest_in_session<'a>(
        &'a self,
        tenant: &'a TenantId,
        session: &'a SessionId,
    ) -> BoxFuture<'a, Result<Option<RunRecord>, StoreError>>;

    /// One run of `tenant`.
    fn run<'a>(
        &'a self,
        tenant: &'a TenantId,
        id: &'a RunId,
    ) -> BoxFuture<'a, Result<RunRecord, StoreError>>;

    /// The newest runs of `tenant` that pass `filter`, newest first.
    fn list_runs<'a>(
        &'a self,
        tenant: &'a TenantId,
        filter: &'a RunFilter,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<RunRecord>, StoreError>>;

    /// How many runs are queued, running or awaiting approval, per tenant and status (the
    /// operator's metrics; no tenant sees another's).
    fn open_run_counts(&self) -> BoxFuture<'_, Result<Vec<RunCount>, StoreError>>;

    /// The ids of `tenant`'s runs, oldest first, a page at a time (for audits): at most
    /// `limit` of them, starting after the run `after`. A run `after` that is not one of
    /// `tenant`'s gives an empty page.
    fn run_ids<'a>(
        &'a self,
        tenant: &'a TenantId,
        after: Option<&'a RunId>,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<RunId>, StoreError>>;

    /// Every tenant that owns at least one run (operator audits only: this is the one query
    /// that is not scoped to a tenant).
    fn tenants(&self) -> BoxFuture<'_, Result<Vec<TenantId>, StoreError>>;

    /// Spend from recorded model calls since `since_ms`, grouped: for one tenant, or for
    /// every tenant when `tenant` is `None` (an operator query).
    fn costs<'a>(
        &'a self,
        tenant: Option<&'a TenantId>,
        group: CostGroup,
        since_ms: i64,
    ) -> BoxFuture<'a, Result<Vec<CostLine>, StoreError>>;

    /// Runs that have events but no run row (its row was removed behind Rein's back). An
    /// operator query for audits, like [`Store::tenants`].
    fn orphaned_logs(&self) -> BoxFuture<'_, Result<Vec<RunId>, StoreError>>;

    /// A run's events in log order.
    fn events<'a>(
        &'a self,
        tenant: &'a TenantId,
        id: &'a RunId,
    ) -> BoxFuture<'a, Result<Vec<SealedEvent>, StoreError>> {
        self.events_from(tenant, id, 0)
    }

    /// `tenant`'s run's events from position `from` on, in order: what a live reader has not
    /// seen yet, without reading the whole log again.
    fn events_from<'a>(
        &'a self,
        tenant: &'a TenantId,
        id: &'a RunId,
        from: u64,
    ) -> BoxFuture<'a, Result<Vec<SealedEvent>, StoreError>>;

    /// Follows run `id`'s appends from now on: what an event stream or a request waiting for
    /// the run waits on between reads of its log, instead of reading it over and over. The
    /// caller must already know the run is its tenant's (it names only the run). See
    /// [`Appends`] for which appends are heard. Called within a Tokio runtime.
    fn follow(&self, id: &RunId) -> Appends;

    /// Follows the runs that become claimable (queued, or a lease given up): what an idle
    /// worker waits on between claims. Runs whose lease or approval expires are not announced:
    /// a worker still looks now and then.
    fn follow_claimable(&self) -> Appends;

    /// Flushes what the engine buffers and closes every connection.
    fn close(&self) -> BoxFuture<'_, ()>;

    /// Creates a tenant (for `rein serve`'s API keys and agents), at `actor`'s request, and
    /// records it in the admin log in the same transaction; `false` if it exists.
    fn create_tenant<'a>(
        &'a self,
        tenant: &'a TenantId,
        now_ms: i64,
        actor: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Stores an API key of `tenant` by its SHA-256 (hex), valid until `expires_ms` (`None`:
    /// for good), at `actor`'s request, and records it (by its id) in the admin log in the
    /// same transaction; `false` if there is no such tenant.
    fn add_api_key<'a>(
        &'a self,
        tenant: &'a TenantId,
        key_sha256: &'a str,
        now_ms: i64,
        expires_ms: Option<i64>,
        actor: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// The tenant whose API key has this SHA-256 (hex), and until when the key is valid, if
    /// there is such a key and it has not expired by `now_ms`.
    fn tenant_by_key<'a>(
        &'a self,
        key_sha256: &'a str,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<Option<KeyGrant>, StoreError>>;

    /// Every tenant created with [`Store::create_tenant`], by name, with its key count.
    fn registered_tenants(&self) -> BoxFuture<'_, Result<Vec<TenantEntry>, StoreError>>;

    /// `tenant`'s API keys, oldest first.
    fn api_keys<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> BoxFuture<'a, Result<Vec<ApiKeyEntry>, StoreError>>;

    /// Revokes `tenant`'s API key whose id ([`api_key_id`]) is `key_id`, at `actor`'s
    /// request: it authenticates no more, and the admin log records it in the same
    /// transaction. `false` if `tenant` has no such key.
    fn revoke_api_key<'a>(
        &'a self,
        tenant: &'a TenantId,
        key_id: &'a str,
        now_ms: i64,
        actor: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Stores `tenant`'s secret `name` as `sealed` (already encrypted by the caller), replacing
    /// any value it had, at `actor`'s request, and records it (by name, never the value) in
    /// the admin log in the same transaction; `false` if there is no such tenant.
    fn set_secret<'a>(
        &'a self,
        tenant: &'a TenantId,
        name: &'a str,
        sealed: &'a [u8],
        now_ms: i64,
        actor: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Deletes `tenant`'s secret `name` at `actor`'s request, recorded in the admin log in the
    /// same transaction; `false` if it has none of that name.
    fn delete_secret<'a>(
        &'a self,
        tenant: &'a TenantId,
        name: &'a str,
        now_ms: i64,
        actor: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// The names of `tenant`'s secrets, by name.
    fn secret_names<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> BoxFuture<'a, Result<Vec<SecretEntry>, StoreError>>;

    /// The sealed values of those of `names` that `tenant` has, by name.
    fn sealed_secrets<'a>(
        &'a self,
        tenant: &'a TenantId,
        names: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<SealedSecret>, StoreError>>;

    /// The tenants and keys stored before the admin log began (so without entries in it), as
    /// `(tenant, None)` and `(tenant, Some(key id))`.
    fn admin_baseline(&self) -> BoxFuture<'_, Result<Vec<BaselineItem>, StoreError>>;

    /// Runs created by `cutoff_ms`, in id order after `after`, at most `limit`, as an audit
    /// anchor covers them (the final head of each that had ended by the cutoff). An operator
    /// query, across tenants, like [`Store::tenants`].
    fn anchor_runs<'a>(
        &'a self,
        cutoff_ms: i64,
        after: Option<&'a RunId>,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<rein_core::anchor::AnchoredRun>, StoreError>>;

    /// Appends an audit anchor; `false` if one already holds its position (another process
    /// anchored first).
    fn append_anchor<'a>(
        &'a self,
        anchor: &'a rein_core::anchor::Anchor,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Audit anchors from position `from` on, oldest first, at most `limit`.
    fn anchors(
        &self,
        from: u64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<rein_core::anchor::Anchor>, StoreError>>;

    /// The latest audit anchor, if any.
    fn last_anchor(&self) -> BoxFuture<'_, Result<Option<rein_core::anchor::Anchor>, StoreError>>;

    /// The admin log ([`rein_core::admin_log`]) from position `from` on, oldest first: at most
    /// `limit` entries. An operator query, like [`Store::tenants`].
    fn admin_log(
        &self,
        from: u64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<AdminEntry>, StoreError>>;

    /// Removes the dashboard sessions that expired by `now_ms`; how many. (Opening a session
    /// sweeps too; a server also does this now and then, so they go even if nobody signs in.)
    fn sweep_dashboard_sessions(&self, now_ms: i64) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// The position of the admin log's newest entry; `None` while the log is empty. A server
    /// watches it to learn of changes to keys made by other processes.
    fn admin_log_head(&self) -> BoxFuture<'_, Result<Option<u64>, StoreError>>;

    /// Opens a dashboard session for the API key whose SHA-256 (hex) is `key_sha256`: the
    /// browser keeps a random token, the store only the token's SHA-256, until `expires_ms`.
    /// `false` if there is no such key. Sessions that expired by `now_ms` are removed.
    fn open_dashboard_session<'a>(
        &'a self,
        token_sha256: &'a str,
        key_sha256: &'a str,
        now_ms: i64,
        expires_ms: i64,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// The tenant signed in by the dashboard session whose token has this SHA-256 (hex): none
    /// once the session expired (by `now_ms`) or was closed, or its key was revoked.
    fn dashboard_session<'a>(
        &'a self,
        token_sha256: &'a str,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<Option<TenantId>, StoreError>>;

    /// Closes (signs out) the dashboard session whose token has this SHA-256; `false` if
    /// there is none.
    fn close_dashboard_session<'a>(
        &'a self,
        token_sha256: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Registers `spec` as the next version of `tenant`'s agent `name` (1 for a new name) and
    /// returns that version. [`StoreError::Conflict`]-free: two registrations at once get two
    /// versions, or one fails with a database error to retry.
    fn register_agent<'a>(
        &'a self,
        tenant: &'a TenantId,
        name: &'a str,
        spec: &'a str,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<u32, StoreError>>;

    /// `tenant`'s agent `name` at `version`, or its newest version when `version` is `None`.
    fn agent<'a>(
        &'a self,
        tenant: &'a TenantId,
        name: &'a str,
        version: Option<u32>,
    ) -> BoxFuture<'a, Result<Option<StoredAgent>, StoreError>>;

    /// The newest version of each of `tenant`'s agents, by name.
    fn agents<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> BoxFuture<'a, Result<Vec<StoredAgent>, StoreError>>;
}

/// Which runs [`Store::list_runs`] lists; `None` fields match every run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunFilter {
    /// Only runs in this state.
    pub status: Option<RunStatus>,
    /// Only runs of this agent.
    pub agent: Option<String>,
    /// Only runs attributed to this user.
    pub user: Option<UserId>,
    /// Only runs that ended for this reason.
    pub reason: Option<TerminationReason>,
    /// Only runs of this session.
    pub session: Option<SessionId>,
    /// Only runs older than this one (by creation, then id: the list's order), to read the
    /// page after one that ended with it. A run that is not the tenant's matches nothing.
    pub before: Option<RunId>,
}

/// An agent spec registered over the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredAgent {
    /// Name.
    pub name: String,
    /// Version (1, 2, ... per tenant and name).
    pub version: u32,
    /// The spec source (YAML).
    pub spec: String,
    /// When it was registered, ms since the epoch.
    pub created_ms: i64,
}

fn tenant_from_row(r: &impl Columns) -> Result<TenantEntry, StoreError> {
    Ok(TenantEntry {
        name: TenantId::new(r.text("name")?),
        created_ms: r.int("created_ms")?,
        keys: r.count("keys")?,
    })
}

fn admin_entry_from_row(r: &impl Columns) -> Result<AdminEntry, StoreError> {
    Ok(AdminEntry {
        seq: r.count("seq")?,
        ts_ms: r.int("ts_ms")?,
        action: r.text("action")?,
        tenant: r.text("tenant")?,
        key_id: r.opt_text("key_id")?,
        actor: r.text("actor")?,
        prev_hash: r.text("prev_hash")?,
        hash: r.text("hash")?,
    })
}

fn key_grant_from_row(r: &impl Columns) -> Result<KeyGrant, StoreError> {
    Ok(KeyGrant {
        tenant: TenantId::new(r.text("tenant")?),
        expires_ms: r.opt_int("expires_ms")?,
    })
}

fn secret_entry_from_row(r: &impl Columns) -> Result<SecretEntry, StoreError> {
    Ok(SecretEntry {
        name: r.text("name")?,
        updated_ms: r.int("updated_ms")?,
    })
}

fn anchored_run_from_row(r: &impl Columns) -> Result<rein_core::anchor::AnchoredRun, StoreError> {
    let ended = match (r.opt_int("end_count")?, r.opt_text("end_hash")?) {
        (Some(count), Some(hash)) => Some((u64::try_from(count).unwrap_or(0), hash)),
        _ => None,
    };
    Ok(rein_core::anchor::AnchoredRun {
        id: r.text("id")?,
        tenant: r.text("tenant")?,
        ended,
    })
}

fn anchor_from_row(r: &impl Columns) -> Result<rein_core::anchor::Anchor, StoreError> {
    let admin_head = match (r.opt_int("admin_seq")?, r.opt_text("admin_hash")?) {
        (Some(seq), Some(hash)) => Some((u64::try_from(seq).unwrap_or(0), hash)),
        _ => None,
    };
    Ok(rein_core::anchor::Anchor {
        seq: r.count("seq")?,
        ts_ms: r.int("ts_ms")?,
        cutoff_ms: r.int("cutoff_ms")?,
        admin_head,
        runs: r.count("runs")?,
        runs_sha256: r.text("runs_sha256")?,
        prev_hash: r.text("prev_hash")?,
        hash: r.text("hash")?,
    })
}

fn api_key_from_row(r: &impl Columns) -> Result<ApiKeyEntry, StoreError> {
    Ok(ApiKeyEntry {
        id: api_key_id(&r.text("key_sha256")?).to_string(),
        created_ms: r.int("created_ms")?,
        expires_ms: r.opt_int("expires_ms")?,
    })
}

fn agent_from_row(r: &impl Columns) -> Result<StoredAgent, StoreError> {
    Ok(StoredAgent {
        name: r.text("name")?,
        version: u32::try_from(r.count("version")?).unwrap_or(u32::MAX),
        spec: r.text("spec")?,
        created_ms: r.int("created_ms")?,
    })
}

/// Whether `events` are consecutive positions of one run, as one append may write them.
fn consecutive(events: &[SealedEvent]) -> bool {
    events.first().is_none_or(|first| {
        events
            .iter()
            .zip(first.seq..)
            .all(|(e, seq)| e.seq == seq && e.run_id == first.run_id)
    })
}

/// Where `--db` points: a PostgreSQL URL, or else the path of an SQLite file.
pub fn is_postgres_url(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

/// Opens the store `db` names (see [`is_postgres_url`]) and brings its schema up to date.
pub async fn open(db: &str, durability: Durability) -> Result<Arc<dyn Store>, StoreError> {
    Ok(if is_postgres_url(db) {
        Arc::new(PgStore::connect(db).await?)
    } else {
        Arc::new(SqliteStore::open(db, durability).await?)
    })
}

/// Typed column reads shared by both engines' rows (integers are 64-bit in both schemas).
trait Columns {
    fn text(&self, name: &str) -> Result<String, sqlx::Error>;
    fn opt_text(&self, name: &str) -> Result<Option<String>, sqlx::Error>;
    fn int(&self, name: &str) -> Result<i64, sqlx::Error>;
    fn opt_int(&self, name: &str) -> Result<Option<i64>, sqlx::Error>;
    fn count(&self, name: &str) -> Result<u64, sqlx::Error> {
        Ok(self.int(name)?.max(0) as u64)
    }
}

macro_rules! columns_for {
    ($row:ty) => {
        impl Columns for $row {
            fn text(&self, name: &str) -> Result<String, sqlx::Error> {
                sqlx::Row::try_get(self, name)
            }
            fn opt_text(&self, name: &str) -> Result<Option<String>, sqlx::Error> {
                sqlx::Row::try_get(self, name)
            }
            fn int(&self, name: &str) -> Result<i64, sqlx::Error> {
                sqlx::Row::try_get(self, name)
            }
            fn opt_int(&self, name: &str) -> Result<Option<i64>, sqlx::Error> {
                sqlx::Row::try_get(self, name)
            }
        }
    };
}
columns_for!(sqlx::sqlite::SqliteRow);
columns_for!(sqlx::postgres::PgRow);

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

fn run_from_row(r: &impl Columns) -> Result<RunRecord, StoreError> {
    let id = RunId::new(r.text("id")?);
    let status = r.text("status")?;
    let reason = r.opt_text("termination_reason")?;
    let output = r
        .opt_text("output")?
        .map(|o| serde_json::from_str(&o))
        .transpose()
        .map_err(|e| StoreError::Corrupt {
            run_id: id.clone(),
            field: "output",
            message: e.to_string(),
        })?;
    let info = RunInfo {
        id: id.clone(),
        tenant: TenantId::new(r.text("tenant")?),
        user: UserId::new(r.text("user_id")?),
        session: SessionId::new(r.text("session_id")?),
        job: r.opt_text("job_id")?.map(JobId::new),
        agent: r.text("agent")?,
        agent_version: u32::try_from(r.count("agent_version")?).unwrap_or(u32::MAX),
        spec: r.text("spec")?,
        input: r.text("input")?,
        created_ms: r.int("created_ms")?,
        parent: r.opt_text("parent_run_id")?.map(RunId::new),
    };
    Ok(RunRecord {
        progress: Progress {
            status: parse_enum(&id, "status", &status)?,
            reason: reason
                .map(|r| parse_enum(&id, "termination_reason", &r))
                .transpose()?,
            detail: r.opt_text("detail")?,
            output,
            iterations: u32::try_from(r.count("iterations")?).unwrap_or(u32::MAX),
            tool_calls: u32::try_from(r.count("tool_calls")?).unwrap_or(u32::MAX),
            usage: Usage {
                input_tokens: r.count("input_tokens")?,
                cached_input_tokens: r.count("cached_input_tokens")?,
                cache_write_tokens: 0,
                output_tokens: r.count("output_tokens")?,
            },
            cost: Usd::from_micros(r.int("cost_micros")?),
        },
        event_count: r.count("event_count")?,
        head_hash: r.text("head_hash")?,
        updated_ms: r.int("updated_ms")?,
        cancel_requested_by: r.opt_text("cancel_requested_by")?,
        lease: r
            .opt_text("lease_owner")?
            .map(|owner| r.int("lease_until_ms").map(|until| (owner, until)))
            .transpose()?,
        info,
    })
}

fn event_from_row(id: &RunId, r: &impl Columns) -> Result<SealedEvent, StoreError> {
    Ok(SealedEvent {
        run_id: id.clone(),
        seq: r.count("seq")?,
        ts_ms: r.int("ts_ms")?,
        kind: r.text("kind")?,
        payload: r.opt_text("payload")?,
        payload_sha256: r.text("payload_sha256")?,
        prev_hash: r.text("prev_hash")?,
        hash: r.text("hash")?,
    })
}

fn cost_from_row(r: &impl Columns) -> Result<CostLine, StoreError> {
    Ok(CostLine {
        key: r.opt_text("key")?.unwrap_or_default(),
        calls: r.count("calls")?,
        usage: Usage {
            input_tokens: r.count("input_tokens")?,
            cached_input_tokens: r.count("cached_input_tokens")?,
            cache_write_tokens: 0,
            output_tokens: r.count("output_tokens")?,
        },
        cost: Usd::from_micros(r.int("micros")?),
    })
}

/// A database error as the budget counters report it.
fn counters_error(e: sqlx::Error) -> rein_core::budget::CountersError {
    rein_core::budget::CountersError(e.to_string())
}

/// A count as both schemas store it.
fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// How many runs of one tenant have one status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunCount {
    /// Tenant.
    pub tenant: TenantId,
    /// Status.
    pub status: RunStatus,
    /// Runs.
    pub runs: u64,
}

/// The `open_run_counts` query, the same on both engines.
const OPEN_RUN_COUNTS: &str = "SELECT tenant, status, count(*) AS n FROM runs WHERE status IN ('queued', 'running', 'awaiting_approval') GROUP BY tenant, status ORDER BY tenant, status";

/// An `open_run_counts` row.
fn open_run_count_from_row(r: &impl Columns) -> Result<RunCount, StoreError> {
    let tenant = TenantId::new(r.text("tenant")?);
    let status = r.text("status")?;
    let status =
        serde_json::from_value(serde_json::Value::String(status.clone())).map_err(|e| {
            StoreError::Corrupt {
                run_id: RunId::new(""),
                field: "status",
                message: format!("{status}: {e}"),
            }
        })?;
    Ok(RunCount {
        tenant,
        status,
        runs: r.count("n")?,
    })
}

/// A `budget_counters` row.
fn standing_from_row(r: &impl Columns) -> Result<rein_core::budget::Standing, sqlx::Error> {
    use rein_core::budget::{Amount, Standing};
    Ok(Standing {
        spent: Amount {
            usd: Usd::from_micros(r.int("spent_micros")?),
            tokens: r.count("spent_tokens")?,
        },
        reserved: Amount {
            usd: Usd::from_micros(r.int("reserved_micros")?),
            tokens: r.count("reserved_tokens")?,
        },
    })
}

/// The first events a new run is stored with must start its own log at position 0.
fn check_first(run: &RunInfo, first: &[SealedEvent]) -> Result<(), StoreError> {
    let starts = first
        .first()
        .is_some_and(|e| e.seq == 0 && e.kind == "run_started");
    if !starts || first.iter().any(|e| e.run_id != run.id) {
        return Err(StoreError::Conflict {
            run_id: run.id.clone(),
            seq: 0,
        });
    }
    Ok(())
}

/// `db` as it may be shown (errors, logs): a PostgreSQL URL's password is masked.
pub fn redact_url(db: &str) -> String {
    let Some((scheme, rest)) = db.split_once("://") else {
        return db.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => match rest[..at].split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***{}", &rest[at..]),
            None => db.to_string(),
        },
        None => db.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_urls_password_is_never_shown() {
        assert_eq!(
            redact_url("postgres://rein:s3cr@t@db.internal:5432/rein?sslmode=require"),
            "postgres://rein:***@db.internal:5432/rein?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://rein@db/rein"),
            "postgres://rein@db/rein"
        );
        assert_eq!(redact_url("runs/rein.db"), "runs/rein.db");
        assert!(is_postgres_url("postgresql://h/d") && !is_postgres_url("./postgres.db"));
    }
}
