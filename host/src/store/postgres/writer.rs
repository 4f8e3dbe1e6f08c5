//! Group commit on PostgreSQL: one task takes everything queued and writes
//! it in one transaction (one WAL flush for all of it). The common batches
//! (steps and statuses; new runs alone; signals and cancels alone) go as
//! one statement or one round trip; the rest item by item, first without
//! savepoints and, if an item fails, again with one per item, so that a bad
//! item fails alone. The transaction first takes the gate (`gate`), so
//! change numbers follow commit order across processes; it ends with a
//! notification, so other processes hear of it at commit.
//! `synchronous_commit` follows the durability: `power` waits for the
//! flush, `process` does not.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::ClientWrapper;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::gate::LAST_COMMITTED;
use super::listen::CHANNEL;
use super::one_statement::{self, Outcome};
use super::pipelined::Item;
use super::{Inner, lease, new_runs, pg_error, pipelined, pool_error, spin};
use crate::model::{NewRun, RunKey, RunRecord, RunStatus, now_ms, now_us};
use crate::store::{ChangeEvent, ChangeKind, Committed, Durability, KvCommit, StoreError, Write};

/// At most this many commit items share one transaction.
const MAX_BATCH: usize = 1024;

pub(super) struct Job {
    pub(super) writes: Vec<Write>,
    /// The epochs of this process's leases on the written runs when the
    /// writes were submitted: what fences them, so that a lease dropped or
    /// given back while they wait in the queue does not unfence them.
    pub(super) epochs: Vec<(RunKey, u64)>,
    pub(super) done: oneshot::Sender<Result<Committed, StoreError>>,
}

impl Job {
    pub(super) fn new(inner: &Inner, writes: Vec<Write>, done: oneshot::Sender<Result<Committed, StoreError>>) -> Job {
        let mut epochs: Vec<(RunKey, u64)> = Vec::new();
        let held = inner.held.lock().unwrap_or_else(|p| p.into_inner());
        for run in writes.iter().filter_map(Write::run) {
            if !epochs.iter().any(|e| e.0 == run)
                && let Some(h) = held.get(&run)
            {
                epochs.push((run, h.epoch));
            }
        }
        drop(held);
        Job { writes, epochs, done }
    }

    pub(super) fn epoch(&self, run: RunKey) -> Option<u64> {
        self.epochs.iter().find(|e| e.0 == run).map(|e| e.1)
    }
}

/// History rows alone notify other processes at most this often. A
/// notification wakes every listening backend and client, and a run's
/// steps commit every few hundred microseconds; a process that reads every
/// change (a server's feed) reads them about this late (a millisecond
/// more when the writer falls idle: `NOTIFY_IDLE_GRACE`). Status changes,
/// new runs and signals notify at once.
const NOTIFY_HISTORY_EVERY: Duration = Duration::from_millis(5);

/// An owed notification that came due waits this long after the writer's
/// last commit before it goes out on its own (and at most another
/// `NOTIFY_HISTORY_EVERY`). A run's next step usually reaches the writer
/// within tens of microseconds of its commit, and that commit carries the
/// notification. Sent as soon as it came due, it was nearly always sent
/// alone: the deadline passes while a commit is in flight, and when the
/// answer comes the writer finds the timer expired before the run's next
/// step could reach it. That step's commit then waited behind a
/// transaction of its own every 5 ms (27 in a 300-step `cairn run`; none
/// with the grace).
const NOTIFY_IDLE_GRACE: Duration = Duration::from_millis(1);

/// When this process last notified, the sequence's next number after
/// commits it has not notified yet, if any, and when its last commit
/// ended.
struct Notices {
    last: Instant,
    owed: Option<u64>,
    last_commit: Instant,
}

impl Notices {
    /// When history rows alone may notify again.
    fn next_at(&self) -> Instant {
        self.last + NOTIFY_HISTORY_EVERY
    }

    /// When an owed notification that is due goes out on its own, if no
    /// commit comes to carry it first.
    fn alone_at(&self) -> Instant {
        let next_at = self.next_at();
        next_at.max((self.last_commit + NOTIFY_IDLE_GRACE).min(next_at + NOTIFY_HISTORY_EVERY))
    }

