//! The host side of the guest ABI (see `docs/abi.md`): the `cairn` import
//! module, and the WASI calls we take over so that workflow code is
//! deterministic on replay (clocks, randomness) and quiet while replaying
//! (stdout, stderr).

use std::io::Write as _;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use wasmtime::{Caller, Linker, Memory};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use crate::branch::{BranchKey, BranchLaunch, BranchMode, Branches};
use crate::idempotency::idempotency_key;
use crate::journal::{Entry, EntryKind, EntryStatus, Journal, NonDeterminism, Request, StepStart};
use crate::store::{RunStatus, Store, StoreError, Write, now_ms};
use crate::watch::RunWatch;

// The version, status codes and policy form shared with cairn-sdk.
pub use cairn_abi::{
    ABI_VERSION, RetryPolicy, SIGNAL_RECEIVED, SIGNAL_TIMED_OUT, SPAWN_HANDLE, SPAWN_RUN_HERE, STEP_MEMOIZED_ERR,
    STEP_MEMOIZED_OK, STEP_RUN,
};
/// The import module of the Cairn ABI.
pub const MODULE: &str = "cairn";
/// Every function of the `cairn` import module.
pub const FUNCTIONS: &[&str] =
    &["input", "take", "step_begin", "step_end", "finish", "panic", "sleep", "signal_wait", "spawn", "join"];

const WASI: &str = "wasi_snapshot_preview1";
const ERRNO_SUCCESS: i32 = 0;
const ERRNO_BADF: i32 = 8;
const ERRNO_FAULT: i32 = 21;
const ERRNO_INVAL: i32 = 28;
const ERRNO_NOTSUP: i32 = 58;

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

/// Why the host stopped an instance on purpose; the executor acts on it.
#[derive(Debug, Clone, PartialEq)]
pub enum Interrupt {
    /// Start a fresh instance that replays the history (a step attempt
    /// failed: its retry, or its final error, is in the history).
    Restart,
    /// Drop the instance; replay the run at `wake_at` (Unix ms), or when a
    /// signal comes.
    Park { wake_at: Option<i64>, status: RunStatus },
    /// The run was cancelled.
    Cancelled,
    /// A branch instance recorded its attempt: its work is done.
    BranchDone,
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

/// Memory limit enforcement with a message the user can act on.
pub struct MemoryLimiter {
    pub max_bytes: usize,
    pub hit: Option<String>,
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            let msg = format!(
                "memory limit: the workflow asked for {} MiB of memory, more than --max-memory {} MiB",
                desired.div_ceil(1 << 20),
                self.max_bytes >> 20
            );
            self.hit = Some(msg.clone());
            return Err(wasmtime::Error::msg(msg));
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

/// Live monotonic time that never falls below what the history recorded.
pub struct MonotonicClock {
    anchor: Instant,
    base: u64,
}

impl MonotonicClock {
    pub fn after(last_recorded: Option<u64>) -> Self {
        MonotonicClock { anchor: Instant::now(), base: last_recorded.map_or(0, |v| v + 1) }
    }

    pub fn now(&self) -> u64 {
        self.base + self.anchor.elapsed().as_nanos() as u64
    }
}

/// Everything one instance of a run needs; the wasmtime store's data.
pub struct HostState {
    pub wasi: WasiP1Ctx,
    pub limiter: MemoryLimiter,
    pub store: Arc<dyn Store>,
    pub run_id: String,
    pub run_seq: i64,
    pub input: Vec<u8>,
    pub journal: Journal,
    pub memory: Option<Memory>,
    /// Bytes the host prepared for the guest to `take`.
    pub staged: Vec<u8>,
    pub live_step: Option<LiveStep>,
    pub panic_message: Option<String>,
    pub fatal: Option<Fatal>,
    pub finished: Option<Finished>,
    /// Shared with the guest's stdout/stderr streams.
    pub replaying: Arc<AtomicBool>,
    pub monotonic: MonotonicClock,
    /// Epoch ticks the guest has run since its last host call.
    pub cpu_ticks: u64,
    pub cpu_limit_ticks: u64,
    pub cpu_exceeded: bool,
    /// The live step's attempt ran past its timeout.
    pub timed_out: bool,
    pub interrupt: Option<Interrupt>,
    /// Cancel requests and signals from other processes.
    pub watch: Arc<RunWatch>,
    /// Waits longer than this drop the instance instead of holding it.
    pub park_threshold: Duration,
    /// Set when this instance is a branch instance.
    pub branch_mode: Option<BranchMode>,
    /// The run's branches (shared by all its instances in this process).
    pub branches: Arc<Branches>,
    /// Branch handles given to the guest by `spawn`, in spawn order.
    pub handles: Vec<BranchKey>,
    /// The attempt a branch instance recorded.
    pub branch_result: Option<Entry>,
    /// Writes that go with the instance's next commit (the run's status).
    pub pending_writes: Vec<Write>,
    /// Random bytes for workflow code outside step closures; `None` for
    /// runs created before run keys (their reads are journaled).
    pub random: Option<crate::random::RandomStream>,
}

impl HostState {
    /// Every host call is a durable point: the CPU budget starts afresh,
    /// and a cancelled run stops here.
    fn enter(&mut self) -> wasmtime::Result<()> {
        self.cpu_ticks = 0;
        if self.watch.cancel_requested() {
            return Err(self.interrupt(Interrupt::Cancelled));
        }
        Ok(())
    }

