//! W1, W2, W4 and W9 on PostgreSQL (issue 12), on a server on this machine
//! with `fsync` and `synchronous_commit` on: `CAIRN_BENCH_PG`, else a
//! throwaway cluster of `scripts/pg-cluster.sh` (`--quick` takes
//! `CAIRN_TEST_PG` first, the cluster `make test` runs). Without a server
//! the rows say so and the other workloads go on.
//!
//! - W1: one run of sequential steps in this process, executed as `cairn
//!   run` executes it, against single-row durable commits from this process
//!   to the same server, measured next to each repetition by three clients
//!   (`pgbench`, a loop awaited from this process's calling thread, and a
//!   loop in a task next to its connection); the fastest is the baseline.
//!   Next to them, the statement
//!   a step commits with, alone in the same loop: what no engine on that
//!   statement can beat, and so the share of the gap that is the engine's.
//!   Each of the three also reports the CPU it took per commit, on the
//!   client and (on the bench's own cluster) on the server.
//! - W2: two real `cairn worker` processes, idle, then runs created pending
//!   in one commit; timed from that commit (which wakes the workers) to the
//!   last completion the database records.
//! - W4: a `cairn worker` executing a run is killed with SIGKILL; timed from
//!   the kill to the first step another worker commits under a new epoch.
//! - W9: W9's crowd of `POST /api/runs` (see `serve.rs`), the runs kept in
//!   PostgreSQL: no target of its own, for comparison with W9 on SQLite.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use cairn::model::{RunStatus, now_ms, now_us};
use cairn::runtime::engine::ModuleCache;
use cairn::runtime::{Executor, RunOutcome, WasmEngine};
use cairn::store::postgres::PostgresStore;
use cairn::store::{Durability, RunStore, Write};
use serde_json::json;

use super::{Bench, Row, median, new_run, workspace};

/// W4's lease: the takeover's target is this plus 100 ms.
const W4_LEASE: Duration = Duration::from_secs(1);

/// A PostgreSQL server for the bench; a cluster of its own is stopped on drop.
struct Server {
    admin: String,
    cluster: Option<PathBuf>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(dir) = &self.cluster {
            let _ = Command::new(workspace().join("scripts/pg-cluster.sh"))
                .arg("stop")
                .arg(dir)
                .env_remove("CAIRN_TEST_PG")
                .stdout(Stdio::null())
                .status();
        }
    }
}

impl Server {
    fn start(quick: bool) -> Result<Server> {
        let given = std::env::var("CAIRN_BENCH_PG")
            .ok()
            .or_else(|| if quick { std::env::var("CAIRN_TEST_PG").ok() } else { None });
        if let Some(admin) = given {
            return Ok(Server { admin, cluster: None });
        }
        let dir = std::env::temp_dir().join(format!("cairn-bench-pg-{}", std::process::id()));
        let out = Command::new(workspace().join("scripts/pg-cluster.sh"))
            .arg("start")
            .arg(&dir)
            .env_remove("CAIRN_TEST_PG")
            // Durable, as a production server is, and keeping its WAL
            // segments for reuse as one would (a new segment costs a file
            // written full and flushed).
            .env("CAIRN_PG_OPTIONS", "-c min_wal_size=1GB -c max_wal_size=4GB")
            .stderr(Stdio::inherit())
            .output()
            .context("running scripts/pg-cluster.sh")?;
        let mut server = Server { admin: String::new(), cluster: Some(dir) };
        if !out.status.success() {
            bail!("scripts/pg-cluster.sh start failed ({})", out.status);
        }
        server.admin = String::from_utf8(out.stdout)?.lines().last().unwrap_or_default().trim().to_string();
        Ok(server)
    }

    /// A new cluster's WAL has one segment; a server that has been running
    /// recycles old ones. Write and checkpoint about 400 MB of WAL first, so
    /// the workloads measure commits, not the cluster's first files.
    async fn warm(&self) -> Result<()> {
        if self.cluster.is_none() {
            return Ok(());
        }
        let client = connect(&self.admin).await?;
        client
            .batch_execute(
                "CREATE TABLE cairn_bench_warm AS SELECT g, repeat('x', 1000) AS pad FROM generate_series(1, 400000) g; \
                 DROP TABLE cairn_bench_warm; CHECKPOINT",
            )
            .await?;
        Ok(())
    }

