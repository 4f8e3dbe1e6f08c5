//! Durable steps: `step_begin` answers a recorded outcome or lets the
//! closure run live; `step_end` records and commits the attempt's outcome
//! before the workflow moves on.

use wasmtime::Caller;

use super::memory::{guest_bytes, guest_payload, guest_str};
use super::state::{Ending, HostState, LiveStep};
use crate::model::{Entry, EntryKind, EntryStatus, now_ms};
use crate::runtime::journal::StepStart;
use cairn_abi::{CANCELLED, RetryPolicy, STEP_MEMOIZED_ERR, STEP_MEMOIZED_OK, STEP_RUN};

pub(super) async fn step_begin(
    caller: &mut Caller<'_, HostState>,
    ptr: i32,
    len: i32,
    policy_ptr: i32,
    policy_len: i32,
) -> wasmtime::Result<i64> {
    caller.data_mut().durable()?;
    let name = guest_str(caller, ptr, len)?;
    let st = caller.data_mut();
    if let Some(live) = &st.live_step {
        let what = format!("step \"{name}\" began inside step \"{}\"; steps cannot nest", live.name);
        return Err(st.abi_error(what));
    }
    let (occurrence, attempt, not_before) = match st.journal.begin_step(&st.run.run_id, &name) {
        Err(nd) => return Err(st.diverged(nd)),
        Ok(StepStart::Memoized(entry)) => {
            let (code, bytes) = match entry.status {
                EntryStatus::Error => (STEP_MEMOIZED_ERR, entry.error.clone().unwrap_or_default().into_bytes()),
                _ => (STEP_MEMOIZED_OK, entry.output.clone()),
            };
            st.staged = bytes;
            st.sync_replaying();
            return Ok((code << 32) | st.staged.len() as i64);
        }
        Ok(StepStart::Live { occurrence, attempt, not_before }) => (occurrence, attempt, not_before),
    };
    st.sync_replaying();
    // The policy is read only for a live step: replay stays cheap.
    let policy_bytes = guest_bytes(caller, policy_ptr, policy_len)?;
    let policy = match RetryPolicy::decode(&policy_bytes) {
        Ok(p) => p,
        Err(e) => return Err(caller.data_mut().abi_error(format!("step \"{name}\": {e}"))),
    };
    let st = caller.data_mut();
    // Room for the attempt's entry (its output may be as large as a payload):
    // a step loop, or a step retried without end, meets the history limits.
    let room = 64usize.saturating_add(name.len()).saturating_add(st.limits.max_payload_bytes());
    st.check_history_room(room)?;
    // A failed attempt's backoff (journaled as an absolute time). A
    // cancellation with a grace period is delivered here instead of
    // running the step (during the backoff, or now).
    let delivered = match not_before {
        Some(at) => st.wait_until(at, true).await?,
        None => st.deliver_cancel().await?,
    };
    if let Some(message) = delivered {
        st.staged = message.into_bytes();
        return Ok((CANCELLED << 32) | st.staged.len() as i64);
    }
    // Whatever the workflow read since the last commit may be used by the
    // closure for a live side effect: make it durable first. (Writes that
    // no side effect depends on, such as the run's `running` status, wait
    // for the step's own commit.)
    if st.journal.has_unsubmitted() {
        st.commit(Vec::new()).await?;
    }
    let staged = caller.data_mut().start_live(name, occurrence, attempt, policy);
    Ok(((attempt as i64) << 40) | (STEP_RUN << 32) | staged)
}

pub(super) async fn step_end(
    caller: &mut Caller<'_, HostState>,
    status: i32,
    ptr: i32,
    len: i32,
) -> wasmtime::Result<i32> {
    caller.data_mut().durable()?;
    let bytes = guest_payload(caller, ptr, len, "a step's output")?;
    let st = caller.data_mut();
    let Some(live) = st.live_step.take() else {
        return Err(st.abi_error("step_end without a live step_begin"));
    };
    let (entry, retry) = match status {
        0 => {
            let entry = Entry {
                kind: EntryKind::Step,
                name: live.name,
                occurrence: live.occurrence,
                attempt: live.attempt,
                status: EntryStatus::Completed,
                output: bytes,
                error: None,
                started_at: live.started_at,
                finished_at: now_ms(),
            };
            (entry, false)
        }
        1 | 2 => failed_attempt(live, String::from_utf8_lossy(&bytes).into_owned(), status == 1),
        other => return Err(st.abi_error(format!("step_end status {other} is not 0, 1 or 2"))),
    };
    if st.branch_mode.is_some() {
        // A branch instance exists for this one attempt: its work is done.
        st.record_attempt(entry.clone()).await?;
        return Err(caller.data_mut().stop(Ending::BranchRecorded(entry)));
    }
    st.record_attempt(entry).await?;
    let st = caller.data_mut();
    if retry {
        // The closure was FnOnce: the next attempt needs a fresh instance
        // that replays up to this step.
        return Err(st.stop(Ending::Restart));
    }
    Ok(0)
}

/// How a live step's attempt failed: a `failed` entry with its retry time
/// if the policy allows another attempt (then true), else the step's final
/// `error` outcome. The one place an attempt's failure becomes an entry,
/// whether the closure returned `Err`, panicked, trapped or hit a limit.
pub fn failed_attempt(live: LiveStep, message: String, retryable: bool) -> (Entry, bool) {
    let now = now_ms();
    let retry = retryable && live.attempt < live.policy.max_attempts;
    let (status, output) = if retry {
        crate::telemetry::get().retries.increment(1);
        let mut unit = [0u8; 8];
        let _ = getrandom::fill(&mut unit);
        let unit = (u64::from_le_bytes(unit) >> 11) as f64 / (1u64 << 53) as f64;
        let delay = live.policy.delay(live.attempt, unit);
        let delay_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        (EntryStatus::Failed, now.saturating_add(delay_ms).to_le_bytes().to_vec())
    } else {
        (EntryStatus::Error, Vec::new())
    };
    let entry = Entry {
        kind: EntryKind::Step,
        name: live.name,
        occurrence: live.occurrence,
        attempt: live.attempt,
        status,
        output,
        error: Some(message),
        started_at: live.started_at,
        finished_at: now,
    };
    (entry, retry)
}
