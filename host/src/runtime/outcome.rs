//! How one instance ended, as one value: read from the host state and the
//! result of `_start` in one place ([`InstanceOutcome::of`]), then acted
//! on by the executor.

use wasmtime_wasi::I32Exit;

use super::engine::EPOCH_TICK;
use super::imports::{Ending, Fatal, Finished, HostState, LiveStep};
use super::journal::NonDeterminism;
use crate::model::{Entry, RunStatus};

#[derive(Debug)]
pub enum InstanceOutcome {
    /// The workflow reported its result; it is committed.
    Finished(Finished),
    /// A step attempt failed and is journaled: replay in a fresh instance.
    Restart,
    /// Waiting for longer than the park threshold: drop the instance, replay
    /// at `wake_at` (Unix ms) or when a signal comes.
    Parked { wake_at: Option<i64>, status: RunStatus, signal: Option<String> },
    /// The run was cancelled (nothing is committed yet).
    Cancelled,
    /// A branch instance recorded its attempt.
    BranchRecorded(Entry),
    /// The replay did not match the history; nothing was written.
    Diverged(NonDeterminism),
    /// A commit failed, or the module misused the interface.
    Fatal(Fatal),
    /// The guest trapped, panicked, exited or returned without a result.
    /// With `live`, inside that step's closure: a failed attempt.
    Trapped { message: String, live: Option<LiveStep> },
    /// The guest ran into a limit of an instance (CPU between durable
    /// points, memory, a step's timeout). With `live`, inside that step's
    /// closure: a failed attempt.
    LimitExceeded { message: String, live: Option<LiveStep> },
    /// A step's key-value writes conflicted with another run's; nothing of
    /// the attempt was committed.
    KvConflict,
    /// The run went past a limit of the whole run (history, payloads, run
    /// CPU, wall time, branches): the run fails, whatever step was running.
    RunLimitExceeded(String),
}

impl InstanceOutcome {
    /// Read how the instance ended. What the host recorded comes first (it
    /// knows why it stopped the guest); only then is the trap itself looked at.
    pub fn of(st: &mut HostState, result: wasmtime::Result<()>) -> Self {
        let live = st.take_live_step();
        match st.take_ending() {
            Some(Ending::Finished(f)) => InstanceOutcome::Finished(f),
            Some(Ending::Restart) => InstanceOutcome::Restart,
            Some(Ending::Park { wake_at, status, signal }) => InstanceOutcome::Parked { wake_at, status, signal },
            Some(Ending::Cancelled) => InstanceOutcome::Cancelled,
            Some(Ending::BranchRecorded(entry)) => InstanceOutcome::BranchRecorded(entry),
            Some(Ending::Fatal(Fatal::NonDeterminism(nd))) => InstanceOutcome::Diverged(nd),
            Some(Ending::Fatal(fatal)) => InstanceOutcome::Fatal(fatal),
            Some(Ending::RunLimit(message)) => InstanceOutcome::RunLimitExceeded(message),
            Some(Ending::KvConflict) => InstanceOutcome::KvConflict,
            Some(Ending::CpuExceeded) => {
                let ms = st.cpu_limit_ticks() * EPOCH_TICK.as_millis() as u64;
                let message = format!(
                    "CPU limit: the workflow ran {ms} ms without reaching a durable point (raise it with --max-cpu)"
                );
                InstanceOutcome::LimitExceeded { message, live }
            }
            Some(Ending::TimedOut) => {
                let timeout = live.as_ref().and_then(|l| l.policy.timeout).unwrap_or_default();
                InstanceOutcome::LimitExceeded { message: format!("timed out after {timeout:?}"), live }
            }
            None => match result {
                Ok(()) => InstanceOutcome::Trapped {
                    message: "the workflow returned from main without reporting a result \
                              (main must call cairn_sdk::run)"
                        .to_string(),
                    live,
                },
                Err(e) => {
                    if let Some(exit) = e.downcast_ref::<I32Exit>() {
                        let message = format!("the workflow exited with code {} before reporting a result", exit.0);
                        InstanceOutcome::Trapped { message, live }
                    } else if let Some(panic) = st.take_panic_message() {
                        InstanceOutcome::Trapped { message: panic, live }
                    } else if let Some(hit) = st.limiter().take_hit() {
                        InstanceOutcome::LimitExceeded { message: format!("{hit} (raise it with --max-memory)"), live }
                    } else {
                        InstanceOutcome::Trapped { message: format!("the workflow trapped: {e:#}"), live }
                    }
                }
            },
        }
    }
}
