//! `cairn serve` on a free loopback port, driven by a real HTTP client:
//! tokens and roles, modules, runs, paging, signals, cancels, and
//! Server-Sent Events that resume with `Last-Event-ID` without loss or
//! duplicates, including commits made by another process.

use std::time::Duration;

use cairn_e2e::http::{call, open_events, read_events, serve, start_run, token, upload, wait_status};
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

/// Every (method, path) the server answers, by the issue's contract.
const ROUTES: [(&str, &str); 21] = [
    ("GET", "/"),
    ("GET", "/assets/{file}"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("GET", "/api/openapi.json"),
    ("GET", "/api/events"),
    ("GET", "/api/modules"),
    ("POST", "/api/modules"),
    ("GET", "/api/modules/{hash}"),
    ("GET", "/api/runs"),
    ("POST", "/api/runs"),
    ("GET", "/api/runs/{id}"),
    ("GET", "/api/runs/{id}/history"),
    ("GET", "/api/runs/{id}/events"),
    ("POST", "/api/runs/{id}/signals/{name}"),
    ("POST", "/api/runs/{id}/cancel"),
    ("POST", "/api/runs/{id}/resume"),
    ("GET", "/api/kv/{namespace}"),
    ("GET", "/api/kv/{namespace}/{key}"),
    ("PUT", "/api/kv/{namespace}/{key}"),
    ("DELETE", "/api/kv/{namespace}/{key}"),
];

/// The status of a request (an event stream is not read, only opened).
fn call_quick(method: &str, url: &str, token: Option<&str>) -> u16 {
    let mut req = ureq::request(method, url).timeout(Duration::from_secs(10));
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let result = if method == "POST" || method == "PUT" { req.send_bytes(b"{}") } else { req.call() };
    match result {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(s, _)) => s,
        Err(e) => panic!("{method} {url}: {e}"),
    }
}

/// Every `$ref` in `v` names a schema of `doc`.
fn refs_resolve(doc: &Value, v: &Value) {
    match v {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("$ref") {
                let name = r.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("a local ref: {r}"));
                assert!(doc["components"]["schemas"][name].is_object(), "{r} is defined");
            }
            map.values().for_each(|x| refs_resolve(doc, x));
        }
        Value::Array(items) => items.iter().for_each(|x| refs_resolve(doc, x)),
        _ => {}
    }
}

