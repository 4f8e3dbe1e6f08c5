//! Exactly one executor per run: a live run cannot be resumed twice, and a
//! killed one can be resumed at once, with the module it started with.

use std::time::Duration;

use cairn_e2e::{World, count_lines, guest, json_stdout, kill9, text, wait_until};

#[test]
fn a_live_run_is_refused_and_a_killed_one_resumes_at_once() {
    let w = World::new("exclusive");
    let data = w.subdir("data");
    // Run from a copy of the module that is deleted after the kill: resume
    // must use the module stored in the database.
    let copy = w.dir.join("flow.wasm");
    std::fs::copy(guest("crashtest"), &copy).unwrap();
    let grant = format!("{}::/data", data.display());
    let input = r#"{"steps":400,"work_ms":5,"log":"/data/log.txt"}"#;
    let mut child =
        w.spawn(&["run", copy.to_str().unwrap(), "--run-id", "solo", "--dir", &grant, "--input", input], "solo");
    wait_until("the run to make progress", Duration::from_secs(60), || count_lines(&data.join("log.txt")) >= 20);

    let out = w.run(&["resume", "solo"]);
    assert_eq!(out.status.code(), Some(4), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("another cairn process"), "{}", text(&out.stderr));
    let all = w.run(&["resume", "--all"]);
    assert!(all.status.success());
    assert!(all.stdout.is_empty(), "resume --all skips runs held by a live process");
    assert!(text(&all.stderr).contains("skipping run solo"));

    kill9(&mut child);
    std::fs::remove_file(&copy).unwrap();
    let out = json_stdout(&w.run(&["resume", "solo"]));
    assert_eq!(out["sum"], (0..400u64).map(|i| i * i).sum::<u64>());
}

#[test]
fn resume_all_continues_every_unfinished_run() {
    let w = World::new("resume-all");
    let wasm = guest("crashtest");
    let mut ids = Vec::new();
    for n in 0..3 {
        let data = w.subdir(&format!("d{n}"));
        let grant = format!("{}::/data", data.display());
        let id = format!("all-{n}");
        let input = r#"{"steps":300,"work_ms":2,"log":"/data/log.txt"}"#;
        let mut child =
            w.spawn(&["run", wasm.to_str().unwrap(), "--run-id", &id, "--dir", &grant, "--input", input], &id);
        wait_until("progress", Duration::from_secs(60), || count_lines(&data.join("log.txt")) >= 10);
        kill9(&mut child);
        ids.push(id);
    }
    let out = w.run(&["resume", "--all"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut seen: Vec<String> = text(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["status"], "completed", "{l}");
            assert_eq!(v["output"]["sum"], (0..300u64).map(|i| i * i).sum::<u64>());
            v["id"].as_str().unwrap().to_string()
        })
        .collect();
    seen.sort();
    assert_eq!(seen, ids);
    assert!(w.runs().iter().all(|r| r["status"] == "completed"));
}
