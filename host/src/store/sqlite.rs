//! The SQLite store: WAL mode, numbered migrations, one writer thread that
//! group-commits everything queued (one transaction and one fsync for all
//! runs' pending writes), and a separate connection for reads.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, params};
use tokio::sync::oneshot;

use super::{
    CommitTicket, Committed, Durability, NewRun, Notices, RunConfig, RunRecord, RunStatus, Store, StoreError, Write,
    now_ms,
};
use crate::journal::{Entry, EntryKind, EntryStatus};
use crate::lock::{LockFile, RunLock};

/// `PRAGMA application_id` of every Cairn database ("CRN1").
pub const APPLICATION_ID: i64 = 0x4352_4E31;

/// Numbered migrations; `PRAGMA user_version` is how many have been applied.
const MIGRATIONS: &[&str] = &[
    // 1: modules, runs, history.
    r#"
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
    CREATE TABLE modules (
        hash TEXT PRIMARY KEY,
        bytes BLOB NOT NULL,
        created_at INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE runs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        module TEXT NOT NULL REFERENCES modules(hash),
        module_path TEXT NOT NULL,
        input BLOB NOT NULL,
        config TEXT NOT NULL,
        status TEXT NOT NULL,
        output BLOB,
        error TEXT,
        created_at INTEGER NOT NULL,
        finished_at INTEGER
    );
    CREATE INDEX runs_unfinished ON runs(status) WHERE status NOT IN ('completed', 'failed', 'cancelled');
    -- Rows are appended in commit order (rowid), so a group commit of many
    -- runs' steps dirties a page or two of the table, not a page per run;
    -- the small index entries of concurrent runs share a few pages too.
    CREATE TABLE history (
        id INTEGER PRIMARY KEY,
        run INTEGER NOT NULL REFERENCES runs(seq),
        position INTEGER NOT NULL,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        occurrence INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        status TEXT NOT NULL,
        output BLOB NOT NULL,
        error TEXT,
        started_at INTEGER NOT NULL,
        finished_at INTEGER NOT NULL
    ) STRICT;
    CREATE UNIQUE INDEX history_run_position ON history(run, position);
    "#,
    // 2: signals and cancel requests.
    r#"
    ALTER TABLE runs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX runs_cancel_requested ON runs(seq) WHERE cancel_requested = 1;
    CREATE TABLE signals (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        run INTEGER NOT NULL REFERENCES runs(seq),
        name TEXT NOT NULL,
        payload BLOB NOT NULL,
        sent_at INTEGER NOT NULL,
        consumed_at INTEGER
    );
    CREATE INDEX signals_pending ON signals(run, name, seq) WHERE consumed_at IS NULL;
    "#,
    // 3: parallel branches: every ended attempt, keyed by branch.
    r#"
    CREATE TABLE branches (
        run INTEGER NOT NULL REFERENCES runs(seq),
        name TEXT NOT NULL,
        occurrence INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        status TEXT NOT NULL,
        output BLOB NOT NULL,
        error TEXT,
        started_at INTEGER NOT NULL,
        finished_at INTEGER NOT NULL,
        PRIMARY KEY (run, name, occurrence, attempt)
    ) WITHOUT ROWID, STRICT;
    "#,
    // 4: a per-run key for the random bytes workflow code reads (NULL for
    // older runs, whose reads are journaled).
    r#"
    ALTER TABLE runs ADD COLUMN random_key BLOB;
    "#,
];

/// Items commit inline only once this long has passed without items of
/// two different runs in a row: one run alone, not a crowd between rounds.
const ALONE: Duration = Duration::from_millis(5);
const NO_RUN: i64 = i64::MIN;

/// How long a connection waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many commit items share one transaction.
const MAX_BATCH: usize = 1024;

struct Job {
    writes: Vec<Write>,
    done: oneshot::Sender<Result<Committed, StoreError>>,
}

pub struct SqliteStore {
    path: PathBuf,
    db_id: String,
    reader: Mutex<Connection>,
    writer: mpsc::Sender<Job>,
    write: Arc<WriteSide>,
    locks: LockFile,
}

