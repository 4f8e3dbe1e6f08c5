//! A batch of new runs as one statement: what `cairn serve` commits for a
//! crowd of `POST /api/runs`, and `cairn-bench` for W2-pg's 2,000 runs.
//!
//! Item by item (`writer::transact`), each run cost two round trips and
//! each item two more for its savepoint, all of them under the gate, which
//! every other process's commits wait for: 2,000 runs took about half a
//! second. One statement in autocommit takes the gate, numbers the runs'
//! `created` changes, inserts the runs and their change rows from arrays
//! and notifies, so the gate is held for one statement's execution and
//! its flush, whatever the distance to the server. It lands whole or not at
//! all: a run id that exists (the unique index) or a module that does not
//! (the foreign key) fails it, and the writer commits the batch again item
//! by item, so that only the bad item fails, with its own error. When the
//! connection fails before the answer, the runs are looked for (each has
//! a random key of its own) before anything is committed again.
//!
//! A statement locks the tables it writes when it starts, before its gate
//! CTE runs. That is no cycle with writers, which lock rows only under the
//! gate; `cairn migrate`'s import, which locks whole tables under it, can
//! wait for such a statement while the statement waits for the gate, and
//! the server's deadlock check (`deadlock_timeout`, a second) then fails
//! one of them: the statement goes item by item, an import says why.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use deadpool_postgres::ClientWrapper;
use tokio_postgres::types::ToSql;

use super::gate::gate_cte;
use super::listen::notify_sql;
use super::writer::{Job, other_change};
use super::{Inner, lease, pg_error};
use crate::model::{NewRun, RunKey, now_ms, now_us};
use crate::store::{ChangeKind, Committed, StoreError, Write};

/// How a batch of new runs fared.
pub(super) enum Outcome {
    /// Committed: its first change number, and each job's result.
    Committed(i64, Vec<Result<Committed, StoreError>>),
    /// The server refused it, or it did not reach the server (nothing
    /// landed): commit it item by item.
    Refused,
    /// The connection failed and the runs were looked for: not there.
    NotLanded,
    /// The connection failed: whether it landed is not known.
    Unknown(StoreError),
}

/// Above this many bytes of inputs and configs, a batch goes item by item:
/// one statement's parameters must fit in a protocol message (1 GB), and
/// runs this large gain nothing from sharing a round trip.
const MAX_BYTES: usize = 64 << 20;

/// $1 the number of runs, $2 their `created_at`, $3 this process (the
/// owner of runs created with a lease, and the notification's), $4 the
/// lease in milliseconds, $5 to $12 the runs column by column, $13 the
/// commit's time. The runs get their keys in the order given, and their
/// `created` changes their numbers in key order; the keys come back in
/// that order.
const CREATE_RUNS: &str = concat!(
    "WITH ",
    gate_cte!(),
    ", seq AS MATERIALIZED (
    SELECT setval('cairn_ids', coalesce(pg_sequence_last_value('cairn_ids'), 0) + $1::BIGINT) - $1::BIGINT + 1 AS first
      FROM gate WHERE gate.locked IS NOT NULL
), new_runs AS (
    INSERT INTO runs (id, module, module_path, input, config, status, created_at, random_key, owner, epoch,
                      lease_until)
    SELECT u.id, u.module, u.module_path, u.input, u.config, u.status, $2::BIGINT, u.random_key,
           CASE WHEN u.lease THEN $3::TEXT END, CASE WHEN u.lease THEN 1 ELSE 0 END,
           CASE WHEN u.lease THEN now() + $4::BIGINT * interval '1 millisecond' END
      FROM seq, unnest($5::TEXT[], $6::TEXT[], $7::TEXT[], $8::BYTEA[], $9::TEXT[], $10::TEXT[], $11::BYTEA[],
                       $12::BOOLEAN[]) WITH ORDINALITY
           AS u(id, module, module_path, input, config, status, random_key, lease, ord)
     ORDER BY u.ord
    RETURNING seq, id, status
), created AS (
    INSERT INTO changes (seq, run, kind, status, committed_us)
    SELECT seq.first + row_number() OVER (ORDER BY n.seq) - 1, n.seq, 'created', n.status, $13::BIGINT
      FROM seq, new_runs n
)
SELECT seq.first, (SELECT array_agg(n.id ORDER BY n.seq) FROM new_runs n),
       (SELECT array_agg(n.seq ORDER BY n.seq) FROM new_runs n), ",
    notify_sql!("$3", "seq.first + $1::BIGINT", "'c'"),
    "
  FROM seq"
);

