//! Group commit on SQLite: one write connection, one writer thread that
//! takes everything queued and commits it in one transaction (one fsync for
//! all runs' pending writes), and inline commits for a run that is alone.
//!
//! Every history row and every `changes` row gets the next number of the
//! store-wide change sequence inside the committing transaction; once the
//! transaction is durable, the item's change events are published.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode, OptionalExtension, params};
use tokio::sync::oneshot;

use super::lock::LockFile;
use super::schema::BUSY_TIMEOUT;
use crate::model::{Entry, NewRun, RunKey, RunRecord, now_ms, now_us};
use crate::store::{ChangeEvent, ChangeFeed, ChangeKind, CommitTicket, Committed, KvCommit, Lease, StoreError, Write};

/// Items commit inline only once this long has passed without items of
/// two different runs in a row: one run alone, not a crowd between rounds.
const ALONE: Duration = Duration::from_millis(5);
const NO_RUN: i64 = i64::MIN;
/// At most this many commit items share one transaction.
const MAX_BATCH: usize = 1024;

pub(super) struct Job {
    writes: Vec<Write>,
    done: oneshot::Sender<Result<Committed, StoreError>>,
}

/// The write connection and what is known about the sequence it writes.
pub(super) struct WriteConn {
    pub(super) conn: Connection,
    /// The next change sequence number, while known to be current: valid
    /// as long as no other connection committed (`PRAGMA data_version`
    /// unchanged since `seq_version`).
    next_seq: Option<i64>,
    seq_version: i64,
    /// Where the watcher of other processes' commits is (see `super::watch`).
    pub(super) watch: super::watch::WatchState,
}

impl WriteConn {
    pub(super) fn new(conn: Connection) -> Self {
        WriteConn { conn, next_seq: None, seq_version: 0, watch: Default::default() }
    }
}

/// The one write connection, shared by the writer thread and callers that
/// commit inline.
pub(super) struct WriteSide {
    pub(super) conn: Mutex<WriteConn>,
    /// Items sent to the writer thread and not yet answered.
    queued: AtomicUsize,
    /// The run of the last item that named one, and when (ns since
    /// `opened`) an item last named a different run than the one before.
    last_run: AtomicI64,
    last_switch_ns: AtomicU64,
    opened: Instant,
    locks: LockFile,
    path: PathBuf,
    pub(super) feed: Arc<ChangeFeed>,
    /// An fsync failed: no commit is attempted again (see `StoreError::Unsynced`).
    poisoned: AtomicBool,
}

