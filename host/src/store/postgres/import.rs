//! `cairn migrate --from cairn.db --to postgres://...`: an SQLite database
//! moved whole into an empty PostgreSQL one, in one transaction: modules,
//! runs (ids, statuses, outputs, cancel requests), every history entry,
//! branch attempt, signal, change, token and key-value entry, with their
//! sequence numbers; then the sequences continue after them. A run keeps
//! its key, so its change events and its history read the same on both.
//!
//! The SQLite side is read in one read transaction (one snapshot) on a
//! thread of its own, a batch at a time; PostgreSQL takes the rows with
//! binary `COPY`.

use std::path::Path;

use bytes::BytesMut;
use tokio::sync::mpsc;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

use super::{PostgresStore, pg_error, pool_error};
use crate::store::StoreError;

/// One table: its PostgreSQL columns with their types, and the SQLite
/// query that reads them in that order.
struct Table {
    name: &'static str,
    columns: &'static [(&'static str, Type)],
    select: &'static str,
}

const TABLES: &[Table] = &[
    Table {
        name: "modules",
        columns: &[("hash", Type::TEXT), ("bytes", Type::BYTEA), ("created_at", Type::INT8)],
        select: "SELECT hash, bytes, created_at FROM modules",
    },
    Table {
        name: "runs",
        columns: &[
            ("seq", Type::INT8),
            ("id", Type::TEXT),
            ("module", Type::TEXT),
            ("module_path", Type::TEXT),
            ("input", Type::BYTEA),
            ("config", Type::TEXT),
            ("status", Type::TEXT),
            ("output", Type::BYTEA),
            ("error", Type::TEXT),
            ("created_at", Type::INT8),
            ("finished_at", Type::INT8),
            ("cancel_requested", Type::BOOL),
            ("random_key", Type::BYTEA),
            ("cancel_grace_until", Type::INT8),
        ],
        select: "SELECT seq, id, module, module_path, input, config, status, output, error, created_at, finished_at, \
                 cancel_requested, random_key, cancel_grace_until FROM runs ORDER BY seq",
    },
    Table {
        name: "history",
        columns: &[
            ("id", Type::INT8),
            ("run", Type::INT8),
            ("position", Type::INT4),
            ("kind", Type::TEXT),
            ("name", Type::TEXT),
            ("occurrence", Type::INT4),
            ("attempt", Type::INT4),
            ("status", Type::TEXT),
            ("output", Type::BYTEA),
            ("error", Type::TEXT),
            ("started_at", Type::INT8),
            ("finished_at", Type::INT8),
            ("epoch", Type::INT8),
            ("committed_us", Type::INT8),
        ],
        // SQLite keeps a commit's time once per commit (`commits`), from
        // its first sequence number on.
        select: "SELECT id, run, position, kind, name, occurrence, attempt, status, output, error, started_at, \
                 finished_at, 0, coalesce((SELECT c.committed_us FROM commits c WHERE c.first_seq <= h.id \
                 ORDER BY c.first_seq DESC LIMIT 1), finished_at * 1000) FROM history h ORDER BY id",
    },
    Table {
        name: "signals",
        columns: &[
            ("seq", Type::INT8),
            ("run", Type::INT8),
            ("name", Type::TEXT),
            ("payload", Type::BYTEA),
            ("sent_at", Type::INT8),
            ("consumed_at", Type::INT8),
        ],
        select: "SELECT seq, run, name, payload, sent_at, consumed_at FROM signals ORDER BY seq",
    },
    Table {
        name: "branches",
        columns: &[
            ("run", Type::INT8),
            ("name", Type::TEXT),
            ("occurrence", Type::INT4),
            ("attempt", Type::INT4),
            ("status", Type::TEXT),
            ("output", Type::BYTEA),
            ("error", Type::TEXT),
            ("started_at", Type::INT8),
            ("finished_at", Type::INT8),
        ],
        select: "SELECT run, name, occurrence, attempt, status, output, error, started_at, finished_at FROM branches",
    },
    Table {
        name: "changes",
        columns: &[
            ("seq", Type::INT8),
            ("run", Type::INT8),
            ("kind", Type::TEXT),
            ("status", Type::TEXT),
            ("committed_us", Type::INT8),
        ],
        select: "SELECT seq, run, kind, status, committed_us FROM changes ORDER BY seq",
    },
    Table {
        name: "tokens",
        columns: &[
            ("id", Type::TEXT),
            ("name", Type::TEXT),
            ("role", Type::TEXT),
            ("hash", Type::BYTEA),
            ("created_at", Type::INT8),
            ("revoked_at", Type::INT8),
        ],
        select: "SELECT id, name, role, hash, created_at, revoked_at FROM tokens",
    },
    Table {
        name: "kv",
        columns: &[
            ("namespace", Type::TEXT),
            ("key", Type::TEXT),
            ("value", Type::BYTEA),
            ("version", Type::INT8),
            ("updated_at", Type::INT8),
        ],
        select: "SELECT namespace, key, value, version, updated_at FROM kv",
    },
    Table {
        name: "kv_namespaces",
        columns: &[("namespace", Type::TEXT), ("keys", Type::INT8)],
        select: "SELECT namespace, keys FROM kv_namespaces",
    },
];

