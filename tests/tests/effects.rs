//! Effects from steps (ABI version 2): HTTP with idempotency keys under the
//! run's allowlist, key-value state committed with the step, compensations,
//! and cancellation with a grace period.

use std::time::Duration;

use cairn_e2e::{FakePayments, World, assert_fails, guest, json_stdout, kill9, text, wait_until};
use serde_json::{Value, json};

fn effects() -> String {
    guest("effects").display().to_string()
}

/// `cairn run effects.wasm --input INPUT EXTRA...`
fn run(w: &World, input: Value, extra: &[&str]) -> std::process::Output {
    let input = input.to_string();
    let wasm = effects();
    let mut args = vec!["run", wasm.as_str(), "--input", input.as_str()];
    args.extend(extra);
    w.run(&args)
}

fn kv_get(w: &World, ns: &str, key: &str) -> Option<Value> {
    let out = w.run(&["kv", "get", "--namespace", ns, key]);
    match out.status.code() {
        Some(0) => Some(serde_json::from_slice(&out.stdout).expect("a JSON value")),
        Some(1) => None,
        other => panic!("kv get exited {other:?}: {}", text(&out.stderr)),
    }
}

#[test]
fn a_charge_interrupted_after_the_answer_is_sent_again_with_the_same_key_and_taken_once() {
    let w = World::new("http-charge");
    let pay = FakePayments::start(&["--api-key", "sk_test_secret"]);
    let allow = format!("127.0.0.1:{}", pay.port());
    let header = format!("{allow}:X-Api-Key=@env:PAY_KEY");
    let input = json!({"mode": "charge", "url": pay.url, "amount_cents": 1250, "pause_ms": 60_000}).to_string();
    let wasm = effects();
    let mut child = w
        .cmd(&["run", &wasm, "--run-id", "ch", "--input", &input, "--allow-http", &allow, "--http-header", &header])
        .env("PAY_KEY", "sk_test_secret")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The service answered (the charge exists); the step has not committed.
    wait_until("the charge", Duration::from_secs(30), || {
        pay.stats()["charges"].as_array().is_some_and(|c| c.len() == 1)
    });
    kill9(&mut child);
    assert_eq!(w.show("ch")["history"].as_array().unwrap().len(), 0, "the step did not commit");

    // The resume sends the charge again, with the same key: the service
    // answers with the stored charge and takes no second one.
    let out = w.cmd(&["resume", "ch"]).env("PAY_KEY", "sk_test_secret").output().unwrap();
    let result = json_stdout(&out);
    let stats = pay.stats();
    let key = result["key"].as_str().unwrap();
    assert_eq!(stats["requests"], json!({ key: 2 }), "the same key twice, no other: {stats}");
    assert_eq!(stats["charges"].as_array().unwrap().len(), 1, "one charge: {stats}");
    assert_eq!(result["charge"], stats["charges"][0], "the run holds the one charge");
    assert_eq!(result["replayed"], true);
    // The API key went to the service from the host's environment: the
    // database never saw it.
    let db = w.database_bytes();
    assert!(!db.windows(14).any(|win| win == b"sk_test_secret"), "the secret is not stored, nor in the WAL");

    // Without the variable the step cannot authenticate: a clear error.
    let out = run(
        &w,
        json!({"mode": "charge", "url": pay.url, "amount_cents": 1}),
        &["--allow-http", &allow, "--http-header", &header],
    );
    assert_fails(&out, 1, &["no environment variable PAY_KEY"]);
}