impl WriteSide {
    pub(super) fn new(conn: Connection, locks: LockFile, path: &Path, feed: Arc<ChangeFeed>) -> Self {
        WriteSide {
            conn: Mutex::new(WriteConn::new(conn)),
            queued: AtomicUsize::new(0),
            last_run: AtomicI64::new(NO_RUN),
            last_switch_ns: AtomicU64::new(0),
            // As if the last switch were long past: a store starts alone.
            opened: Instant::now().checked_sub(ALONE).unwrap_or_else(Instant::now),
            locks,
            path: path.to_path_buf(),
            feed,
            poisoned: AtomicBool::new(false),
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, WriteConn> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commit an item inline or hand it to the writer thread.
    ///
    /// One run alone, nothing queued and the connection free: commit right
    /// here. A lone run then pays one commit per step and no thread
    /// hand-offs (which cost more than the commit itself on small VMs).
    /// With several runs committing, items go to the writer thread, which
    /// commits them in groups: committing inline whenever the queue
    /// happened to be empty (between two rounds of a burst, say) cost an
    /// fsync for one item and held the connection from the next group.
    /// Only when nothing is queued, so one run's items stay in order.
    pub(super) fn submit(&self, writer: &mpsc::Sender<Job>, writes: Vec<Write>) -> CommitTicket {
        let (done, ticket) = oneshot::channel();
        if self.poisoned.load(Ordering::Acquire) {
            let _ = done.send(Err(StoreError::Unsynced { location: self.path.display().to_string() }));
            return ticket;
        }
        let now = self.opened.elapsed().as_nanos() as u64;
        if let Some(run) = writes.iter().find_map(Write::run) {
            let before = self.last_run.swap(run.0, Ordering::Relaxed);
            // Branch instances commit concurrently with their parent and
            // with each other: one run, but a crowd.
            let branch = writes.iter().any(|x| matches!(x, Write::BranchAttempt { .. }));
            if branch || (before != run.0 && before != NO_RUN) {
                self.last_switch_ns.store(now, Ordering::Relaxed);
            }
        } else if writes.iter().any(|x| matches!(x, Write::CreateRun { .. })) {
            // New runs come in crowds (`POST /api/runs`, a script of
            // `cairn start`): to the writer, whose group commit shares one
            // fsync among them. A lone `cairn run` pays one hand-off.
            self.last_switch_ns.store(now, Ordering::Relaxed);
        }
        let alone = now.saturating_sub(self.last_switch_ns.load(Ordering::Relaxed)) >= ALONE.as_nanos() as u64;
        if alone
            && self.queued.load(Ordering::Acquire) == 0
            && let Ok(mut conn) = self.conn.try_lock()
            && self.queued.load(Ordering::Acquire) == 0
        {
            let mut results = self.write_batch(&mut conn, &[&writes]);
            drop(conn);
            let _ = done.send(results.pop().expect("one result per item"));
            return ticket;
        }
        self.queued.fetch_add(1, Ordering::AcqRel);
        if let Err(mpsc::SendError(job)) = writer.send(Job { writes, done }) {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            let _ = job.done.send(Err(StoreError::WriterGone));
        }
        ticket
    }

    /// The writer: take everything queued, write it in one transaction,
    /// commit once, then answer every item.
    pub(super) fn writer_loop(&self, rx: mpsc::Receiver<Job>) {
        let mut jobs: Vec<Job> = Vec::new();
        // CAIRN_DEBUG_BATCHES=1: print batch statistics when the writer stops.
        let stats = std::env::var_os("CAIRN_DEBUG_BATCHES").is_some();
        let (mut batches, mut items, mut busy) = (0u64, 0u64, Duration::ZERO);
        while let Ok(first) = rx.recv() {
            let started = Instant::now();
            jobs.push(first);
            while jobs.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            let results = {
                let mut conn = self.lock();
                let items: Vec<&[Write]> = jobs.iter().map(|j| j.writes.as_slice()).collect();
                self.write_batch(&mut conn, &items)
            };
            self.queued.fetch_sub(jobs.len(), Ordering::AcqRel);
            busy += started.elapsed();
            batches += 1;
            items += jobs.len() as u64;
            for (job, result) in jobs.drain(..).zip(results) {
                let _ = job.done.send(result);
            }
        }
        if stats && batches > 0 {
            eprintln!(
                "cairn writer: {batches} batches, {items} items, {:.1} items/batch, {:.0} ms committing",
                items as f64 / batches as f64,
                busy.as_secs_f64() * 1e3
            );
        }
    }

    /// Write the items in one transaction and publish their changes.
    ///
    /// Items almost never fail: write the batch plainly first. Only if one
    /// does, roll back and write it again with a savepoint per item, so the
    /// bad item does not abort its batch-mates.
    pub(super) fn write_batch(&self, conn: &mut WriteConn, jobs: &[&[Write]]) -> Vec<Result<Committed, StoreError>> {
        // Checked under the connection's lock: an item queued, or committing
        // inline, when an fsync failed is refused like every later one.
        if self.poisoned.load(Ordering::Acquire) {
            let location = self.path.display().to_string();
            return jobs.iter().map(|_| Err(StoreError::Unsynced { location: location.clone() })).collect();
        }
        let events = if self.feed.wants_all() {
            Events::All
        } else if self.feed.listening() {
            Events::Control
        } else {
            Events::None
        };
        let mut batch = Batch { events, published: Vec::new(), next_seq: 0, ts_us: 0, changes: Vec::new() };
        let results = match self.write_items(conn, jobs, &mut batch, false) {
            Some(results) => results,
            None => {
                batch.published.clear();
                batch.changes.clear();
                // Isolated items fail alone; only the transaction itself
                // failing at its end fails them all.
                self.write_items(conn, jobs, &mut batch, true).unwrap_or_else(|| {
                    batch.published.clear();
                    jobs.iter().map(|_| Err(StoreError::Commit("the batch could not be written".into()))).collect()
                })
            }
        };
        if batch.events == Events::All
            && let Some(first) = batch.published.first().map(|e| e.seq)
            && let Err(e) = super::watch::publish_before_own(&self.feed, conn, first)
        {
            // The watcher publishes them at its next look, after these.
            eprintln!("cairn: cannot read other processes' changes: {e}");
        }
        for event in batch.published {
            self.feed.publish(event);
        }
        results
    }

    /// One transaction over `jobs`. Without `isolate`, returns `None` (and
    /// rolls back) as soon as an item fails.
    fn write_items(
        &self,
        wc: &mut WriteConn,
        jobs: &[&[Write]],
        batch: &mut Batch,
        isolate: bool,
    ) -> Option<Vec<Result<Committed, StoreError>>> {
        // Cached statements: parsing BEGIN/SAVEPOINT/COMMIT on every batch
        // showed up in profiles.
        let run = |conn: &Connection, sql: &str| -> rusqlite::Result<()> {
            conn.prepare_cached(sql)?.execute([])?;
            Ok(())
        };
        // Nothing of the batch lands: every item gets the error.
        let fail_all = |wc: &mut WriteConn, batch: &mut Batch, e: rusqlite::Error| {
            if unsynced(&e) {
                // Not even a rollback: nothing more is written.
                self.poisoned.store(true, Ordering::Release);
            } else if !wc.conn.is_autocommit() {
                let _ = wc.conn.execute_batch("ROLLBACK");
            }
            wc.next_seq = None;
            batch.published.clear();
            Some(jobs.iter().map(|_| Err(commit_error(&self.path, &e))).collect())
        };
        if let Err(e) = run(&wc.conn, "BEGIN IMMEDIATE") {
            return fail_all(wc, batch, e);
        }
        match next_seq(wc) {
            Ok(seq) => batch.next_seq = seq,
            Err(e) => return fail_all(wc, batch, e),
        }
        batch.ts_us = now_us();
        let first_seq = batch.next_seq;
        let conn = &wc.conn;
        let mut results = Vec::with_capacity(jobs.len());
        // History rows go in by a few multi-row INSERTs instead of a statement
        // per row: the whole batch's at the end, or each item's own under
        // isolation (inside its savepoint).
        let mut rows = Vec::new();
        let mut abort = None;
        for job in jobs {
            if isolate && let Err(e) = run(conn, "SAVEPOINT item") {
                abort = Some(e);
                break;
            }
            let published = batch.published.len();
            let mut result = apply(conn, job, &self.locks, &mut rows, batch);
            if isolate {
                result = result.and_then(|c| flush_rows(conn, &rows, batch).map(|()| c));
                rows.clear();
                batch.changes.clear();
                let undo = match &result {
                    Ok(_) => run(conn, "RELEASE item"),
                    Err(_) => {
                        batch.published.truncate(published);
                        run(conn, "ROLLBACK TO item").and_then(|_| run(conn, "RELEASE item"))
                    }
                };
                if let Err(e) = undo {
                    abort = Some(e);
                    break;
                }
            } else if result.is_err() {
                let _ = conn.execute_batch("ROLLBACK");
                wc.next_seq = None;
                batch.published.clear();
                if jobs.len() == 1 {
                    return Some(vec![result]);
                }
                return None;
            }
            results.push(result);
        }
        if let Some(e) = abort {
            return fail_all(wc, batch, e);
        }
        let flushed = flush_rows(conn, &rows, batch).and_then(|()| {
            if batch.next_seq == first_seq {
                return Ok(());
            }
            conn.prepare_cached("INSERT INTO commits (first_seq, committed_us) VALUES (?1, ?2)")?
                .execute(params![first_seq, batch.ts_us])?;
            Ok(())
        });
        if let Err(e) = flushed {
            let _ = conn.execute_batch("ROLLBACK");
            wc.next_seq = None;
            batch.published.clear();
            if jobs.len() == 1 {
                return Some(vec![Err(e)]);
            }
            return None;
        }
        let syncing = Instant::now();
        if let Err(e) = run(conn, "COMMIT") {
            // Nothing of this batch is durable: leases taken for new runs go too.
            return fail_all(wc, batch, e);
        }
        let metrics = crate::telemetry::get();
        metrics.fsync_seconds.record(syncing.elapsed());
        metrics.commit_batch.record(jobs.len() as f64);
        wc.next_seq = Some(batch.next_seq);
        wc.watch.own_commit(first_seq as u64, batch.next_seq as u64);
        Some(results)
    }
}

/// The next change sequence number, under the write lock: the cached one
/// unless another connection committed since it was read.
fn next_seq(wc: &mut WriteConn) -> rusqlite::Result<i64> {
    let version: i64 = wc.conn.prepare_cached("PRAGMA data_version")?.query_row([], |r| r.get(0))?;
    if let Some(seq) = wc.next_seq
        && version == wc.seq_version
    {
        return Ok(seq);
    }
    let seq = max_seq(&wc.conn)? + 1;
    wc.next_seq = Some(seq);
    wc.seq_version = version;
    Ok(seq)
}

/// The highest change sequence number taken so far (0 if none). A
/// `commits` row may name a number whose rows all failed (an isolated
/// batch): it counts as taken too, so the number is never handed out again.
pub(super) fn max_seq(conn: &Connection) -> rusqlite::Result<i64> {
    let history: i64 = conn.prepare_cached("SELECT coalesce(max(id), 0) FROM history")?.query_row([], |r| r.get(0))?;
    let changes: i64 = conn.prepare_cached("SELECT coalesce(max(seq), 0) FROM changes")?.query_row([], |r| r.get(0))?;
    let commits: i64 =
        conn.prepare_cached("SELECT coalesce(max(first_seq), 0) FROM commits")?.query_row([], |r| r.get(0))?;
    Ok(history.max(changes).max(commits))
}

/// Which change events a batch builds for publishing.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Events {
    None,
    Control,
    All,
}

/// The state of one batch's transaction.
struct Batch {
    events: Events,
    /// Events of the items applied so far, published after the commit.
    published: Vec<ChangeEvent>,
    next_seq: i64,
    ts_us: i64,
    /// `changes` rows not yet inserted: seq, run, kind, status.
    changes: Vec<ChangeRow>,
}

type ChangeRow = (i64, RunKey, ChangeKind, Option<crate::model::RunStatus>);

impl Batch {
    fn take_seq(&mut self) -> i64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    fn event(&mut self, event: ChangeEvent) {
        let wanted = match self.events {
            Events::None => false,
            Events::Control => event.is_control(),
            Events::All => true,
        };
        if wanted {
            self.published.push(event);
        }
    }

