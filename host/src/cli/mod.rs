//! The `cairn` command line: parse (clap), call the service layer, print,
//! and exit with the code of [`ServiceError::class`].

mod print;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::model::{Limits, Role, RunConfig, RunRecord, RunStatus};
use crate::runtime::engine::{ModuleCache, WORKER_POOL, default_cache_dir};
use crate::runtime::{Executor, RunOutcome, WasmEngine};
use crate::service::request::{self, ModuleSource, StartModule};
use crate::service::{Cancelled, ClaimedRun, Resumed, Service, ServiceError, StartMode, StartRequest, exit};
use crate::store::sqlite::SqliteStore;
use crate::store::{Durability, RunStore};
use crate::terminal::escape;

#[derive(Parser, Debug)]
#[command(name = "cairn", version, about = "Durable execution for Rust workflows compiled to WebAssembly")]
pub struct Cli {
    /// The database: an SQLite file (created if missing), or a PostgreSQL
    /// database (`postgres://user@host:port/db`, migrated if empty).
    #[arg(long, global = true, env = "CAIRN_DB", default_value = "cairn.db")]
    pub db: PathBuf,
    /// PostgreSQL: seconds a run's lease lasts without renewal; a process
    /// that dies holding one is taken over after it. (SQLite's locks are
    /// released by the OS at once: no effect there.)
    #[arg(long, global = true, env = "CAIRN_LEASE", value_name = "SECONDS", default_value_t = 5.0)]
    pub lease: f64,
    /// power: fsync before a step returns (survives power loss);
    /// process: no fsync per commit (survives a killed process, not power loss).
    #[arg(long, global = true, env = "CAIRN_DURABILITY", value_enum, default_value = "power")]
    pub durability: DurabilityArg,
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
    Cancel {
        run_id: String,
        /// Tell the workflow instead (an error it can handle) and give it this
        /// long to clean up (compensate) before it is stopped: seconds, or
        /// a duration such as 30s or 2m. A run nobody executes is executed
        /// here meanwhile.
        #[arg(long, value_name = "SECONDS", value_parser = parse_grace)]
        grace: Option<std::time::Duration>,
    },
    /// The key-value store that steps read and write (`s.kv()`).
    Kv {
        #[command(subcommand)]
        action: KvCommand,
    },
    /// Serve the HTTP API on the database and, unless --no-worker, execute
    /// its runs (SIGTERM or Ctrl-C: requests in flight finish, live
    /// instances finish or park).
    Serve(ServeArgs),
    /// API tokens for the HTTP API: create, list, revoke.
    Token {
        #[command(subcommand)]
        action: TokenCommand,
    },
    /// Move an SQLite database into an empty PostgreSQL one: runs (finished
    /// and unfinished, with their histories), modules, signals, tokens and
    /// key-value entries. Stop every process using the SQLite file first:
    /// runs that one executes are refused.
    Migrate {
        /// The SQLite database to move.
        #[arg(long)]
        from: PathBuf,
        /// The PostgreSQL database to move it into (`postgres://user@host:port/db`), empty.
        #[arg(long)]
        to: String,
    },
    /// Show a run's history.
    Show {
        run_id: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `cairn serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub listen: std::net::SocketAddr,
    /// Runs executing at once (parked runs do not count).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Serve only: runs are executed by `cairn worker` processes.
    #[arg(long)]
    pub no_worker: bool,
    /// A directory that directory grants of runs started over HTTP must lie inside (repeatable).
    #[arg(long = "allow-dir", value_name = "PATH")]
    pub allow_dirs: Vec<PathBuf>,
    /// MiB of an uploaded module.
    #[arg(long, value_name = "MIB", default_value_t = request::DEFAULT_MAX_MODULE_MIB)]
    pub max_module_mib: u64,
}

/// `cairn token ...`.
#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Make an API token and print it, once: one line (or JSON with --json).
    Create {
        /// What the token may do: viewer reads; operator also starts,
        /// signals, cancels and resumes; admin also uploads modules and grants directories.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// A unique name [default: token-<id>].
        #[arg(long)]
        name: Option<String>,
        /// Print {"id","name","role","token"} instead of the token alone.
        #[arg(long)]
        json: bool,
    },
    /// List tokens (never the tokens themselves).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token, by id or name.
    Revoke { id: String },
}

/// `--role`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    Viewer,
    Operator,
    Admin,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Viewer => Role::Viewer,
            RoleArg::Operator => Role::Operator,
            RoleArg::Admin => Role::Admin,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum KvCommand {
    /// Print a key's value (JSON); exit code 1 if it has none.
    Get {
        #[arg(long)]
        namespace: String,
        key: String,
    },
    /// Set a key to a JSON value.
    Put {
        #[arg(long)]
        namespace: String,
        key: String,
        /// The value, JSON.
        value: String,
    },
    /// Delete a key.
    Delete {
        #[arg(long)]
        namespace: String,
        key: String,
    },
    /// List the keys of a namespace, in key order.
    List {
        #[arg(long)]
        namespace: String,
        /// Only keys starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Print JSON (key, value, version, updated_at) instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `--grace`: seconds (a decimal number) or a duration with a unit (`30s`, `2m`).
fn parse_grace(text: &str) -> Result<std::time::Duration, String> {
    let d = match text.parse::<f64>() {
        Ok(s) if (0.0..1e9).contains(&s) => std::time::Duration::from_secs_f64(s),
        Ok(_) => return Err("a number of seconds from 0 up".into()),
        Err(_) => humantime::parse_duration(text).map_err(|e| format!("{e} (give seconds, or e.g. 30s)"))?,
    };
    if d > std::time::Duration::from_secs(1_000_000_000) {
        return Err("at most 1e9 seconds".into());
    }
    Ok(d)
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
    /// Grant a host directory read-only, as HOST or HOST::GUEST (repeatable).
    #[arg(long = "dir-ro", value_name = "HOST[::GUEST]")]
    pub dirs_ro: Vec<String>,
    /// Give the guest an environment variable (repeatable; stored in the database in clear).
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Memory limit per instance, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    pub max_memory: u64,
    /// CPU seconds a guest may run without reaching a durable point (a step,
    /// a timer, a signal wait, a branch).
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    pub max_cpu: f64,
    /// History entries the run may have.
    #[arg(long, value_name = "ENTRIES", default_value_t = Limits::default().max_history)]
    pub max_history: u64,
    /// MiB the run's history may take.
    #[arg(long, value_name = "MIB", default_value_t = Limits::default().max_history_mib)]
    pub max_history_mib: u64,
    /// MiB of one payload: the input, a step's output, a signal's payload, the result.
    #[arg(long, value_name = "MIB", default_value_t = Limits::default().max_payload_mib)]
    pub max_payload_mib: u64,
    /// CPU seconds the guest may use in all over one execution of the run.
    #[arg(long, value_name = "SECONDS", default_value_t = Limits::default().max_run_cpu_ms as f64 / 1000.0)]
    pub max_run_cpu: f64,
    /// Seconds from the run's creation to its end [default: no limit].
    #[arg(long, value_name = "SECONDS")]
    pub max_wall: Option<f64>,
    /// Branches the run may spawn.
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_branches)]
    pub max_branches: u64,
    /// Let steps reach this host over HTTP: HOST (any port), HOST:PORT,
    /// *.DOMAIN for its subdomains, or an IP address (repeatable). A name
    /// that resolves to a loopback, private or link-local address needs that
    /// address listed too.
    #[arg(long = "allow-http", value_name = "HOST[:PORT]")]
    pub allow_http: Vec<String>,
    /// Allow plain http:// to hosts that are not loopback.
    #[arg(long)]
    pub allow_http_insecure: bool,
    /// A header the host adds to requests to HOST, read from its own
    /// environment when it sends them: HOST:NAME=@env:VAR (repeatable). The
    /// value is never stored and never seen by the workflow.
    #[arg(long = "http-header", value_name = "HOST:NAME=@env:VAR")]
    pub http_headers: Vec<String>,
    /// MiB of one HTTP response body.
    #[arg(long, value_name = "MIB", default_value_t = Limits::default().max_http_response_mib)]
    pub max_http_response_mib: u64,
    /// Seconds one HTTP request may take, redirects included.
    #[arg(long, value_name = "SECONDS", default_value_t = Limits::default().http_timeout_ms as f64 / 1000.0)]
    pub http_timeout: f64,
    /// The key-value namespace of the run's steps [default: the module's
    /// hash]; runs of several modules share one by naming it.
    #[arg(long, value_name = "NS")]
    pub kv_namespace: Option<String>,
    /// Keys the run's key-value namespace may hold.
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_kv_keys)]
    pub max_kv_keys: u64,
    /// MiB of the module file; larger modules are refused before they are compiled.
    #[arg(long, value_name = "MIB", default_value_t = request::DEFAULT_MAX_MODULE_MIB)]
    pub max_module_mib: u64,
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

/// `--durability`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DurabilityArg {
    /// fsync before a step returns: survives power loss.
    Power,
    /// Written to the OS before a step returns, no fsync per commit: survives
    /// a killed process, not a power loss.
    Process,
}

impl From<DurabilityArg> for Durability {
    fn from(d: DurabilityArg) -> Self {
        match d {
            DurabilityArg::Power => Durability::Power,
            DurabilityArg::Process => Durability::Process,
        }
    }
}

/// An error with the exit code it ends the process with.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Self {
        Failure { code: exit::USAGE, error: anyhow::anyhow!(message.into()) }
    }
}

impl From<ServiceError> for Failure {
    fn from(e: ServiceError) -> Self {
        Failure { code: e.class().exit, error: e.into() }
    }
}

impl From<crate::store::StoreError> for Failure {
    fn from(e: crate::store::StoreError) -> Self {
        ServiceError::from(e).into()
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure { code: exit::FAILED, error }
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match crate::runtime::executor::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cairn: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILED);
        }
    };
    let outcome = runtime.block_on(async {
        let outcome = dispatch(cli).await;
        // PostgreSQL leases the command dropped go back before it exits.
        crate::store::postgres::settle_releases(Duration::from_secs(2)).await;
        outcome
    });
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("cairn: error: {}", escape(&format!("{:#}", f.error)));
            ExitCode::from(f.code)
        }
    }
}

/// The PostgreSQL URL `--db` names, if it names one.
fn postgres_url(cli: &Cli) -> Option<&str> {
    cli.db.to_str().filter(|db| crate::store::postgres::is_postgres_url(db))
}

/// The database, created if it does not exist (commands that create runs).
fn open_store(cli: &Cli) -> Result<Arc<dyn RunStore>, Failure> {
    if let Some(url) = postgres_url(cli) {
        if !(cli.lease.is_finite() && cli.lease > 0.0 && cli.lease < 1e6) {
            return Err(Failure::usage("--lease must be a positive number of seconds"));
        }
        let lease = std::time::Duration::from_secs_f64(cli.lease);
        let durability = cli.durability.into();
        // Commands run on the multi-threaded runtime: connecting may wait.
        let store = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current()
                .block_on(crate::store::postgres::PostgresStore::connect(url, durability, lease))
        })?;
        return Ok(Arc::new(store));
    }
    Ok(Arc::new(SqliteStore::open(&cli.db, cli.durability.into())?))
}

/// The database, which must exist already (commands about existing runs):
/// a mistyped path is not silently answered from a new, empty database.
fn open_existing_store(cli: &Cli) -> Result<Arc<dyn RunStore>, Failure> {
    if postgres_url(cli).is_none() && !cli.db.exists() {
        return Err(ServiceError::NoDatabase(cli.db.display().to_string()).into());
    }
    open_store(cli)
}

/// An executor on `store`; `pool`: instance slots of a pooled engine (for
/// many runs at once).
fn executor(cli: &Cli, store: Arc<dyn RunStore>, pool: Option<u32>) -> Result<Executor, Failure> {
    let cache = cli.cache_dir.clone().or_else(default_cache_dir).map(|dir| ModuleCache { dir, key: store.cache_key() });
    let engine = Arc::new(match pool {
        Some(n) => WasmEngine::pooled(cache, n)?,
        None => WasmEngine::new(cache)?,
    });
    if !(cli.park_after >= 0.0 && cli.park_after.is_finite()) {
        return Err(Failure::usage("--park-after must be a number of seconds"));
    }
    Ok(Executor::new(engine, store)?.with_park_threshold(Duration::from_secs_f64(cli.park_after)))
}

/// The executor of `cairn worker` and `cairn serve`: a pooled engine,
/// `concurrency` live runs, and the pool's other slots for branches.
fn pooled_executor(cli: &Cli, store: Arc<dyn RunStore>, concurrency: usize) -> Result<Arc<Executor>, Failure> {
    // Slots for the live runs and their branches; address space only.
    let slots = (concurrency as u32).saturating_mul(8).clamp(WORKER_POOL, 8192);
    let branch_slots = (slots as usize).saturating_sub(concurrency).max(1);
    // Where leases cost a heartbeat each, long sleeps are given back.
    let release = store.releases_parked_after();
    let executor = executor(cli, store, Some(slots))?.with_parked_released(release);
    Ok(Arc::new(executor.with_branch_instance_limit(branch_slots).with_instance_limit(concurrency)))
}

async fn dispatch(cli: Cli) -> Result<u8, Failure> {
    match &cli.command {
        Command::Run(args) => run(&cli, args).await,
        Command::Start(args) => start(&cli, args).await,
        Command::Worker { concurrency } => {
            if *concurrency == 0 {
                return Err(Failure::usage("--concurrency must be at least 1"));
            }
            let store = open_store(&cli)?;
            let executor = pooled_executor(&cli, store.clone(), *concurrency)?;
            crate::service::worker::run_worker(executor, &Service::new(store), *concurrency).await?;
            Ok(exit::OK)
        }
        Command::Serve(args) => serve(&cli, args).await,
        Command::Resume(args) => resume(&cli, args).await,
        Command::Runs { json } => {
            let runs = Service::new(open_existing_store(&cli)?).list_runs().await?;
            print::runs(&runs, *json);
            Ok(exit::OK)
        }
        Command::Show { run_id, json } => {
            let view = Service::new(open_existing_store(&cli)?).run_view(run_id).await?;
            print::run_view(&view, *json);
            Ok(exit::OK)
        }
        Command::Signal { run_id, name, payload } => {
            let payload = request::json_payload(payload.as_deref(), "the signal payload")?;
            Service::new(open_existing_store(&cli)?).signal(run_id, name, payload).await?;
            eprintln!("cairn: signal {name:?} sent to run {run_id}");
            Ok(exit::OK)
        }
        Command::Token { action } => token(&cli, action).await,
        Command::Cancel { run_id, grace } => cancel(&cli, run_id, *grace).await,
        Command::Kv { action } => kv(&cli, action).await,
        Command::Migrate { from, to } => migrate(&cli, from, to).await,
    }
}

async fn migrate(cli: &Cli, from: &std::path::Path, to: &str) -> Result<u8, Failure> {
    if !crate::store::postgres::is_postgres_url(to) {
        return Err(Failure::usage(format!(
            "--to must be a PostgreSQL URL (postgres://user@host:port/db), not {to:?}"
        )));
    }
    if !from.exists() {
        return Err(ServiceError::NoDatabase(from.display().to_string()).into());
    }
    let source = SqliteStore::open(from, Durability::Power)?;
    // Every unfinished run's lock, held until the move is done: none may be
    // executing (its next steps would be lost), and none starts meanwhile.
    let mut locks = Vec::new();
    for run in source.unfinished_runs().await? {
        match source.lease(run.key).await? {
            Some(lock) => locks.push(lock),
            None => return Err(ServiceError::RunBusy(run.id).into()),
        }
    }
    let target = {
        let url = to.to_string();
        let lease = std::time::Duration::from_secs_f64(cli.lease.clamp(0.001, 1e6));
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(crate::store::postgres::PostgresStore::connect(
                &url,
                Durability::Power,
                lease,
            ))
        })?
    };
    let moved = target.import_sqlite(from).await?;
    drop(locks);
    let counts: Vec<String> = moved.iter().map(|(table, n)| format!("{table} {n}")).collect();
    eprintln!("cairn: moved {} into {}: {}", from.display(), target.location(), counts.join(", "));
    eprintln!("cairn: go on with --db {} (the SQLite file is unchanged)", target.location());
    Ok(exit::OK)
}

async fn cancel(cli: &Cli, run_id: &str, grace: Option<std::time::Duration>) -> Result<u8, Failure> {
    let store = open_existing_store(cli)?;
    let service = Service::new(store.clone());
    match service.cancel(run_id, grace).await? {
        Cancelled::Already => eprintln!("cairn: run {run_id} is already cancelled"),
        Cancelled::Done => eprintln!("cairn: run {run_id} cancelled"),
        Cancelled::Requested if grace.is_some() => eprintln!(
            "cairn: cancel of run {run_id} requested; the process executing it tells the workflow, which may clean \
             up until the grace period ends"
        ),
        Cancelled::Requested => eprintln!(
            "cairn: cancel of run {run_id} requested; the process executing it stops it at its next host call"
        ),
        Cancelled::Graced(claimed) => {
            let ClaimedRun { run, lease } = *claimed;
            // Nobody executes it: execute it here, so that the workflow
            // can clean up within its grace period.
            eprintln!("cairn: run {run_id} cancelled; executing it while it cleans up");
            let executor = Arc::new(executor(cli, store, None)?);
            let code = execute_foreground(&executor, &run).await;
            drop(lease);
            return code.map(|c| if c == exit::FAILED { exit::OK } else { c });
        }
    }
    Ok(exit::OK)
}

async fn kv(cli: &Cli, action: &KvCommand) -> Result<u8, Failure> {
    // Seeding a namespace before any run (stock, say) creates the database.
    let writes = matches!(action, KvCommand::Put { .. } | KvCommand::Delete { .. });
    let service = Service::new(if writes { open_store(cli)? } else { open_existing_store(cli)? });
    match action {
        KvCommand::Get { namespace, key } => match service.kv_get(namespace, key).await? {
            Some(found) => {
                println!("{}", String::from_utf8_lossy(&found.value.unwrap_or_default()));
                Ok(exit::OK)
            }
            None => {
                eprintln!("cairn: namespace {namespace:?} has no key {key:?}");
                Ok(exit::FAILED)
            }
        },
        KvCommand::Put { namespace, key, value } => {
            let value = request::json_payload(Some(value), "the value")?;
            service.kv_set(namespace, key, Some(value)).await?;
            Ok(exit::OK)
        }
        KvCommand::Delete { namespace, key } => {
            service.kv_set(namespace, key, None).await?;
            Ok(exit::OK)
        }
        KvCommand::List { namespace, prefix, json } => {
            let mut after: Option<String> = None;
            let mut rows = Vec::new();
            loop {
                let page = service.kv_list(namespace, prefix, after.as_deref(), 1000).await?;
                let Some((last, _)) = page.last() else { break };
                after = Some(last.clone());
                rows.extend(page);
            }
            print::kv_list(&rows, *json);
            Ok(exit::OK)
        }
    }
}

/// Logs of `cairn serve` to stderr, filtered by `CAIRN_LOG` (tracing's
/// env-filter syntax; by default warnings, and the server's own notices).
fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,cairn=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

async fn serve(cli: &Cli, args: &ServeArgs) -> Result<u8, Failure> {
    if args.concurrency == 0 {
        return Err(Failure::usage("--concurrency must be at least 1"));
    }
    // Before anything records a metric (see `telemetry`).
    let metrics = match crate::telemetry::install_prometheus() {
        Ok(handle) => {
            // Histogram samples pile up until they are folded into their
            // buckets: fold them even when nobody scrapes.
            let upkeep = handle.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                    upkeep.run_upkeep();
                }
            });
            Some(handle)
        }
        Err(e) => {
            eprintln!("cairn serve: no metrics: {e:#}");
            None
        }
    };
    init_logs();
    let store = open_store(cli)?;
    let service = Service::new(store.clone());
    if !service.has_live_tokens().await? {
        if !args.listen.ip().is_loopback() {
            return Err(Failure::usage(format!(
                "refusing to serve on {} with no API token: make one with `cairn --db {} token create --role admin`",
                args.listen,
                cli.db.display()
            )));
        }
        eprintln!(
            "cairn serve: no API token yet, so every /api request gets 401; make one with `cairn --db {} token create --role admin`",
            cli.db.display()
        );
    }
    let allow_dirs = args
        .allow_dirs
        .iter()
        .map(|d| d.canonicalize().map_err(|e| Failure::usage(format!("--allow-dir {}: {e}", d.display()))))
        .collect::<Result<Vec<_>, _>>()?;
    let executor = pooled_executor(cli, store.clone(), args.concurrency)?;
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let mut state = crate::server::AppState::new(service, executor.clone(), stopping);
    state.worker = !args.no_worker;
    state.allow_dirs = allow_dirs;
    state.max_module = usize::try_from(args.max_module_mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
    state.metrics = metrics;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let server =
        crate::server::serve(Arc::new(state), listener, crate::service::worker::shutdown_signal(), stopping_tx);
    if args.no_worker {
        server.await.map_err(|e| anyhow::anyhow!("serving on {}: {e}", args.listen))?;
        return Ok(exit::OK);
    }
    let worker_service = Service::new(store);
    let worker = crate::service::worker::run_worker(executor, &worker_service, args.concurrency);
    let (served, worked) = tokio::join!(server, worker);
    served.map_err(|e| anyhow::anyhow!("serving on {}: {e}", args.listen))?;
    worked?;
    Ok(exit::OK)
}

async fn token(cli: &Cli, action: &TokenCommand) -> Result<u8, Failure> {
    match action {
        TokenCommand::Create { role, name, json } => {
            let made = Service::new(open_store(cli)?).create_token((*role).into(), name.as_deref()).await?;
            if *json {
                let r = &made.record;
                println!("{}", serde_json::json!({"id": r.id, "name": r.name, "role": r.role, "token": made.token}));
            } else {
                println!("{}", made.token);
            }
        }
        TokenCommand::List { json } => {
            print::tokens(&Service::new(open_existing_store(cli)?).list_tokens().await?, *json)
        }
        TokenCommand::Revoke { id } => {
            Service::new(open_existing_store(cli)?).revoke_token(id).await?;
            eprintln!("cairn: token {} revoked", escape(id));
        }
    }
    Ok(exit::OK)
}

/// What `run` and `start` say of the run, checked: input, id, grants and limits.
fn run_arguments(args: &RunArgs) -> Result<(Vec<u8>, Option<String>, RunConfig), Failure> {
    let limits = request::limits(&request::LimitArgs {
        max_memory: args.max_memory,
        max_cpu: args.max_cpu,
        max_history: args.max_history,
        max_history_mib: args.max_history_mib,
        max_payload_mib: args.max_payload_mib,
        max_run_cpu: args.max_run_cpu,
        max_wall: args.max_wall,
        max_branches: args.max_branches,
        max_http_response_mib: args.max_http_response_mib,
        http_timeout: args.http_timeout,
        max_kv_keys: args.max_kv_keys,
    })?;
    let max_input = limits.max_payload_bytes();
    let input = match args.input.as_deref() {
        None => request::json_payload(None, "--input")?,
        Some(s) => match s.strip_prefix('@') {
            Some(file) => {
                let text = request::read_capped(std::path::Path::new(file), max_input, "--input file")
                    .map_err(|e| Failure::usage(format!("cannot read --input file {file}: {e}")))?;
                request::json_payload(Some(&text), "--input")?
            }
            None => request::json_payload(Some(s), "--input")?,
        },
    };
    request::payload_size(input.len(), max_input, "--input")?;
    let run_id = args.run_id.as_deref().map(request::run_id).transpose()?;
    let dirs = args.dirs.iter().map(|d| request::dir_grant(d, "--dir")).collect::<Result<Vec<_>, _>>()?;
    let dirs_ro = args.dirs_ro.iter().map(|d| request::dir_grant(d, "--dir-ro")).collect::<Result<Vec<_>, _>>()?;
    let env = args.env.iter().map(|e| request::env_var(e)).collect::<Result<Vec<_>, _>>()?;
    let http = request::http_grants(&args.allow_http, args.allow_http_insecure, &args.http_headers)?;
    let kv_namespace = args.kv_namespace.as_deref().map(request::kv_namespace).transpose()?.map(String::into_boxed_str);
    Ok((input, run_id, RunConfig { dirs, dirs_ro, env, http: http.boxed(), kv_namespace, limits }))
}

/// Check the module and record the run.
async fn create_run(
    cli: &Cli,
    args: &RunArgs,
    mode: StartMode,
) -> Result<(Arc<Executor>, Service, crate::service::StartedRun), Failure> {
    let (input, run_id, config) = run_arguments(args)?;
    let store = open_store(cli)?;
    let service = Service::new(store.clone());
    let executor = Arc::new(executor(cli, store, None)?);
    let module = ModuleSource::read(&args.module, args.max_module_mib)?;
    let started = service
        .start_run(&executor, StartRequest { module: StartModule::Bytes(module), input, run_id, config }, mode)
        .await?;
    Ok((executor, service, started))
}

async fn run(cli: &Cli, args: &RunArgs) -> Result<u8, Failure> {
    let (executor, _service, started) = create_run(cli, args, StartMode::Execute).await?;
    let id = &started.run.id;
    eprintln!("cairn: run {id} started (if interrupted: cairn resume {id})");
    let code = execute_foreground(&executor, &Arc::new(started.run)).await;
    drop(started.lease);
    code
}

async fn start(cli: &Cli, args: &RunArgs) -> Result<u8, Failure> {
    let (_, _, started) = create_run(cli, args, StartMode::Queue).await?;
    println!("{}", started.run.id);
    Ok(exit::OK)
}

async fn execute_foreground(executor: &Arc<Executor>, run: &Arc<RunRecord>) -> Result<u8, Failure> {
    let started = Instant::now();
    let outcome = executor.execute_in_task(run.clone()).await.map_err(ServiceError::from)?;
    let elapsed = started.elapsed();
    match outcome {
        RunOutcome::Completed(output) => {
            eprintln!("cairn: run {} completed in {:.1?}", run.id, elapsed);
            print::output(&output);
            Ok(exit::OK)
        }
        RunOutcome::Failed(error) => {
            eprintln!("cairn: run {} failed: {}", run.id, escape(&error));
            Ok(exit::FAILED)
        }
        RunOutcome::Cancelled => {
            eprintln!("cairn: run {} was cancelled", run.id);
            Ok(exit::FAILED)
        }
        // Not from this process's executor, which keeps sleeping runs.
        RunOutcome::Parked { .. } => {
            eprintln!("cairn: run {} waits; a worker continues it", run.id);
            Ok(exit::OK)
        }
    }
}

/// A finished run's result, as `resume` reports it.
fn report_finished(run: &RunRecord) -> u8 {
    if run.status == RunStatus::Completed {
        print::output(run.output.as_deref().unwrap_or(b"null"));
        return exit::OK;
    }
    eprintln!(
        "cairn: run {} {}: {}",
        escape(&run.id),
        run.status.as_str(),
        escape(run.error.as_deref().unwrap_or("(no error recorded)"))
    );
    exit::FAILED
}

async fn resume(cli: &Cli, args: &ResumeArgs) -> Result<u8, Failure> {
    let store = open_existing_store(cli)?;
    let service = Service::new(store.clone());
    if args.all {
        return resume_all(cli, &service).await;
    }
    let id = args.run_id.as_deref().expect("clap requires a run id without --all");
    // The executor listens for cancels and signals from the moment it is
    // made: before the run is claimed and read, so none falls between.
    let executor = Arc::new(executor(cli, store, None)?);
    let ClaimedRun { run, lease } = match service.resume(id).await? {
        Resumed::Finished(run) => return Ok(report_finished(&run)),
        Resumed::Claimed(claimed) => claimed,
    };
    eprintln!("cairn: resuming run {id} ({} steps recorded)", run.steps);
    let code = execute_foreground(&executor, &run).await;
    drop(lease);
    code
}

async fn resume_all(cli: &Cli, service: &Service) -> Result<u8, Failure> {
    let executor = Arc::new(executor(cli, service.store().clone(), None)?);
    let (claimed, busy) = service.resume_all().await?;
    for id in busy {
        eprintln!("cairn: skipping run {id}: another process is executing it");
    }
    let mut tasks = tokio::task::JoinSet::new();
    for claimed in claimed {
        let executor = executor.clone();
        tasks.spawn(async move {
            let id = claimed.run.id.clone();
            (id, Service::execute(&executor, claimed).await)
        });
    }
    let mut code = exit::OK;
    while let Some(joined) = tasks.join_next().await {
        let (id, result) = joined.map_err(|e| anyhow::anyhow!("a run task failed: {e}"))?;
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
            Ok(RunOutcome::Parked { .. }) => json!({"id": id, "status": "parked"}),
            Err(e) => {
                code = exit::FAILED;
                json!({"id": id, "status": "error", "error": e.to_string()})
            }
        };
        println!("{line}");
    }
    Ok(code)
}
