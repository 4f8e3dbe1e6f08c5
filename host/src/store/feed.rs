//! The change feed: committed changes pushed to whoever listens in this
//! process (executing runs waiting for a signal or a cancel, the coming
//! live views, tests).
//!
//! A store publishes an event for every commit that changes a run, after
//! the commit is durable, with the change's place in the store-wide
//! sequence (`seq`). Events of other processes' commits are published too,
//! once the store notices them. Publishing never waits for a listener: a
//! listener that falls behind by more than the channel holds is told how
//! many it missed and can read them back with `changes_since`.
//!
//! Order: while anyone subscribes to every event ([`ChangeFeed::wants_all`],
//! as an SSE client does), events are published in the order of their
//! `seq`, other processes' included: a commit of this process whose
//! numbers come after other processes' commits not yet noticed is
//! published once the store has read those (at once, by the committing
//! writer on SQLite; by the listener on PostgreSQL). So a listener that
//! keeps the last `seq` it saw (an SSE client's `Last-Event-ID`) misses
//! nothing by resuming from it. Control events alone (executing runs
//! waiting for a signal or a cancel) are published as soon as possible
//! instead, and may come out of that order. Each event comes once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tokio::sync::broadcast;

use crate::model::{RunKey, RunStatus};

/// Events a listener may fall behind by before it is told it lagged.
const CAPACITY: usize = 4096;

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// The run was created (with its first status).
    Created,
    /// The run's status changed (to `status`).
    Status,
    /// A history entry was appended at `position`.
    History,
    /// A branch attempt ended.
    Branch,
    /// A signal was sent to the run.
    Signal,
    /// Someone asked for the run to be cancelled.
    Cancel,
}

impl ChangeKind {
    pub const ALL: [ChangeKind; 6] = [
        ChangeKind::Created,
        ChangeKind::Status,
        ChangeKind::History,
        ChangeKind::Branch,
        ChangeKind::Signal,
        ChangeKind::Cancel,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Created => "created",
            ChangeKind::Status => "status",
            ChangeKind::History => "history",
            ChangeKind::Branch => "branch",
            ChangeKind::Signal => "signal",
            ChangeKind::Cancel => "cancel",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        ChangeKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Whether events of this kind can be control events
    /// ([`ChangeEvent::is_control`]): what a reader of control events alone
    /// reads from the store.
    pub fn may_be_control(self) -> bool {
        match self {
            // New runs wake idle workers; signals and cancels reach waiting
            // runs; a status change may be a run ending cancelled.
            ChangeKind::Created | ChangeKind::Signal | ChangeKind::Cancel | ChangeKind::Status => true,
            ChangeKind::History | ChangeKind::Branch => false,
        }
    }
}

/// One committed change of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEvent {
    /// Its place in the store-wide sequence: strictly increasing in commit
    /// order, durable, assigned in the committing transaction.
    pub seq: u64,
    pub run: RunKey,
    pub kind: ChangeKind,
    /// The history position of a `History` event.
    pub position: Option<u64>,
    /// The new status of a `Created` or `Status` event.
    pub status: Option<RunStatus>,
    /// When it was committed, Unix microseconds.
    pub ts_us: i64,
}

impl ChangeEvent {
    /// What executing runs, and whoever cancels one, wait for: signals,
    /// cancel requests, and runs ending cancelled. (Not every finished run:
    /// a worker finishing thousands of runs a second would wake its
    /// listeners for nothing.)
    pub fn is_control(&self) -> bool {
        self.kind.may_be_control() && (self.kind != ChangeKind::Status || self.status == Some(RunStatus::Cancelled))
    }
}

/// The in-process side of the feed, owned by a store.
pub struct ChangeFeed {
    all: broadcast::Sender<ChangeEvent>,
    control: broadcast::Sender<ChangeEvent>,
    all_listeners: Arc<AtomicUsize>,
    control_listeners: Arc<AtomicUsize>,
    /// Wakes a store's watcher of other processes when someone subscribes.
    wake: (Mutex<()>, Condvar),
}