    /// A change other than a history row: its `changes` row and its event.
    /// Its row goes in with the batch's history rows ([`flush_rows`]).
    fn change(&mut self, run: RunKey, kind: ChangeKind, status: Option<crate::model::RunStatus>) {
        let seq = self.take_seq();
        self.changes.push((seq, run, kind, status));
        self.event(ChangeEvent { seq: seq as u64, run, kind, position: None, status, ts_us: self.ts_us });
    }
}

/// The error every item of a failed batch gets (`rusqlite::Error` is not `Clone`).
fn commit_error(path: &Path, e: &rusqlite::Error) -> StoreError {
    if unsynced(e) {
        return StoreError::Unsynced { location: path.display().to_string() };
    }
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked) => {
            StoreError::Locked { location: path.display().to_string(), waited_ms: BUSY_TIMEOUT.as_millis() as u64 }
        }
        _ => StoreError::Commit(e.to_string()),
    }
}

/// A failed fsync (of the WAL, the database or its directory).
fn unsynced(e: &rusqlite::Error) -> bool {
    e.sqlite_error().is_some_and(|f| {
        f.extended_code == rusqlite::ffi::SQLITE_IOERR_FSYNC || f.extended_code == rusqlite::ffi::SQLITE_IOERR_DIR_FSYNC
    })
}

