//! The `cairn` command line.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, anyhow};
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

use crate::engine::{WasmEngine, default_cache_dir};
use crate::executor::{ExecError, Executor, RunOutcome};
use crate::journal::{Entry, EntryKind};
use crate::store::sqlite::SqliteStore;
use crate::store::{Durability, NewRun, RunConfig, RunRecord, RunStatus, Store, StoreError, Write};

/// Exit codes (also in the README).
pub mod exit {
    /// The run completed (or the command succeeded).
    pub const OK: u8 = 0;
    /// The run failed, or the command could not do its job.
    pub const FAILED: u8 = 1;
    /// Bad usage or bad input (clap uses it too).
    pub const USAGE: u8 = 2;
    /// Replay diverged from the history; nothing was written.
    pub const NON_DETERMINISM: u8 = 3;
    /// The run, or the database, is held by another process right now.
    pub const BUSY: u8 = 4;
}

#[derive(Parser, Debug)]
#[command(name = "cairn", version, about = "Durable execution for Rust workflows compiled to WebAssembly")]
pub struct Cli {
    /// The database file (created if missing).
    #[arg(long, global = true, env = "CAIRN_DB", default_value = "cairn.db")]
    pub db: PathBuf,
    /// power: fsync before a step returns (survives power loss);
    /// process: no fsync per commit (survives a killed process, not power loss).
    #[arg(long, global = true, env = "CAIRN_DURABILITY", value_enum, default_value = "power")]
    pub durability: Durability,
    /// Where compiled modules are cached [default: $XDG_CACHE_HOME/cairn/modules or ~/.cache/cairn/modules].
    #[arg(long, global = true, env = "CAIRN_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// A run waiting longer than this (timer, retry backoff) drops its
    /// instance and is replayed when it wakes.
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = 5.0)]
    pub park_after: f64,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start a run of a workflow module and execute it in the foreground.
    Run(RunArgs),
    /// Record a pending run and print its id; `cairn worker` (or `cairn
    /// resume ID`) executes it.
    Start(RunArgs),
    /// Execute pending and unfinished runs concurrently until stopped
    /// (SIGTERM or Ctrl-C: in-flight runs finish or park, nothing is lost).
    Worker {
        /// Runs executing at once (parked runs do not count).
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// Continue an unfinished run from its history (or print a finished one's result).
    Resume(ResumeArgs),
    /// List runs.
    Runs {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Deliver a signal to a run; it is kept until the run waits for it.
    Signal {
        run_id: String,
        /// The signal's name, as the workflow waits for it.
        name: String,
        /// The payload, JSON [default: null].
        payload: Option<String>,
    },
    /// Stop a run at its next host call or wake-up; its history is kept.
    Cancel { run_id: String },
    /// Show a run's history.
    Show {
        run_id: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The workflow: a wasm32-wasip1 module built with cairn-sdk.
    pub module: PathBuf,
    /// The run's input: JSON, or @FILE to read it from a file [default: null].
    #[arg(long)]
    pub input: Option<String>,
    /// The run's id [default: a new UUIDv7].
    #[arg(long)]
    pub run_id: Option<String>,
    /// Grant a host directory to the guest, as HOST or HOST::GUEST (repeatable).
    #[arg(long = "dir", value_name = "HOST[::GUEST]")]
    pub dirs: Vec<String>,
    /// Give the guest an environment variable (repeatable; stored in the database in clear).
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Memory limit per instance, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    pub max_memory: u64,
    /// CPU seconds a guest may run without reaching a host call (a step, a clock read, ...).
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    pub max_cpu: f64,
}

#[derive(Args, Debug)]
pub struct ResumeArgs {
    /// The run to continue.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub run_id: Option<String>,
    /// Continue every unfinished run that no live process holds; one JSON line per run.
    #[arg(long)]
    pub all: bool,
}

/// An error with the exit code it ends the process with.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl Failure {
    fn new(code: u8, error: impl Into<anyhow::Error>) -> Self {
        Failure { code, error: error.into() }
    }
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        let error: anyhow::Error = e.into();
        let code = match error.downcast_ref::<StoreError>() {
            Some(StoreError::Locked { .. }) => exit::BUSY,
            Some(StoreError::RunExists(_)) => exit::USAGE,
            _ => exit::FAILED,
        };
        Failure { code, error }
    }
}

