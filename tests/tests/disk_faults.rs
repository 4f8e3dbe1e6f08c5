//! A failing disk, simulated by the fault-injecting SQLite VFS of the
//! `cairn` binary (`CAIRN_TEST_FAULTS`, see `host/src/store/sqlite/faults.rs`):
//! a commit that cannot be written is not reported committed, no committed
//! step is lost or run again, the database stays whole, and once the fault
//! is gone the run resumes to the output of an uninterrupted one.

use std::collections::HashMap;
use std::process::Output;

use cairn_e2e::{World, guest, json_stdout, text};
use rusqlite::Connection;

const STEPS: u64 = 40;

struct Faulted {
    w: World,
    grant: String,
}

impl Faulted {
    /// A world whose database exists already (created without faults).
    fn new(name: &str) -> Faulted {
        let w = World::new(name);
        let data = w.subdir("data");
        let grant = format!("{}::/data", data.display());
        let f = Faulted { w, grant };
        let out = f.run("warm", 1, None);
        assert!(out.status.success(), "{}", text(&out.stderr));
        f
    }

    fn input(id: &str, steps: u64) -> String {
        format!(r#"{{"steps":{steps},"log":"/data/{id}.txt","observe_every":10}}"#)
    }

    fn run(&self, id: &str, steps: u64, fault: Option<&str>) -> Output {
        let wasm = guest("crashtest");
        let input = Self::input(id, steps);
        let mut cmd =
            self.w.cmd(&["run", wasm.to_str().unwrap(), "--run-id", id, "--dir", &self.grant, "--input", &input]);
        if let Some(fault) = fault {
            cmd.env("CAIRN_TEST_FAULTS", fault);
        }
        cmd.output().unwrap()
    }

    /// How often each step's closure ran, from its side effects.
    fn step_runs(&self, id: &str) -> HashMap<u64, usize> {
        let mut runs = HashMap::new();
        for line in self.w.read(&format!("data/{id}.txt")).lines().filter(|l| l.starts_with("step ")) {
            *runs.entry(line.split(' ').nth(1).unwrap().parse().unwrap()).or_insert(0) += 1;
        }
        runs
    }

    fn committed_steps(&self, id: &str) -> usize {
        let show = self.w.show(id);
        show["history"].as_array().unwrap().iter().filter(|e| e["name"] == "work" && e["status"] == "completed").count()
    }

    fn integrity(&self) -> String {
        Connection::open(&self.w.db).unwrap().query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap()
    }

    /// After the fault: the database is whole, the run unfinished, no
    /// committed step lost; a resume without the fault finishes it with the
    /// uninterrupted output, and only the step in flight ran twice.
    fn check_recovery(&self, id: &str) {
        assert_eq!(self.integrity(), "ok");
        let show = self.w.show(id);
        assert_eq!(show["status"], "running", "unfinished and resumable, not failed: {}", show["error"]);
        let committed = self.committed_steps(id);
        assert!(committed < STEPS as usize, "the fault came mid-run");
        let before = self.step_runs(id);
        for i in 0..committed as u64 {
            assert_eq!(before.get(&i), Some(&1), "committed step {i} ran once");
        }
        let out = json_stdout(&self.w.run(&["resume", id]));
        assert_eq!(out["sum"], (0..STEPS).map(|i| i * i).sum::<u64>(), "the uninterrupted output");
        let after = self.step_runs(id);
        assert_eq!(after.len(), STEPS as usize, "every step ran");
        let twice: Vec<_> = after.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.len() <= 1 && twice.iter().all(|(_, n)| **n == 2),
            "only the step in flight ran again: {twice:?}"
        );
        for i in 0..committed as u64 {
            assert_eq!(after.get(&i), Some(&1), "committed step {i} did not run again");
        }
        assert_eq!(self.integrity(), "ok");
    }
}

fn assert_stopped(out: &Output, needle: &str) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(needle), "missing {needle:?} in: {err}");
}

#[test]
fn a_full_disk_fails_the_commit_not_the_run() {
    let f = Faulted::new("disk-full");
    let out = f.run("full", STEPS, Some("full:60"));
    assert_stopped(&out, "full");
    f.check_recovery("full");
}

#[test]
fn a_short_write_fails_the_commit_not_the_run() {
    let f = Faulted::new("short-write");
    let out = f.run("short", STEPS, Some("short:60"));
    assert_stopped(&out, "full");
    f.check_recovery("short");
}

#[test]
fn a_read_only_file_fails_the_commit_not_the_run() {
    let f = Faulted::new("read-only");
    let out = f.run("ro", STEPS, Some("readonly:60"));
    assert_stopped(&out, "readonly");
    f.check_recovery("ro");
}

#[test]
fn a_failed_fsync_stops_the_process_and_is_not_retried() {
    let f = Faulted::new("fsync");
    let out = f.run("sync", STEPS, Some("fsync:8"));
    assert_stopped(&out, "could not be flushed to disk (fsync failed)");
    let err = text(&out.stderr);
    assert!(err.contains(&f.w.db.display().to_string()), "the error names the database: {err}");
    f.check_recovery("sync");
}

/// In a worker, a commit that fails on a short write costs that run only
/// the failed commit: the others complete, and the run whose commit failed
/// is taken up again from its history and completes too.
#[test]
fn other_runs_go_on_after_a_failed_commit() {
    let f = Faulted::new("worker-fault");
    let wasm = guest("crashtest");
    for n in 0..6 {
        let input = Faulted::input(&format!("w{n}"), 10);
        let id = format!("w{n}");
        let out = f.w.run(&["start", wasm.to_str().unwrap(), "--run-id", &id, "--dir", &f.grant, "--input", &input]);
        assert!(out.status.success());
    }
    // Two runs at a time: a failed commit (one transaction, shared by the
    // items of the runs committing together) stops at most those two.
    let mut worker = f.w.cmd(&["worker", "--concurrency", "2"]);
    worker.env("CAIRN_TEST_FAULTS", "short:30").stdout(std::process::Stdio::null());
    let log = f.w.dir.join("worker.stderr");
    let mut worker = worker.stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
    let taken_up = || std::fs::read_to_string(&log).unwrap_or_default().matches("taken up again").count();
    let completed = || f.w.runs().iter().filter(|r| r["id"] != "warm" && r["status"] == "completed").count();
    cairn_e2e::wait_until("every run to complete", std::time::Duration::from_secs(60), || completed() == 6);
    worker.kill().ok();
    worker.wait().ok();
    assert_eq!(f.integrity(), "ok");
    assert!(
        (1..=2).contains(&taken_up()),
        "the failed commit stopped one or two runs: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let unfinished: Vec<String> =
        f.w.runs()
            .iter()
            .filter(|r| r["status"] != "completed")
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect();
    for id in unfinished {
        assert!(json_stdout(&f.w.run(&["resume", &id]))["sum"].is_number());
    }
}