/// The one write connection, shared by the writer thread and callers that
/// commit inline.
struct WriteSide {
    conn: Mutex<Connection>,
    /// Items sent to the writer thread and not yet answered.
    queued: AtomicUsize,
    /// The run of the last item that named one, and when (ns since
    /// `opened`) an item last named a different run than the one before.
    last_run: AtomicI64,
    last_switch_ns: AtomicU64,
    opened: std::time::Instant,
    locks: LockFile,
    path: PathBuf,
}

fn map_open_error(path: &Path, e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => {
            StoreError::NotCairn { path: path.display().to_string(), why: "not an SQLite file".into() }
        }
        Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked) => {
            StoreError::Locked { path: path.display().to_string(), waited_ms: BUSY_TIMEOUT.as_millis() as u64 }
        }
        Some(ErrorCode::CannotOpen) => StoreError::CannotOpen { path: path.display().to_string(), why: e.to_string() },
        _ => StoreError::Sqlite(e),
    }
}

fn connect(path: &Path, durability: Durability) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| map_open_error(path, e))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // Every statement either connection runs stays prepared.
    conn.set_prepared_statement_cache_capacity(32);
    // Without the query planner stability guarantee, a statement with
    // `WHERE col = ?` is marked for re-preparing whenever its bindings are
    // cleared, which rusqlite does on every return to its statement cache:
    // every history read parsed and planned its SQL again.
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    let sync = match durability {
        Durability::Power => "FULL",
        Durability::Process => "NORMAL",
    };
    conn.execute_batch(&format!("PRAGMA synchronous = {sync}; PRAGMA foreign_keys = ON;"))
        .map_err(|e| map_open_error(path, e))?;
    Ok(conn)
}

/// Check that the file is ours (or empty) and bring its schema up to date.
/// What a database file holds, read in one snapshot.
struct Header {
    app_id: i64,
    version: i64,
    tables: i64,
}

fn read_header(conn: &Connection) -> rusqlite::Result<Header> {
    Ok(Header {
        app_id: conn.pragma_query_value(None, "application_id", |r| r.get(0))?,
        version: conn.pragma_query_value(None, "user_version", |r| r.get(0))?,
        tables: conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))?,
    })
}

/// Up to date (`Ok(true)`), to be created or migrated (`Ok(false)`), or refused.
fn check_header(h: &Header, path: &Path) -> Result<bool, StoreError> {
    let known = MIGRATIONS.len() as i64;
    if h.app_id != APPLICATION_ID {
        if h.app_id != 0 || h.tables != 0 {
            return Err(StoreError::NotCairn {
                path: path.display().to_string(),
                why: "it is an SQLite database of another program".into(),
            });
        }
        return Ok(false);
    }
    if h.version > known {
        return Err(StoreError::TooNew { path: path.display().to_string(), found: h.version, known });
    }
    Ok(h.version == known)
}

/// Check that the file is ours (or empty) and bring its schema up to date.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    // One read transaction: another process may be creating the file right
    // now, and separate reads could see half of its work.
    let header = {
        let tx = conn.transaction().map_err(|e| map_open_error(path, e))?;
        read_header(&tx).map_err(|e| map_open_error(path, e))?
    };
    if check_header(&header, path)? {
        return Ok(());
    }
    // WAL must be set outside a transaction; it sticks to the file.
    let mode: String =
        conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(|e| map_open_error(path, e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Corrupt(format!("could not switch {} to WAL mode (got {mode})", path.display())));
    }
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(|e| map_open_error(path, e))?;
    // Again under the write lock: another process may have created or
    // migrated it meanwhile.
    let header = read_header(&tx)?;
    if check_header(&header, path)? {
        return Ok(());
    }
    let version = if header.app_id == APPLICATION_ID { header.version } else { 0 };
    for sql in &MIGRATIONS[version as usize..] {
        tx.execute_batch(sql)?;
    }
    if version == 0 {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|e| StoreError::Corrupt(format!("no randomness for the database id: {e}")))?;
        tx.execute("INSERT INTO meta (key, value) VALUES ('db_id', ?1)", [hex::encode(id)])?;
        tx.execute("INSERT INTO meta (key, value) VALUES ('created_at', ?1)", [now_ms().to_string()])?;
        tx.pragma_update(None, "application_id", APPLICATION_ID)?;
    }
    tx.pragma_update(None, "user_version", MIGRATIONS.len() as i64)?;
    tx.commit()?;
    Ok(())
}

