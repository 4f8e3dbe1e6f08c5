//! Running a run: load its module and history, instantiate the module in a
//! sandbox built from the run's stored grants (`sandbox`), call the
//! workflow, and act on how each instance ended ([`InstanceOutcome`]):
//! finish the run, replay it in a fresh instance, or park it. Branches run
//! as instances of their own (`branches`).

mod branches;
mod sandbox;

use std::sync::Arc;
use std::time::Duration;

use wasmtime::{Linker, Module};

use super::branch::{BranchBoard, Branches};
use super::engine::WasmEngine;
use super::imports::{self, Fatal, Finished, HostState, failed_attempt};
use super::outcome::InstanceOutcome;
use super::watch::{RunWatch, Watcher};
use crate::model::{Entry, EntryKind, RunRecord, RunStatus, now_ms};
use crate::store::{RunStore, StoreError, Write};
pub use sandbox::{PreparedModule, check_module};

/// The tokio runtime runs execute on: a thread per core but one, which is
/// left to the store's writer thread (and the kernel's I/O on its behalf).
/// See docs/performance.md for the measurement. `TOKIO_WORKER_THREADS`
/// overrides the count.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        builder.worker_threads(cores.saturating_sub(1).max(1));
    }
    builder.enable_all().build()
}

/// Waits longer than this drop the run's instance (it is replayed when it
/// wakes) instead of holding its memory.
pub const DEFAULT_PARK_THRESHOLD: Duration = Duration::from_secs(5);

/// How a run ended.
#[derive(Debug, Clone)]
pub enum RunOutcome {
    /// The workflow returned `Ok`: its output JSON.
    Completed(Vec<u8>),
    /// The workflow returned `Err`, panicked, trapped or hit a limit.
    Failed(String),
    /// `cairn cancel` stopped it.
    Cancelled,
    /// It sleeps until `wake_at` (Unix ms), or waits for `signal` until
    /// `wake_at` if any, and this executor gives such runs back to the
    /// store ([`Executor::with_parked_released`]): the caller releases its
    /// lease with `RunStore::release_parked`.
    Parked { wake_at: Option<i64>, signal: Option<String> },
}

/// What to do after an instance stopped.
enum Next {
    Done(RunOutcome),
    /// Replay the run in a fresh instance now.
    Restart,
    /// A step's key-value writes conflicted: nothing of the instance's last
    /// item was committed; replay it in a fresh instance after a moment.
    Conflict,
    /// Replay the run in a fresh instance at this time (Unix ms), or when
    /// a signal comes (the one named, if it waits for one); meanwhile its
    /// status is this.
    Park(Option<i64>, RunStatus, Option<String>),
}

/// Why a run could not be executed (its state in the database is unchanged
/// apart from what was committed before).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Fatal(#[from] Fatal),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Module(String),
    #[error("{0}")]
    Sandbox(String),
    #[error("the executor is shutting down")]
    ShuttingDown,
    #[error("the run's task ended abnormally: {0}")]
    Task(String),
}

pub struct Executor {
    engine: Arc<WasmEngine>,
    linker: Linker<HostState>,
    /// Per module hash: imports resolved once, ABI version checked once.
    /// and the ABI version it declared.
    prepared: std::sync::Mutex<std::collections::HashMap<String, (wasmtime::InstancePre<HostState>, i32)>>,
    store: Arc<dyn RunStore>,
    watcher: Arc<Watcher>,
    park_threshold: Duration,
    /// Runs that park for at least this long end their execution here
    /// (`RunOutcome::Parked`); `None`: they wait in this process.
    release_parked: Option<Duration>,
    /// Bounds live instances (parked runs hold none); `None`: unbounded.
    instances: Option<Arc<tokio::sync::Semaphore>>,
    /// Bounds live branch instances of all runs, apart from `instances`
    /// (a parent joining holds its slot: sharing would deadlock). Each run
    /// also waits for its own share (`RunWatch::branch_slot`), and the
    /// queue is first come, first served: no run starves the others.
    branch_instances: Arc<tokio::sync::Semaphore>,
    branch_instances_total: usize,
}

/// Branch instances live at once when nothing else is said.
pub const DEFAULT_BRANCH_INSTANCES: usize = 256;

