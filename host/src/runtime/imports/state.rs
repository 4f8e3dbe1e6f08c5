//! What one instance of a run carries between host calls: the wasmtime
//! store's data. Host calls reach it through `Caller::data_mut`; the
//! executor builds it ([`HostState::new`]) and reads how the instance ended
//! ([`HostState::take_ending`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wasmtime::Memory;
use wasmtime_wasi::p1::WasiP1Ctx;

use super::limits::{CpuBudget, MemoryLimiter};
use super::wasi::clock::MonotonicClock;
use crate::model::{Entry, RunKey, RunStatus, now_ms};
use crate::runtime::branch::{BranchKey, BranchMode, Branches};
use crate::runtime::journal::{Journal, NonDeterminism};
use crate::runtime::random::RandomStream;
use crate::runtime::watch::RunWatch;
use crate::store::{Committed, RunStore, StoreError, Write};
use cairn_abi::RetryPolicy;

/// Why a run's execution stopped abnormally from inside a host call.
#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    #[error(transparent)]
    NonDeterminism(#[from] NonDeterminism),
    #[error("could not commit run {run_id}: {source}")]
    Store { run_id: String, source: StoreError },
    #[error("ABI misuse in run {run_id}: {what}")]
    Abi { run_id: String, what: String },
}

/// How the workflow reported its end through `finish`.
#[derive(Debug, Clone)]
pub enum Finished {
    Completed(Vec<u8>),
    Failed(String),
}

/// Why the instance stopped, as the host saw it; the first one set stands
/// (whatever the guest does after, such as trapping, changes nothing).
#[derive(Debug)]
pub enum Ending {
    /// The workflow reported its result (committed).
    Finished(Finished),
    /// A step attempt failed and is journaled: replay in a fresh instance.
    Restart,
    /// Drop the instance; replay the run at `wake_at` (Unix ms), or when a
    /// signal comes; meanwhile its status is `status`.
    Park { wake_at: Option<i64>, status: RunStatus },
    /// The run was cancelled.
    Cancelled,
    /// A branch instance recorded its attempt: its work is done.
    BranchRecorded(Entry),
    /// A store failure, a divergence from the history, or ABI misuse.
    Fatal(Fatal),
    /// The guest ran longer than its CPU budget without a host call.
    CpuExceeded,
    /// The live step's attempt ran past its timeout.
    TimedOut,
}

/// A step whose closure is running live.
#[derive(Debug, Clone)]
pub struct LiveStep {
    pub name: String,
    pub occurrence: u32,
    pub attempt: u32,
    pub started_at: i64,
    pub policy: RetryPolicy,
    /// When the attempt times out (`RetryPolicy::timeout`).
    pub deadline: Option<Instant>,
}

/// The run an instance executes, as the host calls need it.
pub struct RunContext {
    pub store: Arc<dyn RunStore>,
    pub run_id: String,
    pub run: RunKey,
    pub input: Vec<u8>,
    /// Random bytes for workflow code outside step closures; `None` for
    /// runs created before run keys (their reads are journaled).
    pub random: Option<RandomStream>,
}

/// Everything [`HostState::new`] needs.
pub struct InstanceSetup {
    pub wasi: WasiP1Ctx,
    pub run: RunContext,
    pub journal: Journal,
    pub replaying: Arc<AtomicBool>,
    pub max_memory_bytes: usize,
    pub cpu_limit_ticks: u64,
    pub watch: Arc<RunWatch>,
    pub park_threshold: Duration,
    pub branches: Arc<Branches>,
    pub branch_mode: Option<BranchMode>,
}