fn exec_failure(e: ExecError) -> Failure {
    let code = match &e {
        ExecError::Fatal(crate::abi::Fatal::NonDeterminism(_)) => exit::NON_DETERMINISM,
        ExecError::Store(StoreError::Locked { .. }) => exit::BUSY,
        ExecError::Store(StoreError::RunExists(_)) => exit::USAGE,
        ExecError::Fatal(crate::abi::Fatal::Store { source: StoreError::Locked { .. }, .. }) => exit::BUSY,
        _ => exit::FAILED,
    };
    Failure::new(code, e)
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match crate::executor::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cairn: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILED);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("cairn: error: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}

struct Context {
    executor: Arc<Executor>,
}

/// The database, created if it does not exist (commands that create runs).
fn open_store(cli: &Cli) -> Result<Arc<dyn Store>, Failure> {
    let store = SqliteStore::open(&cli.db, cli.durability)?;
    Ok(Arc::new(store))
}

/// The database, which must exist already (commands about existing runs):
/// a mistyped path is not silently answered from a new, empty database.
fn open_existing_store(cli: &Cli) -> Result<Arc<dyn Store>, Failure> {
    if !cli.db.exists() {
        return Err(Failure::new(
            exit::FAILED,
            anyhow!(
                "there is no database at {} (`cairn run` or `cairn start` creates one; --db or CAIRN_DB picks another)",
                cli.db.display()
            ),
        ));
    }
    open_store(cli)
}

fn context(cli: &Cli, store: Arc<dyn Store>) -> Result<Context, Failure> {
    context_with(cli, store, None)
}

/// `pool`: instance slots of a pooled engine (for many runs at once).
fn context_with(cli: &Cli, store: Arc<dyn Store>, pool: Option<u32>) -> Result<Context, Failure> {
    let cache = cli.cache_dir.clone().or_else(default_cache_dir);
    let engine = Arc::new(match pool {
        Some(n) => WasmEngine::pooled(cache, n)?,
        None => WasmEngine::new(cache)?,
    });
    if !(cli.park_after >= 0.0 && cli.park_after.is_finite()) {
        return Err(Failure::new(exit::USAGE, anyhow!("--park-after must be a number of seconds")));
    }
    let executor =
        Executor::new(engine, store)?.with_park_threshold(std::time::Duration::from_secs_f64(cli.park_after));
    Ok(Context { executor: Arc::new(executor) })
}

async fn dispatch(cli: Cli) -> Result<u8, Failure> {
    match &cli.command {
        Command::Run(args) => run(&cli, args).await,
        Command::Start(args) => start(&cli, args).await,
        Command::Worker { concurrency } => {
            if *concurrency == 0 {
                return Err(Failure::new(exit::USAGE, anyhow!("--concurrency must be at least 1")));
            }
            let store = open_store(&cli)?;
            // Slots for the live runs and their branches; address space only.
            let slots = (*concurrency as u32).saturating_mul(8).clamp(crate::engine::WORKER_POOL, 8192);
            let ctx = context_with(&cli, store.clone(), Some(slots))?;
            crate::worker::run_worker(ctx.executor, store, *concurrency).await?;
            Ok(exit::OK)
        }
        Command::Resume(args) => resume(&cli, args).await,
        Command::Runs { json } => list_runs(&*open_existing_store(&cli)?, *json),
        Command::Show { run_id, json } => show(&cli, &*open_existing_store(&cli)?, run_id, *json),
        Command::Signal { run_id, name, payload } => signal(&cli, run_id, name, payload.as_deref()).await,
        Command::Cancel { run_id } => cancel(&cli, run_id).await,
    }
}

fn find_run(cli: &Cli, store: &dyn Store, id: &str) -> Result<RunRecord, Failure> {
    store.run(id)?.ok_or_else(|| {
        Failure::new(
            exit::FAILED,
            anyhow!("there is no run with id {id:?} in {} (`cairn runs` lists them)", cli.db.display()),
        )
    })
}

async fn commit(store: &dyn Store, writes: Vec<Write>) -> Result<(), Failure> {
    crate::store::commit(store, writes).await?;
    Ok(())
}

async fn signal(cli: &Cli, id: &str, name: &str, payload: Option<&str>) -> Result<u8, Failure> {
    let payload = parse_json(payload, "the signal payload")?;
    let store = open_existing_store(cli)?;
    let run = find_run(cli, &*store, id)?;
    if run.status.is_finished() {
        return Err(Failure::new(
            exit::FAILED,
            anyhow!("run {id} is {}: it will not receive signals", run.status.as_str()),
        ));
    }
    commit(&*store, vec![Write::SendSignal { run: run.seq, name: name.to_string(), payload }]).await?;
    eprintln!("cairn: signal {name:?} sent to run {id}");
    Ok(exit::OK)
}

async fn cancel(cli: &Cli, id: &str) -> Result<u8, Failure> {
    let store = open_existing_store(cli)?;
    let run = find_run(cli, &*store, id)?;
    if run.status == RunStatus::Cancelled {
        eprintln!("cairn: run {id} is already cancelled");
        return Ok(exit::OK);
    }
    if run.status.is_finished() {
        return Err(Failure::new(
            exit::FAILED,
            anyhow!("run {id} is {}: there is nothing to cancel", run.status.as_str()),
        ));
    }
    let request = Write::RequestCancel { run: run.seq };
    if let Some(lock) = store.lock_run(run.seq)? {
        // Nobody executes it: cancel it here, under its lock.
        commit(&*store, vec![request, Write::cancelled(run.seq)]).await?;
        drop(lock);
        eprintln!("cairn: run {id} cancelled");
        return Ok(exit::OK);
    }
    commit(&*store, vec![request]).await?;
    // The executing process notices within a poll interval.
    let start = Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(5) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        if store.run(id)?.is_some_and(|r| r.status.is_finished()) {
            eprintln!("cairn: run {id} cancelled");
            return Ok(exit::OK);
        }
    }
    eprintln!("cairn: cancel of run {id} requested; the process executing it stops it at its next host call");
    Ok(exit::OK)
}