    /// Stop the instance on purpose (a trap the executor expects).
    pub fn interrupt(&mut self, why: Interrupt) -> wasmtime::Error {
        let err = wasmtime::Error::msg(format!("instance stopped by the host: {why:?}"));
        self.interrupt = Some(why);
        err
    }

    /// Wait until `wake_at` (Unix ms) inside a host call, or park the run
    /// if that is further away than the park threshold.
    async fn wait_until(&mut self, wake_at: i64) -> wasmtime::Result<()> {
        loop {
            let remaining = wake_at - now_ms();
            if remaining <= 0 {
                return Ok(());
            }
            if Duration::from_millis(remaining as u64) > self.park_threshold {
                return Err(self.interrupt(Interrupt::Park { wake_at: Some(wake_at), status: RunStatus::Sleeping }));
            }
            let watch = self.watch.clone();
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(remaining as u64)) => {}
                _ = watch.changed() => {}
            }
            if self.watch.cancel_requested() {
                return Err(self.interrupt(Interrupt::Cancelled));
            }
        }
    }

    /// How a live step's attempt failed: a `failed` entry with its retry
    /// time if the policy allows another attempt (then true), else the
    /// step's final `error` outcome.
    pub fn failed_attempt(live: LiveStep, message: String, retryable: bool) -> (Entry, bool) {
        let now = now_ms();
        let retry = retryable && live.attempt < live.policy.max_attempts;
        let (status, output) = if retry {
            let mut unit = [0u8; 8];
            let _ = getrandom::fill(&mut unit);
            let unit = (u64::from_le_bytes(unit) >> 11) as f64 / (1u64 << 53) as f64;
            let delay = live.policy.delay(live.attempt, unit);
            (EntryStatus::Failed, (now + delay.as_millis() as i64).to_le_bytes().to_vec())
        } else {
            (EntryStatus::Error, Vec::new())
        };
        let entry = Entry {
            kind: EntryKind::Step,
            name: live.name,
            occurrence: live.occurrence,
            attempt: live.attempt,
            status,
            output,
            error: Some(message),
            started_at: live.started_at,
            finished_at: now,
        };
        (entry, retry)
    }

    /// Record an ended attempt and make it durable: in the history for a
    /// step, in the branch table for a branch instance (whose work is then
    /// done: the instance stops).
    pub async fn end_attempt(&mut self, entry: Entry) -> wasmtime::Result<()> {
        if self.branch_mode.is_some() {
            self.commit(vec![Write::BranchAttempt { run: self.run_seq, entry: entry.clone() }]).await?;
            self.branch_result = Some(entry);
            return Err(self.interrupt(Interrupt::BranchDone));
        }
        self.journal.record(entry);
        self.commit(Vec::new()).await
    }

    fn sync_replaying(&self) {
        self.replaying.store(self.journal.replaying(), Ordering::Relaxed);
    }

    fn fail(&mut self, fatal: Fatal) -> wasmtime::Error {
        let err = wasmtime::Error::msg(fatal.to_string());
        self.fatal = Some(fatal);
        err
    }

    fn abi_error(&mut self, what: impl Into<String>) -> wasmtime::Error {
        let fatal = Fatal::Abi { run_id: self.run_id.clone(), what: what.into() };
        self.fail(fatal)
    }

