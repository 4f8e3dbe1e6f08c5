//! Leases as rows: `runs.owner`, `runs.epoch` (one more at every take) and
//! `runs.lease_until` (the database's clock). A heartbeat renews this
//! process's leases every third of their length; a dropped lease is
//! released at once (a task), so another process takes it over without
//! waiting for it to expire. Every write of a held run checks its epoch in
//! the writing transaction (`writer`): a process that lost its lease (paused,
//! cut off) can never commit for that run again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::{Held, Inner, RUN_COLUMNS, UNFINISHED, gate, pg_error, pool_error, run_from_row};
use crate::model::{RunKey, RunRecord, now_ms};
use crate::store::{Lease, StoreError};

// A take holds the gate (`gate`) from before it reads the runs' rows to
// its commit, and moves the generation on once it took one that was held
// before (`gate::generation_after_take`): a writer
// either commits first, and the new holder reads what it wrote, or sees
// the new epoch (or the new generation) and is refused.

/// Nobody holds the run: no owner, or a lease that expired.
const FREE: &str = "(owner IS NULL OR lease_until IS NULL OR lease_until < now())";

/// `--lease` when not given.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(5);

/// Take the run's lease if it is free or expired: `None` if another holder has it.
pub(super) async fn take(inner: &Arc<Inner>, run: RunKey) -> Result<Option<Lease>, StoreError> {
    let mut client = inner.pool.get().await.map_err(pool_error)?;
    let ms = inner.lease.as_millis() as i64;
    let tx = client.transaction().await.map_err(pg_error)?;
    tx.execute(gate::LOCK, &[]).await.map_err(pg_error)?;
    let row = tx
        .query_opt(
            &format!(
                "UPDATE runs SET owner = $2, epoch = epoch + 1, wake_at = NULL, waiting_for = NULL, \
                   lease_until = now() + $3::BIGINT * interval '1 millisecond' \
                 WHERE seq = $1 AND {FREE} RETURNING epoch"
            ),
            &[&run.0, &inner.owner, &ms],
        )
        .await
        .map_err(pg_error)?;
    // Nothing taken: the generation stays where it was (no epoch moved).
    let Some(row) = row else {
        tx.rollback().await.map_err(pg_error)?;
        return Ok(None);
    };
    let epoch: i64 = row.get(0);
    let generation = gate::generation_after_take(&tx, [epoch]).await.map_err(pg_error)?;
    tx.commit().await.map_err(pg_error)?;
    Ok(Some(held(inner, run, epoch as u64, Some(generation))))
}

/// Up to `max` unfinished runs nobody holds, except those `skip` names,
/// each with its lease: first runs given back while they slept or waited
/// that are due (by the wake-up index) or signalled, then the others,
/// oldest first. Candidates
/// are read a page at a time, and taken with `FOR NO KEY UPDATE SKIP
/// LOCKED`, so that workers claiming at once pass over each other's rows
/// instead of queueing behind them.
pub(super) async fn claim(
    inner: &Arc<Inner>,
    max: usize,
    skip: &(dyn Fn(RunKey) -> bool + Send + Sync),
) -> Result<Vec<(RunRecord, Lease)>, StoreError> {
    let mut client = inner.pool.get().await.map_err(pool_error)?;
    // Due by the wake-up index, or signalled: a pending signal of the name
    // a given-back run waits for (by the index of pending signals).
    let due = client
        .prepare_cached(&format!(
            "(SELECT seq FROM runs WHERE wake_at <= $1 AND {UNFINISHED} AND {FREE} ORDER BY wake_at LIMIT $2) \
             UNION \
             (SELECT runs.seq FROM signals s JOIN runs ON runs.seq = s.run AND runs.waiting_for = s.name \
               WHERE s.consumed_at IS NULL AND wake_at IS NOT NULL AND {UNFINISHED} AND {FREE} LIMIT $2)"
        ))
        .await
        .map_err(pg_error)?;
    let candidates = client
        .prepare_cached(&format!(
            "SELECT seq FROM runs WHERE wake_at IS NULL AND {UNFINISHED} AND {FREE} AND seq > $1 ORDER BY seq LIMIT $2"
        ))
        .await
        .map_err(pg_error)?;
    let page = (max * 2).clamp(64, 4096) as i64;
    let now = now_ms();
    let mut claimed = Vec::new();
    let keys: Vec<i64> = client.query(&due, &[&now, &page]).await.map_err(pg_error)?.iter().map(|r| r.get(0)).collect();
    take_keys(inner, &mut client, keys, max, skip, now, &mut claimed).await?;
    let mut after = 0i64;
    while claimed.len() < max {
        let keys: Vec<i64> =
            client.query(&candidates, &[&after, &page]).await.map_err(pg_error)?.iter().map(|r| r.get(0)).collect();
        let Some(&last) = keys.last() else { break };
        after = last;
        take_keys(inner, &mut client, keys, max, skip, now, &mut claimed).await?;
    }
    Ok(claimed)
}

