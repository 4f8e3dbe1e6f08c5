//! Running a run: load its module and history, instantiate the module in a
//! sandbox built from the run's stored grants, call the workflow, and turn
//! however it ended into the run's final state.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use wasmtime::{ExternType, Linker, Module, Store as WasmStore, UpdateDeadline};
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

use crate::abi::{self, Fatal, Finished, GuestOutput, HostState, Interrupt, MemoryLimiter, MonotonicClock};
use crate::branch::{BranchBoard, BranchLaunch, BranchMode, Branches, Launcher};
use crate::engine::{EPOCH_TICK, WasmEngine, module_hash};
use crate::journal::{Entry, EntryStatus, Journal};
use crate::lock::RunLock;
use crate::store::{NewRun, RunConfig, RunRecord, RunStatus, Store, StoreError, Write, now_ms};
use crate::watch::{RunWatch, Watcher};

/// The tokio runtime runs execute on: a thread per core but one, which is
/// left to the store's writer thread (and the kernel's I/O on its behalf).
/// On the 2-core machine of BENCHMARKS.md, one executor thread beside the
/// writer did a W2 run in 13% less CPU than two, and the whole burst 10%
/// sooner: with more threads than cores, threads preempt each other, wake
/// each other through the kernel, and each core's caches and TLB hold
/// another thread's instances. `TOKIO_WORKER_THREADS` overrides the count.
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
}

/// What to do after an instance stopped.
enum Next {
    Done(RunOutcome),
    /// Replay the run in a fresh instance now.
    Restart,
    /// Replay the run in a fresh instance at this time (Unix ms), or when
    /// a signal comes; meanwhile its status is this.
    Park(Option<i64>, RunStatus),
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
}

/// A module ready to start runs with.
pub struct PreparedModule {
    pub hash: String,
    pub bytes: Vec<u8>,
    pub module: Module,
}

pub struct Executor {
    engine: Arc<WasmEngine>,
    linker: Linker<HostState>,
    /// Per module hash: imports resolved once, ABI version checked once.
    prepared: std::sync::Mutex<std::collections::HashMap<String, wasmtime::InstancePre<HostState>>>,
    store: Arc<dyn Store>,
    watcher: Arc<Watcher>,
    park_threshold: Duration,
    /// Bounds live instances (parked runs hold none); `None`: unbounded.
    instances: Option<Arc<tokio::sync::Semaphore>>,
}