    /// Hand every recorded-but-unsubmitted entry, plus `extra`, to the store
    /// as one commit item and wait until it is durable.
    pub async fn commit(&mut self, extra: Vec<Write>) -> wasmtime::Result<()> {
        let mut writes = std::mem::take(&mut self.pending_writes);
        writes.reserve(1 + extra.len());
        if self.journal.has_unsubmitted() {
            let (position, entries) = self.journal.take_unsubmitted();
            writes.push(Write::Append { run: self.run_seq, position, entries });
        }
        writes.extend(extra);
        if writes.is_empty() {
            return Ok(());
        }
        self.commit_writes(writes).await.map(|_| ())
    }

    async fn commit_writes(&mut self, writes: Vec<Write>) -> wasmtime::Result<crate::store::Committed> {
        crate::store::commit(&*self.store, writes).await.map_err(|source| {
            let fatal = Fatal::Store { run_id: self.run_id.clone(), source };
            self.fail(fatal)
        })
    }

    /// Commit what ends an instance (its outcome, the run's status); a
    /// failure to commit is the instance's fatal error.
    pub async fn commit_final(&mut self, writes: Vec<Write>) -> Result<(), Fatal> {
        let _ = self.commit(writes).await;
        self.fatal.take().map_or(Ok(()), Err)
    }
}

fn guest_bytes(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> wasmtime::Result<Vec<u8>> {
    let Some(memory) = caller.data().memory else {
        return Err(caller.data_mut().abi_error("the module exports no memory"));
    };
    let (start, len) = (ptr as u32 as usize, len as u32 as usize);
    match memory.data(&caller).get(start..start.saturating_add(len)) {
        Some(bytes) => Ok(bytes.to_vec()),
        None => Err(caller.data_mut().abi_error(format!("buffer {start}+{len} is outside guest memory"))),
    }
}

fn guest_str(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> wasmtime::Result<String> {
    let bytes = guest_bytes(caller, ptr, len)?;
    String::from_utf8(bytes).map_err(|_| caller.data_mut().abi_error("a name is not valid UTF-8"))
}

fn write_guest(caller: &mut Caller<'_, HostState>, ptr: i32, bytes: &[u8]) -> bool {
    let Some(memory) = caller.data().memory else {
        return false;
    };
    memory.write(caller, ptr as u32 as usize, bytes).is_ok()
}

/// Define the `cairn` module and the WASI overrides on `linker` (which must
/// already hold WASI preview 1).
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);

    linker.func_wrap(MODULE, "input", |mut caller: Caller<'_, HostState>| -> wasmtime::Result<i32> {
        let st = caller.data_mut();
        st.enter()?;
        st.staged = st.input.clone();
        Ok(st.staged.len() as i32)
    })?;

    linker.func_wrap(
        MODULE,
        "take",
        |mut caller: Caller<'_, HostState>, ptr: i32, len: i32| -> wasmtime::Result<i32> {
            caller.data_mut().enter()?;
            let staged = std::mem::take(&mut caller.data_mut().staged);
            if staged.len() != len as u32 as usize {
                return Err(caller.data_mut().abi_error(format!("take({len}) but {} bytes are staged", staged.len())));
            }
            if !write_guest(&mut caller, ptr, &staged) {
                return Err(caller.data_mut().abi_error("take: buffer is outside guest memory"));
            }
            Ok(0)
        },
    )?;

    linker.func_wrap(MODULE, "panic", |mut caller: Caller<'_, HostState>, ptr: i32, len: i32| {
        let message = guest_bytes(&mut caller, ptr, len).map(|b| String::from_utf8_lossy(&b).into_owned());
        if let Ok(message) = message {
            caller.data_mut().panic_message = Some(message);
        }
    })?;

    linker.func_wrap_async(
        MODULE,
        "step_begin",
        |mut caller: Caller<'_, HostState>, (ptr, len, policy_ptr, policy_len): (i32, i32, i32, i32)| {
            Box::new(async move { step_begin(&mut caller, ptr, len, policy_ptr, policy_len).await })
        },
    )?;

    linker.func_wrap_async(
        MODULE,
        "signal_wait",
        |mut caller: Caller<'_, HostState>, (ptr, len, timeout_ms): (i32, i32, i64)| {
            Box::new(async move { signal_wait(&mut caller, ptr, len, timeout_ms).await })
        },
    )?;

    linker.func_wrap_async(
        MODULE,
        "spawn",
        |mut caller: Caller<'_, HostState>, (ptr, len, policy_ptr, policy_len): (i32, i32, i32, i32)| {
            Box::new(async move { spawn(&mut caller, ptr, len, policy_ptr, policy_len).await })
        },
    )?;

    linker.func_wrap_async(MODULE, "join", |mut caller: Caller<'_, HostState>, (ptr, count): (i32, i32)| {
        Box::new(async move { join(&mut caller, ptr, count).await })
    })?;

    linker.func_wrap_async(MODULE, "sleep", |mut caller: Caller<'_, HostState>, (millis,): (i64,)| {
        Box::new(async move { sleep(&mut caller, millis).await })
    })?;

    linker.func_wrap_async(
        MODULE,
        "step_end",
        |mut caller: Caller<'_, HostState>, (status, ptr, len): (i32, i32, i32)| {
            Box::new(async move { step_end(&mut caller, status, ptr, len).await })
        },
    )?;

    linker.func_wrap_async(
        MODULE,
        "finish",
        |mut caller: Caller<'_, HostState>, (status, ptr, len): (i32, i32, i32)| {
            Box::new(async move { finish(&mut caller, status, ptr, len).await })
        },
    )?;

    linker.func_wrap(WASI, "clock_time_get", clock_time_get)?;
    linker.func_wrap(WASI, "random_get", random_get)?;
    linker.func_wrap_async(
        WASI,
        "poll_oneoff",
        |mut caller: Caller<'_, HostState>, (subs, events, n, nevents): (i32, i32, i32, i32)| {
            Box::new(async move { poll_oneoff(&mut caller, subs, events, n, nevents).await })
        },
    )?;
    Ok(())
}

