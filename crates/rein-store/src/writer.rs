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
        if let Err(e) = conn
            .prepare_cached("BEGIN IMMEDIATE")
            .and_then(|mut begin| begin.execute([]))
        {
            // Nothing ran: every job of the batch hears why (another process held the lock
            // past the busy timeout, say).
            for job in batch {
                job(Err(&e))(None);
            }
            continue;
        }
        let replies: Vec<Reply> = batch.into_iter().map(|job| job(Ok(conn))).collect();
        let committed = conn
            .prepare_cached("COMMIT")
            .and_then(|mut commit| commit.execute([]));
        if committed.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
        }
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
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")
            .unwrap();
        let setup = Setup {
            fsync_every_commit: false,
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