impl SqliteStore {
    /// Open (creating and migrating if needed) the database at `path`.
    pub fn open(path: &Path, durability: Durability) -> Result<Self, StoreError> {
        let mut reader = connect(path, durability)?;
        // Switching a new file to WAL, or racing another process that
        // creates it, can answer "busy" without waiting: try again for as
        // long as a busy wait would.
        let started = std::time::Instant::now();
        loop {
            match migrate(&mut reader, path) {
                Err(StoreError::Locked { .. }) if started.elapsed() < BUSY_TIMEOUT => {
                    thread::sleep(Duration::from_millis(5));
                }
                other => break other?,
            }
        }
        let db_id: String =
            reader.query_row("SELECT value FROM meta WHERE key = 'db_id'", [], |r| r.get(0)).map_err(|e| {
                StoreError::NotCairn { path: path.display().to_string(), why: format!("no database id: {e}") }
            })?;
        let writer_conn = connect(path, durability)?;
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let locks = LockFile::open(Path::new(&lock_path))?;
        let (tx, rx) = mpsc::channel::<Job>();
        let write = Arc::new(WriteSide {
            conn: Mutex::new(writer_conn),
            queued: AtomicUsize::new(0),
            last_run: AtomicI64::new(NO_RUN),
            last_switch_ns: AtomicU64::new(0),
            // As if the last switch were long past: a store starts alone.
            opened: std::time::Instant::now().checked_sub(ALONE).unwrap_or_else(std::time::Instant::now),
            locks: locks.clone(),
            path: path.to_path_buf(),
        });
        let writer_side = write.clone();
        thread::Builder::new()
            .name("cairn-writer".into())
            .spawn(move || writer_loop(&writer_side, rx))
            .map_err(StoreError::Lock)?;
        Ok(SqliteStore { path: path.to_path_buf(), db_id, reader: Mutex::new(reader), writer: tx, write, locks })
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn).map_err(|e| map_open_error(&self.path, e))
    }
}

const RUN_COLUMNS: &str = "seq, id, module, module_path, input, config, status, output, error, created_at, finished_at, \
     (SELECT count(*) FROM history h WHERE h.run = runs.seq AND h.kind IN ('step', 'spawn') AND h.status != 'failed'), \
     cancel_requested, random_key";

fn run_from_row(row: &rusqlite::Row) -> rusqlite::Result<RunRecord> {
    let config: String = row.get(5)?;
    let status: String = row.get(6)?;
    let corrupt = |col: usize, what: String| {
        rusqlite::Error::FromSqlConversionFailure(col, rusqlite::types::Type::Text, what.into())
    };
    Ok(RunRecord {
        seq: row.get(0)?,
        id: row.get(1)?,
        module: row.get(2)?,
        module_path: row.get(3)?,
        input: row.get(4)?,
        config: serde_json::from_str::<RunConfig>(&config).map_err(|e| corrupt(5, e.to_string()))?,
        status: RunStatus::parse(&status).ok_or_else(|| corrupt(6, format!("unknown status {status:?}")))?,
        output: row.get(7)?,
        error: row.get(8)?,
        created_at: row.get(9)?,
        finished_at: row.get(10)?,
        steps: row.get::<_, i64>(11)? as u64,
        cancel_requested: row.get::<_, i64>(12)? != 0,
        // A key that is not 32 bytes (edited by hand) is no key: that run
        // journals its reads, and a replay of reads made with the key stops
        // with a non-determinism error; every other run stays listable.
        random_key: row.get::<_, Option<Vec<u8>>>(13)?.and_then(|key| key.try_into().ok()),
    })
}

