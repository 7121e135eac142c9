//! Which runs' logs just grew, for whoever follows a run (an event stream, a request waiting
//! for its run to end), and when a run became claimable, for idle workers: they wait here
//! instead of reading the store over and over.
//!
//! A store announces its own process's writes as they commit; the PostgreSQL store also
//! carries them to the other processes on its database (`NOTIFY`, see [`crate::PgStore`]).
//! An announcement is a hint, never the record: a follower reads the store to see what
//! changed, and reads it anyway after a while, since announcements can be missed (another
//! process's writes on SQLite, a dropped database connection).

use rein_core::{RunId, SealedEvent};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::watch;

/// Where a store announces appends, to the followers of each run (only those are woken), and
/// claimable runs, to idle workers.
#[derive(Clone, Debug)]
pub(crate) struct Announcer {
    runs: Arc<Mutex<HashMap<RunId, watch::Sender<()>>>>,
    claimable: watch::Sender<()>,
    hears_other_processes: bool,
}

impl Announcer {
    /// `hears_other_processes`: whether writes made by other processes are announced too.
    pub(crate) fn new(hears_other_processes: bool) -> Self {
        Announcer {
            runs: Arc::default(),
            claimable: watch::channel(()).0,
            hears_other_processes,
        }
    }

    /// A run was queued, or its lease given up: a worker may claim it now.
    pub(crate) fn announce_claimable(&self) {
        self.claimable.send_replace(());
    }

    /// What an idle worker waits on: a run became claimable.
    pub(crate) fn claimable(&self) -> Appends {
        Appends {
            receiver: self.claimable.subscribe(),
            hears_other_processes: self.hears_other_processes,
            run: None,
        }
    }

    /// `events` (of one run, as every write appends them) were just committed: wakes their
    /// run's followers.
    pub(crate) fn appended(&self, events: &[SealedEvent]) {
        if let Some(first) = events.first() {
            self.announce(&first.run_id);
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
            receiver,
            hears_other_processes: self.hears_other_processes,
            run: Some((run.clone(), self.clone())),
        }
    }
}

/// A follower of one run's appends ([`crate::Store::follow`]), or of the runs that become
/// claimable ([`crate::Store::follow_claimable`]).
#[derive(Debug)]
pub struct Appends {
    receiver: watch::Receiver<()>,
    hears_other_processes: bool,
    /// The run followed, and where its channel is kept (to take it away with the last
    /// follower).
    run: Option<(RunId, Announcer)>,
}

impl Appends {
    /// Whether writes made by other processes on the same store are heard too. Where they are
    /// not (SQLite), a follower must also read the store now and then for what another
    /// process writes.
    pub fn hears_other_processes(&self) -> bool {
        self.hears_other_processes
    }

    /// Marks every announcement so far as seen: call it just before reading the store, so that
    /// a write committed while the read ran still wakes [`Appends::changed`].
    pub fn seen(&mut self) {
        self.receiver.borrow_and_update();
    }

    /// Waits until something was announced since [`Appends::seen`] (the run's log may have
    /// grown; a run may be claimable), or `at_most` has passed; says which.
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
        let Some((run, announcer)) = &self.run else {
            return;
        };
        let mut runs = announcer
            .runs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // This follower's receiver goes under the lock, so that of two last followers dropped
        // at once on two threads, the second sees none left and takes the run's channel away.
        drop(std::mem::replace(&mut self.receiver, watch::channel(()).1));
        if runs
            .get(run)
            .is_some_and(|sender| sender.receiver_count() == 0)
        {
            runs.remove(run);
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

    #[tokio::test]
    async fn idle_workers_hear_of_claimable_runs_not_of_appends() {
        let announcer = Announcer::new(false);
        let mut worker = announcer.claimable();
        let mut other = announcer.claimable();
        worker.seen();
        announcer.announce(&RunId::new("r1"));
        assert!(!worker.changed(SOON).await, "an append to a run");
        announcer.announce_claimable();
        assert!(worker.changed(SOON).await);
        assert!(other.changed(SOON).await, "every idle worker");
        drop(worker);
        assert!(announcer.runs.lock().unwrap().is_empty());
    }
}
