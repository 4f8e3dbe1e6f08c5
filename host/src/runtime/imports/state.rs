//! What one instance of a run carries between host calls: the wasmtime
//! store's data. Host calls reach it through `Caller::data_mut`; the
//! executor builds it ([`HostState::new`]) and reads how the instance ended
//! ([`HostState::take_ending`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wasmtime::Memory;
use wasmtime_wasi::p1::WasiP1Ctx;

use super::limits::{CpuBudget, CpuExceeded, MemoryLimiter};
use super::wasi::clock::MonotonicClock;
use crate::model::{Entry, EntryKind, EntryStatus, Limits, RunKey, RunStatus, now_ms};
use crate::runtime::branch::{BranchKey, BranchMode, Branches};
use crate::runtime::idempotency::idempotency_key;
use crate::runtime::journal::{Journal, NonDeterminism, entry_bytes};
use crate::runtime::random::RandomStream;
use crate::runtime::watch::RunWatch;
use crate::store::{Committed, RunStore, StoreError, Write};
use crate::telemetry::{self, GaugeGuard};
use cairn_abi::RetryPolicy;

/// Why a run's execution stopped abnormally from inside a host call.
#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    #[error(transparent)]
    NonDeterminism(#[from] NonDeterminism),
    // Not `source`: the message carries the store's error once, not again
    // as a cause.
    #[error("could not commit run {run_id}: {error}")]
    Store { run_id: String, error: StoreError },
    #[error("ABI misuse in run {run_id}: {what}")]
    Abi { run_id: String, what: String },
}

/// How the workflow reported its end through `finish`.
#[derive(Debug, Clone)]
pub enum Finished {
    Completed(Vec<u8>),
    Failed(String),
    /// Told of a cancellation, the workflow finished: the run is cancelled.
    Cancelled,
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
    /// signal comes (`signal`: the one it waits for); meanwhile its status
    /// is `status`.
    Park { wake_at: Option<i64>, status: RunStatus, signal: Option<String> },
    /// The run was cancelled.
    Cancelled,
    /// A branch instance recorded its attempt: its work is done.
    BranchRecorded(Entry),
    /// A store failure, a divergence from the history, or ABI misuse.
    Fatal(Fatal),
    /// The guest ran longer than its CPU budget without a durable point.
    CpuExceeded,
    /// The run went past one of its limits (the message names the flag):
    /// the run fails, whatever step was running.
    RunLimit(String),
    /// The live step's attempt ran past its timeout.
    TimedOut,
    /// The attempt's key-value writes conflicted with another run's: run
    /// the attempt again (nothing of it was committed, nothing is journaled).
    KvConflict,
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
    pub http: crate::model::HttpGrants,
    pub kv_namespace: String,
    pub run: RunContext,
    pub journal: Journal,
    pub replaying: Arc<AtomicBool>,
    pub limits: Limits,
    /// When the run was created (Unix ms): `--max-wall` counts from there.
    pub created_at: i64,
    pub watch: Arc<RunWatch>,
    pub park_threshold: Duration,
    pub branches: Arc<Branches>,
    pub branch_mode: Option<BranchMode>,
}

pub struct HostState {
    pub(super) wasi: WasiP1Ctx,
    pub(super) limiter: MemoryLimiter,
    pub(super) cpu: CpuBudget,
    pub(super) limits: Limits,
    /// When `--max-wall` ends the run (Unix ms).
    wall_deadline: Option<i64>,
    /// Spawns seen by this instance, replayed or new (`--max-branches`).
    pub(super) spawns: u64,
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
    /// Start times of the completed steps in the commit under way (reused).
    step_starts: Vec<i64>,
    /// The ABI version the module declared; `None` while it is being asked
    /// (`cairn_abi_version` runs before it is known, and an epoch tick
    /// during that call must not stop it as a module that cannot be told).
    abi_version: Option<i32>,
    /// The live step's key-value reads and staged writes.
    pub(super) kv: Option<super::kv::KvAttempt>,
    /// What the run may reach over HTTP, and its key-value namespace.
    pub(super) http: crate::model::HttpGrants,
    pub(super) kv_namespace: String,
    /// Counts this instance in `cairn_live_instances` while it lives.
    _live: GaugeGuard,
}

