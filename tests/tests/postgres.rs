//! The same engine on PostgreSQL (`--db postgres://...`): runs, kills and
//! takeovers after the lease, workers sharing one database, signals from
//! other processes through LISTEN/NOTIFY. Each test has a fresh database on
//! the server of `CAIRN_TEST_PG` (`make test` starts one).

use std::collections::HashMap;
use std::time::Duration;

use cairn_e2e::http::{Server, call, open_events, read_events, serve_as, start_run, token, upload, wait_status};
use cairn_e2e::{World, assert_fails, guest, json_stdout, kill9, text, wait_until};
use serde_json::json;

fn benchflow() -> String {
    guest("benchflow").display().to_string()
}

/// Step indexes in a benchflow log, with how often each was logged.
fn logged(path: &std::path::Path) -> HashMap<u64, usize> {
    let mut n = HashMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        if let Some(i) = line.split(' ').next().and_then(|i| i.parse().ok()) {
            *n.entry(i).or_default() += 1;
        }
    }
    n
}

#[test]
fn a_killed_run_is_taken_over_after_its_lease_and_no_committed_step_runs_again() {
    let Some(w) = World::postgres("pg-takeover") else { return };
    let data = w.subdir("data");
    let grant = format!("{}::/data", data.display());
    let input = json!({"mode": "steps", "n": 2000, "log": "/data/log.txt"}).to_string();
    let wasm = benchflow();
    let mut child = w.spawn(&["--lease", "1", "run", &wasm, "--run-id", "k", "--dir", &grant, "--input", &input], "k");
    wait_until("some steps", Duration::from_secs(60), || {
        w.try_show("k").is_some_and(|s| s["steps"].as_u64() >= Some(50))
    });
    kill9(&mut child);
    let committed = w.show("k")["steps"].as_u64().unwrap();
    // The dead process's lease is live for up to a second: named, refused.
    let out = w.run(&["--lease", "1", "resume", "k"]);
    if out.status.code() == Some(4) {
        assert_fails(&out, 4, &["is held by", "until", "(its lease)"]);
    }
    std::thread::sleep(Duration::from_millis(1100));
    let out = json_stdout(&w.run(&["--lease", "1", "resume", "k"]));
    assert_eq!(out, json!((0..2000u64).map(|i| 1000 + i).sum::<u64>()));
    let log = logged(&data.join("log.txt"));
    for i in 0..committed {
        assert_eq!(log.get(&i), Some(&1), "committed step {i} ran once");
    }
    assert!((0..2000).all(|i| log.contains_key(&i)), "every step ran");
    assert_eq!(w.show("k")["status"], "completed");
}

