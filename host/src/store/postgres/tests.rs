//! The PostgreSQL store's tests: the conformance suite, on a fresh
//! database per test in the server named by `CAIRN_TEST_PG` (`make test`
//! starts a throwaway cluster and sets it, with `CAIRN_REQUIRE_PG=1` so
//! that the suite cannot be skipped there).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::PostgresStore;
use crate::store::conformance::Opening;
use crate::store::{Durability, RunStore};

/// Whether a PostgreSQL server is configured; without one (a plain `cargo
/// test`) the suite says so and passes over, unless `CAIRN_REQUIRE_PG` is set.
fn available() -> bool {
    if std::env::var_os("CAIRN_TEST_PG").is_some() {
        return true;
    }
    assert!(
        std::env::var_os("CAIRN_REQUIRE_PG").is_none(),
        "CAIRN_REQUIRE_PG is set but CAIRN_TEST_PG is not: no PostgreSQL server for the suite"
    );
    eprintln!("skipped: no PostgreSQL server (set CAIRN_TEST_PG=postgres://...; `make test` starts one)");
    false
}

/// The admin URL with another database name.
fn with_database(url: &str, db: &str) -> String {
    let mut u = url::Url::parse(url).expect("CAIRN_TEST_PG is a URL");
    u.set_path(&format!("/{db}"));
    u.to_string()
}

fn open(name: &str) -> Opening {
    let name = name.to_string();
    Box::pin(async move { open_store(&name).await as Arc<dyn RunStore> })
}

