//! `cairn serve` on a free loopback port, driven by a real HTTP client:
//! tokens and roles, modules, runs, paging, signals, cancels, and
//! Server-Sent Events that resume with `Last-Event-ID` without loss or
//! duplicates, including commits made by another process.

use std::time::Duration;

use cairn_e2e::http::{call, read_events, serve, token, upload, wait_status};
use cairn_e2e::{World, guest, wait_until};
use serde_json::{Value, json};

#[test]
fn the_http_api_with_tokens_runs_and_events() {
    let w = World::new("serve");
    let (admin, operator, viewer) = (token(&w, "admin"), token(&w, "operator"), token(&w, "viewer"));
    let server = serve(&w, &["--max-module-mib", "1"]);
    let base = server.base.clone();

    // Auth: open health, 401 without or with a wrong token, 403 for a low role.
    assert_eq!(call("GET", &format!("{base}/healthz"), None, None).0, 200);
    assert_eq!(call("GET", &format!("{base}/api/runs"), None, None).0, 401);
    assert_eq!(call("GET", &format!("{base}/api/runs"), Some("cairn_0_0"), None).0, 401);
    let wasm = std::fs::read(guest("benchflow")).unwrap();
    let (status, body) = call("POST", &format!("{base}/api/modules"), Some(&viewer), Some(&wasm));
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));

    // Modules: created, then the same again, invalid wasm refused.
    let (status, first) = call("POST", &format!("{base}/api/modules"), Some(&admin), Some(&wasm));
    assert_eq!(status, 201, "{first}");
    assert!(first["imports"].as_array().unwrap().iter().any(|i| i == "cairn.step_begin"), "{first}");
    let (status, again) = call("POST", &format!("{base}/api/modules"), Some(&admin), Some(&wasm));
    assert_eq!((status, &again), (200, &first));
    let (status, bad) = call("POST", &format!("{base}/api/modules"), Some(&admin), Some(b"not wasm"));
    assert_eq!((status, bad["error"].as_str()), (400, Some("invalid_module")), "{bad}");
    let big = vec![0u8; 2 << 20];
    let (status, body) = call("POST", &format!("{base}/api/modules"), Some(&admin), Some(&big));
    assert_eq!((status, body["error"].as_str()), (413, Some("too_large")), "{body}");
    let hash = first["hash"].as_str().unwrap().to_string();
    let (_, modules) = call("GET", &format!("{base}/api/modules"), Some(&viewer), None);
    assert_eq!(modules["modules"][0]["hash"], hash.as_str());
    assert_eq!(call("GET", &format!("{base}/api/modules/{hash}"), Some(&viewer), None).1, first);

    // Runs: started and executed by the server's worker; bad requests.
    let start =
        |body: Value| call("POST", &format!("{base}/api/runs"), Some(&operator), Some(body.to_string().as_bytes()));
    let input = json!({"mode": "steps", "n": 3});
    for n in 0..3 {
        let (status, body) = start(json!({"module": hash, "input": input, "run_id": format!("r{n}")}));
        assert_eq!((status, body["run_id"].as_str()), (201, Some(format!("r{n}").as_str())), "{body}");
    }
    assert_eq!(start(json!({"module": hash, "input": input, "run_id": "r0"})).1["error"], "conflict");
    assert_eq!(start(json!({"module": "ab".repeat(32)})).1["error"], "unknown_module");
    let (status, body) = call("POST", &format!("{base}/api/runs"), Some(&operator), Some(b"{not json"));
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_json")));
    let (status, body) = start(json!({"modul": hash}));
    assert_eq!((status, body["error"].as_str()), (422, Some("invalid_request")));
    assert_eq!(call("GET", &format!("{base}/api/runs/nope"), Some(&viewer), None).0, 404);

    let done = wait_status(&base, &viewer, "r2", "completed");
    assert_eq!(call("POST", &format!("{base}/api/runs/r2/resume"), Some(&operator), None).0, 409);
    assert!(done["seq"].as_u64().unwrap() > 0);

    // Paging: newest first, with a cursor.
    let (_, page1) = call("GET", &format!("{base}/api/runs?limit=2"), Some(&viewer), None);
    let ids: Vec<&str> = page1["runs"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["r2", "r1"]);
    let next = page1["next"].as_i64().expect("a cursor");
    let (_, page2) = call("GET", &format!("{base}/api/runs?limit=2&after={next}"), Some(&viewer), None);
    assert_eq!(page2["runs"][0]["id"], "r0");
    assert!(page2["next"].is_null());
    let (_, hist) = call("GET", &format!("{base}/api/runs/r2/history?limit=1"), Some(&viewer), None);
    assert_eq!(hist["entries"].as_array().unwrap().len(), 1);
    let (_, rest) = call("GET", &format!("{base}/api/runs/r2/history?after=0&limit=1000"), Some(&viewer), None);
    assert_eq!(rest["entries"][0]["position"], 1);

    // Signals and cancels, from the API and from another process; events.
    let signals = upload(&base, &admin, "signals");
    let waits = json!({"waits": [{"name": "a"}, {"name": "b"}]});
    assert_eq!(start(json!({"module": signals, "input": waits, "run_id": "sig"})).0, 201);
    assert_eq!(start(json!({"module": signals, "input": {"waits": [{"name": "never"}]}, "run_id": "stop"})).0, 201);
    wait_status(&base, &viewer, "stop", "running");
    let mark = call("GET", &format!("{base}/api/runs/sig"), Some(&viewer), None).1["seq"].as_u64().unwrap();
    let (status, _) = call("POST", &format!("{base}/api/runs/sig/signals/a"), Some(&viewer), Some(b"1"));
    assert_eq!(status, 403, "a viewer may not signal");
    assert_eq!(call("POST", &format!("{base}/api/runs/sig/signals/a"), Some(&operator), Some(b"1")).0, 202);
    // From another process: the server's feed notices it too.
    assert!(w.run(&["signal", "sig", "b", "2"]).status.success());
    let out = wait_status(&base, &viewer, "sig", "completed");
    assert_eq!(out["output"], json!([1, 2]));
    let (status, body) = call("POST", &format!("{base}/api/runs/stop/cancel"), Some(&operator), Some(b""));
    assert_eq!((status, body["status"].as_str()), (202, Some("cancelled")), "{body}");
    wait_status(&base, &viewer, "stop", "cancelled");
    assert_eq!(call("POST", &format!("{base}/api/runs/stop/cancel"), Some(&operator), Some(b"")).0, 202);
    assert_eq!(call("POST", &format!("{base}/api/runs/sig/signals/a"), Some(&operator), None).0, 409);

    // Events since the mark: the two signals, the run's steps, its end.
    let events = read_events(&base, "/api/runs/sig/events", &viewer, Some(mark), 4);
    assert!(events.windows(2).all(|p| p[0].0 < p[1].0), "in order: {events:?}");
    assert!(events.iter().all(|(_, _, d)| d["run_id"] == "sig" && d["ts_us"].as_i64().unwrap() > 0));
    let kinds: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
    assert!(kinds.contains(&"signal"), "{kinds:?}");
    // Resumed from the second: exactly the ones after it, once each.
    let resumed = read_events(&base, "/api/runs/sig/events", &viewer, Some(events[1].0), 2);
    assert_eq!(resumed.iter().map(|e| e.0).collect::<Vec<_>>(), events[2..4].iter().map(|e| e.0).collect::<Vec<_>>());
    let all = read_events(&base, "/api/events", &viewer, Some(mark), 6);
    assert!(all.windows(2).all(|p| p[0].0 != p[1].0), "no duplicates: {all:?}");
    drop(server);
}

