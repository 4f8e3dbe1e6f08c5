//! Hostile guests, written by hand in WAT: whatever a module does, the host
//! stays up, keeps to the run's limits, and says which limit it hit.

use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use cairn_e2e::{World, assert_fails, kill9, text, wait_until, wasm_file};

/// A workflow module: the exports the host asks for, `body` as `_start`,
/// with `imports` declared first. Memory offset 1024 onwards is free.
fn module(imports: &str, body: &str, data: &str) -> String {
    format!(
        r#"(module
  {imports}
  (import "cairn" "finish" (func $finish (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  {data}
  (func (export "cairn_abi_version") (result i32) i32.const 1)
  (func (export "_start") {body}))"#
    )
}

/// Run to its end, or fail the test after a generous watchdog.
fn run(w: &World, args: &[&str]) -> Output {
    let mut child = w.cmd(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(90) {
            child.kill().ok();
            panic!("{args:?}: the host did not stop the guest");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

const CLOCK: &str =
    r#"(import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))"#;

/// A loop of clock reads outside any step: no host call of it is a durable
/// point, so the CPU limit stops it, and the history limit stops the
/// entries it journals (before: every call restarted the CPU budget, and the
/// host grew its memory until it ran out).
#[test]
fn a_loop_of_cheap_calls_meets_the_cpu_and_history_limits() {
    let w = World::new("clock-loop");
    let wat = module(CLOCK, "(loop (drop (call $clock (i32.const 0) (i64.const 0) (i32.const 1024))) (br 0))", "");
    let wasm = wasm_file(&w, "clock.wasm", &wat);
    let huge = ["--max-history", "100000000", "--max-history-mib", "100000"];
    let mut args = vec!["run", wasm.as_str(), "--run-id", "cpu", "--max-cpu", "0.5", "--durability", "process"];
    args.extend(huge);
    assert_fails(&run(&w, &args), 1, &["CPU limit", "--max-cpu"]);
    let out = run(&w, &["run", &wasm, "--run-id", "hist", "--max-history", "3000", "--durability", "process"]);
    assert_fails(&out, 1, &["limit `--max-history` exceeded"]);
    let out = run(&w, &["run", &wasm, "--run-id", "mib", "--max-history-mib", "1", "--durability", "process"]);
    assert_fails(&out, 1, &["limit `--max-history-mib` exceeded"]);
    let out = run(&w, &["run", &wasm, "--run-id", "total", "--max-run-cpu", "0.3", "--durability", "process"]);
    assert_fails(&out, 1, &["limit `--max-run-cpu` exceeded"]);
    let status = w.show("hist")["status"].clone();
    assert_eq!(status, "failed", "a run past a limit fails for good");
}

/// Run to its end; its output and the peak memory (KiB) of that process.
fn run_measured(w: &World, args: &[&str], tag: &str) -> (std::process::ExitStatus, String, String, i64) {
    use std::os::unix::process::ExitStatusExt;
    #[allow(clippy::zombie_processes)] // reaped by wait4 below, which also reads its usage
    let child = w.spawn(args, tag);
    let (mut status, mut usage) = (0i32, unsafe { std::mem::zeroed::<libc::rusage>() });
    // SAFETY: a pid of ours, valid pointers; reaps the child exactly once.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32, "wait4");
    let read = |ext: &str| std::fs::read_to_string(w.dir.join(format!("{tag}.{ext}"))).unwrap_or_default();
    (std::process::ExitStatus::from_raw(status), read("stdout"), read("stderr"), usage.ru_maxrss)
}

/// `random_get` of 256 MiB into one page of memory answers EFAULT without
/// allocating anything (before: 256 MiB on the host per call); the module
/// reports the errno it got.
#[test]
fn random_get_checks_the_buffer_before_anything_else() {
    let w = World::new("random-len");
    let imports = r#"(import "wasi_snapshot_preview1" "random_get" (func $random (param i32 i32) (result i32)))"#;
    // Writes the errno as one digit pair at 1024 ("21") and finishes with it.
    let body = r#"
      (local $e i32)
      (drop (call $random (i32.const 1024) (i32.const 268435456)))
      (drop (call $random (i32.const 1024) (i32.const 268435456)))
      (local.set $e (call $random (i32.const 1024) (i32.const 268435456)))
      (i32.store8 (i32.const 1024) (i32.add (i32.const 48) (i32.div_u (local.get $e) (i32.const 10))))
      (i32.store8 (i32.const 1025) (i32.add (i32.const 48) (i32.rem_u (local.get $e) (i32.const 10))))
      (drop (call $finish (i32.const 0) (i32.const 1024) (i32.const 2)))"#;
    let wasm = wasm_file(&w, "random.wasm", &module(imports, body, ""));
    let (status, stdout, stderr, peak_kib) = run_measured(&w, &["run", &wasm, "--max-memory", "4"], "random");
    assert!(status.success(), "{stderr}");
    assert_eq!(stdout.trim(), "21", "EFAULT");
    assert!(peak_kib < 128 * 1024, "the host took {peak_kib} KiB for a guest of 4 MiB");
}

const SPAWN_JOIN: &str = r#"
  (import "cairn" "spawn" (func $spawn (param i32 i32 i32 i32) (result i64)))
  (import "cairn" "join" (func $join (param i32 i32) (result i64)))
  (import "cairn" "step_end" (func $step_end (param i32 i32 i32) (result i32)))"#;

/// Spawn branch "b"; in the branch's own instance, end its step with `1`.
/// Leaves the handle in $h.
const SPAWN_B: &str = r#"
      (local $r i64) (local $h i32)
      (local.set $r (call $spawn (i32.const 0) (i32.const 1) (i32.const 0) (i32.const 0)))
      (if (i64.eq (i64.and (i64.shr_u (local.get $r) (i64.const 32)) (i64.const 255)) (i64.const 1))
        (then (drop (call $step_end (i32.const 0) (i32.const 1) (i32.const 1))) (unreachable)))
      (local.set $h (i32.wrap_i64 (local.get $r)))"#;

/// A join of one handle twice is refused (before: each copy of the output
/// was copied again, past any memory limit).
#[test]
fn a_join_takes_each_branch_once() {
    let w = World::new("join-twice");
    let body = format!(
        r#"{SPAWN_B}
      (i32.store (i32.const 2048) (local.get $h))
      (i32.store (i32.const 2052) (local.get $h))
      (drop (call $join (i32.const 2048) (i32.const 2)))
      (drop (call $finish (i32.const 0) (i32.const 1) (i32.const 1)))"#
    );
    let wasm = wasm_file(&w, "join.wasm", &module(SPAWN_JOIN, &body, r#"(data (i32.const 0) "b1")"#));
    assert_fails(&run(&w, &["run", &wasm]), 1, &["given twice"]);
}

/// More branches than `--max-branches` fail the run, naming the flag.
#[test]
fn branches_are_counted() {
    let w = World::new("branch-cap");
    let body = format!(
        r#"{SPAWN_B}
      (local.set $r (call $spawn (i32.const 0) (i32.const 1) (i32.const 0) (i32.const 0)))
      (local.set $r (call $spawn (i32.const 0) (i32.const 1) (i32.const 0) (i32.const 0)))
      (drop (call $finish (i32.const 0) (i32.const 1) (i32.const 1)))"#
    );
    let wasm = wasm_file(&w, "branches.wasm", &module(SPAWN_JOIN, &body, r#"(data (i32.const 0) "b1")"#));
    assert_fails(&run(&w, &["run", &wasm, "--max-branches", "2"]), 1, &["limit `--max-branches` exceeded"]);
}

/// Several memories are refused before a run exists; the memory limit is an
/// instance's.
#[test]
fn one_memory_per_instance() {
    let w = World::new("memories");
    let wat = r#"(module
      (memory (export "memory") 1) (memory 1) (memory 1) (memory 1)
      (func (export "cairn_abi_version") (result i32) i32.const 1)
      (func (export "_start")))"#;
    let wasm = wasm_file(&w, "memories.wasm", wat);
    assert_fails(&run(&w, &["run", &wasm, "--max-memory", "64"]), 2, &["not a valid WebAssembly module"]);
}

/// A timer a million years away, and a huge retry backoff: stored, shown,
/// never a panic.
#[test]
fn far_away_times_are_shown_not_panicked_on() {
    let w = World::new("far-time");
    let imports = r#"(import "cairn" "sleep" (func $sleep (param i64) (result i32)))"#;
    let body = r#"(drop (call $sleep (i64.const 1000000000000000)))
      (drop (call $finish (i32.const 0) (i32.const 0) (i32.const 1)))"#;
    let wasm = wasm_file(&w, "sleep.wasm", &module(imports, body, r#"(data (i32.const 0) "1")"#));
    let mut child: Child = w.spawn(&["run", &wasm, "--run-id", "far", "--park-after", "0"], "far");
    wait_until("the timer to be recorded", Duration::from_secs(30), || {
        w.try_show("far").is_some_and(|s| s["history"].as_array().is_some_and(|h| !h.is_empty()))
    });
    kill9(&mut child);
    let show = w.show("far");
    assert_eq!(show["history"][0]["output"]["wake_at"], "9999-12-31T23:59:59.999Z");
    let out = w.run(&["show", "far"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(w.run(&["runs"]).status.success());
}

/// Guest text reaches the terminal with its control characters escaped, and
/// a result that is not JSON fails the run.
#[test]
fn guest_text_is_escaped_and_results_are_json() {
    let w = World::new("escape");
    let imports = r#"(import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))"#;
    // stderr gets an OSC title sequence; the result is `not json`.
    let body = r#"
      (i32.store (i32.const 100) (i32.const 0))
      (i32.store (i32.const 104) (i32.const 13))
      (drop (call $write (i32.const 2) (i32.const 100) (i32.const 1) (i32.const 200)))
      (drop (call $finish (i32.const 0) (i32.const 16) (i32.const 8)))"#;
    let data = r#"(data (i32.const 0) "\1b]0;owned\07ok\0a") (data (i32.const 16) "not json")"#;
    let wasm = wasm_file(&w, "escape.wasm", &module(imports, body, data));
    let out = run(&w, &["run", &wasm]);
    let err = assert_fails(&out, 1, &["not valid JSON", "\\u{1b}]0;owned\\u{7}ok"]);
    assert!(!err.contains('\u{1b}') && !err.contains('\u{7}'), "raw control characters: {err:?}");
}

/// `--max-wall` ends a run that waits (here parked in a long sleep) at its
/// time, and `--max-payload-mib` a step whose output is too large.
#[test]
fn wall_time_and_payload_limits_end_the_run() {
    let w = World::new("wall-payload");
    let imports = r#"(import "cairn" "sleep" (func $sleep (param i64) (result i32)))"#;
    let body = r#"(drop (call $sleep (i64.const 60000)))
      (drop (call $finish (i32.const 0) (i32.const 0) (i32.const 1)))"#;
    let wasm = wasm_file(&w, "sleep.wasm", &module(imports, body, r#"(data (i32.const 0) "1")"#));
    let out = run(&w, &["run", &wasm, "--max-wall", "1", "--park-after", "0.1"]);
    assert_fails(&out, 1, &["limit `--max-wall` exceeded"]);

    let imports = r#"
      (import "cairn" "step_begin" (func $step_begin (param i32 i32 i32 i32) (result i64)))
      (import "cairn" "step_end" (func $step_end (param i32 i32 i32) (result i32)))"#;
    // A step whose output is 2 MiB (memory grown to 3 MiB first).
    let body = r#"(drop (memory.grow (i32.const 48)))
      (drop (call $step_begin (i32.const 0) (i32.const 4) (i32.const 0) (i32.const 0)))
      (drop (call $step_end (i32.const 0) (i32.const 0) (i32.const 2097152)))
      (drop (call $finish (i32.const 0) (i32.const 0) (i32.const 1)))"#;
    let wasm = wasm_file(&w, "big.wasm", &module(imports, body, r#"(data (i32.const 0) "big1")"#));
    let out = run(&w, &["run", &wasm, "--max-payload-mib", "1"]);
    assert_fails(&out, 1, &["limit `--max-payload-mib` exceeded", "a step's output"]);
}

const STEP_IMPORTS: &str = r#"
  (import "cairn" "step_begin" (func $step_begin (param i32 i32 i32 i32) (result i64)))
  (import "cairn" "step_end" (func $step_end (param i32 i32 i32) (result i32)))
  (import "cairn" "join" (func $join (param i32 i32) (result i64)))"#;

/// Steps in a loop meet the history limit; `join` of nothing in a loop
/// meets the CPU limit (it commits nothing, so it is no durable point);
/// and nothing after `finish` changes the finished run.
#[test]
fn loops_of_steps_and_joins_and_calls_after_finish() {
    let w = World::new("step-loops");
    let data = r#"(data (i32.const 0) "loop1")"#;
    let steps = r#"(loop
        (drop (call $step_begin (i32.const 0) (i32.const 4) (i32.const 0) (i32.const 0)))
        (drop (call $step_end (i32.const 0) (i32.const 4) (i32.const 1)))
        (br 0))"#;
    let wasm = wasm_file(&w, "steps.wasm", &module(STEP_IMPORTS, steps, data));
    let out = run(&w, &["run", &wasm, "--max-history", "200", "--durability", "process"]);
    assert_fails(&out, 1, &["limit `--max-history` exceeded"]);

    let joins = "(loop (drop (call $join (i32.const 0) (i32.const 0))) (br 0))";
    let wasm = wasm_file(&w, "joins.wasm", &module(STEP_IMPORTS, joins, data));
    assert_fails(&run(&w, &["run", &wasm, "--max-cpu", "0.5"]), 1, &["CPU limit"]);

    let twice = r#"(drop (call $finish (i32.const 0) (i32.const 4) (i32.const 1)))
      (drop (call $finish (i32.const 1) (i32.const 0) (i32.const 4)))"#;
    let wasm = wasm_file(&w, "twice.wasm", &module(STEP_IMPORTS, twice, data));
    let out = run(&w, &["run", &wasm, "--run-id", "twice"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "1");
    let show = w.show("twice");
    assert_eq!((show["status"].as_str(), show["output"].as_i64()), (Some("completed"), Some(1)));
}

/// A branch whose every attempt traps, under a policy of endless attempts
/// with no backoff: its attempts meet `--max-history`, and the run goes on.
#[test]
fn endless_branch_attempts_meet_the_history_limit() {
    let w = World::new("branch-attempts");
    // Policy: u32::MAX attempts, no backoff, multiplier 1.0 (48 bytes at 64).
    let data = r#"(data (i32.const 0) "b1")
      (data (i32.const 64) "\ff\ff\ff\ff\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\f0\3f\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00\00")"#;
    let body = r#"
      (local $r i64)
      (local.set $r (call $spawn (i32.const 0) (i32.const 1) (i32.const 64) (i32.const 48)))
      (if (i64.eq (i64.and (i64.shr_u (local.get $r) (i64.const 32)) (i64.const 255)) (i64.const 1))
        (then (unreachable)))
      (i32.store (i32.const 2048) (i32.wrap_i64 (local.get $r)))
      (drop (call $join (i32.const 2048) (i32.const 1)))
      (drop (call $finish (i32.const 0) (i32.const 1) (i32.const 1)))"#;
    let wasm = wasm_file(&w, "endless.wasm", &module(SPAWN_JOIN, body, data));
    let out = run(&w, &["run", &wasm, "--run-id", "endless", "--max-history", "20", "--durability", "process"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let attempts = w.show("endless")["branches"].as_array().unwrap().len();
    assert_eq!(attempts, 20, "the attempts up to the limit are recorded, and no more");
}