async fn step_begin(
    caller: &mut Caller<'_, HostState>,
    ptr: i32,
    len: i32,
    policy_ptr: i32,
    policy_len: i32,
) -> wasmtime::Result<i64> {
    caller.data_mut().enter()?;
    let name = guest_str(caller, ptr, len)?;
    let st = caller.data_mut();
    if let Some(live) = &st.live_step {
        let what = format!("step \"{name}\" began inside step \"{}\"; steps cannot nest", live.name);
        return Err(st.abi_error(what));
    }
    let run_id = st.run_id.clone();
    let (occurrence, attempt, not_before) = match st.journal.begin_step(&run_id, &name) {
        Err(nd) => return Err(st.fail(nd.into())),
        Ok(StepStart::Memoized(entry)) => {
            let (code, bytes) = match entry.status {
                EntryStatus::Error => (STEP_MEMOIZED_ERR, entry.error.clone().unwrap_or_default().into_bytes()),
                _ => (STEP_MEMOIZED_OK, entry.output.clone()),
            };
            st.staged = bytes;
            st.sync_replaying();
            return Ok((code << 32) | st.staged.len() as i64);
        }
        Ok(StepStart::Live { occurrence, attempt, not_before }) => (occurrence, attempt, not_before),
    };
    st.sync_replaying();
    // The policy is read only for a live step: replay stays cheap.
    let policy_bytes = guest_bytes(caller, policy_ptr, policy_len)?;
    let policy = match RetryPolicy::decode(&policy_bytes) {
        Ok(p) => p,
        Err(e) => return Err(caller.data_mut().abi_error(format!("step \"{name}\": {e}"))),
    };
    let st = caller.data_mut();
    // A failed attempt's backoff (journaled as an absolute time).
    if let Some(at) = not_before {
        st.wait_until(at).await?;
    }
    // Whatever the workflow read since the last commit may be used by the
    // closure for a live side effect: make it durable first. (Writes that
    // no side effect depends on, such as the run's `running` status, wait
    // for the step's own commit.)
    if st.journal.has_unsubmitted() {
        st.commit(Vec::new()).await?;
    }
    let st = caller.data_mut();
    st.staged = idempotency_key(st.store.db_id(), &st.run_id, &name, occurrence).into_bytes();
    let deadline = policy.timeout.map(|t| Instant::now() + t);
    st.live_step = Some(LiveStep { name, occurrence, attempt, started_at: now_ms(), policy, deadline });
    Ok(((attempt as i64) << 40) | (STEP_RUN << 32) | st.staged.len() as i64)
}