impl HostState {
    pub fn new(setup: InstanceSetup) -> Self {
        let metrics = telemetry::get();
        if setup.journal.replaying() {
            metrics.replays.increment(1);
        }
        HostState {
            wasi: setup.wasi,
            limiter: MemoryLimiter::new(mib_bytes(setup.limits.max_memory_mib)),
            cpu: CpuBudget::new(ticks(setup.limits.max_cpu_ms), ticks(setup.limits.max_run_cpu_ms)),
            wall_deadline: setup
                .limits
                .max_wall_ms
                .map(|ms| setup.created_at.saturating_add(i64::try_from(ms).unwrap_or(i64::MAX))),
            limits: setup.limits,
            spawns: 0,
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
            step_starts: Vec::new(),
            abi_version: None,
            kv: None,
            http: setup.http,
            kv_namespace: setup.kv_namespace,
            _live: GaugeGuard::new(&metrics.live_instances),
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

    /// The ABI version the instantiated module declared.
    pub fn set_abi_version(&mut self, version: i32) {
        self.abi_version = Some(version);
    }

    /// A module built before cancellations could be delivered (ABI version
    /// 1): it cannot clean up, so a grace period stops it at once.
    pub(super) fn cannot_be_told(&self) -> bool {
        self.abi_version.is_some_and(|v| v < 2)
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
    /// step past its timeout, a run past its limits or a cancelled run,
    /// else yield.
    pub fn on_epoch_tick(&mut self) -> wasmtime::Result<()> {
        match self.cpu.tick(self.watch.add_cpu_tick()) {
            Ok(()) => {}
            Err(CpuExceeded::SinceDurablePoint) => return Err(self.stop(Ending::CpuExceeded)),
            Err(CpuExceeded::Run) => {
                let message = format!(
                    "limit `--max-run-cpu` exceeded: the workflow used more than {} s of CPU in this run",
                    self.limits.max_run_cpu_ms as f64 / 1000.0
                );
                return Err(self.stop(Ending::RunLimit(message)));
            }
        }
        self.check_wall()?;
        if self.live_step.as_ref().and_then(|l| l.deadline).is_some_and(|d| Instant::now() >= d) {
            return Err(self.stop(Ending::TimedOut));
        }
        if self.cancel_now() {
            return Err(self.stop(Ending::Cancelled));
        }
        Ok(())
    }

    /// The run must stop now: cancelled without a grace period, its grace
    /// period over, or a module that cannot be told (ABI version 1).
    /// Branch instances go on through the grace period: their parent may
    /// be waiting for them to compensate.
    pub(super) fn cancel_now(&self) -> bool {
        self.watch.cancel_requested()
            || (self.cannot_be_told() && self.branch_mode.is_none() && self.watch.grace_until().is_some())
    }

    /// Deliver a cancellation with a grace period to the workflow, once:
    /// replayed where the history has it, else recorded now if one is
    /// pending. The message for the guest, if delivered here.
    pub(super) async fn deliver_cancel(&mut self) -> wasmtime::Result<Option<String>> {
        if self.cannot_be_told() {
            return Ok(None);
        }
        // A branch instance replays its parent's history, delivered
        // cancellations included; only the parent delivers new ones.
        if let Some(entry) = self.journal.replay_cancel() {
            let message = cancel_message(entry.time_value());
            self.sync_replaying();
            return Ok(Some(message));
        }
        if self.branch_mode.is_some() || self.journal.replaying() || self.journal.cancel_delivered() {
            return Ok(None);
        }
        let Some(until) = self.watch.grace_until() else { return Ok(None) };
        self.record(Entry::event(EntryKind::Cancel, "", 0, until.to_le_bytes().to_vec()))?;
        self.commit(Vec::new()).await?;
        Ok(Some(cancel_message(Some(until))))
    }

    /// Every host call: a cancelled run, or one past its wall time, stops here.
    pub(super) fn enter(&mut self) -> wasmtime::Result<()> {
        if let Some(ending) = &self.ending {
            // The instance is over (a host call after `finish`, say).
            return Err(wasmtime::Error::msg(format!("instance stopped by the host: {ending:?}")));
        }
        if self.cancel_now() {
            return Err(self.stop(Ending::Cancelled));
        }
        self.check_wall()
    }

    /// A durable point (a step, a timer, a signal wait, a branch, the end):
    /// as [`HostState::enter`], and the CPU budget starts afresh.
    pub(super) fn durable(&mut self) -> wasmtime::Result<()> {
        self.cpu.reset();
        self.enter()
    }

    /// Time left before `--max-wall` ends the run, if it is set.
    pub(super) fn wall_left(&self) -> Option<Duration> {
        self.wall_deadline.map(|d| Duration::from_millis(d.saturating_sub(now_ms()).max(0) as u64))
    }

    fn check_wall(&mut self) -> wasmtime::Result<()> {
        if let Some(deadline) = self.wall_deadline
            && now_ms() >= deadline
        {
            let message = format!(
                "limit `--max-wall` exceeded: the run is older than {} s",
                self.limits.max_wall_ms.unwrap_or_default() as f64 / 1000.0
            );
            return Err(self.stop(Ending::RunLimit(message)));
        }
        Ok(())
    }

    /// A step's (or branch's) closure starts running live: stage its
    /// idempotency key and note the attempt; the length staged.
    pub(super) fn start_live(&mut self, name: String, occurrence: u32, attempt: u32, policy: RetryPolicy) -> i64 {
        self.staged = idempotency_key(self.run.store.db_id(), &self.run.run_id, &name, occurrence).into_bytes();
        let deadline = policy.timeout.and_then(|t| Instant::now().checked_add(t));
        self.kv = None;
        self.live_step = Some(LiveStep { name, occurrence, attempt, started_at: now_ms(), policy, deadline });
        self.staged.len() as i64
    }

    /// Stop the run for going past a limit (`what` names the flag).
    pub(super) fn run_limit(&mut self, message: String) -> wasmtime::Error {
        self.stop(Ending::RunLimit(message))
    }

    /// The largest payload a run may hand over (`--max-payload-mib`); an
    /// error naming the flag for `len` bytes of `what` past it.
    pub(super) fn check_payload(&mut self, len: usize, what: &str) -> wasmtime::Result<()> {
        if len > self.limits.max_payload_bytes() {
            let message = format!(
                "limit `--max-payload-mib` exceeded: {what} is {} bytes, more than {} MiB",
                len, self.limits.max_payload_mib
            );
            return Err(self.run_limit(message));
        }
        Ok(())
    }

    /// Room in the history for one more entry (`--max-history`,
    /// `--max-history-mib`).
    pub(super) fn check_history_room(&mut self, entry_size: usize) -> wasmtime::Result<()> {
        if self.journal.len() as u64 >= self.limits.max_history {
            let message =
                format!("limit `--max-history` exceeded: the run's history has {} entries", self.journal.len());
            return Err(self.run_limit(message));
        }
        if self.journal.bytes().saturating_add(entry_size) as u64 > self.limits.max_history_mib.saturating_mul(1 << 20)
        {
            let message = format!(
                "limit `--max-history-mib` exceeded: the run's history would take more than {} MiB",
                self.limits.max_history_mib
            );
            return Err(self.run_limit(message));
        }
        Ok(())
    }

    /// Append a new entry to the history, within the run's limits.
    pub(super) fn record(&mut self, entry: Entry) -> wasmtime::Result<()> {
        self.check_history_room(entry_bytes(&entry))?;
        self.journal.record(entry);
        Ok(())
    }

    /// Entries recorded but not committed are committed once there are this
    /// many (reads between steps would otherwise pile up in memory).
    pub(super) const MAX_UNSUBMITTED: usize = 1024;

    /// Commit pending reads once too many have piled up.
    pub(super) async fn bound_unsubmitted(&mut self) -> wasmtime::Result<()> {
        if self.journal.unsubmitted() >= Self::MAX_UNSUBMITTED {
            self.commit(Vec::new()).await?;
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
    /// if that is further away than the park threshold. With `deliver`, a
    /// cancellation with a grace period ends the wait: its message.
    pub(super) async fn wait_until(&mut self, wake_at: i64, deliver: bool) -> wasmtime::Result<Option<String>> {
        let mut shown = false;
        loop {
            let remaining = wake_at.saturating_sub(now_ms());
            let delivered = if deliver { self.deliver_cancel().await? } else { None };
            if remaining <= 0 || delivered.is_some() {
                if shown {
                    self.defer_write(Write::status(self.run.run, RunStatus::Running));
                }
                return Ok(delivered);
            }
            self.check_wall()?;
            if Duration::from_millis(remaining as u64) > self.park_threshold {
                return Err(self.stop(Ending::Park {
                    wake_at: Some(wake_at),
                    status: RunStatus::Sleeping,
                    signal: None,
                }));
            }
            if !shown && Duration::from_millis(remaining as u64) >= SHOW_WAIT {
                self.show_wait(RunStatus::Sleeping).await?;
                shown = true;
            }
            // Wake at the wall limit, or a grace period's end, if it comes first.
            let wall_left = self.wall_deadline.map_or(i64::MAX, |d| d.saturating_sub(now_ms()).max(1));
            let watch = self.watch.clone();
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(remaining.min(wall_left).min(self.grace_left()) as u64)) => {}
                _ = watch.changed() => {}
            }
            if self.cancel_now() {
                return Err(self.stop(Ending::Cancelled));
            }
        }
    }

    /// Show that the run waits, in its status, while its instance waits in
    /// memory (it says so anyway once it parks): viewers see `sleeping` or
    /// `waiting` rather than `running`. Only for waits of `SHOW_WAIT` or
    /// more, so short backoffs cost no commit; the caller sets `running`
    /// back (deferred) when the wait ends.
    pub(super) async fn show_wait(&mut self, status: RunStatus) -> wasmtime::Result<()> {
        if self.branch_mode.is_some() {
            return Ok(());
        }
        self.commit(vec![Write::status(self.run.run, status)]).await
    }

    /// Hand every recorded-but-unsubmitted entry, plus `extra`, to the store
    /// as one commit item and wait until it is durable.
    pub(super) async fn commit(&mut self, extra: Vec<Write>) -> wasmtime::Result<()> {
        match self.commit_inner(extra).await {
            Ok(()) => Ok(()),
            Err(StoreError::KvConflict { .. }) => Err(self.stop(Ending::KvConflict)),
            Err(e @ StoreError::KvFull { .. }) => Err(self.stop(Ending::RunLimit(e.to_string()))),
            Err(source) => {
                let fatal = Fatal::Store { run_id: self.run.run_id.clone(), error: source };
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
        self.step_starts.clear();
        for write in &writes {
            let entries = match write {
                Write::Append { entries, .. } => entries.as_slice(),
                Write::BranchAttempt { entry, .. } => std::slice::from_ref(entry),
                _ => continue,
            };
            let done = entries.iter().filter(|e| e.kind == EntryKind::Step && e.status == EntryStatus::Completed);
            self.step_starts.extend(done.map(|e| e.started_at));
        }
        crate::store::commit(&*self.run.store, writes).await?;
        if !self.step_starts.is_empty() {
            let metrics = telemetry::get();
            metrics.steps_committed.increment(self.step_starts.len() as u64);
            let now = now_ms();
            for started in &self.step_starts {
                metrics.step_seconds.record(now.saturating_sub(*started).max(0) as f64 / 1000.0);
            }
        }
        Ok(())
    }

    pub(super) async fn commit_writes(&mut self, writes: Vec<Write>) -> wasmtime::Result<Committed> {
        crate::store::commit(&*self.run.store, writes).await.map_err(|source| {
            let fatal = Fatal::Store { run_id: self.run.run_id.clone(), error: source };
            self.fail(fatal)
        })
    }

    /// Commit what ends an instance (its outcome, the run's status), after
    /// the guest stopped; a failure to commit is the instance's fatal error.
    pub async fn commit_final(&mut self, writes: Vec<Write>) -> Result<(), Fatal> {
        self.commit_inner(writes)
            .await
            .map_err(|source| Fatal::Store { run_id: self.run.run_id.clone(), error: source })
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
    /// An attempt's entry is recorded even past the history limits: the
    /// limit fails the run at its next entry, and what the step did is kept.
    /// A completed attempt's key-value writes go in the same item: they
    /// land with its outcome or not at all; any other attempt's are dropped.
    fn attempt_write(&mut self, entry: Entry) -> Vec<Write> {
        let kv = self.kv.take().filter(|_| entry.status == EntryStatus::Completed);
        let kv = kv
            .and_then(|kv| kv.into_commit(&self.kv_namespace, self.limits.max_kv_keys))
            .map(|kv| Write::Kv(Box::new(kv)));
        if self.branch_mode.is_some() {
            return [Write::BranchAttempt { run: self.run.run, entry }].into_iter().chain(kv).collect();
        }
        self.journal.record(entry);
        kv.into_iter().collect()
    }
}

impl HostState {
    /// Resolves once the run must stop (cancelled, or past its wall time)
    /// while a host call waits on something else (an HTTP exchange); the
    /// call then stops at `enter`. Owns what it needs: it runs beside a
    /// borrow of the state.
    pub(super) fn until_stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let watch = self.watch.clone();
        let told = !self.cannot_be_told() || self.branch_mode.is_some();
        let wall = self.wall_deadline;
        async move {
            loop {
                let now = now_ms();
                if watch.cancel_requested()
                    || (!told && watch.grace_until().is_some())
                    || wall.is_some_and(|w| now >= w)
                {
                    return;
                }
                let next = [wall, watch.grace_until()].into_iter().flatten().min().map_or(i64::MAX, |t| t - now);
                tokio::select! {
                    _ = watch.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(next.clamp(1, 3_600_000) as u64)) => {}
                }
            }
        }
    }

    /// Milliseconds until a cancel's grace period ends (`i64::MAX`: none).
    pub(super) fn grace_left(&self) -> i64 {
        self.watch.grace_until().map_or(i64::MAX, |g| g.saturating_sub(now_ms()).max(1))
    }
}

/// What the workflow is told when a cancellation is delivered: made from
/// the history only, so a replay tells it the same.
fn cancel_message(grace_until: Option<i64>) -> String {
    let until = grace_until.map(crate::service::views::time);
    match until {
        Some(until) => format!("the run was cancelled; it may clean up until {until}"),
        None => "the run was cancelled".to_string(),
    }
}

/// Waits at least this long show in the run's status ([`HostState::show_wait`]).
pub(super) const SHOW_WAIT: Duration = Duration::from_millis(100);

fn ticks(ms: u64) -> u64 {
    (ms / super::super::engine::EPOCH_TICK.as_millis() as u64).max(1)
}

fn mib_bytes(mib: u64) -> usize {
    usize::try_from(mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX)
}
