//! The SQLite store's tests: the conformance suite, and the writer's
//! batches (which the contract cannot force) checked directly.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::SqliteStore;
use crate::model::{Entry, EntryKind, EntryStatus, RunKey, RunStatus};
use crate::store::{Durability, RunStore, StoreError, Write};

/// A fresh database path under the system's temporary directory.
pub(crate) fn temp_db(name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("cairn-sqlite-test-{name}-{}-{n}.db", std::process::id()));
    for ext in ["", "-wal", "-shm", ".lock"] {
        let _ = std::fs::remove_file(format!("{}{ext}", path.display()));
    }
    path
}

fn open_now(name: &str) -> Arc<dyn RunStore> {
    Arc::new(SqliteStore::open(&temp_db(name), Durability::Process).expect("open"))
}

fn open(name: &str) -> crate::store::conformance::Opening {
    let store = open_now(name);
    Box::pin(async move { store })
}

/// A second store on the same file: another process, as far as leases
/// and the change feed can tell.
fn reopen(store: &Arc<dyn RunStore>) -> crate::store::conformance::Opening {
    let store: Arc<dyn RunStore> =
        Arc::new(SqliteStore::open(Path::new(store.location()), Durability::Process).expect("reopen"));
    Box::pin(async move { store })
}

crate::store::conformance::suite!(open, reopen);

/// Create run `id` of the conformance suite's module.
fn new_run(id: &str) -> Write {
    Write::CreateRun { run: Box::new(crate::store::conformance::new_run(id)), lease: false }
}

#[tokio::test]
async fn one_bad_item_does_not_abort_its_batch() {
    let path = temp_db("batch");
    let store = SqliteStore::open(&path, crate::store::Durability::Process).unwrap();
    let w = store.write_side();
    let module = Write::PutModule { hash: crate::store::conformance::MODULE.into(), bytes: vec![0] };
    let good_a = [module, new_run("a")];
    let bad = [Write::status(RunKey(999_999), RunStatus::Completed)];
    let good_b = [new_run("b")];
    let results = w.write_batch(&mut w.lock(), &[&good_a, &bad, &good_b]);
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    assert!(matches!(results[1], Err(StoreError::NoSuchRun(RunKey(999_999)))), "{results:?}");
    let ids: Vec<String> = store.runs().await.unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(ids, ["a", "b"], "the good items are committed");
}

/// A batch's history rows go in together, in statements of several
/// sizes: every row lands at its position, with its fields; an item
/// whose rows collide with committed ones fails alone.
#[tokio::test]
async fn batched_history_rows_land_whole_and_a_colliding_item_fails_alone() {
    let path = temp_db("rows");
    let store = SqliteStore::open(&path, crate::store::Durability::Process).unwrap();
    let w = store.write_side();
    let mut setup = vec![Write::PutModule { hash: crate::store::conformance::MODULE.into(), bytes: vec![0] }];
    setup.extend(["a", "b", "c"].map(new_run));
    let created = w.write_batch(&mut w.lock(), &[&setup]).pop().unwrap().unwrap().created;
    let keys: Vec<RunKey> = created.iter().map(|(r, _)| r.key).collect();
    let entry = |run: usize, i: usize| Entry {
        kind: EntryKind::Step,
        name: format!("s{run}"),
        occurrence: i as u32 + 1,
        attempt: 1,
        status: EntryStatus::Completed,
        output: format!("[{run},{i}]").into_bytes(),
        error: i.is_multiple_of(7).then(|| format!("e{i}")),
        started_at: i as i64,
        finished_at: 1000 + i as i64,
    };
    // 45 rows for run a (32 + 8 + 5 single rows), 3 for run b.
    let append = |run: usize, from: usize, n: usize| Write::Append {
        run: keys[run],
        position: from,
        entries: (from..from + n).map(|i| entry(run, i)).collect(),
    };
    let (a1, a2, b1) = ([append(0, 0, 20)], [append(0, 20, 25)], [append(1, 0, 3)]);
    let results = w.write_batch(&mut w.lock(), &[&a1, &a2, &b1]);
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    // Run b's position 2 exists already: that item fails, run c's commits.
    let (b_again, c1) = ([append(1, 2, 2)], [append(2, 0, 2)]);
    let results = w.write_batch(&mut w.lock(), &[&b_again, &c1]);
    assert!(results[0].is_err() && results[1].is_ok(), "{results:?}");
    for (run, n) in [(0, 45), (1, 3), (2, 2)] {
        let history = store.history(keys[run]).await.unwrap();
        let want: Vec<Entry> = (0..n).map(|i| entry(run, i)).collect();
        assert_eq!(history, want, "run {run}");
    }
}