/// The URL of a fresh, empty database.
async fn fresh_database(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let db = format!("cairn_t_{}_{}_{}", name.replace('-', "_"), std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    let admin = std::env::var("CAIRN_TEST_PG").expect("CAIRN_TEST_PG");
    let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    client.batch_execute(&format!("DROP DATABASE IF EXISTS {db}")).await.expect("drop");
    client.batch_execute(&format!("CREATE DATABASE {db}")).await.expect("create");
    with_database(&admin, &db)
}

/// A store on a fresh database.
async fn open_store(name: &str) -> Arc<PostgresStore> {
    let url = fresh_database(name).await;
    Arc::new(PostgresStore::connect(&url, Durability::Process, Duration::from_secs(5)).await.expect("open"))
}

/// A second store on the same database: another process, as far as leases
/// and the change feed can tell.
fn reopen(store: &Arc<dyn RunStore>) -> Opening {
    let url = store.location().to_string();
    Box::pin(async move {
        Arc::new(PostgresStore::connect(&url, Durability::Process, Duration::from_secs(5)).await.expect("reopen"))
            as Arc<dyn RunStore>
    })
}

crate::store::conformance::suite!(open, reopen, super::available);

/// A commit that skips the fence check (its runs' epochs were seen current
/// at the gate generation it finds unchanged) is still refused once another
/// process took the run over: every takeover moves the generation on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_that_skip_the_fence_check_are_refused_after_a_takeover() {
    use crate::model::EntryStatus;
    use crate::store::conformance::{create, step};
    use crate::store::{StoreError, Write, commit};
    if !available() {
        return;
    }
    let a = open("skipfence").await;
    let b = reopen(&a).await;
    let [run] = &create(&*a, &["r"]).await[..] else { panic!() };
    let k = run.key;
    let held = a.lease(k).await.unwrap().expect("a free run can be leased");
    let append = |position: usize, name: &'static str| Write::Append {
        run: k,
        position,
        entries: vec![step(name, 1, EntryStatus::Completed)],
    };
    // Both commits go the way without a fence check (nothing moved since the take).
    commit(&*a, vec![append(0, "a")]).await.unwrap();
    commit(&*a, vec![append(1, "b")]).await.unwrap();
    // Another process takes the run over as if this one had frozen past its lease.
    let (admin, connection) = tokio_postgres::connect(a.location(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let taken = loop {
        admin
            .execute("UPDATE runs SET lease_until = now() - interval '1 second' WHERE seq = $1", &[&k.0])
            .await
            .unwrap();
        if let Some(lease) = b.lease(k).await.unwrap() {
            break lease;
        }
    };
    let refused = commit(&*a, vec![append(2, "stale")]).await;
    assert!(matches!(refused, Err(StoreError::LeaseLost { .. })), "{refused:?}");
    // Several rows in one commit go by another statement: refused too.
    let two = vec![step("stale", 1, EntryStatus::Completed), step("stale", 2, EntryStatus::Completed)];
    let refused = commit(&*a, vec![Write::Append { run: k, position: 2, entries: two }]).await;
    assert!(matches!(refused, Err(StoreError::LeaseLost { .. })), "{refused:?}");
    commit(&*b, vec![append(2, "c")]).await.unwrap();
    let rows = admin
        .query("SELECT position, name, epoch FROM history WHERE run = $1 ORDER BY position", &[&k.0])
        .await
        .unwrap();
    let got: Vec<(i32, String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    let (e1, e2) = (held.epoch() as i64, taken.epoch() as i64);
    assert!(e2 > e1);
    assert_eq!(got, [(0, "a".into(), e1), (1, "b".into(), e1), (2, "c".into(), e2)]);
}

/// Until some connection waits for the gate (an advisory lock not granted)
/// or `done`; `what` is who should be waiting, for the failure's message.
async fn wait_for_the_gate(url: &str, what: &str, done: impl Fn() -> bool) {
    let waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted";
    wait_for_a_waiter(url, waiting, &format!("{what} never waited for the gate"), done).await;
}

/// Until `waiting` (a count of waiting connections) is not zero, or `done`.
async fn wait_for_a_waiter(url: &str, waiting: &str, never: &str, done: impl Fn() -> bool) {
    let (watcher, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let started = std::time::Instant::now();
    while !done() && watcher.query_one(waiting, &[]).await.unwrap().get::<_, i64>(0) == 0 {
        assert!(started.elapsed() < Duration::from_secs(30), "{never}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A commit that waits for the gate while another process takes its run
/// over is refused: it reads the generation once it holds the gate, not as
/// of its statement's start, and a take moves it on before it lets go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_waiting_for_the_gate_sees_a_take_that_committed_meanwhile() {
    use crate::model::EntryStatus;
    use crate::store::conformance::{create, step};
    use crate::store::{StoreError, Write, commit};
    if !available() {
        return;
    }
    let a = open("gatewait").await;
    let [run] = &create(&*a, &["r"]).await[..] else { panic!() };
    let k = run.key;
    let _held = a.lease(k).await.unwrap().expect("a free run can be leased");
    let append = move |position: usize, name: &'static str| Write::Append {
        run: k,
        position,
        entries: vec![step(name, 1, EntryStatus::Completed)],
    };
    commit(&*a, vec![append(0, "a")]).await.unwrap();
    commit(&*a, vec![append(1, "b")]).await.unwrap();
    // Another process holds the gate, as a take does.
    let (mut admin, connection) = tokio_postgres::connect(a.location(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let take = admin.transaction().await.unwrap();
    take.execute(super::gate::LOCK, &[]).await.unwrap();
    let waiting = {
        let a = a.clone();
        tokio::spawn(async move { commit(&*a, vec![append(2, "stale")]).await })
    };
    wait_for_the_gate(a.location(), "the commit", || false).await;
    // The take, while the commit waits: a new epoch, the generation moved.
    take.execute(
        "UPDATE runs SET owner = 'another', epoch = epoch + 1, lease_until = now() + interval '1 minute' \
         WHERE seq = $1",
        &[&k.0],
    )
    .await
    .unwrap();
    take.execute(super::gate::NEXT_GENERATION, &[]).await.unwrap();
    take.commit().await.unwrap();
    let refused = waiting.await.unwrap();
    assert!(matches!(refused, Err(StoreError::LeaseLost { .. })), "{refused:?}");
    let rows = admin.query("SELECT position FROM history WHERE run = $1 ORDER BY position", &[&k.0]).await.unwrap();
    let got: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(got, [0, 1]);
}

/// A process paused while it holds the gate (between a take's statements,
/// say) holds it for a lease at most (a second, if the lease is shorter):
/// the server ends a transaction left idle that long, and every other
/// process's commits go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_paused_holding_the_gate_holds_it_for_a_lease_at_most() {
    use crate::store::conformance::create;
    if !available() {
        return;
    }
    let a = open("pausedgate").await;
    let paused = PostgresStore::connect(a.location(), Durability::Process, Duration::from_millis(300)).await.unwrap();
    let client = paused.inner.pool.get().await.unwrap();
    client.batch_execute(&format!("BEGIN; {}", super::gate::LOCK)).await.unwrap();
    // The paused process sends nothing more; another's commit waits for the gate.
    let created = tokio::time::timeout(Duration::from_secs(30), create(&*a, &["r"])).await;
    assert!(created.is_ok(), "a commit still waits for a gate held by an idle transaction after 30 s");
    assert!(client.batch_execute("COMMIT").await.is_err(), "the idle transaction was not ended");
}

/// A commit whose connection was lost may still run on the server, holding
/// the gate; the read that settles it waits for the gate and sees the row
/// that commit wrote, instead of finding it missing and committing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_that_settles_a_lost_commit_waits_for_a_commit_still_running() {
    use crate::store::conformance::create;
    if !available() {
        return;
    }
    let a = open("settlewait").await;
    let [run] = &create(&*a, &["r"]).await[..] else { panic!() };
    let k = run.key.0;
    // (Opened first: a store's listener starts from the gate's number.)
    let store = PostgresStore::connect(a.location(), Durability::Process, Duration::from_secs(5)).await.unwrap();
    // The lost connection's statement, still running: it holds the gate
    // and has written its row, not yet committed.
    let (mut lost, connection) = tokio_postgres::connect(a.location(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let running = lost.transaction().await.unwrap();
    running.execute(super::gate::LOCK, &[]).await.unwrap();
    running
        .execute(
            "INSERT INTO history (id, run, position, kind, name, occurrence, attempt, status, output, started_at, \
                                  finished_at, epoch, committed_us) \
             VALUES (nextval('cairn_ids'), $1, 0, 'step', 's', 1, 1, 'completed', '', 0, 0, 7, 0)",
            &[&k],
        )
        .await
        .unwrap();
    let settling = tokio::spawn(async move {
        let mut client = store.inner.pool.get().await.unwrap();
        let position = 0i32;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&k, &position];
        let rows = super::gate::read_under_gate(&mut client, super::one_statement::FIRST_ROW, &params).await;
        rows.unwrap().into_iter().next()
    });
    wait_for_the_gate(a.location(), "the read", || settling.is_finished()).await;
    running.commit().await.unwrap();
    let row = settling.await.unwrap().expect("the read saw the row the running commit wrote");
    assert_eq!(row.get::<_, i64>(1), 7);
}

/// A whole feed gets another process's history rows that committed before
/// this process's own commit but are notified after it: history-only
/// commits notify every few milliseconds, so the listener reads past its
/// own commits instead of skipping them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_feed_gets_history_whose_notice_comes_after_its_own_commit() {
    use crate::model::RunStatus;
    use crate::store::conformance::create;
    use crate::store::{ChangeKind, Write, commit};
    if !available() {
        return;
    }
    let a = open("latenotice").await;
    let [run] = &create(&*a, &["r"]).await[..] else { panic!() };
    let mut feed = a.subscribe();
    // Another process's step, committed and not notified yet.
    let (mut other, connection) = tokio_postgres::connect(a.location(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let tx = other.transaction().await.unwrap();
    tx.execute(super::gate::LOCK, &[]).await.unwrap();
    let id: i64 = tx
        .query_one(
            "INSERT INTO history (id, run, position, kind, name, occurrence, attempt, status, output, started_at, \
                                  finished_at, epoch, committed_us) \
             VALUES (nextval('cairn_ids'), $1, 0, 'step', 's', 1, 1, 'completed', '', 0, 0, 1, 0) RETURNING id",
            &[&run.key.0],
        )
        .await
        .unwrap()
        .get(0);
    tx.commit().await.unwrap();
    // This process's commit, notified at once, then the other's notice.
    commit(&*a, vec![Write::status(run.key, RunStatus::Running)]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let notice = super::listen::payload("another-process", id as u64 + 1, false);
    other.execute("SELECT pg_notify('cairn_changes', $1)", &[&notice]).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let event = tokio::time::timeout_at(deadline, feed.recv())
            .await
            .expect("the other process's step never reached the feed")
            .expect("the feed is open");
        if event.kind == ChangeKind::History {
            assert_eq!((event.run, event.position, event.seq), (run.key, Some(0), id as u64));
            break;
        }
    }
}

/// Steps commit every few hundred microseconds; each notifies other
/// processes only if none did for a moment, and the last of a burst is told
/// of afterwards: the last notification covers every commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_of_a_burst_of_steps_is_notified() {
    use futures_util::StreamExt as _;

    use crate::model::EntryStatus;
    use crate::store::conformance::{create, step};
    use crate::store::{Write, commit};
    if !available() {
        return;
    }
    let store = open("burst").await;
    let (listener, mut connection) = tokio_postgres::connect(store.location(), tokio_postgres::NoTls).await.unwrap();
    let (tx, mut notified) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    listener.batch_execute("LISTEN cairn_changes").await.unwrap();
    let [run] = &create(&*store, &["r"]).await[..] else { panic!() };
    let _lease = store.lease(run.key).await.unwrap().expect("leased");
    for position in 0..5 {
        let entries = vec![step("s", position as u32 + 1, EntryStatus::Completed)];
        commit(&*store, vec![Write::Append { run: run.key, position, entries }]).await.unwrap();
    }
    let next = store.last_seq().await.unwrap() + 1;
    // "OWNER NEXT KIND": wait for the one that covers the last commit.
    let covered = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(payload) = notified.recv().await {
            let mut words = payload.rsplit(' ');
            let (_kind, n) = (words.next(), words.next().and_then(|n| n.parse::<u64>().ok()));
            if n >= Some(next) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(covered, Ok(true), "no notification covers the last commit (next number {next})");
}

/// A batch that writes runs it does not hold (cancels, signals) locks them
/// in key order up front, as every heartbeat and writer locks runs. Locked
/// in the items' order, two runs written in the opposite order to a
/// heartbeat that holds the first would deadlock, and the server would end
/// it by failing one side after a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_locks_the_runs_it_writes_in_key_order() {
    use crate::store::conformance::create;
    use crate::store::{Write, commit};
    if !available() {
        return;
    }
    let store = open("keyorder").await;
    let runs = create(&*store, &["first", "second"]).await;
    let (first, second) = (runs[0].key, runs[1].key);
    assert!(first.0 < second.0);
    // The holder's heartbeat, half-way: the first run's row locked.
    let (mut admin, connection) = tokio_postgres::connect(store.location(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let heartbeat = admin.transaction().await.unwrap();
    let lock = "SELECT 1 FROM runs WHERE seq = $1 FOR NO KEY UPDATE";
    heartbeat.execute(lock, &[&first.0]).await.unwrap();
    // Another process cancels both in one item, the second run first.
    let cancelling = {
        let other = reopen(&store).await;
        let cancel = |run| Write::RequestCancel { run, grace_until: None };
        tokio::spawn(async move { commit(&*other, vec![cancel(second), cancel(first)]).await })
    };
    let waiting =
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'";
    wait_for_a_waiter(store.location(), waiting, "the cancels never waited for the heartbeat's lock", || false).await;
    // The heartbeat goes on to the second run: free, since the batch waits
    // for the first before it locks anything after it.
    heartbeat.execute(lock, &[&second.0]).await.expect("the heartbeat's second row lock");
    heartbeat.commit().await.unwrap();
    cancelling.await.unwrap().expect("the cancels commit once the heartbeat is done");
    let requested: i64 = admin.query_one("SELECT count(*) FROM runs WHERE cancel_requested", &[]).await.unwrap().get(0);
    assert_eq!(requested, 2);
}

/// The statement a lone step sends when its writer counts on the next
/// change number (`APPEND_ONE_KNOWN`) writes its row only with that number:
/// with another number, or with the gate's generation moved on, it writes
/// nothing, and the writer sends the statement that says which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_counts_on_its_number_lands_only_with_that_number() {
    if !available() {
        return;
    }
    let store = open("known").await;
    let (client, connection) = tokio_postgres::connect(store.location(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let statement = client.prepare(super::one_statement::APPEND_ONE_KNOWN).await.unwrap();
    let generation: i64 = client.query_one("SELECT pg_sequence_last_value('cairn_gen')", &[]).await.unwrap().get(0);
    let last = || async {
        client.query_one("SELECT pg_sequence_last_value('cairn_ids')", &[]).await.unwrap().get::<_, i64>(0)
    };
    let send = |generation: i64, position: i32, number: i64| {
        let (client, statement) = (&client, &statement);
        async move {
            let (output, error) = (b"1".to_vec(), None::<&str>);
            client
                .execute(
                    statement,
                    &[
                        &generation,
                        &7i64,
                        &position,
                        &"step",
                        &"s",
                        &1i32,
                        &1i32,
                        &"completed",
                        &output,
                        &error,
                        &1i64,
                        &1i64,
                        &1i64,
                        &1i64,
                        &number,
                    ],
                )
                .await
                .unwrap()
        }
    };
    let next = last().await + 1;
    assert_eq!(send(generation, 0, next).await, 1, "the number it counted on");
    assert_eq!(send(generation, 1, next + 5).await, 0, "another number");
    let next = last().await + 1;
    assert_eq!(send(generation + 1, 1, next).await, 0, "the generation moved on");
    let rows = client.query("SELECT id, position FROM history WHERE run = 7 ORDER BY id", &[]).await.unwrap();
    let got: Vec<(i64, i32)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(got, [(next - 2, 0)], "one row, with the number it counted on");
}

/// However a lone step's number comes (counted on, or handed back after
/// another process committed in between and foiled the guess), this
/// process's feed publishes each row by the number the database holds for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_numbers_each_step_as_the_database_does_while_another_process_commits() {
    use crate::model::EntryStatus;
    use crate::store::conformance::{create, step};
    use crate::store::{ChangeKind, Write, commit};
    if !available() {
        return;
    }
    let store = open_store("numbers").await;
    let a: Arc<dyn RunStore> = store.clone();
    let b = reopen(&a).await;
    let [run] = &create(&*a, &["r"]).await[..] else { panic!() };
    let [other] = &create(&*b, &["o"]).await[..] else { panic!() };
    let _lease = a.lease(run.key).await.unwrap().expect("leased");
    let _other_lease = b.lease(other.key).await.unwrap().expect("leased");
    let append = |run, position: usize| Write::Append {
        run,
        position,
        entries: vec![step("s", position as u32 + 1, EntryStatus::Completed)],
    };
    let mut feed = a.subscribe();
    // Nine commits in a row earn a guess (`Numbers`), which the other
    // process's commit after every tenth foils; a step that owes a
    // notification (every 5 ms) does not guess.
    const STEPS: usize = 200;
    const EVERY: usize = 10;
    for position in 0..STEPS {
        commit(&*a, vec![append(run.key, position)]).await.unwrap();
        if position % EVERY == EVERY - 1 {
            commit(&*b, vec![append(other.key, position / EVERY)]).await.unwrap();
        }
    }
    let mut published = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while published.len() < STEPS {
            let event = feed.recv().await.expect("the feed");
            if event.run == run.key && event.kind == ChangeKind::History {
                published.push((event.seq as i64, event.position.unwrap() as i32));
            }
        }
    })
    .await
    .expect("every step published");
    let (admin, connection) = tokio_postgres::connect(a.location(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let rows = admin.query("SELECT id, position FROM history WHERE run = $1 ORDER BY id", &[&run.key.0]).await.unwrap();
    let stored: Vec<(i64, i32)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(published, stored);
    // The other process's steps took numbers between this one's.
    let theirs: i64 =
        admin.query_one("SELECT count(*) FROM history WHERE run = $1", &[&other.key.0]).await.unwrap().get(0);
    assert_eq!(theirs, (STEPS / EVERY) as i64);
    let guesses = &store.inner.guesses;
    let (hits, misses) = (guesses.hits.load(Ordering::Relaxed), guesses.misses.load(Ordering::Relaxed));
    assert!(hits > 0 && misses > 0, "the guess was counted on {hits} times and foiled {misses} times");
}

/// `cairn migrate` into a database that processes already use (a worker
/// waiting for runs, `cairn serve` feeding browsers): their feeds get the
/// moved runs at once, as they get any commit. Nothing else commits here,
/// so only the import's own notification can tell them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_on_the_target_of_an_import_see_the_moved_runs() {
    use crate::store::ChangeKind;
    use crate::store::conformance::create;
    use crate::store::sqlite::SqliteStore;
    if !available() {
        return;
    }
    let from = crate::store::sqlite::tests::temp_db("import-feed");
    let moved = {
        let lite = SqliteStore::open(&from, Durability::Process).expect("open sqlite");
        create(&lite, &["r"]).await.remove(0)
    };
    let waiting = open_store("importfeed").await;
    let mut feed = waiting.subscribe();
    let importer = PostgresStore::connect(waiting.location(), Durability::Process, Duration::from_secs(5))
        .await
        .expect("another process");
    importer.import_sqlite(&from).await.expect("import");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let event = tokio::time::timeout_at(deadline, feed.recv())
        .await
        .expect("the waiting process never heard of the moved run")
        .expect("the feed is open");
    assert_eq!((event.kind, event.run), (ChangeKind::Created, moved.key));
    let _ = std::fs::remove_file(&from);
}

/// A TCP relay to the test server. Bytes pass both ways, except on the
/// first connection to send once `armed` is set: what it sends from then
/// on is kept back (`Victim::held`), so its statement has not reached the
/// server when the test cuts the connection on the client's side; the
/// test sends it on, on the server's side, whenever it likes.
struct Relay {
    port: u16,
    armed: Arc<std::sync::atomic::AtomicBool>,
    victims: tokio::sync::mpsc::UnboundedReceiver<Victim>,
    /// Once true, the server is unreachable through the relay: every
    /// connection but a victim's is closed, and new ones are closed at once.
    blocked: tokio::sync::watch::Sender<bool>,
}

struct Victim {
    held: Arc<std::sync::Mutex<Vec<u8>>>,
    /// Closes the connection on the client's side.
    cut: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::net::tcp::OwnedWriteHalf,
    /// What the server says first after the cut.
    answered: tokio::sync::oneshot::Receiver<Vec<u8>>,
}

impl Victim {
    /// Sends the kept-back bytes on to the server (its answer goes nowhere
    /// once the client's side is cut).
    async fn deliver(&mut self) {
        use tokio::io::AsyncWriteExt as _;
        let held = std::mem::take(&mut *self.held.lock().unwrap());
        assert!(executes(&held), "the bytes kept back run a statement: {held:?}");
        self.server.write_all(&held).await.unwrap();
    }

    /// Closes the connection on the client's side.
    fn cut_client(&mut self) {
        if let Some(cut) = self.cut.take() {
            let _ = cut.send(());
        }
    }

    /// Sends the kept-back bytes on to the server, and checks that the
    /// statement they run wrote nothing: refused (a unique key), or no row
    /// inserted or returned.
    async fn deliver_writing_nothing(self) {
        use tokio::io::AsyncWriteExt as _;
        let held = self.held.lock().unwrap().clone();
        assert!(executes(&held), "the bytes kept back run a statement: {held:?}");
        let mut late = self.server;
        late.write_all(&held).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(20), self.answered)
            .await
            .expect("the server answered the late statement")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            ["C23505", "INSERT 0 0", "SELECT 0"].iter().any(|nothing| answer.contains(nothing)),
            "the late statement wrote nothing: {answer:?}"
        );
    }
}

impl Relay {
    /// A relay in front of the server of `url`, and the URL through it.
    async fn in_front_of(url: &str) -> (Relay, String) {
        let mut relayed = url::Url::parse(url).unwrap();
        let server = (relayed.host_str().unwrap().to_string(), relayed.port().unwrap_or(5432));
        let relay = Relay::start(server).await;
        relayed.set_host(Some("127.0.0.1")).unwrap();
        relayed.set_port(Some(relay.port)).unwrap();
        (relay, relayed.into())
    }

    /// Commits `write` on `store` in a task, the statement it sends kept
    /// back by the relay: the commit's task, and the connection it went on.
    async fn hold_back(
        &mut self,
        store: Arc<PostgresStore>,
        write: crate::store::Write,
    ) -> (tokio::task::JoinHandle<Result<crate::store::Committed, crate::store::StoreError>>, Victim) {
        self.armed.store(true, Ordering::SeqCst);
        let committing = tokio::spawn(async move { crate::store::commit(&*store, vec![write]).await });
        let victim = tokio::time::timeout(Duration::from_secs(20), self.victims.recv())
            .await
            .expect("the step's statement was sent")
            .unwrap();
        (committing, victim)
    }

    async fn start(server: (String, u16)) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, victims) = tokio::sync::mpsc::unbounded_channel();
        let (blocked, blocked_rx) = tokio::sync::watch::channel(false);
        let a = armed.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *blocked_rx.borrow() {
                    continue;
                }
                tokio::spawn(Self::pass(client, server.clone(), a.clone(), tx.clone(), blocked_rx.clone()));
            }
        });
        Relay { port, armed, victims, blocked }
    }

    async fn pass(
        client: tokio::net::TcpStream,
        server: (String, u16),
        armed: Arc<std::sync::atomic::AtomicBool>,
        victims: tokio::sync::mpsc::UnboundedSender<Victim>,
        mut blocked: tokio::sync::watch::Receiver<bool>,
    ) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let Ok(server) = tokio::net::TcpStream::connect(server).await else { return };
        let (mut from_client, to_client) = client.into_split();
        let (mut from_server, to_server) = server.into_split();
        let (cut, mut cut_here) = tokio::sync::oneshot::channel::<()>();
        let (answer, answered) = tokio::sync::oneshot::channel::<Vec<u8>>();
        // Set before the victim is handed over: a block spares it.
        let victim = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (is_victim, mut blocked_here) = (victim.clone(), blocked.clone());
        tokio::spawn(async move {
            let (mut to_client, mut answer) = (Some(to_client), Some(answer));
            let mut buf = vec![0u8; 1 << 16];
            loop {
                tokio::select! {
                    read = from_server.read(&mut buf) => {
                        let n = match read { Ok(0) | Err(_) => return, Ok(n) => n };
                        match to_client.as_mut() {
                            Some(w) => if w.write_all(&buf[..n]).await.is_err() { return },
                            None => if let Some(a) = answer.take() { let _ = a.send(buf[..n].to_vec()); },
                        }
                    }
                    _ = &mut cut_here, if to_client.is_some() => to_client = None,
                    // Asked when the block comes, not when the select
                    // began: this connection may have become the victim since.
                    Ok(()) = blocked_here.changed() => if !is_victim.load(Ordering::SeqCst) { return },
                }
            }
        });
        // Client to server, until this connection is the victim: then into
        // `held`, until the client closes.
        let mut buf = vec![0u8; 1 << 16];
        let (mut to_server, mut held) = (Some(to_server), None::<Arc<std::sync::Mutex<Vec<u8>>>>);
        let (mut cut, mut answered) = (Some(cut), Some(answered));
        loop {
            let n = tokio::select! {
                read = from_client.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                },
                Ok(()) = blocked.changed(), if held.is_none() => return,
            };
            if let Some(held) = &held {
                held.lock().unwrap().extend_from_slice(&buf[..n]);
            } else if armed.swap(false, Ordering::SeqCst) {
                victim.store(true, Ordering::SeqCst);
                let kept = Arc::new(std::sync::Mutex::new(buf[..n].to_vec()));
                let _ = victims.send(Victim {
                    held: kept.clone(),
                    cut: cut.take(),
                    server: to_server.take().unwrap(),
                    answered: answered.take().unwrap(),
                });
                held = Some(kept);
            } else if to_server.as_mut().unwrap().write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
}