fn parse_input(input: Option<&str>) -> Result<Vec<u8>, Failure> {
    let text = match input {
        None => return Ok(b"null".to_vec()),
        Some(s) => match s.strip_prefix('@') {
            Some(file) => std::fs::read_to_string(file)
                .map_err(|e| Failure::new(exit::USAGE, anyhow!("cannot read --input file {file}: {e}")))?,
            None => s.to_string(),
        },
    };
    parse_json(Some(&text), "--input")
}

fn parse_json(text: Option<&str>, what: &str) -> Result<Vec<u8>, Failure> {
    let value: Value = match text {
        None => Value::Null,
        Some(t) => {
            serde_json::from_str(t).map_err(|e| Failure::new(exit::USAGE, anyhow!("{what} is not valid JSON: {e}")))?
        }
    };
    Ok(serde_json::to_vec(&value).expect("a JSON value serializes"))
}

fn validate_run_id(id: &str) -> Result<(), Failure> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if ok {
        Ok(())
    } else {
        Err(Failure::new(exit::USAGE, anyhow!("--run-id {id:?} is not valid: use 1 to 128 of A-Z a-z 0-9 - _ . :")))
    }
}

fn parse_dir(spec: &str) -> Result<(PathBuf, String), Failure> {
    let (host, guest) = match spec.split_once("::") {
        Some((h, g)) => (h, g.to_string()),
        None => (spec, spec.to_string()),
    };
    let host = Path::new(host)
        .canonicalize()
        .map_err(|e| Failure::new(exit::USAGE, anyhow!("--dir {spec}: cannot use {host}: {e}")))?;
    if !host.is_dir() {
        return Err(Failure::new(exit::USAGE, anyhow!("--dir {spec}: {} is not a directory", host.display())));
    }
    Ok((host, guest))
}

fn parse_env(spec: &str) -> Result<(String, String), Failure> {
    match spec.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(Failure::new(exit::USAGE, anyhow!("--env {spec:?} is not of the form KEY=VALUE"))),
    }
}

