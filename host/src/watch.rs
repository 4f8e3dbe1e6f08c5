//! How the outside world reaches a run that is executing: cancel requests
//! and signals sent by other processes (`cairn cancel`, `cairn signal`).
//!
//! SQLite cannot notify another process, so one watcher task per process
//! polls the database a few times a second, and only while some run is
//! executing; it sets flags and wakes waiters. Host calls read an atomic,
//! never the database.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;

use crate::store::Store;

/// How often the watcher looks.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Per-run flags shared between the watcher and the run's instance.
#[derive(Debug, Default)]
pub struct RunWatch {
    cancel: AtomicBool,
    notify: Notify,
}

impl RunWatch {
    pub fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    pub fn request_cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
        self.poke();
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

/// The process's registry of executing runs and the task that polls for them.
pub struct Watcher {
    store: Arc<dyn Store>,
    runs: Mutex<HashMap<i64, Weak<RunWatch>>>,
    /// Highest signal seq already looked at.
    last_signal: AtomicI64,
    started: AtomicBool,
}

/// Unregisters a run when its execution ends.
pub struct Registration {
    watcher: Arc<Watcher>,
    seq: i64,
    pub watch: Arc<RunWatch>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.watcher.runs.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.seq);
    }
}

impl Watcher {
    pub fn new(store: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Watcher {
            store,
            runs: Mutex::default(),
            last_signal: AtomicI64::new(0),
            started: AtomicBool::new(false),
        })
    }

    /// Watch run `seq` while the registration lives. Starts the polling task
    /// on first use (inside a tokio runtime).
    pub fn register(self: &Arc<Self>, seq: i64) -> Registration {
        let watch = Arc::new(RunWatch::default());
        self.runs.lock().unwrap_or_else(|p| p.into_inner()).insert(seq, Arc::downgrade(&watch));
        if !self.started.swap(true, Ordering::Relaxed) {
            // Signals sent before now are found by the runs themselves.
            match self.store.last_signal_seq() {
                Ok(seq) => self.last_signal.store(seq, Ordering::Relaxed),
                Err(e) => eprintln!("cairn: watcher: {e}"),
            }
            let me = Arc::downgrade(self);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(POLL_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(w) = me.upgrade() else { break };
                    w.poll();
                }
            });
        }
        Registration { watcher: self.clone(), seq, watch }
    }

    fn watched(&self, seq: i64) -> Option<Arc<RunWatch>> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner()).get(&seq).and_then(Weak::upgrade)
    }

    fn poll(&self) {
        if self.runs.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
            return;
        }
        let after = self.last_signal.load(Ordering::Relaxed);
        let notices = match self.store.notices(after) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("cairn: watcher: {e}");
                return;
            }
        };
        for &(signal, run) in &notices.signals {
            if let Some(w) = self.watched(run) {
                w.poke();
            }
            self.last_signal.fetch_max(signal, Ordering::Relaxed);
        }
        for run in notices.cancelled {
            if let Some(w) = self.watched(run) {
                w.request_cancel();
            }
        }
    }
}
