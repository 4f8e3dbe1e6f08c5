//! The gate: what orders commits and fences takeovers across processes.
//!
//! Every transaction that hands out change numbers or takes a run takes
//! one transaction-scoped advisory lock first ([`LOCK`]). So transactions
//! that write changes commit one after the other, in the order of their
//! numbers, and a take waits for every commit in flight: a writer either
//! commits before a take (and the new holder reads what it wrote) or sees
//! the take's new epoch and is refused.
//!
//! Under the lock two sequences are read: `cairn_ids`, the last change
//! number handed out, and `cairn_gen`, the gate generation, which every
//! take of a run that was held before moves on. A writer that finds the
//! generation where it was when it last saw its runs' epochs knows that no
//! run changed hands since (`Held::checked_at`), and needs no fence check.
//! A run's first take (from epoch 0 to 1: created without a lease, never
//! held) leaves the generation alone: no process can hold that run or have
//! a write for it in flight, and every other run's epoch stays as it was.
//! So a crowd of new runs claimed by several workers sends none of them
//! down the fenced path. Sequences, not a row,
//! because a statement reads a sequence's value of now, while it reads a
//! row as of its snapshot, taken before it waited for the lock; and because
//! moving a sequence leaves no dead row version behind (a counter row
//! updated at every step bloats while a long transaction holds back vacuum,
//! and every statement had to lock and rewrite it).

use std::time::{Duration, Instant};

use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::{Inner, pg_error, pool_error};

/// The advisory lock's key (next to `schema`'s migration lock, 1129465393).
/// A macro, so that SQL text built with `concat!` stays `&'static str`.
macro_rules! gate_key {
    () => {
        "1129465394"
    };
}
pub(super) use gate_key;

/// The gate, for the transaction: a statement of its own, so that the
/// transaction's later statements see every take committed before it.
pub(super) const LOCK: &str = concat!("SELECT pg_advisory_xact_lock(", gate_key!(), ")");

/// A CTE (`gate`) that takes the lock for a one-statement transaction: a
/// query over it runs once the lock is held (`WHERE gate.locked IS NOT
/// NULL` ties its conditions to the lock's row), and reads the sequences
/// then.
macro_rules! gate_cte {
    () => {
        concat!(
            "gate AS MATERIALIZED (SELECT pg_advisory_xact_lock(",
            $crate::store::postgres::gate::gate_key!(),
            ")::TEXT AS locked)"
        )
    };
}
pub(super) use gate_cte;

/// The last change number committed: under the lock, so that no commit is
/// in flight with a number below what it returns.
pub(super) const LAST_COMMITTED: &str = concat!(
    "WITH ",
    gate_cte!(),
    " SELECT coalesce(pg_sequence_last_value('cairn_ids'), 0) FROM gate WHERE gate.locked IS NOT NULL"
);

/// A take moves the generation on (under the lock, once it took a run
/// that was held before: see [`generation_after_take`]).
pub(super) const NEXT_GENERATION: &str = "SELECT nextval('cairn_gen')";

/// The generation as it stands (under the lock).
const GENERATION: &str = "SELECT pg_sequence_last_value('cairn_gen')";

/// The generation a take's leases are checked at, read under the lock the
/// take holds: moved on if any run taken was held before (its new epoch
/// above 1), else as it stands.
pub(super) async fn generation_after_take(
    tx: &tokio_postgres::Transaction<'_>,
    epochs: impl IntoIterator<Item = i64>,
) -> Result<i64, tokio_postgres::Error> {
    let moved = epochs.into_iter().any(|epoch| epoch > 1);
    let sql = if moved { NEXT_GENERATION } else { GENERATION };
    Ok(tx.query_one(sql, &[]).await?.get(0))
}

/// `sql` read in a transaction of its own once the gate is held. What
/// settles a commit whose answer was lost: the lost connection's statement
/// may still run on the server (it finds out about the lost client only
/// when it answers), and then it holds the gate; this read sees what it
/// did once it ended.
pub(super) async fn read_under_gate(
    client: &mut deadpool_postgres::Object,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute(LOCK, &[]).await?;
    let rows = tx.query(sql, params).await?;
    tx.commit().await?;
    Ok(rows)
}

/// [`read_under_gate`] on new connections until the database answers, for
/// up to a lease's length (a server restarting comes back meanwhile);
/// `None` if it never did.
pub(super) async fn read_when_settled(inner: &Inner, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Option<Vec<Row>> {
    let deadline = Instant::now() + inner.lease;
    let mut pause = Duration::from_millis(50);
    loop {
        let read = match inner.pool.get().await {
            Ok(mut client) => read_under_gate(&mut client, sql, params).await.map_err(pg_error),
            Err(e) => Err(pool_error(e)),
        };
        match read {
            Ok(rows) => return Some(rows),
            Err(e) => eprintln!("cairn: a commit's outcome is not known yet: {e}"),
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_migration_takes_the_same_lock() {
        let sql = super::super::schema::MIGRATIONS.last().unwrap();
        assert!(sql.contains(concat!("pg_advisory_xact_lock(", gate_key!(), ")")));
    }
}