    /// What measures CPU time here: this process's, and the cluster's
    /// when it is the bench's own (a given server may have other clients).
    fn meter(&self) -> CpuMeter {
        let postmaster = self.cluster.as_ref().and_then(|dir| {
            let pid = std::fs::read_to_string(dir.join("data/postmaster.pid")).ok()?;
            pid.lines().next()?.trim().parse().ok()
        });
        CpuMeter { postmaster }
    }

    /// A new, empty database on the server: its URL.
    async fn fresh_db(&self, name: &str) -> Result<String> {
        let (client, connection) = tokio_postgres::connect(&self.admin, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let db = format!("cairn_bench_{name}");
        client.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await?;
        client.batch_execute(&format!("CREATE DATABASE {db}")).await?;
        let mut url = url::Url::parse(&self.admin)?;
        url.set_path(&db);
        Ok(url.to_string())
    }
}

/// A plain connection for the bench's own queries.
async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// CPU time spent on this machine by the client (this process, all its
/// threads) and by the server (the postmaster and its children).
///
/// Every part of a lone run's step is serial (the step waits for its
/// commit; the commit waits for the step), so on a machine this small the
/// CPU each side spends per commit is most of the time per commit: these
/// figures say where W1-pg's gap to the baseline is.
#[derive(Clone, Copy)]
struct CpuMeter {
    postmaster: Option<u32>,
}

/// CPU microseconds used so far: the client's, and the server's by process.
struct CpuUsed {
    client: f64,
    server: Option<HashMap<u32, f64>>,
}

impl CpuMeter {
    fn read(&self) -> CpuUsed {
        // SAFETY: getrusage fills the struct it is given.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
        let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
        let client = us(usage.ru_utime) + us(usage.ru_stime);
        CpuUsed { client, server: self.postmaster.map(server_cpu_us) }
    }

    /// Per commit, since `before`: (client, server) in microseconds. The
    /// server's counts the processes alive at the end, each from its
    /// figure at `before` (0 if it started since): a backend of an earlier
    /// loop that exits meanwhile takes its whole time out of a plain sum.
    fn per(&self, before: CpuUsed, commits: usize) -> PerCommit {
        let after = self.read();
        let n = commits as f64;
        let server = before
            .server
            .zip(after.server)
            .map(|(b, a)| a.iter().map(|(pid, us)| us - b.get(pid).copied().unwrap_or(0.0)).sum::<f64>() / n);
        ((after.client - before.client) / n, server)
    }
}

/// CPU microseconds of a PostgreSQL postmaster and of each of its children
/// (the backends, the WAL writer, the checkpointer; each one thread).
fn server_cpu_us(postmaster: u32) -> HashMap<u32, f64> {
    let mut used = HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return used };
    for entry in procs.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // The parent's pid follows the name (in parentheses) and the state.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if pid == postmaster || ppid == Some(postmaster) {
            let on_cpu = std::fs::read_to_string(entry.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
            used.insert(pid, on_cpu.unwrap_or(0) as f64 / 1e3);
        }
    }
    used
}

pub async fn rows(b: &mut Bench) -> Result<Vec<Row>> {
    let server = match Server::start(b.quick) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("W1-pg, W2-pg, W4-pg, W9-pg skipped: no PostgreSQL server ({e:#})");
            return Ok(vec![skipped(&format!("no PostgreSQL server: {e:#}"))]);
        }
    };
    if !b.quick {
        server.warm().await?;
    }
    let mut rows = Vec::new();
    if b.wants("W1-pg") {
        rows.push(w1(b, &server).await?);
    }
    if b.wants("W2-pg") {
        rows.push(w2(b, &server).await?);
    }
    if b.wants("W4-pg") {
        rows.push(w4(b, &server).await?);
    }
    if b.wants("W9-pg") {
        rows.push(w9(b, &server).await?);
    }
    Ok(rows)
}