async fn step_end(caller: &mut Caller<'_, HostState>, status: i32, ptr: i32, len: i32) -> wasmtime::Result<i32> {
    caller.data_mut().enter()?;
    let bytes = guest_bytes(caller, ptr, len)?;
    let st = caller.data_mut();
    let Some(live) = st.live_step.take() else {
        return Err(st.abi_error("step_end without a live step_begin"));
    };
    match status {
        0 => {
            let entry = Entry {
                kind: EntryKind::Step,
                name: live.name,
                occurrence: live.occurrence,
                attempt: live.attempt,
                status: EntryStatus::Completed,
                output: bytes,
                error: None,
                started_at: live.started_at,
                finished_at: now_ms(),
            };
            st.end_attempt(entry).await?;
            Ok(0)
        }
        1 | 2 => {
            let message = String::from_utf8_lossy(&bytes).into_owned();
            let (entry, retry) = HostState::failed_attempt(live, message, status == 1);
            st.end_attempt(entry).await?;
            if retry {
                // The closure was FnOnce: the next attempt needs a fresh
                // instance that replays up to this step.
                return Err(caller.data_mut().interrupt(Interrupt::Restart));
            }
            Ok(0)
        }
        other => Err(st.abi_error(format!("step_end status {other} is not 0, 1 or 2"))),
    }
}

/// Start a parallel branch. In the parent: record the `spawn` (durable,
/// with the reads before it, since the branch's closure may use them) and
/// start the branch unless it has an outcome; answer a handle. In a branch
/// instance that reaches its own spawn: answer "run the closure here".
async fn spawn(
    caller: &mut Caller<'_, HostState>,
    ptr: i32,
    len: i32,
    policy_ptr: i32,
    policy_len: i32,
) -> wasmtime::Result<i64> {
    caller.data_mut().enter()?;
    let name = guest_str(caller, ptr, len)?;
    let policy_bytes = guest_bytes(caller, policy_ptr, policy_len)?;
    let st = caller.data_mut();
    if st.live_step.is_some() {
        return Err(st.abi_error(format!("spawn of \"{name}\" inside a step; branches cannot nest")));
    }
    let policy = match RetryPolicy::decode(&policy_bytes) {
        Ok(p) => p,
        Err(e) => return Err(st.abi_error(format!("branch \"{name}\": {e}"))),
    };
    let run_id = st.run_id.clone();
    let (occurrence, replayed) = match st.journal.begin_spawn(&run_id, &name) {
        Ok(r) => r,
        Err(nd) => return Err(st.fail(nd.into())),
    };
    let key: BranchKey = (name, occurrence);
    if let Some(mode) = st.branch_mode.clone() {
        if mode.key != key {
            if !replayed {
                return Err(st.abi_error(format!("branch {:?} never reached its spawn", mode.key)));
            }
            st.handles.push(key);
            return Ok((SPAWN_HANDLE << 32) | (st.handles.len() - 1) as i64);
        }
        st.sync_replaying();
        st.staged = idempotency_key(st.store.db_id(), &st.run_id, &key.0, key.1).into_bytes();
        let deadline = policy.timeout.map(|t| Instant::now() + t);
        st.live_step = Some(LiveStep {
            name: key.0,
            occurrence: key.1,
            attempt: mode.attempt,
            started_at: now_ms(),
            policy,
            deadline,
        });
        return Ok(((mode.attempt as i64) << 40) | (SPAWN_RUN_HERE << 32) | st.staged.len() as i64);
    }
    if !replayed {
        st.journal.record(Entry::event(EntryKind::Spawn, key.0.clone(), key.1, Vec::new()));
        st.commit(Vec::new()).await?;
    }
    let st = caller.data_mut();
    st.sync_replaying();
    // New, or unfinished when the host last stopped: (re)start it.
    if st.branches.board.claim(&key) {
        let history = st.journal.entries()[..st.journal.cursor()].to_vec();
        let branches = st.branches.clone();
        branches.launcher.launch(BranchLaunch { key: key.clone(), history, policy, branches: branches.clone() });
    }
    st.handles.push(key);
    Ok((SPAWN_HANDLE << 32) | (st.handles.len() - 1) as i64)
}

/// Wait for the branches behind `count` u32 handles at `ptr`; stage their
/// outcomes in handle order, each as status u8 (0 value, 1 error), length
/// u32 little-endian, bytes.
async fn join(caller: &mut Caller<'_, HostState>, ptr: i32, count: i32) -> wasmtime::Result<i64> {
    caller.data_mut().enter()?;
    let raw = guest_bytes(caller, ptr, count.saturating_mul(4))?;
    let st = caller.data_mut();
    if st.live_step.is_some() {
        return Err(st.abi_error("join inside a step"));
    }
    let mut keys = Vec::with_capacity(raw.len() / 4);
    for h in raw.chunks_exact(4) {
        let h = u32::from_le_bytes(h.try_into().unwrap()) as usize;
        match st.handles.get(h) {
            Some(k) => keys.push(k.clone()),
            None => return Err(st.abi_error(format!("join: no branch handle {h}"))),
        }
    }
    let (board, watch) = (st.branches.board.clone(), st.watch.clone());
    let outcomes = loop {
        let changed = board.changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let got: Option<Vec<_>> = keys.iter().map(|k| board.outcome(k)).collect();
        if let Some(got) = got {
            break got;
        }
        tokio::select! {
            _ = changed => {}
            _ = watch.changed() => caller.data_mut().enter()?,
        }
    };
    let mut staged = Vec::new();
    for outcome in outcomes {
        let (status, bytes) = match outcome {
            Ok(v) => (0u8, v),
            Err(e) => (1u8, e.into_bytes()),
        };
        staged.push(status);
        staged.extend((bytes.len() as u32).to_le_bytes());
        staged.extend(bytes);
    }
    let st = caller.data_mut();
    st.staged = staged;
    Ok(st.staged.len() as i64)
}