pub struct HostState {
    pub(super) wasi: WasiP1Ctx,
    pub(super) limiter: MemoryLimiter,
    pub(super) cpu: CpuBudget,
    pub(super) run: RunContext,
    pub(super) journal: Journal,
    pub(super) memory: Option<Memory>,
    /// Bytes the host prepared for the guest to `take`.
    pub(super) staged: Vec<u8>,
    pub(super) live_step: Option<LiveStep>,
    pub(super) panic_message: Option<String>,
    ending: Option<Ending>,
    /// Shared with the guest's stdout/stderr streams.
    replaying: Arc<AtomicBool>,
    pub(super) monotonic: MonotonicClock,
    /// Cancel requests and signals from other processes.
    pub(super) watch: Arc<RunWatch>,
    /// Waits longer than this drop the instance instead of holding it.
    pub(super) park_threshold: Duration,
    /// Set when this instance is a branch instance.
    pub(super) branch_mode: Option<BranchMode>,
    /// The run's branches (shared by all its instances in this process).
    pub(super) branches: Arc<Branches>,
    /// Branch handles given to the guest by `spawn`, in spawn order.
    pub(super) handles: Vec<BranchKey>,
    /// Writes that go with the instance's next commit (the run's status).
    pending_writes: Vec<Write>,
}

impl HostState {
    pub fn new(setup: InstanceSetup) -> Self {
        HostState {
            wasi: setup.wasi,
            limiter: MemoryLimiter::new(setup.max_memory_bytes),
            cpu: CpuBudget::new(setup.cpu_limit_ticks),
            monotonic: MonotonicClock::after(setup.journal.last_monotonic()),
            run: setup.run,
            journal: setup.journal,
            memory: None,
            staged: Vec::new(),
            live_step: None,
            panic_message: None,
            ending: None,
            replaying: setup.replaying,
            watch: setup.watch,
            park_threshold: setup.park_threshold,
            branch_mode: setup.branch_mode,
            branches: setup.branches,
            handles: Vec::new(),
            pending_writes: Vec::new(),
        }
    }

    pub fn wasi(&mut self) -> &mut WasiP1Ctx {
        &mut self.wasi
    }

    pub fn limiter(&mut self) -> &mut MemoryLimiter {
        &mut self.limiter
    }

    pub fn set_memory(&mut self, memory: Option<Memory>) {
        self.memory = memory;
    }

    pub fn run(&self) -> &RunContext {
        &self.run
    }

    /// The step whose closure was running when the instance stopped.
    pub fn take_live_step(&mut self) -> Option<LiveStep> {
        self.live_step.take()
    }

    pub fn take_panic_message(&mut self) -> Option<String> {
        self.panic_message.take()
    }

    pub fn cpu_limit_ticks(&self) -> u64 {
        self.cpu.limit_ticks()
    }

    pub fn take_ending(&mut self) -> Option<Ending> {
        self.ending.take()
    }

    /// A write that rides with the instance's first commit.
    pub fn defer_write(&mut self, write: Write) {
        self.pending_writes.push(write);
    }

    /// Called at every epoch tick while the guest runs: count CPU, stop a
    /// step past its timeout or a cancelled run, else yield.
    pub fn on_epoch_tick(&mut self) -> wasmtime::Result<()> {
        if !self.cpu.tick() {
            return Err(self.stop(Ending::CpuExceeded));
        }
        if self.live_step.as_ref().and_then(|l| l.deadline).is_some_and(|d| Instant::now() >= d) {
            return Err(self.stop(Ending::TimedOut));
        }
        if self.watch.cancel_requested() {
            return Err(self.stop(Ending::Cancelled));
        }
        Ok(())
    }

    /// Every host call is a durable point: the CPU budget starts afresh,
    /// and a cancelled run stops here.
    pub(super) fn enter(&mut self) -> wasmtime::Result<()> {
        self.cpu.reset();
        if self.watch.cancel_requested() {
            return Err(self.stop(Ending::Cancelled));
        }
        Ok(())
    }

    /// Stop the instance (a trap the executor expects); the first ending
    /// recorded is the one that counts.
    pub(super) fn stop(&mut self, why: Ending) -> wasmtime::Error {
        let err = wasmtime::Error::msg(format!("instance stopped by the host: {why:?}"));
        if self.ending.is_none() {
            self.ending = Some(why);
        }
        err
    }

    pub(super) fn finished(&mut self, finished: Finished) {
        if self.ending.is_none() {
            self.ending = Some(Ending::Finished(finished));
        }
    }

