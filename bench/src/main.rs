//! `make bench`: every workload of BENCHMARKS.md, each next to a physical
//! limit measured in the same run on the same disk, as one table and as
//! `target/bench/results.json`. `--quick` runs tiny sizes (from `make
//! test`, so the bench cannot rot); its figures mean nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod effects;
mod postgres;
mod serve;

use anyhow::{Context as _, Result, bail};
use cairn::model::{EntryKind, Limits, NewRun, RunConfig, RunRecord, RunStatus};
use cairn::runtime::engine::ModuleCache;
use cairn::runtime::{Executor, PreparedModule, RunOutcome, WasmEngine};
use cairn::store::sqlite::SqliteStore;
use cairn::store::{Durability, RunStore, Write};
use serde_json::{Value, json};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Live instances in W2 (runs beyond wait for a slot), as `cairn worker
/// --concurrency 256` would have: enough for the whole 200-run burst and for
/// group commit to have company to batch. More only cost cache misses: with
/// 512 the 2,000-run case took 6% longer (interleaved, 15 repetitions each).
const W2_INSTANCES: usize = 256;

struct Sizes {
    reps: usize,
    w1_steps: u32,
    w2_small: (usize, u32),
    w2_large: (usize, u32),
    w3: [(u32, u64); 2],
    w4_steps: u32,
    w5: [u32; 2],
    w6_reps: usize,
    w7_runs: usize,
    baseline_commits: usize,
    /// W11: steps of the sequential run; runs (of 10 steps) at once.
    w11_steps: u32,
    w11_runs: usize,
}

const FULL: Sizes = Sizes {
    reps: 3,
    w1_steps: 1000,
    w2_small: (200, 10),
    w2_large: (2000, 10),
    w3: [(2, 1000), (100, 1000)],
    w4_steps: 1000,
    w5: [1000, 100_000],
    w6_reps: 20,
    w7_runs: 100_000,
    baseline_commits: 2000,
    w11_steps: 1000,
    w11_runs: 200,
};

const QUICK: Sizes = Sizes {
    reps: 1,
    w1_steps: 20,
    w2_small: (10, 3),
    w2_large: (20, 3),
    w3: [(2, 50), (5, 50)],
    w4_steps: 200,
    w5: [50, 200],
    w6_reps: 2,
    w7_runs: 50,
    baseline_commits: 50,
    w11_steps: 20,
    w11_runs: 10,
};

/// Set (to the number of runs) in the child process that measures one
/// repetition of W7.
const W7_CHILD: &str = "CAIRN_BENCH_W7_CHILD";