/// A durable timer: the wake-up time is committed before the wait, so a
/// run killed mid-sleep wakes at the original time after a resume.
async fn durable_timer(
    caller: &mut Caller<'_, HostState>,
    wake_at_if_live: impl FnOnce() -> i64,
) -> wasmtime::Result<()> {
    let wake_at = record_timer(caller, wake_at_if_live).await?;
    caller.data_mut().wait_until(wake_at).await
}

/// The wake-up time of the timer under the cursor (replay), or a new one
/// recorded and committed (live).
async fn record_timer(
    caller: &mut Caller<'_, HostState>,
    wake_at_if_live: impl FnOnce() -> i64,
) -> wasmtime::Result<i64> {
    let st = caller.data_mut();
    let run_id = st.run_id.clone();
    let wake_at = match st.journal.replay_read(&run_id, &Request::Timer) {
        Err(nd) => return Err(st.fail(nd.into())),
        Ok(Some(entry)) => match entry.time_value() {
            Some(t) => t,
            None => return Err(st.abi_error("a recorded timer is malformed")),
        },
        Ok(None) => {
            let wake_at = wake_at_if_live();
            st.journal.record(Entry::event(EntryKind::Timer, "", 0, wake_at.to_le_bytes().to_vec()));
            st.commit(Vec::new()).await?;
            wake_at
        }
    };
    caller.data().sync_replaying();
    Ok(wake_at)
}

/// Wait for signal `name`: consumed from the signals table and journaled in
/// one commit, so each signal is received exactly once. A timeout's
/// deadline is a durable timer recorded first.
async fn signal_wait(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32, timeout_ms: i64) -> wasmtime::Result<i64> {
    caller.data_mut().enter()?;
    let name = guest_str(caller, ptr, len)?;
    if caller.data().live_step.is_some() {
        return Err(caller.data_mut().abi_error("waiting for a signal inside a step"));
    }
    let deadline = if timeout_ms >= 0 { Some(record_timer(caller, || now_ms() + timeout_ms).await?) } else { None };
    let st = caller.data_mut();
    let run_id = st.run_id.clone();
    match st.journal.replay_read(&run_id, &Request::Signal { name: &name }) {
        Err(nd) => return Err(st.fail(nd.into())),
        Ok(Some(entry)) => {
            let (code, payload) = if entry.output.is_empty() {
                (SIGNAL_TIMED_OUT, Vec::new())
            } else {
                (SIGNAL_RECEIVED, entry.output.clone())
            };
            st.staged = payload;
            st.sync_replaying();
            return Ok((code << 32) | st.staged.len() as i64);
        }
        Ok(None) => {}
    }
    let held_since = Instant::now();
    loop {
        let st = caller.data_mut();
        let entry = Entry::event(EntryKind::Signal, name.clone(), 0, Vec::new());
        // Flush pending reads first, so the signal lands at the next position.
        st.commit(Vec::new()).await?;
        let st = caller.data_mut();
        let position = st.journal.len();
        let consume = Write::ConsumeSignal { run: st.run_seq, name: name.clone(), entry: (position, entry.clone()) };
        let taken = st.commit_writes(vec![consume]).await?.signal;
        if let Some(payload) = taken {
            st.journal.record_committed(Entry { output: payload.clone(), ..entry });
            st.staged = payload;
            return Ok((SIGNAL_RECEIVED << 32) | st.staged.len() as i64);
        }
        if let Some(d) = deadline
            && now_ms() >= d
        {
            st.journal.record(entry);
            st.commit(Vec::new()).await?;
            let st = caller.data_mut();
            st.staged = Vec::new();
            return Ok(SIGNAL_TIMED_OUT << 32);
        }
        // Hold the instance for a while (a prompt signal costs no replay),
        // then park it until the deadline or a signal.
        let held = held_since.elapsed();
        if held >= st.park_threshold {
            return Err(st.interrupt(Interrupt::Park { wake_at: deadline, status: RunStatus::Waiting }));
        }
        let mut wait = st.park_threshold - held;
        if let Some(d) = deadline {
            wait = wait.min(Duration::from_millis((d - now_ms()).max(0) as u64));
        }
        let watch = st.watch.clone();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = watch.changed() => {}
        }
        caller.data_mut().enter()?;
    }
}

