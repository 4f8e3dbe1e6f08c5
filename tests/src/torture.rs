//! The kill -9 campaign (`make torture`; a short form runs in `make test`).
//!
//! Workflows of every kind (sequential steps, branches, durable sleeps,
//! signals, retries, many runs in a worker) are executed by `cairn run`,
//! `cairn resume` and `cairn worker` processes that are SIGKILLed at random
//! moments, including during the resume itself and before the run is even
//! recorded, until each finishes. Everything is checked from the side
//! effects the workflows log in a granted directory:
//! - a step (or branch) whose outcome was committed when a process died
//!   never runs again (its log lines do not grow after that kill);
//! - every step runs at least once, and the output equals an uninterrupted
//!   run's;
//! - clock and random values read by workflow code replay: the output holds
//!   the values its steps logged when they first ran.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{World, guest, text};

/// What a campaign found.
#[derive(Debug, Default)]
pub struct Report {
    /// Processes killed while they ran.
    pub kills: usize,
    /// Workflows driven to completion.
    pub workflows: usize,
    /// Committed steps or branches that ran again after a kill (must be 0).
    pub reran: usize,
    /// Steps that never ran, or outputs that differ from an uninterrupted run (must be 0).
    pub lost: usize,
    /// What went wrong, in words.
    pub problems: Vec<String>,
    pub elapsed: Duration,
}

impl Report {
    fn problem(&mut self, what: String) {
        eprintln!("torture: {what}");
        self.problems.push(what);
    }
}

/// A small xorshift generator: a campaign (or a fuzz run) is repeatable
/// from its seed.
pub struct Rng(pub u64);

impl Rng {
    #[allow(clippy::should_implement_trait)] // an endless generator, not an iterator
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
}

/// Run workflows until at least `kills` processes were killed mid-run.
pub fn campaign(kills: usize, seed: u64) -> Report {
    let started = Instant::now();
    let mut report = Report::default();
    let mut rng = Rng(seed.max(1));
    let w = World::new("torture");
    let data = w.subdir("data");
    let mut n = 0;
    while report.kills < kills {
        n += 1;
        let case = n % 7;
        match case {
            0 => steps_case(&w, &data, &mut rng, &mut report, n, 0),
            1 => steps_case(&w, &data, &mut rng, &mut report, n, 3),
            2 => branches_case(&w, &data, &mut rng, &mut report, n),
            3 => sleep_case(&w, &data, &mut rng, &mut report, n),
            4 => signals_case(&w, &data, &mut rng, &mut report, n),
            5 => retries_case(&w, &data, &mut rng, &mut report, n),
            _ => worker_case(&w, &data, &mut rng, &mut report, n),
        }
        report.workflows += 1;
        if started.elapsed() > Duration::from_secs(3600) {
            report.problem("the campaign ran for an hour; stopping".into());
            break;
        }
    }
    report.elapsed = started.elapsed();
    report
}

/// SIGKILL `child` after `delay_ms` if it still runs; true if it was killed.
fn kill_after(mut child: Child, delay_ms: u64) -> (bool, Option<i32>) {
    let deadline = Instant::now() + Duration::from_millis(delay_ms);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return (false, status.code());
        }
        if Instant::now() >= deadline {
            // SAFETY: a pid we own.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            let _ = child.wait();
            return (true, None);
        }
        std::thread::sleep(Duration::from_micros(300));
    }
}

/// Lines of a log, by their first two words ("step 3" -> 2).
fn log_counts(path: &PathBuf, prefix: &str) -> HashMap<u64, usize> {
    let mut counts = HashMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        let mut words = line.split(' ');
        if words.next() == Some(prefix)
            && let Some(i) = words.next().and_then(|w| w.parse().ok())
        {
            *counts.entry(i).or_insert(0) += 1;
        }
    }
    counts
}

/// Indexes (occurrence - 1) of the committed outcomes of step `name`.
fn committed(w: &World, id: &str, name: &str) -> Vec<u64> {
    let Some(show) = w.try_show(id) else { return Vec::new() };
    let mut list: Vec<u64> = show["history"]
        .as_array()
        .map(|h| {
            h.iter()
                // Step outcomes only: a spawn entry records that a branch
                // started; the branch's outcome is in `branches` below.
                .filter(|e| e["kind"] == "step" && e["name"] == name)
                .filter(|e| e["status"] == "completed" || e["status"] == "error")
                .map(|e| e["occurrence"].as_u64().unwrap_or(1) - 1)
                .collect()
        })
        .unwrap_or_default();
    for b in show["branches"].as_array().into_iter().flatten() {
        if b["name"] == name && (b["status"] == "completed" || b["status"] == "error") {
            list.push(b["occurrence"].as_u64().unwrap_or(1) - 1);
        }
    }
    list
}

