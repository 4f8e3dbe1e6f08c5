//! The store conformance suite: what every [`RunStore`] must do, written
//! against the contract alone. A store's tests instantiate it with
//! `suite!(open, reopen)`: `open(name)` gives a fresh, empty store, and
//! `reopen(&store)` a second handle on the same database, as another
//! process would have (its own leases, its own change feed).

use std::sync::Arc;
use std::time::Duration;

use crate::model::{
    Entry, EntryKind, EntryStatus, Limits, NewRun, Role, RunConfig, RunKey, RunRecord, RunStatus, TokenRecord,
};
use crate::store::{ChangeEvent, ChangeKind, RunFilter, RunStore, StoreError, Subscription, Write, commit};

/// A generous bound for "soon": a test fails only if something never happens.
const SOON: Duration = Duration::from_secs(5);

/// A store being opened (PostgreSQL connects asynchronously).
pub(crate) type Opening = std::pin::Pin<Box<dyn std::future::Future<Output = Arc<dyn RunStore>> + Send>>;
pub(crate) type Open = fn(&str) -> Opening;
pub(crate) type Reopen = fn(&Arc<dyn RunStore>) -> Opening;

/// Take a lease that was just dropped elsewhere: at once on SQLite, within
/// moments where the release is a round trip (PostgreSQL).
async fn lease_soon(store: &dyn RunStore, run: RunKey) -> Option<crate::store::Lease> {
    let start = std::time::Instant::now();
    loop {
        if let Some(lease) = store.lease(run).await.unwrap() {
            return Some(lease);
        }
        if start.elapsed() > SOON {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The module of the suite's runs: a hash, as every module is named.
pub(crate) const MODULE: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A run of [`MODULE`] to create (stores' own tests use it too).
pub(crate) fn new_run(id: &str) -> NewRun {
    NewRun {
        id: id.into(),
        module: MODULE.into(),
        module_path: "m.wasm".into(),
        input: b"null".to_vec(),
        config: RunConfig::new(Limits { max_memory_mib: 1, max_cpu_ms: 1, ..Limits::default() }),
        status: RunStatus::Pending,
        random_key: [7; 32],
    }
}

pub(crate) fn step(name: &str, occurrence: u32, status: EntryStatus) -> Entry {
    Entry {
        kind: EntryKind::Step,
        name: name.into(),
        occurrence,
        attempt: 1,
        status,
        output: format!("\"{name}{occurrence}\"").into_bytes(),
        error: None,
        started_at: 1,
        finished_at: 2,
    }
}

/// Create runs of [`MODULE`] (stored with them).
pub(crate) async fn create(store: &dyn RunStore, ids: &[&str]) -> Vec<RunRecord> {
    let mut writes = vec![Write::PutModule { hash: MODULE.into(), bytes: b"\0asm".to_vec() }];
    writes.extend(ids.iter().map(|id| Write::CreateRun { run: Box::new(new_run(id)), lease: false }));
    commit(store, writes).await.expect("create runs").created.into_iter().map(|(r, _)| r).collect()
}

async fn next(sub: &mut Subscription) -> ChangeEvent {
    tokio::time::timeout(SOON, sub.recv()).await.expect("an event comes").expect("the feed is open")
}

/// The feed after a crowd: one event per write that landed, `want`,
/// numbered on with none lost to a failed item, published and stored alike;
/// and nothing else, so that the next event is `then`'s, of its kind.
async fn feed_after_crowd(
    store: &Arc<dyn RunStore>,
    all: &mut Subscription,
    before: u64,
    want: &[(ChangeKind, RunKey)],
    (then, then_kind): (Write, ChangeKind),
) {
    let mut got = Vec::new();
    for _ in want {
        got.push(next(all).await);
    }
    assert_eq!(got.iter().map(|e| (e.kind, e.run)).collect::<Vec<_>>(), want);
    assert!(got.windows(2).all(|w| w[0].seq + 1 == w[1].seq), "numbered on, none lost to a failed item: {got:?}");
    assert_eq!(store.changes_since(before, 100).await.unwrap(), got);
    let expected = (then.run(), Some(then_kind));
    commit(&**store, vec![then]).await.unwrap();
    let after = next(all).await;
    assert_eq!((Some(after.run), Some(after.kind)), expected, "{after:?}");
}

pub(crate) async fn commit_is_atomic(open: Open) {
    let store = open("atomic").await;
    let [a] = &create(&*store, &["a"]).await[..] else { panic!() };
    // A run created with a write that fails: neither lands.
    let bad = vec![
        Write::CreateRun { run: Box::new(new_run("b")), lease: false },
        Write::Append { run: a.key, position: 0, entries: vec![step("x", 1, EntryStatus::Completed)] },
        Write::status(RunKey(i64::MAX), RunStatus::Completed),
    ];
    let err = commit(&*store, bad).await.expect_err("a write of a missing run fails the item");
    assert!(matches!(err, StoreError::NoSuchRun(_)), "{err:?}");
    assert!(store.run("b").await.unwrap().is_none(), "the run of the failed item was not created");
    assert!(store.history(a.key).await.unwrap().is_empty(), "the append of the failed item did not land");
    // The same without the bad write: all of it lands.
    let entries = vec![step("x", 1, EntryStatus::Completed), step("y", 1, EntryStatus::Failed)];
    let good = vec![
        Write::Append { run: a.key, position: 0, entries: entries.clone() },
        Write::SetStatus { run: a.key, status: RunStatus::Completed, output: Some(b"1".to_vec()), error: None },
    ];
    commit(&*store, good).await.expect("commit");
    assert_eq!(store.history(a.key).await.unwrap(), entries);
    let a = store.run("a").await.unwrap().expect("run a");
    assert_eq!((a.status, a.output.as_deref(), a.steps), (RunStatus::Completed, Some(&b"1"[..]), 1));
    assert!(a.finished_at.is_some());
    let dup = commit(&*store, vec![Write::CreateRun { run: Box::new(new_run("a")), lease: false }]).await;
    assert!(matches!(dup, Err(StoreError::RunExists(id)) if id == "a"));
}

pub(crate) async fn one_bad_item_fails_alone(open: Open) {
    let store = open("group").await;
    let runs = create(&*store, &["r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7"]).await;
    // Submitted together, so a store that groups commits groups them.
    let tickets: Vec<_> = runs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut writes =
                vec![Write::Append { run: r.key, position: 0, entries: vec![step("s", 1, EntryStatus::Completed)] }];
            if i == 3 {
                writes.push(Write::status(RunKey(i64::MAX - 1), RunStatus::Running));
            }
            store.submit(writes)
        })
        .collect();
    for (i, ticket) in tickets.into_iter().enumerate() {
        let result = ticket.await.expect("answered");
        assert_eq!(result.is_err(), i == 3, "item {i}: {result:?}");
    }
    for (i, r) in runs.iter().enumerate() {
        assert_eq!(store.history(r.key).await.unwrap().len(), usize::from(i != 3), "run {i}");
    }
    // A second entry at a taken position fails that item only.
    let tickets = [
        store.submit(vec![Write::Append {
            run: runs[0].key,
            position: 0,
            entries: vec![step("t", 1, EntryStatus::Completed)],
        }]),
        store.submit(vec![Write::Append {
            run: runs[1].key,
            position: 1,
            entries: vec![step("t", 1, EntryStatus::Completed)],
        }]),
    ];
    let mut results = Vec::new();
    for ticket in tickets {
        results.push(ticket.await.expect("answered").map(|_| ()));
    }
    assert!(results[0].is_err() && results[1].is_ok(), "{results:?}");
}

pub(crate) async fn new_runs_commit_in_a_crowd_and_a_bad_one_fails_alone(open: Open, reopen: Reopen) {
    let store = open("crowd").await;
    let other = reopen(&store).await;
    create(&*store, &["taken"]).await;
    let mut all = store.subscribe();
    let before = store.last_seq().await.unwrap();
    let new = |id: &str, lease| Write::CreateRun { run: Box::new(new_run(id)), lease };
    // New runs alone, submitted together (as `cairn serve` commits a crowd
    // of `POST /api/runs`): a store that groups commits groups them.
    let tickets = [
        store.submit(vec![new("c0", false)]),
        store.submit(vec![new("c1", true)]),
        store.submit(vec![new("c2", false), new("c3", false)]),
    ];
    let mut created = Vec::new();
    for ticket in tickets {
        created.extend(ticket.await.expect("answered").expect("created").created);
    }
    let ids: Vec<_> = created.iter().map(|(r, l)| (r.id.as_str(), r.status, l.is_some())).collect();
    assert_eq!(
        ids,
        [
            ("c0", RunStatus::Pending, false),
            ("c1", RunStatus::Pending, true),
            ("c2", RunStatus::Pending, false),
            ("c3", RunStatus::Pending, false)
        ]
    );
    assert!(created.windows(2).all(|w| w[0].0.key.0 < w[1].0.key.0), "keys in the order given");
    for (record, _) in &created {
        assert_eq!(store.run(&record.id).await.unwrap().as_ref().map(|r| r.key), Some(record.key));
    }
    assert!(other.lease(created[1].0.key).await.unwrap().is_none(), "a run created with its lease is held");
    assert!(other.lease(created[0].0.key).await.unwrap().is_some(), "one created without is free");
    // A crowd with bad items: each fails alone, and whole.
    let mut missing = new_run("c7");
    missing.module = "no-such-module".into();
    let tickets = [
        store.submit(vec![new("c4", false), new("taken", false)]),
        store.submit(vec![new("taken", false)]),
        store.submit(vec![new("c5", false)]),
        store.submit(vec![Write::CreateRun { run: Box::new(missing), lease: false }]),
        store.submit(vec![new("c6", true)]),
    ];
    let mut results = Vec::new();
    for ticket in tickets {
        results.push(ticket.await.expect("answered"));
    }
    assert!(matches!(&results[0], Err(StoreError::RunExists(id)) if id == "taken"), "{:?}", results[0]);
    assert!(matches!(&results[1], Err(StoreError::RunExists(id)) if id == "taken"), "{:?}", results[1]);
    assert!(results[3].is_err(), "a run of a module not stored: {:?}", results[3]);
    for id in ["c4", "c7"] {
        assert!(store.run(id).await.unwrap().is_none(), "{id} of a failed item was not created");
    }
    for (i, id) in [(2, "c5"), (4, "c6")] {
        let Ok(committed) = &results[i] else { panic!("{id}: {:?}", results[i]) };
        assert_eq!(committed.created[0].0.id, id);
        created.push((committed.created[0].0.clone(), None));
    }
    assert!(matches!(&results[4], Ok(c) if c.created[0].1.is_some()), "c6 with its lease");
    // One `created` change per run created, in order, and nothing of the
    // failed items.
    let mut got = Vec::new();
    for _ in &created {
        got.push(next(&mut all).await);
    }
    let runs: Vec<_> = got.iter().map(|e| (e.kind, e.run, e.status)).collect();
    let want: Vec<_> = created.iter().map(|(r, _)| (ChangeKind::Created, r.key, Some(RunStatus::Pending))).collect();
    assert_eq!(runs, want);
    assert!(got.windows(2).all(|w| w[0].seq < w[1].seq), "strictly increasing: {got:?}");
    assert_eq!(store.changes_since(before, 100).await.unwrap(), got);
}

/// Signals, cancels, branch attempts and new runs submitted together: a
/// store that groups commits groups them (on PostgreSQL, item by item in one
/// transaction). Bad items fail alone and leave nothing, wherever they fall:
/// first, last, or next to each other.
pub(crate) async fn a_crowd_of_other_items_commits_and_bad_ones_fail_alone(open: Open) {
    let store = open("others").await;
    let [a, b] = &create(&*store, &["a", "b"]).await[..] else { panic!() };
    let (a, b, missing) = (a.key, b.key, RunKey(i64::MAX - 1));
    let mut all = store.subscribe();
    let before = store.last_seq().await.unwrap();
    let signal = |run, name: &str, max_pending| Write::SendSignal {
        run,
        name: name.into(),
        payload: name.as_bytes().to_vec(),
        max_pending,
    };
    let cancel = |run| Write::RequestCancel { run, grace_until: None };
    let branch = |name: &str| Write::BranchAttempt { run: a, entry: step(name, 1, EntryStatus::Completed) };
    let crowd = [
        vec![cancel(missing)],
        vec![signal(a, "go", 100)],
        vec![signal(b, "full", 0)],
        vec![cancel(b)],
        vec![branch("left")],
        vec![signal(b, "full", 0)],
        vec![cancel(missing)],
        vec![signal(b, "x", 100), Write::CreateRun { run: Box::new(new_run("n1")), lease: false }],
        vec![branch("right"), cancel(missing)],
        vec![Write::CreateRun { run: Box::new(new_run("a")), lease: false }],
    ];
    let tickets: Vec<_> = crowd.into_iter().map(|writes| store.submit(writes)).collect();
    let mut results = Vec::new();
    for ticket in tickets {
        results.push(ticket.await.expect("answered"));
    }
    let failed: Vec<usize> = (0..results.len()).filter(|&i| results[i].is_err()).collect();
    assert_eq!(failed, [0, 2, 5, 6, 8, 9], "{results:?}");
    assert!(matches!(results[0], Err(StoreError::NoSuchRun(k)) if k == missing), "{:?}", results[0]);
    assert!(matches!(results[2], Err(StoreError::SignalsFull(0))), "{:?}", results[2]);
    assert!(matches!(results[8], Err(StoreError::NoSuchRun(k)) if k == missing), "{:?}", results[8]);
    assert!(matches!(&results[9], Err(StoreError::RunExists(id)) if id == "a"), "{:?}", results[9]);
    let Ok(created) = &results[7] else { unreachable!() };
    let n1 = created.created[0].0.key;
    let want = [
        (ChangeKind::Signal, a),
        (ChangeKind::Cancel, b),
        (ChangeKind::Branch, a),
        (ChangeKind::Signal, b),
        (ChangeKind::Created, n1),
    ];
    feed_after_crowd(&store, &mut all, before, &want, (signal(b, "later", 100), ChangeKind::Signal)).await;
    // What landed, and only that.
    let consume = |run, name: &str| Write::ConsumeSignal {
        run,
        name: name.into(),
        entry: (0, Entry::event(EntryKind::Signal, name, 0, Vec::new())),
    };
    assert_eq!(commit(&*store, vec![consume(a, "go")]).await.unwrap().signal.as_deref(), Some(&b"go"[..]));
    assert_eq!(commit(&*store, vec![consume(b, "full")]).await.unwrap().signal, None, "no signal past the cap");
    let attempts: Vec<String> = store.branch_attempts(a).await.unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(attempts, ["left"], "the branch attempt of a failed item is not kept");
    let flags = |k| {
        let store = store.clone();
        async move { store.run_by_key(k).await.unwrap().map(|r| r.cancel_requested) }
    };
    assert_eq!((flags(a).await, flags(b).await), (Some(false), Some(true)));
    assert_eq!(store.run("n1").await.unwrap().map(|r| r.key), Some(n1));
}

/// A crowd of signals and cancels alone (on PostgreSQL, one round trip):
/// they land in the order submitted, a signal's cap counts the ones before
/// it in the same crowd, and a bad one fails alone.
pub(crate) async fn a_crowd_of_signals_and_cancels_keeps_its_order(open: Open) {
    let store = open("signal-crowd").await;
    let [a, b] = &create(&*store, &["a", "b"]).await[..] else { panic!() };
    let (a, b, missing) = (a.key, b.key, RunKey(i64::MAX - 1));
    let mut all = store.subscribe();
    let before = store.last_seq().await.unwrap();
    let signal = |run, payload: &str, max_pending| {
        vec![Write::SendSignal { run, name: "s".into(), payload: payload.as_bytes().to_vec(), max_pending }]
    };
    let cancel = |run| vec![Write::RequestCancel { run, grace_until: None }];
    let crowds = [
        vec![signal(a, "1", 3), signal(a, "2", 3), cancel(b), signal(a, "3", 3), signal(b, "x", 100)],
        vec![signal(a, "4", 3), cancel(missing), signal(b, "y", 2), signal(b, "z", 2), cancel(a)],
    ];
    let mut results = Vec::new();
    for crowd in crowds {
        let tickets: Vec<_> = crowd.into_iter().map(|writes| store.submit(writes)).collect();
        for ticket in tickets {
            results.push(ticket.await.expect("answered").map(|_| ()));
        }
    }
    let failed: Vec<usize> = (0..results.len()).filter(|&i| results[i].is_err()).collect();
    assert_eq!(failed, [5, 6, 8], "{results:?}");
    assert!(matches!(results[5], Err(StoreError::SignalsFull(3))), "{:?}", results[5]);
    assert!(matches!(results[6], Err(StoreError::NoSuchRun(k)) if k == missing), "{:?}", results[6]);
    assert!(matches!(results[8], Err(StoreError::SignalsFull(2))), "the cap counts the crowd's: {:?}", results[8]);
    let want = [
        (ChangeKind::Signal, a),
        (ChangeKind::Signal, a),
        (ChangeKind::Cancel, b),
        (ChangeKind::Signal, a),
        (ChangeKind::Signal, b),
        (ChangeKind::Signal, b),
        (ChangeKind::Cancel, a),
    ];
    let then = Write::RequestCancel { run: a, grace_until: None };
    feed_after_crowd(&store, &mut all, before, &want, (then, ChangeKind::Cancel)).await;
    // Delivered in the order sent, and nothing past the cap.
    let mut delivered = Vec::new();
    for (run, position) in [(a, 0), (a, 1), (a, 2), (a, 3), (b, 0), (b, 1), (b, 2)] {
        let consume = Write::ConsumeSignal {
            run,
            name: "s".into(),
            entry: (position, Entry::event(EntryKind::Signal, "s", 0, Vec::new())),
        };
        let signal = commit(&*store, vec![consume]).await.unwrap().signal;
        delivered.push(signal.map(|p| String::from_utf8(p).unwrap()));
    }
    let delivered: Vec<Option<&str>> = delivered.iter().map(|p| p.as_deref()).collect();
    assert_eq!(delivered, [Some("1"), Some("2"), Some("3"), None, Some("x"), Some("y"), None]);
    let flags = |k| {
        let store = store.clone();
        async move { store.run_by_key(k).await.unwrap().map(|r| r.cancel_requested) }
    };
    assert_eq!((flags(a).await, flags(b).await), (Some(true), Some(true)));
}

pub(crate) async fn lease_is_exclusive_and_taken_over(open: Open, reopen: Reopen) {
    let a = open("lease").await;
    let b = reopen(&a).await;
    let [run] = &create(&*a, &["x"]).await[..] else { panic!() };
    let held = a.lease(run.key).await.unwrap().expect("a free run can be leased");
    assert_eq!(held.run(), run.key);
    assert!(b.lease(run.key).await.unwrap().is_none(), "another holder is refused");
    drop(held);
    let taken = lease_soon(&*b, run.key).await.expect("a released lease is taken over at once");
    assert!(a.lease(run.key).await.unwrap().is_none(), "and is then refused to the first holder");
    drop(taken);
    // A run created with a lease is held before anyone can see it.
    let created = commit(&*a, vec![Write::CreateRun { run: Box::new(new_run("y")), lease: true }]).await.unwrap();
    let (record, lease) = created.created.into_iter().next().expect("created");
    assert!(lease.is_some(), "created with its lease");
    assert!(b.lease(record.key).await.unwrap().is_none(), "a new run's lease is held from the start");
    drop(lease);
    assert!(lease_soon(&*b, record.key).await.is_some());
}

pub(crate) async fn change_feed_in_order_and_replayable(open: Open) {
    let store = open("feed").await;
    let mut all = store.subscribe();
    let mut control = store.subscribe_control();
    let before = store.last_seq().await.unwrap();
    let [run] = &create(&*store, &["f"]).await[..] else { panic!() };
    let k = run.key;
    let entries = vec![step("a", 1, EntryStatus::Completed), step("b", 1, EntryStatus::Completed)];
    commit(&*store, vec![Write::Append { run: k, position: 0, entries }, Write::status(k, RunStatus::Running)])
        .await
        .unwrap();
    commit(&*store, vec![Write::SendSignal { run: k, name: "go".into(), payload: b"1".to_vec(), max_pending: 100 }])
        .await
        .unwrap();
    commit(&*store, vec![Write::BranchAttempt { run: k, entry: step("br", 1, EntryStatus::Completed) }]).await.unwrap();
    commit(&*store, vec![Write::RequestCancel { run: k, grace_until: None }]).await.unwrap();
    commit(&*store, vec![Write::cancelled(k)]).await.unwrap();
    let want = [
        (ChangeKind::Created, None, Some(RunStatus::Pending)),
        (ChangeKind::History, Some(0), None),
        (ChangeKind::History, Some(1), None),
        (ChangeKind::Status, None, Some(RunStatus::Running)),
        (ChangeKind::Signal, None, None),
        (ChangeKind::Branch, None, None),
        (ChangeKind::Cancel, None, None),
        (ChangeKind::Status, None, Some(RunStatus::Cancelled)),
    ];
    let mut got = Vec::new();
    for _ in want {
        got.push(next(&mut all).await);
    }
    let shape: Vec<_> = got.iter().map(|e| (e.kind, e.position, e.status)).collect();
    assert_eq!(shape, want, "{got:?}");
    assert!(got.iter().all(|e| e.run == k && e.ts_us > 0));
    assert!(got.windows(2).all(|w| w[0].seq < w[1].seq), "strictly increasing: {got:?}");
    assert!(got[0].seq > before);
    assert_eq!(store.last_seq().await.unwrap(), got.last().unwrap().seq);
    // The same events, read back from the store.
    assert_eq!(store.changes_since(before, 100).await.unwrap(), got);
    assert_eq!(store.changes_since(got[2].seq, 3).await.unwrap(), got[3..6]);
    // Control listeners get only what executing runs wait for.
    let mut control_got = Vec::new();
    for _ in 0..4 {
        control_got.push(next(&mut control).await);
    }
    let kinds: Vec<_> = control_got.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [ChangeKind::Created, ChangeKind::Signal, ChangeKind::Cancel, ChangeKind::Status]);
    assert_eq!(control_got[3].status, Some(RunStatus::Cancelled));
}

pub(crate) async fn other_processes_commits_reach_the_feed(open: Open, reopen: Reopen) {
    let here = open("foreign").await;
    let there = reopen(&here).await;
    let [run] = &create(&*here, &["g"]).await[..] else { panic!() };
    let mut all = here.subscribe();
    let mut control = here.subscribe_control();
    // Committed by the other handle, after the subscription.
    commit(
        &*there,
        vec![Write::SendSignal { run: run.key, name: "go".into(), payload: b"2".to_vec(), max_pending: 100 }],
    )
    .await
    .unwrap();
    let event = next(&mut all).await;
    assert_eq!((event.run, event.kind), (run.key, ChangeKind::Signal));
    assert_eq!(next(&mut control).await, event, "control listeners get it too");
    // Mixed with this process's own commits: each event exactly once.
    commit(&*here, vec![Write::status(run.key, RunStatus::Running)]).await.unwrap();
    commit(&*there, vec![Write::RequestCancel { run: run.key, grace_until: None }]).await.unwrap();
    let (a, b) = (next(&mut all).await, next(&mut all).await);
    let mut kinds = [a.kind, b.kind];
    kinds.sort_by_key(|k| k.as_str());
    assert_eq!(kinds, [ChangeKind::Cancel, ChangeKind::Status]);
    let quiet = tokio::time::timeout(Duration::from_millis(200), all.recv()).await;
    assert!(quiet.is_err(), "no duplicates: {quiet:?}");
    // History rows alone, one commit right after another, as a run's steps
    // commit: each reaches the whole feed (perhaps a little later than a
    // status change would), and only once.
    let lease = lease_soon(&*there, run.key).await.expect("the run can be leased");
    for (position, name) in ["h0", "h1", "h2"].into_iter().enumerate() {
        let entries = vec![step(name, 1, EntryStatus::Completed)];
        commit(&*there, vec![Write::Append { run: run.key, position, entries }]).await.unwrap();
        let e = next(&mut all).await;
        assert_eq!((e.run, e.kind, e.position), (run.key, ChangeKind::History, Some(position as u64)));
    }
    let quiet = tokio::time::timeout(Duration::from_millis(200), all.recv()).await;
    assert!(quiet.is_err(), "no duplicates: {quiet:?}");
    drop(lease);
    // A run another process creates wakes this one's idle workers (which
    // listen for control events alone).
    drop((all, control));
    let mut control = here.subscribe_control();
    let [created] = &create(&*there, &["g2"]).await[..] else { panic!() };
    let event = next(&mut control).await;
    assert_eq!((event.run, event.kind), (created.key, ChangeKind::Created));
}

/// A whole feed (what an SSE client reads, resuming from the last number it
/// saw) gets every change in the order of its number, another process's
/// commits between this one's included: a commit of this process waits to
/// be published until the other's before it are. Here the other process's
/// are steps, which PostgreSQL tells others of a few milliseconds late.
pub(crate) async fn the_whole_feed_goes_in_the_order_of_numbers(open: Open, reopen: Reopen) {
    const ROUNDS: usize = 20;
    let here = open("ordered").await;
    let there = reopen(&here).await;
    let [run, other] = &create(&*here, &["stepping", "signalled"]).await[..] else { panic!() };
    let lease = lease_soon(&*there, run.key).await.expect("the run can be leased");
    let mut all = here.subscribe();
    let from = here.changes_since(0, 1000).await.unwrap().last().map_or(0, |e| e.seq);
    for position in 0..ROUNDS {
        let entries = vec![step("s", position as u32 + 1, EntryStatus::Completed)];
        commit(&*there, vec![Write::Append { run: run.key, position, entries }]).await.unwrap();
        let signal = Write::SendSignal { run: other.key, name: "go".into(), payload: b"1".to_vec(), max_pending: 100 };
        commit(&*here, vec![signal]).await.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 2 * ROUNDS {
        got.push(next(&mut all).await);
    }
    let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|p| p[0] < p[1]), "in the order of numbers: {seqs:?}");
    assert_eq!(got, here.changes_since(from, 1000).await.unwrap(), "every change, as stored");
    let kinds: Vec<_> = got.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [ChangeKind::History, ChangeKind::Signal].repeat(ROUNDS));
    let quiet = tokio::time::timeout(Duration::from_millis(200), all.recv()).await;
    assert!(quiet.is_err(), "no duplicates: {quiet:?}");
    drop(lease);
}