async fn sleep(caller: &mut Caller<'_, HostState>, millis: i64) -> wasmtime::Result<i32> {
    caller.data_mut().enter()?;
    if caller.data().live_step.is_some() {
        return Err(caller.data_mut().abi_error("ctx.sleep inside a step"));
    }
    durable_timer(caller, || now_ms() + millis.max(0)).await?;
    Ok(0)
}

/// `std::thread::sleep` and friends. Clock subscriptions only: in workflow
/// code the earliest becomes a durable timer; inside a live step it is a
/// live sleep that frees the thread (and respects the attempt's timeout).
async fn poll_oneoff(
    caller: &mut Caller<'_, HostState>,
    subs: i32,
    events: i32,
    n: i32,
    nevents: i32,
) -> wasmtime::Result<i32> {
    caller.data_mut().enter()?;
    if n <= 0 {
        return Ok(ERRNO_INVAL);
    }
    let raw = guest_bytes(caller, subs, n.saturating_mul(48))?;
    // (userdata, clock id, timeout ns, absolute)
    let mut earliest: Option<(u64, u64)> = None; // (wait ns from now, userdata)
    for sub in raw.chunks_exact(48) {
        let userdata = u64::from_le_bytes(sub[0..8].try_into().unwrap());
        if sub[8] != 0 {
            return Ok(ERRNO_NOTSUP); // fd readiness: not offered to workflows
        }
        let id = u32::from_le_bytes(sub[16..20].try_into().unwrap());
        let timeout = u64::from_le_bytes(sub[24..32].try_into().unwrap());
        let absolute = u16::from_le_bytes(sub[40..42].try_into().unwrap()) & 1 == 1;
        let wait = match (id, absolute) {
            (_, false) => timeout,
            (0, true) => timeout.saturating_sub(live_clock(caller.data(), 0)),
            (1, true) => timeout.saturating_sub(caller.data().monotonic.now()),
            _ => return Ok(ERRNO_INVAL),
        };
        if earliest.is_none_or(|(w, _)| wait < w) {
            earliest = Some((wait, userdata));
        }
    }
    let (wait_ns, userdata) = earliest.expect("n > 0");
    if let Some(live) = caller.data().live_step.clone() {
        let mut until = Instant::now() + Duration::from_nanos(wait_ns);
        let timed_out = live.deadline.is_some_and(|d| d < until);
        if let Some(d) = live.deadline {
            until = until.min(d);
        }
        let watch = caller.data().watch.clone();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until.into()) => break,
                _ = watch.changed() => caller.data_mut().enter()?,
            }
        }
        if timed_out {
            caller.data_mut().timed_out = true;
            return Err(wasmtime::Error::msg("step timed out"));
        }
    } else {
        let wake_at = now_ms() + (wait_ns / 1_000_000) as i64;
        durable_timer(caller, || wake_at).await?;
    }
    let mut event = [0u8; 32];
    event[0..8].copy_from_slice(&userdata.to_le_bytes());
    // error 0 (success), type 0 (clock)
    if !write_guest(caller, events, &event) || !write_guest(caller, nevents, &1u32.to_le_bytes()) {
        return Ok(ERRNO_FAULT);
    }
    caller.data_mut().enter()?;
    Ok(ERRNO_SUCCESS)
}

