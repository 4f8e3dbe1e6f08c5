//! Branch instances: each attempt of a branch replays the parent's history
//! up to the branch's spawn in a fresh instance, runs the closure there,
//! and records the attempt (see `runtime::branch` for the idea).

use std::sync::Arc;
use std::time::Duration;

use wasmtime::Module;

use super::{ExecError, Executor, record_failed_attempt};
use crate::model::{Entry, EntryStatus, RunRecord, now_ms};
use crate::runtime::branch::{BranchBoard, BranchKey, BranchLaunch, BranchMode, Branches, Launcher};
use crate::runtime::outcome::InstanceOutcome;
use crate::runtime::watch::RunWatch;

impl Executor {
    /// The branch side of one execution of a run.
    pub(super) fn branches_of(
        self: &Arc<Self>,
        run: &Arc<RunRecord>,
        module: &Module,
        board: Arc<BranchBoard>,
        watch: Arc<RunWatch>,
    ) -> Arc<Branches> {
        let launcher = Arc::new(BranchLauncher {
            executor: self.clone(),
            run: run.clone(),
            module: module.clone(),
            board: board.clone(),
            watch,
        });
        Arc::new(Branches { board, launcher })
    }

    /// Attempts of one branch until it has an outcome: each in a fresh
    /// instance, after the recorded backoff of the previous one.
    async fn run_branch(
        &self,
        run: &RunRecord,
        module: &Module,
        board: &BranchBoard,
        watch: &Arc<RunWatch>,
        launch: &BranchLaunch,
    ) {
        let key = &launch.key;
        loop {
            let (attempt, not_before) = board.next_attempt(key);
            // A branch's attempts are history too (in their own table): a
            // policy of endless attempts meets the run's history limit.
            if u64::from(attempt) > run.config.limits.max_history {
                let message = format!(
                    "limit `--max-history` exceeded: branch \"{}\" #{} made {} attempts",
                    key.0,
                    key.1,
                    attempt - 1
                );
                board.give_up(key, message);
                return;
            }
            if let Some(at) = not_before {
                let wait = Duration::from_millis(at.saturating_sub(now_ms()).max(0) as u64);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = watch.changed() => {}
                }
            }
            if watch.cancel_requested() {
                board.give_up(key, "cancelled".into());
                return;
            }
            // The run's share first, then a slot of all runs' branches.
            let Some(_share) = watch.branch_slot().await else { return };
            let Ok(_slot) = self.branch_instances.acquire().await else { return };
            let result = self.branch_instance(run, module, watch.clone(), launch, attempt).await;
            drop((_slot, _share));
            match result {
                // Its key-value writes conflicted: the same attempt again.
                Ok(None) => tokio::time::sleep(super::conflict_backoff()).await,
                Ok(Some(entry)) => {
                    let again = entry.status == EntryStatus::Failed;
                    board.record(entry);
                    if !again {
                        return;
                    }
                }
                Err(e) => {
                    board.give_up(key, format!("branch \"{}\" #{}: {e}", key.0, key.1));
                    return;
                }
            }
        }
    }

    /// One attempt of a branch: replay the parent's history up to the
    /// branch's spawn, run its closure, record the attempt.
    async fn branch_instance(
        &self,
        run: &RunRecord,
        module: &Module,
        watch: Arc<RunWatch>,
        launch: &BranchLaunch,
        attempt: u32,
    ) -> Result<Option<Entry>, ExecError> {
        let mode = BranchMode { key: launch.key.clone(), attempt };
        let mut wstore = self.new_store(run, launch.history.clone(), watch, launch.branches.clone(), Some(mode))?;
        let result = self.call_start(&mut wstore, module, run).await?;
        let st = wstore.data_mut();
        match InstanceOutcome::of(st, result) {
            InstanceOutcome::BranchRecorded(entry) => Ok(Some(entry)),
            InstanceOutcome::KvConflict => Ok(None),
            InstanceOutcome::Diverged(nd) => Err(crate::runtime::imports::Fatal::NonDeterminism(nd).into()),
            InstanceOutcome::Fatal(fatal) => Err(fatal.into()),
            InstanceOutcome::Cancelled => Err(ExecError::Module("cancelled".into())),
            InstanceOutcome::RunLimitExceeded(message) => Err(ExecError::Module(message)),
            InstanceOutcome::Trapped { message, live: Some(live) }
            | InstanceOutcome::LimitExceeded { message, live: Some(live) } => {
                Ok(Some(record_failed_attempt(st, "branch", live, message).await?))
            }
            _ => Err(ExecError::Module("the branch instance ended before reaching its spawn".into())),
        }
    }
}

/// Starts a run's branches as tasks of this process.
struct BranchLauncher {
    executor: Arc<Executor>,
    run: Arc<RunRecord>,
    module: Module,
    board: Arc<BranchBoard>,
    watch: Arc<RunWatch>,
}

impl Launcher for BranchLauncher {
    fn launch(&self, launch: BranchLaunch) {
        let executor = self.executor.clone();
        let (run, module, board, watch) =
            (self.run.clone(), self.module.clone(), self.board.clone(), self.watch.clone());
        tokio::spawn(async move {
            // Released even if the task panics: a run waits for its
            // running branches before it finishes.
            struct Release(Arc<BranchBoard>, BranchKey);
            impl Drop for Release {
                fn drop(&mut self) {
                    if self.0.outcome(&self.1).is_none() {
                        // In memory only: the branch runs again on resume.
                        self.0.give_up(&self.1, format!("branch {:?} stopped unexpectedly", self.1));
                    }
                    self.0.release(&self.1);
                }
            }
            let _release = Release(board.clone(), launch.key.clone());
            executor.run_branch(&run, &module, &board, &watch, &launch).await;
        });
    }
}