    fn due(&self) -> bool {
        Instant::now() >= self.next_at()
    }

    fn notified(&mut self) {
        (self.last, self.owed) = (Instant::now(), None);
    }

    /// The notification owed, once no commit came to carry it.
    async fn settle(&mut self, inner: &Inner) {
        let Some(next) = self.owed else { return };
        let payload = super::listen::payload(&inner.owner, next, false).replace('\'', "''");
        // Nothing to make durable: the commits it tells of already are.
        let sql =
            format!("BEGIN; SET LOCAL synchronous_commit = off; SELECT pg_notify('{CHANNEL}', '{payload}'); COMMIT");
        match inner.pool.get().await {
            Ok(client) => match client.batch_execute(&sql).await {
                Ok(()) => self.notified(),
                Err(e) => {
                    let _ = client.batch_execute("ROLLBACK").await;
                    eprintln!("cairn: cannot notify other processes of commits: {}", pg_error(e));
                }
            },
            Err(e) => eprintln!("cairn: cannot notify other processes of commits: {}", pool_error(e)),
        }
        // Not again: the next notification covers these commits too.
        self.owed = None;
    }
}

pub(super) async fn run(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<Job>, mut spin: spin::Spin) {
    let mut jobs: Vec<Job> = Vec::new();
    let mut notices = Notices { last: Instant::now() - NOTIFY_HISTORY_EVERY, owed: None, last_commit: Instant::now() };
    let mut numbers = one_statement::Numbers::default();
    // One timer for the owed notification, moved on only when a notification
    // went out or came due. A timer armed anew while waiting for each step's
    // commit is the runtime's earliest, and arming it wakes the runtime's I/O
    // driver: a syscall and an extra poll at every step. Moving this one
    // later touches no driver.
    let owed_timer = tokio::time::sleep_until(notices.next_at().into());
    tokio::pin!(owed_timer);
    loop {
        let first = if notices.owed.is_some() {
            let due = notices.next_at().into();
            if owed_timer.deadline() < due {
                owed_timer.as_mut().reset(due);
            }
            tokio::select! {
                biased;
                first = rx.recv() => first,
                () = &mut owed_timer => {
                    // A commit that comes within the grace carries it.
                    let alone_at = notices.alone_at();
                    if Instant::now() < alone_at {
                        owed_timer.as_mut().reset(alone_at.into());
                    } else {
                        notices.settle(&inner).await;
                    }
                    continue;
                }
            }
        } else {
            rx.recv().await
        };
        let Some(first) = first else { break };
        jobs.push(first);
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let metrics = crate::telemetry::get();
        metrics.commit_batch.record(jobs.len() as f64);
        let committing = std::time::Instant::now();
        // A lone commit of the only run held here is polled a while before
        // the thread parks (`spin`: a parked vCPU is slow to wake).
        let held = || inner.held.lock().unwrap_or_else(|p| p.into_inner()).len();
        let committed = spin.drive(jobs.len(), held, commit(&inner, &jobs, &mut notices, &mut numbers)).await;
        let results = match committed {
            Ok(results) => results,
            Err(e) => {
                let message = e.to_string();
                jobs.iter().map(|_| Err(StoreError::Commit(message.clone()))).collect()
            }
        };
        // The commit's round trip, with the server's WAL flush.
        notices.last_commit = Instant::now();
        metrics.fsync_seconds.record(notices.last_commit - committing);
        for (job, result) in jobs.drain(..).zip(results) {
            let _ = job.done.send(result);
        }
    }
    notices.settle(&inner).await;
}

/// The state of one batch's transaction.
pub(super) struct Batch {
    next_seq: i64,
    pub(super) ts_us: i64,
    events: Vec<ChangeEvent>,
}

impl Batch {
    fn take_seq(&mut self) -> i64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }
}

