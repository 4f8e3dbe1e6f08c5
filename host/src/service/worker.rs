//! `cairn worker`: execute pending and unfinished runs, many at once.
//!
//! The worker claims runs by taking their lease (so two workers, or a worker
//! and `cairn resume`, never execute the same run), and executes each on
//! its own task. At most `concurrency` instances are live at once; a run
//! that parks (a long timer or signal wait) gives its slot back and costs
//! only a task until it wakes. On SIGTERM or Ctrl-C the worker stops
//! claiming, lets live instances finish or park, then exits: everything a
//! run committed is in the database, and the leases go with the process.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;

use super::{Service, ServiceError};
use crate::model::RunKey;
use crate::runtime::imports::Fatal;
use crate::runtime::{ExecError, Executor, RunOutcome};
use crate::store::StoreError;
use crate::terminal::escape;

/// How often an idle worker looks for runs that no event announces: runs
/// left by a process that died, runs whose claim failed. New runs, signals
/// and cancels wake it at once (the change feed).
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// After a look that filled every free slot: soon again, once instances
/// have parked or finished and freed theirs.
const BUSY_INTERVAL: Duration = Duration::from_millis(5);
/// How long after another process's lease expires a worker with a free
/// slot looks: the database's clock has passed it by then.
const TAKEOVER_MARGIN: Duration = Duration::from_millis(2);
/// How often a worker with free slots asks when that is.
const TAKEOVER_LOOK: Duration = Duration::from_millis(100);
/// How long a stopping worker waits for live instances.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// `executor` must have an instance limit of `concurrency`
/// (`Executor::with_instance_limit`).
pub async fn run_worker(executor: Arc<Executor>, service: &Service, concurrency: usize) -> Result<(), ServiceError> {
    let slots = executor
        .instance_limit()
        .ok_or_else(|| ServiceError::Exec(ExecError::Module("the worker's executor has no instance limit".into())))?
        .clone();
    // Runs this process holds (an OS lock taken twice by the same process
    // would not refuse).
    let held: Arc<Mutex<HashSet<RunKey>>> = Arc::default();
    // Runs that could not execute (non-determinism, a bad module): not
    // claimed again by this worker.
    let mut skipped: HashSet<RunKey> = HashSet::new();
    let mut tasks: JoinSet<(RunKey, String, Result<RunOutcome, ExecError>)> = JoinSet::new();
    let mut stop = Box::pin(shutdown_signal());
    eprintln!("cairn worker: started (concurrency {concurrency})");

    // Set when the store can take no more commits (a failed fsync).
    let mut fatal: Option<ServiceError> = None;
    // Subscribed before the first look: no run created after it is missed.
    let mut wake = service.store().subscribe_control();
    // When another process's earliest lease expires (as last asked).
    let mut takeover: Option<(tokio::time::Instant, Option<tokio::time::Instant>)> = None;
    // Whether this turn of the loop looks for runs. A finished run frees a
    // slot but makes no other run claimable: after a look that left slots
    // free (nothing more was there), a run's end waits for an event, a
    // takeover or the sweep instead of asking the database again. (At the
    // tail of a burst, every finished run asked and found nothing: two
    // queries each, on a server that was busy with the last runs' steps.)
    let mut look = true;
    // Whether the last look took a run for every free slot (more may wait).
    let mut filled = false;
    // The next look comes no later than this, however many runs end before
    // it (a deadline from the last look, not a pause restarted at each end).
    let mut next_look = tokio::time::Instant::now();
    'claiming: loop {
        if look {
            // Claim while there are free slots.
            let free = slots.available_permits();
            let claimed = service
                .claim_next(free, &|run| {
                    skipped.contains(&run) || held.lock().unwrap_or_else(|p| p.into_inner()).contains(&run)
                })
                .await;
            // The database unreachable for a while (a PostgreSQL restart, a
            // network cut): look again later rather than stop.
            let claimed = match claimed {
                Ok(claimed) => claimed,
                Err(e) => {
                    eprintln!("cairn worker: cannot claim runs now: {}; trying again", escape(&e.to_string()));
                    tokio::select! {
                        _ = &mut stop => break 'claiming,
                        _ = tokio::time::sleep(SWEEP_INTERVAL) => {}
                    }
                    continue;
                }
            };
            // Every free slot taken (or none free): more may be waiting for one.
            filled = claimed.len() == free;
            let now = tokio::time::Instant::now();
            next_look = now + if filled { BUSY_INTERVAL } else { SWEEP_INTERVAL };
            // A takeover time that has come was looked at: ask for the next
            // one rather than look again and again until it is asked anyway.
            if takeover.is_some_and(|(_, at)| at.is_some_and(|at| at <= now)) {
                takeover = None;
            }
            for claimed in claimed {
                let run = claimed.run.key;
                held.lock().unwrap_or_else(|p| p.into_inner()).insert(run);
                let (executor, held) = (executor.clone(), held.clone());
                tasks.spawn(async move {
                    let mut result = executor.execute(&claimed.run).await;
                    match result {
                        // Given back until it is due: whoever claims it then
                        // continues it (perhaps this worker).
                        Ok(RunOutcome::Parked { wake_at, ref signal }) => {
                            let release = executor.store().release_parked(claimed.lease, wake_at, signal.as_deref());
                            if let Err(e) = release.await {
                                result = Err(e.into());
                            }
                        }
                        _ => drop(claimed.lease),
                    }
                    held.lock().unwrap_or_else(|p| p.into_inner()).remove(&run);
                    (run, claimed.run.id.clone(), result)
                });
            }
        }
        // Wait for a run to end, an event, the next look, or the stop signal;
        // with a slot free, no later than another process's lease expires
        // (a run whose holder died is taken over as soon as it may be).
        let mut until = next_look;
        if !filled {
            // Asked again at most every TAKEOVER_LOOK: a busy worker loops
            // here at every run's end.
            let now = tokio::time::Instant::now();
            if takeover.is_none_or(|(asked, _)| now >= asked + TAKEOVER_LOOK) {
                let expiry = service.store().next_takeover_in().await.ok().flatten();
                takeover = Some((now, expiry.map(|e| now + e + TAKEOVER_MARGIN)));
            }
            if let Some((_, Some(at))) = takeover {
                until = until.min(at);
            }
        }
        let pause = tokio::time::sleep_until(until);
        tokio::select! {
            _ = &mut stop => break 'claiming,
            _ = pause => look = true,
            event = wake.recv() => {
                if matches!(event, Err(crate::store::feed::FeedError::Closed)) {
                    break 'claiming;
                }
                // One look for a burst: what else is queued is taken now.
                while wake.try_recv() {}
                look = true;
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                // A run that did not finish (given back, or stopped by a
                // failed commit) may be claimable again at once.
                let finished = matches!(
                    &done,
                    Ok((_, _, Ok(RunOutcome::Completed(_) | RunOutcome::Failed(_) | RunOutcome::Cancelled)))
                );
                look = filled || !finished;
                match report(done) {
                    Reported::Fine => {}
                    Reported::LeaveAlone(run) => {
                        skipped.insert(run);
                    }
                    Reported::Stop(e) => {
                        fatal = Some(ServiceError::Store(e));
                        break 'claiming;
                    }
                }
            }
        }
    }
    if let Some(e) = fatal {
        // Nothing more can be committed: stop at once, leases go with the
        // process, and a restart recovers from what is durable.
        return Err(e);
    }

    eprintln!("cairn worker: stopping; waiting for live instances to finish or park");
    let all = u32::try_from(concurrency).unwrap_or(u32::MAX);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        loop {
            tokio::select! {
                // Every slot free: no instance is live; the rest are parked.
                permits = slots.acquire_many(all) => { drop(permits); break }
                Some(done) = tasks.join_next(), if !tasks.is_empty() => { report(done); }
            }
        }
    })
    .await;
    if drained.is_err() {
        eprintln!(
            "cairn worker: instances still live after {SHUTDOWN_GRACE:?}; their unfinished steps run again on resume"
        );
    }
    slots.close();
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    // Parked runs go to other workers at once, not when their leases expire.
    if let Err(e) = service.store().release_all().await {
        eprintln!("cairn worker: cannot give back leases ({e}); others take the runs over when they expire");
    }
    eprintln!("cairn worker: stopped");
    Ok(())
}

