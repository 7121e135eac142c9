//! Rein's durable store: runs and their hash-chained event logs.
//!
//! Two engines behind one [`Store`] trait: SQLite, embedded, the default ([`SqliteStore`]),
//! and PostgreSQL for several stateless workers on one database ([`PgStore`]). Both pass one
//! conformance suite (`conformance`, with the `testing` feature), which a third engine can run.
//!
//! The event log is the source of truth; the `runs` row is a projection of it, brought up to
//! date by the write that appends the events (`summary::Appended`, once per append, on both
//! engines), so listings never disagree with the log. Every query takes the caller's tenant: a
//! run of another tenant is simply not found.
//!
//! This crate depends on the core for event and run types; it must never depend on providers,
//! tools or the driver.

mod appends;

#[cfg(feature = "testing")]
pub mod conformance;
mod postgres;
mod roles;
mod sqlite;
mod summary;
#[cfg(feature = "testing")]
pub mod testing;
mod writer;

/// The store's role traits, for `use rein_store::prelude::*` where a store's methods are called.
pub mod prelude {
    pub use crate::{AgentRegistry, Anchors, DashboardSessions, Leases, RunLog, Store, Tenancy};
}

pub use appends::Appends;
pub use postgres::PgStore;
pub use roles::{AgentRegistry, Anchors, DashboardSessions, Leases, RunLog, Store, Tenancy};
pub use sqlite::{Durability, SqliteStore};

use rein_core::admin_log::AdminEntry;
use rein_core::budget::{Amount, Scope, Standing};
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
    Database(DriverError),
    /// The schema could not be brought up to date.
    #[error(transparent)]
    Migration(DriverError),
    /// SQLite's writer connection could not write.
    #[error(transparent)]
    Write(DriverError),
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

/// A database driver's error, kept opaque so the drivers Rein uses stay its own business: it
/// says what failed, and its source is what the driver says caused it.
#[derive(Debug)]
pub struct DriverError(Driver);

#[derive(Debug)]
enum Driver {
    Sqlx(sqlx::Error),
    Migrate(sqlx::migrate::MigrateError),
    Sqlite(rusqlite::Error),
}

impl DriverError {
    /// The sqlx error, where it is one (or a migration's statement failed with one).
    pub(crate) fn sqlx(&self) -> Option<&sqlx::Error> {
        match &self.0 {
            Driver::Sqlx(e) | Driver::Migrate(sqlx::migrate::MigrateError::Execute(e)) => Some(e),
            _ => None,
        }
    }

    /// Whether a migration's script failed (another process may be migrating at once).
    pub(crate) fn migration_failed(&self) -> bool {
        matches!(
            &self.0,
            Driver::Migrate(sqlx::migrate::MigrateError::ExecuteMigration(..))
        )
    }
}

impl std::fmt::Display for DriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Driver::Sqlx(e) => e.fmt(f),
            Driver::Migrate(e) => e.fmt(f),
            Driver::Sqlite(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for DriverError {
    // The driver's error is shown by `Display` above, so the chain goes on with its cause, as it
    // did when the driver's error itself was the variant.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.0 {
            Driver::Sqlx(e) => e.source(),
            Driver::Migrate(e) => e.source(),
            Driver::Sqlite(e) => e.source(),
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Database(DriverError(Driver::Sqlx(e)))
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        StoreError::Migration(DriverError(Driver::Migrate(e)))
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Write(DriverError(Driver::Sqlite(e)))
    }
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