/// One transaction over the jobs; an `Err` fails them all (nothing landed).
/// The transaction is run by hand, not through `tokio_postgres::Transaction`,
/// so that `BEGIN` and `COMMIT` ride in the same round trips as the
/// statements around them; any way out but the commit rolls back before
/// the connection goes back to the pool.
async fn commit(
    inner: &Arc<Inner>,
    jobs: &[Job],
    notices: &mut Notices,
    numbers: &mut one_statement::Numbers,
) -> Result<Vec<Result<Committed, StoreError>>, StoreError> {
    let mut client = inner.pool.get().await.map_err(pool_error)?;
    // The listener waits for this before it tells its own changes apart.
    let _writing = inner.writing.lock().await;
    // What did not commit goes item by item (nothing landed): only the bad
    // item fails. `elsewhere`: on another connection; `refused`: the server
    // refused it, so an item will fail again and savepoints pay at once.
    let (elsewhere, refused) = if let Some(runs) = new_runs::only_new_runs(jobs) {
        match new_runs::commit(inner, &client, jobs, &runs).await {
            new_runs::Outcome::Committed(first, results) => {
                notices.notified();
                numbers.took(first, runs.len() as i64);
                return Ok(results);
            }
            // Not known even after looking for the runs.
            new_runs::Outcome::Unknown(e) => return Err(e),
            // Looked for: not there.
            new_runs::Outcome::NotLanded => (true, false),
            // Refused; the server may have ended the connection with it.
            new_runs::Outcome::Refused => (client.is_closed(), true),
        }
    } else {
        match one_statement::commit(inner, &client, jobs, notices.due(), numbers).await {
            Outcome::Committed(events, notified) => {
                match events.last() {
                    _ if notified => notices.notified(),
                    Some(last) => notices.owed = Some(last.seq + 1),
                    None => {}
                }
                // One number per event, from the first.
                if let (Some(first), Some(last)) = (events.first(), events.last()) {
                    let (first, next) = (first.seq, last.seq + 1);
                    inner.publish_own(first, next, events);
                }
                let results: Vec<_> = jobs.iter().map(|_| Ok(Committed::default())).collect();
                note_finished(inner, jobs, &results);
                return Ok(results);
            }
            // Not known even after reading the history again: the runs are
            // taken up again from what is there.
            Outcome::Unknown(e) => return Err(e),
            // Read back under the same epoch: it did not land.
            Outcome::NotLanded => (true, false),
            Outcome::Refused => (false, true),
            Outcome::NotEligible => (false, false),
        }
    };
    if elsewhere {
        client = inner.pool.get().await.map_err(pool_error)?;
    }
    // The transaction takes numbers the lone commits' guess does not know of.
    numbers.missed();
    match transact(inner, &client, jobs, notices, refused).await {
        Ok(results) => {
            note_finished(inner, jobs, &results);
            Ok(results)
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// Leases whose run's end these jobs committed: they need no release.
fn note_finished(inner: &Inner, jobs: &[Job], results: &[Result<Committed, StoreError>]) {
    let mut held = None;
    for (job, result) in jobs.iter().zip(results) {
        for write in &job.writes {
            if let (Ok(_), Write::SetStatus { run, status, .. }) = (result, write)
                && status.is_finished()
            {
                let held = held.get_or_insert_with(|| inner.held.lock().unwrap_or_else(|p| p.into_inner()));
                if let Some(h) = held.get_mut(run).filter(|h| Some(h.epoch) == job.epoch(*run)) {
                    h.released = true;
                }
            }
        }
    }
}

/// The jobs in one transaction, item by item. Items seldom fail, so the
/// batch goes first without savepoints (one round trip fewer per item); if
/// an item fails, that transaction is rolled back and the batch goes again
/// with a savepoint per item, so that only the bad ones fail. A batch the
/// server `refused` as one statement has a bad item: it starts with them.
async fn transact(
    inner: &Arc<Inner>,
    tx: &ClientWrapper,
    jobs: &[Job],
    notices: &mut Notices,
    refused: bool,
) -> Result<Vec<Result<Committed, StoreError>>, StoreError> {
    let isolate_first = refused && jobs.len() > 1;
    match attempt(inner, tx, jobs, notices, isolate_first).await? {
        Attempt::Committed(results) => Ok(results),
        Attempt::ItemFailed(e) if jobs.len() == 1 => Ok(vec![Err(e)]),
        Attempt::ItemFailed(_) => match attempt(inner, tx, jobs, notices, true).await? {
            Attempt::Committed(results) => Ok(results),
            // Not with savepoints; were it to, nothing landed.
            Attempt::ItemFailed(e) => Err(e),
        },
    }
}

enum Attempt {
    Committed(Vec<Result<Committed, StoreError>>),
    /// An item failed without a savepoint to go back to: nothing landed.
    ItemFailed(StoreError),
}

async fn attempt(
    inner: &Arc<Inner>,
    tx: &ClientWrapper,
    jobs: &[Job],
    notices: &mut Notices,
    isolate: bool,
) -> Result<Attempt, StoreError> {
    let sync = match inner.durability {
        Durability::Power => "on",
        Durability::Process => "off",
    };
    // One round trip: the durability, and the gate with the next number
    // (a process paused inside this transaction holds the gate for at most
    // a lease: see the session's settings in `PostgresStore::connect`).
    // Then every run the batch writes, held here or not (a cancel's, a
    // signal's), in key order and in the mode its update takes: every
    // writer and heartbeat takes its locks in this order (see
    // `cairn_commit_batch`). Locked item by item instead, two runs another
    // process holds could be locked in the opposite order to its heartbeat,
    // and the server would end the deadlock by failing one of them.
    let mut named: Vec<i64> = jobs.iter().flat_map(|j| j.writes.iter().filter_map(Write::run)).map(|r| r.0).collect();
    named.sort_unstable();
    named.dedup();
    let lock_runs = if named.is_empty() {
        String::new()
    } else {
        let keys: Vec<String> = named.iter().map(i64::to_string).collect();
        format!("; SELECT 1 FROM runs WHERE seq IN ({}) ORDER BY seq FOR NO KEY UPDATE", keys.join(","))
    };
    // Items are isolated by one savepoint, named alike for each: the
    // opening sets it for the first; an item that succeeded releases it and
    // sets it again in one round trip; a rollback to it keeps it for the
    // next; the last item's is released by the commit.
    let savepoint = if isolate { "; SAVEPOINT item" } else { "" };
    let opening = format!(
        "BEGIN; SET LOCAL synchronous_commit = {sync}; \
         {LAST_COMMITTED}{lock_runs}{savepoint}"
    );
    let first: i64 = tx
        .simple_query(&opening)
        .await
        .map_err(pg_error)?
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => {
                row.get(0).and_then(|v| v.parse::<i64>().ok()).map(|last| last + 1)
            }
            _ => None,
        })
        .ok_or_else(|| StoreError::Corrupt("the change sequence cairn_ids has no value".into()))?;
    let mut batch = Batch { next_seq: first, ts_us: now_us(), events: Vec::new() };
    let mut results = Vec::with_capacity(jobs.len());
    let mut leased: Vec<Vec<RunKey>> = Vec::with_capacity(jobs.len());
    // A crowd of signals and cancels alone goes in one round trip.
    let crowd = if isolate || jobs.len() < 2 { None } else { pipelined::items(jobs, &mut batch) };
    if let Some(items) = crowd {
        if let Err(e) = pipelined::send_all(tx, &items).await {
            tx.batch_execute("ROLLBACK").await.map_err(pg_error)?;
            return Ok(Attempt::ItemFailed(e));
        }
        #[cfg(test)]
        inner.items_pipelined.fetch_add(items.len() as u64, std::sync::atomic::Ordering::Relaxed);
        results.extend(jobs.iter().map(|_| Ok(Committed::default())));
        leased.resize(jobs.len(), Vec::new());
    } else {
        for (i, job) in jobs.iter().enumerate() {
            let (published, numbered) = (batch.events.len(), batch.next_seq);
            let mut wants_lease = Vec::new();
            match apply(tx, inner, job, &mut batch, &mut wants_lease).await {
                Ok(committed) => {
                    if isolate && i + 1 < jobs.len() {
                        tx.batch_execute("RELEASE SAVEPOINT item; SAVEPOINT item").await.map_err(pg_error)?;
                    }
                    results.push(Ok(committed));
                }
                Err(e) if !isolate => {
                    // Nothing of the transaction is kept.
                    tx.batch_execute("ROLLBACK").await.map_err(pg_error)?;
                    return Ok(Attempt::ItemFailed(e));
                }
                Err(e) => {
                    tx.batch_execute("ROLLBACK TO SAVEPOINT item").await.map_err(pg_error)?;
                    // Its change numbers went with it: the next item takes them.
                    batch.events.truncate(published);
                    batch.next_seq = numbered;
                    wants_lease.clear();
                    results.push(Err(e));
                }
            }
            leased.push(wants_lease);
        }
    }
    // The sequence, the notification and the commit in one round trip.
    let closing = if batch.next_seq != first {
        let has_changes = batch.events.iter().any(|e| e.kind != ChangeKind::History);
        let payload = super::listen::payload(&inner.owner, batch.next_seq as u64, has_changes);
        format!(
            "SELECT setval('cairn_ids', {}); SELECT pg_notify('{CHANNEL}', '{}'); COMMIT",
            batch.next_seq - 1,
            payload.replace('\'', "''")
        )
    } else {
        "COMMIT".to_string()
    };
    tx.batch_execute(&closing).await.map_err(pg_error)?;
    if batch.next_seq != first {
        notices.notified();
    }
    // Noted once committed (a failed commit's numbers are handed out
    // again); the listener waits for `writing` before it tells its own apart.
    inner.publish_own(first as u64, batch.next_seq as u64, batch.events);
    // Leases of runs created with one: held from their commit on.
    for (result, wants) in results.iter_mut().zip(leased) {
        if let Ok(committed) = result {
            for (record, lease) in committed.created.iter_mut() {
                if wants.contains(&record.key) {
                    *lease = Some(lease::held(inner, record.key, 1, None));
                }
            }
        }
    }
    Ok(Attempt::Committed(results))
}

/// The run must still be this process's if it holds it: its epoch in the
/// database is the one it took (else another process took it over).
async fn fence(tx: &ClientWrapper, job: &Job, run: RunKey) -> Result<i64, StoreError> {
    let Some(held) = job.epoch(run) else { return Ok(0) };
    let held = held as i64;
    execute(tx, "SELECT cairn_fence(ARRAY[$1::BIGINT], ARRAY[$2::BIGINT])", &[&run.0, &held])
        .await
        .map_err(pg_error)?;
    Ok(held)
}

// The statements of this path, prepared once per connection.

async fn execute(tx: &ClientWrapper, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, tokio_postgres::Error> {
    let statement = tx.prepare_cached(sql).await?;
    tx.execute(&statement, params).await
}

async fn query_opt(
    tx: &ClientWrapper,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Option<Row>, tokio_postgres::Error> {
    let statement = tx.prepare_cached(sql).await?;
    tx.query_opt(&statement, params).await
}

async fn query_one(
    tx: &ClientWrapper,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Row, tokio_postgres::Error> {
    let statement = tx.prepare_cached(sql).await?;
    tx.query_one(&statement, params).await
}

/// The outcome of a fence and the statements pipelined behind it: a lost
/// lease first (they may have failed only because the transaction had), then
/// their own error; else the epoch written under and what they returned.
fn settle<T>(fenced: Result<i64, StoreError>, written: Result<T, StoreError>) -> Result<(i64, T), StoreError> {
    match (fenced, written) {
        (Err(e @ (StoreError::LeaseLost { .. } | StoreError::NoSuchRun(_))), _) => Err(e),
        (_, Err(e)) => Err(e),
        (Err(e), Ok(_)) => Err(e),
        (Ok(epoch), Ok(written)) => Ok((epoch, written)),
    }
}

/// A history row's change event (both commit paths make them).
pub(super) fn history_change(seq: u64, run: RunKey, position: usize, ts_us: i64) -> ChangeEvent {
    ChangeEvent { seq, run, kind: ChangeKind::History, position: Some(position as u64), status: None, ts_us }
}

/// Any other change event (a `changes` row).
pub(super) fn other_change(
    seq: u64,
    run: RunKey,
    kind: ChangeKind,
    status: Option<RunStatus>,
    ts_us: i64,
) -> ChangeEvent {
    ChangeEvent { seq, run, kind, position: None, status, ts_us }
}

pub(super) fn change(batch: &mut Batch, run: RunKey, kind: ChangeKind, status: Option<RunStatus>) -> i64 {
    let seq = batch.take_seq();
    batch.events.push(other_change(seq as u64, run, kind, status, batch.ts_us));
    seq
}

/// A change row other than a history row's, numbered by `change` (a
/// future to pipeline with the write it records).
async fn change_row(
    tx: &ClientWrapper,
    seq: i64,
    run: RunKey,
    kind: ChangeKind,
    status: Option<RunStatus>,
    ts_us: i64,
) -> Result<u64, tokio_postgres::Error> {
    execute(
        tx,
        "INSERT INTO changes (seq, run, kind, status, committed_us) VALUES ($1, $2, $3, $4, $5)",
        &[&seq, &run.0, &kind.as_str(), &status.map(RunStatus::as_str), &ts_us],
    )
    .await
}

/// One history row (its change event is the caller's).
async fn insert_row(
    tx: &ClientWrapper,
    seq: i64,
    run: RunKey,
    position: usize,
    e: &crate::model::Entry,
    epoch: i64,
    ts_us: i64,
) -> Result<u64, StoreError> {
    execute(
        tx,
        "INSERT INTO history (id, run, position, kind, name, occurrence, attempt, status, output, error, started_at, \
         finished_at, epoch, committed_us) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        &[
            &seq,
            &run.0,
            &(position as i32),
            &e.kind.as_str(),
            &e.name,
            &(e.occurrence as i32),
            &(e.attempt as i32),
            &e.status.as_str(),
            &e.output,
            &e.error,
            &e.started_at,
            &e.finished_at,
            &epoch,
            &ts_us,
        ],
    )
    .await
    .map_err(pg_error)
}

async fn insert_entry(
    tx: &ClientWrapper,
    batch: &mut Batch,
    run: RunKey,
    position: usize,
    e: &crate::model::Entry,
    epoch: i64,
) -> Result<(), StoreError> {
    let seq = batch.take_seq();
    insert_row(tx, seq, run, position, e, epoch, batch.ts_us).await?;
    history_event(batch, seq, run, position);
    Ok(())
}

/// The change event of a history row at `position`.
fn history_event(batch: &mut Batch, seq: i64, run: RunKey, position: usize) {
    batch.events.push(history_change(seq as u64, run, position, batch.ts_us));
}

async fn apply(
    tx: &ClientWrapper,
    inner: &Inner,
    job: &Job,
    batch: &mut Batch,
    wants_lease: &mut Vec<RunKey>,
) -> Result<Committed, StoreError> {
    let mut committed = Committed::default();
    for write in &job.writes {
        match write {
            Write::PutModule { hash, bytes } => {
                execute(
                    tx,
                    "INSERT INTO modules (hash, bytes, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    &[hash, bytes, &now_ms()],
                )
                .await
                .map_err(pg_error)?;
            }
            Write::CreateRun { run, lease } => {
                let record = create_run(tx, inner, batch, run, *lease).await?;
                if *lease {
                    wants_lease.push(record.key);
                }
                committed.created.push((record, None));
            }
            Write::Append { run, position, entries } => {
                // The fence and the rows in one round trip (pipelined): the
                // rows carry the epoch the fence checks, and a failed fence
                // rolls them back with the item.
                let epoch = job.epoch(*run).map_or(0, |e| e as i64);
                let mut inserts = Vec::with_capacity(entries.len());
                for (i, e) in entries.iter().enumerate() {
                    let seq = batch.take_seq();
                    history_event(batch, seq, *run, position + i);
                    inserts.push(insert_row(tx, seq, *run, position + i, e, epoch, batch.ts_us));
                }
                let (fenced, inserted) =
                    futures_util::future::join(fence(tx, job, *run), futures_util::future::try_join_all(inserts)).await;
                settle(fenced, inserted.map(drop))?;
            }
            Write::SetStatus { run, status, output, error } => {
                // Fence, update and change row in one round trip (pipelined).
                let finished_at = status.is_finished().then(now_ms);
                let seq = change(batch, *run, ChangeKind::Status, Some(*status));
                let name = status.as_str();
                let update_params: [&(dyn ToSql + Sync); 5] = [&run.0, &name, output, error, &finished_at];
                let update = execute(
                    tx,
                    "UPDATE runs SET status = $2, output = $3, error = $4, finished_at = $5 WHERE seq = $1",
                    &update_params,
                );
                let changed = change_row(tx, seq, *run, ChangeKind::Status, Some(*status), batch.ts_us);
                let (fenced, updated, changed) =
                    futures_util::future::join3(fence(tx, job, *run), update, changed).await;
                let updated = updated
                    .map_err(pg_error)
                    .and_then(|n| if n == 0 { Err(StoreError::NoSuchRun(*run)) } else { Ok(()) });
                settle(fenced, updated.and_then(|()| changed.map(drop).map_err(pg_error)))?;
            }
            Write::SendSignal { run, name, payload, max_pending } => {
                Item::signal(batch, *run, name, payload, *max_pending).send(tx).await?;
            }
            Write::RequestCancel { run, grace_until } => Item::cancel(batch, *run, *grace_until).send(tx).await?,
            Write::BranchAttempt { run, entry: e } => {
                // Fence, attempt and change row in one round trip (pipelined).
                let seq = change(batch, *run, ChangeKind::Branch, None);
                let attempt_params: [&(dyn ToSql + Sync); 9] = [
                    &run.0,
                    &e.name,
                    &(e.occurrence as i32),
                    &(e.attempt as i32),
                    &e.status.as_str(),
                    &e.output,
                    &e.error,
                    &e.started_at,
                    &e.finished_at,
                ];
                let attempt = execute(
                    tx,
                    "INSERT INTO branches (run, name, occurrence, attempt, status, output, error, started_at, finished_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    &attempt_params,
                );
                let changed = change_row(tx, seq, *run, ChangeKind::Branch, None, batch.ts_us);
                let (fenced, attempted, changed) =
                    futures_util::future::join3(fence(tx, job, *run), attempt, changed).await;
                let written = attempted.and(changed).map(drop).map_err(pg_error);
                settle(fenced, written)?;
            }
            Write::ConsumeSignal { run, name, entry } => {
                // Fence and the oldest undelivered signal's take in one round
                // trip (pipelined), then its history row.
                let consumed_at = now_ms();
                let take_params: [&(dyn ToSql + Sync); 3] = [&run.0, name, &consumed_at];
                let take = query_opt(
                    tx,
                    "UPDATE signals SET consumed_at = $3 WHERE seq = \
                         (SELECT seq FROM signals WHERE run = $1 AND name = $2 AND consumed_at IS NULL \
                          ORDER BY seq LIMIT 1 FOR UPDATE) \
                     RETURNING payload",
                    &take_params,
                );
                let (fenced, taken) = futures_util::future::join(fence(tx, job, *run), take).await;
                let (epoch, found) = settle(fenced, taken.map_err(pg_error))?;
                if let Some(row) = found {
                    let payload: Vec<u8> = row.get(0);
                    let mut e = entry.1.clone();
                    e.output = payload.clone();
                    insert_entry(tx, batch, *run, entry.0, &e, epoch).await?;
                    committed.signal = Some(payload);
                }
            }
            Write::CreateToken { token } => {
                let taken = query_opt(tx, "SELECT 1 FROM tokens WHERE name = $1", &[&token.name])
                    .await
                    .map_err(pg_error)?
                    .is_some();
                if taken {
                    return Err(StoreError::TokenExists(token.name.clone()));
                }
                execute(
                    tx,
                    "INSERT INTO tokens (id, name, role, hash, created_at) VALUES ($1, $2, $3, $4, $5)",
                    &[&token.id, &token.name, &token.role.as_str(), &&token.hash[..], &token.created_at],
                )
                .await
                .map_err(pg_error)?;
            }
            Write::RevokeToken { id_or_name } => {
                let n = execute(
                    tx,
                    "UPDATE tokens SET revoked_at = coalesce(revoked_at, $2) WHERE id = $1 OR name = $1",
                    &[id_or_name, &now_ms()],
                )
                .await
                .map_err(pg_error)?;
                if n == 0 {
                    return Err(StoreError::NoSuchToken(id_or_name.clone()));
                }
            }
            Write::Kv(kv) => apply_kv(tx, kv).await?,
        }
    }
    Ok(committed)
}

/// The run and its `created` change row, in one statement.
async fn create_run(
    tx: &ClientWrapper,
    inner: &Inner,
    batch: &mut Batch,
    run: &NewRun,
    lease: bool,
) -> Result<RunRecord, StoreError> {
    let created_at = now_ms();
    let config = serde_json::to_string(&run.config).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let (owner, epoch, ms) =
        if lease { (Some(inner.owner.as_str()), 1i64, Some(inner.lease.as_millis() as i64)) } else { (None, 0, None) };
    let seq = batch.take_seq();
    let row = query_opt(
        tx,
        "WITH created AS (INSERT INTO runs (id, module, module_path, input, config, status, created_at, random_key, \
                 owner, epoch, lease_until) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now() + $11::BIGINT * interval '1 millisecond') \
             ON CONFLICT (id) DO NOTHING RETURNING seq), \
         changed AS (INSERT INTO changes (seq, run, kind, status, committed_us) \
             SELECT $12, seq, $13, $6, $14 FROM created) \
         SELECT seq FROM created",
        &[
            &run.id,
            &run.module,
            &run.module_path,
            &run.input,
            &config,
            &run.status.as_str(),
            &created_at,
            &&run.random_key[..],
            &owner,
            &epoch,
            &ms,
            &seq,
            &ChangeKind::Created.as_str(),
            &batch.ts_us,
        ],
    )
    .await
    .map_err(pg_error)?;
    let Some(row) = row else { return Err(StoreError::RunExists(run.id.clone())) };
    let key = RunKey(row.get(0));
    batch.events.push(other_change(seq as u64, key, ChangeKind::Created, Some(run.status), batch.ts_us));
    Ok(run.record(key, created_at))
}

/// As SQLite's: check the versions read, then apply the writes.
async fn apply_kv(tx: &ClientWrapper, kv: &KvCommit) -> Result<(), StoreError> {
    for (key, read) in &kv.reads {
        let now = query_opt(tx, "SELECT version FROM kv WHERE namespace = $1 AND key = $2", &[&kv.namespace, key])
            .await
            .map_err(pg_error)?
            .map_or(0, |r| r.get::<_, i64>(0) as u64);
        if now != *read {
            return Err(StoreError::KvConflict { key: key.clone() });
        }
    }
    let mut added: i64 = 0;
    let now = now_ms();
    for (key, value) in &kv.writes {
        let old = query_opt(
            tx,
            "SELECT version, value IS NOT NULL FROM kv WHERE namespace = $1 AND key = $2",
            &[&kv.namespace, key],
        )
        .await
        .map_err(pg_error)?;
        let (old_version, was_live): (i64, bool) = old.map_or((0, false), |r| (r.get(0), r.get(1)));
        if value.is_none() && old_version == 0 {
            continue;
        }
        added += i64::from(value.is_some()) - i64::from(was_live);
        execute(
            tx,
            "INSERT INTO kv (namespace, key, value, version, updated_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (namespace, key) DO UPDATE SET value = $3, version = $4, updated_at = $5",
            &[&kv.namespace, key, value, &(old_version + 1), &now],
        )
        .await
        .map_err(pg_error)?;
    }
    if added != 0 {
        let keys: i64 = query_one(
            tx,
            "INSERT INTO kv_namespaces (namespace, keys) VALUES ($1, $2) \
                 ON CONFLICT (namespace) DO UPDATE SET keys = kv_namespaces.keys + $2 RETURNING keys",
            &[&kv.namespace, &added],
        )
        .await
        .map_err(pg_error)?
        .get(0);
        if added > 0 && keys as u64 > kv.max_keys {
            return Err(StoreError::KvFull { namespace: kv.namespace.clone(), max: kv.max_keys });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owed_notification_waits_for_a_commit_to_carry_it_but_not_for_long() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let notices = |last, last_commit| Notices { last, owed: Some(7), last_commit };
        // Commits stopped long ago: it goes out as soon as it is due.
        assert_eq!(notices(t0, t0).alone_at(), t0 + NOTIFY_HISTORY_EVERY);
        // A commit just ended: the run's next step has the grace to carry it.
        let n = notices(t0, t0 + ms(5));
        assert_eq!(n.alone_at(), t0 + ms(5) + NOTIFY_IDLE_GRACE);
        // Commits that never carry it do not hold it back for more than
        // another interval.
        let n = notices(t0, t0 + ms(60));
        assert_eq!(n.alone_at(), t0 + 2 * NOTIFY_HISTORY_EVERY);
    }
}