impl Executor {
    pub fn new(engine: Arc<WasmEngine>, store: Arc<dyn RunStore>) -> anyhow::Result<Self> {
        let mut linker = Linker::new(engine.engine());
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s: &mut HostState| s.wasi())
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        imports::add_to_linker(&mut linker).map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let watcher = Watcher::new(store.clone());
        Ok(Executor {
            engine,
            linker,
            prepared: Default::default(),
            store,
            watcher,
            park_threshold: DEFAULT_PARK_THRESHOLD,
            release_parked: None,
            instances: None,
            branch_instances: Arc::new(tokio::sync::Semaphore::new(DEFAULT_BRANCH_INSTANCES)),
            branch_instances_total: DEFAULT_BRANCH_INSTANCES,
        })
    }

    /// At most `n` instances live at once across this executor's runs.
    pub fn with_instance_limit(mut self, n: usize) -> Self {
        self.instances = Some(Arc::new(tokio::sync::Semaphore::new(n)));
        self
    }

    /// At most `n` branch instances live at once across this executor's runs.
    pub fn with_branch_instance_limit(mut self, n: usize) -> Self {
        self.branch_instances = Arc::new(tokio::sync::Semaphore::new(n.max(1)));
        self.branch_instances_total = n.max(1);
        self
    }

    pub fn instance_limit(&self) -> Option<&Arc<tokio::sync::Semaphore>> {
        self.instances.as_ref()
    }

    /// Waits longer than `threshold` park the run instead of holding its instance.
    pub fn with_park_threshold(mut self, threshold: Duration) -> Self {
        self.park_threshold = threshold;
        self
    }

    /// Runs that park to sleep, or to wait for a signal, for at least
    /// `after` (and have no branch running) end their execution with
    /// `RunOutcome::Parked`, for the caller to give back until they are due
    /// or signalled, rather than wait here.
    pub fn with_parked_released(mut self, after: Option<Duration>) -> Self {
        self.release_parked = after;
        self
    }

    pub fn store(&self) -> &Arc<dyn RunStore> {
        &self.store
    }

    /// The ABI version a module declared, once an instance of it was made
    /// here (the newest until then: its first host call finds out).
    fn abi_version(&self, hash: &str) -> i32 {
        self.prepared.lock().unwrap_or_else(|p| p.into_inner()).get(hash).map_or(imports::ABI_VERSION, |(_, v)| *v)
    }

    /// [`Executor::execute`] in a task of the runtime, as `cairn run` and
    /// `cairn resume` execute their run. The caller's thread (the main
    /// thread, in `block_on`) is not one of the runtime's workers: a run
    /// executed there wakes a worker at every commit and is woken back by
    /// it. In a task, the run, the store's writer and a PostgreSQL
    /// connection share a worker and hand over to each other without waking
    /// another thread (docs/performance.md).
    pub async fn execute_in_task(self: &Arc<Self>, run: Arc<RunRecord>) -> Result<RunOutcome, ExecError> {
        let executor = self.clone();
        tokio::spawn(async move { executor.execute(&run).await }).await.map_err(|e| ExecError::Task(e.to_string()))?
    }

    /// Execute (or continue) a run the caller holds the lease of, until it
    /// completes, fails or is cancelled.
    ///
    /// The record is shared (`Arc`) with the run's branch launcher: a
    /// parked run holds one copy of it, not two.
    pub async fn execute(self: &Arc<Self>, run: &Arc<RunRecord>) -> Result<RunOutcome, ExecError> {
        // A run's share of branch instances: half of them, so that one run
        // with thousands of branches leaves room for the others.
        let registration = self.watcher.register(run.key, self.branch_instances_total / 2);
        let watch = registration.watch.clone();
        if run.cancel_requested {
            watch.request_cancel_at(run.cancel_grace_until);
        }
        let module = self.load_module(run).await?;
        // Branches outlive the parent instance that spawned them (a retry
        // restarts the parent; they go on): one board per execution. A
        // branch attempt exists only after its spawn entry: no spawn, no query.
        let mut history = Some(self.store.history(run.key).await?);
        let spawned = history.iter().flatten().any(|e| e.kind == EntryKind::Spawn);
        let attempts = if spawned { self.store.branch_attempts(run.key).await? } else { Vec::new() };
        let board = Arc::new(BranchBoard::from_attempts(attempts));
        let branches = self.branches_of(run, &module, board, watch.clone());
        let mut status = run.status;
        loop {
            // A module told of cancellations (ABI version 2) runs on
            // through a grace period; others stop at once.
            let graced = watch.grace_until().is_some() && self.abi_version(&run.module) < 2;
            if watch.cancel_requested() || graced {
                self.commit(vec![Write::cancelled(run.key)]).await?;
                return Ok(RunOutcome::Cancelled);
            }
            if let Some(ms) = run.config.limits.max_wall_ms
                && now_ms() >= run.created_at.saturating_add(ms as i64)
            {
                let message = format!("limit `--max-wall` exceeded: the run is older than {} s", ms as f64 / 1000.0);
                self.commit(vec![Write::failed(run.key, message.clone())]).await?;
                return Ok(RunOutcome::Failed(message));
            }
            // `running` rides with the instance's first commit (one item
            // fewer per run); an instance that commits nothing changes nothing.
            let mark_running = status != RunStatus::Running;
            status = RunStatus::Running;
            let permit = match &self.instances {
                Some(sem) => Some(sem.clone().acquire_owned().await.map_err(|_| ExecError::ShuttingDown)?),
                None => None,
            };
            // Boxed: the instance's future is large, and a parked run should
            // not carry its space while it waits.
            let next = Box::pin(self.execute_once(
                run,
                &module,
                history.take(),
                watch.clone(),
                branches.clone(),
                mark_running,
            ))
            .await;
            drop(permit);
            match next? {
                Next::Done(outcome) => return Ok(outcome),
                Next::Restart => {}
                Next::Conflict => {
                    // The item that failed carried the run's status too.
                    status = RunStatus::Pending;
                    tokio::time::sleep(conflict_backoff()).await;
                }
                Next::Park(wake_at, parked, signal) => {
                    // No instance, no thread: a timer and a wake-up are all
                    // a parked run holds.
                    self.commit(vec![Write::status(run.key, parked)]).await?;
                    status = parked;
                    // A parked run past its wall time fails then, not when it wakes.
                    let wall = run.config.limits.max_wall_ms.map(|ms| run.created_at.saturating_add(ms as i64));
                    // So does one whose grace period ends first.
                    let wake_at = [wake_at, wall, watch.grace_until()].into_iter().flatten().min();
                    // A long sleep or signal wait with nothing else going
                    // on: given back until it is due or signalled (a cancel
                    // in its grace period stays).
                    if let Some(after) = self.release_parked
                        && (parked == RunStatus::Sleeping || signal.is_some())
                        && watch.grace_until().is_none()
                        && !branches.board.any_running()
                        && wake_at.is_none_or(|at| at.saturating_sub(now_ms()) >= after.as_millis() as i64)
                        && (wake_at.is_some() || signal.is_some())
                    {
                        return Ok(RunOutcome::Parked { wake_at, signal });
                    }
                    let sleep = async {
                        match wake_at {
                            Some(at) => {
                                tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms()).max(0) as u64))
                                    .await
                            }
                            None => std::future::pending().await,
                        }
                    };
                    let _parked = crate::telemetry::GaugeGuard::new(&crate::telemetry::get().parked_runs);
                    tokio::select! {
                        _ = sleep => {}
                        _ = watch.changed() => {}
                    }
                }
            }
        }
    }

    /// The run's compiled module: already loaded by this process, from the
    /// compiled cache, or compiled from the bytes in the store.
    async fn load_module(&self, run: &RunRecord) -> Result<Module, ExecError> {
        if let Some(module) = self.engine.loaded(&run.module) {
            return Ok(module);
        }
        // Reading a compiled module from the cache, or compiling one, takes
        // milliseconds to a few hundred: not on an executor thread, which
        // every other run in this process shares.
        let (engine, store, hash) = (self.engine.clone(), self.store.clone(), run.module.clone());
        tokio::task::spawn_blocking(move || {
            engine.load(&hash, || {
                let bytes = tokio::runtime::Handle::current()
                    .block_on(store.module(&hash))?
                    .ok_or_else(|| anyhow::anyhow!("module {hash} is not in the database"))?;
                // The bytes become native code: they must be the module the
                // run names, not whatever the row holds.
                if super::engine::module_hash(&bytes) != hash {
                    anyhow::bail!("the bytes stored for module {hash} do not have that hash");
                }
                Ok(bytes)
            })
        })
        .await
        .unwrap_or_else(|e| Err(anyhow::anyhow!("the loading task failed: {e}")))
        .map_err(|e| ExecError::Module(format!("run {}: cannot load its module: {e:#}", run.id)))
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<(), ExecError> {
        crate::store::commit(&*self.store, writes).await?;
        Ok(())
    }

    /// One instance: replay the history, continue live until the workflow
    /// finishes or the instance stops.
    async fn execute_once(
        &self,
        run: &RunRecord,
        module: &Module,
        history: Option<Vec<Entry>>,
        watch: Arc<RunWatch>,
        branches: Arc<Branches>,
        mark_running: bool,
    ) -> Result<Next, ExecError> {
        let history = match history {
            Some(h) => h,
            None => self.store.history(run.key).await?,
        };
        let mut wstore = self.new_store(run, history, watch, branches, None)?;
        if mark_running {
            wstore.data_mut().defer_write(Write::status(run.key, RunStatus::Running));
        }
        let result = self.call_start(&mut wstore, module, run).await?;
        let st = wstore.data_mut();
        let outcome = InstanceOutcome::of(st, result);
        self.settle(st, outcome).await
    }

    /// Act on how a run's instance ended, committing what it leaves behind.
    async fn settle(&self, st: &mut HostState, outcome: InstanceOutcome) -> Result<Next, ExecError> {
        let run = st.run().run;
        Ok(match outcome {
            InstanceOutcome::Finished(Finished::Completed(out)) => Next::Done(RunOutcome::Completed(out)),
            InstanceOutcome::Finished(Finished::Failed(msg)) => Next::Done(RunOutcome::Failed(msg)),
            InstanceOutcome::Finished(Finished::Cancelled) => Next::Done(RunOutcome::Cancelled),
            InstanceOutcome::KvConflict => Next::Conflict,
            InstanceOutcome::Restart => Next::Restart,
            InstanceOutcome::Parked { wake_at, status, signal } => Next::Park(wake_at, status, signal),
            InstanceOutcome::Cancelled => {
                // An attempt cut short by the cancel is not recorded: it has no outcome.
                st.commit_final(vec![Write::cancelled(run)]).await?;
                Next::Done(RunOutcome::Cancelled)
            }
            InstanceOutcome::BranchRecorded(_) => {
                return Err(ExecError::Module("a parent instance stopped as a branch".into()));
            }
            InstanceOutcome::RunLimitExceeded(message) => {
                st.commit_final(vec![Write::failed(run, message.clone())]).await?;
                Next::Done(RunOutcome::Failed(message))
            }
            InstanceOutcome::Diverged(nd) => return Err(Fatal::NonDeterminism(nd).into()),
            InstanceOutcome::Fatal(fatal) => return Err(fatal.into()),
            InstanceOutcome::Trapped { message, live } | InstanceOutcome::LimitExceeded { message, live } => {
                match live {
                    // A failed attempt: retried in a fresh instance after its
                    // backoff, or, with no attempts left, the step's final
                    // error, which the workflow receives on replay.
                    Some(live) => {
                        record_failed_attempt(st, "step", live, message).await?;
                        Next::Restart
                    }
                    None => {
                        st.commit_final(vec![Write::failed(run, message.clone())]).await?;
                        Next::Done(RunOutcome::Failed(message))
                    }
                }
            }
        })
    }
}

/// How long a step whose key-value writes conflicted waits before it runs
/// again: up to 10 ms, at random, so that runs racing for one key spread out.
pub(super) fn conflict_backoff() -> Duration {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    Duration::from_micros(u64::from(u16::from_le_bytes(b)) % 10_000)
}

/// An attempt that stopped inside its closure (a trap, a panic, a limit):
/// journal it as failed (`what` is "step" or "branch") and commit it.
async fn record_failed_attempt(
    st: &mut HostState,
    what: &str,
    live: imports::LiveStep,
    message: String,
) -> Result<Entry, Fatal> {
    let message = format!("{what} \"{}\" #{} attempt {} failed: {message}", live.name, live.occurrence, live.attempt);
    let (entry, _) = failed_attempt(live, message, true);
    st.record_attempt_final(entry.clone()).await?;
    Ok(entry)
}