/// One line of the table.
struct Row {
    id: &'static str,
    workload: String,
    value: f64,
    unit: &'static str,
    baseline: Option<(f64, &'static str)>,
    /// value / baseline (or baseline / value when lower is better)
    ratio: Option<f64>,
    target: String,
    extra: Value,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

struct Bench {
    sizes: &'static Sizes,
    /// `--only W2,W7`: run just these workloads.
    only: Option<Vec<String>>,
    quick: bool,
    dir: PathBuf,
    cache: PathBuf,
    cairn: PathBuf,
    guest: PathBuf,
    counter: usize,
    /// W2's engine, kept across its repetitions as a running `cairn
    /// worker` keeps its own: pool slots are warm after the first runs.
    w2_engine: Option<Arc<WasmEngine>>,
}

/// An engine, a store and an executor on a fresh database.
struct Host {
    executor: Arc<Executor>,
    store: Arc<dyn RunStore>,
    engine: Arc<WasmEngine>,
    module: Arc<PreparedModule>,
    db: PathBuf,
}

impl Bench {
    fn wants(&self, id: &str) -> bool {
        self.only.as_ref().is_none_or(|o| o.iter().any(|x| x == id))
    }

    fn fresh_db(&mut self, tag: &str) -> PathBuf {
        self.counter += 1;
        let db = self.dir.join(format!("{tag}-{}.db", self.counter));
        for ext in ["", "-wal", "-shm", ".lock"] {
            let _ = std::fs::remove_file(format!("{}{ext}", db.display()));
        }
        db
    }

    async fn host(&mut self, tag: &str, durability: Durability, park: Option<Duration>) -> Result<Host> {
        let db = self.fresh_db(tag);
        let store: Arc<dyn RunStore> = Arc::new(SqliteStore::open(&db, durability)?);
        // Many-run workloads use the engine `cairn worker` uses (pooled);
        // single-run ones the one `cairn run` uses.
        let cache = Some(ModuleCache { dir: self.cache.clone(), key: store.cache_key() });
        let pooled = || WasmEngine::pooled(cache.clone(), cairn::runtime::engine::WORKER_POOL);
        let engine = if tag == "W2" {
            match &self.w2_engine {
                Some(engine) => engine.clone(),
                None => self.w2_engine.insert(Arc::new(pooled()?)).clone(),
            }
        } else if tag == "W7" {
            // Fresh: what parked runs leave resident in the pool counts.
            Arc::new(pooled()?)
        } else {
            Arc::new(WasmEngine::new(cache.clone())?)
        };
        let mut executor = Executor::new(engine.clone(), store.clone())?;
        if let Some(p) = park {
            executor = executor.with_park_threshold(p);
        }
        let executor = Arc::new(executor.with_instance_limit(if tag == "W2" { W2_INSTANCES } else { 64 }));
        let bytes = std::fs::read(&self.guest)?;
        let module = Arc::new(executor.prepare(bytes, &self.guest.display().to_string()).await?);
        Ok(Host { executor, store, engine, module, db })
    }
}

impl Host {
    async fn create(&self, n: usize, input: &Value, status: RunStatus) -> Result<Vec<RunRecord>> {
        let mut tickets = Vec::with_capacity(n);
        let first = self
            .store
            .submit(vec![Write::PutModule { hash: self.module.hash.clone(), bytes: self.module.bytes.clone() }]);
        first.await??;
        for _ in 0..n {
            let run = new_run(&self.module, input, status)?;
            tickets.push(self.store.submit(vec![Write::CreateRun { run: Box::new(run), lease: false }]));
        }
        let mut runs = Vec::with_capacity(n);
        for t in tickets {
            runs.push(t.await??.created.remove(0).0);
        }
        Ok(runs)
    }

    /// Execute runs concurrently; total wall time.
    async fn execute_all(&self, runs: Vec<RunRecord>) -> Result<Duration> {
        let start = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for run in runs {
            let ex = self.executor.clone();
            set.spawn(async move { ex.execute(&Arc::new(run)).await });
        }
        let mut done = Vec::new();
        while let Some(r) = set.join_next().await {
            match r?? {
                RunOutcome::Completed(_) => done.push(start.elapsed().as_secs_f64() * 1e3),
                other => bail!("a bench run did not complete: {other:?}"),
            }
        }
        if std::env::var_os("CAIRN_BENCH_DEBUG").is_some() && !done.is_empty() {
            let q = |f: f64| done[((done.len() - 1) as f64 * f) as usize];
            eprintln!(
                "  runs done at (ms): first {:.1}, 10% {:.1}, 50% {:.1}, 90% {:.1}, last {:.1}",
                q(0.0),
                q(0.1),
                q(0.5),
                q(0.9),
                q(1.0)
            );
        }
        Ok(start.elapsed())
    }
}

/// A bench run of the module: a fresh id, generous limits.
fn new_run(module: &PreparedModule, input: &Value, status: RunStatus) -> Result<NewRun> {
    Ok(NewRun {
        id: format!("bench-{}", unique()),
        module: module.hash.clone(),
        module_path: "benchflow.wasm".into(),
        input: serde_json::to_vec(input)?,
        config: RunConfig::new(Limits { max_memory_mib: 256, max_cpu_ms: 60_000, ..Limits::default() }),
        status,
        random_key: cairn::runtime::random::new_key().map_err(|e| anyhow::anyhow!("{e}"))?,
    })
}

/// With `CAIRN_BENCH_PERF_CTL=<fifo>` (`perf record -D -1 --control
/// fifo:<fifo>`), the profile covers only W2's execution window.
fn perf_control(cmd: &str) {
    if let Ok(fifo) = std::env::var("CAIRN_BENCH_PERF_CTL") {
        // Opening blocks until perf has the other end: use it only under perf.
        if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(fifo) {
            let _ = std::io::Write::write_all(&mut f, format!("{cmd}\n").as_bytes());
        }
    }
}

/// User plus system CPU time of this process so far.
fn process_cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn unique() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos()
}

/// Raw SQLite commits with Cairn's pragmas: (one-row commits/s, rows/s at 100 rows a commit).
fn sqlite_baseline(path: &Path, commits: usize, durability: Durability) -> Result<(f64, f64)> {
    let conn = rusqlite::Connection::open(path)?;
    let sync = if durability == Durability::Power { "FULL" } else { "NORMAL" };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous={sync};
         CREATE TABLE IF NOT EXISTS t (run INTEGER, position INTEGER, output BLOB, PRIMARY KEY (run, position)) WITHOUT ROWID;"
    ))?;
    let payload = vec![b'x'; 100];
    let start = Instant::now();
    for i in 0..commits {
        conn.prepare_cached("INSERT INTO t VALUES (1, ?1, ?2)")?.execute(rusqlite::params![i as i64, payload])?;
    }
    let one = commits as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    let batches = (commits / 10).max(5);
    for b in 0..batches {
        let tx = conn.unchecked_transaction()?;
        for r in 0..100 {
            tx.prepare_cached("INSERT INTO t VALUES (2, ?1, ?2)")?
                .execute(rusqlite::params![(b * 100 + r) as i64, payload])?;
        }
        tx.commit()?;
    }
    let hundred = (batches * 100) as f64 / start.elapsed().as_secs_f64();
    Ok((one, hundred))
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let root = workspace();
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let out_dir = target.join("bench");
    let w7_child: Option<usize> = std::env::var(W7_CHILD).ok().and_then(|v| v.parse().ok());
    let dir = match w7_child {
        Some(_) => out_dir.join(format!("work-w7-{}", std::process::id())),
        None => out_dir.join(if quick { "work-quick" } else { "work" }),
    };
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut bench = Bench {
        sizes: if quick { &QUICK } else { &FULL },
        cache: dir.join("cache"),
        cairn: target.join("release/cairn"),
        guest: target.join("wasm32-wasip1/release/benchflow.wasm"),
        dir,
        counter: 0,
        w2_engine: None,
        only: std::env::args().skip_while(|a| a != "--only").nth(1).map(|v| v.split(',').map(str::to_string).collect()),
        quick,
    };
    for (what, p) in [("the cairn binary", &bench.cairn), ("the benchflow guest", &bench.guest)] {
        if !p.exists() {
            bail!("{what} is missing at {}: run `make build` first", p.display());
        }
    }
    // The runtime `cairn` itself runs on.
    let runtime = cairn::runtime::executor::runtime()?;
    if let Some(runs) = w7_child {
        let measured = runtime.block_on(w7_once(&mut bench, runs));
        let _ = std::fs::remove_dir_all(&bench.dir);
        let (per_run, before, after) = measured?;
        println!("{}", json!({ "per_run": per_run, "before_kib": before, "after_kib": after }));
        // Parked runs' tasks are not waited for.
        std::process::exit(0);
    }
    let rows = runtime.block_on(run_all(&mut bench))?;
    print_and_save(&rows, &out_dir, quick)?;
    let _ = std::fs::remove_dir_all(&bench.dir);
    Ok(())
}