#[test]
fn workers_on_one_database_share_the_runs_and_take_over_a_killed_one() {
    let Some(w) = World::postgres("pg-workers") else { return };
    let data = w.subdir("data");
    let grant = format!("{}::/data", data.display());
    let wasm = benchflow();
    let ids: Vec<String> = (0..40).map(|i| format!("r{i}")).collect();
    let mut a = w.spawn(&["--lease", "1", "worker", "--concurrency", "8"], "worker-a");
    let mut b = w.spawn(&["--lease", "1", "worker", "--concurrency", "8"], "worker-b");
    for id in &ids {
        let input = json!({"mode": "steps", "n": 30, "log": format!("/data/{id}.txt")}).to_string();
        let out = w.run(&["start", &wasm, "--run-id", id, "--dir", &grant, "--input", &input]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let done = |w: &World| w.runs().iter().filter(|r| r["status"] == "completed").count();
    wait_until("some runs done", Duration::from_secs(60), || done(&w) >= 5);
    kill9(&mut a);
    let committed: HashMap<String, u64> =
        w.runs().iter().map(|r| (r["id"].as_str().unwrap().to_string(), r["steps"].as_u64().unwrap())).collect();
    wait_until("every run, the killed worker's after its lease", Duration::from_secs(120), || done(&w) == ids.len());
    kill9(&mut b);
    let expected: u64 = (0..30u64).map(|i| 1000 + i).sum();
    for r in w.runs() {
        let id = r["id"].as_str().unwrap();
        assert_eq!(r["status"], "completed", "{id}");
        let show = w.show(id);
        assert_eq!(show["output"], json!(expected), "{id}");
        let log = logged(&data.join(format!("{id}.txt")));
        for i in 0..committed[id] {
            assert_eq!(log.get(&i), Some(&1), "{id}: step {i}, committed before the kill, ran once");
        }
    }
}

#[test]
fn a_signal_from_another_process_reaches_a_waiting_run() {
    let Some(w) = World::postgres("pg-signals") else { return };
    let wasm = guest("signals").display().to_string();
    let input = r#"{"waits":[{"name":"go"}]}"#;
    let mut child = w.spawn(&["run", &wasm, "--run-id", "s", "--input", input], "s");
    wait_until("the wait", Duration::from_secs(30), || w.try_show("s").is_some_and(|s| s["status"] == "waiting"));
    let sent = std::time::Instant::now();
    assert!(w.run(&["signal", "s", "go", r#"{"n":1}"#]).status.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{}", w.read("s.stderr"));
    assert!(sent.elapsed() < Duration::from_secs(10), "the signal arrived");
    assert_eq!(w.show("s")["output"], json!([{"n": 1}]));
}

/// Fencing: a process frozen (SIGSTOP) longer than its lease while a step
/// runs is taken over; when it wakes (SIGCONT) its commit is refused with a
/// clear message, and the history holds nothing of its stale epoch after
/// the takeover.
#[test]
fn a_frozen_process_cannot_commit_after_another_took_its_run_over() {
    let Some(w) = World::postgres("pg-fencing") else { return };
    let wasm = benchflow();
    let input = json!({"mode": "paced", "n": 12, "sleep_ms": 400}).to_string();
    let mut frozen = w.spawn(&["--lease", "1", "run", &wasm, "--run-id", "f", "--input", &input], "frozen");
    wait_until("two steps", Duration::from_secs(60), || {
        w.try_show("f").is_some_and(|s| s["steps"].as_u64() >= Some(2))
    });
    // SAFETY: plain syscalls on a pid we own.
    unsafe { libc::kill(frozen.id() as i32, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_millis(1600));
    let out = w.run(&["--lease", "1", "resume", "f"]);
    assert!(out.status.success(), "the run is taken over: {}", text(&out.stderr));
    unsafe { libc::kill(frozen.id() as i32, libc::SIGCONT) };
    let status = frozen.wait().unwrap();
    let err = w.read("frozen.stderr");
    assert!(!status.success(), "the frozen process does not finish the run: {err}");
    assert!(err.contains("was taken over by another process"), "a clear line: {err}");
    assert_eq!(w.show("f")["status"], "completed");
    // Per position, one epoch; the stale epoch wrote nothing after the takeover.
    let rows = history_epochs(&w);
    let positions: Vec<i32> = rows.iter().map(|r| r.0).collect();
    assert_eq!(positions, (0..12).collect::<Vec<i32>>(), "one entry per step, no gap, no double");
    let first_new = rows.iter().find(|r| r.1 > 1).expect("the new epoch wrote").0;
    assert!(
        rows.iter().filter(|r| r.1 == 1).all(|r| r.0 < first_new),
        "no entry of the stale epoch after the takeover: {rows:?}"
    );
    assert!(rows.windows(2).all(|p| p[0].1 <= p[1].1), "epochs only grow along the history: {rows:?}");
}

/// (position, epoch) of the history rows of the world's one run.
fn history_epochs(w: &World) -> Vec<(i32, i64)> {
    let url = w.db.to_str().unwrap().to_string();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        let rows = client.query("SELECT position, epoch FROM history ORDER BY position", &[]).await.unwrap();
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    })
}

/// A PostgreSQL restart (`pg_ctl restart -m fast`) in the middle of 100
/// runs: the worker reconnects (its pool, its listener), and every run
/// completes with its output. On a cluster of its own (the other tests
/// share the suite's server), so only where `make test` made one
/// (`CAIRN_TEST_PG_DIR`: the binaries are there).
#[test]
fn a_server_restart_in_the_middle_of_runs_loses_nothing() {
    if std::env::var_os("CAIRN_TEST_PG_DIR").is_none() {
        assert!(std::env::var_os("CAIRN_REQUIRE_PG").is_none() || std::env::var_os("CAIRN_TEST_PG").is_some());
        eprintln!("skipped: no cluster of the tests' own (CAIRN_TEST_PG_DIR)");
        return;
    }
    let mut w = World::new("pg-restart");
    let cluster = Cluster::start(&w.dir.join("pg"));
    w.db = std::path::PathBuf::from(&cluster.url);
    let wasm = benchflow();
    let mut worker = w.spawn(&["--lease", "1", "worker", "--concurrency", "32"], "worker");
    let input = json!({"mode": "paced", "n": 10, "sleep_ms": 60}).to_string();
    for i in 0..100 {
        let id = format!("r{i}");
        let out = w.run(&["start", &wasm, "--run-id", &id, "--input", &input]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let done = |w: &World| w.runs().iter().filter(|r| r["status"] == "completed").count();
    wait_until("some runs done", Duration::from_secs(60), || done(&w) >= 10);
    cluster.run("restart");
    wait_until("all 100 runs after the restart", Duration::from_secs(120), || {
        let out = w.run(&["runs", "--json"]);
        out.status.success()
            && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .map(|v| v.as_array().unwrap().iter().filter(|r| r["status"] == "completed").count() == 100)
                .unwrap_or(false)
    });
    kill9(&mut worker);
    for r in w.runs() {
        assert_eq!(w.show(r["id"].as_str().unwrap())["output"], json!(45), "{}", r["id"]);
    }
    let log = w.read("worker.stderr");
    assert!(log.contains("reconnected"), "the listener reconnected: {log}");
}

/// A throwaway cluster of one test (`scripts/pg-cluster.sh`), stopped when dropped.
struct Cluster {
    dir: std::path::PathBuf,
    url: String,
}

impl Cluster {
    fn script() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/pg-cluster.sh")
    }

    fn start(dir: &std::path::Path) -> Cluster {
        let out = std::process::Command::new(Self::script())
            .arg("start")
            .arg(dir)
            .env_remove("CAIRN_TEST_PG")
            .env("CAIRN_PG_OPTIONS", "-c fsync=off")
            .output()
            .unwrap();
        assert!(out.status.success(), "cluster: {}", text(&out.stderr));
        Cluster { dir: dir.to_path_buf(), url: text(&out.stdout).trim().to_string() }
    }

    fn run(&self, action: &str) {
        let out = std::process::Command::new(Self::script())
            .arg(action)
            .arg(&self.dir)
            .env_remove("CAIRN_TEST_PG")
            .output()
            .unwrap();
        assert!(out.status.success(), "{action}: {}", text(&out.stderr));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ =
            std::process::Command::new(Self::script()).arg("stop").arg(&self.dir).env_remove("CAIRN_TEST_PG").output();
    }
}

/// Rows of a query on the world's database, each as its columns' text.
fn sql(w: &World, query: &str) -> Vec<Vec<Option<String>>> {
    let url = w.db.to_str().unwrap().to_string();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        let rows = client.simple_query(query).await.unwrap();
        rows.iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                }
                _ => None,
            })
            .collect()
    })
}