/// The OpenAPI document is made from the router: it lists exactly the
/// routes the server answers, each with responses, and the error codes.
#[test]
fn the_openapi_document_lists_exactly_the_served_routes() {
    let w = World::new("serve-openapi");
    let viewer = token(&w, "viewer");
    let server = serve(&w, &["--no-worker"]);
    let base = server.base.clone();
    assert_eq!(call("GET", &format!("{base}/api/openapi.json"), None, None).0, 401);
    let (status, doc) = call("GET", &format!("{base}/api/openapi.json"), Some(&viewer), None);
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    let mut listed = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            assert!(!op["responses"].as_object().unwrap().is_empty(), "{method} {path} has responses");
            listed.push((method.to_uppercase(), path.clone()));
        }
    }
    listed.sort();
    let mut expected: Vec<(String, String)> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    expected.sort();
    assert_eq!(listed, expected);
    refs_resolve(&doc, &doc);
    let codes: Vec<&str> = doc["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    for code in ["bad_json", "invalid_request", "not_found", "too_large", "unauthorized", "forbidden", "conflict"] {
        assert!(codes.contains(&code), "{code} in {codes:?}");
    }
    assert!(codes.iter().all(|c| c.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_')), "snake_case: {codes:?}");
    let concrete = |p: &str| {
        p.replace("{id}", "nope")
            .replace("{hash}", "nope")
            .replace("{name}", "go")
            .replace("{file}", "app.js")
            .replace("{namespace}", "ns")
            .replace("{key}", "k")
    };

    // Auth on every route: none for the page and health; a viewer at
    // least for the rest (401 without a token); operator and admin routes
    // refuse a viewer (403).
    let open = ["/", "/assets/{file}", "/healthz"];
    let operator = ["/api/runs", "/api/runs/{id}/signals/{name}", "/api/runs/{id}/cancel", "/api/runs/{id}/resume"];
    for (method, path) in ROUTES {
        let url = format!("{base}{}", concrete(path));
        let anonymous = call_quick(method, &url, None);
        if open.contains(&path) {
            assert_eq!(anonymous, 200, "{method} {path} is open");
            continue;
        }
        assert_eq!(anonymous, 401, "{method} {path} without a token");
        let higher = (method == "POST" && (operator.contains(&path) || path == "/api/modules"))
            || method == "PUT"
            || method == "DELETE";
        if higher {
            assert_eq!(call_quick(method, &url, Some(&viewer)), 403, "{method} {path} refuses a viewer");
        }
    }
    // A revoked token is refused from the next request on.
    let other = token(&w, "viewer");
    assert_eq!(call_quick("GET", &format!("{base}/api/runs"), Some(&other)), 200);
    let id = other.split('_').nth(1).unwrap();
    assert!(w.run(&["token", "revoke", id]).status.success());
    assert_eq!(call_quick("GET", &format!("{base}/api/runs"), Some(&other)), 401);

    // Each listed route is answered (by its handler: a router's 404/405 has
    // no JSON body); other methods on the same paths are not.
    for (method, path) in ROUTES {
        let url = format!("{base}{}", concrete(path));
        let mut req = ureq::request(method, &url).set("Authorization", &format!("Bearer {viewer}"));
        if path.ends_with("events") {
            req = req.timeout(Duration::from_secs(5));
        }
        let resp = match if method == "POST" || method == "PUT" { req.send_bytes(b"{}") } else { req.call() } {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {url}: {e}"),
        };
        let status = resp.status();
        for other in ["PUT", "DELETE", "PATCH"] {
            if ROUTES.contains(&(other, path)) {
                continue;
            }
            let r = ureq::request(other, &url).call();
            assert!(matches!(r, Err(ureq::Error::Status(405, _))), "{other} {path} is not a route: {r:?}");
        }
        if status == 200 {
            continue;
        }
        let body: Value = serde_json::from_str(&resp.into_string().unwrap()).unwrap_or(Value::Null);
        assert!(body["error"].is_string(), "{method} {path} is answered by its handler: {status} {body}");
    }
    drop(server);
}

/// `/metrics`: Prometheus text with what the issue names, counting what happened.
#[test]
fn metrics_count_steps_commits_and_runs() {
    let w = World::new("serve-metrics");
    let admin = token(&w, "admin");
    let server = serve(&w, &[]);
    let base = server.base.clone();
    assert_eq!(call("GET", &format!("{base}/metrics"), None, None).0, 401);
    let hash = upload(&base, &admin, "benchflow");
    let body = json!({"module": hash, "input": {"mode": "steps", "n": 25}, "run_id": "m"});
    assert_eq!(call("POST", &format!("{base}/api/runs"), Some(&admin), Some(body.to_string().as_bytes())).0, 201);
    wait_status(&base, &admin, "m", "completed");
    let text = ureq::get(&format!("{base}/metrics"))
        .set("Authorization", &format!("Bearer {admin}"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let value = |series: &str| -> f64 {
        let line = text.lines().find(|l| l.starts_with(series)).unwrap_or_else(|| panic!("{series} in:\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(value("cairn_steps_committed_total"), 25.0);
    assert_eq!(value("cairn_step_seconds_count"), 25.0);
    assert_eq!(value("cairn_runs{status=\"completed\"}"), 1.0);
    assert_eq!(value("cairn_runs{status=\"pending\"}"), 0.0);
    assert!(value("cairn_fsync_seconds_count") >= 1.0);
    assert!(value("cairn_commit_batch_items_count") >= 1.0);
    assert!(text.contains("cairn_step_seconds_bucket{le=\"0.001\"}"), "histogram buckets:\n{text}");
    for series in [
        "cairn_replays_total",
        "cairn_retries_total",
        "cairn_live_instances",
        "cairn_parked_runs",
        "cairn_sse_clients",
        "cairn_commit_spins_total",
        "cairn_commit_spins_preempted_total",
    ] {
        value(series);
    }
    // Whether a commit was spun depends on the machine's load; there are
    // never more preempted spins than spins.
    assert!(value("cairn_commit_spins_preempted_total") <= value("cairn_commit_spins_total"));
    drop(server);
}

/// SIGTERM: event streams end cleanly, the server exits 0, a waiting run
/// is left waiting (not failed), and the next server carries it on.
#[test]
fn sigterm_stops_the_server_gracefully() {
    let w = World::new("serve-sigterm");
    let admin = token(&w, "admin");
    let mut server = serve(&w, &[]);
    let base = server.base.clone();
    let hash = upload(&base, &admin, "signals");
    let body = json!({"module": hash, "input": {"waits": [{"name": "go"}]}, "run_id": "w"});
    assert_eq!(call("POST", &format!("{base}/api/runs"), Some(&admin), Some(body.to_string().as_bytes())).0, 201);
    wait_status(&base, &admin, "w", "waiting");
    let stream = ureq::get(&format!("{base}/api/events"))
        .set("Authorization", &format!("Bearer {admin}"))
        .timeout(Duration::from_secs(60))
        .call()
        .expect("the event stream opens");
    let reader = std::thread::spawn(move || {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stream.into_reader(), &mut rest).map(|_| rest)
    });
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let mut status = None;
    wait_until("the server to stop", Duration::from_secs(30), || {
        status = server.child.try_wait().unwrap();
        status.is_some()
    });
    let status = status.unwrap();
    assert_eq!(status.code(), Some(0), "{}", w.read("serve.stderr"));
    assert!(reader.join().unwrap().is_ok(), "the event stream ended cleanly");
    assert_eq!(w.show("w")["status"], "waiting", "a waiting run is left waiting");

    let server = serve(&w, &[]);
    let base = server.base.clone();
    assert_eq!(call("POST", &format!("{base}/api/runs/w/signals/go"), Some(&admin), Some(b"7")).0, 202);
    assert_eq!(wait_status(&base, &admin, "w", "completed")["output"], json!([7]));
    drop(server);
}

/// A run waiting in memory (not parked: `--park-after` is an hour) shows
/// `waiting` or `sleeping` to viewers, and `running` again after.
#[test]
fn a_wait_in_memory_shows_in_the_status() {
    let w = World::new("serve-wait-status");
    let admin = token(&w, "admin");
    let server = serve(&w, &["--park-after", "3600"]);
    let base = server.base.clone();
    let signals = upload(&base, &admin, "signals");
    let timers = upload(&base, &admin, "timers");
    let start = |module: &str, input: Value, id: &str| start_run(&base, &admin, module, input, id);
    start(&signals, json!({"waits": [{"name": "go"}]}), "s");
    start(&timers, json!({"mode": "ctx_sleep", "sleep_ms": 3000}), "t");
    wait_status(&base, &admin, "s", "waiting");
    wait_status(&base, &admin, "t", "sleeping");
    assert_eq!(call("POST", &format!("{base}/api/runs/s/signals/go"), Some(&admin), Some(b"1")).0, 202);
    assert_eq!(wait_status(&base, &admin, "s", "completed")["output"], json!([1]));
    wait_status(&base, &admin, "t", "completed");
    drop(server);
}

/// Effects over the API: grants are an admin's, the key-value store is read
/// and written like `cairn kv`, and a cancel with a grace period compensates.
#[test]
fn effects_through_the_api_kv_grants_and_graceful_cancel() {
    let w = World::new("serve-effects");
    let (admin, operator, viewer) = (token(&w, "admin"), token(&w, "operator"), token(&w, "viewer"));
    let server = serve(&w, &[]);
    let base = server.base.clone();
    let hash = upload(&base, &admin, "effects");
    let start = |tok: &str, body: Value| {
        call("POST", &format!("{base}/api/runs"), Some(tok), Some(body.to_string().as_bytes()))
    };

    // HTTP grants are an admin's, like directories.
    let granted =
        json!({"module": hash, "input": {"mode": "incr", "key": "n", "times": 3}, "allow_http": ["api.test"]});
    let (status, body) = start(&operator, granted.clone());
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")), "{body}");
    let (status, body) = start(&admin, json!({"module": hash, "input": {}, "allow_http": ["http://x/"]}));
    assert_eq!((status, body["error"].as_str()), (422, Some("invalid_request")), "{body}");
    assert!(body["detail"].as_str().unwrap().contains("give a host, not a URL"), "{body}");

    // Two runs share a namespace; the API reads what their steps wrote.
    for id in ["i1", "i2"] {
        let body = json!({"module": hash, "run_id": id, "kv_namespace": "shop", "input": {"mode": "incr", "key": "stock/pen", "times": 3}});
        assert_eq!(start(&operator, body).0, 201);
    }
    wait_status(&base, &viewer, "i1", "completed");
    wait_status(&base, &viewer, "i2", "completed");
    let (status, entry) = call("GET", &format!("{base}/api/kv/shop/stock%2Fpen"), Some(&viewer), None);
    assert_eq!((status, &entry["value"], &entry["version"]), (200, &json!(6), &json!(6)), "{entry}");
    let (status, body) = call("GET", &format!("{base}/api/kv/shop/nope"), Some(&viewer), None);
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    // Operators write; viewers may not.
    let put = |tok: &str, key: &str, v: &[u8]| call("PUT", &format!("{base}/api/kv/shop/{key}"), Some(tok), Some(v));
    assert_eq!(put(&viewer, "x", b"1").0, 403);
    assert_eq!(put(&operator, "x", b"{nope").0, 400);
    for k in ["a", "b", "c"] {
        let (status, e) = put(&operator, &format!("stock%2F{k}"), b"{\"n\": 1}");
        assert_eq!((status, &e["value"]), (200, &json!({"n": 1})), "{e}");
    }
    let (_, page) = call("GET", &format!("{base}/api/kv/shop?prefix=stock/&limit=2"), Some(&viewer), None);
    let keys: Vec<&str> = page["entries"].as_array().unwrap().iter().map(|e| e["key"].as_str().unwrap()).collect();
    assert_eq!((keys, &page["next"]), (vec!["stock/a", "stock/b"], &json!("stock/b")));
    let (_, page) = call("GET", &format!("{base}/api/kv/shop?prefix=stock/&after=stock/b"), Some(&viewer), None);
    let keys: Vec<&str> = page["entries"].as_array().unwrap().iter().map(|e| e["key"].as_str().unwrap()).collect();
    assert_eq!((keys, &page["next"]), (vec!["stock/c", "stock/pen"], &Value::Null));
    assert_eq!(call("DELETE", &format!("{base}/api/kv/shop/stock%2Fa"), Some(&operator), None).0, 200);
    assert_eq!(call("GET", &format!("{base}/api/kv/shop/stock%2Fa"), Some(&viewer), None).0, 404);

    // A waiting run cancelled with a grace period compensates, then ends cancelled.
    let body = json!({"module": hash, "run_id": "r", "kv_namespace": "g", "input": {"mode": "reserve"}});
    assert_eq!(start(&operator, body).0, 201);
    wait_status(&base, &viewer, "r", "waiting");
    let (status, body) = call("POST", &format!("{base}/api/runs/r/cancel"), Some(&operator), Some(b"{\"grace\": 30}"));
    assert_eq!(status, 202, "{body}");
    wait_status(&base, &viewer, "r", "cancelled");
    let (_, released) = call("GET", &format!("{base}/api/kv/g/released"), Some(&viewer), None);
    assert_eq!(released["value"], json!(["R-1"]));
    let (status, body) = call("POST", &format!("{base}/api/runs/r/cancel"), Some(&operator), Some(b"{\"grace\": -1}"));
    assert_eq!((status, body["error"].as_str()), (422, Some("invalid_request")), "{body}");
    drop(server);
}

/// A crowd of signals sent at once over the API (on PostgreSQL, batches of
/// signals alone go in one round trip) to a run waiting for all of them,
/// and cancels of other runs among them: every signal is delivered once,
/// every cancel lands, and nothing else.
#[test]
fn a_crowd_of_signals_and_cancels_at_once() {
    let w = World::new("serve-signal-crowd");
    let admin = token(&w, "admin");
    let server = serve(&w, &[]);
    let base = server.base.clone();
    let signals = upload(&base, &admin, "signals");
    let start = |input: Value, id: &str| start_run(&base, &admin, &signals, input, id);
    const SIGNALS: usize = 48;
    let waits: Vec<Value> = (0..SIGNALS).map(|_| json!({"name": "go"})).collect();
    start(json!({ "waits": waits }), "crowd");
    for i in 0..4 {
        start(json!({"waits": [{"name": "never"}]}), &format!("stop{i}"));
    }
    wait_status(&base, &admin, "crowd", "waiting");
    // Eight clients at once: six send signals, two cancel.
    std::thread::scope(|s| {
        for client in 0..8 {
            let (base, admin) = (&base, &admin);
            s.spawn(move || {
                if client >= 6 {
                    for i in [client - 6, client - 4] {
                        let url = format!("{base}/api/runs/stop{i}/cancel");
                        let (status, body) = call("POST", &url, Some(admin), Some(b""));
                        assert_eq!(status, 202, "{body}");
                    }
                    return;
                }
                for n in (client..SIGNALS).step_by(6) {
                    let url = format!("{base}/api/runs/crowd/signals/go");
                    let (status, body) = call("POST", &url, Some(admin), Some(n.to_string().as_bytes()));
                    assert_eq!(status, 202, "{body}");
                }
            });
        }
    });
    let out = wait_status(&base, &admin, "crowd", "completed");
    let mut got: Vec<u64> = out["output"].as_array().expect("payloads").iter().map(|v| v.as_u64().unwrap()).collect();
    got.sort_unstable();
    assert_eq!(got, (0..SIGNALS as u64).collect::<Vec<_>>(), "each signal delivered once");
    for i in 0..4 {
        wait_status(&base, &admin, &format!("stop{i}"), "cancelled");
    }
    drop(server);
}

/// `cairn serve --no-worker` and a `cairn worker` process on one database:
/// the server's event stream carries the worker's commits (steps, statuses)
/// and its own (new runs, signals) in the order of their numbers, once
/// each, as a replay has them; so a client resuming from the last number
/// it saw misses nothing.
#[test]
fn a_server_streams_another_process_s_commits_in_order() {
    let w = World::new("serve-other-worker");
    let admin = token(&w, "admin");
    let server = serve(&w, &["--no-worker"]);
    let base = server.base.clone();
    let mut worker = w.spawn(&["worker"], "worker");
    let signals = upload(&base, &admin, "signals");
    let steps = upload(&base, &admin, "benchflow");
    let mut stream = open_events(&base, "/api/events", &admin, None);
    // The worker commits steps while the server commits signals.
    const STEPS: usize = 300;
    const SIGNALS: u64 = 20;
    start_run(&base, &admin, &signals, json!({ "waits": vec![json!({"name": "go"}); SIGNALS as usize] }), "sig");
    start_run(&base, &admin, &steps, json!({"mode": "steps", "n": STEPS}), "steps");
    for n in 1..=SIGNALS {
        let url = format!("{base}/api/runs/sig/signals/go");
        assert_eq!(call("POST", &url, Some(&admin), Some(n.to_string().as_bytes())).0, 202);
    }
    let out = wait_status(&base, &admin, "sig", "completed")["output"].clone();
    assert_eq!(out, json!((1..=SIGNALS).collect::<Vec<_>>()));
    let mut got: Vec<(u64, String, Value)> = Vec::new();
    let ended = |got: &[(u64, String, Value)], run: &str| {
        got.iter().any(|(_, kind, d)| kind == "status" && d["run_id"] == run && d["status"] == "completed")
    };
    while !(ended(&got, "steps") && ended(&got, "sig")) {
        got.push(stream.next().unwrap());
    }
    let seqs: Vec<u64> = got.iter().map(|e| e.0).collect();
    assert!(seqs.windows(2).all(|p| p[0] < p[1]), "once each, in order: {seqs:?}");
    assert_eq!(got, read_events(&base, "/api/events", &admin, Some(0), got.len()), "as stored");
    assert_eq!(got.iter().filter(|(_, k, d)| k == "history" && d["run_id"] == "steps").count(), STEPS);
    let _ = worker.kill();
    let _ = worker.wait();
    drop(server);
}