/// Whether these frontend messages run a statement (an `Execute`).
fn executes(mut messages: &[u8]) -> bool {
    while messages.len() >= 5 {
        let len = u32::from_be_bytes(messages[1..5].try_into().unwrap()) as usize;
        if messages[0] == b'E' {
            return true;
        }
        messages = &messages[(1 + len).min(messages.len())..];
    }
    false
}

/// A lone step's statement whose connection was cut before it reached the
/// server, and that reaches it only after the writer found that it had not
/// landed and committed the step again (the network delivering a lost
/// connection's bytes late): the step is in the history once, as the
/// writer committed it, and the late statement writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_step_statement_that_reaches_the_server_after_its_retry_writes_nothing() {
    use crate::model::EntryStatus;
    use crate::store::conformance::{create, step};
    use crate::store::{Write, commit};
    if !available() {
        return;
    }
    let url = fresh_database("late").await;
    let (mut relay, relayed) = Relay::in_front_of(&url).await;
    // A long lease: no heartbeat while the relay is armed.
    let store = PostgresStore::connect(&relayed, Durability::Process, Duration::from_secs(60))
        .await
        .expect("through the relay");
    let [run] = &create(&store, &["r"]).await[..] else { panic!() };
    let _lease = store.lease(run.key).await.unwrap().expect("leased");
    let append = |position: usize| Write::Append {
        run: run.key,
        position,
        entries: vec![step("s", position as u32 + 1, EntryStatus::Completed)],
    };
    // Enough steps that every connection the writer may get has the
    // statements prepared, and the writer counts on its numbers.
    const BEFORE: usize = 20;
    for position in 0..BEFORE {
        commit(&store, vec![append(position)]).await.unwrap();
    }
    // The notification those steps owe goes out first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let store = Arc::new(store);
    let (committing, mut victim) = relay.hold_back(store.clone(), append(BEFORE)).await;
    victim.cut_client();
    tokio::time::timeout(Duration::from_secs(60), committing)
        .await
        .expect("the writer settled the lost commit")
        .unwrap()
        .expect("and committed the step again");
    // Refused by the history's key on (run, position), or, had it counted
    // on a number, written with none.
    victim.deliver_writing_nothing().await;
    let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let rows = admin.query("SELECT position FROM history WHERE run = $1 ORDER BY id", &[&run.key.0]).await.unwrap();
    let positions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(positions, (0..=BEFORE as i32).collect::<Vec<_>>(), "every step once, in order");
    assert_eq!(store.history(run.key).await.unwrap().len(), BEFORE + 1);
}