pub(crate) async fn signals_are_consumed_once(open: Open) {
    let store = open("signals").await;
    let [run] = &create(&*store, &["s"]).await[..] else { panic!() };
    let k = run.key;
    for payload in [&b"1"[..], b"2"] {
        commit(
            &*store,
            vec![Write::SendSignal { run: k, name: "go".into(), payload: payload.to_vec(), max_pending: 100 }],
        )
        .await
        .unwrap();
    }
    commit(&*store, vec![Write::SendSignal { run: k, name: "other".into(), payload: b"9".to_vec(), max_pending: 100 }])
        .await
        .unwrap();
    let consume = |position: usize| Write::ConsumeSignal {
        run: k,
        name: "go".into(),
        entry: (position, Entry::event(EntryKind::Signal, "go", 0, Vec::new())),
    };
    // Two waits submitted together: each takes a different signal, in order.
    let (first, second) = (store.submit(vec![consume(0)]), store.submit(vec![consume(1)]));
    let first = first.await.unwrap().unwrap().signal;
    let second = second.await.unwrap().unwrap().signal;
    assert_eq!((first.as_deref(), second.as_deref()), (Some(&b"1"[..]), Some(&b"2"[..])));
    let none = commit(&*store, vec![consume(2)]).await.unwrap().signal;
    // Undelivered signals are capped: the one past the cap is refused.
    let send = |n: u64| Write::SendSignal { run: k, name: "x".into(), payload: b"0".to_vec(), max_pending: n };
    commit(&*store, vec![send(2)]).await.expect("one undelivered (\"other\") is below the cap");
    let full = commit(&*store, vec![send(2)]).await;
    assert!(matches!(full, Err(StoreError::SignalsFull(2))), "{full:?}");
    assert_eq!(none, None, "no third \"go\": the other signal is not taken");
    let history = store.history(k).await.unwrap();
    let payloads: Vec<&[u8]> = history.iter().map(|e| e.output.as_slice()).collect();
    assert_eq!(payloads, [&b"1"[..], b"2"], "each consumed signal is journaled where it was taken");
}

