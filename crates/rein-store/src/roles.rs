//! The roles a store plays, one trait each, and [`Store`], which is all of them: a program
//! holds an `Arc<dyn Store>`, and an engine implements each role in a file of its own.

use crate::*;
use rein_core::admin_log::AdminEntry;
use rein_core::budget::{BoxFuture, Counters, Reservation, Standing};
use rein_core::{RunId, SealedEvent, SessionId, TenantId};

/// A store's run log: runs and their hash-chained events, written with the budget holds and
/// settlements around them, read back for listings, costs and followers.
pub trait RunLog: Send + Sync {
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
}

/// Who drives a run: leases claimed, acquired, renewed and released, and cancel requests for
/// runs another process drives.
pub trait Leases: Send + Sync {
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
}

/// Tenants, their API keys and sealed secrets, and the admin log that records every change to
/// them.
pub trait Tenancy: Send + Sync {
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

    /// The admin log ([`rein_core::admin_log`]) from position `from` on, oldest first: at most
    /// `limit` entries. An operator query, like [`Store::tenants`].
    fn admin_log(
        &self,
        from: u64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<AdminEntry>, StoreError>>;

    /// The position of the admin log's newest entry; `None` while the log is empty. A server
    /// watches it to learn of changes to keys made by other processes.
    fn admin_log_head(&self) -> BoxFuture<'_, Result<Option<u64>, StoreError>>;
}

/// Audit anchors: the admin log's head and a digest of every run, chained, so a later audit
/// finds runs removed or logs cut short.
pub trait Anchors: Send + Sync {
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
}

/// Agent specs registered over the API, versioned per tenant.
pub trait AgentRegistry: Send + Sync {
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

/// The dashboard's sign-in sessions (a random token's hash, never the API key).
pub trait DashboardSessions: Send + Sync {
    /// Removes the dashboard sessions that expired by `now_ms`; how many. (Opening a session
    /// sweeps too; a server also does this now and then, so they go even if nobody signs in.)
    fn sweep_dashboard_sessions(&self, now_ms: i64) -> BoxFuture<'_, Result<u64, StoreError>>;

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
}

/// Where runs and their logs live. Object safe, so a process picks its engine at start-up
/// (`--db PATH` or `--db postgres://...`) and everything above holds an `Arc<dyn Store>`.
///
/// Every store is also the embedded [`Counters`] (budgets, breakers) for the processes that
/// share it.
///
/// Its methods are grouped by the role they play ([`RunLog`], [`Leases`], [`Tenancy`],
/// [`Anchors`], [`AgentRegistry`], [`DashboardSessions`]); `use rein_store::prelude::*` brings
/// them all into scope.
pub trait Store:
    RunLog
    + Leases
    + Tenancy
    + Anchors
    + AgentRegistry
    + DashboardSessions
    + Counters
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    /// Flushes what the engine buffers and closes every connection.
    fn close(&self) -> BoxFuture<'_, ()>;
}