/// A lone step's statement kept back while the server is unreachable for
/// longer than the lease: the writer cannot settle the commit and gives it
/// up, another process takes the run over and commits that step itself,
/// and then the kept-back statement reaches the server. It writes nothing
/// (the take moved the gate's generation on), and the step is in the
/// history once, from the new epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_statement_that_reaches_the_server_after_a_takeover_writes_nothing() {
    use crate::model::EntryStatus;
    use crate::store::conformance::{create, step};
    use crate::store::{Write, commit};
    if !available() {
        return;
    }
    let url = fresh_database("taken").await;
    let (mut relay, relayed) = Relay::in_front_of(&url).await;
    let lease = Duration::from_secs(1);
    let cut_off = PostgresStore::connect(&relayed, Durability::Process, lease).await.expect("through the relay");
    let [run] = &create(&cut_off, &["r"]).await[..] else { panic!() };
    let old = cut_off.lease(run.key).await.unwrap().expect("leased");
    let append = |position: usize, occurrence: u32| Write::Append {
        run: run.key,
        position,
        entries: vec![step("s", occurrence, EntryStatus::Completed)],
    };
    const BEFORE: usize = 20;
    for position in 0..BEFORE {
        commit(&cut_off, vec![append(position, position as u32 + 1)]).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cut_off = Arc::new(cut_off);
    let (committing, mut victim) = relay.hold_back(cut_off.clone(), append(BEFORE, BEFORE as u32 + 1)).await;
    // The server is unreachable from here on, and the statement's
    // connection is lost on the client's side.
    relay.blocked.send(true).unwrap();
    victim.cut_client();
    let outcome = tokio::time::timeout(Duration::from_secs(60), committing)
        .await
        .expect("the writer gave the commit up within its lease")
        .unwrap();
    assert!(outcome.is_err(), "a commit whose outcome is not known is not reported committed: {outcome:?}");

    // Another process takes the run over once the lease ran out, and
    // commits the step itself.
    let taker = PostgresStore::connect(&url, Durability::Process, lease).await.unwrap();
    let new = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(new) = taker.lease(run.key).await.unwrap() {
                break new;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the lease ran out and was taken");
    assert!(new.epoch() > old.epoch(), "a takeover moves the epoch on");
    commit(&taker, vec![append(BEFORE, 99)]).await.expect("the new holder commits the step");

    victim.deliver_writing_nothing().await;
    let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let rows =
        admin.query("SELECT position, epoch FROM history WHERE run = $1 ORDER BY id", &[&run.key.0]).await.unwrap();
    let positions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(positions, (0..=BEFORE as i32).collect::<Vec<_>>(), "every step once, in order");
    let last_epoch: i64 = rows[BEFORE].get(1);
    assert_eq!(last_epoch as u64, new.epoch(), "the step is the new holder's");
    let entries = taker.history(run.key).await.unwrap();
    assert_eq!(entries[BEFORE].occurrence, 99, "with the new holder's entry");
}

/// A crowd of new runs alone is committed by one statement (`new_runs`),
/// and a run created with its lease is held under epoch 1: its steps are
/// fenced by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_of_new_runs_is_one_statement_and_their_leases_fence() {
    use crate::model::EntryStatus;
    use crate::store::conformance::{create, new_run, step};
    use crate::store::{Write, commit};
    if !available() {
        return;
    }
    let store = open_store("crowd").await;
    create(&*store, &["seed"]).await;
    let tickets: Vec<_> = (0..20)
        .map(|i| store.submit(vec![Write::CreateRun { run: Box::new(new_run(&format!("r{i}"))), lease: i == 0 }]))
        .collect();
    let mut created = Vec::new();
    for ticket in tickets {
        created.extend(ticket.await.unwrap().unwrap().created);
    }
    assert_eq!(store.inner.new_runs_by_statement.load(Ordering::Relaxed), 20, "every run by the statement");
    let (r0, lease) = &created[0];
    assert_eq!(lease.as_ref().map(|l| l.epoch()), Some(1));
    commit(
        &*store,
        vec![Write::Append { run: r0.key, position: 0, entries: vec![step("s", 1, EntryStatus::Completed)] }],
    )
    .await
    .expect("a step under the new run's lease");
    let (admin, connection) = tokio_postgres::connect(store.location(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let row = admin
        .query_one(
            "SELECT r.owner, r.epoch, h.epoch FROM runs r JOIN history h ON h.run = r.seq WHERE r.seq = $1",
            &[&r0.key.0],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i64>(1), row.get::<_, i64>(2)),
        (store.inner.owner.clone(), 1, 1)
    );
}

/// A store through a relay, on a fresh database with a module stored, whose
/// writer's connections have the new runs' statement prepared (so that what
/// the relay keeps back is the statement's execution).
async fn relayed_with_new_runs_prepared(name: &str) -> (Relay, String, Arc<PostgresStore>) {
    use crate::store::conformance::{create, new_run};
    use crate::store::{Write, commit};
    let url = fresh_database(name).await;
    let (relay, relayed) = Relay::in_front_of(&url).await;
    let store = PostgresStore::connect(&relayed, Durability::Process, Duration::from_secs(60))
        .await
        .expect("through the relay");
    create(&store, &["seed"]).await;
    for i in 0..20 {
        commit(&store, vec![Write::CreateRun { run: Box::new(new_run(&format!("w{i}"))), lease: false }])
            .await
            .unwrap();
    }
    (relay, url, Arc::new(store))
}

/// A crowd of new runs whose connection is lost after its statement
/// reached the server, before the answer: the writer looks for the runs
/// (once the statement, still waiting for the gate, has run) and answers
/// with what landed, committing nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_runs_whose_answer_was_lost_are_found_where_they_landed() {
    use crate::store::Write;
    use crate::store::conformance::new_run;
    if !available() {
        return;
    }
    let (mut relay, url, store) = relayed_with_new_runs_prepared("lostcrowd").await;
    let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    admin.batch_execute(&format!("BEGIN; {}", super::gate::LOCK)).await.unwrap();
    let (committing, mut victim) =
        relay.hold_back(store.clone(), Write::CreateRun { run: Box::new(new_run("lost")), lease: false }).await;
    victim.deliver().await;
    wait_for_the_gate(&url, "the statement", || false).await;
    victim.cut_client();
    // The writer's read of what landed waits behind the statement.
    let two = "SELECT (count(*) >= 2)::INT::BIGINT FROM pg_locks WHERE locktype = 'advisory' AND NOT granted";
    wait_for_a_waiter(&url, two, "the read of what landed never waited for the gate", || false).await;
    admin.batch_execute("COMMIT").await.unwrap();
    let committed = tokio::time::timeout(Duration::from_secs(60), committing)
        .await
        .expect("the writer settled the lost commit")
        .unwrap()
        .expect("as committed");
    let (record, _) = &committed.created[0];
    assert_eq!(record.id, "lost");
    let rows = admin
        .query(
            "SELECT r.seq, count(c.seq) FROM runs r JOIN changes c ON c.run = r.seq WHERE r.id = 'lost' GROUP BY r.seq",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].get::<_, i64>(0), rows[0].get::<_, i64>(1)), (record.key.0, 1), "one run, one created change");
    assert_eq!(store.inner.new_runs_by_statement.load(Ordering::Relaxed), 21, "found, not committed again");
}

