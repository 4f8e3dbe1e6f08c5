//! An ABI fuzzer: generated modules call every host import with random
//! pointers, lengths, handles, statuses, durations and orders. Whatever they
//! do, `cairn` never panics, never outlives the run's limits, stays within a
//! memory bound, and leaves a database that opens, lists and passes
//! `PRAGMA integrity_check`. `CAIRN_FUZZ_CASES` sets how many modules (a
//! small number in `make test`).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use cairn_e2e::torture::Rng;
use cairn_e2e::{World, text};
use rusqlite::Connection;

/// Pointers and lengths: inside memory, at its edges, past it, negative.
const PTRS: &[i64] = &[0, 4, 16, 64, 1000, 4096, 65_000, 65_535, 65_536, 70_000, 1 << 20, 0x7fff_ffff, -1, -4096];
const LENS: &[i64] = &[0, 1, 4, 8, 17, 48, 100, 4096, 65_536, 1 << 20, 1 << 28, 0x7fff_ffff, -1];
const STATUSES: &[i64] = &[-1, 0, 1, 2, 3, 0, 0, 1];
const TIMES: &[i64] = &[-1, 0, 1, 5, 50, 1_000, 3_600_000, i64::MAX, i64::MIN, 1_000_000_000_000_000];

/// (import line, call with `$` placeholders: p pointer, l length, s status,
/// t time/i64, h handle/small int)
const CALLS: &[(&str, &str, &str)] = &[
    ("cairn", "input", "(func $input (result i32))"),
    ("cairn", "take", "(func $take (param i32 i32) (result i32))"),
    ("cairn", "step_begin", "(func $step_begin (param i32 i32 i32 i32) (result i64))"),
    ("cairn", "step_end", "(func $step_end (param i32 i32 i32) (result i32))"),
    ("cairn", "finish", "(func $finish (param i32 i32 i32) (result i32))"),
    ("cairn", "panic", "(func $panic (param i32 i32))"),
    ("cairn", "sleep", "(func $sleep (param i64) (result i32))"),
    ("cairn", "signal_wait", "(func $signal_wait (param i32 i32 i64) (result i64))"),
    ("cairn", "spawn", "(func $spawn (param i32 i32 i32 i32) (result i64))"),
    ("cairn", "join", "(func $join (param i32 i32) (result i64))"),
    ("cairn", "http", "(func $http (param i32 i32) (result i64))"),
    ("cairn", "kv_get", "(func $kv_get (param i32 i32) (result i64))"),
    ("cairn", "kv_put", "(func $kv_put (param i32 i32 i32 i32) (result i64))"),
    ("cairn", "kv_delete", "(func $kv_delete (param i32 i32) (result i64))"),
    ("wasi_snapshot_preview1", "clock_time_get", "(func $clock_time_get (param i32 i64 i32) (result i32))"),
    ("wasi_snapshot_preview1", "random_get", "(func $random_get (param i32 i32) (result i32))"),
    ("wasi_snapshot_preview1", "poll_oneoff", "(func $poll_oneoff (param i32 i32 i32 i32) (result i32))"),
    ("wasi_snapshot_preview1", "fd_write", "(func $fd_write (param i32 i32 i32 i32) (result i32))"),
];

fn i32c(v: i64) -> String {
    format!("(i32.const {})", v as i32)
}

fn call(rng: &mut Rng, name: &str) -> String {
    let (p, l, s, t) = (
        |r: &mut Rng| i32c(r.pick(PTRS)),
        |r: &mut Rng| i32c(r.pick(LENS)),
        |r: &mut Rng| i32c(r.pick(STATUSES)),
        |r: &mut Rng| format!("(i64.const {})", r.pick(TIMES)),
    );
    let args = match name {
        "input" => String::new(),
        "take" | "panic" | "random_get" | "http" => format!("{} {}", p(rng), l(rng)),
        "kv_get" | "kv_delete" => {
            if rng.next().is_multiple_of(2) {
                "(i32.const 0) (i32.const 4)".into()
            } else {
                format!("{} {}", p(rng), l(rng))
            }
        }
        "kv_put" => format!("(i32.const 0) (i32.const 4) {} {}", p(rng), l(rng)),
        "step_begin" | "spawn" => {
            // Names from the data segment most of the time, so steps really run.
            let name = if rng.next().is_multiple_of(3) {
                format!("{} {}", p(rng), l(rng))
            } else {
                "(i32.const 0) (i32.const 4)".into()
            };
            let policy = if rng.next().is_multiple_of(2) {
                "(i32.const 0) (i32.const 0)".into()
            } else {
                format!("{} {}", p(rng), l(rng))
            };
            format!("{name} {policy}")
        }
        "step_end" | "finish" => {
            let payload = if rng.next().is_multiple_of(2) {
                "(i32.const 8) (i32.const 1)".into()
            } else {
                format!("{} {}", p(rng), l(rng))
            };
            format!("{} {payload}", s(rng))
        }
        "sleep" => {
            let ms = rng.pick(&[0i64, 1, 5, -1, 20]);
            format!("(i64.const {ms})")
        }
        "signal_wait" => {
            format!("(i32.const 0) (i32.const 4) {}", rng.pick(&["(i64.const 0)", "(i64.const 5)", "(i64.const -1)"]))
        }
        "join" => {
            let count = rng.pick(&[0i64, 1, 2, 3, 1000, -1]);
            format!("{} {}", rng.pick(&["(i32.const 200)", "(i32.const 65532)", "(i32.const -1)"]), i32c(count))
        }
        "clock_time_get" => format!("{} {} {}", i32c(rng.pick(&[0, 1, 2, 3, -1])), t(rng), p(rng)),
        "poll_oneoff" | "fd_write" => format!("{} {} {} {}", p(rng), p(rng), l(rng), p(rng)),
        _ => unreachable!(),
    };
    let drop = !matches!(name, "panic");
    let expr = format!("(call ${name} {args})");
    if drop { format!("(drop {expr})") } else { expr }
}