impl Executor {
    pub fn new(engine: Arc<WasmEngine>, store: Arc<dyn Store>) -> anyhow::Result<Self> {
        let mut linker = Linker::new(engine.engine());
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s: &mut HostState| &mut s.wasi)
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        abi::add_to_linker(&mut linker).map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let watcher = Watcher::new(store.clone());
        Ok(Executor {
            engine,
            linker,
            prepared: Default::default(),
            store,
            watcher,
            park_threshold: DEFAULT_PARK_THRESHOLD,
            instances: None,
        })
    }

    /// At most `n` instances live at once across this executor's runs.
    pub fn with_instance_limit(mut self, n: usize) -> Self {
        self.instances = Some(Arc::new(tokio::sync::Semaphore::new(n)));
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

    /// Read, compile and check a workflow module before any run is created.
    pub async fn prepare(&self, path: &Path) -> Result<PreparedModule, ExecError> {
        let shown = path.display();
        let bytes = std::fs::read(path).map_err(|e| ExecError::Module(format!("cannot read module {shown}: {e}")))?;
        if !bytes.starts_with(b"\0asm") {
            return Err(ExecError::Module(format!(
                "{shown} is not a WebAssembly module (it does not start with \\0asm); build workflows with \
                 `cargo build --release --target wasm32-wasip1`"
            )));
        }
        let hash = module_hash(&bytes);
        let module = self
            .engine
            .load(&hash, || Ok(bytes.clone()))
            .map_err(|e| ExecError::Module(format!("{shown} is not a valid WebAssembly module: {e:#}")))?;
        check_module(&module, &shown.to_string())?;
        // The guest declares its ABI version: ask it.
        let probe = RunRecord {
            seq: 0,
            id: "(module check)".into(),
            module: hash.clone(),
            module_path: shown.to_string(),
            input: Vec::new(),
            config: RunConfig { dirs: Vec::new(), env: Vec::new(), max_memory_mib: 64, max_cpu_ms: 1000 },
            status: RunStatus::Pending,
            output: None,
            error: None,
            created_at: 0,
            finished_at: None,
            steps: 0,
            cancel_requested: false,
            random_key: None,
        };
        let mut store = self.new_store(&probe, Vec::new(), Arc::default(), Branches::inert(), None)?;
        self.instantiate(&mut store, &module, &hash, &shown.to_string()).await?;
        Ok(PreparedModule { hash, bytes, module })
    }

    /// Store the module and create a run of it (locked for this process
    /// before anyone else can see it, if `lock`).
    pub async fn create_run(
        &self,
        prepared: &PreparedModule,
        run: NewRun,
        lock: bool,
    ) -> Result<(RunRecord, Option<RunLock>), ExecError> {
        let writes = vec![
            Write::PutModule { hash: prepared.hash.clone(), bytes: prepared.bytes.clone() },
            Write::CreateRun { run, lock },
        ];
        let committed = crate::store::commit(&*self.store, writes).await?;
        committed.created.into_iter().next().ok_or_else(|| ExecError::Module("the run was not created".into()))
    }

    fn new_store(
        &self,
        run: &RunRecord,
        history: Vec<Entry>,
        watch: Arc<RunWatch>,
        branches: Arc<Branches>,
        branch_mode: Option<BranchMode>,
    ) -> Result<WasmStore<HostState>, ExecError> {
        // A history with journaled random reads was (partly) executed by a
        // cairn from before run keys, which ignores the key: go on
        // journaling, or the replay would not find the values it read.
        let keyed = !history.iter().any(|e| e.kind == crate::journal::EntryKind::Random);
        let random_key = run.random_key.filter(|_| keyed);
        let journal = Journal::new(history);
        let replaying = Arc::new(AtomicBool::new(journal.replaying()));
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(GuestOutput::new(replaying.clone()));
        wasi.stderr(GuestOutput::new(replaying.clone()));
        for (host, guest) in &run.config.dirs {
            wasi.preopened_dir(host, guest, FsPerms::ReadWrite).map_err(|e| {
                ExecError::Sandbox(format!(
                    "run {}: cannot grant directory {} (as {guest}): {e:#}",
                    run.id,
                    host.display()
                ))
            })?;
        }
        for (k, v) in &run.config.env {
            wasi.env(k, v);
        }
        let cpu_limit_ticks = (run.config.max_cpu_ms / EPOCH_TICK.as_millis() as u64).max(1);
        let state = HostState {
            wasi: wasi.build_p1(),
            limiter: MemoryLimiter { max_bytes: (run.config.max_memory_mib as usize) << 20, hit: None },
            store: self.store.clone(),
            run_id: run.id.clone(),
            run_seq: run.seq,
            input: run.input.clone(),
            monotonic: MonotonicClock::after(journal.last_monotonic()),
            journal,
            memory: None,
            staged: Vec::new(),
            live_step: None,
            panic_message: None,
            fatal: None,
            finished: None,
            replaying,
            cpu_ticks: 0,
            cpu_limit_ticks,
            cpu_exceeded: false,
            timed_out: false,
            interrupt: None,
            watch,
            park_threshold: self.park_threshold,
            branch_mode,
            branches,
            handles: Vec::new(),
            branch_result: None,
            pending_writes: Vec::new(),
            random: random_key.map(crate::random::RandomStream::new),
        };
        let mut store = WasmStore::new(self.engine.engine(), state);
        store.limiter(|s| &mut s.limiter);
        // Count CPU in epoch ticks since the last host call, yielding to other
        // tasks at every tick; time spent waiting in host calls never counts.
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|mut ctx| {
            let st = ctx.data_mut();
            st.cpu_ticks += 1;
            if st.cpu_ticks > st.cpu_limit_ticks {
                st.cpu_exceeded = true;
                return Err(wasmtime::Error::msg("CPU limit exceeded"));
            }
            if st.live_step.as_ref().and_then(|l| l.deadline).is_some_and(|d| Instant::now() >= d) {
                st.timed_out = true;
                return Err(wasmtime::Error::msg("step timed out"));
            }
            if st.watch.cancel_requested() {
                return Err(st.interrupt(Interrupt::Cancelled));
            }
            Ok(UpdateDeadline::Yield(1))
        });
        Ok(store)
    }

    /// Instantiate and check the ABI version the guest declares.
    async fn instantiate(
        &self,
        store: &mut WasmStore<HostState>,
        module: &Module,
        hash: &str,
        shown: &str,
    ) -> Result<wasmtime::Instance, ExecError> {
        let known = self.prepared.lock().unwrap_or_else(|p| p.into_inner()).get(hash).cloned();
        let pre = match &known {
            Some(pre) => pre.clone(),
            None => self
                .linker
                .instantiate_pre(module)
                .map_err(|e| ExecError::Module(format!("cannot instantiate {shown}: {e:#}")))?,
        };
        let instance = loop {
            match pre.instantiate_async(&mut *store).await {
                Ok(instance) => break instance,
                // Every slot of a pooled engine is in use (many branches):
                // wait for one instead of failing the run.
                Err(e) if e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>().is_some() => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => {
                    return Err(ExecError::Module(format!("cannot instantiate {shown}: {e:#}")));
                }
            }
        };
        store.data_mut().memory = instance.get_memory(&mut *store, "memory");
        if known.is_some() {
            return Ok(instance);
        }
        // The guest declares its ABI version: ask it, once per module.
        let version = instance
            .get_typed_func::<(), i32>(&mut *store, "cairn_abi_version")
            .map_err(|e| ExecError::Module(format!("{shown}: `cairn_abi_version` has the wrong type: {e:#}")))?
            .call_async(&mut *store, ())
            .await
            .map_err(|e| ExecError::Module(format!("{shown}: `cairn_abi_version` failed: {e:#}")))?;
        if version != abi::ABI_VERSION {
            return Err(ExecError::Module(format!(
                "{shown} was built for Cairn ABI version {version}, but this cairn speaks version {}; \
                 rebuild it with a matching cairn-sdk or use a matching cairn",
                abi::ABI_VERSION
            )));
        }
        self.prepared.lock().unwrap_or_else(|p| p.into_inner()).insert(hash.to_string(), pre);
        Ok(instance)
    }

    /// Execute (or continue) a run the caller holds the lock of, until it
    /// completes, fails or is cancelled.
    pub async fn execute(self: &Arc<Self>, run: &RunRecord) -> Result<RunOutcome, ExecError> {
        let registration = self.watcher.register(run.seq);
        let watch = registration.watch.clone();
        if run.cancel_requested {
            watch.request_cancel();
        }
        let module = match self.engine.loaded(&run.module) {
            Some(module) => module,
            // Reading a compiled module from the cache, or compiling one,
            // takes milliseconds to a few hundred: not on an executor
            // thread, which every other run in this process shares.
            None => {
                let (engine, store, hash) = (self.engine.clone(), self.store.clone(), run.module.clone());
                tokio::task::spawn_blocking(move || {
                    engine.load(&hash, || {
                        store.module(&hash)?.ok_or_else(|| anyhow::anyhow!("module {hash} is not in the database"))
                    })
                })
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("the loading task failed: {e}")))
                .map_err(|e| ExecError::Module(format!("run {}: cannot load its module: {e:#}", run.id)))?
            }
        };
        // Branches outlive the parent instance that spawned them (a retry
        // restarts the parent; they go on): one board per execution. A
        // branch attempt exists only after its spawn entry: no spawn, no query.
        let mut history = Some(self.store.history(run.seq)?);
        let spawned = history.iter().flatten().any(|e| e.kind == crate::journal::EntryKind::Spawn);
        let attempts = if spawned { self.store.branch_attempts(run.seq)? } else { Vec::new() };
        let board = Arc::new(BranchBoard::from_attempts(attempts));
        let launcher = Arc::new(BranchLauncher {
            executor: self.clone(),
            run: run.clone(),
            module: module.clone(),
            board: board.clone(),
            watch: watch.clone(),
        });
        let branches = Arc::new(Branches { board, launcher });
        let mut status = run.status;
        loop {
            if watch.cancel_requested() {
                self.commit(vec![Write::cancelled(run.seq)]).await?;
                return Ok(RunOutcome::Cancelled);
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
                Next::Park(wake_at, parked) => {
                    // No instance, no thread: a timer and a wake-up are all
                    // a parked run holds.
                    self.set_status(run, parked).await?;
                    status = parked;
                    let sleep = async {
                        match wake_at {
                            Some(at) => tokio::time::sleep(Duration::from_millis((at - now_ms()).max(0) as u64)).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = sleep => {}
                        _ = watch.changed() => {}
                    }
                }
            }
        }
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<(), ExecError> {
        crate::store::commit(&*self.store, writes).await?;
        Ok(())
    }

    async fn set_status(&self, run: &RunRecord, status: RunStatus) -> Result<(), ExecError> {
        self.commit(vec![Write::SetStatus { run: run.seq, status, output: None, error: None }]).await
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
            None => self.store.history(run.seq)?,
        };
        let mut wstore = self.new_store(run, history, watch, branches, None)?;
        if mark_running {
            wstore.data_mut().pending_writes.push(Write::SetStatus {
                run: run.seq,
                status: RunStatus::Running,
                output: None,
                error: None,
            });
        }
        let instance = self.instantiate(&mut wstore, module, &run.module, &run.module_path).await?;
        let start = instance
            .get_typed_func::<(), ()>(&mut wstore, "_start")
            .map_err(|e| ExecError::Module(format!("{}: `_start` has the wrong type: {e:#}", run.module_path)))?;
        let result = start.call_async(&mut wstore, ()).await;
        self.conclude(wstore, result).await
    }

    async fn conclude(
        &self,
        mut wstore: WasmStore<HostState>,
        result: wasmtime::Result<()>,
    ) -> Result<Next, ExecError> {
        let st = wstore.data_mut();
        if let Some(fatal) = st.fatal.take() {
            return Err(fatal.into());
        }
        if let Some(done) = st.finished.take() {
            return Ok(Next::Done(match done {
                Finished::Completed(out) => RunOutcome::Completed(out),
                Finished::Failed(msg) => RunOutcome::Failed(msg),
            }));
        }
        match st.interrupt.take() {
            Some(Interrupt::Restart) => return Ok(Next::Restart),
            Some(Interrupt::Park { wake_at, status }) => return Ok(Next::Park(wake_at, status)),
            Some(Interrupt::BranchDone) => {
                return Err(ExecError::Module("a parent instance stopped as a branch".into()));
            }
            Some(Interrupt::Cancelled) => {
                // An attempt cut short by the cancel is not recorded: it has no outcome.
                st.commit_final(vec![Write::cancelled(st.run_seq)]).await?;
                return Ok(Next::Done(RunOutcome::Cancelled));
            }
            None => {}
        }
        let mut message = failure_message(st, &result);
        if let Some(live) = st.live_step.take() {
            // A failed attempt: retried in a fresh instance after its backoff,
            // or, with no attempts left, the step's final error, which the
            // workflow receives on replay.
            message = format!("step \"{}\" #{} attempt {} failed: {message}", live.name, live.occurrence, live.attempt);
            let (entry, _) = HostState::failed_attempt(live, message, true);
            st.journal.record(entry);
            st.commit_final(Vec::new()).await?;
            return Ok(Next::Restart);
        }
        let write = Write::failed(st.run_seq, message.clone());
        st.commit_final(vec![write]).await?;
        Ok(Next::Done(RunOutcome::Failed(message)))
    }
}