/// A crowd of new runs whose connection is lost before its statement
/// reached the server: the writer finds nothing, commits them again, and
/// the statement, delivered late, writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_runs_lost_on_the_way_are_committed_again_once() {
    use crate::store::Write;
    use crate::store::conformance::new_run;
    if !available() {
        return;
    }
    let (mut relay, url, store) = relayed_with_new_runs_prepared("lostearly").await;
    let (committing, mut victim) =
        relay.hold_back(store.clone(), Write::CreateRun { run: Box::new(new_run("late")), lease: false }).await;
    victim.cut_client();
    let committed = tokio::time::timeout(Duration::from_secs(60), committing)
        .await
        .expect("the writer settled the lost commit")
        .unwrap()
        .expect("and committed the run again");
    assert_eq!(committed.created[0].0.id, "late");
    victim.deliver_writing_nothing().await;
    let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let created: i64 = admin
        .query_one("SELECT count(*) FROM changes c JOIN runs r ON r.seq = c.run WHERE r.id = 'late'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(created, 1, "one created change");
}

/// A crowd of signals submitted together goes in the crowd's one round trip
/// (the conformance suite checks what lands, and in which order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_of_signals_is_pipelined() {
    use crate::store::Write;
    use crate::store::conformance::create;
    if !available() {
        return;
    }
    let store = open_store("signals-pipelined").await;
    let [run] = &create(&*store, &["s"]).await[..] else { panic!() };
    let tickets: Vec<_> = (0..20)
        .map(|i| {
            store.submit(vec![Write::SendSignal { run: run.key, name: "s".into(), payload: vec![i], max_pending: 100 }])
        })
        .collect();
    for ticket in tickets {
        ticket.await.unwrap().expect("sent");
    }
    // The writer may take the first alone, before the others are queued.
    let pipelined = store.inner.items_pipelined.load(Ordering::Relaxed);
    assert!(pipelined >= 10, "{pipelined} of 20 signals pipelined");
}