/// What the worker does after a run's task ended.
enum Reported {
    Fine,
    /// The run cannot execute (non-determinism, a bad module): not claimed
    /// again by this worker.
    LeaveAlone(RunKey),
    /// The store can take no more commits.
    Stop(StoreError),
}

/// Log how a run ended, and say what follows.
fn report(done: Result<(RunKey, String, Result<RunOutcome, ExecError>), tokio::task::JoinError>) -> Reported {
    let (run, id, result) = match done {
        Ok(d) => d,
        Err(e) if e.is_cancelled() => return Reported::Fine,
        Err(e) => {
            eprintln!("cairn worker: a run task failed: {e}");
            return Reported::Fine;
        }
    };
    match result {
        Ok(RunOutcome::Completed(_)) => eprintln!("cairn worker: run {id} completed"),
        Ok(RunOutcome::Failed(error)) => eprintln!("cairn worker: run {id} failed: {}", escape(&error)),
        Ok(RunOutcome::Cancelled) => eprintln!("cairn worker: run {id} cancelled"),
        Ok(RunOutcome::Parked { wake_at, signal }) => {
            let until = wake_at.map(crate::service::views::time);
            match (signal, until) {
                (Some(name), Some(until)) => eprintln!(
                    "cairn worker: run {id} waits for signal {} until {until}; given back until then",
                    escape(&name)
                ),
                (Some(name), None) => {
                    eprintln!("cairn worker: run {id} waits for signal {}; given back until then", escape(&name))
                }
                (None, until) => eprintln!(
                    "cairn worker: run {id} sleeps until {}; given back until then",
                    until.unwrap_or_default()
                ),
            }
        }
        Err(ExecError::ShuttingDown) => {}
        Err(ExecError::Fatal(Fatal::Store { error: e @ StoreError::Unsynced { .. }, .. }))
        | Err(ExecError::Store(e @ StoreError::Unsynced { .. })) => return Reported::Stop(e),
        // A commit or read that failed (the database restarting, a disk
        // full for a moment), or a lease another process took over: what
        // is committed stands, and the run is taken up again from it (by
        // whoever holds it then).
        Err(e @ (ExecError::Fatal(Fatal::Store { .. }) | ExecError::Store(_))) => {
            eprintln!(
                "cairn worker: run {id} stopped: {}; it is taken up again from its history",
                escape(&e.to_string())
            );
        }
        Err(e) => {
            eprintln!("cairn worker: run {id} cannot execute: {}; this worker leaves it alone", escape(&e.to_string()));
            return Reported::LeaveAlone(run);
        }
    }
    Reported::Fine
}

/// SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