/// Check the module and create the run (locked for this process if `lock`).
async fn create_run(
    cli: &Cli,
    args: &RunArgs,
    status: RunStatus,
    lock: bool,
) -> Result<(Context, RunRecord, Option<crate::lock::RunLock>), Failure> {
    let input = parse_input(args.input.as_deref())?;
    let id = match &args.run_id {
        Some(id) => {
            validate_run_id(id)?;
            id.clone()
        }
        None => uuid::Uuid::now_v7().to_string(),
    };
    let dirs = args.dirs.iter().map(|d| parse_dir(d)).collect::<Result<Vec<_>, _>>()?;
    let env = args.env.iter().map(|e| parse_env(e)).collect::<Result<Vec<_>, _>>()?;
    if !(args.max_cpu > 0.0 && args.max_cpu.is_finite()) || args.max_memory == 0 {
        return Err(Failure::new(exit::USAGE, anyhow!("--max-cpu and --max-memory must be positive")));
    }
    let config = RunConfig { dirs, env, max_memory_mib: args.max_memory, max_cpu_ms: (args.max_cpu * 1000.0) as u64 };

    let store = open_store(cli)?;
    if store.run(&id)?.is_some() {
        return Err(StoreError::RunExists(id).into());
    }
    let ctx = context(cli, store.clone())?;
    let prepared = ctx.executor.prepare(&args.module).await.map_err(|e| Failure::new(exit::USAGE, e))?;
    let new = NewRun {
        id,
        module: prepared.hash.clone(),
        module_path: args.module.display().to_string(),
        input,
        config,
        status,
    };
    let (record, lock) = ctx.executor.create_run(&prepared, new, lock).await.map_err(exec_failure)?;
    Ok((ctx, record, lock))
}

async fn run(cli: &Cli, args: &RunArgs) -> Result<u8, Failure> {
    let (ctx, record, lock) = create_run(cli, args, RunStatus::Running, true).await?;
    let id = &record.id;
    eprintln!("cairn: run {id} started (if interrupted: cairn resume {id})");
    let code = execute_foreground(&ctx, &record).await;
    drop(lock);
    code
}

async fn start(cli: &Cli, args: &RunArgs) -> Result<u8, Failure> {
    let (_, record, _) = create_run(cli, args, RunStatus::Pending, false).await?;
    println!("{}", record.id);
    Ok(exit::OK)
}

async fn execute_foreground(ctx: &Context, run: &RunRecord) -> Result<u8, Failure> {
    let started = Instant::now();
    let outcome = ctx.executor.execute(run).await.map_err(exec_failure)?;
    let elapsed = started.elapsed();
    match outcome {
        RunOutcome::Completed(output) => {
            eprintln!("cairn: run {} completed in {:.1?}", run.id, elapsed);
            print_output(&output);
            Ok(exit::OK)
        }
        RunOutcome::Failed(error) => {
            eprintln!("cairn: run {} failed: {error}", run.id);
            Ok(exit::FAILED)
        }
        RunOutcome::Cancelled => {
            eprintln!("cairn: run {} was cancelled", run.id);
            Ok(exit::FAILED)
        }
    }
}

fn print_output(output: &[u8]) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(output);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

async fn resume(cli: &Cli, args: &ResumeArgs) -> Result<u8, Failure> {
    let store = open_existing_store(cli)?;
    if args.all {
        return resume_all(cli, store).await;
    }
    let id = args.run_id.as_deref().expect("clap requires a run id without --all");
    let run = find_run(cli, &*store, id)?;
    match run.status {
        RunStatus::Completed => {
            print_output(run.output.as_deref().unwrap_or(b"null"));
            return Ok(exit::OK);
        }
        RunStatus::Failed | RunStatus::Cancelled => {
            eprintln!(
                "cairn: run {id} {}: {}",
                run.status.as_str(),
                run.error.as_deref().unwrap_or("(no error recorded)")
            );
            return Ok(exit::FAILED);
        }
        _ => {}
    }
    let Some(lock) = store.lock_run(run.seq)? else {
        return Err(Failure::new(
            exit::BUSY,
            anyhow!(
                "run {id} is being executed by another cairn process right now; wait for it, or stop that process and resume again"
            ),
        ));
    };
    // Re-read under the lock: the previous holder may have finished it.
    let run = store.run(id)?.context("the run disappeared")?;
    if run.status.is_finished() {
        drop(lock);
        return Box::pin(resume(cli, args)).await;
    }
    let ctx = context(cli, store)?;
    eprintln!("cairn: resuming run {id} ({} steps recorded)", run.steps);
    let code = execute_foreground(&ctx, &run).await;
    drop(lock);
    code
}

