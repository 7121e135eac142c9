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
//!
//! When nothing else is writing (no job waits and the thread is not committing), a caller
//! writes on its own thread instead, in a transaction of its own: a commit without `fsync` takes
//! tens of microseconds, while handing the job to the thread and the answer back costs two
//! thread wake-ups, and on a busy machine each wake-up may wait milliseconds for a core. That
//! wait was most of the gateway's tail latency (five writes per call). Under load the thread
//! still takes every write that finds the connection busy, and commits them together. A
//! store that fsyncs every commit never writes inline: an `fsync` would stall the caller's
//! async worker thread for milliseconds.

use crate::StoreError;
use rusqlite::Connection;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::Duration;

/// At most this many jobs go into one commit, so one caller's answer never waits behind an
/// unbounded queue.
const MAX_BATCH: usize = 256;

/// The size, in bytes, the write-ahead log is cut back to when it starts over.
const WAL_SIZE_LIMIT: i64 = 64 << 20;

/// A job runs on the writer's connection inside the batch's transaction (or is told why the
/// transaction could not begin), and returns what to do once the batch's commit has succeeded
/// (`None`) or failed.
type Job = Box<dyn FnOnce(Result<&Connection, &rusqlite::Error>) -> Reply + Send>;
type Reply = Box<dyn FnOnce(Option<&rusqlite::Error>) + Send>;

/// The handle callers send jobs through; the thread ends when the last handle goes.
#[derive(Debug)]
pub(crate) struct Writer {
    jobs: mpsc::Sender<Job>,
    shared: Arc<Shared>,
    /// Whether a caller may write on its own thread when nothing else is writing.
    inline: bool,
    busy_timeout: Duration,
}

/// What the thread and the callers writing inline share.
#[derive(Debug)]
struct Shared {
    /// The one write connection: the thread's while it runs a batch, a caller's while it
    /// writes inline.
    conn: Mutex<Connection>,
    /// Jobs sent to the thread that it has not yet started. A caller writes inline only when
    /// there are none, so it never overtakes them, and the thread is never starved of the
    /// connection by callers that keep finding it free.
    waiting: AtomicUsize,
}

impl Shared {
    /// The connection, waiting while another holds it. A write that panicked was caught, so a
    /// lock poisoned by one is sound.
    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
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
        let (inline, busy_timeout) = (!setup.fsync_every_commit, setup.busy_timeout);
        std::thread::Builder::new()
            .name("rein-sqlite-writer".into())
            .spawn(move || match open(&path, &setup) {
                Ok(conn) => {
                    let shared = Arc::new(Shared {
                        conn: Mutex::new(conn),
                        waiting: AtomicUsize::new(0),
                    });
                    let _ = opened.send(Ok(shared.clone()));
                    serve(&shared, &queue);
                }
                Err(e) => {
                    let _ = opened.send(Err(e));
                }
            })
            .map_err(|e| StoreError::Writer(format!("cannot start the writer thread: {e}")))?;
        let shared = ready
            .await
            .map_err(|_| StoreError::Writer("the writer thread stopped while opening".into()))??;
        Ok(Writer {
            jobs,
            shared,
            inline,
            busy_timeout,
        })
    }

    /// Runs `write` on the writer's connection, in a savepoint of the next commit, and returns
    /// its result once that commit is durable. An error from `write` undoes its changes only.
    pub(crate) async fn write<T, F>(&self, write: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        if let Some(conn) = self.begin_inline() {
            return inline(&conn, write);
        }
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
        self.shared.waiting.fetch_add(1, Ordering::SeqCst);
        self.jobs.send(job).map_err(|_| {
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            StoreError::Writer("the writer thread has stopped".into())
        })?;
        answered
            .await
            .map_err(|_| StoreError::Writer("the writer thread stopped before answering".into()))?
    }

    /// Copies what is left of the write-ahead log into the database while no write of this
    /// process can add to it, so that the next write starts the log over from its beginning.
    /// Writes wait meanwhile: the caller copies most of the log first, without them waiting
    /// (see the store's checkpointer).
    pub(crate) async fn checkpoint_rest(&self) -> Result<(), StoreError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let conn = shared.lock();
            conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
            Ok(())
        })
        .await
        .map_err(|e| StoreError::Writer(format!("the checkpoint stopped: {e}")))?
    }

    /// The connection with a transaction begun on it, when nothing else is writing: no job
    /// waits for the thread, the connection is free, and no other process holds SQLite's write
    /// lock (this never waits for it; the thread does).
    fn begin_inline(&self) -> Option<MutexGuard<'_, Connection>> {
        if !self.inline || self.shared.waiting.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let conn = self.shared.conn.try_lock().ok()?;
        conn.busy_timeout(Duration::ZERO).ok()?;
        let begun = begin(&conn);
        // The thread's batches wait for another process's write as long as they always did.
        let restored = conn.busy_timeout(self.busy_timeout);
        match (begun, restored) {
            (Ok(()), Ok(())) => Some(conn),
            (Ok(()), Err(_)) => {
                let _ = conn.execute_batch("ROLLBACK");
                None
            }
            (Err(_), _) => None,
        }
    }
}

