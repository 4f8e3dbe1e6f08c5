//! How the outside world reaches a run that is executing: cancel requests
//! (and, with signals, deliveries). A watcher task polls the database and
//! sets these flags; host calls read an atomic, never the database.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

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
        self.notify.notify_waiters();
    }

    /// Wake whoever waits in [`RunWatch::changed`] (a signal may have come).
    pub fn poke(&self) {
        self.notify.notify_waiters();
    }

    /// Resolves at the next `poke` or cancel request.
    pub async fn changed(&self) {
        self.notify.notified().await
    }
}