async fn resume_all(cli: &Cli, store: Arc<dyn Store>) -> Result<u8, Failure> {
    let ctx = context(cli, store.clone())?;
    let mut tasks = tokio::task::JoinSet::new();
    for run in store.unfinished_runs()? {
        let Some(lock) = store.lock_run(run.seq)? else {
            eprintln!("cairn: skipping run {}: another process is executing it", run.id);
            continue;
        };
        let Some(run) = store.run(&run.id)?.filter(|r| !r.status.is_finished()) else {
            continue;
        };
        let executor = ctx.executor.clone();
        tasks.spawn(async move {
            let result = executor.execute(&run).await;
            drop(lock);
            (run.id, result)
        });
    }
    let mut code = exit::OK;
    while let Some(joined) = tasks.join_next().await {
        let (id, result) = joined.map_err(|e| anyhow!("a run task failed: {e}"))?;
        let line = match result {
            Ok(RunOutcome::Completed(out)) => {
                let output: Value = serde_json::from_slice(&out).unwrap_or(Value::Null);
                json!({"id": id, "status": "completed", "output": output})
            }
            Ok(RunOutcome::Failed(error)) => {
                code = exit::FAILED;
                json!({"id": id, "status": "failed", "error": error})
            }
            Ok(RunOutcome::Cancelled) => {
                code = exit::FAILED;
                json!({"id": id, "status": "cancelled"})
            }
            Err(e) => {
                code = exit::FAILED;
                json!({"id": id, "status": "error", "error": e.to_string()})
            }
        };
        println!("{line}");
    }
    Ok(code)
}

fn time(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

fn output_json(bytes: Option<&[u8]>) -> Value {
    bytes.map_or(Value::Null, |b| {
        serde_json::from_slice(b).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(b).into()))
    })
}

fn run_json(r: &RunRecord) -> Value {
    json!({
        "id": r.id,
        "module": r.module,
        "module_path": r.module_path,
        "status": r.status.as_str(),
        "steps": r.steps,
        "created_at": time(r.created_at),
        "finished_at": r.finished_at.map(time),
        "error": r.error,
    })
}

fn list_runs(store: &dyn Store, json: bool) -> Result<u8, Failure> {
    let runs = store.runs()?;
    if json {
        let list: Vec<Value> = runs.iter().map(run_json).collect();
        println!("{}", serde_json::to_string_pretty(&list).expect("JSON"));
        return Ok(exit::OK);
    }
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    table.set_header(["ID", "STATUS", "STEPS", "MODULE", "CREATED", "FINISHED"]);
    for r in &runs {
        table.add_row([
            r.id.clone(),
            r.status.as_str().to_string(),
            r.steps.to_string(),
            r.module[..12.min(r.module.len())].to_string(),
            time(r.created_at),
            r.finished_at.map(time).unwrap_or_default(),
        ]);
    }
    println!("{table}");
    Ok(exit::OK)
}

fn entry_output(e: &Entry) -> Value {
    match e.kind {
        EntryKind::Step if e.status == crate::journal::EntryStatus::Completed => output_json(Some(&e.output)),
        EntryKind::Step => e.time_value().map_or(Value::Null, |t| json!({ "retry_at": time(t) })),
        EntryKind::Timer => e.time_value().map_or(Value::Null, |t| json!({ "wake_at": time(t) })),
        EntryKind::Signal if e.output.is_empty() => json!({ "timed_out": true }),
        EntryKind::Signal => output_json(Some(&e.output)),
        // Filled in from the branch's attempts by `show`.
        EntryKind::Spawn => Value::Null,
        EntryKind::Clock => e.clock_value().map_or(Value::Null, |v| json!(v)),
        EntryKind::Random => Value::String(hex::encode(&e.output)),
    }
}

fn short(v: &Value, max: usize) -> String {
    let s = if v.is_null() { String::new() } else { v.to_string() };
    if s.chars().count() > max { format!("{}…", s.chars().take(max - 1).collect::<String>()) } else { s }
}

fn entry_json(position: Option<usize>, e: &Entry, output: Value) -> Value {
    let mut v = json!({
        "kind": e.kind.as_str(),
        "name": e.name,
        "occurrence": e.occurrence,
        "attempt": e.attempt,
        "status": e.status.as_str(),
        "output": output,
        "error": e.error,
        "started_at": time(e.started_at),
        "finished_at": time(e.finished_at),
        "duration_ms": e.finished_at - e.started_at,
    });
    if let Some(p) = position {
        v["position"] = json!(p);
    }
    v
}