/// A history row: run, position, entry, change sequence number.
type Row<'a> = (RunKey, usize, &'a Entry, i64);

/// Apply one item's writes; its appended history rows are added to `rows`
/// for the caller to insert.
fn apply<'a>(
    tx: &Connection,
    writes: &'a [Write],
    locks: &LockFile,
    rows: &mut Vec<Row<'a>>,
    batch: &mut Batch,
) -> Result<Committed, StoreError> {
    let mut committed = Committed::default();
    for write in writes {
        match write {
            Write::PutModule { hash, bytes } => {
                tx.prepare_cached("INSERT OR IGNORE INTO modules (hash, bytes, created_at) VALUES (?1, ?2, ?3)")?
                    .execute(params![hash, bytes, now_ms()])?;
            }
            Write::CreateRun { run, lease } => {
                let (record, lease) = create_run(tx, run, *lease, locks)?;
                batch.change(record.key, ChangeKind::Created, Some(record.status));
                committed.created.push((record, lease));
            }
            Write::Append { run, position, entries } => {
                for (i, e) in entries.iter().enumerate() {
                    let seq = batch.take_seq();
                    rows.push((*run, position + i, e, seq));
                    history_event(batch, *run, position + i, seq);
                }
            }
            Write::SetStatus { run, status, output, error } => {
                let finished_at = status.is_finished().then(now_ms);
                let n = tx
                    .prepare_cached(
                        "UPDATE runs SET status = ?2, output = ?3, error = ?4, finished_at = ?5 WHERE seq = ?1",
                    )?
                    .execute(params![run.0, status.as_str(), output, error, finished_at])?;
                if n == 0 {
                    return Err(StoreError::NoSuchRun(*run));
                }
                batch.change(*run, ChangeKind::Status, Some(*status));
            }
            Write::SendSignal { run, name, payload, max_pending } => {
                let pending: i64 = tx
                    .prepare_cached("SELECT count(*) FROM signals WHERE run = ?1 AND consumed_at IS NULL")?
                    .query_row([run.0], |r| r.get(0))?;
                if pending as u64 >= *max_pending {
                    return Err(StoreError::SignalsFull(pending as u64));
                }
                tx.prepare_cached("INSERT INTO signals (run, name, payload, sent_at) VALUES (?1, ?2, ?3, ?4)")?
                    .execute(params![run.0, name, payload, now_ms()])?;
                batch.change(*run, ChangeKind::Signal, None);
            }
            Write::BranchAttempt { run, entry: e } => {
                tx.prepare_cached(
                    "INSERT INTO branches (run, name, occurrence, attempt, status, output, error, started_at, finished_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?
                .execute(params![run.0, e.name, e.occurrence, e.attempt, e.status.as_str(), e.output, e.error, e.started_at, e.finished_at])?;
                batch.change(*run, ChangeKind::Branch, None);
            }
            Write::RequestCancel { run, grace_until } => {
                // The earliest stop holds: a stop at once (NULL) over any grace.
                let n = tx
                    .prepare_cached(
                        "UPDATE runs SET cancel_grace_until = CASE \
                       WHEN cancel_requested = 0 THEN ?2 \
                       WHEN cancel_grace_until IS NULL OR ?2 IS NULL THEN NULL \
                       ELSE min(cancel_grace_until, ?2) END, \
                     cancel_requested = 1 WHERE seq = ?1",
                    )?
                    .execute(params![run.0, grace_until])?;
                if n == 0 {
                    return Err(StoreError::NoSuchRun(*run));
                }
                batch.change(*run, ChangeKind::Cancel, None);
            }
            Write::CreateToken { token } => {
                let taken: bool = tx
                    .prepare_cached("SELECT count(*) > 0 FROM tokens WHERE name = ?1")?
                    .query_row([&token.name], |r| r.get(0))?;
                if taken {
                    return Err(StoreError::TokenExists(token.name.clone()));
                }
                tx.prepare_cached("INSERT INTO tokens (id, name, role, hash, created_at) VALUES (?1, ?2, ?3, ?4, ?5)")?
                    .execute(params![token.id, token.name, token.role.as_str(), &token.hash[..], token.created_at])?;
            }
            Write::RevokeToken { id_or_name } => {
                let n = tx
                    .prepare_cached(
                        "UPDATE tokens SET revoked_at = coalesce(revoked_at, ?2) WHERE id = ?1 OR name = ?1",
                    )?
                    .execute(params![id_or_name, now_ms()])?;
                if n == 0 {
                    return Err(StoreError::NoSuchToken(id_or_name.clone()));
                }
            }
            Write::Kv(kv) => apply_kv(tx, kv)?,
            Write::ConsumeSignal { run, name, entry } => {
                // Taking the signal and journaling it are one atomic step:
                // each signal is received exactly once.
                let found: Option<(i64, Vec<u8>)> = tx
                    .prepare_cached(
                        "SELECT seq, payload FROM signals WHERE run = ?1 AND name = ?2 AND consumed_at IS NULL \
                         ORDER BY seq LIMIT 1",
                    )?
                    .query_row(params![run.0, name], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                if let Some((signal, payload)) = found {
                    tx.prepare_cached("UPDATE signals SET consumed_at = ?2 WHERE seq = ?1")?
                        .execute(params![signal, now_ms()])?;
                    let (position, mut e) = (entry.0, entry.1.clone());
                    e.output = payload.clone();
                    let seq = batch.take_seq();
                    insert_rows(tx, &[(*run, position, &e, seq)])?;
                    history_event(batch, *run, position, seq);
                    committed.signal = Some(payload);
                }
            }
        }
    }
    Ok(committed)
}

/// Check the versions an attempt read, then apply its writes.
fn apply_kv(tx: &Connection, kv: &KvCommit) -> Result<(), StoreError> {
    let version = |key: &str| -> rusqlite::Result<Option<(i64, bool)>> {
        tx.prepare_cached("SELECT version, value IS NOT NULL FROM kv WHERE namespace = ?1 AND key = ?2")?
            .query_row(params![kv.namespace, key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
    };
    for (key, read) in &kv.reads {
        let now = version(key)?.map_or(0, |(v, _)| v as u64);
        if now != *read {
            return Err(StoreError::KvConflict { key: key.clone() });
        }
    }
    let mut added: i64 = 0;
    let now = now_ms();
    for (key, value) in &kv.writes {
        let (old_version, was_live) = version(key)?.unwrap_or((0, false));
        if value.is_none() && old_version == 0 {
            continue; // deleting a key that never was: nothing to remember
        }
        added += i64::from(value.is_some()) - i64::from(was_live);
        tx.prepare_cached(
            "INSERT INTO kv (namespace, key, value, version, updated_at) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (namespace, key) DO UPDATE SET value = ?3, version = ?4, updated_at = ?5",
        )?
        .execute(params![kv.namespace, key, value, old_version + 1, now])?;
    }
    if added != 0 {
        let keys: i64 = tx
            .prepare_cached(
                "INSERT INTO kv_namespaces (namespace, keys) VALUES (?1, ?2) \
                 ON CONFLICT (namespace) DO UPDATE SET keys = keys + ?2 RETURNING keys",
            )?
            .query_row(params![kv.namespace, added], |r| r.get(0))?;
        if added > 0 && keys as u64 > kv.max_keys {
            return Err(StoreError::KvFull { namespace: kv.namespace.clone(), max: kv.max_keys });
        }
    }
    Ok(())
}

fn history_event(batch: &mut Batch, run: RunKey, position: usize, seq: i64) {
    if batch.events == Events::All {
        let ts_us = batch.ts_us;
        batch.published.push(ChangeEvent {
            seq: seq as u64,
            run,
            kind: ChangeKind::History,
            position: Some(position as u64),
            status: None,
            ts_us,
        });
    }
}

/// Insert the history rows and `changes` rows gathered so far.
fn flush_rows(conn: &Connection, rows: &[Row<'_>], batch: &Batch) -> Result<(), StoreError> {
    insert_rows(conn, rows)?;
    insert_changes(conn, &batch.changes, batch.ts_us)
}

/// Rows per multi-row INSERT: a batch's rows go in statements of these
/// sizes, largest first (one cached statement each).
const ROW_CHUNKS: [usize; 3] = [32, 8, 1];
/// The statements of a multi-row INSERT into `table (columns)`, one per
/// size of [`ROW_CHUNKS`].
fn chunked_inserts(table: &str, columns: &[&str]) -> Vec<String> {
    let one = format!("({})", vec!["?"; columns.len()].join(", "));
    ROW_CHUNKS
        .iter()
        .map(|&n| format!("INSERT INTO {table} ({}) VALUES {}", columns.join(", "), vec![one.as_str(); n].join(", ")))
        .collect()
}

/// Insert `rows` with the statements of [`chunked_inserts`] (`columns`
/// values each, bound by `bind(statement, first parameter index, row)`).
fn insert_chunked<T>(
    tx: &Connection,
    statements: &[String],
    columns: usize,
    rows: &[T],
    bind: impl Fn(&mut rusqlite::CachedStatement<'_>, usize, &T) -> rusqlite::Result<()>,
) -> Result<(), StoreError> {
    let mut rest = rows;
    for (size, sql) in ROW_CHUNKS.iter().zip(statements) {
        if rest.len() < *size {
            continue;
        }
        let mut stmt = tx.prepare_cached(sql)?;
        while rest.len() >= *size {
            let (chunk, tail) = rest.split_at(*size);
            for (r, row) in chunk.iter().enumerate() {
                bind(&mut stmt, r * columns + 1, row)?;
            }
            stmt.raw_execute()?;
            rest = tail;
        }
    }
    Ok(())
}

const HISTORY_COLUMNS: [&str; 12] = [
    "id",
    "run",
    "position",
    "kind",
    "name",
    "occurrence",
    "attempt",
    "status",
    "output",
    "error",
    "started_at",
    "finished_at",
];

fn insert_rows(tx: &Connection, rows: &[Row<'_>]) -> Result<(), StoreError> {
    static SQL: std::sync::LazyLock<Vec<String>> =
        std::sync::LazyLock::new(|| chunked_inserts("history", &HISTORY_COLUMNS));
    insert_chunked(tx, &SQL, HISTORY_COLUMNS.len(), rows, |stmt, at, (run, position, e, seq)| {
        stmt.raw_bind_parameter(at, seq)?;
        stmt.raw_bind_parameter(at + 1, run.0)?;
        stmt.raw_bind_parameter(at + 2, *position as i64)?;
        stmt.raw_bind_parameter(at + 3, e.kind.as_str())?;
        stmt.raw_bind_parameter(at + 4, &e.name)?;
        stmt.raw_bind_parameter(at + 5, e.occurrence)?;
        stmt.raw_bind_parameter(at + 6, e.attempt)?;
        stmt.raw_bind_parameter(at + 7, e.status.as_str())?;
        stmt.raw_bind_parameter(at + 8, &e.output)?;
        stmt.raw_bind_parameter(at + 9, &e.error)?;
        stmt.raw_bind_parameter(at + 10, e.started_at)?;
        stmt.raw_bind_parameter(at + 11, e.finished_at)
    })
}

const CHANGE_COLUMNS: [&str; 5] = ["seq", "run", "kind", "status", "committed_us"];

fn insert_changes(tx: &Connection, changes: &[ChangeRow], ts_us: i64) -> Result<(), StoreError> {
    static SQL: std::sync::LazyLock<Vec<String>> =
        std::sync::LazyLock::new(|| chunked_inserts("changes", &CHANGE_COLUMNS));
    insert_chunked(tx, &SQL, CHANGE_COLUMNS.len(), changes, |stmt, at, (seq, run, kind, status)| {
        stmt.raw_bind_parameter(at, seq)?;
        stmt.raw_bind_parameter(at + 1, run.0)?;
        stmt.raw_bind_parameter(at + 2, kind.as_str())?;
        stmt.raw_bind_parameter(at + 3, status.map(|s| s.as_str()))?;
        stmt.raw_bind_parameter(at + 4, ts_us)
    })
}

fn create_run(
    tx: &Connection,
    run: &NewRun,
    lease: bool,
    locks: &LockFile,
) -> Result<(RunRecord, Option<Lease>), StoreError> {
    let created_at = now_ms();
    let config = serde_json::to_string(&run.config).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let inserted = tx
        .prepare_cached(
            "INSERT INTO runs (id, module, module_path, input, config, status, created_at, random_key) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (id) DO NOTHING",
        )?
        .execute(params![
            run.id,
            run.module,
            run.module_path,
            run.input,
            config,
            run.status.as_str(),
            created_at,
            &run.random_key[..]
        ])?;
    if inserted == 0 {
        return Err(StoreError::RunExists(run.id.clone()));
    }
    let key = RunKey(tx.last_insert_rowid());
    // Leased before the commit makes the run visible to other processes.
    let held =
        if lease {
            Some(locks.try_lock(key)?.ok_or_else(|| {
                StoreError::Corrupt(format!("the lock of new run {} is held by another process", run.id))
            })?)
        } else {
            None
        };
    Ok((run.record(key, created_at), held))
}