fn entry_from_row(row: &rusqlite::Row) -> rusqlite::Result<Entry> {
    let kind: String = row.get(0)?;
    let status: String = row.get(4)?;
    let corrupt = |col: usize, what: String| {
        rusqlite::Error::FromSqlConversionFailure(col, rusqlite::types::Type::Text, what.into())
    };
    Ok(Entry {
        kind: EntryKind::parse(&kind).ok_or_else(|| corrupt(0, format!("unknown entry kind {kind:?}")))?,
        name: row.get(1)?,
        occurrence: row.get(2)?,
        attempt: row.get(3)?,
        status: EntryStatus::parse(&status).ok_or_else(|| corrupt(4, format!("unknown entry status {status:?}")))?,
        output: row.get(5)?,
        error: row.get(6)?,
        started_at: row.get(7)?,
        finished_at: row.get(8)?,
    })
}

impl Store for SqliteStore {
    fn db_id(&self) -> &str {
        &self.db_id
    }

    fn submit(&self, writes: Vec<Write>) -> CommitTicket {
        let (done, ticket) = oneshot::channel();
        // One run alone, nothing queued and the connection free: commit
        // right here. A lone run then pays one commit per step and no
        // thread hand-offs (which cost more than the commit itself on small
        // VMs). With several runs committing, items go to the writer thread,
        // which commits them in groups: committing inline whenever the queue
        // happened to be empty (between two rounds of a burst, say) cost an
        // fsync for one item and held the connection from the next group.
        // Only when nothing is queued, so one run's items stay in order.
        let w = &self.write;
        let now = w.opened.elapsed().as_nanos() as u64;
        if let Some(run) = writes.iter().find_map(Write::run) {
            let before = w.last_run.swap(run, Ordering::Relaxed);
            // Branch instances commit concurrently with their parent and
            // with each other: one run, but a crowd.
            let branch = writes.iter().any(|x| matches!(x, Write::BranchAttempt { .. }));
            if branch || (before != run && before != NO_RUN) {
                w.last_switch_ns.store(now, Ordering::Relaxed);
            }
        }
        let alone = now.saturating_sub(w.last_switch_ns.load(Ordering::Relaxed)) >= ALONE.as_nanos() as u64;
        if alone
            && w.queued.load(Ordering::Acquire) == 0
            && let Ok(mut conn) = w.conn.try_lock()
            && w.queued.load(Ordering::Acquire) == 0
        {
            let mut results = write_batch(&mut conn, &[&writes], &w.locks, &w.path);
            let _ = done.send(results.pop().expect("one result per item"));
            return ticket;
        }
        w.queued.fetch_add(1, Ordering::AcqRel);
        if let Err(mpsc::SendError(job)) = self.writer.send(Job { writes, done }) {
            w.queued.fetch_sub(1, Ordering::AcqRel);
            let _ = job.done.send(Err(StoreError::WriterGone));
        }
        ticket
    }