/// Rows sent from the reading thread at a time.
const BATCH: usize = 512;

/// An SQLite value, written as the PostgreSQL column's type.
#[derive(Debug)]
enum Cell {
    Null,
    Int(i64),
    Real(f64),
    /// As stored (SQLite does not check that it is UTF-8).
    Text(Vec<u8>),
    Blob(Vec<u8>),
}

impl ToSql for Cell {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match (self, ty) {
            (Cell::Null, _) => Ok(IsNull::Yes),
            (Cell::Int(i), &Type::INT4) => i32::try_from(*i)?.to_sql(ty, out),
            (Cell::Int(i), &Type::BOOL) => (*i != 0).to_sql(ty, out),
            (Cell::Int(i), _) => i.to_sql(ty, out),
            // Bytes go over as they are; text must be UTF-8 (it is not
            // changed to make it so).
            (Cell::Text(b) | Cell::Blob(b), &Type::BYTEA) => b.to_sql(ty, out),
            (Cell::Text(b) | Cell::Blob(b), _) => std::str::from_utf8(b)?.to_sql(ty, out),
            (Cell::Real(r), _) => Err(format!("a real number ({r}) where {ty} belongs").into()),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// What the reading thread sends: a table's rows, then its end.
enum Read {
    Rows(Vec<Vec<Cell>>),
    End,
    /// After the last table: the highest sequence number SQLite handed out
    /// (a commit's first number counts too), so that none is handed out again.
    LastSeq(i64),
    Failed(String),
}

/// How many rows of each table moved.
pub type Imported = Vec<(&'static str, u64)>;

impl PostgresStore {
    /// Copy the SQLite database at `from` into this one, which must hold no
    /// runs, modules, tokens or key-value entries yet. Nothing is written
    /// unless everything is. Runs another process executes on the SQLite
    /// side are the caller's to refuse first.
    pub async fn import_sqlite(&self, from: &Path) -> Result<Imported, StoreError> {
        let mut client = self.inner.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(pg_error)?;
        // Nobody writes here meanwhile, and nobody has.
        // A long transaction by design: not ended while it reads SQLite.
        tx.batch_execute("SET LOCAL idle_in_transaction_session_timeout = 0").await.map_err(pg_error)?;
        tx.execute(super::gate::LOCK, &[]).await.map_err(pg_error)?;
        tx.batch_execute("LOCK TABLE runs, modules, tokens, kv IN EXCLUSIVE MODE").await.map_err(pg_error)?;
        let held: i64 = tx
            .query_one(
                "SELECT (SELECT count(*) FROM runs) + (SELECT count(*) FROM modules) + (SELECT count(*) FROM tokens) \
                 + (SELECT count(*) FROM kv)",
                &[],
            )
            .await
            .map_err(pg_error)?
            .get(0);
        if held != 0 {
            return Err(StoreError::NotEmpty(self.location.clone()));
        }

        let (send, mut receive) = mpsc::channel::<Read>(4);
        let path = from.to_path_buf();
        let reader = std::thread::spawn(move || {
            if let Err(e) = read_sqlite(&path, &send) {
                let _ = send.blocking_send(Read::Failed(e));
            }
        });
        let mut imported = Vec::with_capacity(TABLES.len());
        for table in TABLES {
            let names: Vec<&str> = table.columns.iter().map(|c| c.0).collect();
            let types: Vec<Type> = table.columns.iter().map(|c| c.1.clone()).collect();
            let sink = tx
                .copy_in(&format!("COPY {} ({}) FROM STDIN BINARY", table.name, names.join(", ")))
                .await
                .map_err(pg_error)?;
            let writer = BinaryCopyInWriter::new(sink, &types);
            futures_util::pin_mut!(writer);
            let mut n = 0u64;
            loop {
                match receive.recv().await {
                    Some(Read::Rows(rows)) => {
                        for row in rows {
                            let cells: Vec<&(dyn ToSql + Sync)> =
                                row.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
                            writer.as_mut().write(&cells).await.map_err(|e| copy_error(table.name, e))?;
                            n += 1;
                        }
                    }
                    Some(Read::End) => break,
                    Some(Read::Failed(why)) => {
                        return Err(StoreError::CannotOpen { location: from.display().to_string(), why });
                    }
                    Some(Read::LastSeq(_)) | None => {
                        return Err(StoreError::Commit("the SQLite reader stopped early".into()));
                    }
                }
            }
            writer.finish().await.map_err(|e| copy_error(table.name, e))?;
            imported.push((table.name, n));
        }
        let last_seq = match receive.recv().await {
            Some(Read::LastSeq(n)) => n,
            Some(Read::Failed(why)) => {
                return Err(StoreError::CannotOpen { location: from.display().to_string(), why });
            }
            _ => return Err(StoreError::Commit("the SQLite reader stopped".into())),
        };
        let _ = reader.join();
        // The sequences go on after what moved.
        let last: i64 = tx
            .query_one(
                "SELECT setval('cairn_ids', greatest($1, (SELECT max(id) FROM history), (SELECT max(seq) FROM changes), \
                                                     pg_sequence_last_value('cairn_ids')))",
                &[&last_seq],
            )
            .await
            .map_err(pg_error)?
            .get(0);
        tx.batch_execute(
            "\
             SELECT setval('runs_seq_seq', greatest(1, (SELECT max(seq) FROM runs)), (SELECT count(*) > 0 FROM runs)); \
             SELECT setval('signals_seq_seq', greatest(1, (SELECT max(seq) FROM signals)), \
                           (SELECT count(*) > 0 FROM signals))",
        )
        .await
        .map_err(pg_error)?;
        // Processes already on this database (a worker waiting for runs, a
        // `cairn serve` feeding browsers) read what moved at once, as they
        // read any commit, instead of at their next sweep or never: their
        // feeds see the moved changes only when a notification tells them.
        if last > 0 {
            let payload = super::listen::payload(&self.inner.owner, last as u64 + 1, true);
            tx.execute("SELECT pg_notify($1, $2)", &[&super::listen::CHANNEL, &payload]).await.map_err(pg_error)?;
        }
        tx.commit().await.map_err(pg_error)?;
        Ok(imported)
    }
}

fn copy_error(table: &str, e: tokio_postgres::Error) -> StoreError {
    match pg_error(e) {
        StoreError::Backend(why) => StoreError::Backend(format!("copying {table}: {why}")),
        other => other,
    }
}

/// Every table of the SQLite database, in one snapshot, in `TABLES` order.
fn read_sqlite(path: &Path, send: &mpsc::Sender<Read>) -> Result<(), String> {
    let conn = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| e.to_string())?;
    conn.execute_batch("BEGIN").map_err(|e| e.to_string())?;
    for table in TABLES {
        let mut statement = conn.prepare(table.select).map_err(|e| format!("reading {}: {e}", table.name))?;
        let width = table.columns.len();
        let mut rows = statement.query([]).map_err(|e| format!("reading {}: {e}", table.name))?;
        let mut batch = Vec::with_capacity(BATCH);
        while let Some(row) = rows.next().map_err(|e| format!("reading {}: {e}", table.name))? {
            let mut cells = Vec::with_capacity(width);
            for i in 0..width {
                use rusqlite::types::ValueRef;
                cells.push(match row.get_ref(i).map_err(|e| e.to_string())? {
                    ValueRef::Null => Cell::Null,
                    ValueRef::Integer(v) => Cell::Int(v),
                    ValueRef::Real(v) => Cell::Real(v),
                    ValueRef::Text(t) => Cell::Text(t.to_vec()),
                    ValueRef::Blob(b) => Cell::Blob(b.to_vec()),
                });
            }
            batch.push(cells);
            if batch.len() == BATCH && send.blocking_send(Read::Rows(std::mem::take(&mut batch))).is_err() {
                return Ok(());
            }
        }
        if !batch.is_empty() && send.blocking_send(Read::Rows(batch)).is_err() {
            return Ok(());
        }
        if send.blocking_send(Read::End).is_err() {
            return Ok(());
        }
    }
    let last_seq: i64 = conn
        .query_row(
            "SELECT max(coalesce((SELECT max(first_seq) FROM commits), 0), coalesce((SELECT max(id) FROM history), 0), \
             coalesce((SELECT max(seq) FROM changes), 0))",
            [],
            |r| r.get(0),
        )
        .map_err(|e| format!("reading the last change number: {e}"))?;
    let _ = send.blocking_send(Read::LastSeq(last_seq));
    conn.execute_batch("COMMIT").map_err(|e| e.to_string())
}