/// What was committed, and logged, when a process died.
struct Snapshot {
    committed: Vec<u64>,
    counts: HashMap<u64, usize>,
}

/// Drive run `id` to its end: start it with `start` (the run's arguments
/// after `run`), resume it after every kill. `max_delay` bounds how long a
/// process lives before the kill; `between` runs after each kill (to send
/// signals); `snap` notes what is committed and logged after each kill.
#[allow(clippy::too_many_arguments)]
fn drive(
    w: &World,
    rng: &mut Rng,
    report: &mut Report,
    id: &str,
    start: &[&str],
    max_delay: u64,
    mut between: impl FnMut(&World, usize),
    mut snap: impl FnMut(&World) -> Option<Snapshot>,
    snapshots: &mut Vec<Snapshot>,
) -> Option<Value> {
    let mut round = 0;
    loop {
        round += 1;
        if round > 500 {
            report.problem(format!("run {id} did not finish in 500 rounds"));
            return None;
        }
        let recorded = w.try_show(id).is_some();
        let args: Vec<&str> = if recorded { vec!["resume", id] } else { start.to_vec() };
        let out_path = w.dir.join(format!("{id}.out"));
        let err_path = w.dir.join(format!("{id}.err"));
        let child = w
            .cmd(&args)
            .stdout(std::fs::File::create(&out_path).unwrap())
            .stderr(std::fs::File::create(&err_path).unwrap())
            .spawn()
            .expect("cairn starts");
        // The first rounds die young (often before the run is recorded),
        // later ones live longer, so every run also gets to its end.
        let delay = if round <= 2 { rng.below(6) } else { rng.below(max_delay + round as u64 * 5) };
        let (killed, code) = kill_after(child, delay);
        if killed {
            report.kills += 1;
            between(w, round);
            if let Some(s) = snap(w) {
                snapshots.push(s);
            }
            continue;
        }
        let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
        match code {
            Some(0) => return serde_json::from_str(stdout.trim()).ok(),
            other => {
                let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
                // Another process still held it, or it was being created: again.
                if other == Some(4) || stderr.contains("already exists") {
                    continue;
                }
                report.problem(format!("run {id} exited {other:?}: {}", text(stderr.as_bytes())));
                return None;
            }
        }
    }
}

/// No committed step ran again after the kill that saw it committed, and
/// every step of `all` ran.
fn check_steps(report: &mut Report, id: &str, snapshots: &[Snapshot], last: &HashMap<u64, usize>, all: u64) {
    for s in snapshots {
        for i in &s.committed {
            let (then, now) = (s.counts.get(i).copied().unwrap_or(0), last.get(i).copied().unwrap_or(0));
            if now != then {
                report.reran += 1;
                report.problem(format!("run {id}: committed step {i} ran again ({then} -> {now} times)"));
            }
        }
    }
    for i in 0..all {
        if last.get(&i).copied().unwrap_or(0) == 0 {
            report.lost += 1;
            report.problem(format!("run {id}: step {i} never ran"));
        }
    }
}

fn steps_case(w: &World, data: &std::path::Path, rng: &mut Rng, report: &mut Report, n: usize, work_ms: u64) {
    let id = format!("steps{n}");
    let log = data.join(format!("{id}.txt"));
    let steps = 12 + rng.below(12);
    let grant = format!("{}::/data", data.display());
    let input = json!({"steps": steps, "work_ms": work_ms, "log": format!("/data/{id}.txt"), "observe_every": 3});
    let input = input.to_string();
    let wasm = guest("crashtest");
    let start = ["run", wasm.to_str().unwrap(), "--run-id", &id, "--dir", &grant, "--input", &input];
    let mut snapshots = Vec::new();
    let snap = |w: &World| Some(Snapshot { committed: committed(w, &id, "work"), counts: log_counts(&log, "step") });
    let Some(out) = drive(w, rng, report, &id, &start, 40, |_, _| {}, snap, &mut snapshots) else { return };
    let last = log_counts(&log, "step");
    check_steps(report, &id, &snapshots, &last, steps);
    if out["sum"] != (0..steps).map(|i| i * i).sum::<u64>() {
        report.lost += 1;
        report.problem(format!("run {id}: output {out} is not an uninterrupted run's"));
    }
    // Clocks and randomness replay: the output holds what the observe steps
    // logged the first time they ran (committed, so logged once).
    let logged: HashMap<u64, Vec<u64>> = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("obs "))
        .map(|l| l.split(' ').map(|x| x.parse().unwrap()).collect::<Vec<u64>>())
        .map(|v| (v[0], v[1..].to_vec()))
        .collect();
    for o in out["observed"].as_array().into_iter().flatten() {
        let v: Vec<u64> = o.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
        if logged.get(&v[0]) != Some(&v[1..].to_vec()) {
            report.lost += 1;
            report.problem(format!("run {id}: observation {v:?} did not replay (logged {:?})", logged.get(&v[0])));
        }
    }
}