pub(crate) async fn cancel_is_recorded(open: Open) {
    let store = open("cancel").await;
    let [run, other] = &create(&*store, &["c", "d"]).await[..] else { panic!() };
    commit(&*store, vec![Write::RequestCancel { run: run.key, grace_until: None }]).await.unwrap();
    let unfinished = store.unfinished_runs().await.unwrap();
    let flags: Vec<(String, bool)> = unfinished.iter().map(|r| (r.id.clone(), r.cancel_requested)).collect();
    assert_eq!(flags, [("c".to_string(), true), ("d".to_string(), false)]);
    commit(&*store, vec![Write::cancelled(run.key)]).await.unwrap();
    let ids: Vec<String> = store.unfinished_runs().await.unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(ids, std::slice::from_ref(&other.id), "a cancelled run is finished");
    assert_eq!(store.unfinished_keys().await.unwrap(), [other.key]);
    assert_eq!(store.run_by_key(other.key).await.unwrap().map(|r| r.id), Some(other.id.clone()));
    assert!(store.run_by_key(RunKey(i64::MAX)).await.unwrap().is_none());
    let c = store.run("c").await.unwrap().unwrap();
    assert_eq!((c.status, c.error.as_deref()), (RunStatus::Cancelled, Some("cancelled")));
    let all: Vec<String> = store.runs().await.unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(all, ["c", "d"], "oldest first");
}

