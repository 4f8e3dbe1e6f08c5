//! The SQLite store: WAL mode, numbered migrations (`schema`), one writer
//! thread that group-commits everything queued (`writer`), a separate
//! connection for reads, leases as OS locks (`lock`), and a watcher of other
//! processes' commits for the change feed (`watch`).

mod faults;
mod lock;
mod schema;
mod watch;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, mpsc};
use std::thread;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

pub use schema::APPLICATION_ID;
pub use watch::WATCH_INTERVAL;

use crate::model::{Entry, EntryKind, EntryStatus, Role, RunConfig, RunKey, RunRecord, RunStatus, TokenRecord};
use crate::store::{
    ChangeEvent, ChangeFeed, CommitTicket, Durability, KvValue, Lease, RunFilter, RunStore, StoreError, Subscription,
    Write,
};
use lock::LockFile;
use schema::{BUSY_TIMEOUT, connect, map_open_error, migrate};
use writer::{Job, WriteSide};

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

pub struct SqliteStore {
    path: PathBuf,
    location: String,
    db_id: String,
    cache_key: [u8; 32],
    reader: Mutex<Connection>,
    writer: mpsc::Sender<Job>,
    write: Arc<WriteSide>,
    locks: LockFile,
    feed: Arc<ChangeFeed>,
    closed: Arc<AtomicBool>,
    /// The watcher thread starts with the first subscriber: commands that
    /// only read or write (`cairn runs`, `cairn signal`) never need it.
    watcher: std::sync::Once,
}

impl SqliteStore {
    /// Open (creating and migrating if needed) the database at `path`.
    pub fn open(path: &Path, durability: Durability) -> Result<Self, StoreError> {
        private_file(path)?;
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
                StoreError::NotCairn { location: path.display().to_string(), why: format!("no database id: {e}") }
            })?;
        let cache_key: String =
            reader.query_row("SELECT value FROM meta WHERE key = 'cache_key'", [], |r| r.get(0)).map_err(|e| {
                StoreError::NotCairn { location: path.display().to_string(), why: format!("no cache key: {e}") }
            })?;
        let cache_key: [u8; 32] = hex::decode(&cache_key)
            .ok()
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| StoreError::Corrupt(format!("{}: the cache key is not 32 bytes of hex", path.display())))?;
        let writer_conn = connect(path, durability)?;
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let locks = LockFile::open(Path::new(&lock_path))
            .map_err(|e| StoreError::Backend(format!("lock file {}: {e}", Path::new(&lock_path).display())))?;
        let feed = Arc::new(ChangeFeed::default());
        let (tx, rx) = mpsc::channel::<Job>();
        let write = Arc::new(WriteSide::new(writer_conn, locks.clone(), path, feed.clone()));
        let writer_side = write.clone();
        thread::Builder::new().name("cairn-writer".into()).spawn(move || writer_side.writer_loop(rx))?;
        let closed = Arc::new(AtomicBool::new(false));
        Ok(SqliteStore {
            path: path.to_path_buf(),
            location: path.display().to_string(),
            db_id,
            cache_key,
            reader: Mutex::new(reader),
            writer: tx,
            write,
            locks,
            feed,
            closed,
            watcher: std::sync::Once::new(),
        })
    }

    /// Reads answer inline: in WAL mode a reader never waits for the
    /// writer, and most reads take microseconds. (Handing the thread over
    /// first, with `block_in_place`, cost W2 a third of its throughput; the
    /// API server does so itself for the reads that can be long.)
    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn).map_err(|e| map_open_error(&self.path, e))
    }

    #[cfg(test)]
    fn write_side(&self) -> &WriteSide {
        &self.write
    }

    /// Make sure other processes' commits are noticed from now on, then
    /// hand out a receiver (under the write lock, so no commit falls between).
    fn subscribe_with(&self, subscribe: impl FnOnce(&ChangeFeed) -> Subscription) -> Subscription {
        self.watcher.call_once(|| {
            if let Err(e) = watch::spawn(Arc::downgrade(&self.write), self.feed.clone(), self.closed.clone()) {
                eprintln!("cairn: cannot start watching for other processes' changes: {e}");
            }
        });
        let mut wc = self.write.lock();
        let subscription = subscribe(&self.feed);
        // Already watching: go on from where the watcher is, or the
        // listeners there would lose what it has not read yet.
        if !wc.watch.is_active()
            && let Err(e) = watch::start(&mut wc)
        {
            eprintln!("cairn: cannot watch for other processes' changes: {e}");
        }
        subscription
    }
}