/// What a landed statement wrote, read back once the gate is held (a lost
/// connection's statement may still be running): each run of the batch
/// that has the random key it was given, with its `created` change's
/// number, in key order.
const LANDED: &str = "SELECT r.id, r.seq, c.seq FROM runs r JOIN changes c ON c.run = r.seq AND c.kind = 'created' \
                      WHERE (r.id, r.random_key) IN (SELECT * FROM unnest($1::TEXT[], $2::BYTEA[])) ORDER BY r.seq";

/// The new runs of a batch, in order, if that is all it writes.
pub(super) fn only_new_runs(jobs: &[Job]) -> Option<Vec<(&NewRun, bool)>> {
    let mut runs = Vec::new();
    let mut bytes = 0;
    for write in jobs.iter().flat_map(|job| &job.writes) {
        match write {
            Write::CreateRun { run, lease } => {
                bytes += run.input.len() + run.module_path.len() + 256;
                runs.push((&**run, *lease));
            }
            _ => return None,
        }
    }
    (!runs.is_empty() && bytes <= MAX_BYTES).then_some(runs)
}

/// The batch's columns, as the statement takes them.
struct Columns<'a> {
    ids: Vec<&'a str>,
    modules: Vec<&'a str>,
    paths: Vec<&'a str>,
    inputs: Vec<&'a [u8]>,
    configs: Vec<String>,
    statuses: Vec<&'static str>,
    keys: Vec<&'a [u8]>,
    leases: Vec<bool>,
}

