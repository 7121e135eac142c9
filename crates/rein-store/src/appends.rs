//! Which runs' logs just grew, for whoever follows a run (an event stream, a request waiting
//! for its run to end): they wait here instead of reading the store over and over.
//!
//! A store announces its own process's appends as they commit; the PostgreSQL store also
//! carries them to the other processes on its database (`NOTIFY`, see [`crate::PgStore`]).
//! An announcement is a hint, never the record: a follower reads the log to see what changed,
//! and reads it anyway after a while, since announcements can be missed (another process's
//! appends on SQLite, a dropped database connection).

use rein_core::RunId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::watch;

/// Where a store announces appends, to the followers of each run (only those are woken).
#[derive(Clone, Debug)]
pub(crate) struct Announcer {
    runs: Arc<Mutex<HashMap<RunId, watch::Sender<()>>>>,
    hears_other_processes: bool,
}

impl Announcer {
    /// `hears_other_processes`: whether appends made by other processes are announced too.
    pub(crate) fn new(hears_other_processes: bool) -> Self {
        Announcer {
            runs: Arc::default(),
            hears_other_processes,
        }
    }

    /// `run`'s log grew: wakes its followers, if it has any.
    pub(crate) fn announce(&self, run: &RunId) {
        let runs = self.runs.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(sender) = runs.get(run) {
            sender.send_replace(());
        }
    }

    /// A follower of `run`, which hears of appends from now on.
    pub(crate) fn follow(&self, run: &RunId) -> Appends {
        let mut runs = self.runs.lock().unwrap_or_else(PoisonError::into_inner);
        let receiver = runs
            .entry(run.clone())
            .or_insert_with(|| watch::channel(()).0)
            .subscribe();
        Appends {
            run: run.clone(),
            receiver,
            announcer: self.clone(),
        }
    }
}

/// A follower of one run's appends ([`crate::Store::follow`]).
#[derive(Debug)]
pub struct Appends {
    run: RunId,
    receiver: watch::Receiver<()>,
    announcer: Announcer,
}

impl Appends {
    /// Whether appends made by other processes on the same store are heard too. Where they
    /// are not (SQLite), a follower must also read the store now and then for runs that
    /// another process drives.
    pub fn hears_other_processes(&self) -> bool {
        self.announcer.hears_other_processes
    }

    /// Marks every append so far as seen: call it just before reading the log, so that an
    /// append committed while the read ran still wakes [`Appends::changed`].
    pub fn seen(&mut self) {
        self.receiver.borrow_and_update();
    }

    /// Waits until the run's log may have grown since [`Appends::seen`], or `at_most` has
    /// passed; says which.
    pub async fn changed(&mut self, at_most: Duration) -> bool {
        match tokio::time::timeout(at_most, self.receiver.changed()).await {
            Ok(Ok(())) => true,
            // The sender lives while this follower does; were it gone, wait out the time.
            Ok(Err(_)) => {
                tokio::time::sleep(at_most).await;
                false
            }
            Err(_) => false,
        }
    }
}

impl Drop for Appends {
    fn drop(&mut self) {
        let mut runs = self
            .announcer
            .runs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // The last follower (this one) takes the run's channel with it.
        if runs
            .get(&self.run)
            .is_some_and(|sender| sender.receiver_count() <= 1)
        {
            runs.remove(&self.run);
        }
    }
}

/// A background task of a store's, stopped when the store goes (or [`Task::stop`]).
#[derive(Debug)]
pub(crate) struct Task(tokio::task::JoinHandle<()>);

impl Task {
    pub(crate) fn spawn(work: impl Future<Output = ()> + Send + 'static) -> Self {
        Task(tokio::spawn(work))
    }

    pub(crate) fn stop(&self) {
        self.0.abort();
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOON: Duration = Duration::from_millis(20);

    #[tokio::test]
    async fn only_a_runs_own_followers_wake_and_none_misses_an_append_made_while_it_read() {
        let announcer = Announcer::new(false);
        let (r1, r2) = (RunId::new("r1"), RunId::new("r2"));
        let mut a = announcer.follow(&r1);
        let mut b = announcer.follow(&r1);
        let mut c = announcer.follow(&r2);
        assert!(!a.hears_other_processes());

        a.seen();
        announcer.announce(&r1);
        assert!(a.changed(SOON).await);
        assert!(b.changed(SOON).await, "every follower of the run wakes");
        assert!(!c.changed(SOON).await, "another run's follower does not");
        assert!(!a.changed(SOON).await, "an append is heard once");

        // An append between `seen` and `changed` (while the log was being read) is not lost.
        a.seen();
        announcer.announce(&r1);
        assert!(a.changed(Duration::ZERO).await);
    }

    #[tokio::test]
    async fn a_runs_channel_goes_with_its_last_follower() {
        let announcer = Announcer::new(true);
        let r1 = RunId::new("r1");
        let a = announcer.follow(&r1);
        let mut b = announcer.follow(&r1);
        assert!(b.hears_other_processes());
        drop(a);
        assert_eq!(announcer.runs.lock().unwrap().len(), 1, "b still follows");
        b.seen();
        announcer.announce(&r1);
        assert!(b.changed(SOON).await);
        drop(b);
        assert!(announcer.runs.lock().unwrap().is_empty());
        // Announcing a run nobody follows keeps nothing.
        announcer.announce(&r1);
        assert!(announcer.runs.lock().unwrap().is_empty());
    }
}