/// Why an instance ended without finishing, in words a user can act on.
fn failure_message(st: &mut HostState, result: &wasmtime::Result<()>) -> String {
    match result {
        Ok(()) => "the workflow returned from main without reporting a result \
                   (main must call cairn_sdk::run)"
            .to_string(),
        Err(e) => {
            if let Some(exit) = e.downcast_ref::<I32Exit>() {
                format!("the workflow exited with code {} before reporting a result", exit.0)
            } else if st.timed_out {
                let timeout = st.live_step.as_ref().and_then(|l| l.policy.timeout).unwrap_or_default();
                format!("timed out after {timeout:?}")
            } else if let Some(panic) = st.panic_message.take() {
                panic
            } else if st.cpu_exceeded {
                format!(
                    "CPU limit: the workflow ran {} ms without reaching a host call (raise it with --max-cpu)",
                    st.cpu_limit_ticks * EPOCH_TICK.as_millis() as u64
                )
            } else if let Some(hit) = st.limiter.hit.take() {
                format!("{hit} (raise it with --max-memory)")
            } else {
                format!("the workflow trapped: {e:#}")
            }
        }
    }
}

/// Starts a run's branches as tasks of this process.
struct BranchLauncher {
    executor: Arc<Executor>,
    run: RunRecord,
    module: Module,
    board: Arc<BranchBoard>,
    watch: Arc<RunWatch>,
}