/// Take those of `keys` that are still free (and due), up to `max` claimed in all.
async fn take_keys(
    inner: &Arc<Inner>,
    client: &mut deadpool_postgres::Object,
    keys: Vec<i64>,
    max: usize,
    skip: &(dyn Fn(RunKey) -> bool + Send + Sync),
    now: i64,
    claimed: &mut Vec<(RunRecord, Lease)>,
) -> Result<(), StoreError> {
    let wanted: Vec<i64> = keys.into_iter().filter(|&k| !skip(RunKey(k))).collect();
    if wanted.is_empty() || claimed.len() >= max {
        return Ok(());
    }
    let take = client
        .prepare_cached(&format!(
            "UPDATE runs SET owner = $3, epoch = epoch + 1, wake_at = NULL, waiting_for = NULL, \
               lease_until = now() + $4::BIGINT * interval '1 millisecond' \
             WHERE seq IN (SELECT seq FROM runs WHERE seq = ANY($1) AND {UNFINISHED} AND {FREE} \
                             AND (wake_at IS NULL OR wake_at <= $5 OR EXISTS (SELECT 1 FROM signals s \
                                  WHERE s.run = runs.seq AND s.name = runs.waiting_for AND s.consumed_at IS NULL)) \
                           ORDER BY seq LIMIT $2 FOR NO KEY UPDATE SKIP LOCKED) \
             RETURNING {RUN_COLUMNS}, epoch"
        ))
        .await
        .map_err(pg_error)?;
    let ms = inner.lease.as_millis() as i64;
    let want = (max - claimed.len()) as i64;
    let tx = client.transaction().await.map_err(pg_error)?;
    tx.execute(gate::LOCK, &[]).await.map_err(pg_error)?;
    let rows = tx.query(&take, &[&wanted, &want, &inner.owner, &ms, &now]).await.map_err(pg_error)?;
    // Nothing taken (others were first): the generation stays where it was.
    if rows.is_empty() {
        return tx.rollback().await.map_err(pg_error);
    }
    let epochs = rows.iter().map(|row| row.get::<_, i64>(15));
    let generation = gate::generation_after_take(&tx, epochs).await.map_err(pg_error)?;
    tx.commit().await.map_err(pg_error)?;
    for row in rows {
        let epoch = row.get::<_, i64>(15) as u64;
        match run_from_row(&row) {
            Ok(run) => {
                let lease = held(inner, run.key, epoch, Some(generation));
                claimed.push((run, lease));
            }
            // Its lease goes back at once (dropped).
            Err(why) => {
                eprintln!("cairn: skipping {why}");
                drop(held(inner, RunKey(row.get(0)), epoch, None));
            }
        }
    }
    Ok(())
}

