//! Parallel branches, by "fork by replay".
//!
//! A closure cannot be shipped to another instance, but the code that
//! reaches it can be run again: a branch instance is a fresh instance of
//! the run's module that replays the parent's history up to the `spawn`
//! with the branch's (name, occurrence), runs that closure, records its
//! outcome, and stops. The parent records only the `spawn` entry and goes
//! on; `join` waits for outcomes.
//!
//! Outcomes arrive in a timing-dependent order, so they are kept by branch
//! (name, occurrence) in their own table, never at positions of the
//! parent's history: a replay sees the same thing whatever order they
//! finished in.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::model::{Entry, EntryStatus};
use cairn_abi::RetryPolicy;

/// A branch: its spawn name and occurrence.
pub type BranchKey = (String, u32);

/// The final outcome of a branch: its value (JSON) or its error.
pub type BranchOutcome = Result<Vec<u8>, String>;

/// What a branch instance is for.
#[derive(Debug, Clone)]
pub struct BranchMode {
    pub key: BranchKey,
    pub attempt: u32,
}

/// Everything the parent needs to start a branch.
pub struct BranchLaunch {
    pub key: BranchKey,
    /// The parent's history up to and including the branch's `spawn` entry.
    pub history: Vec<Entry>,
    pub policy: RetryPolicy,
    /// The run's branches: a branch instance replays the parent's joins
    /// that came before its spawn, and finds their outcomes here.
    pub branches: Arc<Branches>,
}

/// Branch state of one run in this process, shared by the run's parent
/// instances (a retry restarts the parent; its branches go on) and the
/// branch tasks.
#[derive(Default)]
pub struct BranchBoard {
    state: Mutex<BoardState>,
    changed: Notify,
}

#[derive(Default)]
struct BoardState {
    outcomes: HashMap<BranchKey, BranchOutcome>,
    /// Ended attempts by branch, in attempt order.
    attempts: HashMap<BranchKey, Vec<Entry>>,
    running: HashSet<BranchKey>,
}

impl BranchBoard {
    /// A board for a run whose recorded branch attempts are `attempts`.
    pub fn from_attempts(attempts: Vec<Entry>) -> Self {
        let board = BranchBoard::default();
        for e in attempts {
            board.record(e);
        }
        board
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BoardState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record an ended attempt; a final one (completed or error) is the
    /// branch's outcome.
    pub fn record(&self, e: Entry) {
        let key = (e.name.clone(), e.occurrence);
        let mut st = self.lock();
        match e.status {
            EntryStatus::Completed => {
                st.outcomes.insert(key.clone(), Ok(e.output.clone()));
            }
            EntryStatus::Error => {
                st.outcomes.insert(key.clone(), Err(e.error.clone().unwrap_or_default()));
            }
            EntryStatus::Failed => {}
        }
        st.attempts.entry(key).or_default().push(e);
        drop(st);
        self.changed.notify_waiters();
    }

    /// The branch ended without an attempt record (it could not execute).
    pub fn give_up(&self, key: &BranchKey, error: String) {
        self.lock().outcomes.insert(key.clone(), Err(error));
        self.changed.notify_waiters();
    }

    pub fn outcome(&self, key: &BranchKey) -> Option<BranchOutcome> {
        self.lock().outcomes.get(key).cloned()
    }

    /// Next attempt number and the time (Unix ms) before which it must not start.
    pub fn next_attempt(&self, key: &BranchKey) -> (u32, Option<i64>) {
        let st = self.lock();
        match st.attempts.get(key).and_then(|a| a.last()) {
            Some(last) => (last.attempt + 1, last.time_value()),
            None => (1, None),
        }
    }

    /// Mark the branch as running in this process; false if it already is
    /// or has an outcome (then it must not be started again).
    pub fn claim(&self, key: &BranchKey) -> bool {
        let mut st = self.lock();
        !st.outcomes.contains_key(key) && st.running.insert(key.clone())
    }

    pub fn release(&self, key: &BranchKey) {
        self.lock().running.remove(key);
        self.changed.notify_waiters();
    }

    pub fn any_running(&self) -> bool {
        !self.lock().running.is_empty()
    }

    /// Resolves after the next change; enable it before checking state.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }
}

/// Starts branch tasks; implemented by the executor.
pub trait Launcher: Send + Sync {
    fn launch(&self, launch: BranchLaunch);
}

/// A launcher for instances that must never spawn (module checks).
pub struct NoBranches;

impl Launcher for NoBranches {
    fn launch(&self, _launch: BranchLaunch) {}
}

/// The branch side of a run, as its instances see it.
pub struct Branches {
    pub board: Arc<BranchBoard>,
    pub launcher: Arc<dyn Launcher>,
}

impl Branches {
    pub fn inert() -> Arc<Self> {
        Arc::new(Branches { board: Arc::default(), launcher: Arc::new(NoBranches) })
    }
}
