//! The sandbox of one instance: the module checked once, the WASI context
//! built from the run's stored grants (nothing else), the limits, and the
//! instance itself.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use wasmtime::{ExternType, Module, Store as WasmStore, UpdateDeadline};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use super::{ExecError, Executor};
use crate::model::{Entry, EntryKind, Limits, RunConfig, RunKey, RunRecord, RunStatus};
use crate::runtime::branch::{BranchMode, Branches};
use crate::runtime::engine::module_hash;
use crate::runtime::imports::{self, GuestOutput, HostState, InstanceSetup, RunContext};
use crate::runtime::journal::Journal;
use crate::runtime::random::RandomStream;
use crate::runtime::watch::RunWatch;

/// A module ready to start runs with.
pub struct PreparedModule {
    pub hash: String,
    pub bytes: Vec<u8>,
    pub module: Module,
}

impl Executor {
    /// Compile and check workflow module bytes (read from `shown`) before
    /// any run of them is created.
    pub async fn prepare(&self, bytes: Vec<u8>, shown: &str) -> Result<PreparedModule, ExecError> {
        if !bytes.starts_with(b"\0asm") {
            return Err(ExecError::Module(format!(
                "{shown} is not a WebAssembly module (it does not start with \\0asm); build workflows with \
                 `cargo build --release --target wasm32-wasip1`"
            )));
        }
        check_code_size(&bytes, shown)?;
        let hash = module_hash(&bytes);
        let module = self
            .engine
            .load(&hash, || Ok(bytes.clone()))
            .map_err(|e| ExecError::Module(format!("{shown} is not a valid WebAssembly module: {e:#}")))?;
        check_module(&module, shown)?;
        // The guest declares its ABI version: ask it.
        let probe = RunRecord {
            key: RunKey(0),
            id: "(module check)".into(),
            module: hash.clone(),
            module_path: shown.to_string(),
            input: Vec::new(),
            config: RunConfig::new(Limits { max_memory_mib: 64, max_cpu_ms: 1000, ..Limits::default() }),
            status: RunStatus::Pending,
            output: None,
            error: None,
            created_at: 0,
            finished_at: None,
            steps: 0,
            cancel_requested: false,
            random_key: None,
            cancel_grace_until: None,
        };
        let mut store = self.new_store(&probe, Vec::new(), Arc::new(RunWatch::new(1)), Branches::inert(), None)?;
        self.instantiate(&mut store, &module, &hash, shown).await?;
        Ok(PreparedModule { hash, bytes, module })
    }