fn branches_case(w: &World, data: &std::path::Path, rng: &mut Rng, report: &mut Report, n: usize) {
    let id = format!("branches{n}");
    let log = data.join(format!("{id}.txt"));
    let count = 4 + rng.below(5);
    let grant = format!("{}::/data", data.display());
    let input = json!({"n": count, "sleep_ms": 15, "flat": true, "log": format!("/data/{id}.txt")}).to_string();
    let wasm = guest("branches");
    let start = ["run", wasm.to_str().unwrap(), "--run-id", &id, "--dir", &grant, "--input", &input];
    let mut snapshots = Vec::new();
    let snap = |w: &World| Some(Snapshot { committed: committed(w, &id, "task"), counts: log_counts(&log, "done") });
    let Some(out) = drive(w, rng, report, &id, &start, 60, |_, _| {}, snap, &mut snapshots) else { return };
    check_steps(report, &id, &snapshots, &log_counts(&log, "done"), count);
    let want: Vec<u64> = (0..count).map(|i| 1000 + i).collect();
    if out["values"] != json!(want) {
        report.lost += 1;
        report.problem(format!("run {id}: output {out}, expected values {want:?}"));
    }
}

fn sleep_case(w: &World, data: &std::path::Path, rng: &mut Rng, report: &mut Report, n: usize) {
    let id = format!("sleep{n}");
    let log = data.join(format!("{id}.txt"));
    let grant = format!("{}::/data", data.display());
    let mode = if n.is_multiple_of(2) { "ctx_sleep" } else { "std_sleep" };
    let input = json!({"mode": mode, "sleep_ms": 120, "log": format!("/data/{id}.txt")}).to_string();
    let wasm = guest("timers");
    let start = ["run", wasm.to_str().unwrap(), "--run-id", &id, "--dir", &grant, "--input", &input];
    let mut snapshots = Vec::new();
    let snap = |w: &World| {
        let mut committed = Vec::new();
        for (i, name) in ["before", "after"].iter().enumerate() {
            if !self::committed(w, &id, name).is_empty() {
                committed.push(i as u64);
            }
        }
        Some(Snapshot { committed, counts: words(&log) })
    };
    let Some(out) = drive(w, rng, report, &id, &start, 80, |_, _| {}, snap, &mut snapshots) else { return };
    check_steps(report, &id, &snapshots, &words(&log), 2);
    let (before, after) = (out["before"].as_u64().unwrap_or(0), out["after"].as_u64().unwrap_or(0));
    if after < before + 120 {
        report.lost += 1;
        report.problem(format!("run {id}: the durable sleep did not last: {out}"));
    }

    /// "before" and "after" log lines, as steps 0 and 1.
    fn words(log: &PathBuf) -> HashMap<u64, usize> {
        let mut counts = HashMap::new();
        for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
            let i = match line {
                "before" => 0,
                "after" => 1,
                _ => continue,
            };
            *counts.entry(i).or_insert(0) += 1;
        }
        counts
    }
}

