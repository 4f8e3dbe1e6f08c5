//! The SQLite schema: numbered migrations, the checks that a file is a
//! Cairn database of a version this build knows, and connection settings.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags};

use crate::model::now_ms;
use crate::store::{Durability, StoreError};

/// How long a connection waits for another process's write lock.
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

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
    // 5: the change feed. History rows and `changes` rows share one
    // store-wide sequence (a history row's id is its place in it); each
    // commit's changes other than history appends get a `changes` row, and
    // each transaction a `commits` row: its first sequence number and its
    // time (one row per batch, where a column would cost every history row).
    r#"
    CREATE TABLE commits (
        first_seq INTEGER PRIMARY KEY,
        committed_us INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE changes (
        seq INTEGER PRIMARY KEY,
        run INTEGER NOT NULL,
        kind TEXT NOT NULL,
        status TEXT,
        committed_us INTEGER NOT NULL
    ) STRICT;
    "#,
    // 6: API tokens: a hash of each, never the token.
    r#"
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL,
        hash BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        revoked_at INTEGER
    ) STRICT;
    "#,
    // 7: the key that authenticates this database's compiled-module cache
    // entries (kept here, where a workflow granted the cache cannot reach).
    r#"
    INSERT INTO meta (key, value) VALUES ('cache_key', lower(hex(randomblob(32))));
    "#,
    // 8: effects. Cancel grace periods; key-value state committed with
    // steps. A deleted key keeps its row (value NULL) and its version, so a
    // version is never reused; `kv_namespaces` counts live keys.
    r#"
    ALTER TABLE runs ADD COLUMN cancel_grace_until INTEGER;
    CREATE TABLE kv (
        namespace TEXT NOT NULL,
        key TEXT NOT NULL,
        value BLOB,
        version INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, key)
    ) WITHOUT ROWID, STRICT;
    CREATE TABLE kv_namespaces (
        namespace TEXT PRIMARY KEY,
        keys INTEGER NOT NULL
    ) WITHOUT ROWID, STRICT;
    "#,
];

pub(super) fn map_open_error(path: &Path, e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => {
            StoreError::NotCairn { location: path.display().to_string(), why: "not an SQLite file".into() }
        }
        Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked) => {
            StoreError::Locked { location: path.display().to_string(), waited_ms: BUSY_TIMEOUT.as_millis() as u64 }
        }
        Some(ErrorCode::CannotOpen) => {
            StoreError::CannotOpen { location: path.display().to_string(), why: e.to_string() }
        }
        _ => StoreError::from(e),
    }
}

pub(super) fn connect(path: &Path, durability: Durability) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = match super::faults::vfs() {
        Some(vfs) => Connection::open_with_flags_and_vfs(path, flags, vfs),
        None => Connection::open_with_flags(path, flags),
    }
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
                location: path.display().to_string(),
                why: "it is an SQLite database of another program".into(),
            });
        }
        return Ok(false);
    }
    if h.version < 0 {
        return Err(StoreError::NotCairn {
            location: path.display().to_string(),
            why: format!("its schema version {} is not one Cairn writes", h.version),
        });
    }
    if h.version > known {
        return Err(StoreError::TooNew { location: path.display().to_string(), found: h.version, known });
    }
    Ok(h.version == known)
}

/// Check that the file is ours (or empty) and bring its schema up to date.
pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
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