pub(crate) async fn cancel_grace_keeps_the_earliest_stop(open: Open) {
    let store = open("grace").await;
    let [run] = &create(&*store, &["g"]).await[..] else { panic!() };
    let request = |g: Option<i64>| Write::RequestCancel { run: run.key, grace_until: g };
    let grace = |s: &Arc<dyn RunStore>| {
        let s = s.clone();
        async move { s.run("g").await.unwrap().unwrap().cancel_grace_until }
    };
    commit(&*store, vec![request(Some(5_000))]).await.unwrap();
    assert_eq!(grace(&store).await, Some(5_000));
    commit(&*store, vec![request(Some(9_000))]).await.unwrap();
    assert_eq!(grace(&store).await, Some(5_000), "a later stop does not extend the grace");
    commit(&*store, vec![request(Some(1_000))]).await.unwrap();
    assert_eq!(grace(&store).await, Some(1_000));
    commit(&*store, vec![request(None)]).await.unwrap();
    assert_eq!(grace(&store).await, None, "a cancel without grace stops it at once");
    commit(&*store, vec![request(Some(1_000))]).await.unwrap();
    assert_eq!(grace(&store).await, None);
}

fn kv(reads: &[(&str, u64)], writes: &[(&str, Option<&str>)], max_keys: u64) -> Write {
    Write::Kv(Box::new(crate::store::KvCommit {
        namespace: "ns".into(),
        reads: reads.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        writes: writes.iter().map(|(k, v)| (k.to_string(), v.map(|v| v.as_bytes().to_vec()))).collect(),
        max_keys,
    }))
}