/// W9-pg: W9 (a crowd of `POST /api/runs` to `cairn serve --no-worker`)
/// with the runs in PostgreSQL. No target of its own: it shows what a
/// server on PostgreSQL accepts, next to W9 on SQLite.
async fn w9(b: &mut Bench, server: &Server) -> Result<Row> {
    let mut crowds = Vec::new();
    for rep in 0..b.sizes.reps {
        let url = server.fresh_db(&format!("w9_{rep}")).await?;
        let crowd = crate::serve::w9_crowd(b, &url).await?;
        let client = connect(&url).await?;
        let runs: i64 = client.query_one("SELECT count(*) FROM runs", &[]).await?.get(0);
        let signals: i64 = client.query_one("SELECT count(*) FROM signals", &[]).await?.get(0);
        if (runs as usize, signals as usize) != (crowd.posted, crowd.posted) {
            bail!("W9-pg: {runs} runs and {signals} signals stored of {} each accepted", crowd.posted);
        }
        crowds.push(crowd);
    }
    Ok(crate::serve::w9_row(b, "W9-pg", "PostgreSQL: ", &crowds, "report"))
}

fn skipped(why: &str) -> Row {
    Row {
        id: "W*-pg",
        workload: "W1, W2, W4 and W9 on PostgreSQL".into(),
        value: f64::NAN,
        unit: "(skipped)",
        baseline: None,
        ratio: None,
        target: why.into(),
        extra: json!({ "skipped": why }),
    }
}

/// W1-pg's repetitions. More than other rows' 3, and each one short, on
/// databases made once: this machine's disk moves a 1,000-commit loop by
/// ±10% from one second to the next, so the clients are measured next to
/// each other many times, in an order that turns at every repetition.
const W1_REPS: usize = 7;

/// What W1-pg measures, in each repetition.
#[derive(Clone, Copy)]
enum Phase {
    /// Single-row inserts from `pgbench`, PostgreSQL's own client (libpq).
    Pgbench,
    /// The same from this process, awaited from the calling thread.
    CallingThread,
    /// The same from this process, in a task next to its connection.
    InTask,
    /// The statement a lone run's step commits with, alone.
    Statement,
    /// One run of sequential steps, executed as `cairn run` executes it.
    Engine,
}

const PHASES: [Phase; 5] = [Phase::Pgbench, Phase::CallingThread, Phase::InTask, Phase::Statement, Phase::Engine];

/// CPU microseconds per commit: the client's, and the server's if measured.
type PerCommit = (f64, Option<f64>);

/// `pgbench`, PostgreSQL's benchmark client: the newest server version's,
/// else the one on `PATH`.
fn pgbench_binary() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin/pgbench"))
        .filter(|p| p.exists())
        .collect();
    versions
        .sort_by_key(|p| p.components().nth(4).and_then(|c| c.as_os_str().to_str()?.parse::<u32>().ok()).unwrap_or(0));
    versions.pop().or_else(|| {
        let found = Command::new("pgbench").arg("--version").stdout(Stdio::null()).status().ok()?.success();
        found.then(|| PathBuf::from("pgbench"))
    })
}

/// Single-row durable commits from `pgbench` (one client, prepared
/// statements, autocommit): per second, as it reports them without its
/// connection time. Positions are random over 63 bits: the script has no
/// counter, and a sequence would add a call to every commit. Without TLS,
/// as this process's clients connect (libpq would take TLS where the
/// server offers it; a `sslmode` in the URL still decides).
async fn pgbench_loop(pgbench: &std::path::Path, script: &std::path::Path, url: &str, commits: usize) -> Result<f64> {
    let out = tokio::process::Command::new(pgbench)
        .args(["-n", "-M", "prepared", "-c", "1", "-t", &commits.to_string(), "-f"])
        .arg(script)
        .arg(url)
        .env("PGSSLMODE", "disable")
        .output()
        .await
        .context("running pgbench")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("pgbench failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("tps = ")?.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no tps in pgbench's output: {stdout}"))
}

