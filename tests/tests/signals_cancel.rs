//! Signals (external events) and cancellation.

use std::time::{Duration, Instant};

use cairn_e2e::{World, count_lines, guest, json_stdout, kill9, text, wait_until};
use serde_json::{Value, json};

fn log_has(w: &World, line: &str) -> bool {
    w.read("data/log.txt").lines().any(|l| l == line)
}

#[test]
fn signals_are_kept_delivered_once_and_survive_a_crash() {
    let w = World::new("signals");
    let data = w.subdir("data");
    let wasm = guest("signals");
    let grant = format!("{}::/data", data.display());
    let input = r#"{"waits":[{"name":"first"},{"name":"second"},{"name":"third"},{"name":"fourth","timeout_ms":300}],"log":"/data/log.txt"}"#;
    let mut child =
        w.spawn(&["run", wasm.to_str().unwrap(), "--run-id", "sig", "--dir", &grant, "--input", input], "sig");
    wait_until("the first wait", Duration::from_secs(30), || log_has(&w, "waiting 0 first"));

    // Sent before the run waits for it: kept.
    assert!(w.run(&["signal", "sig", "second", r#"{"n":2}"#]).status.success());
    // Sent while it waits.
    assert!(w.run(&["signal", "sig", "first", r#"{"n":1}"#]).status.success());
    wait_until("the third wait", Duration::from_secs(30), || {
        log_has(&w, "waiting 2 third")
            && w.show("sig")["history"].as_array().unwrap().iter().filter(|e| e["name"] == "about_to_wait").count() == 3
    });
    kill9(&mut child);

    // Sent while no process executes the run: kept for the resume.
    assert!(w.run(&["signal", "sig", "third", r#"{"n":3}"#]).status.success());
    // One more "first": nobody waits for a second "first", so it stays undelivered.
    assert!(w.run(&["signal", "sig", "first", r#"{"n":99}"#]).status.success());
    let out = json_stdout(&w.run(&["resume", "sig"]));
    assert_eq!(out, json!([{"n": 1}, {"n": 2}, {"n": 3}, "timed out"]));

    let show = w.show("sig");
    let signals: Vec<(String, Value)> = show["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "signal")
        .map(|e| (e["name"].as_str().unwrap().to_string(), e["output"].clone()))
        .collect();
    assert_eq!(
        signals,
        [
            ("first".to_string(), json!({"n": 1})),
            ("second".to_string(), json!({"n": 2})),
            ("third".to_string(), json!({"n": 3})),
            ("fourth".to_string(), json!({"timed_out": true})),
        ],
        "each signal received exactly once, in the order waited for"
    );
    assert_eq!(count_lines(&data.join("log.txt")), 4, "no step ran twice");

    // Signals to finished or unknown runs are refused.
    let out = w.run(&["signal", "sig", "first"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("completed"));
    assert!(!w.run(&["signal", "nope", "first"]).status.success());
    assert_eq!(w.run(&["signal", "sig", "x", "{bad"]).status.code(), Some(2));
}

#[test]
fn a_parked_waiting_run_wakes_when_its_signal_comes() {
    let w = World::new("signal-park");
    let wasm = guest("signals");
    let input = r#"{"waits":[{"name":"go"}]}"#;
    let mut child =
        w.spawn(&["--park-after", "0.2", "run", wasm.to_str().unwrap(), "--run-id", "p", "--input", input], "p");
    wait_until("the run to park", Duration::from_secs(30), || {
        w.runs().first().is_some_and(|r| r["status"] == "waiting")
    });
    let sent = Instant::now();
    assert!(w.run(&["signal", "p", "go", "42"]).status.success());
    assert!(child.wait().unwrap().success());
    // Noticed by polling, well within a couple of seconds (a generous bound).
    assert!(sent.elapsed() < Duration::from_secs(3), "took {:?}", sent.elapsed());
    assert_eq!(w.read("p.stdout").trim(), "[42]");
}

#[test]
fn cancel_stops_a_live_run_and_a_dead_one_and_keeps_history() {
    let w = World::new("cancel");
    let wasm = guest("signals");
    let input = r#"{"waits":[{"name":"never"}]}"#;

    // Executed by another process, waiting in the host.
    let mut child = w.spawn(&["run", wasm.to_str().unwrap(), "--run-id", "live", "--input", input], "live");
    wait_until("the wait", Duration::from_secs(30), || {
        w.try_show("live").is_some_and(|s| s["history"].as_array().unwrap().iter().any(|e| e["kind"] == "step"))
    });
    let out = w.run(&["cancel", "live"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1));
    assert!(w.read("live.stderr").contains("cancelled"));
    let show = w.show("live");
    assert_eq!(show["status"], "cancelled");
    assert!(!show["history"].as_array().unwrap().is_empty(), "history kept");

    // A busy run (CPU work between host calls) is stopped too.
    let data = w.subdir("data");
    let grant = format!("{}::/data", data.display());
    let busy = r#"{"steps":100000,"work_ms":20,"log":"/data/log.txt"}"#;
    let crash = guest("crashtest");
    let mut child =
        w.spawn(&["run", crash.to_str().unwrap(), "--run-id", "busy", "--dir", &grant, "--input", busy], "busy");
    wait_until("progress", Duration::from_secs(30), || count_lines(&data.join("log.txt")) >= 3);
    assert!(w.run(&["cancel", "busy"]).status.success());
    assert_eq!(child.wait().unwrap().code(), Some(1));
    assert_eq!(w.show("busy")["status"], "cancelled");

    // Nobody executes it (the process was killed): cancelled on the spot.
    let mut child = w.spawn(&["run", wasm.to_str().unwrap(), "--run-id", "dead", "--input", input], "dead");
    wait_until("the wait", Duration::from_secs(30), || {
        w.try_show("dead").is_some_and(|s| s["history"].as_array().unwrap().iter().any(|e| e["kind"] == "step"))
    });
    kill9(&mut child);
    assert!(w.run(&["cancel", "dead"]).status.success());
    assert_eq!(w.show("dead")["status"], "cancelled");
    let out = w.run(&["resume", "dead"]);
    assert_eq!(out.status.code(), Some(1), "a cancelled run stays cancelled");
    assert!(text(&out.stderr).contains("cancelled"));
    let out = w.run(&["resume", "--all"]);
    assert!(out.stdout.is_empty(), "nothing left to resume");
}