impl Launcher for BranchLauncher {
    fn launch(&self, launch: BranchLaunch) {
        let executor = self.executor.clone();
        let (run, module, board, watch) =
            (self.run.clone(), self.module.clone(), self.board.clone(), self.watch.clone());
        tokio::spawn(async move {
            // Released even if the task panics: a run waits for its
            // running branches before it finishes.
            struct Release(Arc<BranchBoard>, crate::branch::BranchKey);
            impl Drop for Release {
                fn drop(&mut self) {
                    if self.0.outcome(&self.1).is_none() {
                        // In memory only: the branch runs again on resume.
                        self.0.give_up(&self.1, format!("branch {:?} stopped unexpectedly", self.1));
                    }
                    self.0.release(&self.1);
                }
            }
            let _release = Release(board.clone(), launch.key.clone());
            executor.run_branch(&run, &module, &board, &watch, &launch).await;
        });
    }
}

impl Executor {
    /// Attempts of one branch until it has an outcome: each in a fresh
    /// instance, after the recorded backoff of the previous one.
    async fn run_branch(
        &self,
        run: &RunRecord,
        module: &Module,
        board: &BranchBoard,
        watch: &Arc<RunWatch>,
        launch: &BranchLaunch,
    ) {
        let key = &launch.key;
        loop {
            let (attempt, not_before) = board.next_attempt(key);
            if let Some(at) = not_before {
                let wait = Duration::from_millis((at - now_ms()).max(0) as u64);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = watch.changed() => {}
                }
            }
            if watch.cancel_requested() {
                board.give_up(key, "cancelled".into());
                return;
            }
            match self.branch_instance(run, module, watch.clone(), launch, attempt).await {
                Ok(entry) => {
                    let again = entry.status == EntryStatus::Failed;
                    board.record(entry);
                    if !again {
                        return;
                    }
                }
                Err(e) => {
                    board.give_up(key, format!("branch \"{}\" #{}: {e}", key.0, key.1));
                    return;
                }
            }
        }
    }

    /// One attempt of a branch: replay the parent's history up to the
    /// branch's spawn, run its closure, record the attempt.
    async fn branch_instance(
        &self,
        run: &RunRecord,
        module: &Module,
        watch: Arc<RunWatch>,
        launch: &BranchLaunch,
        attempt: u32,
    ) -> Result<Entry, ExecError> {
        let mode = BranchMode { key: launch.key.clone(), attempt };
        let mut wstore = self.new_store(run, launch.history.clone(), watch, launch.branches.clone(), Some(mode))?;
        let instance = self.instantiate(&mut wstore, module, &run.module, &run.module_path).await?;
        let start = instance
            .get_typed_func::<(), ()>(&mut wstore, "_start")
            .map_err(|e| ExecError::Module(format!("{}: `_start` has the wrong type: {e:#}", run.module_path)))?;
        let result = start.call_async(&mut wstore, ()).await;
        let st = wstore.data_mut();
        if let Some(fatal) = st.fatal.take() {
            return Err(fatal.into());
        }
        if let Some(entry) = st.branch_result.take() {
            return Ok(entry);
        }
        if st.interrupt == Some(Interrupt::Cancelled) {
            return Err(ExecError::Module("cancelled".into()));
        }
        let Some(live) = st.live_step.take() else {
            return Err(ExecError::Module("the branch instance ended before reaching its spawn".into()));
        };
        let message = failure_message(st, &result);
        let message =
            format!("branch \"{}\" #{} attempt {} failed: {message}", live.name, live.occurrence, live.attempt);
        let (entry, _) = HostState::failed_attempt(live, message, true);
        st.commit_final(vec![Write::BranchAttempt { run: run.seq, entry: entry.clone() }]).await?;
        Ok(entry)
    }
}