/// Autocommit single-row inserts of run `run` from a new connection: per
/// second, and the CPU per commit.
async fn commit_loop(url: &str, run: i32, commits: usize, meter: CpuMeter) -> Result<(f64, PerCommit)> {
    let client = connect(url).await?;
    let insert = client.prepare("INSERT INTO baseline VALUES ($1, $2, $3)").await?;
    let payload = vec![b'x'; 100];
    let cpu = meter.read();
    let start = Instant::now();
    for i in 0..commits {
        client.execute(&insert, &[&run, &(i as i32), &payload]).await?;
    }
    let rate = commits as f64 / start.elapsed().as_secs_f64();
    Ok((rate, meter.per(cpu, commits)))
}

/// The statement a lone run's step commits with (`STEP_STATEMENT`), alone:
/// run `run`'s rows, in a task next to its connection, on a database the
/// store migrated. Per second, and the CPU per commit.
async fn statement_loop(url: String, run: i64, commits: usize, meter: CpuMeter) -> Result<(f64, PerCommit)> {
    tokio::spawn(async move {
        let client = connect(&url).await?;
        client.batch_execute("SET synchronous_commit = on; SET plan_cache_mode = force_generic_plan").await?;
        let generation: i64 =
            client.query_one("SELECT coalesce(pg_sequence_last_value('cairn_gen'), 0)", &[]).await?.get(0);
        let statement = client.prepare(cairn::store::postgres::STEP_STATEMENT).await?;
        // The numbers run on from the last one handed out: nothing else
        // commits to this database.
        let last: i64 = client.query_one("SELECT pg_sequence_last_value('cairn_ids')", &[]).await?.get(0);
        let (output, error) = (vec![b'x'; 100], None::<&str>);
        let cpu = meter.read();
        let start = Instant::now();
        for (position, number) in (0..commits as i32).zip(last + 1..) {
            let now = now_us();
            let written = client
                .execute(
                    &statement,
                    &[
                        &generation,
                        &run,
                        &position,
                        &"step",
                        &"step",
                        &0i32,
                        &1i32,
                        &"ok",
                        &output,
                        &error,
                        &(now / 1000),
                        &(now / 1000),
                        &1i64,
                        &now,
                        &number,
                    ],
                )
                .await?;
            if written != 1 {
                bail!("W1-pg: the step statement wrote nothing (the generation or the numbers moved)");
            }
        }
        let rate = commits as f64 / start.elapsed().as_secs_f64();
        Ok((rate, meter.per(cpu, commits)))
    })
    .await?
}

/// The fastest of a repetition's three baseline clients (without
/// `pgbench`, its rate is NaN, which `max` passes over).
fn fastest(rate: &[f64; 5]) -> f64 {
    [Phase::Pgbench, Phase::CallingThread, Phase::InTask].iter().map(|&p| rate[p as usize]).fold(f64::NAN, f64::max)
}

/// W1-pg's engine: a store, an executor and the guest's module, on a
/// database of their own.
struct Engine {
    store: Arc<dyn RunStore>,
    executor: Arc<Executor>,
    module: cairn::runtime::PreparedModule,
}

impl Engine {
    async fn new(b: &Bench, url: &str) -> Result<Engine> {
        let store: Arc<dyn RunStore> =
            Arc::new(PostgresStore::connect(url, Durability::Power, Duration::from_secs(5)).await?);
        let cache = Some(ModuleCache { dir: b.cache.clone(), key: store.cache_key() });
        let executor = Arc::new(Executor::new(Arc::new(WasmEngine::new(cache)?), store.clone())?);
        let module = executor.prepare(std::fs::read(&b.guest)?, &b.guest.display().to_string()).await?;
        cairn::store::commit(
            &*store,
            vec![Write::PutModule { hash: module.hash.clone(), bytes: module.bytes.clone() }],
        )
        .await?;
        Ok(Engine { store, executor, module })
    }

    /// One new run of `steps` steps, held and executed as `cairn run` holds
    /// and executes its run (its writes are fenced; it runs in a task of
    /// the runtime): steps per second, and the CPU per step.
    async fn run(&self, steps: usize, meter: CpuMeter) -> Result<(f64, PerCommit)> {
        let run = new_run(&self.module, &json!({"mode": "steps", "n": steps}), RunStatus::Running)?;
        let writes = vec![Write::CreateRun { run: Box::new(run), lease: true }];
        let (record, _lease) = cairn::store::commit(&*self.store, writes).await?.created.remove(0);
        let used = meter.read();
        let start = Instant::now();
        match self.executor.execute_in_task(Arc::new(record)).await? {
            RunOutcome::Completed(_) => {}
            other => bail!("W1-pg: the run did not complete: {other:?}"),
        }
        let rate = steps as f64 / start.elapsed().as_secs_f64();
        Ok((rate, meter.per(used, steps)))
    }
}