/// A run's first take (created without a lease: nobody ever held it) leaves
/// the gate's generation alone, so other processes' commits go on without
/// a fence check; a takeover moves it on, and they go by the fenced
/// statement again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_take_leaves_the_generation_and_a_takeover_moves_it() {
    use crate::model::EntryStatus;
    use crate::store::conformance::{create, step};
    use crate::store::{Write, commit};
    if !available() {
        return;
    }
    let a = open_store("firsttake").await;
    let b = Arc::new(
        PostgresStore::connect(a.location(), Durability::Process, Duration::from_secs(5)).await.expect("another"),
    );
    let [x, y] = &create(&*a, &["x", "y"]).await[..] else { panic!() };
    let (admin, connection) = tokio_postgres::connect(a.location(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let generation =
        || async { admin.query_one("SELECT pg_sequence_last_value('cairn_gen')", &[]).await.unwrap().get::<_, i64>(0) };
    let before = generation().await;
    let on_x = a.lease(x.key).await.unwrap().expect("x is free");
    let on_y = b.lease(y.key).await.unwrap().expect("y is free");
    assert_eq!((on_x.epoch(), on_y.epoch()), (1, 1));
    assert_eq!(generation().await, before, "first takes leave the generation");
    let append = |run, position| Write::Append { run, position, entries: vec![step("s", 1, EntryStatus::Completed)] };
    commit(&*a, vec![append(x.key, 0)]).await.unwrap();
    commit(&*b, vec![append(y.key, 0)]).await.unwrap();
    let fenced = |s: &PostgresStore| s.inner.fenced_batches.load(Ordering::Relaxed);
    assert_eq!((fenced(&a), fenced(&b)), (0, 0), "no run changed hands: no fence check");
    // x changes hands: given back by a, taken by b.
    drop(on_x);
    let mut taken = None;
    for _ in 0..500 {
        taken = b.lease(x.key).await.unwrap();
        if taken.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(taken.as_ref().map(|l| l.epoch()), Some(2), "x taken again");
    assert_eq!(generation().await, before + 1, "a takeover moves the generation on");
    // b's lease on y was seen current before the move: its next commit is fenced.
    commit(&*b, vec![append(y.key, 1)]).await.unwrap();
    assert_eq!(fenced(&b), 1);
}