pub(crate) async fn kv_writes_are_checked_and_versioned(open: Open) {
    let store = open("kv").await;
    let [run] = &create(&*store, &["k"]).await[..] else { panic!() };
    let get = |key: &'static str| {
        let s = store.clone();
        async move { s.kv_get("ns", key).await.unwrap() }
    };
    let absent = get("a").await;
    assert_eq!((absent.value, absent.version), (None, 0));
    // A step's entry and its writes land together.
    let append = |p: usize| Write::Append {
        run: run.key,
        position: p,
        entries: vec![step("s", p as u32 + 1, EntryStatus::Completed)],
    };
    commit(&*store, vec![append(0), kv(&[("a", 0)], &[("a", Some("1")), ("b", Some("2"))], 10)]).await.unwrap();
    let a1 = get("a").await;
    assert_eq!((a1.value.as_deref(), a1.version), (Some(&b"1"[..]), 1));
    // A write whose read is stale fails whole: no history row, no value.
    let stale = commit(&*store, vec![append(1), kv(&[("a", 0)], &[("a", Some("9"))], 10)]).await;
    assert!(matches!(&stale, Err(StoreError::KvConflict { key }) if key == "a"), "{stale:?}");
    assert_eq!(store.history(run.key).await.unwrap().len(), 1, "the conflicting item wrote nothing");
    assert_eq!(get("a").await.value.as_deref(), Some(&b"1"[..]));
    // Beside a conflicting item in the same batch, a good one lands.
    let t1 = store.submit(vec![kv(&[("a", 1)], &[("a", Some("2"))], 10)]);
    let t2 = store.submit(vec![kv(&[("a", 1)], &[("a", Some("3"))], 10)]);
    let (r1, r2) = (t1.await.unwrap(), t2.await.unwrap());
    assert!(r1.is_ok() != r2.is_ok(), "exactly one of two writers from the same version wins: {r1:?} {r2:?}");
    let a2 = get("a").await;
    assert_eq!(a2.version, 2);
    // A deleted key keeps its version: a reader of the old state conflicts
    // with a writer that deletes and writes it again.
    commit(&*store, vec![kv(&[], &[("a", None)], 10)]).await.unwrap();
    let gone = get("a").await;
    assert_eq!((gone.value, gone.version), (None, 3));
    commit(&*store, vec![kv(&[], &[("a", Some("5"))], 10)]).await.unwrap();
    assert_eq!(get("a").await.version, 4);
    let old = commit(&*store, vec![kv(&[("a", 2)], &[("c", Some("1"))], 10)]).await;
    assert!(matches!(old, Err(StoreError::KvConflict { .. })), "{old:?}");
    // Deleting a key that never was is a no-op; listing skips deleted keys.
    commit(&*store, vec![kv(&[], &[("never", None), ("b", None)], 10)]).await.unwrap();
    assert_eq!(get("never").await.version, 0);
    commit(&*store, vec![kv(&[], &[("p/1", Some("1")), ("p/2", Some("2")), ("q", Some("3"))], 10)]).await.unwrap();
    let keys = |rows: Vec<(String, crate::store::KvValue)>| rows.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    assert_eq!(keys(store.kv_list("ns", "", None, 100).await.unwrap()), ["a", "p/1", "p/2", "q"]);
    assert_eq!(keys(store.kv_list("ns", "p/", None, 100).await.unwrap()), ["p/1", "p/2"]);
    assert_eq!(keys(store.kv_list("ns", "p/", Some("p/1"), 100).await.unwrap()), ["p/2"]);
    assert_eq!(keys(store.kv_list("ns", "", None, 2).await.unwrap()), ["a", "p/1"]);
    assert!(store.kv_list("other", "", None, 100).await.unwrap().is_empty(), "namespaces are apart");
    // The namespace holds 4 live keys: a fifth is refused past a cap of 4,
    // and overwriting one is not a new key.
    let full = commit(&*store, vec![kv(&[], &[("r", Some("1"))], 4)]).await;
    assert!(matches!(full, Err(StoreError::KvFull { max: 4, .. })), "{full:?}");
    commit(&*store, vec![kv(&[], &[("q", Some("4"))], 4)]).await.unwrap();
    commit(&*store, vec![kv(&[], &[("q", None), ("r", Some("1"))], 4)]).await.unwrap();
}