/// W1-pg: one run's sequential steps against single-row durable commits to
/// the same server, the clients measured next to each other in every
/// repetition.
///
/// The baseline is the fastest of three clients: `pgbench`, which is how
/// an operator measures a server's commit rate, and this process's loop,
/// awaited from the calling thread and in a task next to its connection.
/// Each one's rate and the engine's ratio to it are reported too.
async fn w1(b: &mut Bench, server: &Server) -> Result<Row> {
    let steps = b.sizes.w1_steps as usize;
    let reps = if b.quick { b.sizes.reps } else { W1_REPS };
    let base_url = server.fresh_db("w1_baseline").await?;
    connect(&base_url)
        .await?
        .batch_execute(
            "CREATE TABLE baseline (run INT, position INT, output BYTEA, PRIMARY KEY (run, position)); \
             CREATE TABLE baseline_pgbench (run INT, position BIGINT, output BYTEA, PRIMARY KEY (run, position))",
        )
        .await?;
    let pgbench = pgbench_binary();
    let script = b.dir.join("w1-pgbench.sql");
    std::fs::write(
        &script,
        format!(
            "\\set p random(1, 9223372036854775806)\nINSERT INTO baseline_pgbench VALUES (1, :p, '\\x{}'::bytea);\n",
            "78".repeat(100)
        ),
    )?;
    let statement_url = server.fresh_db("w1_statement").await?;
    drop(PostgresStore::connect(&statement_url, Durability::Power, Duration::from_secs(5)).await?);
    let engine = Engine::new(b, &server.fresh_db("w1").await?).await?;

    let mut rates: [Vec<f64>; 5] = Default::default();
    let mut cpu = Cpu::default();
    let (mut bases, mut ratios, mut statement_ratios, mut over_statement) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 0..reps {
        let mut order = PHASES;
        order.rotate_left(rep % PHASES.len());
        let mut rate = [f64::NAN; 5];
        // The in-process loops' runs in the baseline table: two a repetition.
        let pair = rep as i32 * 2;
        for phase in order {
            let meter = server.meter();
            rate[phase as usize] = match phase {
                Phase::Pgbench => match &pgbench {
                    Some(bin) => pgbench_loop(bin, &script, &base_url, steps).await?,
                    None => f64::NAN,
                },
                Phase::CallingThread => commit_loop(&base_url, pair, steps, meter).await?.0,
                Phase::InTask => {
                    let url = base_url.clone();
                    let (r, c) = tokio::spawn(async move { commit_loop(&url, pair + 1, steps, meter).await }).await??;
                    cpu.add(phase, c);
                    r
                }
                Phase::Statement => {
                    let (r, c) = statement_loop(statement_url.clone(), rep as i64 + 1, steps, meter).await?;
                    cpu.add(phase, c);
                    r
                }
                Phase::Engine => {
                    let (r, c) = engine.run(steps, meter).await?;
                    cpu.add(phase, c);
                    r
                }
            };
        }
        for (all, r) in rates.iter_mut().zip(rate) {
            all.push(r);
        }
        // NaN (no pgbench) loses to the others.
        let base = fastest(&rate);
        bases.push(base);
        let engine = rate[Phase::Engine as usize];
        ratios.push(engine / base);
        statement_ratios.push(rate[Phase::Statement as usize] / base);
        over_statement.push(engine / rate[Phase::Statement as usize]);
    }
    let [pgbench_rates, calling, in_task, alone, engine_rates] = rates;
    let to = |client: &[f64]| median(client.iter().zip(&engine_rates).map(|(c, e)| e / c).collect());
    let (to_calling, to_in_task) = (to(&calling), to(&in_task));
    let to_pgbench = pgbench.is_some().then(|| to(&pgbench_rates));
    Ok(Row {
        id: "W1-pg",
        workload: format!("PostgreSQL: 1 run x {steps} sequential steps (--durability power)"),
        value: median(engine_rates),
        unit: "steps/s",
        baseline: Some((median(bases), "1-row durable commits/s (the fastest of pgbench and two in-process clients)")),
        ratio: Some(median(ratios.clone())),
        target: ">= 0.9 x baseline".into(),
        extra: json!({
            "repetitions": reps,
            "ratios": ratios,
            "baseline_pgbench": pgbench.is_some().then(|| median(pgbench_rates)),
            "baseline_calling_thread": median(calling),
            "baseline_in_task": median(in_task),
            // The run's step rate over each client's, repetition by repetition.
            "ratio_pgbench": to_pgbench,
            "ratio_calling_thread": to_calling,
            "ratio_in_task": to_in_task,
            // The step's statement alone, in the in-task loop, and over the baseline.
            "statement_alone": median(alone),
            "statement_alone_ratio": median(statement_ratios),
            // The run's step rate over its statement's alone.
            "engine_over_statement": median(over_statement),
            // CPU microseconds per commit, client and server (null for a
            // server given by CAIRN_BENCH_PG).
            "cpu_us_per_commit": cpu.json(),
        }),
    })
}