fn signals_case(w: &World, data: &std::path::Path, rng: &mut Rng, report: &mut Report, n: usize) {
    let id = format!("signals{n}");
    let grant = format!("{}::/data", data.display());
    let names = ["a", "b", "c"];
    let waits: Vec<Value> = names.iter().map(|s| json!({"name": s})).collect();
    let input = json!({"waits": waits, "log": format!("/data/{id}.txt")}).to_string();
    let wasm = guest("signals");
    let start = ["run", wasm.to_str().unwrap(), "--run-id", &id, "--dir", &grant, "--input", &input];
    let mut sent = 0;
    // Signals go out between kills, whenever the run exists.
    let between = |w: &World, _round: usize| {
        if sent < names.len() && w.try_show(&id).is_some() {
            let payload = json!({"n": sent}).to_string();
            if w.run(&["signal", &id, names[sent], &payload]).status.success() {
                sent += 1;
            }
        }
    };
    let mut snapshots = Vec::new();
    let Some(got) = drive(w, rng, report, &id, &start, 40, between, |_| None, &mut snapshots) else { return };
    // Each signal received once, in the order waited for.
    let want: Vec<Value> = (0..names.len()).map(|i| json!({"n": i})).collect();
    if got != json!(want) {
        report.lost += 1;
        report.problem(format!("run {id}: received {got}, sent {want:?}"));
    }
}

fn retries_case(w: &World, data: &std::path::Path, rng: &mut Rng, report: &mut Report, n: usize) {
    let id = format!("retries{n}");
    let log = data.join(format!("{id}.txt"));
    let grant = format!("{}::/data", data.display());
    let mode = if n.is_multiple_of(2) { "flaky" } else { "flaky_panic" };
    let input = json!({"mode": mode, "fail": 2, "log": format!("/data/{id}.txt")}).to_string();
    let wasm = guest("timers");
    let start = ["run", wasm.to_str().unwrap(), "--run-id", &id, "--dir", &grant, "--input", &input];
    let mut snapshots = Vec::new();
    // An attempt's failure, once committed, is not attempted again.
    let snap = |w: &World| {
        let show = w.try_show(&id)?;
        let committed = show["history"]
            .as_array()?
            .iter()
            .filter(|e| e["name"] == "flaky")
            .map(|e| e["attempt"].as_u64().unwrap_or(0))
            .collect();
        Some(Snapshot { committed, counts: log_counts(&log, "attempt") })
    };
    let Some(out) = drive(w, rng, report, &id, &start, 400, |_, _| {}, snap, &mut snapshots) else { return };
    check_steps(report, &id, &snapshots, &log_counts(&log, "attempt"), 0);
    if out["succeeded_on_attempt"] != 3 {
        report.lost += 1;
        report.problem(format!("run {id}: {out}, expected success on attempt 3"));
    }
}

fn worker_case(w: &World, data: &std::path::Path, rng: &mut Rng, report: &mut Report, n: usize) {
    let grant = format!("{}::/data", data.display());
    let wasm = guest("crashtest");
    let runs = 8;
    let ids: Vec<String> = (0..runs).map(|r| format!("worker{n}-{r}")).collect();
    for id in &ids {
        let input = json!({"steps": 10, "work_ms": 1, "log": format!("/data/{id}.txt"), "observe_every": 5});
        let out =
            w.run(&["start", wasm.to_str().unwrap(), "--run-id", id, "--dir", &grant, "--input", &input.to_string()]);
        if !out.status.success() {
            report.problem(format!("start {id}: {}", text(&out.stderr)));
            return;
        }
    }
    let mut snapshots: Vec<(String, Snapshot)> = Vec::new();
    let done = |w: &World| {
        w.runs()
            .iter()
            .filter(|r| ids.contains(&r["id"].as_str().unwrap_or("").to_string()) && r["status"] == "completed")
            .count()
    };
    let mut round = 0;
    while done(w) < runs {
        round += 1;
        if round > 200 {
            report.problem(format!("worker case {n} did not finish"));
            return;
        }
        let child =
            w.cmd(&["worker", "--concurrency", "4"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let (killed, _) = kill_after(child, 20 + rng.below(60 + round * 10));
        if killed {
            report.kills += 1;
            for id in &ids {
                let log = data.join(format!("{id}.txt"));
                snapshots.push((
                    id.clone(),
                    Snapshot { committed: committed(w, id, "work"), counts: log_counts(&log, "step") },
                ));
            }
        }
    }
    for id in &ids {
        let log = data.join(format!("{id}.txt"));
        let mine: Vec<Snapshot> = snapshots
            .iter()
            .filter(|(i, _)| i == id)
            .map(|(_, s)| Snapshot { committed: s.committed.clone(), counts: s.counts.clone() })
            .collect();
        check_steps(report, id, &mine, &log_counts(&log, "step"), 10);
    }
}