/// A workflow module must export its memory, `_start` and
/// `cairn_abi_version`, and import nothing this host does not provide.
fn check_module(module: &Module, shown: &str) -> Result<(), ExecError> {
    let has_func = |name: &str| matches!(module.get_export(name), Some(ExternType::Func(_)));
    let mut missing: Vec<&str> = ["_start", "cairn_abi_version"].into_iter().filter(|n| !has_func(n)).collect();
    if !matches!(module.get_export("memory"), Some(ExternType::Memory(_))) {
        missing.push("memory");
    }
    if !missing.is_empty() {
        return Err(ExecError::Module(format!(
            "{shown} is not a Cairn workflow: it does not export {}. Build it as a wasm32-wasip1 binary \
             whose main calls cairn_sdk::run(workflow)",
            missing.iter().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", ")
        )));
    }
    for import in module.imports() {
        match import.module() {
            abi::MODULE if abi::FUNCTIONS.contains(&import.name()) => {}
            "wasi_snapshot_preview1" => {}
            other => {
                return Err(ExecError::Module(format!(
                    "{shown} imports `{other}::{}`, which this cairn does not provide (it speaks Cairn ABI \
                     version {} and WASI preview 1); was it built for a newer Cairn?",
                    import.name(),
                    abi::ABI_VERSION
                )));
            }
        }
    }
    Ok(())
}
