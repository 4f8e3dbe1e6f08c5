//! `cairn worker`: execute pending and unfinished runs, many at once.
//!
//! The worker claims runs by taking their lock (so two workers, or a worker
//! and `cairn resume`, never execute the same run), and executes each on
//! its own task. At most `concurrency` instances are live at once; a run
//! that parks (a long timer or signal wait) gives its slot back and costs
//! only a task until it wakes. On SIGTERM or Ctrl-C the worker stops
//! claiming, lets live instances finish or park, then exits: everything a
//! run committed is in the database, and the locks go with the process.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;

use crate::executor::{ExecError, Executor, RunOutcome};
use crate::store::Store;

/// How often an idle worker looks for new runs.
const CLAIM_INTERVAL: Duration = Duration::from_millis(100);
/// How long a stopping worker waits for live instances.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

pub async fn run_worker(executor: Arc<Executor>, store: Arc<dyn Store>, concurrency: usize) -> anyhow::Result<()> {
    let executor = Arc::new(
        Arc::try_unwrap(executor)
            .map_err(|_| anyhow::anyhow!("the executor is shared"))?
            .with_instance_limit(concurrency),
    );
    let slots = executor.instance_limit().expect("set above").clone();
    // Runs this process holds (an OFD lock taken twice by the same process
    // would not refuse).
    let held: Arc<Mutex<HashSet<i64>>> = Arc::default();
    // Runs that could not execute (non-determinism, a bad module): not
    // claimed again by this worker.
    let mut skipped: HashSet<i64> = HashSet::new();
    let mut tasks: JoinSet<(i64, String, Result<RunOutcome, ExecError>)> = JoinSet::new();
    let mut stop = Box::pin(shutdown_signal());
    eprintln!("cairn worker: started (concurrency {concurrency})");

    'claiming: loop {
        // Claim while there are free slots.
        let free = slots.available_permits();
        let mut claimed = 0;
        if free > 0 {
            for run in store.unfinished_runs()? {
                if claimed >= free {
                    break;
                }
                if skipped.contains(&run.seq) || held.lock().unwrap().contains(&run.seq) {
                    continue;
                }
                let Some(lock) = store.lock_run(run.seq)? else {
                    continue;
                };
                // Re-read under the lock: its previous holder may have finished it.
                let Some(run) = store.run(&run.id)?.filter(|r| !r.status.is_finished()) else {
                    continue;
                };
                held.lock().unwrap().insert(run.seq);
                claimed += 1;
                let (executor, held) = (executor.clone(), held.clone());
                tasks.spawn(async move {
                    let result = executor.execute(&run).await;
                    held.lock().unwrap().remove(&run.seq);
                    drop(lock);
                    (run.seq, run.id, result)
                });
            }
        }
        // Wait for a run to end, the next look, or the stop signal.
        let pause = tokio::time::sleep(CLAIM_INTERVAL);
        tokio::select! {
            _ = &mut stop => break 'claiming,
            _ = pause => {}
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Some(seq) = report(done) {
                    skipped.insert(seq);
                }
            }
        }
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
    eprintln!("cairn worker: stopped");
    Ok(())
}

/// Log how a run ended; returns its seq if it must not be claimed again.
fn report(done: Result<(i64, String, Result<RunOutcome, ExecError>), tokio::task::JoinError>) -> Option<i64> {
    let (seq, id, result) = match done {
        Ok(d) => d,
        Err(e) if e.is_cancelled() => return None,
        Err(e) => {
            eprintln!("cairn worker: a run task failed: {e}");
            return None;
        }
    };
    match result {
        Ok(RunOutcome::Completed(_)) => eprintln!("cairn worker: run {id} completed"),
        Ok(RunOutcome::Failed(error)) => eprintln!("cairn worker: run {id} failed: {error}"),
        Ok(RunOutcome::Cancelled) => eprintln!("cairn worker: run {id} cancelled"),
        Err(ExecError::ShuttingDown) => {}
        Err(e) => {
            eprintln!("cairn worker: run {id} cannot execute: {e}; this worker leaves it alone");
            return Some(seq);
        }
    }
    None
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