/// The database holds inputs, outputs, `--env` values and each run's random
/// key: a new one is created readable by its owner alone (SQLite gives its
/// `-wal` and `-shm` files the same mode), and an existing one that others
/// can read is pointed out.
fn private_file(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(StoreError::CannotOpen { location: path.display().to_string(), why: e.to_string() }),
    }
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        eprintln!(
            "cairn: warning: {} can be read or written by other users (mode {:o}); it holds inputs, outputs, \
             --env values and run keys: `chmod 600` it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    Ok(())
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Relaxed);
        self.feed.wake_all();
    }
}

/// The columns of a `RunRecord`, its step count by the rule of
/// `Entry::counts_as_step`.
static RUN_COLUMNS: LazyLock<String> = LazyLock::new(|| {
    let kinds: Vec<String> = Entry::COUNTED_KINDS.iter().map(|k| format!("'{}'", k.as_str())).collect();
    format!(
        "seq, id, module, module_path, input, config, status, output, error, created_at, finished_at, \
         (SELECT count(*) FROM history h WHERE h.run = runs.seq AND h.kind IN ({}) AND h.status != '{}'), \
         cancel_requested, random_key, cancel_grace_until",
        kinds.join(", "),
        Entry::UNCOUNTED_STATUS.as_str()
    )
});

/// `status NOT IN (<finished statuses>)`.
static UNFINISHED: LazyLock<String> = LazyLock::new(|| {
    let finished: Vec<String> = RunStatus::FINISHED.iter().map(|s| format!("'{}'", s.as_str())).collect();
    format!("status NOT IN ({})", finished.join(", "))
});

/// A run's row, or why it cannot be one. The database is trusted like
/// code, but a row edited by hand (or written by a bug) must not take the
/// others down with it: it is reported and passed over.
fn run_from_row(row: &rusqlite::Row) -> rusqlite::Result<Result<RunRecord, String>> {
    let seq: i64 = row.get(0)?;
    let record = (|| -> Result<RunRecord, String> {
        let get_err = |e: rusqlite::Error| e.to_string();
        let config: String = row.get(5).map_err(get_err)?;
        let status: String = row.get(6).map_err(get_err)?;
        let module: String = row.get(2).map_err(get_err)?;
        // Used as a file name and a cache key: 64 lowercase hex, nothing else.
        if module.len() != 64 || !module.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(format!("its module hash {module:?} is not 64 lowercase hex characters"));
        }
        Ok(RunRecord {
            key: RunKey(seq),
            id: row.get(1).map_err(get_err)?,
            module,
            module_path: row.get(3).map_err(get_err)?,
            input: row.get(4).map_err(get_err)?,
            config: serde_json::from_str::<RunConfig>(&config).map_err(|e| format!("its config: {e}"))?,
            status: RunStatus::parse(&status).ok_or_else(|| format!("unknown status {status:?}"))?,
            output: row.get(7).map_err(get_err)?,
            error: row.get(8).map_err(get_err)?,
            created_at: row.get(9).map_err(get_err)?,
            finished_at: row.get(10).map_err(get_err)?,
            steps: row.get::<_, i64>(11).map_err(get_err)? as u64,
            cancel_requested: row.get::<_, i64>(12).map_err(get_err)? != 0,
            // A key that is not 32 bytes (edited by hand) is no key: that run
            // journals its reads, and a replay of reads made with the key
            // stops with a non-determinism error.
            random_key: row.get::<_, Option<Vec<u8>>>(13).map_err(get_err)?.and_then(|key| key.try_into().ok()),
            cancel_grace_until: row.get(14).map_err(get_err)?,
        })
    })();
    Ok(record.map_err(|why| format!("run #{seq} in the database is malformed: {why}")))
}

const TOKEN_COLUMNS: &str = "id, name, role, hash, created_at, revoked_at";

fn token_from_row(row: &rusqlite::Row) -> rusqlite::Result<Result<TokenRecord, String>> {
    let id: String = row.get(0)?;
    let role: String = row.get(2)?;
    let hash: Vec<u8> = row.get(3)?;
    let (Some(role), Ok(hash)) = (Role::parse(&role), <[u8; 32]>::try_from(hash)) else {
        return Ok(Err(format!("token {id} in the database is malformed")));
    };
    Ok(Ok(TokenRecord { id, name: row.get(1)?, role, hash, created_at: row.get(4)?, revoked_at: row.get(5)? }))
}

