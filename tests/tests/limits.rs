//! Sandbox limits and failure paths: runaway guests are stopped with a clear
//! error, failures are recorded with their history, and the host and the
//! database stay healthy.

use std::process::Output;
use std::time::{Duration, Instant};

use cairn_e2e::{World, guest, json_stdout, text};
use serde_json::Value;

fn misbehave(w: &World, id: &str, mode: &str, extra: &[&str]) -> Output {
    let wasm = guest("misbehave");
    let input = format!(r#"{{"mode":"{mode}"}}"#);
    let mut args = vec!["run", wasm.to_str().unwrap(), "--run-id", id, "--input", &input];
    args.extend_from_slice(extra);
    let mut child =
        w.cmd(&args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // A watchdog, not a speed check: a limit that never fires must fail the
    // test instead of hanging it.
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(90) {
            child.kill().ok();
            panic!("mode {mode}: the host did not stop the guest");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn assert_failed(out: &Output, needles: &[&str]) -> String {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "expected a failed run; stderr: {err}");
    assert!(out.stdout.is_empty(), "no output on failure");
    for n in needles {
        assert!(err.contains(n), "missing {n:?} in: {err}");
    }
    err
}

fn history(w: &World, id: &str) -> Vec<Value> {
    w.show(id)["history"].as_array().unwrap().iter().filter(|e| e["kind"] == "step").cloned().collect()
}

#[test]
fn runaway_cpu_is_stopped_outside_and_inside_steps() {
    let w = World::new("cpu");
    assert_failed(&misbehave(&w, "loop", "loop", &["--max-cpu", "0.5"]), &["CPU limit", "--max-cpu"]);
    assert_failed(
        &misbehave(&w, "loop-step", "loop_in_step", &["--max-cpu", "0.5"]),
        &["CPU limit", "step \"spin\" #1"],
    );
    let steps = history(&w, "loop-step");
    assert_eq!(steps[0]["name"], "before");
    assert_eq!(steps[0]["status"], "completed");
    assert_eq!(steps[1]["name"], "spin");
    assert_eq!(steps[1]["status"], "error", "one attempt allowed: its failure is the step's outcome");
    assert!(steps[1]["error"].as_str().unwrap().contains("CPU limit"));
}

#[test]
fn memory_bombs_are_stopped_outside_and_inside_steps() {
    let w = World::new("memory");
    assert_failed(&misbehave(&w, "alloc", "alloc", &["--max-memory", "32"]), &["memory limit", "--max-memory"]);
    assert_failed(
        &misbehave(&w, "alloc-step", "alloc_in_step", &["--max-memory", "32"]),
        &["memory limit", "step \"hog\""],
    );
    let runs = w.runs();
    assert!(runs.iter().all(|r| r["status"] == "failed"), "{runs:?}");
    // The host is healthy: the next run in the same database works.
    let out = json_stdout(&misbehave(&w, "fine", "ok", &["--max-memory", "32"]));
    assert_eq!(out, "survived with 2");
}

#[test]
fn panics_errors_and_exits_fail_the_run_with_their_message() {
    let w = World::new("failures");
    assert_failed(&misbehave(&w, "p-step", "panic_in_step", &[]), &["boom in a step", "step \"explode\" #1 attempt 1"]);
    let steps = history(&w, "p-step");
    assert_eq!(steps.last().unwrap()["status"], "error");
    assert_eq!(steps.last().unwrap()["attempt"], 1);
    assert!(steps.last().unwrap()["error"].as_str().unwrap().contains("boom in a step"));

    assert_failed(&misbehave(&w, "p-flow", "panic", &[]), &["boom outside a step"]);
    assert_failed(&misbehave(&w, "err", "err", &[]), &["the workflow gave up"]);
    assert_failed(&misbehave(&w, "decline", "step_err", &[]), &["card declined"]);
    let steps = history(&w, "decline");
    assert_eq!(steps.last().unwrap()["status"], "error", "a step's Err is its recorded outcome");
    assert_eq!(steps.last().unwrap()["error"], "card declined");
    assert_failed(&misbehave(&w, "exit", "exit", &[]), &["exited with code 3"]);

    // Failed runs keep their history and their error; resume reports it.
    let show = w.show("p-step");
    assert_eq!(show["status"], "failed");
    assert!(show["error"].as_str().unwrap().contains("boom in a step"));
    let out = w.run(&["resume", "p-step"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("boom in a step"));
}

#[test]
fn the_sandbox_grants_nothing_by_default() {
    let w = World::new("sandbox");
    let out = json_stdout(&misbehave(&w, "bare", "sandbox", &[]));
    let report: Value = serde_json::from_str(out.as_str().unwrap()).unwrap();
    assert_eq!(report["env"], serde_json::json!([]));
    assert_eq!(report["args"], serde_json::json!([]));
    assert_eq!(report["etc_passwd"], false);
    assert_eq!(report["root_dir"], false);
    assert_eq!(report["stdin"], "");

    let dir = w.subdir("granted");
    let grant = format!("{}::/", dir.display());
    let out = json_stdout(&misbehave(&w, "granted", "sandbox", &["--env", "GREETING=hi", "--dir", &grant]));
    let report: Value = serde_json::from_str(out.as_str().unwrap()).unwrap();
    assert_eq!(report["env"], serde_json::json!(["GREETING=hi"]));
    assert_eq!(report["root_dir"], true);
}
