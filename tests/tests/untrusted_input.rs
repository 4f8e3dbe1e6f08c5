//! What Cairn reads from outside the guest: the database file, the
//! compiled-module cache, input files, directory grants, module files. The
//! database and the cache are trusted like code, but a bad value in them is
//! refused with a message, never followed or panicked on.

use std::os::unix::fs::PermissionsExt;

use cairn_e2e::{World, assert_fails, guest, json_stdout, text, wasm_file};
use rusqlite::Connection;

/// A workflow that finishes with `1`.
const ONE: &str = r#"(module
  (import "cairn" "finish" (func $finish (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "1")
  (func (export "cairn_abi_version") (result i32) i32.const 1)
  (func (export "_start") (drop (call $finish (i32.const 0) (i32.const 0) (i32.const 1)))))"#;

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn database_files_are_private() {
    let w = World::new("db-mode");
    let wasm = wasm_file(&w, "one.wasm", ONE);
    assert_eq!(json_stdout(&w.run(&["run", &wasm])), 1);
    let db = w.db.display().to_string();
    for path in [db.clone(), format!("{db}.lock"), format!("{db}-wal"), format!("{db}-shm")] {
        let path = std::path::Path::new(&path);
        if path.exists() {
            assert_eq!(mode(path), 0o600, "{} is open to others", path.display());
        }
    }
    // One that others can read is pointed out (and still works).
    std::fs::set_permissions(&w.db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = w.run(&["runs"]);
    assert!(out.status.success());
    assert!(text(&out.stderr).contains("can be read or written by other users"), "{}", text(&out.stderr));
}

#[test]
fn malformed_rows_are_refused_and_skipped() {
    let w = World::new("bad-rows");
    let wasm = wasm_file(&w, "one.wasm", ONE);
    for id in ["good", "evil", "odd"] {
        assert!(w.run(&["start", &wasm, "--run-id", id]).status.success());
    }
    // A module "hash" that is a path, and one that is not ASCII.
    let sentinel_dir = w.subdir("x");
    let sentinel = sentinel_dir.join("evil.cwasm");
    std::fs::write(&sentinel, b"not native code").unwrap();
    let db = Connection::open(&w.db).unwrap();
    // Edited by hand, as an attacker with the file would.
    db.pragma_update(None, "foreign_keys", false).unwrap();
    let evil = sentinel_dir.join("evil").display().to_string();
    db.execute("UPDATE runs SET module = ?1 WHERE id = 'evil'", [&evil]).unwrap();
    db.execute("UPDATE runs SET module = 'é€ non-ascii' WHERE id = 'odd'", []).unwrap();
    drop(db);

    assert_fails(&w.run(&["resume", "evil"]), 1, &["malformed", "64 lowercase hex"]);
    assert!(sentinel.exists(), "the path in the row was neither read as a module nor deleted");
    let out = w.run(&["runs"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed = text(&out.stdout);
    assert!(listed.contains("good") && !listed.contains("evil"), "{listed}");
    assert!(text(&out.stderr).contains("skipping run"), "{}", text(&out.stderr));
    // The good run still executes; a worker passes over the bad ones.
    assert_eq!(json_stdout(&w.run(&["resume", "good"])), 1);

    // A schema version no Cairn writes.
    Connection::open(&w.db).unwrap().pragma_update(None, "user_version", -1).unwrap();
    assert_fails(&w.run(&["runs"]), 1, &["not a Cairn database", "schema version -1"]);
}

#[test]
fn the_module_cache_is_private_and_checked() {
    let w = World::new("cache");
    let wasm = wasm_file(&w, "one.wasm", ONE);
    let cache = w.subdir("cache");
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = |id: &str| {
        let mut c = w.cmd(&["run", &wasm, "--run-id", id]);
        c.env("CAIRN_CACHE_DIR", &cache);
        c.output().unwrap()
    };
    assert_eq!(json_stdout(&run("a")), 1);
    assert_eq!(mode(&cache), 0o755, "the directory the user named is not changed");
    let private: Vec<_> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(private.len(), 1, "one private subdirectory: {private:?}");
    assert_eq!(mode(&private[0]), 0o700);
    let entries: Vec<_> = std::fs::read_dir(&private[0]).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(entries.iter().all(|e| mode(e) == 0o600), "{entries:?}");
    // An entry planted by someone who can write the cache (a workflow granted
    // it, say), with a valid plain checksum: refused, compiled again.
    let entry = entries[0].clone();
    let mut forged = b"CAIRNCW2".to_vec();
    let payload = b"not native code".to_vec();
    forged.extend_from_slice(&sha256(&payload));
    forged.extend_from_slice(&payload);
    std::fs::write(&entry, forged).unwrap();
    let out = run("forged");
    assert_eq!(json_stdout(&out), 1);
    assert!(text(&out.stderr).contains("authentication code does not match"), "{}", text(&out.stderr));
    // Opened to others: not used (compiled again, not cached), with a warning.
    std::fs::set_permissions(&private[0], std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = run("b");
    assert_eq!(json_stdout(&out), 1);
    assert!(text(&out.stderr).contains("open to other users"), "{}", text(&out.stderr));
}

#[test]
fn input_files_and_modules_are_capped() {
    let w = World::new("caps");
    let wasm = wasm_file(&w, "one.wasm", ONE);
    let out = w.run(&["run", &wasm, "--input", "@/dev/zero", "--max-payload-mib", "1"]);
    assert_fails(&out, 2, &["--input file", "larger than"]);
    let big = w.dir.join("big.wasm");
    let mut bytes = b"\0asm\x01\0\0\0".to_vec();
    bytes.resize(2 << 20, 0);
    std::fs::write(&big, bytes).unwrap();
    assert_fails(&w.run(&["run", big.to_str().unwrap(), "--max-module-mib", "1"]), 2, &["larger than 1 MiB"]);
    // One function of more than a MiB of code.
    let body = "nop ".repeat((1 << 20) + 16);
    let huge = format!(
        r#"(module (memory (export "memory") 1)
          (func (export "cairn_abi_version") (result i32) i32.const 1)
          (func (export "_start") {body}))"#
    );
    let huge = wasm_file(&w, "huge.wasm", &huge);
    assert_fails(&w.run(&["run", &huge]), 2, &["a function of", "it was not compiled"]);
    assert!(w.runs().is_empty(), "no run was created");
}

#[test]
fn read_only_grants_refuse_writes() {
    let w = World::new("dir-ro");
    let data = w.subdir("data");
    let grant = format!("{}::/data", data.display());
    let input = r#"{"waits":[{"name":"never"}],"log":"/data/log.txt"}"#;
    let wasm = guest("signals");
    let out = w.run(&["run", wasm.to_str().unwrap(), "--run-id", "ro", "--dir-ro", &grant, "--input", input]);
    assert_eq!(out.status.code(), Some(1), "the step's write fails: {}", text(&out.stderr));
    assert!(!data.join("log.txt").exists(), "nothing was written through a read-only grant");
    let show = w.show("ro");
    let last = show["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["status"], "error", "the step's last attempt: {show}");
    assert!(last["error"].as_str().unwrap().contains("not permitted"), "{last}");
}

/// SHA-256, by the `sha256sum` every machine here has (the tests need no
/// hashing crate of their own for one forged entry).
fn sha256(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    let hex = String::from_utf8(out.stdout).unwrap();
    (0..64).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
}