pub(crate) async fn modules_and_branches_read_back(open: Open) {
    let store = open("reads").await;
    let [run] = &create(&*store, &["m"]).await[..] else { panic!() };
    assert_eq!(store.module(MODULE).await.unwrap().as_deref(), Some(&b"\0asm"[..]));
    assert_eq!(store.module("nope").await.unwrap(), None);
    let mut late = step("b", 1, EntryStatus::Completed);
    late.finished_at = 10;
    let mut early = step("a", 1, EntryStatus::Failed);
    early.finished_at = 5;
    for e in [&late, &early] {
        commit(&*store, vec![Write::BranchAttempt { run: run.key, entry: e.clone() }]).await.unwrap();
    }
    assert_eq!(store.branch_attempts(run.key).await.unwrap(), [early, late], "in the order they ended");
    assert!(store.run("missing").await.unwrap().is_none());
}

pub(crate) async fn tokens_are_kept_by_hash_and_revoked(open: Open) {
    let store = open("tokens").await;
    let token = |id: &str, name: &str| TokenRecord {
        id: id.into(),
        name: name.into(),
        role: Role::Operator,
        hash: [id.as_bytes()[0]; 32],
        created_at: 1,
        revoked_at: None,
    };
    commit(&*store, vec![Write::CreateToken { token: token("a1", "ci") }]).await.unwrap();
    let dup = commit(&*store, vec![Write::CreateToken { token: token("b2", "ci") }]).await;
    assert!(matches!(dup, Err(StoreError::TokenExists(n)) if n == "ci"), "names are unique");
    commit(&*store, vec![Write::CreateToken { token: token("c3", "deploy") }]).await.unwrap();
    assert_eq!(store.token("a1").await.unwrap(), Some(token("a1", "ci")));
    assert_eq!(store.token("zz").await.unwrap(), None);
    commit(&*store, vec![Write::RevokeToken { id_or_name: "deploy".into() }]).await.unwrap();
    commit(&*store, vec![Write::RevokeToken { id_or_name: "a1".into() }]).await.unwrap();
    let missing = commit(&*store, vec![Write::RevokeToken { id_or_name: "nope".into() }]).await;
    assert!(matches!(missing, Err(StoreError::NoSuchToken(_))));
    let all = store.tokens().await.unwrap();
    assert_eq!(all.len(), 2);
    assert!(all.iter().all(|t| t.revoked_at.is_some()), "{all:?}");
}

