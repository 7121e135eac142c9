//! SQLite's one writer: a thread of its own that commits the writes of concurrent callers
//! together (group commit).
//!
//! SQLite allows one writer at a time. Every write of the process is a job sent to this thread;
//! it takes every job waiting, runs each in a savepoint of one transaction (a failed job undoes
//! only its own changes) and commits once, then answers each caller. Under load a commit
//! carries many jobs, and the only hand-off per write is the job's way in and its answer's way
//! out: there is no round trip per statement, and no `BEGIN` or `COMMIT` of its own.
//!
//! A caller hears back only after the commit its job was in, so what it was told is durable
//! (to the store's [`Durability`](crate::sqlite::Durability)), and a read that starts after the
//! answer sees it.

use crate::StoreError;
use rusqlite::Connection;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

/// At most this many jobs go into one commit, so one caller's answer never waits behind an
/// unbounded queue.
const MAX_BATCH: usize = 256;

/// A job runs on the writer's connection inside the batch's transaction (or is told why the
/// transaction could not begin), and returns what to do once the batch's commit has succeeded
/// (`None`) or failed.
type Job = Box<dyn FnOnce(Result<&Connection, &rusqlite::Error>) -> Reply + Send>;
type Reply = Box<dyn FnOnce(Option<&rusqlite::Error>) + Send>;

/// The handle callers send jobs through; the thread ends when the last handle goes.
#[derive(Debug)]
pub(crate) struct Writer {
    jobs: mpsc::Sender<Job>,
}

/// How the writer's connection is set up.
pub(crate) struct Setup {
    /// `synchronous=FULL` rather than `NORMAL`.
    pub(crate) fsync_every_commit: bool,
    /// How long to wait for another process's write to finish.
    pub(crate) busy_timeout: Duration,
}

impl Writer {
    /// Opens the writer's connection to the (existing, migrated) database at `path` and starts
    /// its thread.
    pub(crate) async fn start(path: &Path, setup: Setup) -> Result<Writer, StoreError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (opened, ready) = tokio::sync::oneshot::channel();
        let path = path.to_path_buf();
        std::thread::Builder::new()
            .name("rein-sqlite-writer".into())
            .spawn(move || match open(&path, &setup) {
                Ok(conn) => {
                    let _ = opened.send(Ok(()));
                    serve(&conn, &queue);
                }
                Err(e) => {
                    let _ = opened.send(Err(e));
                }
            })
            .map_err(|e| StoreError::Writer(format!("cannot start the writer thread: {e}")))?;
        ready
            .await
            .map_err(|_| StoreError::Writer("the writer thread stopped while opening".into()))??;
        Ok(Writer { jobs })
    }

    /// Runs `write` on the writer's connection, in a savepoint of the next commit, and returns
    /// its result once that commit is durable. An error from `write` undoes its changes only.
    pub(crate) async fn write<T, F>(&self, write: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let result = match conn {
                Ok(conn) => in_savepoint(conn, write),
                Err(e) => Err(StoreError::Writer(format!("cannot begin a write: {e}"))),
            };
            Box::new(move |commit: Option<&rusqlite::Error>| {
                let result = match (result, commit) {
                    (Ok(_), Some(e)) => Err(StoreError::Writer(format!("commit failed: {e}"))),
                    (result, _) => result,
                };
                let _ = answer.send(result);
            })
        });
        self.jobs
            .send(job)
            .map_err(|_| StoreError::Writer("the writer thread has stopped".into()))?;
        answered
            .await
            .map_err(|_| StoreError::Writer("the writer thread stopped before answering".into()))?
    }
}

fn open(path: &Path, setup: &Setup) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(setup.busy_timeout)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(
        None,
        "synchronous",
        if setup.fsync_every_commit {
            "FULL"
        } else {
            "NORMAL"
        },
    )?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // The background checkpointer copies the log into the file; a checkpoint inside a commit
    // would stall every write queued behind it.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    Ok(conn)
}

/// Runs `write` between `SAVEPOINT` and `RELEASE`, rolling back to the savepoint if it fails.
fn in_savepoint<T>(
    conn: &Connection,
    write: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    conn.prepare_cached("SAVEPOINT job")?.execute([])?;
    let result = match std::panic::catch_unwind(AssertUnwindSafe(|| write(conn))) {
        Ok(result) => result,
        Err(_) => Err(StoreError::Writer("a write panicked".into())),
    };
    if result.is_err() {
        conn.prepare_cached("ROLLBACK TO job")?.execute([])?;
    }
    conn.prepare_cached("RELEASE job")?.execute([])?;
    result
}

/// Takes the jobs as they come, committing every job waiting at once.
fn serve(conn: &Connection, queue: &mpsc::Receiver<Job>) {
    while let Ok(first) = queue.recv() {
        let mut batch = Vec::with_capacity(8);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            // Nothing ran: every job of the batch hears why (another process held the lock
            // past the busy timeout, say).
            for job in batch {
                job(Err(&e))(None);
            }
            continue;
        }
        let replies: Vec<Reply> = batch.into_iter().map(|job| job(Ok(conn))).collect();
        let committed = conn.execute_batch("COMMIT");
        if committed.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        let failure = committed.err();
        for reply in replies {
            reply(failure.as_ref());
        }
    }
}