fn show(cli: &Cli, store: &dyn Store, id: &str, json: bool) -> Result<u8, Failure> {
    let run = find_run(cli, store, id)?;
    let history = store.history(run.seq)?;
    let branches = store.branch_attempts(run.seq)?;
    // A spawn entry shows its branch's final outcome.
    let spawn_view = |e: &Entry| -> (String, Value, Option<String>) {
        let last =
            branches.iter().filter(|b| b.name == e.name && b.occurrence == e.occurrence).max_by_key(|b| b.attempt);
        match last {
            Some(b) if b.status != crate::journal::EntryStatus::Failed => {
                (b.status.as_str().to_string(), entry_output(b), b.error.clone())
            }
            _ => ("running".to_string(), Value::Null, None),
        }
    };
    if json {
        let entries: Vec<Value> = history
            .iter()
            .enumerate()
            .map(|(i, e)| {
                if e.kind == EntryKind::Spawn {
                    let (status, output, error) = spawn_view(e);
                    let mut v = entry_json(Some(i), e, output);
                    v["branch_status"] = json!(status);
                    v["error"] = json!(error);
                    v
                } else {
                    entry_json(Some(i), e, entry_output(e))
                }
            })
            .collect();
        let mut obj = run_json(&run);
        obj["input"] = output_json(Some(&run.input));
        obj["output"] = output_json(run.output.as_deref());
        obj["history"] = Value::Array(entries);
        obj["branches"] = Value::Array(branches.iter().map(|b| entry_json(None, b, entry_output(b))).collect());
        println!("{}", serde_json::to_string_pretty(&obj).expect("JSON"));
        return Ok(exit::OK);
    }
    println!("run      {}", run.id);
    println!("status   {}", run.status.as_str());
    println!("module   {} ({})", run.module, run.module_path);
    println!("created  {}", time(run.created_at));
    if let Some(f) = run.finished_at {
        println!("finished {}", time(f));
    }
    if let Some(out) = &run.output {
        println!("output   {}", short(&output_json(Some(out)), 200));
    }
    if let Some(err) = &run.error {
        println!("error    {err}");
    }
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    table.set_header(["POS", "KIND", "NAME", "OCC", "ATTEMPT", "STATUS", "DURATION", "OUTPUT / ERROR"]);
    for (i, e) in history.iter().enumerate() {
        let (output, error, status) = if e.kind == EntryKind::Spawn {
            let (status, output, error) = spawn_view(e);
            (output, error, status)
        } else {
            (entry_output(e), e.error.clone(), e.status.as_str().to_string())
        };
        let detail = match error {
            Some(err) => short(&Value::String(err), 60),
            None => short(&output, 60),
        };
        let is_step = matches!(e.kind, EntryKind::Step | EntryKind::Spawn);
        table.add_row([
            i.to_string(),
            e.kind.as_str().to_string(),
            e.name.clone(),
            if is_step { e.occurrence.to_string() } else { String::new() },
            if e.kind == EntryKind::Step { e.attempt.to_string() } else { String::new() },
            status,
            if e.kind == EntryKind::Step { format!("{} ms", e.finished_at - e.started_at) } else { String::new() },
            detail,
        ]);
    }
    println!("\n{table}");
    if !branches.is_empty() {
        let mut table = comfy_table::Table::new();
        table.load_preset(comfy_table::presets::NOTHING);
        table.set_header(["BRANCH", "OCC", "ATTEMPT", "STATUS", "DURATION", "OUTPUT / ERROR"]);
        for b in &branches {
            let detail = match &b.error {
                Some(err) => short(&Value::String(err.clone()), 60),
                None => short(&entry_output(b), 60),
            };
            table.add_row([
                b.name.clone(),
                b.occurrence.to_string(),
                b.attempt.to_string(),
                b.status.as_str().to_string(),
                format!("{} ms", b.finished_at - b.started_at),
                detail,
            ]);
        }
        println!("\nbranch attempts, in the order they ended:\n{table}");
    }
    Ok(exit::OK)
}