/// A run that sleeps longer than a lease is given back while it sleeps
/// (nobody holds it, no heartbeat renews it), found again by its wake-up
/// time, and finished, also when the worker that parked it died meanwhile.
#[test]
fn a_long_sleep_is_given_back_and_claimed_again_when_due() {
    let Some(w) = World::postgres("pg-sleep") else { return };
    let wasm = benchflow();
    let worker = |tag: &str| w.spawn(&["--lease", "1", "--park-after", "0.2", "worker", "--concurrency", "4"], tag);
    let mut a = worker("worker-a");
    let input = json!({"mode": "park", "sleep_ms": 3000}).to_string();
    let out = w.run(&["start", &wasm, "--run-id", "s", "--input", &input]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let state = |w: &World| sql(w, "SELECT status, owner IS NULL, wake_at IS NOT NULL FROM runs WHERE id = 's'");
    let given_back = vec![vec![Some("sleeping".to_string()), Some("t".into()), Some("t".into())]];
    wait_until("the sleeping run given back", Duration::from_secs(20), || state(&w) == given_back);
    // Logged once the release is committed.
    wait_until("the worker to say so", Duration::from_secs(20), || {
        w.read("worker-a.stderr").contains("given back until then")
    });
    // The worker that parked it dies; another claims it when it is due.
    kill9(&mut a);
    let mut b = worker("worker-b");
    wait_until("the run completed", Duration::from_secs(30), || w.show("s")["status"] == "completed");
    // By the second worker (it logs once the end is committed).
    wait_until("the second worker to say so", Duration::from_secs(20), || {
        w.read("worker-b.stderr").contains("run s completed")
    });
    kill9(&mut b);
    assert_eq!(w.show("s")["output"], json!(3));
    let history = sql(
        &w,
        "SELECT h.name, h.epoch FROM history h JOIN runs r ON r.seq = h.run WHERE r.id = 's' AND h.kind = 'step' ORDER BY h.position",
    );
    let names: Vec<_> = history.iter().map(|r| r[0].clone().unwrap()).collect();
    assert_eq!(names, ["before", "after"], "each step once");
    let epochs: Vec<u64> = history.iter().map(|r| r[1].clone().unwrap().parse().unwrap()).collect();
    assert!(epochs[1] > epochs[0], "claimed again after the sleep: {epochs:?}");
}

/// A run that waits for a signal longer than a lease is given back while
/// it waits, and stays so (no worker claims it for nothing); a signal sent
/// after its worker died brings it back: another worker claims it and
/// finishes it with the payload.
#[test]
fn a_long_signal_wait_is_given_back_and_claimed_again_when_signalled() {
    let Some(w) = World::postgres("pg-wait") else { return };
    let signals = guest("signals").display().to_string();
    let worker = |tag: &str| w.spawn(&["--lease", "1", "--park-after", "0.2", "worker", "--concurrency", "4"], tag);
    let mut a = worker("worker-a");
    let out = w.run(&["start", &signals, "--run-id", "g", "--input", r#"{"waits":[{"name":"go"}]}"#]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let state = |w: &World| sql(w, "SELECT status, owner IS NULL, waiting_for FROM runs WHERE id = 'g'");
    let given_back = vec![vec![Some("waiting".to_string()), Some("t".into()), Some("go".into())]];
    wait_until("the waiting run given back", Duration::from_secs(20), || state(&w) == given_back);
    // Logged once the release is committed.
    wait_until("the worker to say so", Duration::from_secs(20), || {
        w.read("worker-a.stderr").contains("waits for signal go; given back")
    });
    kill9(&mut a);
    let mut b = worker("worker-b");
    // Past a lease and a sweep: nobody took it up without its signal.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(state(&w), given_back);
    assert!(w.run(&["signal", "g", "go", "7"]).status.success());
    wait_until("the run completed", Duration::from_secs(30), || w.show("g")["status"] == "completed");
    // By the second worker (it logs once the end is committed).
    wait_until("the second worker to say so", Duration::from_secs(20), || {
        w.read("worker-b.stderr").contains("run g completed")
    });
    kill9(&mut b);
    assert_eq!(w.show("g")["output"], json!([7]));
}

/// A loopback proxy to the database that, once, cuts the connection whose
/// client sent a message holding `marker`: after forwarding it, before the
/// server's answer comes back (the statement runs and commits, and the
/// client cannot know it), or, without `forward`, before the server gets it.
struct CuttingProxy {
    port: u16,
    cuts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Set when the proxy goes: it stops listening (a test that fails too).
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the accepting thread, which then sees `stop`.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

impl CuttingProxy {
    fn start(upstream: std::net::SocketAddr, marker: &'static [u8], forward: bool) -> CuttingProxy {
        use std::io::{Read, Write};
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cuts = Arc::new(AtomicUsize::new(0));
        let counted = cuts.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        // Listens until the proxy is dropped; a connection's threads end
        // with its sockets (the client's process is gone by then).
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                if stopping.load(SeqCst) {
                    return;
                }
                let Ok(server) = std::net::TcpStream::connect(upstream) else { continue };
                let muted = Arc::new(AtomicBool::new(false));
                let (mut from_server, mut to_client) = (server.try_clone().unwrap(), client.try_clone().unwrap());
                let quiet = muted.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    while let Ok(n @ 1..) = from_server.read(&mut buf) {
                        // Swallowed once the cut is on: the answer is lost.
                        if !quiet.load(SeqCst) && to_client.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
                let (mut from_client, mut to_server, cuts) = (client, server, counted.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    while let Ok(n @ 1..) = from_client.read(&mut buf) {
                        let cut = cuts.load(SeqCst) == 0 && buf[..n].windows(marker.len()).any(|w| w == marker);
                        if cut {
                            muted.store(true, SeqCst);
                        }
                        if (forward || !cut) && to_server.write_all(&buf[..n]).is_err() {
                            return;
                        }
                        if cut {
                            cuts.fetch_add(1, SeqCst);
                            // Time for the server to run and commit it.
                            std::thread::sleep(Duration::from_millis(300));
                            let _ = from_client.shutdown(std::net::Shutdown::Both);
                            let _ = to_server.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                    }
                });
            }
        });
        CuttingProxy { port, cuts, stop }
    }
}

/// The connection drops after a step's commit reached the server and
/// before its answer came back. The writer reads the run's history again
/// on a new connection, finds the step there under its own epoch, and the
/// run goes on: the step does not run again, and the run is not given up.
#[test]
fn a_commit_whose_answer_is_lost_is_settled_by_reading_the_history_again() {
    commit_cut("pg-unknown-landed", true);
}

/// The same, when the commit never reached the server: the history shows
/// it did not land, and it is committed again.
#[test]
fn a_commit_lost_on_its_way_is_committed_again_once_the_history_shows_it_missing() {
    commit_cut("pg-unknown-lost", false);
}

fn commit_cut(name: &str, forward: bool) {
    let Some(w) = World::postgres(name) else { return };
    let db = w.db.to_str().unwrap();
    let (head, tail) = db.split_once('@').unwrap();
    let (authority, path) = tail.split_once('/').unwrap();
    let upstream: std::net::SocketAddr = authority.parse().expect("the test server is at an IP address and port");
    // Step 100's row: its output holds this, and no other step's does.
    let proxy = CuttingProxy::start(upstream, br#""index":100,"#, forward);
    let url = format!("{head}@127.0.0.1:{}/{path}", proxy.port);
    let data = w.subdir("data");
    let grant = format!("{}::/data", data.display());
    let input = json!({"mode": "steps", "n": 300, "log": "/data/log.txt"}).to_string();
    let out = w
        .cmd_on(url.as_ref(), &["run", &benchflow(), "--run-id", "u", "--dir", &grant, "--input", &input])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(proxy.cuts.load(std::sync::atomic::Ordering::SeqCst), 1, "the proxy cut a commit's answer");
    assert_eq!(json_stdout(&out), json!((0..300u64).map(|i| 1000 + i).sum::<u64>()));
    let log = logged(&data.join("log.txt"));
    assert!((0..300).all(|i| log.get(&i) == Some(&1)), "every step ran once: {:?}", log.get(&100));
    let epochs = sql(&w, "SELECT DISTINCT h.epoch FROM history h JOIN runs r ON r.seq = h.run WHERE r.id = 'u'");
    assert_eq!(epochs.len(), 1, "one epoch wrote the whole history: {epochs:?}");
}

/// Three workers, 1,000 runs of steps, branches, sleeps and signals; one
/// worker killed with SIGKILL mid-way and started again. Every run
/// completes with its output, no step committed before the kill runs
/// again, and each run's history was written by one epoch at a time.
#[test]
fn three_workers_run_a_thousand_runs_through_a_kill() {
    let Some(w) = World::postgres("pg-thousand") else { return };
    let data = w.subdir("data");
    let grant = format!("{}::/data", data.display());
    let (benchflow, signals) = (benchflow(), guest("signals").display().to_string());
    let worker = |tag: &str| w.spawn(&["--lease", "1", "worker", "--concurrency", "64"], tag);
    let mut workers = vec![worker("worker-0"), worker("worker-1"), worker("worker-2")];

    // (id, module, input, expected output)
    let mut runs: Vec<(String, &str, String, serde_json::Value)> = Vec::new();
    for i in 0..1000 {
        let id = format!("r{i:04}");
        let (module, input, output) = match i % 10 {
            0 => (&benchflow, json!({"mode": "branches", "n": 3, "sleep_ms": 20}), json!(3)),
            1 => (&benchflow, json!({"mode": "park", "sleep_ms": 300}), json!(3)),
            2 => (&signals, json!({"waits": [{"name": "go"}]}), json!([i])),
            _ => {
                let log = format!("/data/{id}.txt");
                (&benchflow, json!({"mode": "steps", "n": 5, "log": log}), json!(5010))
            }
        };
        runs.push((id, module.as_str(), input.to_string(), output));
    }
    // Started 8 at a time (each `cairn start` is a process).
    for chunk in runs.chunks(8) {
        let children: Vec<_> = chunk
            .iter()
            .map(|(id, module, input, _)| {
                w.cmd(&["start", module, "--run-id", id, "--dir", &grant, "--input", input])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for c in children {
            let out = c.wait_with_output().unwrap();
            assert!(out.status.success(), "start: {}", text(&out.stderr));
        }
    }
    let completed = |w: &World| sql(w, "SELECT count(*) FROM runs WHERE status = 'completed'")[0][0].clone().unwrap();
    wait_until("a third of the runs", Duration::from_secs(120), || completed(&w).parse::<usize>().unwrap() >= 300);
    kill9(&mut workers[0]);
    // What was committed when the worker died: its steps must not run again.
    let committed: HashMap<String, u64> = sql(
        &w,
        "SELECT r.id, count(h.*) FILTER (WHERE h.kind = 'step' AND h.status = 'completed') \
         FROM runs r LEFT JOIN history h ON h.run = r.seq GROUP BY r.id",
    )
    .into_iter()
    .map(|r| (r[0].clone().unwrap(), r[1].as_deref().unwrap().parse().unwrap()))
    .collect();
    workers[0] = worker("worker-0-again");
    for (i, (id, module, _, _)) in runs.iter().enumerate() {
        if *module == signals {
            let out = w.run(&["signal", id, "go", &i.to_string()]);
            assert!(out.status.success(), "signal {id}: {}", text(&out.stderr));
        }
    }
    wait_until("every run", Duration::from_secs(300), || completed(&w) == "1000");
    for c in &mut workers {
        kill9(c);
    }

    let outputs: HashMap<String, serde_json::Value> = sql(&w, "SELECT id, convert_from(output, 'UTF8') FROM runs")
        .into_iter()
        .map(|r| (r[0].clone().unwrap(), serde_json::from_str(r[1].as_deref().unwrap()).unwrap()))
        .collect();
    for (id, module, input, expected) in &runs {
        assert_eq!(&outputs[id], expected, "run {id}");
        if *module == benchflow && input.contains("\"steps\"") {
            let log = logged(&data.join(format!("{id}.txt")));
            for step in 0..committed[id] {
                assert_eq!(log.get(&step), Some(&1), "run {id}: step {step}, committed before the kill, ran once");
            }
        }
    }
    // One epoch at a time: along each run's history, the epoch never goes back.
    let back = sql(
        &w,
        "SELECT count(*) FROM (SELECT epoch < max(epoch) OVER (PARTITION BY run ORDER BY position \
         ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS back FROM history) h WHERE back",
    );
    assert_eq!(back[0][0].as_deref(), Some("0"), "a history row of an older epoch after a newer one");
    let taken_over = sql(&w, "SELECT count(DISTINCT run) FROM history WHERE epoch > 1");
    assert_ne!(taken_over[0][0].as_deref(), Some("0"), "the killed worker's runs were taken over");
}

/// `cairn migrate --from cairn.db --to postgres://...` moves runs (finished,
/// killed mid-run, waiting with a signal delivered), modules, key-value
/// entries and tokens; it refuses while a process executes one of the runs,
/// and refuses a target that is not empty. The runs go on on PostgreSQL
/// with no committed step run again.
#[test]
fn an_sqlite_database_moves_to_postgres_whole() {
    let Some(pg) = World::postgres("pg-migrate") else { return };
    let lite = World::sqlite("pg-migrate-sqlite");
    let data = lite.subdir("data");
    let grant = format!("{}::/data", data.display());
    let (wasm, signals) = (benchflow(), guest("signals").display().to_string());
    let ok = |out: std::process::Output| assert!(out.status.success(), "{}", text(&out.stderr));
    ok(lite.run(&["run", &wasm, "--run-id", "done", "--input", r#"{"mode":"steps","n":5}"#]));
    let input = json!({"mode": "steps", "n": 300, "log": "/data/log.txt"}).to_string();
    let mut child = lite.spawn(&["run", &wasm, "--run-id", "killed", "--dir", &grant, "--input", &input], "killed");
    wait_until("some steps", Duration::from_secs(60), || {
        lite.try_show("killed").is_some_and(|s| s["steps"].as_u64() >= Some(20))
    });
    kill9(&mut child);
    let committed = lite.show("killed")["steps"].as_u64().unwrap();
    ok(lite.run(&["start", &signals, "--run-id", "sig", "--input", r#"{"waits":[{"name":"go"}]}"#]));
    ok(lite.run(&["signal", "sig", "go", r#""hello""#]));
    ok(lite.run(&["kv", "put", "--namespace", "ns", "k", r#"{"a":1}"#]));
    ok(lite.run(&["token", "create", "--name", "ops", "--role", "operator"]));

    let from = lite.db.to_str().unwrap();
    let to = pg.db.to_str().unwrap();
    // A run another process executes: refused, nothing moved.
    let paced = r#"{"mode":"paced","n":100000,"sleep_ms":5}"#;
    let mut live = lite.spawn(&["run", &wasm, "--run-id", "live", "--input", paced], "live");
    wait_until("the live run", Duration::from_secs(60), || {
        lite.try_show("live").is_some_and(|s| s["steps"].as_u64() >= Some(1))
    });
    assert_fails(&lite.run(&["migrate", "--from", from, "--to", to]), 4, &["live", "another cairn process"]);
    assert!(pg.runs().is_empty(), "a refused migrate wrote nothing");
    kill9(&mut live);

    ok(lite.run(&["migrate", "--from", from, "--to", to]));
    assert_fails(&lite.run(&["migrate", "--from", from, "--to", to]), 2, &["not empty"]);
    for id in ["done", "killed", "sig", "live"] {
        assert_eq!(pg.show(id), lite.show(id), "run {id} reads the same on both");
    }
    assert_eq!(json_stdout(&pg.run(&["kv", "get", "--namespace", "ns", "k"])), json!({"a": 1}));
    assert!(text(&pg.run(&["token", "list"]).stdout).contains("ops"));

    // On PostgreSQL from here: no committed step runs again.
    let out = json_stdout(&pg.run(&["resume", "killed"]));
    assert_eq!(out, json!((0..300u64).map(|i| 1000 + i).sum::<u64>()));
    let log = logged(&data.join("log.txt"));
    for i in 0..committed {
        assert_eq!(log.get(&i), Some(&1), "committed step {i} ran once");
    }
    assert_eq!(json_stdout(&pg.run(&["resume", "sig"])), json!(["hello"]));
    ok(pg.run(&["cancel", "live"]));
    ok(pg.run(&["run", &wasm, "--run-id", "after", "--input", r#"{"mode":"steps","n":2}"#]));
}

/// `sslmode=require`: TLS (rustls) to a server whose certificate the
/// authority of `sslrootcert` signed; without that authority, refused with
/// the reason. On the cluster `make test` made (it has a certificate).
#[test]
fn sslmode_require_connects_with_tls_and_checks_the_certificate() {
    let Some(ca) = std::env::var_os("CAIRN_TEST_PG_DIR").map(|d| std::path::Path::new(&d).join("ca.crt")) else {
        eprintln!("skipped: no cluster of make test's (CAIRN_TEST_PG_DIR)");
        return;
    };
    assert!(ca.exists(), "scripts/pg-cluster.sh made {}", ca.display());
    let Some(mut w) = World::postgres("pg-tls") else { return };
    let plain = w.db.to_str().unwrap().to_string();
    w.db = format!("{plain}?sslmode=require&sslrootcert={}", ca.display()).into();
    let out = w.run(&["run", &benchflow(), "--input", r#"{"mode":"steps","n":3}"#]);
    assert_eq!(json_stdout(&out), json!(3003));
    // A worker's connections, seen by the server: encrypted.
    let mut worker = w.spawn(&["worker"], "worker");
    let encrypted = "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                     WHERE s.ssl AND a.datname = current_database()";
    let mut plain_world = World::sqlite("pg-tls-plain");
    plain_world.db = plain.clone().into();
    wait_until("TLS connections", Duration::from_secs(30), || {
        sql(&plain_world, encrypted)[0][0].as_deref().is_some_and(|n| n != "0")
    });
    kill9(&mut worker);
    w.db = format!("{plain}?sslmode=require").into();
    assert_fails(&w.run(&["runs"]), 1, &["TLS", "certificate", "UnknownIssuer"]);
}

/// A worker stopped cleanly (SIGTERM) gives its leases back at once: a run
/// it held, waiting for a signal, is taken over by another worker long
/// before its 30-second lease would have expired.
#[test]
fn a_clean_stop_gives_the_leases_back_at_once() {
    let Some(w) = World::postgres("pg-clean-stop") else { return };
    let signals = guest("signals").display().to_string();
    let mut a = w.spawn(&["--lease", "30", "worker"], "worker-a");
    let out = w.run(&["start", &signals, "--run-id", "waits", "--input", r#"{"waits":[{"name":"go"}]}"#]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_until("the run waiting", Duration::from_secs(30), || w.show("waits")["steps"].as_u64() >= Some(1));
    // SAFETY: a pid we own.
    unsafe { libc::kill(a.id() as i32, libc::SIGTERM) };
    assert!(a.wait().unwrap().success(), "worker a stopped cleanly");
    let stopped = std::time::Instant::now();
    let mut b = w.spawn(&["--lease", "30", "worker"], "worker-b");
    let out = w.run(&["signal", "waits", "go", r#""now""#]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_until("the run taken over and completed", Duration::from_secs(20), || {
        w.show("waits")["status"] == "completed"
    });
    assert!(stopped.elapsed() < Duration::from_secs(20), "taken over before the lease would have expired");
    kill9(&mut b);
}

/// A worker whose last look left slots free does not ask the database for
/// runs again at every run's end: a finished run makes no other run
/// claimable. (At the tail of a burst every finished run asked, two
/// queries each, and found nothing.) Counted by the server: scans of the
/// index the claim's candidates come from.
#[test]
fn finished_runs_do_not_send_a_worker_looking_for_runs() {
    let Some(w) = World::postgres("pg-quiet-claims") else { return };
    let wasm = benchflow();
    let runs = 150;
    for i in 0..runs {
        let input = json!({"mode": "steps", "n": 5}).to_string();
        let out = w.run(&["start", &wasm, "--run-id", &format!("r{i}"), "--input", &input]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let scans = |w: &World| -> u64 {
        let rows = sql(w, "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = 'runs_wake'");
        rows[0][0].as_deref().unwrap().parse().unwrap()
    };
    let before = scans(&w);
    // Room for every run: the first look takes them all and leaves slots free.
    let started = std::time::Instant::now();
    let mut worker = w.spawn(&["worker", "--concurrency", "200"], "worker");
    let done = |w: &World| w.runs().iter().filter(|r| r["status"] == "completed").count();
    wait_until("every run", Duration::from_secs(60), || done(&w) == runs);
    // A clean stop: the worker's server sessions end and report their counts.
    // SAFETY: a pid we own.
    unsafe { libc::kill(worker.id() as i32, libc::SIGTERM) };
    assert!(worker.wait().unwrap().success(), "the worker stopped cleanly");
    // A session reports its counts before it leaves `pg_stat_activity`.
    let others = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()";
    wait_until("the worker's sessions to end", Duration::from_secs(30), || {
        sql(&w, others)[0][0].as_deref() == Some("0")
    });
    let looks = scans(&w) - before;
    // The first look, then a sweep a second and a look for leases to take
    // over at most ten times a second (each scans the index once); not one
    // a finished run.
    let bound = 1 + 11 * started.elapsed().as_secs_f64().ceil() as u64;
    eprintln!("looks: {looks} (bound {bound})");
    assert!(looks <= bound.min(runs as u64 / 3), "{looks} looks for {runs} runs in {:?}", started.elapsed());
}

/// `CAIRN_COMMIT_SPIN_US` that is not a whole number of microseconds is
/// refused with the reason before the database is touched.
#[test]
fn a_bad_commit_spin_budget_is_refused_and_nothing_is_written() {
    let Some(w) = World::postgres("pg-spin-budget") else { return };
    let out = w
        .cmd(&["run", &benchflow(), "--input", r#"{"mode":"steps","n":3}"#])
        .env("CAIRN_COMMIT_SPIN_US", "fast")
        .output()
        .unwrap();
    assert_fails(&out, 1, &["CAIRN_COMMIT_SPIN_US=\"fast\"", "whole number of microseconds"]);
    assert!(sql(&w, "SELECT to_regclass('runs')::TEXT")[0][0].is_none(), "the database was not even migrated");
    let out = w
        .cmd(&["run", &benchflow(), "--input", r#"{"mode":"steps","n":3}"#])
        .env("CAIRN_COMMIT_SPIN_US", "0")
        .output()
        .unwrap();
    assert_eq!(json_stdout(&out), json!(3003), "0 turns spinning off: {}", String::from_utf8_lossy(&out.stderr));
}

/// Two `cairn serve` processes on one database, as on two machines (the
/// second without a worker), and an admin token.
fn two_servers(name: &str) -> Option<(World, String, Server, Server)> {
    let w = World::postgres(name)?;
    let admin = token(&w, "admin");
    let a = serve_as(&w, "serve-a", &[]);
    let b = serve_as(&w, "serve-b", &["--no-worker"]);
    Some((w, admin, a, b))
}

/// Two `cairn serve` processes on one database, as on two machines, one of
/// them without a worker: runs started through either are executed by the
/// other's worker, signalled and cancelled through either, and listed by
/// both; each server's event stream, open before the first run, carries
/// every change (the other process's commits heard through LISTEN/NOTIFY)
/// with the same numbers and contents as the other's, and as a replay.
#[test]
fn two_servers_on_one_database_share_runs_signals_cancels_and_events() {
    let Some((_w, admin, a, b)) = two_servers("pg-two-servers") else { return };
    let signals = upload(&b.base, &admin, "signals");

    // Both streams are subscribed before anything happens; each is read
    // until both runs ended.
    let ended = |events: &[(u64, String, serde_json::Value)]| {
        let end = |run: &str, status: &str| {
            events.iter().any(|(_, kind, d)| kind == "status" && d["run_id"] == run && d["status"] == status)
        };
        end("sig", "completed") && end("stop", "cancelled")
    };
    let follow = |base: &str| {
        let mut stream = open_events(base, "/api/events", &admin, None);
        std::thread::spawn(move || {
            let mut events = Vec::new();
            while !ended(&events) {
                events.push(stream.next().unwrap());
            }
            events
        })
    };
    let (seen_a, seen_b) = (follow(&a.base), follow(&b.base));

    start_run(&a.base, &admin, &signals, json!({"waits": [{"name": "a"}, {"name": "b"}]}), "sig");
    start_run(&b.base, &admin, &signals, json!({"waits": [{"name": "never"}]}), "stop");
    wait_status(&b.base, &admin, "sig", "waiting");
    assert_eq!(call("POST", &format!("{}/api/runs/sig/signals/a", b.base), Some(&admin), Some(b"1")).0, 202);
    assert_eq!(call("POST", &format!("{}/api/runs/sig/signals/b", a.base), Some(&admin), Some(b"2")).0, 202);
    assert_eq!(wait_status(&b.base, &admin, "sig", "completed")["output"], json!([1, 2]));
    wait_status(&a.base, &admin, "stop", "waiting");
    let (status, body) = call("POST", &format!("{}/api/runs/stop/cancel", b.base), Some(&admin), Some(b""));
    assert_eq!(status, 202, "{body}");
    wait_status(&a.base, &admin, "stop", "cancelled");
    for server in [&a, &b] {
        let (_, page) = call("GET", &format!("{}/api/runs", server.base), Some(&admin), None);
        let ids: Vec<&str> = page["runs"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["stop", "sig"], "{}", server.base);
    }

    let (seen_a, seen_b) = (seen_a.join().unwrap(), seen_b.join().unwrap());
    assert_eq!(seen_a, seen_b, "both servers stream the same changes");
    assert!(seen_a.windows(2).all(|p| p[0].0 < p[1].0), "in order, once each: {seen_a:?}");
    let count = |run: &str, kind: &str| seen_a.iter().filter(|(_, k, d)| k == kind && d["run_id"] == run).count();
    assert_eq!((count("sig", "created"), count("sig", "signal"), count("stop", "cancel")), (1, 2, 1), "{seen_a:?}");
    assert!(count("sig", "history") >= 2, "the steps that took the signals: {seen_a:?}");
    // The same as a replay from the start, and a client cut off from one
    // server halfway resumes on the other with what it missed.
    assert_eq!(read_events(&a.base, "/api/events", &admin, Some(0), seen_a.len()), seen_a);
    let (got, missed) = seen_a.split_at(seen_a.len() / 2);
    let last = got.last().unwrap().0;
    assert_eq!(read_events(&b.base, "/api/events", &admin, Some(last), missed.len()), missed);
}

/// A client following a run through one server fails over to another with
/// its `Last-Event-ID` while the run goes on. The other server had no
/// client, so its feed read none of the run's steps (only other changes)
/// and, once read whole, catches up from before the client's position: the
/// client still gets every later change once, in order, and nothing it had.
#[test]
fn a_client_resumes_on_another_server_while_the_run_goes_on() {
    let Some((_w, admin, a, b)) = two_servers("pg-failover") else { return };
    let module = upload(&a.base, &admin, "benchflow");
    let mut on_a = open_events(&a.base, "/api/events", &admin, None);
    start_run(&a.base, &admin, &module, json!({"mode": "paced", "n": 40, "sleep_ms": 10}), "paced");
    let steps = |events: &[(u64, String, serde_json::Value)]| events.iter().filter(|e| e.1 == "history").count();
    let mut got = Vec::new();
    while steps(&got) < 20 {
        got.push(on_a.next().unwrap());
    }
    drop(on_a);
    let last = got.last().unwrap().0;
    for event in open_events(&b.base, "/api/events", &admin, Some(last)) {
        let done = event.1 == "status" && event.2["status"] == "completed";
        got.push(event);
        if done {
            break;
        }
    }
    let seqs: Vec<u64> = got.iter().map(|e| e.0).collect();
    assert!(seqs.windows(2).all(|p| p[0] < p[1]), "once each, in order: {seqs:?}");
    assert_eq!(got, read_events(&a.base, "/api/events", &admin, Some(0), got.len()), "every change");
    assert_eq!(steps(&got), 40);
}
