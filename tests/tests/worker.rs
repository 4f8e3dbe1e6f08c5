//! `cairn start` and `cairn worker`: many runs at once, crash and restart,
//! graceful stop, cancellation.

use std::collections::HashMap;
use std::time::Duration;

use cairn_e2e::{World, guest, kill9, text, wait_until};

fn start(w: &World, wasm: &str, grant: &str, input: &str) -> String {
    let out = w.run(&["start", wasm, "--dir", grant, "--input", input]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();
    assert!(!id.is_empty() && !id.contains('\n'), "start prints the run id alone: {id:?}");
    id
}

fn statuses(w: &World) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in w.runs() {
        *m.entry(r["status"].as_str().unwrap().to_string()).or_insert(0) += 1;
    }
    m
}

#[test]
fn a_killed_worker_restarts_and_completes_every_run_without_rerunning_committed_steps() {
    const RUNS: usize = 500;
    let w = World::new("worker");
    let data = w.subdir("data");
    let wasm = guest("crashtest");
    let wasm = wasm.to_str().unwrap();
    let grant = format!("{}::/data", data.display());
    for n in 0..RUNS {
        start(&w, wasm, &grant, &format!(r#"{{"steps":10,"work_ms":2,"log":"/data/{n}.txt","observe_every":100}}"#));
    }
    assert_eq!(statuses(&w).get("pending"), Some(&RUNS));

    let mut worker = w.spawn(&["worker", "--concurrency", "64"], "worker1");
    wait_until("some runs to complete", Duration::from_secs(120), || {
        statuses(&w).get("completed").copied().unwrap_or(0) >= 60
    });
    kill9(&mut worker);
    let mid = statuses(&w);
    let done_at_kill = mid.get("completed").copied().unwrap_or(0);
    assert!(done_at_kill < RUNS, "the worker was killed mid-way: {mid:?}");

    let mut worker = w.spawn(&["worker", "--concurrency", "64"], "worker2");
    wait_until("every run to complete", Duration::from_secs(300), || {
        statuses(&w).get("completed").copied().unwrap_or(0) == RUNS
    });
    worker.kill().ok();
    worker.wait().ok();

    // Every step of every run ran; only steps in flight at the kill (at
    // most one per live instance) ran twice.
    let mut twice = 0;
    for n in 0..RUNS {
        let log = std::fs::read_to_string(data.join(format!("{n}.txt"))).unwrap();
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for line in log.lines().filter(|l| l.starts_with("step ")) {
            *seen.entry(line).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 10, "run {n}: {log}");
        let extra: usize = seen.values().map(|c| c - 1).sum();
        assert!(extra <= 1, "run {n} ran more than its in-flight step again: {log}");
        twice += extra;
    }
    assert!(twice <= 64, "{twice} steps ran twice; at most 64 were in flight");
    // The history holds each step once.
    let runs = w.runs();
    assert!(runs.iter().all(|r| r["steps"] == 11), "10 work steps + 1 observe step each");
}

#[test]
fn sigterm_stops_the_worker_gracefully_and_cancelled_runs_stay_cancelled() {
    let w = World::new("worker-stop");
    let data = w.subdir("data");
    let grant = format!("{}::/data", data.display());
    let signals = guest("signals");
    let crash = guest("crashtest");

    // A run that waits for a signal forever, and some slow runs.
    let waiting = start(&w, signals.to_str().unwrap(), &grant, r#"{"waits":[{"name":"never"}]}"#);
    let pending_cancel = start(&w, signals.to_str().unwrap(), &grant, r#"{"waits":[{"name":"never"}]}"#);
    // Cancelled before any worker runs it.
    assert!(w.run(&["cancel", &pending_cancel]).status.success());
    let slow: Vec<String> = (0..4)
        .map(|n| {
            start(
                &w,
                crash.to_str().unwrap(),
                &grant,
                &format!(r#"{{"steps":40,"work_ms":10,"log":"/data/s{n}.txt"}}"#),
            )
        })
        .collect();

    let mut worker = w.spawn(&["--park-after", "0.5", "worker", "--concurrency", "2"], "w1");
    wait_until("the waiting run to park", Duration::from_secs(60), || {
        w.try_show(&waiting).is_some_and(|s| s["status"] == "waiting")
    });
    assert!(w.run(&["cancel", &waiting]).status.success());
    wait_until("the cancel to land", Duration::from_secs(30), || w.show(&waiting)["status"] == "cancelled");

    // SIGTERM: live instances finish or park, then the worker exits 0.
    unsafe { libc::kill(worker.id() as i32, libc::SIGTERM) };
    let status = worker.wait().unwrap();
    assert!(status.success(), "worker exit: {status:?}; {}", w.read("w1.stderr"));
    assert!(w.read("w1.stderr").contains("stopped"));

    // A new worker completes the rest and leaves the cancelled runs alone.
    let mut worker = w.spawn(&["worker"], "w2");
    wait_until("the slow runs to complete", Duration::from_secs(120), || {
        slow.iter().all(|id| w.show(id)["status"] == "completed")
    });
    unsafe { libc::kill(worker.id() as i32, libc::SIGTERM) };
    assert!(worker.wait().unwrap().success());
    assert_eq!(w.show(&waiting)["status"], "cancelled");
    assert_eq!(w.show(&pending_cancel)["status"], "cancelled");
    assert!(w.show(&pending_cancel)["history"].as_array().unwrap().is_empty(), "never executed");
    for n in 0..4 {
        let log = std::fs::read_to_string(data.join(format!("s{n}.txt"))).unwrap();
        assert_eq!(log.lines().filter(|l| l.starts_with("step ")).count(), 40, "graceful stop re-ran nothing");
    }
}

/// A run that becomes claimable without any event (the `cairn run` holding
/// it killed: on SQLite its lock goes with the process) is found by the
/// sweep about a second later, also while the worker's own runs keep ending
/// more often than that: a run's end must not push the sweep back.
#[test]
fn an_orphaned_run_is_swept_up_while_other_runs_keep_ending() {
    let w = World::new("sweep");
    let wasm = guest("benchflow");
    let wasm = wasm.to_str().unwrap();
    let mut worker = w.spawn(&["worker", "--concurrency", "64"], "worker");
    // Runs that end one every 200 ms or so, from about 1 s on for 12 s.
    for i in 0..60 {
        let input = format!(r#"{{"mode":"paced","n":1,"sleep_ms":{}}}"#, 1000 + 200 * i);
        let out = w.run(&["start", wasm, "--input", &input]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let input = r#"{"mode":"paced","n":100000,"sleep_ms":10}"#;
    let mut held = w.spawn(&["run", wasm, "--run-id", "orphan", "--input", input], "orphan");
    let steps = |w: &World| w.try_show("orphan").and_then(|s| s["steps"].as_u64()).unwrap_or(0);
    wait_until("the orphan's first steps", Duration::from_secs(30), || steps(&w) >= 3);
    // Killed once the worker's runs have begun to end.
    wait_until("runs ending", Duration::from_secs(30), || statuses(&w).get("completed") >= Some(&3));
    kill9(&mut held);
    let killed = std::time::Instant::now();
    let committed = steps(&w);
    wait_until("the worker to take the orphan up", Duration::from_secs(60), || steps(&w) > committed + 2);
    // A sweep a second; before, every run's end restarted it, and the
    // orphan waited for the stream of ends to stop (over 10 s).
    assert!(killed.elapsed() < Duration::from_secs(7), "taken up after {:?}", killed.elapsed());
    kill9(&mut worker);
}