/// A kill -9 of `cairn serve` mid-run, then a restart: the run completes,
/// and no step committed before the kill runs again.
#[test]
fn a_killed_server_restarts_and_completes_the_run() {
    let w = World::new("serve-kill");
    let admin = token(&w, "admin");
    let data = w.subdir("data");
    let allow = data.display().to_string();
    let mut server = serve(&w, &["--allow-dir", &allow]);
    let hash = upload(&server.base, &admin, "crashtest");
    let input = json!({"steps": 40, "work_ms": 5, "log": "/data/log.txt", "observe_every": 100});
    let body = json!({"module": hash, "input": input, "run_id": "k", "dirs": [format!("{allow}::/data")]});
    let (status, reply) =
        call("POST", &format!("{}/api/runs", server.base), Some(&admin), Some(body.to_string().as_bytes()));
    assert_eq!(status, 201, "{reply}");
    let steps = |w: &World| w.read("data/log.txt").lines().filter(|l| l.starts_with("step ")).count();
    wait_until("some steps to run", Duration::from_secs(60), || steps(&w) >= 10);
    cairn_e2e::kill9(&mut server.child);
    let show = w.show("k");
    let committed = show["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"] == "work" && e["status"] == "completed")
        .count();
    assert!(committed < 40, "killed mid-run");
    let server = serve(&w, &["--allow-dir", &allow]);
    let done = wait_status(&server.base, &admin, "k", "completed");
    assert_eq!(done["output"]["sum"], (0..40u64).map(|i| i * i).sum::<u64>());
    let log = w.read("data/log.txt");
    for i in 0..committed {
        let n = log.lines().filter(|l| l.starts_with(&format!("step {i} "))).count();
        assert_eq!(n, 1, "committed step {i} ran {n} times");
    }
}
