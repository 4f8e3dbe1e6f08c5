//! A cancel or a signal committed by another process reaches a run that is
//! waiting in `ctx.wait_signal`: through the change feed, which notices
//! other processes' commits within milliseconds (no 200 ms poll). The delay
//! is read from the database: from the commit of the signal (or cancel
//! request) to the commit of the run taking it (or ending cancelled).

use std::process::Child;
use std::time::{Duration, Instant};

use cairn_e2e::{World, guest, wait_until};
use rusqlite::{Connection, params};

const RUNS: usize = 5;

/// Start a run waiting for signal "go" and wait until it waits.
fn waiting_run(w: &World, id: &str) -> Child {
    let data = w.subdir(id);
    let grant = format!("{}::/data", data.display());
    let input = r#"{"waits":[{"name":"go"}],"log":"/data/log.txt"}"#;
    let wasm = guest("signals");
    let child = w.spawn(&["run", wasm.to_str().unwrap(), "--run-id", id, "--dir", &grant, "--input", input], id);
    wait_until("the run to reach its wait", Duration::from_secs(30), || {
        std::fs::read_to_string(data.join("log.txt")).is_ok_and(|l| l.contains("waiting 0 go"))
    });
    // The log line is written just before the step commits and the wait
    // begins: give it a moment, so the signal finds the run waiting.
    std::thread::sleep(Duration::from_millis(150));
    child
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "the run did not react");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Commit time (µs) of a change of the run, by kind (and status).
fn change_us(db: &Connection, id: &str, kind: &str, status: Option<&str>) -> i64 {
    db.query_row(
        "SELECT c.committed_us FROM changes c JOIN runs r ON r.seq = c.run \
         WHERE r.id = ?1 AND c.kind = ?2 AND (?3 IS NULL OR c.status = ?3) ORDER BY c.seq LIMIT 1",
        params![id, kind, status],
        |r| r.get(0),
    )
    .unwrap_or_else(|e| panic!("no {kind} change of run {id}: {e}"))
}

fn median(mut v: Vec<i64>) -> i64 {
    v.sort_unstable();
    v[v.len() / 2]
}

#[test]
fn signals_and_cancels_from_another_process_reach_a_waiting_run_promptly() {
    let w = World::new("cross-process");
    let mut signal_us = Vec::new();
    let mut cancel_us = Vec::new();
    for i in 0..RUNS {
        let id = format!("sig{i}");
        let mut child = waiting_run(&w, &id);
        assert!(w.run(&["signal", &id, "go", r#""now""#]).status.success());
        assert!(wait_exit(&mut child).success(), "the signalled run completes");
        let db = Connection::open(&w.db).unwrap();
        let sent = change_us(&db, &id, "signal", None);
        let taken: i64 = db
            .query_row(
                "SELECT (SELECT c.committed_us FROM commits c WHERE c.first_seq <= h.id ORDER BY c.first_seq DESC LIMIT 1) \
                 FROM history h JOIN runs r ON r.seq = h.run WHERE r.id = ?1 AND h.kind = 'signal'",
                [&id],
                |r| r.get(0),
            )
            .unwrap();
        signal_us.push(taken - sent);

        let id = format!("cancel{i}");
        let mut child = waiting_run(&w, &id);
        assert!(w.run(&["cancel", &id]).status.success());
        assert_eq!(wait_exit(&mut child).code(), Some(1), "a cancelled run exits 1");
        let requested = change_us(&db, &id, "cancel", None);
        let cancelled = change_us(&db, &id, "status", Some("cancelled"));
        cancel_us.push(cancelled - requested);
    }
    eprintln!(
        "signal: commit to taken, median {} µs {signal_us:?}; cancel: request to cancelled, median {} µs {cancel_us:?}",
        median(signal_us.clone()),
        median(cancel_us.clone())
    );
    for d in signal_us.iter().chain(&cancel_us) {
        assert!((0..1_000_000).contains(d), "a reaction took {d} µs");
    }
}