/// Give back the lease of a run that sleeps until `wake_at`, or waits for
/// `signal` (see `RunStore::release_parked`): one update, while the lease
/// still holds, so that no claim finds the run free before its wake-up
/// time is set. A wait without a deadline is due at the end of time: it
/// stays out of the runs to claim now, and comes back by its signal.
pub(super) async fn release_parked(
    inner: &Arc<Inner>,
    lease: Lease,
    wake_at: Option<i64>,
    signal: Option<&str>,
) -> Result<(), StoreError> {
    let client = inner.pool.get().await.map_err(pool_error)?;
    let (run, epoch) = (lease.run(), lease.epoch() as i64);
    let wake_at = wake_at.unwrap_or(i64::MAX);
    let n = client
        .execute(
            "UPDATE runs SET owner = NULL, lease_until = NULL, wake_at = $4, waiting_for = $5 \
             WHERE seq = $1 AND owner = $2 AND epoch = $3 AND status IN ('sleeping', 'waiting')",
            &[&run.0, &inner.owner, &epoch, &wake_at, &signal],
        )
        .await
        .map_err(pg_error)?;
    if n == 1
        && let Some(h) = inner.held.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&run)
        && h.epoch == lease.epoch()
    {
        // Given back: its own release would find nothing to do.
        h.released = true;
    }
    drop(lease);
    if n == 0 {
        return Err(StoreError::Commit(format!(
            "run #{} was not given back: it is not held at epoch {epoch} or does not wait",
            run.0
        )));
    }
    Ok(())
}

/// A lease this process now holds (taken, or created with its run), and
/// the gate generation its take committed at, if known.
pub(super) fn held(inner: &Arc<Inner>, run: RunKey, epoch: u64, checked_at: Option<i64>) -> Lease {
    inner.held.lock().unwrap_or_else(|p| p.into_inner()).insert(run, Held { epoch, checked_at, released: false });
    Lease::new(run, epoch, Box::new(Release { inner: Arc::downgrade(inner), run, epoch }))
}

/// Releases the lease when dropped.
struct Release {
    inner: Weak<Inner>,
    run: RunKey,
    epoch: u64,
}

impl Drop for Release {
    fn drop(&mut self) {
        let Some(inner) = self.inner.upgrade() else { return };
        {
            let mut held = inner.held.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(h) = held.get(&self.run).filter(|h| h.epoch == self.epoch).copied() {
                held.remove(&self.run);
                if h.released {
                    return;
                }
            }
        }
        let (run, epoch) = (self.run, self.epoch as i64);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            RELEASING.fetch_add(1, Ordering::SeqCst);
            handle.spawn(async move {
                if let Ok(client) = inner.pool.get().await {
                    let _ = client
                        .execute(
                            "UPDATE runs SET owner = NULL, lease_until = NULL WHERE seq = $1 AND owner = $2 AND epoch = $3",
                            &[&run.0, &inner.owner, &epoch],
                        )
                        .await;
                }
                RELEASING.fetch_sub(1, Ordering::SeqCst);
            });
        }
    }
}

/// Releases on their way (tasks spawned by dropped leases).
static RELEASING: AtomicUsize = AtomicUsize::new(0);

/// Wait, for up to `limit`, until the leases this process dropped are given
/// back: a command about to exit calls it, so that a run it leaves
/// unfinished (a non-determinism stop, a failure to commit) can be resumed
/// at once, not only when the lease expires.
pub async fn settle_releases(limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while RELEASING.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Renew this process's leases every third of their length while the store lives.
pub(super) fn start_heartbeat(inner: &Arc<Inner>) {
    let weak = Arc::downgrade(inner);
    let every = inner.lease / 3;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(inner) = weak.upgrade() else { return };
            let runs: Vec<i64> = inner.held.lock().unwrap_or_else(|p| p.into_inner()).keys().map(|k| k.0).collect();
            if runs.is_empty() {
                continue;
            }
            let ms = inner.lease.as_millis() as i64;
            match inner.pool.get().await {
                Ok(client) => {
                    if let Err(e) = client
                        .execute(
                            // Rows locked in key order, as writers lock them.
                            "UPDATE runs SET lease_until = now() + $2::BIGINT * interval '1 millisecond' \
                             WHERE seq IN (SELECT seq FROM runs WHERE seq = ANY($1) AND owner = $3 \
                                           ORDER BY seq FOR NO KEY UPDATE)",
                            &[&runs, &ms, &inner.owner],
                        )
                        .await
                    {
                        eprintln!("cairn: cannot renew leases: {e}");
                    }
                }
                Err(e) => eprintln!("cairn: cannot renew leases: {e}"),
            }
        }
    });
}