async fn finish(caller: &mut Caller<'_, HostState>, status: i32, ptr: i32, len: i32) -> wasmtime::Result<i32> {
    caller.data_mut().enter()?;
    let bytes = guest_bytes(caller, ptr, len)?;
    let st = caller.data_mut();
    if st.live_step.is_some() {
        return Err(st.abi_error("finish inside a step"));
    }
    if let Err(nd) = st.journal.check_finish(&st.run_id) {
        return Err(st.fail(nd.into()));
    }
    // A branch that is never joined still runs to completion and is recorded.
    let board = st.branches.board.clone();
    loop {
        let changed = board.changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if !board.any_running() {
            break;
        }
        changed.await;
    }
    let st = caller.data_mut();
    let finished = match status {
        0 => Finished::Completed(bytes),
        1 => Finished::Failed(String::from_utf8_lossy(&bytes).into_owned()),
        other => return Err(st.abi_error(format!("finish status {other} is not 0 or 1"))),
    };
    let write = match &finished {
        Finished::Completed(out) => {
            Write::SetStatus { run: st.run_seq, status: RunStatus::Completed, output: Some(out.clone()), error: None }
        }
        Finished::Failed(msg) => Write::failed(st.run_seq, msg.clone()),
    };
    st.commit(vec![write]).await?;
    caller.data_mut().finished = Some(finished);
    Ok(0)
}

fn live_clock(st: &HostState, id: i32) -> u64 {
    if id == 0 {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
    } else {
        st.monotonic.now()
    }
}

/// Clock reads by workflow code are journaled; reads inside a live step
/// closure are live and not journaled (the closure does not run on replay).
fn clock_time_get(mut caller: Caller<'_, HostState>, id: i32, _precision: i64, out: i32) -> wasmtime::Result<i32> {
    let st = caller.data_mut();
    st.enter()?;
    let name = match id {
        0 => "realtime",
        1 => "monotonic",
        _ => return Ok(ERRNO_BADF), // CPU-time clocks: not offered, as in wasmtime
    };
    let value = if st.live_step.is_some() {
        live_clock(st, id)
    } else {
        let run_id = st.run_id.clone();
        match st.journal.replay_read(&run_id, &Request::Clock { name }) {
            Err(nd) => return Err(st.fail(nd.into())),
            Ok(Some(entry)) => match entry.clock_value() {
                Some(v) => v,
                None => return Err(st.abi_error("a recorded clock value is malformed")),
            },
            Ok(None) => {
                let v = live_clock(st, id);
                st.journal.record(Entry::event(EntryKind::Clock, name, 0, v.to_le_bytes().to_vec()));
                v
            }
        }
    };
    st.sync_replaying();
    Ok(if write_guest(&mut caller, out, &value.to_le_bytes()) { ERRNO_SUCCESS } else { ERRNO_FAULT })
}

/// Random bytes read by workflow code come from the run's keyed stream
/// (`crate::random`; this also covers std's `HashMap` keys), or are
/// journaled for runs without a key; reads inside a live step closure are
/// live.
fn random_get(mut caller: Caller<'_, HostState>, ptr: i32, len: i32) -> wasmtime::Result<i32> {
    let st = caller.data_mut();
    st.enter()?;
    let len = len as u32 as usize;
    let bytes = if st.live_step.is_some() {
        fresh_random(len)?
    } else if let Some(stream) = &mut st.random {
        let mut bytes = vec![0u8; len];
        stream.fill(&mut bytes);
        bytes
    } else {
        let run_id = st.run_id.clone();
        match st.journal.replay_read(&run_id, &Request::Random { len }) {
            Err(nd) => return Err(st.fail(nd.into())),
            Ok(Some(entry)) => entry.output.clone(),
            Ok(None) => {
                let bytes = fresh_random(len)?;
                st.journal.record(Entry::event(EntryKind::Random, "", 0, bytes.clone()));
                bytes
            }
        }
    };
    st.sync_replaying();
    Ok(if write_guest(&mut caller, ptr, &bytes) { ERRNO_SUCCESS } else { ERRNO_FAULT })
}

fn fresh_random(len: usize) -> wasmtime::Result<Vec<u8>> {
    let mut bytes = vec![0u8; len];
    getrandom::fill(&mut bytes).map_err(|e| wasmtime::Error::msg(format!("host randomness failed: {e}")))?;
    Ok(bytes)
}

/// The guest's stdout and stderr: forwarded to the host's stderr (stdout
/// carries the run's output), dropped while the run replays its history so
/// that a resume does not repeat log lines.
#[derive(Clone)]
pub struct GuestOutput {
    replaying: Arc<AtomicBool>,
}

impl GuestOutput {
    pub fn new(replaying: Arc<AtomicBool>) -> Self {
        GuestOutput { replaying }
    }

    fn emit(&self, bytes: &[u8]) -> std::io::Result<()> {
        if !self.replaying.load(Ordering::Relaxed) {
            std::io::stderr().write_all(bytes)?;
        }
        Ok(())
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        // Losing a log line is better than failing the workflow over it.
        let _ = self.emit(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(1 << 20)
    }
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let _ = self.emit(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
