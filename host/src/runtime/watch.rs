//! How the outside world reaches a run that is executing: cancel requests
//! and signals, from this process or another (`cairn cancel`, `cairn
//! signal`, the HTTP API).
//!
//! One task per executor listens to the store's change feed (control events
//! only) and sets flags and wakes waiters; host calls read an atomic, never
//! the database.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::Notify;

use crate::model::RunKey;
use crate::store::feed::FeedError;
use crate::store::{ChangeKind, RunStore, Subscription};

/// Per-run state shared between the watcher and the run's instances in
/// this process (the parent, its retries and replays, its branches).
#[derive(Debug)]
pub struct RunWatch {
    cancel: AtomicBool,
    /// A cancel with a grace period: when it ends (Unix ms; 0: none).
    grace_until: AtomicI64,
    notify: Notify,
    /// Epoch ticks of guest CPU all the run's instances used here
    /// (`--max-run-cpu`).
    cpu_ticks: AtomicU64,
    /// Branch instances of this run live at once: its share, so that one
    /// run's thousands of branches do not crowd out other runs.
    branch_slots: tokio::sync::Semaphore,
}

impl Default for RunWatch {
    fn default() -> Self {
        RunWatch::new(1)
    }
}

impl RunWatch {
    /// A run that may have `branch_share` branch instances live at once.
    pub fn new(branch_share: usize) -> Self {
        RunWatch {
            cancel: AtomicBool::default(),
            grace_until: AtomicI64::default(),
            notify: Notify::default(),
            cpu_ticks: AtomicU64::default(),
            branch_slots: tokio::sync::Semaphore::new(branch_share.max(1)),
        }
    }

    /// A slot of the run's share of branch instances (waits for one).
    pub async fn branch_slot(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.branch_slots.acquire().await.ok()
    }

    /// Count one more tick of the run's guest CPU; the total so far.
    pub fn add_cpu_tick(&self) -> u64 {
        self.cpu_ticks.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The run must stop now: cancelled without a grace period, or its
    /// grace period is over.
    pub fn cancel_requested(&self) -> bool {
        if self.cancel.load(Ordering::Relaxed) {
            return true;
        }
        let grace = self.grace_until.load(Ordering::Relaxed);
        grace != 0 && crate::model::now_ms() >= grace
    }

    /// When a cancel's grace period ends, if one was asked for.
    pub fn grace_until(&self) -> Option<i64> {
        Some(self.grace_until.load(Ordering::Relaxed)).filter(|g| *g != 0)
    }

    pub fn request_cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
        self.poke();
    }

    /// A cancel request as stored: at once, or at the end of a grace period.
    pub fn request_cancel_at(&self, grace_until: Option<i64>) {
        match grace_until {
            None => self.request_cancel(),
            Some(at) => {
                // The earliest stop holds.
                let at = at.max(1);
                let _ = self
                    .grace_until
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| (old == 0 || at < old).then_some(at));
                self.poke();
            }
        }
    }

    /// Wake everything of the run that waits in [`RunWatch::changed`] (the
    /// parent instance, branch instances sleeping in a step), and keep one
    /// wake-up for a waiter that is about to wait, so a poke between a
    /// look at the signals and the wait is not lost (a spurious wake-up
    /// only makes the waiter look again).
    pub fn poke(&self) {
        self.notify.notify_waiters();
        self.notify.notify_one();
    }

    /// Resolves at the next `poke` or cancel request (or at once if one
    /// came since the last wait).
    pub async fn changed(&self) {
        self.notify.notified().await
    }
}

#[derive(Default)]
struct Runs {
    watched: HashMap<RunKey, Weak<RunWatch>>,
    /// Runs with a cancel request seen in the feed and not yet cancelled
    /// or executed here, with its grace period's end: a run registered
    /// just after its cancel event still sees it.
    cancelled: HashMap<RunKey, Option<i64>>,
}

