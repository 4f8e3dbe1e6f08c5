//! Bad input gets a clear error and a non-zero exit, never a panic, and the
//! database still opens and lists the earlier runs afterwards.

use std::process::{Command, Output, Stdio};

use cairn_e2e::{World, guest, json_stdout, text};

const ORDER: &str =
    r#"{"order_id":"A-1","customer":"ada@example.com","items":[{"sku":"book","qty":2,"unit_cents":1250}]}"#;

fn assert_fails(out: &Output, code: i32, needles: &[&str]) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "expected exit {code}; stderr: {err}");
    assert!(!err.contains("panicked"), "a panic is not an error message: {err}");
    for n in needles {
        assert!(err.to_lowercase().contains(&n.to_lowercase()), "missing {n:?} in: {err}");
    }
}

fn wasm_file(w: &World, name: &str, wat: &str) -> String {
    let path = w.dir.join(name);
    std::fs::write(&path, wat::parse_str(wat).unwrap()).unwrap();
    path.display().to_string()
}

#[test]
fn bad_input_is_refused_clearly_and_the_database_survives() {
    let w = World::new("bad-input");
    let ecommerce = guest("ecommerce");
    let ecommerce = ecommerce.to_str().unwrap();
    json_stdout(&w.run(&["run", ecommerce, "--run-id", "good", "--input", ORDER]));

    // Not wasm at all.
    let not_wasm = w.dir.join("notes.wasm");
    std::fs::write(&not_wasm, "hello, I am text").unwrap();
    assert_fails(&w.run(&["run", not_wasm.to_str().unwrap()]), 2, &["not a WebAssembly module"]);

    // Truncated wasm.
    let bytes = std::fs::read(ecommerce).unwrap();
    let truncated = w.dir.join("truncated.wasm");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails(&w.run(&["run", truncated.to_str().unwrap()]), 2, &["not a valid WebAssembly module"]);

    // Missing file.
    assert_fails(&w.run(&["run", "/nonexistent/flow.wasm"]), 2, &["cannot read module"]);

    // A module without the entry points of a workflow.
    let empty = wasm_file(&w, "empty.wasm", "(module (memory (export \"memory\") 1))");
    assert_fails(&w.run(&["run", &empty]), 2, &["not a Cairn workflow", "_start", "cairn_abi_version"]);

    // A module declaring an ABI version this host does not speak.
    let future = wasm_file(
        &w,
        "future.wasm",
        r#"(module (memory (export "memory") 1)
             (func (export "_start"))
             (func (export "cairn_abi_version") (result i32) i32.const 99))"#,
    );
    assert_fails(&w.run(&["run", &future]), 2, &["ABI version 99", "versions 1 to 2"]);

    // A module importing a host function we do not have.
    let unknown = wasm_file(
        &w,
        "unknown-import.wasm",
        r#"(module (import "cairn" "teleport" (func))
             (memory (export "memory") 1)
             (func (export "_start"))
             (func (export "cairn_abi_version") (result i32) i32.const 1))"#,
    );
    assert_fails(&w.run(&["run", &unknown]), 2, &["cairn::teleport"]);

    // Invalid JSON input; missing input file.
    assert_fails(&w.run(&["run", ecommerce, "--input", "{bad json"]), 2, &["not valid JSON"]);
    assert_fails(&w.run(&["run", ecommerce, "--input", "@/nonexistent/input.json"]), 2, &["cannot read --input file"]);

    // Input of the wrong shape: the run fails with the workflow's reason.
    let out = w.run(&["run", ecommerce, "--run-id", "shape", "--input", r#"{"qty":"x"}"#]);
    assert_fails(&out, 1, &["invalid input for this workflow", "missing field"]);

    // Unknown run ids.
    assert_fails(&w.run(&["resume", "no-such-run"]), 1, &["no run with id", "cairn runs"]);
    assert_fails(&w.run(&["show", "no-such-run"]), 1, &["no run with id"]);

    // A --run-id that exists already points at resume.
    assert_fails(
        &w.run(&["run", ecommerce, "--run-id", "good", "--input", ORDER]),
        2,
        &["already exists", "cairn resume good"],
    );
    // A malformed --run-id.
    assert_fails(&w.run(&["run", ecommerce, "--run-id", "no spaces/please"]), 2, &["--run-id"]);
    // Bad grants.
    assert_fails(&w.run(&["run", ecommerce, "--dir", "/nonexistent/dir"]), 2, &["--dir"]);
    assert_fails(&w.run(&["run", ecommerce, "--env", "NOEQUALS"]), 2, &["--env"]);

    // After all that the database opens and lists the earlier runs.
    let runs = w.runs();
    let ids: Vec<&str> = runs.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["good", "shape"]);
    assert_eq!(runs[0]["status"], "completed");
    assert_eq!(runs[1]["status"], "failed");
    json_stdout(&w.run(&["resume", "good"]));
}