    fn module(&self, hash: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|c| c.query_row("SELECT bytes FROM modules WHERE hash = ?1", [hash], |r| r.get(0)).optional())
    }

    fn run(&self, id: &str) -> Result<Option<RunRecord>, StoreError> {
        self.read(|c| {
            c.query_row(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"), [id], run_from_row).optional()
        })
    }

    fn runs(&self) -> Result<Vec<RunRecord>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare(&format!("SELECT {RUN_COLUMNS} FROM runs ORDER BY seq"))?;
            stmt.query_map([], run_from_row)?.collect()
        })
    }

    fn unfinished_runs(&self) -> Result<Vec<RunRecord>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE status NOT IN ('completed', 'failed', 'cancelled') ORDER BY seq"
            ))?;
            stmt.query_map([], run_from_row)?.collect()
        })
    }

    fn history(&self, run: i64) -> Result<Vec<Entry>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT kind, name, occurrence, attempt, status, output, error, started_at, finished_at \
                 FROM history WHERE run = ?1 ORDER BY position",
            )?;
            stmt.query_map([run], entry_from_row)?.collect()
        })
    }

    fn branch_attempts(&self, run: i64) -> Result<Vec<Entry>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT 'step', name, occurrence, attempt, status, output, error, started_at, finished_at \
                 FROM branches WHERE run = ?1 ORDER BY finished_at, name, occurrence, attempt",
            )?;
            stmt.query_map([run], entry_from_row)?.collect()
        })
    }

    fn lock_run(&self, run: i64) -> Result<Option<RunLock>, StoreError> {
        Ok(self.locks.try_lock(run)?)
    }

    fn last_signal_seq(&self) -> Result<i64, StoreError> {
        self.read(|c| c.query_row("SELECT coalesce(max(seq), 0) FROM signals", [], |r| r.get(0)))
    }

    fn notices(&self, after_signal: i64) -> Result<Notices, StoreError> {
        self.read(|c| {
            let mut signals = Vec::new();
            let mut stmt = c.prepare_cached("SELECT seq, run FROM signals WHERE seq > ?1 ORDER BY seq")?;
            for row in stmt.query_map([after_signal], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))? {
                signals.push(row?);
            }
            let mut stmt = c.prepare_cached(
                "SELECT seq FROM runs WHERE cancel_requested = 1 \
                 AND status NOT IN ('completed', 'failed', 'cancelled')",
            )?;
            let cancelled = stmt.query_map([], |r| r.get::<_, i64>(0))?.collect::<Result<Vec<_>, _>>()?;
            Ok(Notices { signals, cancelled })
        })
    }
}

/// The writer: take everything queued, write it in one transaction (a
/// savepoint per item, so one bad item does not abort the others), commit
/// once, then answer every item.
fn writer_loop(w: &WriteSide, rx: mpsc::Receiver<Job>) {
    let mut jobs: Vec<Job> = Vec::new();
    // CAIRN_DEBUG_BATCHES=1: print batch statistics when the writer stops.
    let stats = std::env::var_os("CAIRN_DEBUG_BATCHES").is_some();
    let (mut batches, mut items, mut busy) = (0u64, 0u64, Duration::ZERO);
    while let Ok(first) = rx.recv() {
        let started = std::time::Instant::now();
        jobs.push(first);
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let results = {
            let mut conn = w.conn.lock().unwrap_or_else(|p| p.into_inner());
            let items: Vec<&[Write]> = jobs.iter().map(|j| j.writes.as_slice()).collect();
            write_batch(&mut conn, &items, &w.locks, &w.path)
        };
        w.queued.fetch_sub(jobs.len(), Ordering::AcqRel);
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

fn write_batch(
    conn: &mut Connection,
    jobs: &[&[Write]],
    locks: &LockFile,
    path: &Path,
) -> Vec<Result<Committed, StoreError>> {
    // Items almost never fail: write the batch plainly first. Only if one
    // does, roll back and write it again with a savepoint per item, so the
    // bad item does not abort its batch-mates.
    match write_items(conn, jobs, locks, path, false) {
        Some(results) => results,
        None => write_items(conn, jobs, locks, path, true).expect("isolated items never abort the batch"),
    }
}

/// One transaction over `jobs`. Without `isolate`, returns `None` (and
/// rolls back) as soon as an item fails.
fn write_items(
    conn: &mut Connection,
    jobs: &[&[Write]],
    locks: &LockFile,
    path: &Path,
    isolate: bool,
) -> Option<Vec<Result<Committed, StoreError>>> {
    // Cached statements: parsing BEGIN/SAVEPOINT/COMMIT on every batch
    // showed up in profiles.
    let run = |conn: &Connection, sql: &str| -> rusqlite::Result<()> {
        conn.prepare_cached(sql)?.execute([])?;
        Ok(())
    };
    let fail_all = |conn: &Connection, e: rusqlite::Error| -> Option<Vec<Result<Committed, StoreError>>> {
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        Some(jobs.iter().map(|_| Err(commit_error(path, &e))).collect())
    };
    if let Err(e) = run(conn, "BEGIN IMMEDIATE") {
        return fail_all(conn, e);
    }
    let mut results = Vec::with_capacity(jobs.len());
    // History rows go in by a few multi-row INSERTs instead of a statement
    // per row: the whole batch's at the end, or each item's own under
    // isolation (inside its savepoint).
    let mut rows = Vec::new();
    for job in jobs {
        if isolate && let Err(e) = run(conn, "SAVEPOINT item") {
            return fail_all(conn, e);
        }
        let mut result = apply(conn, job, locks, &mut rows);
        if isolate {
            result = result.and_then(|c| insert_rows(conn, &rows).map(|()| c));
            rows.clear();
            let undo = match &result {
                Ok(_) => run(conn, "RELEASE item"),
                Err(_) => run(conn, "ROLLBACK TO item").and_then(|_| run(conn, "RELEASE item")),
            };
            if let Err(e) = undo {
                return fail_all(conn, e);
            }
        } else if result.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
            if jobs.len() == 1 {
                return Some(vec![result]);
            }
            return None;
        }
        results.push(result);
    }
    if let Err(e) = insert_rows(conn, &rows) {
        let _ = conn.execute_batch("ROLLBACK");
        if jobs.len() == 1 {
            return Some(vec![Err(e)]);
        }
        return None;
    }
    if let Err(e) = run(conn, "COMMIT") {
        // Nothing of this batch is durable: locks taken for new runs go too.
        return fail_all(conn, e);
    }
    Some(results)
}

/// The error every item of a failed batch gets (`rusqlite::Error` is not `Clone`).
fn commit_error(path: &Path, e: &rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked) => {
            StoreError::Locked { path: path.display().to_string(), waited_ms: BUSY_TIMEOUT.as_millis() as u64 }
        }
        _ => StoreError::Commit(e.to_string()),
    }
}

