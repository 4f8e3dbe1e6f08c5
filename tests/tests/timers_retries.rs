//! Durable timers and retries.

use std::time::Duration;

use cairn_e2e::{World, guest, json_stdout, kill9, text, wait_until};
use serde_json::Value;

fn steps(show: &Value, name: &str) -> Vec<Value> {
    show["history"].as_array().unwrap().iter().filter(|e| e["kind"] == "step" && e["name"] == name).cloned().collect()
}

fn ms(v: &Value) -> i64 {
    // RFC 3339 with milliseconds, as cairn prints them: compare via the
    // run's own numbers instead where possible; here only differences matter.
    let s = v.as_str().unwrap();
    let t = s.trim_end_matches('Z');
    let (date, time) = t.split_once('T').unwrap();
    let d: Vec<i64> = date.split('-').map(|x| x.parse().unwrap()).collect();
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let h: Vec<i64> = hms.split(':').map(|x| x.parse().unwrap()).collect();
    let days = d[2] + 31 * d[1] + 372 * d[0]; // monotonic within a test, not a calendar
    ((days * 24 + h[0]) * 60 + h[1]) * 60_000 + h[2] * 1000 + frac.parse::<i64>().unwrap()
}

#[test]
fn a_sleep_killed_midway_wakes_at_the_original_time() {
    for mode in ["ctx_sleep", "std_sleep"] {
        let w = World::new(mode);
        let wasm = guest("timers");
        let input = format!(r#"{{"mode":"{mode}","sleep_ms":4000}}"#);
        let mut child = w.spawn(&["run", wasm.to_str().unwrap(), "--run-id", "nap", "--input", &input], mode);
        wait_until("the timer to be recorded", Duration::from_secs(30), || {
            w.try_show("nap").is_some_and(|s| s["history"].as_array().unwrap().iter().any(|e| e["kind"] == "timer"))
        });
        std::thread::sleep(Duration::from_millis(500));
        kill9(&mut child);
        std::thread::sleep(Duration::from_millis(1500)); // the host is down
        let out = json_stdout(&w.run(&["resume", "nap"]));
        let slept = out["after"].as_u64().unwrap() - out["before"].as_u64().unwrap();
        // Woke at the original time (4 s after the first step), not 4 s
        // after the resume (which would be at least 6 s).
        assert!((4000..5500).contains(&slept), "{mode}: slept {slept} ms");
        let show = w.show("nap");
        let timers: Vec<_> = show["history"].as_array().unwrap().iter().filter(|e| e["kind"] == "timer").collect();
        assert_eq!(timers.len(), 1, "{mode}: one timer, recorded once");
        assert_eq!(steps(&show, "before").len(), 1, "{mode}: the step before the sleep ran once");
    }
}

#[test]
fn long_waits_park_the_run() {
    let w = World::new("park");
    let wasm = guest("timers");
    let input = r#"{"mode":"ctx_sleep","sleep_ms":2500}"#;
    let mut child =
        w.spawn(&["--park-after", "0.5", "run", wasm.to_str().unwrap(), "--run-id", "p", "--input", input], "p");
    wait_until("the run to park", Duration::from_secs(30), || {
        w.runs().first().is_some_and(|r| r["status"] == "sleeping")
    });
    let status = child.wait().unwrap();
    assert!(status.success());
    assert_eq!(w.runs()[0]["status"], "completed");
    let out: Value = serde_json::from_str(w.read("p.stdout").trim()).unwrap();
    let slept = out["after"].as_u64().unwrap() - out["before"].as_u64().unwrap();
    assert!(slept >= 2500, "slept {slept}");
}

#[test]
fn failing_steps_are_retried_with_growing_backoff() {
    for mode in ["flaky", "flaky_panic"] {
        let w = World::new(mode);
        let wasm = guest("timers");
        let input = format!(r#"{{"mode":"{mode}","fail":2}}"#);
        let out = json_stdout(&w.run(&["run", wasm.to_str().unwrap(), "--run-id", "f", "--input", &input]));
        assert_eq!(out["succeeded_on_attempt"], 3, "{mode}");
        let attempts = steps(&w.show("f"), "flaky");
        let summary: Vec<(u64, &str)> =
            attempts.iter().map(|e| (e["attempt"].as_u64().unwrap(), e["status"].as_str().unwrap())).collect();
        assert_eq!(summary, [(1, "failed"), (2, "failed"), (3, "completed")], "{mode}");
        assert!(attempts[0]["error"].as_str().unwrap().contains("attempt 1"), "{mode}: {:?}", attempts[0]);
        // Backoff 300 ms then 600 ms (no jitter in this policy).
        let gap1 = ms(&attempts[0]["output"]["retry_at"]) - ms(&attempts[0]["finished_at"]);
        let gap2 = ms(&attempts[1]["output"]["retry_at"]) - ms(&attempts[1]["finished_at"]);
        assert!((290..=310).contains(&gap1) && (590..=610).contains(&gap2), "{mode}: backoff {gap1} then {gap2}");
        let waited = ms(&attempts[2]["started_at"]) - ms(&attempts[1]["finished_at"]);
        assert!(waited >= 590, "{mode}: the third attempt started {waited} ms after the second failed");
    }
}

#[test]
fn failing_branches_are_retried_in_fresh_instances() {
    let w = World::new("flaky-branch");
    let wasm = guest("timers");
    let out = json_stdout(&w.run(&[
        "run",
        wasm.to_str().unwrap(),
        "--run-id",
        "fb",
        "--input",
        r#"{"mode":"flaky_branch","fail":2}"#,
    ]));
    assert_eq!(out["succeeded_on_attempt"], 3);
    let show = w.show("fb");
    let attempts: Vec<(u64, String)> = show["branches"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["name"] == "flaky_branch")
        .map(|b| (b["attempt"].as_u64().unwrap(), b["status"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(attempts, [(1, "failed".into()), (2, "failed".into()), (3, "completed".into())]);
    let first =
        show["branches"].as_array().unwrap().iter().find(|b| b["name"] == "flaky_branch" && b["attempt"] == 1).unwrap();
    assert!(first["error"].as_str().unwrap().contains("branch attempt 1 panicked"), "{first}");
    assert!(first["output"]["retry_at"].is_string(), "the backoff is journaled: {first}");
}

#[test]
fn permanent_errors_and_exhausted_retries_fail_the_step() {
    let w = World::new("permanent");
    let wasm = guest("timers");
    let data = w.subdir("data");
    let log = data.join("log.txt");
    let input = r#"{"mode":"permanent","log":"/data/log.txt"}"#.to_string();
    let grant = format!("{}::/data", data.display());
    let out = w.run(&["run", wasm.to_str().unwrap(), "--run-id", "p", "--dir", &grant, "--input", &input]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("card declined"));
    assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 1, "a permanent error is not retried");
    let attempts = steps(&w.show("p"), "decline");
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0]["status"], "error");

    // Exhausted: every attempt times out.
    let out = w.run(&["run", wasm.to_str().unwrap(), "--run-id", "t", "--input", r#"{"mode":"timeout"}"#]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("timed out after 300ms"), "{}", text(&out.stderr));
    let attempts = steps(&w.show("t"), "slow");
    let summary: Vec<&str> = attempts.iter().map(|e| e["status"].as_str().unwrap()).collect();
    assert_eq!(summary, ["failed", "error"]);
}

#[test]
fn a_crash_during_backoff_keeps_the_retry_time() {
    let w = World::new("backoff-crash");
    let wasm = guest("timers");
    let data = w.subdir("data");
    let grant = format!("{}::/data", data.display());
    // Attempt 1 fails; the retry is due 300 ms later. Kill the host at once.
    let input = r#"{"mode":"flaky","fail":1,"log":"/data/log.txt"}"#;
    let mut child = w.spawn(&["run", wasm.to_str().unwrap(), "--run-id", "b", "--dir", &grant, "--input", input], "b");
    wait_until("the failed attempt", Duration::from_secs(30), || {
        w.try_show("b").is_some_and(|s| steps(&s, "flaky").iter().any(|e| e["status"] == "failed"))
    });
    kill9(&mut child);
    let failed = steps(&w.show("b"), "flaky");
    if failed.len() > 1 {
        return; // the retry ran before the kill landed; nothing to check
    }
    let retry_at = ms(&failed[0]["output"]["retry_at"]);
    let out = json_stdout(&w.run(&["resume", "b"]));
    assert_eq!(out["succeeded_on_attempt"], 2);
    let attempts = steps(&w.show("b"), "flaky");
    assert_eq!(attempts.len(), 2);
    assert!(ms(&attempts[1]["started_at"]) >= retry_at, "the retry waited for the recorded time");
}