/// Runs `write` in the transaction `conn` has begun and commits it, or rolls it all back if
/// `write` fails (a transaction of its own: its failure undoes nothing else).
fn inline<T>(
    conn: &Connection,
    write: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let result = caught(conn, write);
    if result.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
        return result;
    }
    commit(conn).map_err(|e| StoreError::Writer(format!("commit failed: {e}")))?;
    result
}

/// Begins the transaction a write (or a batch of them) runs in, taking SQLite's write lock.
fn begin(conn: &Connection) -> Result<(), rusqlite::Error> {
    conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    Ok(())
}

/// Commits the transaction, or rolls it back if the commit fails.
fn commit(conn: &Connection) -> Result<(), rusqlite::Error> {
    let committed = conn
        .prepare_cached("COMMIT")
        .and_then(|mut commit| commit.execute([]));
    if committed.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    committed.map(|_| ())
}

/// Runs `write`, a panic in it being its error.
fn caught<T>(
    conn: &Connection,
    write: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    std::panic::catch_unwind(AssertUnwindSafe(|| write(conn)))
        .unwrap_or_else(|_| Err(StoreError::Writer("a write panicked".into())))
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
    // A statement or a savepoint keeps the pages it changes in a journal of its own, to undo
    // itself alone; past 64 KiB SQLite moves that journal to a temporary file (created,
    // written and removed within the commit). It is never needed after a crash, so it stays in
    // memory: it holds at most one commit's pages.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // The background checkpointer copies the log into the file; a checkpoint inside a commit
    // would stall every write queued behind it.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    // A log that grew in a burst is cut back to this when it starts over.
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    Ok(conn)
}

/// Runs `write` between `SAVEPOINT` and `RELEASE`, rolling back to the savepoint if it fails.
fn in_savepoint<T>(
    conn: &Connection,
    write: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    conn.prepare_cached("SAVEPOINT job")?.execute([])?;
    let result = caught(conn, write);
    if result.is_err() {
        conn.prepare_cached("ROLLBACK TO job")?.execute([])?;
    }
    conn.prepare_cached("RELEASE job")?.execute([])?;
    result
}