pub(super) async fn commit(
    inner: &Arc<Inner>,
    client: &ClientWrapper,
    jobs: &[Job],
    runs: &[(&NewRun, bool)],
) -> Outcome {
    let (created_at, ts_us) = (now_ms(), now_us());
    let mut configs = Vec::with_capacity(runs.len());
    for (run, _) in runs {
        match serde_json::to_string(&run.config) {
            Ok(config) => configs.push(config),
            // Item by item, where this item fails alone.
            Err(_) => return Outcome::Refused,
        }
    }
    let c = Columns {
        ids: runs.iter().map(|(r, _)| r.id.as_str()).collect(),
        modules: runs.iter().map(|(r, _)| r.module.as_str()).collect(),
        paths: runs.iter().map(|(r, _)| r.module_path.as_str()).collect(),
        inputs: runs.iter().map(|(r, _)| r.input.as_slice()).collect(),
        configs,
        statuses: runs.iter().map(|(r, _)| r.status.as_str()).collect(),
        keys: runs.iter().map(|(r, _)| &r.random_key[..]).collect(),
        leases: runs.iter().map(|&(_, lease)| lease).collect(),
    };
    let n = runs.len() as i64;
    let lease_ms = inner.lease.as_millis() as i64;
    let params: [&(dyn ToSql + Sync); 13] = [
        &n,
        &created_at,
        &inner.owner,
        &lease_ms,
        &c.ids,
        &c.modules,
        &c.paths,
        &c.inputs,
        &c.configs,
        &c.statuses,
        &c.keys,
        &c.leases,
        &ts_us,
    ];
    let statement = match client.prepare_cached(CREATE_RUNS).await {
        Ok(statement) => statement,
        // Not sent: nothing landed.
        Err(e) => {
            refused(&e);
            return Outcome::Refused;
        }
    };
    let (first, keys) = match client.query_one(&statement, &params).await {
        Ok(row) => {
            let ids: Option<Vec<String>> = row.get(1);
            let keys: Option<Vec<i64>> = row.get(2);
            let numbered = ids.unwrap_or_default().into_iter().zip(keys.unwrap_or_default());
            (row.get::<_, i64>(0), numbered.enumerate().map(|(i, (id, key))| (id, key, i as i64)).collect())
        }
        Err(e) if e.as_db_error().is_some() => {
            refused(&e);
            return Outcome::Refused;
        }
        Err(e) => match settle(inner, &c.ids, &c.keys).await {
            Some(Some(landed)) => landed,
            Some(None) => return Outcome::NotLanded,
            None => return Outcome::Unknown(pg_error(e)),
        },
    };
    #[cfg(test)]
    inner.new_runs_by_statement.fetch_add(n as u64, Ordering::Relaxed);
    let mut events = Vec::with_capacity(runs.len());
    let mut results = Vec::with_capacity(jobs.len());
    let mut runs = runs.iter().enumerate();
    for job in jobs {
        let mut committed = Ok(Committed::default());
        for (_, (i, (run, lease))) in job.writes.iter().zip(runs.by_ref()) {
            // Each run the statement inserted comes back with its key, in
            // the order given (looked for only if not). (The writes first:
            // `zip` takes from its first iterator first.)
            let found = keys.get(i).filter(|(id, _, _)| *id == run.id);
            let Some((_, key, rank)) = found.or_else(|| keys.iter().find(|(id, _, _)| *id == run.id)) else {
                committed = Err(StoreError::Corrupt(format!("run {} was committed without its key", run.id)));
                continue;
            };
            let key = RunKey(*key);
            events.push(other_change((first + rank) as u64, key, ChangeKind::Created, Some(run.status), ts_us));
            if let Ok(committed) = &mut committed {
                let held = lease.then(|| lease::held(inner, key, 1, None));
                committed.created.push((run.record(key, created_at), held));
            }
        }
        results.push(committed);
    }
    events.sort_by_key(|e| e.seq);
    inner.publish_own(first as u64, (first + n) as u64, events);
    Outcome::Committed(first, results)
}

/// A refusal other than the ones a bad item causes (a run id taken, a
/// module not stored) would send every crowd the slow way: said once.
fn refused(e: &tokio_postgres::Error) {
    static SAID: AtomicBool = AtomicBool::new(false);
    let expected = e.code().is_some_and(|c| {
        *c == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
            || *c == tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION
    });
    if !expected && !SAID.swap(true, Ordering::Relaxed) {
        let why = e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string());
        eprintln!("cairn: new runs are committed one by one: {why}");
    }
}

/// Each landed run: its id, key and change number's rank.
type Landed = (i64, Vec<(String, i64, i64)>);

/// Whether a batch whose connection failed before its answer came landed:
/// `Some(Some(..))` with its first change number and its runs, `Some(None)`
/// if it did not, `None` if the database cannot tell now. One statement
/// lands whole or not at all, and each run has a random key of its own, so
/// the runs with these ids and keys tell. Looked for, on new connections,
/// for up to a lease's length: a server restarting comes back meanwhile.
async fn settle(inner: &Inner, ids: &[&str], keys: &[&[u8]]) -> Option<Option<Landed>> {
    let rows = super::gate::read_when_settled(inner, LANDED, &[&ids, &keys]).await?;
    let rows: Vec<(String, i64, i64)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    let Some(&(_, _, first)) = rows.first() else { return Some(None) };
    let whole = rows.len() == ids.len() && rows.iter().zip(0..).all(|(r, rank)| r.2 == first + rank);
    if !whole {
        eprintln!("cairn: a batch of new runs landed in part ({} of {}); it cannot", rows.len(), ids.len());
        return None;
    }
    Some(Some((first, rows.into_iter().zip(0..).map(|((id, key, _), rank)| (id, key, rank)).collect())))
}