/// A history row: run, position, entry.
type Row<'a> = (i64, usize, &'a Entry);

/// Apply one item's writes; its appended history rows are added to `rows`
/// for the caller to insert.
fn apply<'a>(
    tx: &Connection,
    writes: &'a [Write],
    locks: &LockFile,
    rows: &mut Vec<Row<'a>>,
) -> Result<Committed, StoreError> {
    let mut committed = Committed::default();
    for write in writes {
        match write {
            Write::PutModule { hash, bytes } => {
                tx.prepare_cached("INSERT OR IGNORE INTO modules (hash, bytes, created_at) VALUES (?1, ?2, ?3)")?
                    .execute(params![hash, bytes, now_ms()])?;
            }
            Write::CreateRun { run, lock } => committed.created.push(create_run(tx, run, *lock, locks)?),
            Write::Append { run, position, entries } => {
                rows.extend(entries.iter().enumerate().map(|(i, e)| (*run, position + i, e)));
            }
            Write::SetStatus { run, status, output, error } => {
                let finished_at = status.is_finished().then(now_ms);
                let n = tx
                    .prepare_cached(
                        "UPDATE runs SET status = ?2, output = ?3, error = ?4, finished_at = ?5 WHERE seq = ?1",
                    )?
                    .execute(params![run, status.as_str(), output, error, finished_at])?;
                if n == 0 {
                    return Err(StoreError::NoSuchRun(*run));
                }
            }
            Write::SendSignal { run, name, payload } => {
                tx.prepare_cached("INSERT INTO signals (run, name, payload, sent_at) VALUES (?1, ?2, ?3, ?4)")?
                    .execute(params![run, name, payload, now_ms()])?;
            }
            Write::BranchAttempt { run, entry: e } => {
                tx.prepare_cached(
                    "INSERT INTO branches (run, name, occurrence, attempt, status, output, error, started_at, finished_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?
                .execute(params![run, e.name, e.occurrence, e.attempt, e.status.as_str(), e.output, e.error, e.started_at, e.finished_at])?;
            }
            Write::RequestCancel { run } => {
                tx.prepare_cached("UPDATE runs SET cancel_requested = 1 WHERE seq = ?1")?.execute([run])?;
            }
            Write::ConsumeSignal { run, name, entry } => {
                // Taking the signal and journaling it are one atomic step:
                // each signal is received exactly once.
                let found: Option<(i64, Vec<u8>)> = tx
                    .prepare_cached(
                        "SELECT seq, payload FROM signals WHERE run = ?1 AND name = ?2 AND consumed_at IS NULL \
                         ORDER BY seq LIMIT 1",
                    )?
                    .query_row(params![run, name], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                if let Some((seq, payload)) = found {
                    tx.prepare_cached("UPDATE signals SET consumed_at = ?2 WHERE seq = ?1")?
                        .execute(params![seq, now_ms()])?;
                    let (position, mut e) = (entry.0, entry.1.clone());
                    e.output = payload.clone();
                    insert_rows(tx, &[(*run, position, &e)])?;
                    committed.signal = Some(payload);
                }
            }
        }
    }
    Ok(committed)
}

/// Rows per multi-row INSERT: a batch's rows go in statements of these
/// sizes, largest first (one cached statement each).
const ROW_CHUNKS: [usize; 3] = [32, 8, 1];
const HISTORY_COLUMNS: usize = 11;

fn insert_rows(tx: &Connection, rows: &[Row<'_>]) -> Result<(), StoreError> {
    static SQL: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
        ROW_CHUNKS
            .iter()
            .map(|&n| {
                let one = format!("({})", vec!["?"; HISTORY_COLUMNS].join(", "));
                format!(
                    "INSERT INTO history (run, position, kind, name, occurrence, attempt, status, output, error, \
                     started_at, finished_at) VALUES {}",
                    vec![one; n].join(", ")
                )
            })
            .collect()
    });
    let mut rest = rows;
    for (size, sql) in ROW_CHUNKS.iter().zip(SQL.iter()) {
        if rest.len() < *size {
            continue;
        }
        let mut stmt = tx.prepare_cached(sql)?;
        while rest.len() >= *size {
            let (chunk, tail) = rest.split_at(*size);
            for (r, (run, position, e)) in chunk.iter().enumerate() {
                let at = r * HISTORY_COLUMNS;
                stmt.raw_bind_parameter(at + 1, run)?;
                stmt.raw_bind_parameter(at + 2, *position as i64)?;
                stmt.raw_bind_parameter(at + 3, e.kind.as_str())?;
                stmt.raw_bind_parameter(at + 4, &e.name)?;
                stmt.raw_bind_parameter(at + 5, e.occurrence)?;
                stmt.raw_bind_parameter(at + 6, e.attempt)?;
                stmt.raw_bind_parameter(at + 7, e.status.as_str())?;
                stmt.raw_bind_parameter(at + 8, &e.output)?;
                stmt.raw_bind_parameter(at + 9, &e.error)?;
                stmt.raw_bind_parameter(at + 10, e.started_at)?;
                stmt.raw_bind_parameter(at + 11, e.finished_at)?;
            }
            stmt.raw_execute()?;
            rest = tail;
        }
    }
    Ok(())
}

fn create_run(
    tx: &Connection,
    run: &NewRun,
    lock: bool,
    locks: &LockFile,
) -> Result<(RunRecord, Option<RunLock>), StoreError> {
    let created_at = now_ms();
    let config = serde_json::to_string(&run.config).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let random_key = crate::random::new_key().map_err(|e| StoreError::Commit(e.to_string()))?;
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
            &random_key[..]
        ])?;
    if inserted == 0 {
        return Err(StoreError::RunExists(run.id.clone()));
    }
    let seq = tx.last_insert_rowid();
    // Lock before the commit makes the run visible to other processes.
    let held =
        if lock {
            Some(locks.try_lock(seq)?.ok_or_else(|| {
                StoreError::Corrupt(format!("the lock of new run {} is held by another process", run.id))
            })?)
        } else {
            None
        };
    let record = RunRecord {
        seq,
        id: run.id.clone(),
        module: run.module.clone(),
        module_path: run.module_path.clone(),
        input: run.input.clone(),
        config: run.config.clone(),
        status: run.status,
        output: None,
        error: None,
        created_at,
        finished_at: None,
        steps: 0,
        cancel_requested: false,
        random_key: Some(random_key),
    };
    Ok((record, held))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_db(name: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("cairn-sqlite-test-{name}-{}.db", std::process::id()));
        for ext in ["", "-wal", "-shm", ".lock"] {
            let _ = std::fs::remove_file(format!("{}{ext}", path.display()));
        }
        path
    }

    /// Create run `id` of module "m".
    fn new_run(id: &str) -> Write {
        Write::CreateRun {
            run: NewRun {
                id: id.into(),
                module: "m".into(),
                module_path: "m.wasm".into(),
                input: b"null".to_vec(),
                config: RunConfig { dirs: vec![], env: vec![], max_memory_mib: 1, max_cpu_ms: 1 },
                status: RunStatus::Pending,
            },
            lock: false,
        }
    }

    #[test]
    fn one_bad_item_does_not_abort_its_batch() {
        let path = temp_db("batch");
        let store = SqliteStore::open(&path, Durability::Process).unwrap();
        let module = Write::PutModule { hash: "m".into(), bytes: vec![0] };
        let mut conn = store.write.conn.lock().unwrap();
        let good_a = [module, new_run("a")];
        let bad = [Write::SetStatus { run: 999_999, status: RunStatus::Completed, output: None, error: None }];
        let good_b = [new_run("b")];
        let results = write_batch(&mut conn, &[&good_a, &bad, &good_b], &store.locks, &path);
        drop(conn);
        assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
        assert!(matches!(results[1], Err(StoreError::NoSuchRun(999_999))), "{results:?}");
        let ids: Vec<String> = store.runs().unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["a", "b"], "the good items are committed");
        drop(store);
        let _ = std::fs::remove_file(&path);
    }

    /// A batch's history rows go in together, in statements of several
    /// sizes: every row lands at its position, with its fields; an item
    /// whose rows collide with committed ones fails alone.
    #[test]
    fn batched_history_rows_land_whole_and_a_colliding_item_fails_alone() {
        let path = temp_db("rows");
        let store = SqliteStore::open(&path, Durability::Process).unwrap();
        let mut conn = store.write.conn.lock().unwrap();
        let mut setup = vec![Write::PutModule { hash: "m".into(), bytes: vec![0] }];
        setup.extend(["a", "b", "c"].map(new_run));
        let created = write_batch(&mut conn, &[&setup], &store.locks, &path).pop().unwrap().unwrap().created;
        let seqs: Vec<i64> = created.iter().map(|(r, _)| r.seq).collect();
        let entry = |run: usize, i: usize| Entry {
            kind: EntryKind::Step,
            name: format!("s{run}"),
            occurrence: i as u32 + 1,
            attempt: 1,
            status: EntryStatus::Completed,
            output: format!("[{run},{i}]").into_bytes(),
            error: (i % 7 == 0).then(|| format!("e{i}")),
            started_at: i as i64,
            finished_at: 1000 + i as i64,
        };
        // 45 rows for run a (32 + 8 + 5 single rows), 3 for run b.
        let append = |run: usize, from: usize, n: usize| Write::Append {
            run: seqs[run],
            position: from,
            entries: (from..from + n).map(|i| entry(run, i)).collect(),
        };
        let (a1, a2, b1) = ([append(0, 0, 20)], [append(0, 20, 25)], [append(1, 0, 3)]);
        let results = write_batch(&mut conn, &[&a1, &a2, &b1], &store.locks, &path);
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        // Run b's position 2 exists already: that item fails, run c's commits.
        let (b_again, c1) = ([append(1, 2, 2)], [append(2, 0, 2)]);
        let results = write_batch(&mut conn, &[&b_again, &c1], &store.locks, &path);
        drop(conn);
        assert!(results[0].is_err() && results[1].is_ok(), "{results:?}");
        for (run, n) in [(0, 45), (1, 3), (2, 2)] {
            let history = store.history(seqs[run]).unwrap();
            let want: Vec<Entry> = (0..n).map(|i| entry(run, i)).collect();
            assert_eq!(history, want, "run {run}");
        }
        drop(store);
        let _ = std::fs::remove_file(&path);
    }
}