pub(crate) async fn runs_are_paged_newest_first(open: Open) {
    let store = open("pages").await;
    let runs = create(&*store, &["p1", "p2", "p3", "p4", "p5"]).await;
    commit(&*store, vec![Write::cancelled(runs[1].key), Write::cancelled(runs[3].key)]).await.unwrap();
    let page = |filter: RunFilter| {
        let store = store.clone();
        async move { store.runs_page(&filter).await.unwrap().into_iter().map(|r| r.id).collect::<Vec<_>>() }
    };
    assert_eq!(page(RunFilter { limit: 2, ..RunFilter::default() }).await, ["p5", "p4"]);
    let after = RunFilter { limit: 2, before: Some(runs[3].key), ..RunFilter::default() };
    assert_eq!(page(after).await, ["p3", "p2"], "the next page starts below the cursor");
    let cancelled = RunFilter { limit: 10, status: Some(RunStatus::Cancelled), ..RunFilter::default() };
    assert_eq!(page(cancelled).await, ["p4", "p2"]);
    let by_module = RunFilter { limit: 10, module_prefix: Some(MODULE[..6].into()), ..RunFilter::default() };
    assert_eq!(page(by_module).await.len(), 5);
    let other = RunFilter { limit: 10, module_prefix: Some("ff".into()), ..RunFilter::default() };
    assert!(page(other).await.is_empty());
    let mut counts = store.run_counts().await.unwrap();
    counts.sort_by_key(|(s, _)| s.as_str());
    assert_eq!(counts, [(RunStatus::Cancelled, 2), (RunStatus::Pending, 3)]);
}

