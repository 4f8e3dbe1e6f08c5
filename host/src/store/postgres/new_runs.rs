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
//! by item, so that only the bad item fails, with its own error.

use std::collections::HashMap;
use std::sync::Arc;

use deadpool_postgres::ClientWrapper;
use tokio_postgres::types::ToSql;

use super::gate::gate_cte;
use super::listen::notify_sql;
use super::writer::{Job, other_change};
use super::{Inner, lease};
use crate::model::{NewRun, RunKey, now_ms, now_us};
use crate::store::{ChangeKind, Committed, StoreError, Write};

/// How a batch of new runs fared.
pub(super) enum Outcome {
    /// Committed: each job's result.
    Committed(Vec<Result<Committed, StoreError>>),
    /// The server refused it (nothing landed): commit it item by item.
    Refused,
    /// The connection failed: whether it landed is not known.
    Unknown(StoreError),
}

/// $1 the number of runs, $2 their `created_at`, $3 this process (the
/// owner of runs created with a lease, and the notification's), $4 the
/// lease in milliseconds, $5 to $12 the runs column by column, $13 the
/// commit's time. The runs get their keys in the order given.
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
    RETURNING seq, id
), created AS (
    INSERT INTO changes (seq, run, kind, status, committed_us)
    SELECT seq.first + u.ord - 1, n.seq, 'created', u.status, $13::BIGINT
      FROM seq, new_runs n JOIN unnest($5::TEXT[], $10::TEXT[]) WITH ORDINALITY AS u(id, status, ord) ON u.id = n.id
)
SELECT seq.first, (SELECT array_agg(n.id) FROM new_runs n), (SELECT array_agg(n.seq) FROM new_runs n), ",
    notify_sql!("$3", "seq.first + $1::BIGINT", "'c'"),
    "
  FROM seq"
);

/// The new runs of a batch, in order, if that is all it writes.
pub(super) fn only_new_runs(jobs: &[Job]) -> Option<Vec<(&NewRun, bool)>> {
    let mut runs = Vec::new();
    for write in jobs.iter().flat_map(|job| &job.writes) {
        match write {
            Write::CreateRun { run, lease } => runs.push((&**run, *lease)),
            _ => return None,
        }
    }
    (!runs.is_empty()).then_some(runs)
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
            // Not the server's refusal, but the same way out: item by item,
            // where this item fails alone.
            Err(_) => return Outcome::Refused,
        }
    }
    let n = runs.len() as i64;
    let lease_ms = inner.lease.as_millis() as i64;
    let ids: Vec<&str> = runs.iter().map(|(r, _)| r.id.as_str()).collect();
    let modules: Vec<&str> = runs.iter().map(|(r, _)| r.module.as_str()).collect();
    let paths: Vec<&str> = runs.iter().map(|(r, _)| r.module_path.as_str()).collect();
    let inputs: Vec<&[u8]> = runs.iter().map(|(r, _)| r.input.as_slice()).collect();
    let statuses: Vec<&str> = runs.iter().map(|(r, _)| r.status.as_str()).collect();
    let keys: Vec<&[u8]> = runs.iter().map(|(r, _)| &r.random_key[..]).collect();
    let leases: Vec<bool> = runs.iter().map(|&(_, lease)| lease).collect();
    let params: [&(dyn ToSql + Sync); 13] = [
        &n,
        &created_at,
        &inner.owner,
        &lease_ms,
        &ids,
        &modules,
        &paths,
        &inputs,
        &configs,
        &statuses,
        &keys,
        &leases,
        &ts_us,
    ];
    let sent = match client.prepare_cached(CREATE_RUNS).await {
        Ok(statement) => client.query_one(&statement, &params).await,
        Err(e) => Err(e),
    };
    let row = match sent {
        Ok(row) => row,
        Err(e) if e.as_db_error().is_some() => return Outcome::Refused,
        Err(e) => return Outcome::Unknown(super::pg_error(e)),
    };
    let first: i64 = row.get(0);
    let returned: (Option<Vec<String>>, Option<Vec<i64>>) = (row.get(1), row.get(2));
    let keys: HashMap<String, i64> =
        returned.0.unwrap_or_default().into_iter().zip(returned.1.unwrap_or_default()).collect();
    inner.own.lock().unwrap_or_else(|p| p.into_inner()).add(first as u64, (first + n) as u64);
    let mut events = Vec::with_capacity(runs.len());
    let mut results = Vec::with_capacity(jobs.len());
    let mut seq = first;
    for job in jobs {
        let mut committed = Committed::default();
        for write in &job.writes {
            let Write::CreateRun { run, lease } = write else {
                unreachable!("only_new_runs let only new runs through")
            };
            let Some(&key) = keys.get(&run.id) else {
                // The statement inserts every run or fails: this cannot be.
                return Outcome::Unknown(StoreError::Corrupt(format!("run {} was committed without its key", run.id)));
            };
            let key = RunKey(key);
            events.push(other_change(seq as u64, key, ChangeKind::Created, Some(run.status), ts_us));
            seq += 1;
            let held = lease.then(|| lease::held(inner, key, 1, None));
            committed.created.push((run.record(key, created_at), held));
        }
        results.push(Ok(committed));
    }
    inner.publish(events);
    Outcome::Committed(results)
}