#[test]
fn requests_outside_the_allowlist_fail_clearly_and_are_never_sent() {
    let w = World::new("http-allow");
    let pay = FakePayments::start(&[]);
    let port = pay.port();
    let allow = format!("127.0.0.1:{port}");
    let fetch = |url: String, extra: &[&str]| run(&w, json!({"mode": "fetch", "url": url}), extra);

    // Allowed: an IP address and port the run lists.
    let ok = json_stdout(&fetch(format!("{}/ok", pay.url), &["--allow-http", &allow]));
    assert_eq!(ok["status"], 200);
    // A redirect whose hop passes the checks is followed.
    let to = format!("{}/ok", pay.url);
    let ok = json_stdout(&fetch(format!("{}/redirect?to={to}", pay.url), &["--allow-http", &allow]));
    assert_eq!(ok, json!({"status": 200, "len": 11}));

    // Not listed (another port of the same address, a host never named).
    assert_fails(
        &fetch(format!("{}/ok", pay.url), &["--allow-http", "127.0.0.1:1"]),
        1,
        &["is not a host this run may reach", "--allow-http 127.0.0.1"],
    );
    assert_fails(&fetch(format!("{}/ok", pay.url), &[]), 1, &["is not a host this run may reach"]);
    // A redirect to a host that is not listed.
    let elsewhere = format!("http://127.0.0.2:{port}/ok");
    assert_fails(
        &fetch(format!("{}/redirect?to={elsewhere}", pay.url), &["--allow-http", &allow]),
        1,
        &["a redirect was not followed", "127.0.0.2"],
    );
    // A name that resolves to loopback, unless that address is listed too.
    let by_name = format!("http://localhost:{port}/ok");
    assert_fails(
        &fetch(by_name.clone(), &["--allow-http", "localhost"]),
        1,
        &["resolves to 127.0.0.1, a loopback address", "--allow-http 127.0.0.1"],
    );
    let ok = json_stdout(&fetch(by_name, &["--allow-http", "localhost", "--allow-http", "127.0.0.1"]));
    assert_eq!(ok["status"], 200);
    // A response past the run's cap.
    let big = format!("{}/big?bytes=1100000", pay.url);
    assert_fails(
        &fetch(big.clone(), &["--allow-http", &allow, "--max-http-response-mib", "1"]),
        1,
        &["larger than the run's limit of 1 MiB", "--max-http-response-mib"],
    );
    assert_eq!(json_stdout(&fetch(big, &["--allow-http", &allow]))["len"], 1_100_000);
    // Plain http beyond loopback, and other schemes.
    assert_fails(
        &fetch("http://93.184.216.34/".into(), &["--allow-http", "93.184.216.34"]),
        1,
        &["--allow-http-insecure"],
    );
    assert_fails(&fetch("file:///etc/passwd".into(), &["--allow-http", &allow]), 1, &["only http and https"]);
    // Refusals are permanent: one attempt each, never retried.
    let stats = pay.stats();
    assert_eq!(stats["requests"], json!({}), "nothing refused reached the service (it keys only POSTs)");

    // A network error or a timeout is an ordinary error: retried by the
    // step's policy (two attempts here), then the step's error.
    let retried = |w: &World, id: &str| {
        let show = w.show(id);
        show["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["status"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let refused_port = json!({"mode": "fetch", "url": "http://127.0.0.1:1/"}).to_string();
    let wasm = effects();
    let out = w.run(&["run", &wasm, "--run-id", "refused", "--input", &refused_port, "--allow-http", "127.0.0.1:1"]);
    assert_fails(&out, 1, &["Connection refused"]);
    assert_eq!(retried(&w, "refused"), ["failed", "error"]);
    let slow = json!({"mode": "fetch", "url": format!("{}/slow?ms=3000", pay.url)}).to_string();
    let out =
        w.run(&["run", &wasm, "--run-id", "slow", "--input", &slow, "--allow-http", &allow, "--http-timeout", "0.2"]);
    assert_fails(&out, 1, &["timed out after 200ms"]);
    assert_eq!(retried(&w, "slow"), ["failed", "error"]);
    // A refusal is permanent: one attempt, never retried.
    let out = w.run(&["run", &wasm, "--run-id", "unlisted", "--input", &refused_port]);
    assert_fails(&out, 1, &["is not a host this run may reach"]);
    assert_eq!(retried(&w, "unlisted"), ["error"]);

    // Between steps, HTTP fails with a clear, permanent error.
    let out = run(&w, json!({"mode": "fetch_outside", "url": format!("{}/ok", pay.url)}), &["--allow-http", &allow]);
    assert_fails(&out, 1, &["permanent=true", "only inside a step", "replay would send the request again"]);

    // A bad pattern is refused before a run exists.
    assert_fails(
        &fetch(format!("{}/ok", pay.url), &["--allow-http", "http://x.test/"]),
        2,
        &["give a host, not a URL"],
    );
}

#[test]
fn concurrent_increments_of_one_key_lose_nothing_across_worker_kills() {
    let w = World::new("kv-counter");
    let wasm = effects();
    let input = json!({"mode": "incr", "key": "counter", "times": 50, "pause_ms": 2}).to_string();
    let ids: Vec<String> = (0..20)
        .map(|i| {
            let id = format!("inc{i}");
            let out = w.run(&["start", &wasm, "--run-id", &id, "--input", &input, "--kv-namespace", "shared"]);
            assert!(out.status.success(), "{}", text(&out.stderr));
            id
        })
        .collect();
    let done = |w: &World| w.runs().iter().filter(|r| r["status"] == "completed").count();
    // Kill the worker a few times while the runs race for the one key.
    for round in 0..3 {
        let mut worker = w.spawn(&["worker", "--concurrency", "32"], &format!("worker{round}"));
        let before = kv_get(&w, "shared", "counter").and_then(|v| v.as_u64()).unwrap_or(0);
        wait_until("progress", Duration::from_secs(60), || {
            kv_get(&w, "shared", "counter").and_then(|v| v.as_u64()).unwrap_or(0) >= before + 150 || done(&w) == 20
        });
        kill9(&mut worker);
    }
    let mut worker = w.spawn(&["worker", "--concurrency", "32"], "worker-last");
    wait_until("all 20 runs", Duration::from_secs(120), || done(&w) == 20);
    kill9(&mut worker);
    assert_eq!(kv_get(&w, "shared", "counter"), Some(json!(1000)), "20 runs x 50 increments, none lost or doubled");
    for id in &ids {
        let show = w.show(id);
        let steps: Vec<&Value> = show["history"].as_array().unwrap().iter().filter(|e| e["kind"] == "step").collect();
        assert_eq!(steps.len(), 50, "run {id}: conflicts are not journaled, 50 steps exactly");
        assert!(steps.iter().all(|e| e["status"] == "completed"), "run {id}: no failed attempts from conflicts");
    }
    // The list shows the key with its version: one write per increment.
    let list = json_stdout(&w.run(&["kv", "list", "--namespace", "shared", "--json"]));
    assert_eq!(list[0]["key"], "counter");
    assert_eq!(list[0]["version"], 1000);
}

#[test]
fn writes_of_a_failed_or_crashed_attempt_leave_no_trace() {
    let w = World::new("kv-atomic");
    let ns = ["--kv-namespace", "atomic"];
    for (key, panic, needle) in
        [("after_panic", true, "crashed after the write"), ("after_error", false, "failed for good")]
    {
        let out = run(&w, json!({"mode": "write_then_fail", "key": key, "panic": panic}), &ns);
        // (The guest's own panic message is on stderr too: not assert_fails.)
        assert_eq!(out.status.code(), Some(1));
        assert!(text(&out.stderr).contains(needle), "{}", text(&out.stderr));
        assert_eq!(kv_get(&w, "atomic", key), None, "{key}: the attempt's write is gone");
    }
    // A kill after the write, before the step committed: nothing; the
    // resumed run writes once.
    let wasm = effects();
    let input = json!({"mode": "incr", "key": "n", "times": 1, "pause_ms": 60_000}).to_string();
    let mut child = w.spawn(&["run", &wasm, "--run-id", "k", "--input", &input, "--kv-namespace", "atomic"], "k");
    wait_until("the step to run", Duration::from_secs(30), || w.read("k.stderr").contains("started"));
    std::thread::sleep(Duration::from_millis(300));
    kill9(&mut child);
    assert_eq!(kv_get(&w, "atomic", "n"), None, "the killed attempt wrote nothing");
    // Operators see and change the namespace; a step reads what they wrote.
    assert!(w.run(&["kv", "put", "--namespace", "atomic", "n", "41"]).status.success());
    let input = json!({"mode": "incr", "key": "n", "times": 1}).to_string();
    assert!(w.run(&["run", &wasm, "--input", &input, "--kv-namespace", "atomic"]).status.success());
    assert_eq!(kv_get(&w, "atomic", "n"), Some(json!(42)));
    assert!(w.run(&["kv", "delete", "--namespace", "atomic", "n"]).status.success());
    assert_eq!(kv_get(&w, "atomic", "n"), None);
    assert_fails(&w.run(&["kv", "put", "--namespace", "atomic", "n", "{not json"]), 2, &["not valid JSON"]);
    // The namespace of a run without --kv-namespace is its module's hash.
    let out = run(&w, json!({"mode": "incr", "key": "own", "times": 2}), &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let module = w.runs().last().unwrap()["module"].as_str().unwrap().to_string();
    assert_eq!(module.len(), 64);
    assert_eq!(kv_get(&w, &module, "own"), Some(json!(2)));
}

#[test]
fn a_saga_compensates_in_reverse_exactly_once_across_a_kill() {
    let w = World::new("saga");
    let wasm = effects();
    let input = json!({"mode": "saga", "pause_ms": 1_500}).to_string();
    let mut child = w.spawn(&["run", &wasm, "--run-id", "trip", "--input", &input, "--kv-namespace", "saga"], "trip");
    // The first undo (of the hotel) committed; the second is under way.
    wait_until("the first undo", Duration::from_secs(30), || kv_get(&w, "saga", "undone").is_some());
    kill9(&mut child);
    let out = w.run(&["resume", "trip"]);
    assert_fails(&out, 1, &["no cars left"]);
    assert_eq!(
        kv_get(&w, "saga", "undone"),
        Some(json!(["undo book_hotel-ok", "undo book_flight-ok"])),
        "both undos, newest first, each once"
    );
    let show = w.show("trip");
    let names: Vec<&str> = show["history"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["book_flight", "book_hotel", "book_car", "undo:book_hotel", "undo:book_flight"]);
    assert_eq!(show["status"], "failed");
}

#[test]
fn cancel_with_grace_lets_the_workflow_compensate_and_ends_cancelled() {
    let w = World::new("grace");
    let wasm = effects();
    let input = json!({"mode": "reserve"}).to_string();
    // A run waiting for a signal, in a live process.
    let mut child = w.spawn(&["run", &wasm, "--run-id", "r1", "--input", &input, "--kv-namespace", "g1"], "r1");
    wait_until("the wait", Duration::from_secs(30), || w.try_show("r1").is_some_and(|s| s["status"] == "waiting"));
    let out = w.run(&["cancel", "r1", "--grace", "30"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "the foreground run ends cancelled");
    let show = w.show("r1");
    assert_eq!(show["status"], "cancelled");
    assert_eq!(kv_get(&w, "g1", "reserved"), Some(json!(false)));
    assert_eq!(kv_get(&w, "g1", "released"), Some(json!(["R-1"])));
    let kinds: Vec<&str> = show["history"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["step", "cancel", "step"], "reserve, the cancellation delivered, the undo");

    // A run nobody executes: `cancel --grace` executes it while it compensates.
    let mut child = w.spawn(&["run", &wasm, "--run-id", "r2", "--input", &input, "--kv-namespace", "g2"], "r2");
    wait_until("the wait", Duration::from_secs(30), || w.try_show("r2").is_some_and(|s| s["status"] == "waiting"));
    kill9(&mut child);
    let out = w.run(&["cancel", "r2", "--grace", "30s"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(w.show("r2")["status"], "cancelled");
    assert_eq!(kv_get(&w, "g2", "released"), Some(json!(["R-1"])));

    // Cleanup in a branch: the branch instance replays the delivered
    // cancellation on its way to its spawn.
    let branchy = json!({"mode": "reserve_branch_cleanup"}).to_string();
    let mut child = w.spawn(&["run", &wasm, "--run-id", "r4", "--input", &branchy, "--kv-namespace", "g4"], "r4");
    wait_until("the wait", Duration::from_secs(30), || w.try_show("r4").is_some_and(|s| s["status"] == "waiting"));
    assert!(w.run(&["cancel", "r4", "--grace", "30"]).status.success());
    let _ = child.wait();
    let show = w.show("r4");
    assert_eq!(show["status"], "cancelled", "{show}");
    assert_eq!(kv_get(&w, "g4", "released"), Some(json!(["by a branch"])));

    // A cancellation that arrives while the saga compensates is delivered
    // at the next undo's step: that undo still runs.
    let saga = json!({"mode": "saga", "pause_ms": 1_500}).to_string();
    let mut child = w.spawn(&["run", &wasm, "--run-id", "s1", "--input", &saga, "--kv-namespace", "g5"], "s1");
    wait_until("compensation under way", Duration::from_secs(30), || {
        w.try_show("s1").is_some_and(|s| s["history"].as_array().unwrap().iter().any(|e| e["name"] == "book_car"))
    });
    assert!(w.run(&["cancel", "s1", "--grace", "30"]).status.success());
    let _ = child.wait();
    let show = w.show("s1");
    assert_eq!(show["status"], "cancelled", "{show}");
    assert_eq!(
        kv_get(&w, "g5", "undone"),
        Some(json!(["undo book_hotel-ok", "undo book_flight-ok"])),
        "no undo skipped"
    );
    let kinds: Vec<String> = show["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| format!("{} {}", e["kind"].as_str().unwrap(), e["name"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            "step book_flight",
            "step book_hotel",
            "step book_car",
            "step undo:book_hotel",
            "cancel ",
            "step undo:book_flight"
        ]
    );

    // Without --grace the workflow is not told: nothing is compensated.
    let mut child = w.spawn(&["run", &wasm, "--run-id", "r3", "--input", &input, "--kv-namespace", "g3"], "r3");
    wait_until("the wait", Duration::from_secs(30), || w.try_show("r3").is_some_and(|s| s["status"] == "waiting"));
    assert!(w.run(&["cancel", "r3"]).status.success());
    let _ = child.wait();
    assert_eq!(w.show("r3")["status"], "cancelled");
    assert_eq!(kv_get(&w, "g3", "released"), None);
    assert_eq!(kv_get(&w, "g3", "reserved"), Some(json!(true)));
}

/// A module that takes its time to declare its ABI version: while it is
/// being asked, a pending grace period must not stop it as a module that
/// cannot be told (an epoch tick during `cairn_abi_version` used to, and
/// `cancel --grace` failed with "instance stopped by the host").
#[test]
fn a_grace_period_waits_for_the_module_to_declare_its_abi_version() {
    let w = World::new("grace-abi");
    for (version, told) in [(2, true), (1, false)] {
        // `cairn_abi_version` counts down long enough to meet several epoch
        // ticks; `_start` waits for a signal, then finishes.
        let wat = format!(
            r#"(module
  (import "cairn" "signal_wait" (func $wait (param i32 i32 i64) (result i64)))
  (import "cairn" "finish" (func $finish (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "go") (data (i32.const 16) "\"cleaned up\"")
  (func (export "cairn_abi_version") (result i32) (local $i i32)
    (local.set $i (i32.const 200000000))
    (loop (local.set $i (i32.sub (local.get $i) (i32.const 1))) (br_if 0 (local.get $i)))
    i32.const {version})
  (func (export "_start")
    (drop (call $wait (i32.const 0) (i32.const 2) (i64.const -1)))
    (drop (call $finish (i32.const 0) (i32.const 16) (i32.const 12)))))"#
        );
        let wasm = cairn_e2e::wasm_file(&w, &format!("slow-v{version}.wasm"), &wat);
        let id = format!("v{version}");
        assert!(w.run(&["start", &wasm, "--run-id", &id]).status.success());
        // Nobody executes it: `cancel --grace` does, from a fresh process
        // that has never asked this module its version.
        let out = w.run(&["cancel", &id, "--grace", "30"]);
        assert!(out.status.success(), "ABI version {version}: {}", text(&out.stderr));
        let show = w.show(&id);
        assert_eq!(show["status"], "cancelled", "ABI version {version}: {show}");
        let kinds: Vec<&str> =
            show["history"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
        let (expected, output): (&[&str], _) =
            if told { (&["cancel"], json!("cleaned up")) } else { (&[], Value::Null) };
        assert_eq!(kinds, expected, "ABI version {version}: {show}");
        assert_eq!(show["output"], output, "ABI version {version}: {show}");
    }
}

#[test]
fn the_ecommerce_example_charges_stocks_and_compensates_for_real() {
    let w = World::new("shop");
    let pay = FakePayments::start(&[]);
    let allow = format!("127.0.0.1:{}", pay.port());
    let wasm = guest("ecommerce").display().to_string();
    assert!(w.run(&["kv", "put", "--namespace", "shop", "stock/book", "3"]).status.success());
    let order = |id: &str, qty: u32, fail: bool| {
        json!({"order_id": id, "customer": "ada@example.com", "items": [{"sku": "book", "qty": qty, "unit_cents": 1250}],
               "payment_url": pay.url, "fail_shipping": fail})
        .to_string()
    };
    let shop = |id: &str, input: String| {
        w.run(&["run", &wasm, "--run-id", id, "--kv-namespace", "shop", "--allow-http", &allow, "--input", &input])
    };
    let receipt = json_stdout(&shop("A-1", order("A-1", 2, false)));
    assert_eq!(receipt["charge"], json!({"charge_id": "ch_1", "amount_cents": 2999}));
    assert_eq!(kv_get(&w, "shop", "stock/book"), Some(json!(1)));
    assert_fails(&shop("A-2", order("A-2", 1, true)), 1, &["the carrier refused the parcel"]);
    let stats = pay.stats();
    assert_eq!(stats["refunds"], json!([{"id": "re_1", "charge_id": "ch_2"}]), "the failed order is refunded: {stats}");
    assert_eq!(kv_get(&w, "shop", "stock/book"), Some(json!(1)), "and its book released");
    assert_fails(&shop("A-3", order("A-3", 5, false)), 1, &["book is out of stock (1 left)"]);
    assert_eq!(pay.stats()["charges"].as_array().unwrap().len(), 2, "nothing charged for an order out of stock");
    // Without payment_url it is the example it always was: no network, no grants.
    let plain =
        json!({"order_id": "B-1", "customer": "x@example.com", "items": [{"sku": "pen", "qty": 1, "unit_cents": 100}]});
    let receipt = json_stdout(&w.run(&["run", &wasm, "--input", &plain.to_string()]));
    assert!(receipt["charge"]["charge_id"].as_str().unwrap().starts_with("ch_"));
}