pub(crate) async fn history_is_paged(open: Open) {
    let store = open("history-pages").await;
    let [run] = &create(&*store, &["h"]).await[..] else { panic!() };
    let entries: Vec<Entry> = (1..=5).map(|i| step("s", i, EntryStatus::Completed)).collect();
    commit(&*store, vec![Write::Append { run: run.key, position: 0, entries: entries.clone() }]).await.unwrap();
    assert_eq!(store.history_page(run.key, 0, 2).await.unwrap(), entries[..2]);
    assert_eq!(store.history_page(run.key, 3, 10).await.unwrap(), entries[3..]);
    assert!(store.history_page(run.key, 5, 10).await.unwrap().is_empty());
}

/// Instantiate every test of the suite for one store.
macro_rules! suite {
    ($open:ident, $reopen:ident) => {
        crate::store::conformance::suite!($open, $reopen, (|| true));
    };
    ($open:ident, $reopen:ident, $enabled:expr) => {
        mod conformance {
            use crate::store::conformance as c;

            #[tokio::test]
            async fn commit_is_atomic() {
                if !($enabled)() {
                    return;
                }
                c::commit_is_atomic(super::$open).await
            }
            #[tokio::test]
            async fn one_bad_item_fails_alone() {
                if !($enabled)() {
                    return;
                }
                c::one_bad_item_fails_alone(super::$open).await
            }
            #[tokio::test]
            async fn new_runs_commit_in_a_crowd_and_a_bad_one_fails_alone() {
                if !($enabled)() {
                    return;
                }
                c::new_runs_commit_in_a_crowd_and_a_bad_one_fails_alone(super::$open, super::$reopen).await
            }
            #[tokio::test]
            async fn a_crowd_of_other_items_commits_and_bad_ones_fail_alone() {
                if !($enabled)() {
                    return;
                }
                c::a_crowd_of_other_items_commits_and_bad_ones_fail_alone(super::$open).await
            }
            #[tokio::test]
            async fn a_crowd_of_signals_and_cancels_keeps_its_order() {
                if !($enabled)() {
                    return;
                }
                c::a_crowd_of_signals_and_cancels_keeps_its_order(super::$open).await
            }
            #[tokio::test]
            async fn lease_is_exclusive_and_taken_over() {
                if !($enabled)() {
                    return;
                }
                c::lease_is_exclusive_and_taken_over(super::$open, super::$reopen).await
            }
            #[tokio::test]
            async fn change_feed_in_order_and_replayable() {
                if !($enabled)() {
                    return;
                }
                c::change_feed_in_order_and_replayable(super::$open).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn other_processes_commits_reach_the_feed() {
                if !($enabled)() {
                    return;
                }
                c::other_processes_commits_reach_the_feed(super::$open, super::$reopen).await
            }
            #[tokio::test]
            async fn the_whole_feed_goes_in_the_order_of_numbers() {
                if !($enabled)() {
                    return;
                }
                c::the_whole_feed_goes_in_the_order_of_numbers(super::$open, super::$reopen).await
            }
            #[tokio::test]
            async fn signals_are_consumed_once() {
                if !($enabled)() {
                    return;
                }
                c::signals_are_consumed_once(super::$open).await
            }
            #[tokio::test]
            async fn cancel_is_recorded() {
                if !($enabled)() {
                    return;
                }
                c::cancel_is_recorded(super::$open).await
            }
            #[tokio::test]
            async fn cancel_grace_keeps_the_earliest_stop() {
                if !($enabled)() {
                    return;
                }
                c::cancel_grace_keeps_the_earliest_stop(super::$open).await
            }
            #[tokio::test]
            async fn kv_writes_are_checked_and_versioned() {
                if !($enabled)() {
                    return;
                }
                c::kv_writes_are_checked_and_versioned(super::$open).await
            }
            #[tokio::test]
            async fn tokens_are_kept_by_hash_and_revoked() {
                if !($enabled)() {
                    return;
                }
                c::tokens_are_kept_by_hash_and_revoked(super::$open).await
            }
            #[tokio::test]
            async fn history_is_paged() {
                if !($enabled)() {
                    return;
                }
                c::history_is_paged(super::$open).await
            }
            #[tokio::test]
            async fn runs_are_paged_newest_first() {
                if !($enabled)() {
                    return;
                }
                c::runs_are_paged_newest_first(super::$open).await
            }
            #[tokio::test]
            async fn modules_and_branches_read_back() {
                if !($enabled)() {
                    return;
                }
                c::modules_and_branches_read_back(super::$open).await
            }
        }
    };
}
pub(crate) use suite;