impl Default for ChangeFeed {
    fn default() -> Self {
        ChangeFeed {
            all: broadcast::channel(CAPACITY).0,
            control: broadcast::channel(CAPACITY).0,
            all_listeners: Arc::default(),
            control_listeners: Arc::default(),
            wake: (Mutex::new(()), Condvar::new()),
        }
    }
}

impl ChangeFeed {
    /// Someone listens: publishing has a reader.
    pub fn listening(&self) -> bool {
        self.wants_all() || self.control_listeners.load(Ordering::Relaxed) > 0
    }

    /// Someone listens to every event (not only control events).
    pub fn wants_all(&self) -> bool {
        self.all_listeners.load(Ordering::Relaxed) > 0
    }

    /// A receiver of every event. A store calls this from its own
    /// `subscribe`, after making sure it will notice other processes'
    /// commits from now on.
    pub fn subscribe_all(&self) -> Subscription {
        self.subscribe(&self.all, &self.all_listeners)
    }

    /// A receiver of control events only (see [`ChangeEvent::is_control`]).
    pub fn subscribe_control(&self) -> Subscription {
        self.subscribe(&self.control, &self.control_listeners)
    }

    fn subscribe(&self, sender: &broadcast::Sender<ChangeEvent>, count: &Arc<AtomicUsize>) -> Subscription {
        let rx = sender.subscribe();
        count.fetch_add(1, Ordering::Relaxed);
        let _guard = self.wake.0.lock().unwrap_or_else(|p| p.into_inner());
        self.wake.1.notify_all();
        Subscription { rx, count: count.clone() }
    }

    /// Hand an event to the listeners; never waits.
    pub fn publish(&self, event: ChangeEvent) {
        self.publish_control(&event);
        self.publish_whole(event);
    }

    /// Hand an event to the listeners of control events only, if it is one
    /// (a store whose whole feed gets it later, in order).
    pub fn publish_control(&self, event: &ChangeEvent) {
        if event.is_control() && self.control_listeners.load(Ordering::Relaxed) > 0 {
            let _ = self.control.send(event.clone());
        }
    }

    /// Hand an event to the listeners of every event only (its control
    /// copy went out already).
    pub fn publish_whole(&self, event: ChangeEvent) {
        if self.wants_all() {
            let _ = self.all.send(event);
        }
    }

    /// Block until someone listens or `timeout` passes; true if someone does.
    pub fn wait_for_listeners(&self, timeout: Duration) -> bool {
        let guard = self.wake.0.lock().unwrap_or_else(|p| p.into_inner());
        if self.listening() {
            return true;
        }
        let _ = self.wake.1.wait_timeout(guard, timeout);
        self.listening()
    }

    /// Wake anything blocked in [`ChangeFeed::wait_for_listeners`] (the
    /// store is closing).
    pub fn wake_all(&self) {
        let _guard = self.wake.0.lock().unwrap_or_else(|p| p.into_inner());
        self.wake.1.notify_all();
    }
}

/// Why a subscription yielded no event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeedError {
    /// The listener fell behind and missed this many events.
    #[error("the listener fell behind and missed {0} changes")]
    Lagged(u64),
    /// The store is gone.
    #[error("the change feed closed")]
    Closed,
}

/// A listener's end of the feed.
pub struct Subscription {
    rx: broadcast::Receiver<ChangeEvent>,
    count: Arc<AtomicUsize>,
}

impl Subscription {
    /// Take one queued event without waiting; false when none is queued.
    pub fn try_recv(&mut self) -> bool {
        !matches!(
            self.rx.try_recv(),
            Err(broadcast::error::TryRecvError::Empty | broadcast::error::TryRecvError::Closed)
        )
    }

    /// The next event.
    pub async fn recv(&mut self) -> Result<ChangeEvent, FeedError> {
        self.rx.recv().await.map_err(|e| match e {
            broadcast::error::RecvError::Lagged(n) => FeedError::Lagged(n),
            broadcast::error::RecvError::Closed => FeedError::Closed,
        })
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}
