//! Durable timers: `ctx.sleep`, and `std::thread::sleep` in workflow code
//! (see `wasi::poll`). The wake-up time is committed before the wait, so a
//! run killed mid-sleep wakes at the original time after a resume.

use wasmtime::Caller;

use super::state::HostState;
use crate::model::{Entry, EntryKind, now_ms};
use crate::runtime::journal::Request;
use cairn_abi::CANCELLED;

/// `sleep(millis)`.
pub(super) async fn sleep(caller: &mut Caller<'_, HostState>, millis: i64) -> wasmtime::Result<i32> {
    caller.data_mut().durable()?;
    if caller.data().live_step.is_some() {
        return Err(caller.data_mut().abi_error("ctx.sleep inside a step"));
    }
    let wake_at = record_timer(caller, || now_ms().saturating_add(millis.max(0))).await?;
    // A cancellation with a grace period ends the sleep (ABI version 2).
    match caller.data_mut().wait_until(wake_at, true).await? {
        Some(_) => Ok(CANCELLED as i32),
        None => Ok(0),
    }
}

/// Record (or replay) a timer, then wait for it (`std::thread::sleep`:
/// nothing to tell the workflow through).
pub(super) async fn durable_timer(
    caller: &mut Caller<'_, HostState>,
    wake_at_if_live: impl FnOnce() -> i64,
) -> wasmtime::Result<()> {
    let wake_at = record_timer(caller, wake_at_if_live).await?;
    caller.data_mut().wait_until(wake_at, false).await.map(drop)
}

/// The wake-up time of the timer under the cursor (replay), or a new one
/// recorded and committed (live).
pub(super) async fn record_timer(
    caller: &mut Caller<'_, HostState>,
    wake_at_if_live: impl FnOnce() -> i64,
) -> wasmtime::Result<i64> {
    let st = caller.data_mut();
    let wake_at = match st.journal.replay_read(&st.run.run_id, &Request::Timer) {
        Err(nd) => return Err(st.diverged(nd)),
        Ok(Some(entry)) => match entry.time_value() {
            Some(t) => t,
            None => return Err(st.abi_error("a recorded timer is malformed")),
        },
        Ok(None) => {
            let wake_at = wake_at_if_live();
            st.record(Entry::event(EntryKind::Timer, "", 0, wake_at.to_le_bytes().to_vec()))?;
            st.commit(Vec::new()).await?;
            wake_at
        }
    };
    caller.data().sync_replaying();
    Ok(wake_at)
}
