//! Signals and cancels: one statement each, with its change row, and a
//! batch of nothing else sent in one go. A crowd of signals or cancels to
//! `cairn serve` makes such batches; item by item, each cost a round trip
//! while holding the gate that every other process's commits wait for.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use deadpool_postgres::ClientWrapper;
use futures_util::future::{MaybeDone, maybe_done};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::pg_error;
use super::writer::{Batch, Job, change};
use crate::model::{RunKey, now_ms};
use crate::store::{ChangeKind, StoreError, Write};

/// The cap, the signal and its change row: nothing goes in if the run's
/// undelivered signals reach the cap. Returns how many there were.
const SEND_SIGNAL: &str = "WITH pending AS (SELECT count(*) AS n FROM signals WHERE run = $1 AND consumed_at IS NULL),
     sent AS (INSERT INTO signals (run, name, payload, sent_at)
              SELECT $1, $2, $3, $4 FROM pending WHERE pending.n < $5 RETURNING run),
     changed AS (INSERT INTO changes (seq, run, kind, status, committed_us)
              SELECT $6, run, $7, NULL, $8 FROM sent)
SELECT n FROM pending";

/// The flag (the earliest stop holds: a stop at once, NULL, over any grace)
/// and its change row: no run, no change. Returns how many runs it flagged.
const REQUEST_CANCEL: &str = "WITH flagged AS (UPDATE runs SET cancel_grace_until = CASE
           WHEN NOT cancel_requested THEN $2::BIGINT
           WHEN cancel_grace_until IS NULL OR $2::BIGINT IS NULL THEN NULL
           ELSE least(cancel_grace_until, $2::BIGINT) END,
         cancel_requested = true WHERE seq = $1 RETURNING seq),
     changed AS (INSERT INTO changes (seq, run, kind, status, committed_us)
              SELECT $3, seq, $4, NULL, $5 FROM flagged)
SELECT count(*) FROM flagged";

/// A signal or a cancel, its change number taken.
pub(super) enum Item<'a> {
    Signal { run: RunKey, name: &'a str, payload: &'a [u8], sent_at: i64, max_pending: i64, change: Change },
    Cancel { run: RunKey, grace_until: Option<i64>, change: Change },
}

/// An item's change row: its number, kind and time.
pub(super) struct Change {
    seq: i64,
    kind: &'static str,
    ts_us: i64,
}

impl Change {
    fn take(batch: &mut Batch, run: RunKey, kind: ChangeKind) -> Self {
        Change { seq: change(batch, run, kind, None), kind: kind.as_str(), ts_us: batch.ts_us }
    }
}

impl<'a> Item<'a> {
    pub(super) fn signal(batch: &mut Batch, run: RunKey, name: &'a str, payload: &'a [u8], max_pending: u64) -> Self {
        let change = Change::take(batch, run, ChangeKind::Signal);
        let max_pending = i64::try_from(max_pending).unwrap_or(i64::MAX);
        Item::Signal { run, name, payload, sent_at: now_ms(), max_pending, change }
    }

    pub(super) fn cancel(batch: &mut Batch, run: RunKey, grace_until: Option<i64>) -> Self {
        Item::Cancel { run, grace_until, change: Change::take(batch, run, ChangeKind::Cancel) }
    }

    /// The write as an item, if it is one.
    fn of(write: &'a Write, batch: &mut Batch) -> Option<Self> {
        match write {
            Write::SendSignal { run, name, payload, max_pending } => {
                Some(Item::signal(batch, *run, name, payload, *max_pending))
            }
            Write::RequestCancel { run, grace_until } => Some(Item::cancel(batch, *run, *grace_until)),
            _ => None,
        }
    }

    fn sql(&self) -> &'static str {
        match self {
            Item::Signal { .. } => SEND_SIGNAL,
            Item::Cancel { .. } => REQUEST_CANCEL,
        }
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        match self {
            Item::Signal { run, name, payload, sent_at, max_pending, change: c } => {
                vec![&run.0, name, payload, sent_at, max_pending, &c.seq, &c.kind, &c.ts_us]
            }
            Item::Cancel { run, grace_until, change: c } => vec![&run.0, grace_until, &c.seq, &c.kind, &c.ts_us],
        }
    }

    /// What its statement's row says.
    fn outcome(&self, row: &Row) -> Result<(), StoreError> {
        let n: i64 = row.try_get(0).map_err(pg_error)?;
        match self {
            Item::Signal { max_pending, .. } if n >= *max_pending => Err(StoreError::SignalsFull(n as u64)),
            Item::Cancel { run, .. } if n == 0 => Err(StoreError::NoSuchRun(*run)),
            _ => Ok(()),
        }
    }

    /// This item alone.
    pub(super) async fn send(&self, tx: &ClientWrapper) -> Result<(), StoreError> {
        let statement = tx.prepare_cached(self.sql()).await.map_err(pg_error)?;
        let row = tx.query_one(&statement, &self.params()).await.map_err(pg_error)?;
        self.outcome(&row)
    }
}

/// The items of a batch whose every job is one signal or one cancel, their
/// change numbers taken in the batch's order; `None` (nothing taken) for
/// any other batch.
pub(super) fn items<'a>(jobs: &'a [Job], batch: &mut Batch) -> Option<Vec<Item<'a>>> {
    let alone = |job: &Job| matches!(&job.writes[..], [Write::SendSignal { .. } | Write::RequestCancel { .. }]);
    if !jobs.iter().all(alone) {
        return None;
    }
    jobs.iter().map(|job| Item::of(&job.writes[0], batch)).collect()
}

/// All the items in one round trip, run by the server in the batch's order
/// (a signal's cap counts the ones before it). An item that fails fails the
/// transaction: there are no savepoints, and the caller rolls back and goes
/// item by item.
pub(super) async fn send_all(tx: &ClientWrapper, items: &[Item<'_>]) -> Result<(), StoreError> {
    let signal = tx.prepare_cached(SEND_SIGNAL).await.map_err(pg_error)?;
    let cancel = tx.prepare_cached(REQUEST_CANCEL).await.map_err(pg_error)?;
    let params: Vec<_> = items.iter().map(Item::params).collect();
    let calls = items.iter().zip(&params).map(|(item, params)| {
        let statement = match item {
            Item::Signal { .. } => &signal,
            Item::Cancel { .. } => &cancel,
        };
        tx.query_one(statement, params)
    });
    let rows = in_order(calls).await;
    debug_assert_eq!(rows.len(), items.len(), "one answer per item");
    for (item, row) in items.iter().zip(rows) {
        item.outcome(&row.map_err(pg_error)?)?;
    }
    Ok(())
}

/// Awaits the futures together, polling them in the order given, first
/// polls included: a query sends its statement at its first poll, so the
/// statements go out in this order. (`join_all` promises no order, and
/// above 30 futures it polls them through another structure.)
async fn in_order<F: Future>(calls: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut calls: Vec<Pin<Box<MaybeDone<F>>>> = calls.map(|call| Box::pin(maybe_done(call))).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for call in &mut calls {
            done &= call.as_mut().poll(cx).is_ready();
        }
        if done { Poll::Ready(()) } else { Poll::Pending }
    })
    .await;
    calls.iter_mut().filter_map(|call| call.as_mut().take_output()).collect()
}