/// An executor's registry of executing runs, fed by the change feed.
pub struct Watcher {
    store: Arc<dyn RunStore>,
    runs: Mutex<Runs>,
    /// Taken by the listening task when the first run registers. Subscribed
    /// when the watcher is made, before any run is claimed, so no cancel
    /// committed after a run's record was read can be missed.
    subscription: Mutex<Option<Subscription>>,
    started: AtomicBool,
}

/// Unregisters a run when its execution ends.
pub struct Registration {
    watcher: Arc<Watcher>,
    run: RunKey,
    pub watch: Arc<RunWatch>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut runs = self.watcher.lock();
        runs.watched.remove(&self.run);
        // Its execution here is over (finished, or the process lets go).
        runs.cancelled.remove(&self.run);
    }
}

impl Watcher {
    pub fn new(store: Arc<dyn RunStore>) -> Arc<Self> {
        let subscription = store.subscribe_control();
        Arc::new(Watcher {
            store,
            runs: Mutex::default(),
            subscription: Mutex::new(Some(subscription)),
            started: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Runs> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watch a run while the registration lives. Starts the listening task
    /// on first use (inside a tokio runtime).
    pub fn register(self: &Arc<Self>, run: RunKey, branch_share: usize) -> Registration {
        let watch = Arc::new(RunWatch::new(branch_share));
        {
            let mut runs = self.lock();
            runs.watched.insert(run, Arc::downgrade(&watch));
            if let Some(grace) = runs.cancelled.get(&run) {
                watch.request_cancel_at(*grace);
            }
        }
        if !self.started.swap(true, Ordering::Relaxed) {
            let subscription = self.subscription.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(subscription) = subscription {
                tokio::spawn(listen(Arc::downgrade(self), subscription));
            }
        }
        Registration { watcher: self.clone(), run, watch }
    }

    fn watched(&self, run: RunKey) -> Option<Arc<RunWatch>> {
        self.lock().watched.get(&run).and_then(Weak::upgrade)
    }

    /// After missing events: look at every executing run again.
    async fn resync(&self) {
        let watched: Vec<(RunKey, Arc<RunWatch>)> =
            self.lock().watched.iter().filter_map(|(k, w)| Some((*k, w.upgrade()?))).collect();
        let cancelled: HashMap<RunKey, Option<i64>> = match self.store.unfinished_runs().await {
            Ok(runs) => {
                runs.into_iter().filter(|r| r.cancel_requested).map(|r| (r.key, r.cancel_grace_until)).collect()
            }
            Err(e) => {
                eprintln!("cairn: watcher: {e}");
                HashMap::new()
            }
        };
        for (key, watch) in watched {
            if let Some(grace) = cancelled.get(&key) {
                watch.request_cancel_at(*grace);
            } else {
                // A signal may have come: the run looks again.
                watch.poke();
            }
        }
        self.lock().cancelled.extend(cancelled);
    }
}

async fn listen(watcher: Weak<Watcher>, mut subscription: Subscription) {
    loop {
        let event = subscription.recv().await;
        let Some(w) = watcher.upgrade() else { return };
        match event {
            Ok(event) => match event.kind {
                ChangeKind::Signal => {
                    if let Some(watch) = w.watched(event.run) {
                        watch.poke();
                    }
                }
                ChangeKind::Cancel => {
                    // The event does not say whether there is a grace
                    // period: the run's row does (a rare read).
                    let grace = match w.store.run_by_key(event.run).await {
                        Ok(Some(run)) => run.cancel_grace_until,
                        Ok(None) => None,
                        Err(e) => {
                            eprintln!("cairn: watcher: {e}");
                            None
                        }
                    };
                    let watch = {
                        let mut runs = w.lock();
                        runs.cancelled.insert(event.run, grace);
                        runs.watched.get(&event.run).and_then(Weak::upgrade)
                    };
                    if let Some(watch) = watch {
                        watch.request_cancel_at(grace);
                    }
                }
                ChangeKind::Created => {}
                // A cancelled run needs no more watching.
                _ => {
                    w.lock().cancelled.remove(&event.run);
                }
            },
            Err(FeedError::Lagged(_)) => w.resync().await,
            Err(FeedError::Closed) => return,
        }
    }
}