/// CPU per commit of each repetition, by phase (those of this process).
#[derive(Default)]
struct Cpu([(Vec<f64>, Vec<f64>); 5]);

impl Cpu {
    fn add(&mut self, phase: Phase, (client, server): PerCommit) {
        let (c, s) = &mut self.0[phase as usize];
        c.push(client);
        s.extend(server);
    }

    fn json(self) -> serde_json::Value {
        let [_, _, baseline, statement, engine] = self.0.map(|(client, server)| {
            json!({
                "client": (!client.is_empty()).then(|| median(client)),
                "server": (!server.is_empty()).then(|| median(server)),
            })
        });
        json!({ "baseline_in_task": baseline, "statement_alone": statement, "engine": engine })
    }
}

/// A `cairn worker` on the database, its output dropped.
fn worker(b: &Bench, url: &str, lease: Duration) -> Result<Child> {
    Ok(Command::new(&b.cairn)
        .args(["--db", url, "--lease", &lease.as_secs_f64().to_string(), "worker", "--concurrency", "256"])
        .env("CAIRN_CACHE_DIR", &b.cache)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

/// Kills the workers when the workload ends, however it ends.
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn w2(b: &mut Bench, server: &Server) -> Result<Row> {
    let (runs_n, steps) = b.sizes.w2_large;
    let url = server.fresh_db("w2").await?;
    let store: Arc<dyn RunStore> =
        Arc::new(PostgresStore::connect(&url, Durability::Power, Duration::from_secs(5)).await?);
    // Compiled into the cache the workers read (the same database, so the same key).
    let cache = Some(ModuleCache { dir: b.cache.clone(), key: store.cache_key() });
    let executor = Executor::new(Arc::new(WasmEngine::new(cache)?), store.clone())?;
    let module = executor.prepare(std::fs::read(&b.guest)?, &b.guest.display().to_string()).await?;
    cairn::store::commit(&*store, vec![Write::PutModule { hash: module.hash.clone(), bytes: module.bytes.clone() }])
        .await?;
    let _workers = Workers(vec![worker(b, &url, Duration::from_secs(5))?, worker(b, &url, Duration::from_secs(5))?]);
    let client = connect(&url).await?;
    let mut rates = Vec::new();
    let mut done = 0i64;
    // One unmeasured burst first: the workers' pools and caches are warm.
    for rep in 0..=b.sizes.reps {
        let mut writes = Vec::with_capacity(runs_n);
        for _ in 0..runs_n {
            let run = new_run(&module, &json!({"mode": "steps", "n": steps}), RunStatus::Pending)?;
            writes.push(Write::CreateRun { run: Box::new(run), lease: false });
        }
        cairn::store::commit(&*store, writes).await?;
        let created_ms = now_ms();
        done += runs_n as i64;
        let deadline = Instant::now() + Duration::from_secs(600);
        // Counted by the index of unfinished runs: cheap while the workers work.
        let unfinished = "SELECT count(*) FROM runs WHERE status NOT IN ('completed', 'failed', 'cancelled')";
        loop {
            let left: i64 = client.query_one(unfinished, &[]).await?.get(0);
            if left == 0 {
                break;
            }
            if Instant::now() > deadline {
                bail!("W2-pg: {left} of {runs_n} runs unfinished after 600 s");
            }
            // The time measured is the database's (created to the last
            // finished_at): looking rarely only keeps the count's own cost
            // (a scan of the unfinished runs) off the server under test.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let completed: i64 =
            client.query_one("SELECT count(*) FROM runs WHERE status = 'completed'", &[]).await?.get(0);
        if completed != done {
            bail!("W2-pg: {completed} of {done} runs completed");
        }
        let last_ms: i64 = client.query_one("SELECT max(finished_at) FROM runs", &[]).await?.get(0);
        if rep > 0 {
            let took = Duration::from_millis((last_ms - created_ms).max(1) as u64);
            rates.push((runs_n as u64 * steps as u64) as f64 / took.as_secs_f64());
        }
    }
    Ok(Row {
        id: "W2-pg",
        workload: format!(
            "PostgreSQL: {runs_n} runs x {steps} steps, created pending in one commit, 2 idle `cairn worker`s"
        ),
        value: median(rates.clone()),
        unit: "steps/s",
        baseline: None,
        ratio: None,
        target: ">= 20,000 steps/s".into(),
        extra: json!({ "rates": rates }),
    })
}

async fn w4(b: &mut Bench, server: &Server) -> Result<Row> {
    let mut takeovers = Vec::new();
    for _ in 0..b.sizes.reps {
        takeovers.push(w4_once(b, server).await?);
    }
    let lease_ms = W4_LEASE.as_secs_f64() * 1000.0;
    Ok(Row {
        id: "W4-pg",
        workload: format!("PostgreSQL: kill -9 a worker mid-run; another takes over (--lease {})", W4_LEASE.as_secs()),
        value: median(takeovers.clone()),
        unit: "ms to first new step",
        baseline: Some((lease_ms, "ms, the lease")),
        ratio: None,
        target: format!("<= {} ms (lease + 100 ms)", lease_ms + 100.0),
        extra: json!({ "takeovers_ms": takeovers }),
    })
}

async fn w4_once(b: &mut Bench, server: &Server) -> Result<f64> {
    let url = server.fresh_db("w4").await?;
    let client = connect(&url).await?;
    let mut first = Workers(vec![worker(b, &url, W4_LEASE)?]);
    let started = Command::new(&b.cairn)
        .args(["--db", &url, "start", b.guest.to_str().unwrap_or_default(), "--run-id", "w4"])
        .args(["--input", r#"{"mode":"steps","n":100000000}"#])
        .env("CAIRN_CACHE_DIR", &b.cache)
        .stdout(Stdio::null())
        .status()?;
    if !started.success() {
        bail!("W4-pg: cairn start failed");
    }
    let mut workers = Workers(Vec::new());
    let count = "SELECT count(*) FROM history h JOIN runs r ON r.seq = h.run WHERE r.id = 'w4'";
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.query_one(count, &[]).await?.get::<_, i64>(0) < 200 {
        if Instant::now() > deadline {
            bail!("W4-pg: the run made no progress");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The second worker is up and idle (the run is held) before the kill.
    workers.0.push(worker(b, &url, W4_LEASE)?);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let epoch: i64 = client.query_one("SELECT epoch FROM runs WHERE id = 'w4'", &[]).await?.get(0);
    first.0[0].kill()?;
    let killed_us = now_us();
    first.0[0].wait()?;
    let after =
        "SELECT min(h.committed_us) FROM history h JOIN runs r ON r.seq = h.run WHERE r.id = 'w4' AND h.epoch > $1";
    let deadline = Instant::now() + Duration::from_secs(60);
    let taken: i64 = loop {
        if let Some(us) = client.query_one(after, &[&epoch]).await?.get::<_, Option<i64>>(0) {
            break us;
        }
        if Instant::now() > deadline {
            bail!("W4-pg: nobody took the run over");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    Ok((taken - killed_us) as f64 / 1000.0)
}