    pub(super) fn new_store(
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
        let keyed = !history.iter().any(|e| e.kind == EntryKind::Random);
        let random_key = run.random_key.filter(|_| keyed);
        let journal = Journal::new(history);
        let replaying = Arc::new(AtomicBool::new(journal.replaying()));
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(GuestOutput::new(replaying.clone()));
        wasi.stderr(GuestOutput::new(replaying.clone()));
        let grants = run.config.dirs.iter().map(|d| (d, FsPerms::ReadWrite));
        for ((host, guest), perms) in grants.chain(run.config.dirs_ro.iter().map(|d| (d, FsPerms::ReadOnly))) {
            wasi.preopened_dir(host, guest, perms).map_err(|e| {
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
        let state = HostState::new(InstanceSetup {
            wasi: wasi.build_p1(),
            http: run.config.http.as_deref().cloned().unwrap_or_default(),
            kv_namespace: run.config.kv_namespace_of(&run.module).to_string(),
            run: RunContext {
                store: self.store.clone(),
                run_id: run.id.clone(),
                run: run.key,
                input: run.input.clone(),
                random: random_key.map(RandomStream::new),
            },
            journal,
            replaying,
            limits: run.config.limits.clone(),
            created_at: run.created_at,
            watch,
            park_threshold: self.park_threshold,
            branches,
            branch_mode,
        });
        let mut store = WasmStore::new(self.engine.engine(), state);
        store.limiter(|s| s.limiter());
        // Count CPU in epoch ticks since the last host call, yielding to other
        // tasks at every tick; time spent waiting in host calls never counts.
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|mut ctx| {
            ctx.data_mut().on_epoch_tick()?;
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
            Some((pre, _)) => pre.clone(),
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
        let memory = instance.get_memory(&mut *store, "memory");
        store.data_mut().set_memory(memory);
        if let Some((_, version)) = known {
            store.data_mut().set_abi_version(version);
            return Ok(instance);
        }
        // The guest declares its ABI version: ask it, once per module.
        let version = instance
            .get_typed_func::<(), i32>(&mut *store, "cairn_abi_version")
            .map_err(|e| ExecError::Module(format!("{shown}: `cairn_abi_version` has the wrong type: {e:#}")))?
            .call_async(&mut *store, ())
            .await
            .map_err(|e| ExecError::Module(format!("{shown}: `cairn_abi_version` failed: {e:#}")))?;
        if !(imports::MIN_ABI_VERSION..=imports::ABI_VERSION).contains(&version) {
            return Err(ExecError::Module(format!(
                "{shown} was built for Cairn ABI version {version}, but this cairn speaks versions {} to {}; \
                 rebuild it with a matching cairn-sdk or use a matching cairn",
                imports::MIN_ABI_VERSION,
                imports::ABI_VERSION
            )));
        }
        store.data_mut().set_abi_version(version);
        self.prepared.lock().unwrap_or_else(|p| p.into_inner()).insert(hash.to_string(), (pre, version));
        Ok(instance)
    }

    /// Instantiate the run's module and call the workflow (`_start`).
    pub(super) async fn call_start(
        &self,
        wstore: &mut WasmStore<HostState>,
        module: &Module,
        run: &RunRecord,
    ) -> Result<wasmtime::Result<()>, ExecError> {
        let instance = self.instantiate(wstore, module, &run.module, &run.module_path).await?;
        let start = instance
            .get_typed_func::<(), ()>(&mut *wstore, "_start")
            .map_err(|e| ExecError::Module(format!("{}: `_start` has the wrong type: {e:#}", run.module_path)))?;
        Ok(start.call_async(&mut *wstore, ()).await)
    }
}

/// Functions a module may define, and bytes in one function's body: what
/// the compiler is given is bounded before it starts (its time grows with
/// the code, and faster than linearly with one huge function).
pub const MAX_FUNCTIONS: u32 = 100_000;
pub const MAX_FUNCTION_BYTES: usize = 1 << 20;

/// Count the functions and measure their bodies before compiling anything.
fn check_code_size(bytes: &[u8], shown: &str) -> Result<(), ExecError> {
    let invalid =
        |e: wasmparser::BinaryReaderError| ExecError::Module(format!("{shown} is not a valid WebAssembly module: {e}"));
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        match payload.map_err(invalid)? {
            wasmparser::Payload::CodeSectionStart { count, .. } if count > MAX_FUNCTIONS => {
                return Err(ExecError::Module(format!(
                    "{shown} defines {count} functions, more than {MAX_FUNCTIONS}; it was not compiled"
                )));
            }
            wasmparser::Payload::CodeSectionEntry(body) if body.range().len() > MAX_FUNCTION_BYTES => {
                return Err(ExecError::Module(format!(
                    "{shown} has a function of {} bytes, more than {MAX_FUNCTION_BYTES}; it was not compiled",
                    body.range().len()
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

/// A workflow module must export its memory, `_start` and
/// `cairn_abi_version`, and import nothing this host does not provide.
pub fn check_module(module: &Module, shown: &str) -> Result<(), ExecError> {
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
            imports::MODULE if imports::FUNCTIONS.contains(&import.name()) => {}
            imports::wasi::MODULE => {}
            other => {
                return Err(ExecError::Module(format!(
                    "{shown} imports `{other}::{}`, which this cairn does not provide (it speaks Cairn ABI \
                     version {} and WASI preview 1); was it built for a newer Cairn?",
                    import.name(),
                    imports::ABI_VERSION
                )));
            }
        }
    }
    Ok(())
}