/// Commands about existing runs do not create a database at a mistyped path.
#[test]
fn commands_about_runs_need_an_existing_database() {
    let w = World::new("no-db");
    let missing = w.dir.join("typo.db");
    for args in [
        &["runs"][..],
        &["show", "r"],
        &["resume", "r"],
        &["resume", "--all"],
        &["cancel", "r"],
        &["signal", "r", "go"],
    ] {
        let out = w.cmd(args).arg("--db").arg(&missing).output().unwrap();
        assert_fails(&out, 1, &["no database at", "typo.db"]);
        assert!(!missing.exists(), "`cairn {}` created {}", args.join(" "), missing.display());
    }
}

#[test]
fn files_that_are_not_cairn_databases_are_refused_untouched() {
    let w = World::new("bad-db");
    let ecommerce = guest("ecommerce");

    let text_file = w.dir.join("text.db");
    std::fs::write(&text_file, "this is not a database at all, just some text that is long enough").unwrap();
    let before = std::fs::read(&text_file).unwrap();
    let out = w.cmd(&["runs"]).arg("--db").arg(&text_file).output().unwrap();
    assert_fails(&out, 1, &["not a Cairn database"]);
    assert_eq!(std::fs::read(&text_file).unwrap(), before, "the file must not change");

    // Another program's SQLite database, and one from a newer Cairn.
    let other = w.dir.join("other.db");
    let newer = w.dir.join("newer.db");
    json_stdout(
        &w.cmd(&["run", ecommerce.to_str().unwrap(), "--input", ORDER]).arg("--db").arg(&newer).output().unwrap(),
    );
    let script = format!(
        "import sqlite3\n\
         c = sqlite3.connect({other:?}); c.execute('create table t (x)'); c.commit(); c.close()\n\
         c = sqlite3.connect({newer:?}); c.execute('pragma user_version = 999'); c.commit(); c.close()\n",
        other = other.display().to_string(),
        newer = newer.display().to_string()
    );
    let py = Command::new("python3").arg("-c").arg(&script).status().expect("python3 is on the machine");
    assert!(py.success());
    let out = w.cmd(&["runs"]).arg("--db").arg(&other).output().unwrap();
    assert_fails(&out, 1, &["not a Cairn database", "another program"]);
    let out = w.cmd(&["runs"]).arg("--db").arg(&newer).output().unwrap();
    assert_fails(&out, 1, &["newer Cairn", "999"]);
}

#[test]
fn a_database_locked_by_another_process_is_reported() {
    let w = World::new("locked-db");
    let ecommerce = guest("ecommerce");
    json_stdout(&w.run(&["run", ecommerce.to_str().unwrap(), "--run-id", "first", "--input", ORDER]));
    // Another process takes the write lock and holds it.
    let script = format!(
        "import sqlite3, sys, time\n\
         c = sqlite3.connect({db:?}, isolation_level=None)\n\
         c.execute('begin exclusive')\n\
         print('locked', flush=True)\n\
         time.sleep(20)\n",
        db = w.db.display().to_string()
    );
    let mut holder = Command::new("python3").arg("-c").arg(&script).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(holder.stdout.as_mut().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "locked");
    let out = w.run(&["run", ecommerce.to_str().unwrap(), "--run-id", "second", "--input", ORDER]);
    holder.kill().ok();
    holder.wait().ok();
    assert_fails(&out, 4, &["locked by another process"]);
    let ids: Vec<String> = w.runs().iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, ["first"], "nothing half-written");
}