/// Rows that are runs; malformed ones are reported on stderr and passed over.
fn good_runs(rows: Vec<Result<RunRecord, String>>) -> Vec<RunRecord> {
    rows.into_iter().filter_map(|r| r.map_err(|why| eprintln!("cairn: skipping {why}")).ok()).collect()
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

#[async_trait::async_trait]
impl RunStore for SqliteStore {
    fn db_id(&self) -> &str {
        &self.db_id
    }

    fn location(&self) -> &str {
        &self.location
    }

    fn cache_key(&self) -> [u8; 32] {
        self.cache_key
    }

    fn submit(&self, writes: Vec<Write>) -> CommitTicket {
        self.write.submit(&self.writer, writes)
    }

    fn subscribe(&self) -> Subscription {
        self.subscribe_with(ChangeFeed::subscribe_all)
    }

    fn subscribe_control(&self) -> Subscription {
        self.subscribe_with(ChangeFeed::subscribe_control)
    }

    async fn module(&self, hash: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|c| c.query_row("SELECT bytes FROM modules WHERE hash = ?1", [hash], |r| r.get(0)).optional())
    }

    async fn run(&self, id: &str) -> Result<Option<RunRecord>, StoreError> {
        let row = self.read(|c| {
            c.prepare_cached(&format!("SELECT {} FROM runs WHERE id = ?1", *RUN_COLUMNS))?
                .query_row([id], run_from_row)
                .optional()
        })?;
        row.transpose().map_err(StoreError::Corrupt)
    }

    async fn modules(&self) -> Result<Vec<(String, u64, i64)>, StoreError> {
        self.read(|c| {
            let mut stmt =
                c.prepare("SELECT hash, length(bytes), created_at FROM modules ORDER BY created_at, hash")?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?)))?.collect()
        })
    }

    async fn run_id(&self, run: RunKey) -> Result<Option<String>, StoreError> {
        self.read(|c| {
            c.prepare_cached("SELECT id FROM runs WHERE seq = ?1")?.query_row([run.0], |r| r.get(0)).optional()
        })
    }

    async fn runs(&self) -> Result<Vec<RunRecord>, StoreError> {
        let rows = self.read(|c| {
            let mut stmt = c.prepare(&format!("SELECT {} FROM runs ORDER BY seq", *RUN_COLUMNS))?;
            stmt.query_map([], run_from_row)?.collect()
        })?;
        Ok(good_runs(rows))
    }

    async fn runs_page(&self, filter: &RunFilter) -> Result<Vec<RunRecord>, StoreError> {
        let status = filter.status.map(|s| s.as_str());
        let module = filter.module_prefix.as_deref();
        let before = filter.before.map_or(i64::MAX, |k| k.0);
        let limit = i64::try_from(filter.limit).unwrap_or(i64::MAX);
        let rows = self.read(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {} FROM runs WHERE seq < ?1 AND (?2 IS NULL OR status = ?2) \
                 AND (?3 IS NULL OR substr(module, 1, length(?3)) = ?3) ORDER BY seq DESC LIMIT ?4",
                *RUN_COLUMNS
            ))?;
            stmt.query_map(params![before, status, module, limit], run_from_row)?.collect()
        })?;
        Ok(good_runs(rows))
    }

    async fn run_counts(&self) -> Result<Vec<(RunStatus, u64)>, StoreError> {
        let rows: Vec<(String, i64)> = self.read(|c| {
            let mut stmt = c.prepare_cached("SELECT status, count(*) FROM runs GROUP BY status")?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect()
        })?;
        Ok(rows.into_iter().filter_map(|(s, n)| Some((RunStatus::parse(&s)?, n.max(0) as u64))).collect())
    }

    async fn unfinished_keys(&self) -> Result<Vec<RunKey>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(&format!("SELECT seq FROM runs WHERE {} ORDER BY seq", *UNFINISHED))?;
            stmt.query_map([], |r| Ok(RunKey(r.get(0)?)))?.collect()
        })
    }

    async fn run_by_key(&self, run: RunKey) -> Result<Option<RunRecord>, StoreError> {
        let row = self.read(|c| {
            c.prepare_cached(&format!("SELECT {} FROM runs WHERE seq = ?1", *RUN_COLUMNS))?
                .query_row([run.0], run_from_row)
                .optional()
        })?;
        row.transpose().map_err(StoreError::Corrupt)
    }

    async fn unfinished_runs(&self) -> Result<Vec<RunRecord>, StoreError> {
        let rows = self.read(|c| {
            let mut stmt =
                c.prepare_cached(&format!("SELECT {} FROM runs WHERE {} ORDER BY seq", *RUN_COLUMNS, *UNFINISHED))?;
            stmt.query_map([], run_from_row)?.collect()
        })?;
        Ok(good_runs(rows))
    }

    async fn history(&self, run: RunKey) -> Result<Vec<Entry>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT kind, name, occurrence, attempt, status, output, error, started_at, finished_at \
                 FROM history WHERE run = ?1 ORDER BY position",
            )?;
            stmt.query_map([run.0], entry_from_row)?.collect()
        })
    }

    async fn history_page(&self, run: RunKey, from: u64, limit: usize) -> Result<Vec<Entry>, StoreError> {
        let (from, limit) = (i64::try_from(from).unwrap_or(i64::MAX), i64::try_from(limit).unwrap_or(i64::MAX));
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT kind, name, occurrence, attempt, status, output, error, started_at, finished_at \
                 FROM history WHERE run = ?1 AND position >= ?2 ORDER BY position LIMIT ?3",
            )?;
            stmt.query_map(params![run.0, from, limit], entry_from_row)?.collect()
        })
    }

    async fn branch_attempts(&self, run: RunKey) -> Result<Vec<Entry>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT 'step', name, occurrence, attempt, status, output, error, started_at, finished_at \
                 FROM branches WHERE run = ?1 ORDER BY finished_at, name, occurrence, attempt",
            )?;
            stmt.query_map([run.0], entry_from_row)?.collect()
        })
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let rows = self.read(|c| {
            let mut stmt = c.prepare_cached(&format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_at, id"))?;
            stmt.query_map([], token_from_row)?.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        Ok(rows.into_iter().filter_map(|r| r.map_err(|why| eprintln!("cairn: skipping {why}")).ok()).collect())
    }

    async fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        let row = self.read(|c| {
            c.prepare_cached(&format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = ?1"))?
                .query_row([id], token_from_row)
                .optional()
        })?;
        row.transpose().map_err(StoreError::Corrupt)
    }

    async fn kv_get(&self, namespace: &str, key: &str) -> Result<KvValue, StoreError> {
        self.read(|c| {
            c.prepare_cached("SELECT value, version, updated_at FROM kv WHERE namespace = ?1 AND key = ?2")?
                .query_row([namespace, key], |r| {
                    Ok(KvValue { value: r.get(0)?, version: r.get::<_, i64>(1)? as u64, updated_at: r.get(2)? })
                })
                .optional()
                .map(|found| found.unwrap_or(KvValue { value: None, version: 0, updated_at: 0 }))
        })
    }

    async fn kv_list(
        &self,
        namespace: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, KvValue)>, StoreError> {
        self.read(|c| {
            // `key >= prefix` lets the primary key's index find the start.
            let mut stmt = c.prepare_cached(
                "SELECT key, value, version, updated_at FROM kv WHERE namespace = ?1 AND value IS NOT NULL \
                 AND key >= ?2 AND substr(key, 1, length(?2)) = ?2 AND (?3 IS NULL OR key > ?3) \
                 ORDER BY key LIMIT ?4",
            )?;
            let rows = stmt.query_map(params![namespace, prefix, after, limit as i64], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    KvValue { value: r.get(1)?, version: r.get::<_, i64>(2)? as u64, updated_at: r.get(3)? },
                ))
            })?;
            rows.collect()
        })
    }

    async fn lease(&self, run: RunKey) -> Result<Option<Lease>, StoreError> {
        Ok(self.locks.try_lock(run)?)
    }

    async fn last_seq(&self) -> Result<u64, StoreError> {
        Ok(self.read(writer::max_seq)? as u64)
    }

    async fn changes_since(&self, after: u64, limit: usize) -> Result<Vec<ChangeEvent>, StoreError> {
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let snapshot = conn.unchecked_transaction()?;
        let changes = watch::read_changes(&snapshot, after, limit)?;
        snapshot.commit()?;
        Ok(changes)
    }
}

#[cfg(test)]
pub(crate) mod tests;