fn module(rng: &mut Rng) -> String {
    let mut wat = String::from("(module\n");
    for (m, n, sig) in CALLS {
        let _ = writeln!(wat, "  (import \"{m}\" \"{n}\" {sig})");
    }
    wat.push_str("  (memory (export \"memory\") 1)\n");
    // A name, a JSON value, branch handles, a clock subscription.
    wat.push_str("  (data (i32.const 0) \"step1\") (data (i32.const 200) \"\\00\\00\\00\\00\\01\\00\\00\\00\")\n");
    // Both versions the host speaks (version 2 is told of cancellations).
    let version = 1 + rng.next() % 2;
    let _ = write!(
        wat,
        "  (func (export \"cairn_abi_version\") (result i32) i32.const {version})\n  (func (export \"_start\")\n"
    );
    let calls = 1 + rng.next() % 24;
    for _ in 0..calls {
        let (_, name, _) = rng.pick(CALLS);
        let _ = writeln!(wat, "    {}", call(rng, name));
    }
    if rng.next().is_multiple_of(2) {
        wat.push_str("    (drop (call $finish (i32.const 0) (i32.const 8) (i32.const 1)))\n");
    }
    wat.push_str("  ))\n");
    wat
}

#[test]
fn random_host_calls_never_hurt_the_host() {
    let cases: u64 = std::env::var("CAIRN_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(40);
    let w = World::new("abi-fuzz");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for case in 0..cases {
        let wat = module(&mut rng);
        let path = w.dir.join(format!("fuzz{case}.wasm"));
        std::fs::write(&path, wat::parse_str(&wat).unwrap_or_else(|e| panic!("case {case}: {e}\n{wat}"))).unwrap();
        let id = format!("fuzz{case}");
        let limits = ["--max-cpu", "2", "--max-memory", "16", "--max-wall", "3", "--park-after", "0.1"];
        let mut args = vec!["--durability", "process", "run", path.to_str().unwrap(), "--run-id", &id];
        args.extend(limits);
        let started = Instant::now();
        #[allow(clippy::zombie_processes)] // reaped by wait4 below, which also reads its usage
        let child = w.spawn(&args, &id);
        let (mut status, mut usage) = (0i32, unsafe { std::mem::zeroed::<libc::rusage>() });
        // A watchdog: the run's limits end any module well before it.
        let pid = child.id() as i32;
        let watchdog = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(60));
            // SAFETY: plain syscall; a pid already reaped makes it fail harmlessly.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        // SAFETY: a pid of ours, valid pointers; reaps the child once.
        unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        drop(watchdog);
        let stderr = w.read(&format!("{id}.stderr"));
        let took = started.elapsed();
        assert!(took < Duration::from_secs(50), "case {case} ran {took:?}\n{wat}\n{stderr}");
        assert!(libc::WIFEXITED(status), "case {case} died by a signal\n{wat}\n{stderr}");
        let code = libc::WEXITSTATUS(status);
        assert!(code == 0 || code == 1, "case {case} exited {code}\n{wat}\n{stderr}");
        assert!(!stderr.contains("panicked"), "case {case}: a panic\n{wat}\n{stderr}");
        assert!(usage.ru_maxrss < 300 * 1024, "case {case} took {} KiB\n{wat}", usage.ru_maxrss);
    }
    let out = w.run(&["runs", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let runs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(runs.as_array().unwrap().len() as u64, cases, "every run was recorded and lists");
    let mut seen = std::collections::BTreeMap::new();
    for r in runs.as_array().unwrap() {
        let error = r["error"].as_str().unwrap_or("").split([':', '(']).next().unwrap_or("").to_string();
        *seen.entry((r["status"].as_str().unwrap_or("").to_string(), error)).or_insert(0) += 1;
    }
    eprintln!("fuzz outcomes: {seen:#?}");
    let check: String = Connection::open(&w.db).unwrap().query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok");
}
