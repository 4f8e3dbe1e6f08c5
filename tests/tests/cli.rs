//! The command-line contract: output on stdout, JSON shapes of `runs` and
//! `show`, example guests, idempotency keys.

use cairn_e2e::{World, guest, json_stdout, text};

const ORDER: &str = r#"{"order_id":"A-7","customer":"ada@example.com","items":[{"sku":"book","qty":2,"unit_cents":1250},{"sku":"pen","qty":1,"unit_cents":300}]}"#;

#[test]
fn ecommerce_runs_and_is_listed_and_shown() {
    let w = World::new("cli-ecommerce");
    let wasm = guest("ecommerce");
    let out = w.run(&["run", wasm.to_str().unwrap(), "--run-id", "order-7", "--input", ORDER]);
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "stdout carries only the output JSON line: {stdout:?}");
    let receipt = json_stdout(&out);
    assert_eq!(receipt["order_id"], "A-7");
    assert_eq!(receipt["total_cents"], 2800);
    assert_eq!(receipt["warehouse_notified"], true);
    assert_eq!(receipt["shipment"]["quote_cents"], 499);
    assert!(text(&out.stderr).contains("[charge_payment] charged 3299 cents"), "guest logs go to stderr");

    let runs = w.runs();
    assert_eq!(runs.len(), 1);
    let r = &runs[0];
    assert_eq!(r["id"], "order-7");
    assert_eq!(r["status"], "completed");
    assert_eq!(r["steps"], 8, "steps and branches");
    assert_eq!(r["module"].as_str().unwrap().len(), 64, "module is its SHA-256");
    assert!(r["created_at"].is_string() && r["finished_at"].is_string());

    let show = w.show("order-7");
    assert_eq!(show["id"], "order-7");
    assert_eq!(show["status"], "completed");
    assert_eq!(show["output"], receipt);
    assert!(show["error"].is_null());
    let steps: Vec<_> =
        show["history"].as_array().unwrap().iter().filter(|e| e["kind"] == "step" || e["kind"] == "spawn").collect();
    let names: Vec<&str> = steps.iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "validate",
            "reserve_inventory",
            "fraud_check",
            "shipping_quote",
            "charge_payment",
            "ship",
            "send_receipt",
            "notify_warehouse"
        ]
    );
    let kinds: Vec<&str> = steps.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["step", "spawn", "spawn", "spawn", "step", "spawn", "spawn", "spawn"]);
    assert_eq!(show["branches"].as_array().unwrap().len(), 6, "six branch outcomes");
    for (i, e) in show["history"].as_array().unwrap().iter().enumerate() {
        assert_eq!(e["position"], i);
        for field in ["kind", "name", "occurrence", "attempt", "status", "output", "error", "started_at", "finished_at"]
        {
            assert!(e.get(field).is_some(), "history entry lacks {field}: {e}");
        }
    }
    assert_eq!(steps[4]["output"]["amount_cents"], 3299);
    assert_eq!(steps[4]["status"], "completed");
    assert_eq!(steps[4]["attempt"], 1);
    assert_eq!(steps[1]["output"]["skus"], 2, "a spawn shows its branch's outcome");

    // The table views work too.
    let table = w.run(&["runs"]);
    assert!(table.status.success() && text(&table.stdout).contains("order-7"));
    let table = w.run(&["show", "order-7"]);
    assert!(table.status.success() && text(&table.stdout).contains("charge_payment"));
}

#[test]
fn repeated_step_names_get_occurrences_and_distinct_keys() {
    let w = World::new("cli-onboarding");
    let wasm = guest("onboarding");
    let input = r#"{"name":"Ada Lovelace","email":"ada@example.com","team":"engines"}"#;
    let out = json_stdout(&w.run(&["run", wasm.to_str().unwrap(), "--run-id", "ada", "--input", input]));
    let emails: Vec<&str> = out["emails_sent"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(emails.len(), 3);
    assert!(emails[0] != emails[1] && emails[1] != emails[2] && emails[0] != emails[2], "{emails:?}");
    let show = w.show("ada");
    let occ: Vec<u64> = show["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"] == "send_email")
        .map(|e| e["occurrence"].as_u64().unwrap())
        .collect();
    assert_eq!(occ, [1, 2, 3]);

    // Keys differ per run and per database.
    let again = json_stdout(&w.run(&["run", wasm.to_str().unwrap(), "--run-id", "ada-2", "--input", input]));
    assert_ne!(again["emails_sent"], out["emails_sent"]);
    let other = World::new("cli-onboarding-other-db");
    let elsewhere = json_stdout(&other.run(&["run", wasm.to_str().unwrap(), "--run-id", "ada", "--input", input]));
    assert_ne!(elsewhere["emails_sent"], out["emails_sent"], "same run id in another database, other keys");
}

#[test]
fn durability_and_db_flags_come_from_the_environment_too() {
    let w = World::new("cli-env");
    let wasm = guest("onboarding");
    let input = r#"{"name":"Grace","email":"grace@example.com","team":"compilers"}"#;
    let out = w
        .cmd(&["run", wasm.to_str().unwrap(), "--run-id", "g", "--input", input])
        .env("CAIRN_DURABILITY", "process")
        .output()
        .unwrap();
    json_stdout(&out);
    let out = w.cmd(&["run", wasm.to_str().unwrap(), "--durability", "fast"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "unknown durability is a usage error");
}

#[test]
fn a_database_being_created_is_not_mistaken_for_a_foreign_one() {
    // One process creates the database while others read it: each reader
    // must see it either empty or complete, never half-made.
    let wasm = guest("benchflow");
    for round in 0..15 {
        let w = World::new("cli-create-race");
        let mut creator = w.cmd(&["run", wasm.to_str().unwrap(), "--input", r#"{"mode":"tiny"}"#]).spawn().unwrap();
        for _ in 0..6 {
            let out = w.run(&["runs", "--json"]);
            let err = text(&out.stderr);
            assert!(!err.contains("not a Cairn database"), "round {round}: {err}");
        }
        assert!(creator.wait().unwrap().success());
    }
}

#[test]
fn a_damaged_compiled_module_cache_entry_is_replaced_not_run() {
    let w = World::new("cli-cache");
    let cache = w.subdir("cache");
    let wasm = guest("benchflow");
    let run = |w: &World| {
        w.cmd(&["run", wasm.to_str().unwrap(), "--input", r#"{"mode":"tiny"}"#])
            .env("CAIRN_CACHE_DIR", &cache)
            .output()
            .unwrap()
    };
    assert_eq!(json_stdout(&run(&w)), 42);
    let entries: Vec<_> = std::fs::read_dir(&cache).unwrap().flatten().collect();
    assert_eq!(entries.len(), 1, "one directory per engine configuration");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        entries[0].metadata().unwrap().permissions().mode() & 0o777,
        0o700,
        "private: entries run as native code"
    );
    let entry = std::fs::read_dir(entries[0].path())
        .unwrap()
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        .unwrap()
        .path();
    // Flip bytes in the middle of the native code.
    let mut bytes = std::fs::read(&entry).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0xff;
    }
    std::fs::write(&entry, &bytes).unwrap();
    let out = run(&w);
    assert_eq!(json_stdout(&out), 42, "recompiled from the module");
    assert!(text(&out.stderr).contains("ignoring bad compiled-module cache entry"), "{}", text(&out.stderr));
    // Truncated: the same.
    let len = std::fs::metadata(&entry).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&entry).unwrap().set_len(len / 3).unwrap();
    assert_eq!(json_stdout(&run(&w)), 42);
}