async fn run_all(b: &mut Bench) -> Result<Vec<Row>> {
    let s = b.sizes;
    let mut rows = Vec::new();

    // Physical limits, measured here and now.
    let mut one = Vec::new();
    let mut hundred = Vec::new();
    for _ in 0..s.reps {
        let (o, h) = sqlite_baseline(&b.fresh_db("baseline"), s.baseline_commits, Durability::Power)?;
        one.push(o);
        hundred.push(h);
    }
    let (one, hundred) = (median(one), median(hundred));
    eprintln!("baselines: {one:.0} durable 1-row commits/s, {hundred:.0} rows/s at 100 rows/commit");
    eprintln!("(W1 and W8 measure their own baseline next to each repetition)");

    // W7: each repetition in a child process of its own: RSS growth is
    // measured best on a heap no earlier workload (or repetition) grew.
    if b.wants("W7") {
        let w7_runs: usize =
            std::env::var("CAIRN_BENCH_W7_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(s.w7_runs);
        let mut reps = Vec::new();
        for _ in 0..s.reps {
            let mut child = Command::new(std::env::current_exe()?);
            child.env(W7_CHILD, w7_runs.to_string()).stderr(Stdio::inherit());
            if b.quick {
                child.arg("--quick");
            }
            let out = child.output()?;
            if !out.status.success() {
                bail!("W7: the measuring process failed ({})", out.status);
            }
            let v: Value = serde_json::from_slice(&out.stdout).context("W7: the measuring process's answer")?;
            reps.push((v["per_run"].as_f64().unwrap_or(f64::NAN), v["before_kib"].clone(), v["after_kib"].clone()));
        }
        let per_run = median(reps.iter().map(|r| r.0).collect());
        rows.push(Row {
            id: "W7",
            workload: format!("{w7_runs} runs parked in ctx.sleep in one host"),
            value: per_run,
            unit: "bytes RSS/run",
            baseline: None,
            ratio: None,
            target: "<= 2048 bytes".into(),
            extra: json!({
                "repetitions": reps.len(),
                "bytes_per_run": reps.iter().map(|r| r.0).collect::<Vec<_>>(),
                "rss_kib_before_after": reps.iter().map(|r| json!([r.1, r.2])).collect::<Vec<_>>(),
            }),
        });
    }

    // W1 and W8: one run of sequential steps.
    for (id, durability, base_unit) in
        [("W1", Durability::Power, "1-row durable commits/s"), ("W8", Durability::Process, "1-row commits/s, no fsync")]
    {
        if !b.wants(id) {
            continue;
        }
        // The disk's fsync rate drifts within seconds here: measure the
        // baseline right before each repetition and compare pairwise.
        let (mut rates, mut bases, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..s.reps {
            let commits = if durability == Durability::Power { s.w1_steps as usize } else { s.w1_steps as usize * 5 };
            let base = sqlite_baseline(&b.fresh_db("baseline-w1"), commits, durability)?.0;
            let h = b.host(id, durability, None).await?;
            let runs = h.create(1, &json!({"mode": "steps", "n": s.w1_steps}), RunStatus::Running).await?;
            let took = h.execute_all(runs).await?;
            let rate = s.w1_steps as f64 / took.as_secs_f64();
            rates.push(rate);
            bases.push(base);
            ratios.push(rate / base);
        }
        let rate = median(rates);
        rows.push(Row {
            id,
            workload: format!(
                "1 run x {} sequential steps ({})",
                s.w1_steps,
                if id == "W1" { "--durability power" } else { "--durability process" }
            ),
            value: rate,
            unit: "steps/s",
            baseline: Some((median(bases), base_unit)),
            ratio: Some(median(ratios)),
            target: if id == "W1" { ">= 0.9 x baseline".into() } else { "-".into() },
            extra: json!({ "us_per_step": 1e6 / rate }),
        });
    }

    // W2: many runs at once.
    let w2_sizes = match std::env::var("CAIRN_BENCH_W2") {
        // e.g. CAIRN_BENCH_W2=2000x1 to see the per-run cost apart.
        Ok(v) => {
            let (r, st) = v.split_once('x').context("CAIRN_BENCH_W2 is RUNSxSTEPS")?;
            vec![(r.parse()?, st.parse()?)]
        }
        Err(_) => vec![s.w2_small, s.w2_large],
    };
    for (runs_n, steps) in w2_sizes {
        if !b.wants("W2") {
            break;
        }
        // A burst of 200 runs lasts about 20 ms: more repetitions to steady
        // its median.
        let reps = if runs_n * (steps as usize) < 10_000 { s.reps * 3 } else { s.reps };
        // One unmeasured burst first: a running worker's pool slots,
        // allocator and database are warm. The repetitions then use the
        // same database, as a running worker does: a brand-new file grows
        // with every commit of its first burst, and an fsync that extends a
        // file writes its metadata too.
        let h = b.host("W2", Durability::Power, None).await?;
        let warmup =
            h.execute_all(h.create(runs_n, &json!({"mode": "steps", "n": steps}), RunStatus::Pending).await?).await?;
        let (mut rates, mut cpus) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let runs = h.create(runs_n, &json!({"mode": "steps", "n": steps}), RunStatus::Pending).await?;
            perf_control("enable");
            let cpu = process_cpu();
            let took = h.execute_all(runs).await?;
            perf_control("disable");
            let cpu_per_run = (process_cpu() - cpu).as_secs_f64() * 1e6 / runs_n as f64;
            if std::env::var_os("CAIRN_BENCH_DEBUG").is_some() {
                eprintln!(
                    "W2 {runs_n}x{steps}: {cpu_per_run:.1} µs CPU per run, {:.1} ms wall",
                    took.as_secs_f64() * 1e3
                );
            }
            cpus.push(cpu_per_run);
            rates.push((runs_n as u64 * steps as u64) as f64 / took.as_secs_f64());
        }
        let rate = median(rates);
        rows.push(Row {
            id: "W2",
            workload: format!("{runs_n} runs x {steps} steps at once ({W2_INSTANCES} live instances at most)"),
            value: rate,
            unit: "steps/s",
            baseline: Some((hundred, "rows/s, 100 rows per durable commit")),
            ratio: Some(rate / hundred),
            target: ">= 100,000 steps/s".into(),
            extra: json!({
                "repetitions": reps,
                "cpu_us_per_run": median(cpus),
                // The unmeasured warm-up burst (cold only for the first size).
                "warmup_steps_per_s": (runs_n as u64 * steps as u64) as f64 / warmup.as_secs_f64(),
            }),
        });
    }

    // W3: branches that wait.
    for (n, ms) in s.w3 {
        if !b.wants("W3") {
            break;
        }
        let mut walls = Vec::new();
        for _ in 0..s.reps {
            let h = b.host("W3", Durability::Power, None).await?;
            let runs = h.create(1, &json!({"mode": "branches", "n": n, "sleep_ms": ms}), RunStatus::Running).await?;
            walls.push(h.execute_all(runs).await?.as_secs_f64());
        }
        let wall = median(walls);
        let ideal = ms as f64 / 1000.0;
        rows.push(Row {
            id: "W3",
            workload: format!("{n} branches of {ms} ms, joined"),
            value: wall,
            unit: "s wall",
            baseline: Some((ideal, "s, one branch alone")),
            ratio: Some(wall / ideal),
            target: if n <= 2 { "<= 1.02 x".into() } else { "<= 1.1 x".into() },
            extra: Value::Null,
        });
    }

    // W4: kill -9 at the middle, resume.
    if b.wants("W4") {
        let mut restarts = Vec::new();
        let mut reruns_total = 0;
        for _ in 0..s.reps {
            let (ms, reruns) = kill_and_resume(b, s.w4_steps).await?;
            restarts.push(ms);
            reruns_total += reruns;
        }
        let restart = median(restarts);
        rows.push(Row {
            id: "W4",
            workload: format!(
                "kill -9 a {}-step run at step {}, resume ({reruns_total} completed steps re-run)",
                s.w4_steps,
                s.w4_steps / 2
            ),
            value: restart,
            unit: "ms to first new step",
            baseline: None,
            ratio: None,
            target: "<= 20 ms; 0 re-run".into(),
            extra: json!({ "completed_steps_rerun": reruns_total }),
        });
    }

    // W5: replay of finished histories through the resume path.
    for n in s.w5 {
        if !b.wants("W5") {
            break;
        }
        let mut per_step = Vec::new();
        let mut totals = Vec::new();
        let mut loads = Vec::new();
        for (us, total_ms, load_ms) in replay(b, n, s.reps).await? {
            per_step.push(us);
            totals.push(total_ms);
            loads.push(load_ms);
        }
        let us = median(per_step);
        rows.push(Row {
            id: "W5",
            workload: format!("replay a finished {n}-step history"),
            value: us,
            unit: "us/replayed step",
            baseline: None,
            ratio: None,
            target: "<= 1 us".into(),
            extra: json!({ "replay_total_ms": median(totals), "module_load_ms": median(loads) }),
        });
    }

    // W6: a tiny workflow, whole process, module cached.
    if b.wants("W6") {
        let db = b.fresh_db("W6");
        let tiny = r#"{"mode":"tiny"}"#;
        let cairn = |db: &Path| {
            let mut c = Command::new(&b.cairn);
            c.arg("--db").arg(db).env("CAIRN_CACHE_DIR", &b.cache).stdout(Stdio::null()).stderr(Stdio::null());
            c
        };
        cairn(&db).args(["run", b.guest.to_str().unwrap(), "--input", tiny]).status()?; // warm the cache
        let mut walls = Vec::new();
        for _ in 0..s.w6_reps {
            let start = Instant::now();
            let st = cairn(&db).args(["run", b.guest.to_str().unwrap(), "--input", tiny]).status()?;
            walls.push(start.elapsed().as_secs_f64() * 1000.0);
            if !st.success() {
                bail!("W6: cairn run failed");
            }
        }
        rows.push(Row {
            id: "W6",
            workload: "cairn run of a one-step workflow, module cached".into(),
            value: median(walls),
            unit: "ms wall",
            baseline: None,
            ratio: None,
            target: "<= 10 ms".into(),
            extra: Value::Null,
        });
    }

    // W9 and W10: the HTTP API and its event streams.
    if b.wants("W9") {
        rows.push(serve::w9(b).await?);
    }
    if b.wants("W10") {
        rows.push(serve::w10(b).await?);
    }
    // W11: steps that each put a key-value entry.
    if b.wants("W11") {
        rows.extend(effects::w11(b).await?);
    }
    // W1, W2, W4 and W9 on PostgreSQL.
    if ["W1-pg", "W2-pg", "W4-pg", "W9-pg"].iter().any(|w| b.wants(w)) {
        rows.extend(postgres::rows(b).await?);
    }
    Ok(rows)
}

/// W4: the real binary, killed with SIGKILL mid-run, then resumed.
async fn kill_and_resume(b: &mut Bench, steps: u32) -> Result<(f64, usize)> {
    let db = b.fresh_db("W4");
    let data = b.dir.join(format!("w4-data-{}", b.counter));
    std::fs::create_dir_all(&data)?;
    let log = data.join("log.txt");
    let id = format!("w4-{}", b.counter);
    let input = format!(r#"{{"mode":"steps","n":{steps},"log":"/data/log.txt"}}"#);
    let grant = format!("{}::/data", data.display());
    let cairn = |args: &[&str]| {
        let mut c = Command::new(&b.cairn);
        c.arg("--db").arg(&db).env("CAIRN_CACHE_DIR", &b.cache).args(args).stdout(Stdio::null()).stderr(Stdio::null());
        c
    };
    let mut child =
        cairn(&["run", b.guest.to_str().unwrap(), "--run-id", &id, "--dir", &grant, "--input", &input]).spawn()?;
    let lines = |p: &Path| std::fs::read_to_string(p).map(|s| s.lines().count()).unwrap_or(0);
    let start = Instant::now();
    while lines(&log) < (steps / 2) as usize {
        if start.elapsed() > Duration::from_secs(120) {
            bail!("W4: the run made no progress");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    // SAFETY: a pid we own.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait()?;
    let committed = {
        let store = SqliteStore::open(&db, Durability::Power)?;
        let run = store.run(&id).await?.context("W4 run")?;
        store.history(run.key).await?.iter().filter(|e| e.kind == EntryKind::Step).count()
    };
    let before_resume = std::fs::read_to_string(&log)?;
    let at_kill = before_resume.lines().count();
    let t0 = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let status = cairn(&["resume", &id]).status()?;
    if !status.success() {
        bail!("W4: resume failed");
    }
    let after = std::fs::read_to_string(&log)?;
    let new_lines: Vec<(usize, u128)> = after
        .lines()
        .skip(at_kill)
        .map(|l| {
            let mut f = l.split(' ');
            (f.next().unwrap().parse().unwrap(), f.next().unwrap().parse().unwrap())
        })
        .collect();
    let first_new = new_lines.first().context("W4: no new step after resume")?.1;
    let reruns = new_lines.iter().filter(|(i, _)| *i < committed).count();
    Ok(((first_new.saturating_sub(t0)) as f64 / 1e6, reruns))
}

/// W5: build an n-step history, then replay it completely as a resume
/// would, `reps` times: per replay, engine µs per step, total ms, module
/// load ms.
async fn replay(b: &mut Bench, n: u32, reps: usize) -> Result<Vec<(f64, f64, f64)>> {
    let h = b.host("W5", Durability::Process, None).await?;
    let runs = h.create(1, &json!({"mode": "steps", "n": n}), RunStatus::Running).await?;
    let run = runs[0].clone();
    h.execute_all(runs).await?;
    let mut measured = Vec::new();
    for _ in 0..reps {
        // Make it unfinished again: the next execution replays every step.
        let running = Write::status(run.key, RunStatus::Running);
        cairn::store::commit(&*h.store, vec![running]).await?;
        let run = h.store.run(&run.id).await?.context("W5 run")?;
        let t = Instant::now();
        let _module = h.engine.load(&run.module, || Ok(h.module.bytes.clone()))?;
        let load_ms = t.elapsed().as_secs_f64() * 1000.0;
        let t = Instant::now();
        let history = h.store.history(run.key).await?;
        let history_ms = t.elapsed().as_secs_f64() * 1000.0;
        drop(history);
        let t = Instant::now();
        match h.executor.execute(&Arc::new(run)).await? {
            RunOutcome::Completed(_) => {}
            other => bail!("W5 replay did not complete: {other:?}"),
        }
        let total_ms = t.elapsed().as_secs_f64() * 1000.0;
        let engine_ms = (total_ms - load_ms - history_ms).max(0.0);
        measured.push((engine_ms * 1000.0 / n as f64, total_ms, load_ms));
    }
    let _ = std::fs::remove_file(&h.db);
    Ok(measured)
}

/// W7 in this process: park `w7_runs` runs in a long `ctx.sleep`; RSS
/// growth per parked run, and RSS before and after (KiB).
async fn w7_once(b: &mut Bench, w7_runs: usize) -> Result<(f64, u64, u64)> {
    let h = b.host("W7", Durability::Process, Some(Duration::ZERO)).await?;
    let runs = h.create(w7_runs, &json!({"mode": "park", "sleep_ms": 3_600_000}), RunStatus::Pending).await?;
    let before = rss_kib();
    let mut set = tokio::task::JoinSet::new();
    for run in runs {
        let ex = h.executor.clone();
        if std::env::var_os("CAIRN_BENCH_DEBUG").is_some() && set.is_empty() {
            let run = Arc::new(run.clone());
            let f = async { ex.execute(&run).await };
            eprintln!("W7: execute future is {} bytes", std::mem::size_of_val(&f));
        }
        set.spawn(async move { ex.execute(&Arc::new(run)).await });
    }
    let start = Instant::now();
    loop {
        // Counted in the store, not by reading every record: 100,000
        // records read here would stay in this process's RSS and count as
        // what parked runs hold.
        let counts = h.store.run_counts().await?;
        let parked = counts.iter().find(|(s, _)| *s == RunStatus::Sleeping).map_or(0, |(_, n)| *n as usize);
        if parked == w7_runs {
            break;
        }
        if start.elapsed() > Duration::from_secs(300) {
            bail!("W7: only {parked} of {w7_runs} runs parked");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = rss_kib();
    if std::env::var_os("CAIRN_BENCH_DEBUG").is_some() {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        eprintln!("W7: rss before {before} KiB, after {after} KiB, {} mappings", maps.lines().count());
        let mut big: Vec<(u64, String)> = Vec::new();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
        let mut cur = String::new();
        for l in smaps.lines() {
            if l.contains('-') && !l.starts_with(|c: char| c.is_ascii_uppercase()) {
                cur = l.to_string();
            }
            if let Some(r) = l.strip_prefix("Rss:") {
                let kb: u64 = r.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0);
                if kb > 1000 {
                    big.push((kb, cur.clone()));
                }
            }
        }
        big.sort();
        for (kb, m) in big.iter().rev().take(8) {
            eprintln!("  {kb} KiB {m}");
        }
    }
    let per_run = (after.saturating_sub(before) as f64 * 1024.0) / w7_runs as f64;
    set.abort_all();
    if std::env::var_os("CAIRN_BENCH_DEBUG").is_some() {
        while set.join_next().await.is_some() {}
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        eprintln!("W7: after aborting the tasks: rss {} KiB, {} mappings", rss_kib(), maps.lines().count());
    }
    Ok((per_run, before, after))
}

fn print_and_save(rows: &[Row], out_dir: &Path, quick: bool) -> Result<()> {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::ASCII_MARKDOWN);
    table.set_header(["id", "workload", "figure", "baseline (same run)", "ratio", "target"]);
    let mut json_rows = Vec::new();
    for r in rows {
        table.add_row([
            r.id.to_string(),
            r.workload.clone(),
            format!("{} {}", fmt(r.value), r.unit),
            r.baseline.map(|(v, u)| format!("{} {u}", fmt(v))).unwrap_or_else(|| "-".into()),
            r.ratio.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into()),
            r.target.clone(),
        ]);
        json_rows.push(json!({
            "id": r.id,
            "workload": r.workload,
            "value": r.value,
            "unit": r.unit,
            "baseline": r.baseline.map(|(v, _)| v),
            "baseline_unit": r.baseline.map(|(_, u)| u),
            "ratio": r.ratio,
            "target": r.target,
            "extra": r.extra,
        }));
    }
    println!("{table}");
    let doc = json!({
        "quick": quick,
        "date_unix": SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs(),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "results": json_rows,
    });
    let name = if quick { "results-quick.json" } else { "results.json" };
    std::fs::write(out_dir.join(name), serde_json::to_string_pretty(&doc)?)?;
    eprintln!("wrote {}", out_dir.join(name).display());
    Ok(())
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}