    pub(super) fn fail(&mut self, fatal: Fatal) -> wasmtime::Error {
        self.stop(Ending::Fatal(fatal))
    }

    pub(super) fn diverged(&mut self, nd: NonDeterminism) -> wasmtime::Error {
        self.fail(nd.into())
    }

    pub(super) fn abi_error(&mut self, what: impl Into<String>) -> wasmtime::Error {
        let fatal = Fatal::Abi { run_id: self.run.run_id.clone(), what: what.into() };
        self.fail(fatal)
    }

    pub(super) fn sync_replaying(&self) {
        self.replaying.store(self.journal.replaying(), Ordering::Relaxed);
    }

    /// Wait until `wake_at` (Unix ms) inside a host call, or park the run
    /// if that is further away than the park threshold.
    pub(super) async fn wait_until(&mut self, wake_at: i64) -> wasmtime::Result<()> {
        loop {
            let remaining = wake_at.saturating_sub(now_ms());
            if remaining <= 0 {
                return Ok(());
            }
            if Duration::from_millis(remaining as u64) > self.park_threshold {
                return Err(self.stop(Ending::Park { wake_at: Some(wake_at), status: RunStatus::Sleeping }));
            }
            let watch = self.watch.clone();
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(remaining as u64)) => {}
                _ = watch.changed() => {}
            }
            if self.watch.cancel_requested() {
                return Err(self.stop(Ending::Cancelled));
            }
        }
    }

    /// Hand every recorded-but-unsubmitted entry, plus `extra`, to the store
    /// as one commit item and wait until it is durable.
    pub(super) async fn commit(&mut self, extra: Vec<Write>) -> wasmtime::Result<()> {
        match self.commit_inner(extra).await {
            Ok(()) => Ok(()),
            Err(source) => {
                let fatal = Fatal::Store { run_id: self.run.run_id.clone(), source };
                Err(self.fail(fatal))
            }
        }
    }

    async fn commit_inner(&mut self, extra: Vec<Write>) -> Result<(), StoreError> {
        let mut writes = std::mem::take(&mut self.pending_writes);
        writes.reserve(1 + extra.len());
        if self.journal.has_unsubmitted() {
            let (position, entries) = self.journal.take_unsubmitted();
            writes.push(Write::Append { run: self.run.run, position, entries });
        }
        writes.extend(extra);
        if writes.is_empty() {
            return Ok(());
        }
        crate::store::commit(&*self.run.store, writes).await.map(|_| ())
    }

    pub(super) async fn commit_writes(&mut self, writes: Vec<Write>) -> wasmtime::Result<Committed> {
        crate::store::commit(&*self.run.store, writes).await.map_err(|source| {
            let fatal = Fatal::Store { run_id: self.run.run_id.clone(), source };
            self.fail(fatal)
        })
    }

    /// Commit what ends an instance (its outcome, the run's status), after
    /// the guest stopped; a failure to commit is the instance's fatal error.
    pub async fn commit_final(&mut self, writes: Vec<Write>) -> Result<(), Fatal> {
        self.commit_inner(writes).await.map_err(|source| Fatal::Store { run_id: self.run.run_id.clone(), source })
    }

    /// Record an ended attempt and make it durable: in the history for a
    /// step, in the branch table for a branch instance.
    pub(super) async fn record_attempt(&mut self, entry: Entry) -> wasmtime::Result<()> {
        let write = self.attempt_write(entry);
        self.commit(write).await
    }

    /// [`HostState::record_attempt`] after the instance stopped.
    pub async fn record_attempt_final(&mut self, entry: Entry) -> Result<(), Fatal> {
        let write = self.attempt_write(entry);
        self.commit_final(write).await
    }

    /// Where an ended attempt goes: the branch table for a branch instance,
    /// else the history (then it rides with the instance's next commit).
    fn attempt_write(&mut self, entry: Entry) -> Vec<Write> {
        if self.branch_mode.is_some() {
            return vec![Write::BranchAttempt { run: self.run.run, entry }];
        }
        self.journal.record(entry);
        Vec::new()
    }
}
