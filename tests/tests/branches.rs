//! Parallel branches: they overlap, survive a crash without re-running
//! finished ones, join in spawn order, and report the first failure.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cairn_e2e::{World, guest, json_stdout, kill9, text, wait_until};
use serde_json::{Value, json};

fn completed_branches(show: &Value) -> usize {
    show["branches"].as_array().unwrap().iter().filter(|b| b["status"] == "completed").count()
}

#[test]
fn ten_one_second_branches_overlap() {
    let w = World::new("branches-overlap");
    let wasm = guest("branches");
    let started = Instant::now();
    let out =
        json_stdout(&w.run(&["run", wasm.to_str().unwrap(), "--input", r#"{"n":10,"sleep_ms":1000,"flat":true}"#]));
    let took = started.elapsed();
    // Correctness bound: sequentially this is 10 s; they must overlap.
    assert!(took < Duration::from_secs(3), "10 x 1 s branches took {took:?}");
    assert_eq!(out["values"], json!((1000..1010).collect::<Vec<u64>>()));
}

#[test]
fn finished_branches_are_not_rerun_after_a_crash() {
    let w = World::new("branches-crash");
    let data = w.subdir("data");
    let wasm = guest("branches");
    let grant = format!("{}::/data", data.display());
    // Branch i sleeps 500 ms * (i + 1): three finish well before the other two.
    let input = r#"{"n":5,"sleep_ms":500,"log":"/data/log.txt"}"#;
    let mut child = w.spawn(&["run", wasm.to_str().unwrap(), "--run-id", "b", "--dir", &grant, "--input", input], "b");
    wait_until("three branches to finish", Duration::from_secs(30), || {
        w.try_show("b").is_some_and(|s| completed_branches(&s) >= 3)
    });
    kill9(&mut child);
    let before = w.show("b");
    assert_eq!(completed_branches(&before), 3, "killed while 3 of 5 had finished");

    let out = json_stdout(&w.run(&["resume", "b"]));
    assert_eq!(out["values"], json!([1000, 1001, 1002, 1003, 1004]), "all five, in spawn order");
    let log = std::fs::read_to_string(data.join("log.txt")).unwrap();
    let mut starts: HashMap<String, usize> = HashMap::new();
    for line in log.lines().filter(|l| l.starts_with("start ")) {
        *starts.entry(line.split(' ').nth(1).unwrap().to_string()).or_default() += 1;
    }
    for i in ["0", "1", "2"] {
        assert_eq!(starts[i], 1, "finished branch {i} ran again: {log}");
    }
    for i in ["3", "4"] {
        assert_eq!(starts[i], 2, "unfinished branch {i} must be restarted: {log}");
    }
    // Same idempotency key across the restart.
    let keys: Vec<&str> =
        log.lines().filter(|l| l.starts_with("start 4 ")).map(|l| l.split(' ').nth(2).unwrap()).collect();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0], keys[1]);
    let after = w.show("b");
    assert_eq!(completed_branches(&after), 5);
    let spawns = after["history"].as_array().unwrap().iter().filter(|e| e["kind"] == "spawn").count();
    assert_eq!(spawns, 5, "each spawn recorded once");
}

#[test]
fn join_returns_the_first_failure_in_spawn_order() {
    let w = World::new("branches-fail");
    let data = w.subdir("data");
    let wasm = guest("branches");
    let grant = format!("{}::/data", data.display());
    // Branch 3 fails quickly-ish, branch 1 fails last: the error is branch 1's.
    let input = r#"{"n":4,"sleep_ms":100,"fail":[1,3],"log":"/data/log.txt"}"#;
    let out = w.run(&["run", wasm.to_str().unwrap(), "--run-id", "f", "--dir", &grant, "--input", input]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("task 1 failed"), "{}", text(&out.stderr));
    let show = w.show("f");
    let outcomes: Vec<(u64, String)> = show["branches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["occurrence"].as_u64().unwrap(), b["status"].as_str().unwrap().to_string()))
        .collect();
    let mut sorted = outcomes.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [(1, "completed".into()), (2, "error".into()), (3, "completed".into()), (4, "error".into())],
        "every outcome stays memoized"
    );

    // join2, and a branch never joined still completes before the run does.
    let out = json_stdout(&w.run(&["run", wasm.to_str().unwrap(), "--input", r#"{"n":2,"mode":"join2"}"#]));
    assert_eq!(out["values"], json!([1000, 1001]));
    let out = w.run(&[
        "run",
        wasm.to_str().unwrap(),
        "--run-id",
        "u",
        "--dir",
        &grant,
        "--input",
        r#"{"n":2,"sleep_ms":300,"mode":"unjoined","log":"/data/u.txt"}"#,
    ]);
    json_stdout(&out);
    assert_eq!(completed_branches(&w.show("u")), 2);
    assert_eq!(
        std::fs::read_to_string(data.join("u.txt")).unwrap().lines().filter(|l| l.starts_with("done")).count(),
        2
    );
}

/// One run with 10,000 branches next to 50 ordinary runs in one worker:
/// the ordinary runs, started once the big one has taken its branch slots,
/// finish while most of its branches are still to come. (Before, its
/// branches held every instance slot of the worker, and the other runs
/// competed for each freed slot with thousands of branch tasks: 19 s here,
/// by which time the big run had finished about two thirds of its branches.)
#[test]
fn a_run_with_ten_thousand_branches_does_not_starve_the_others() {
    let w = World::new("branch-fairness");
    let branches = guest("branches");
    let input = r#"{"n":10000,"sleep_ms":3000,"flat":true}"#;
    let args = ["start", branches.to_str().unwrap(), "--run-id", "big", "--max-branches", "10000", "--input", input];
    let out = w.run(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut worker = w.spawn(&["--durability", "process", "worker", "--concurrency", "64"], "worker");
    let spawned = |show: &Value| show["history"].as_array().unwrap().iter().filter(|e| e["kind"] == "spawn").count();
    wait_until("the big run to spawn 1,500 branches", Duration::from_secs(60), || spawned(&w.show("big")) >= 1500);

    let crashtest = guest("crashtest");
    let data = w.subdir("data");
    let grant = format!("{}::/data", data.display());
    for n in 0..50 {
        let input = format!(r#"{{"steps":3,"log":"/data/{n}.txt","observe_every":100}}"#);
        let id = format!("small{n}");
        let out = w.run(&["start", crashtest.to_str().unwrap(), "--run-id", &id, "--dir", &grant, "--input", &input]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    // A watchdog, not a speed check.
    wait_until("the 50 ordinary runs to complete", Duration::from_secs(120), || {
        w.runs().iter().filter(|r| r["id"] != "big" && r["status"] == "completed").count() == 50
    });
    let big = w.show("big");
    worker.kill().ok();
    worker.wait().ok();
    let done = completed_branches(&big);
    assert!(done < 5000, "the ordinary runs waited for {done} of the big run's branches to finish");
}