/// Takes the jobs as they come, committing every job waiting at once.
fn serve(shared: &Shared, queue: &mpsc::Receiver<Job>) {
    while let Ok(first) = queue.recv() {
        let mut batch = Vec::with_capacity(8);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // Counted as waiting until the connection is the thread's, so that no caller takes it
        // inline meanwhile.
        let conn = shared.lock();
        shared.waiting.fetch_sub(batch.len(), Ordering::SeqCst);
        if let Err(e) = begin(&conn) {
            // Nothing ran: every job of the batch hears why (another process held the lock
            // past the busy timeout, say).
            for job in batch {
                job(Err(&e))(None);
            }
            continue;
        }
        let replies: Vec<Reply> = batch.into_iter().map(|job| job(Ok(&*conn))).collect();
        let committed = commit(&conn);
        drop(conn);
        let failure = committed.err();
        for reply in replies {
            reply(failure.as_ref());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn writer() -> (tempfile::TempDir, Writer) {
        writer_fsyncing(false).await
    }

    async fn writer_fsyncing(fsync_every_commit: bool) -> (tempfile::TempDir, Writer) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")
            .unwrap();
        let setup = Setup {
            fsync_every_commit,
            busy_timeout: Duration::from_secs(1),
        };
        let writer = Writer::start(&path, setup).await.unwrap();
        (dir, writer)
    }

    /// Many callers at once: each hears how its own write went, a failed write (here a
    /// duplicate key, after it changed a row) undoes only its own changes, and every write
    /// that was answered OK is committed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_are_committed_together_and_fail_alone() {
        let (_dir, writer) = writer().await;
        let writer = std::sync::Arc::new(writer);
        let mut tasks = Vec::new();
        for k in 0..200i64 {
            let writer = writer.clone();
            tasks.push(tokio::spawn(async move {
                writer
                    .write(move |c| {
                        c.execute("INSERT INTO t (k, v) VALUES (?, 'first')", [k])?;
                        if k % 3 == 0 {
                            // Changes the row it just wrote, then fails: both must be undone.
                            c.execute("UPDATE t SET v = 'changed' WHERE k = ?", [k])?;
                            c.execute("INSERT INTO t (k, v) VALUES (?, 'again')", [k])?;
                        }
                        Ok(k)
                    })
                    .await
            }));
        }
        let mut failed = 0;
        for (k, task) in tasks.into_iter().enumerate() {
            match task.await.unwrap() {
                Ok(got) => assert_eq!(got, k as i64),
                Err(StoreError::Write(_)) => {
                    assert_eq!(k % 3, 0, "write {k} failed");
                    failed += 1;
                }
                Err(e) => panic!("write {k}: {e}"),
            }
        }
        assert_eq!(failed, 67);
        let rows: Vec<(i64, String)> = writer
            .write(|c| {
                let mut read = c.prepare("SELECT k, v FROM t ORDER BY k")?;
                let rows = read
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?;
                Ok(rows)
            })
            .await
            .unwrap();
        let expected: Vec<(i64, String)> = (0..200)
            .filter(|k| k % 3 != 0)
            .map(|k| (k, "first".to_string()))
            .collect();
        assert_eq!(rows, expected);
    }

    /// The thread a write ran on.
    fn writes_on(k: i64) -> impl FnOnce(&Connection) -> Result<String, StoreError> {
        move |c| {
            c.execute("INSERT INTO t (k, v) VALUES (?, 'x')", [k])?;
            Ok(std::thread::current()
                .name()
                .unwrap_or("unnamed")
                .to_string())
        }
    }

    /// With nothing else writing, a write runs on its caller's thread (no hand-off); one that
    /// finds the connection busy goes to the writer thread, which takes it once it is free.
    /// Both are committed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_runs_inline_when_nothing_else_writes_and_on_the_thread_otherwise() {
        let (_dir, writer) = writer().await;
        let writer = std::sync::Arc::new(writer);
        let alone = writer.write(writes_on(1)).await.unwrap();
        assert_ne!(alone, "rein-sqlite-writer");

        // Another holder of the connection (the thread's batch, say) keeps it for a while.
        let (held, holding) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn({
            let writer = writer.clone();
            move || {
                let _busy = writer.shared.conn.lock().unwrap();
                held.send(()).unwrap();
                released.recv().unwrap();
            }
        });
        holding.recv().unwrap();
        let queued = tokio::spawn({
            let writer = writer.clone();
            async move { writer.write(writes_on(2)).await }
        });
        while writer.shared.waiting.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !queued.is_finished(),
            "the write ran while the connection was busy"
        );
        release.send(()).unwrap();
        holder.join().unwrap();
        assert_eq!(queued.await.unwrap().unwrap(), "rein-sqlite-writer");
        assert_eq!(writer.shared.waiting.load(Ordering::SeqCst), 0);

        let failed = writer
            .write(|c| {
                c.execute("INSERT INTO t (k, v) VALUES (3, 'x')", [])?;
                Ok(c.execute("INSERT INTO t (k, v) VALUES (1, 'again')", [])?)
            })
            .await;
        assert!(matches!(failed, Err(StoreError::Write(_))), "{failed:?}");
        let keys: Vec<i64> = writer
            .write(|c| {
                let mut read = c.prepare("SELECT k FROM t ORDER BY k")?;
                let keys = read
                    .query_map([], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                Ok(keys)
            })
            .await
            .unwrap();
        assert_eq!(keys, vec![1, 2], "the failed inline write was not undone");
    }

    /// SQLite, compiled from source, syncs with `fdatasync` as its own Linux builds do, not
    /// `fsync` (which also commits the file system's journal for each write's new timestamp):
    /// the flag is set for every build of the workspace in `.cargo/config.toml`, and reaches
    /// libsqlite3-sys's build script the same way it reaches this crate.
    #[test]
    fn sqlite_is_built_to_sync_with_fdatasync() {
        let flags = option_env!("LIBSQLITE3_FLAGS").unwrap_or("");
        assert!(
            flags.split_whitespace().any(|f| f == "-DHAVE_FDATASYNC=1"),
            "LIBSQLITE3_FLAGS is {flags:?}: build from the workspace, whose .cargo/config.toml sets it"
        );
    }

    /// Statement and savepoint journals stay in memory (`temp_store=MEMORY`): under load a
    /// batch's savepoints journalled past 64 KiB, and SQLite moved the journal to a temporary
    /// file created, written and removed within the commit (about 90 files and half the
    /// writes to disk in 1,100 gateway calls at 500 a second).
    #[tokio::test]
    async fn statement_journals_are_kept_in_memory() {
        let (_dir, writer) = writer().await;
        let temp_store: i64 = writer
            .write(|c| Ok(c.query_row("PRAGMA temp_store", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(temp_store, 2, "2 is MEMORY");
    }

    /// A store that fsyncs every commit never writes on the caller's thread: the fsync would
    /// stall an async runtime's worker for milliseconds.
    #[tokio::test]
    async fn a_store_that_fsyncs_every_commit_writes_only_on_the_thread() {
        let (_dir, writer) = writer_fsyncing(true).await;
        assert_eq!(
            writer.write(writes_on(1)).await.unwrap(),
            "rein-sqlite-writer"
        );
    }

    /// A write that cannot begin (another connection holds the write lock past the busy
    /// timeout) is answered with the reason, and the writer goes on once the lock is free.
    #[tokio::test]
    async fn a_write_blocked_past_the_busy_timeout_is_refused_with_the_reason() {
        let (dir, writer) = writer().await;
        let other = Connection::open(dir.path().join("w.db")).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let refused = writer
            .write(|c| Ok(c.execute("INSERT INTO t (k, v) VALUES (1, 'x')", [])?))
            .await;
        let message = refused.unwrap_err().to_string();
        assert!(message.contains("cannot begin a write"), "{message}");
        other.execute_batch("ROLLBACK").unwrap();
        let written = writer
            .write(|c| Ok(c.execute("INSERT INTO t (k, v) VALUES (1, 'x')", [])?))
            .await
            .unwrap();
        assert_eq!(written, 1);
    }
}
