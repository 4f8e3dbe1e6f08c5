//! Signals: a wait takes the oldest undelivered signal of its name from the
//! store and journals it in one commit, so each signal is received exactly
//! once; while none is there, the run waits (the change feed wakes it) or
//! parks.

use std::time::{Duration, Instant};

use wasmtime::Caller;

use super::memory::guest_str;
use super::state::{Ending, HostState, SHOW_WAIT};
use super::timer::record_timer;
use crate::model::{Entry, EntryKind, RunStatus, now_ms};
use crate::runtime::journal::Request;
use crate::store::Write;
use cairn_abi::{CANCELLED, SIGNAL_RECEIVED, SIGNAL_TIMED_OUT};

/// `signal_wait(name, timeout_ms)`: a timeout's deadline is a durable timer
/// recorded first; a negative timeout waits forever.
pub(super) async fn signal_wait(
    caller: &mut Caller<'_, HostState>,
    ptr: i32,
    len: i32,
    timeout_ms: i64,
) -> wasmtime::Result<i64> {
    caller.data_mut().durable()?;
    let name = guest_str(caller, ptr, len)?;
    if caller.data().live_step.is_some() {
        return Err(caller.data_mut().abi_error("waiting for a signal inside a step"));
    }
    let deadline =
        if timeout_ms >= 0 { Some(record_timer(caller, || now_ms().saturating_add(timeout_ms)).await?) } else { None };
    let st = caller.data_mut();
    if let Some(message) = st.deliver_cancel().await? {
        st.staged = message.into_bytes();
        return Ok((CANCELLED << 32) | st.staged.len() as i64);
    }
    match st.journal.replay_read(&st.run.run_id, &Request::Signal { name: &name }) {
        Err(nd) => return Err(st.diverged(nd)),
        Ok(Some(entry)) => {
            let (code, payload) = if entry.output.is_empty() {
                (SIGNAL_TIMED_OUT, Vec::new())
            } else {
                (SIGNAL_RECEIVED, entry.output.clone())
            };
            st.staged = payload;
            st.sync_replaying();
            return Ok((code << 32) | st.staged.len() as i64);
        }
        Ok(None) => {}
    }
    let held_since = Instant::now();
    let mut shown = false;
    loop {
        let st = caller.data_mut();
        let entry = Entry::event(EntryKind::Signal, name.clone(), 0, Vec::new());
        // Flush pending reads first, so the signal lands at the next position.
        st.commit(Vec::new()).await?;
        let st = caller.data_mut();
        // The payload that comes must fit (its size is checked when sent).
        st.check_history_room(
            crate::runtime::journal::entry_bytes(&entry).saturating_add(st.limits.max_payload_bytes()),
        )?;
        let position = st.journal.len();
        let consume = Write::ConsumeSignal { run: st.run.run, name: name.clone(), entry: (position, entry.clone()) };
        let taken = st.commit_writes(vec![consume]).await?.signal;
        if let Some(payload) = taken {
            if shown {
                st.defer_write(Write::status(st.run.run, RunStatus::Running));
            }
            st.journal.record_committed(Entry { output: payload.clone(), ..entry });
            st.staged = payload;
            return Ok((SIGNAL_RECEIVED << 32) | st.staged.len() as i64);
        }
        if let Some(d) = deadline
            && now_ms() >= d
        {
            st.record(entry)?;
            if shown {
                st.defer_write(Write::status(st.run.run, RunStatus::Running));
            }
            st.commit(Vec::new()).await?;
            let st = caller.data_mut();
            st.staged = Vec::new();
            return Ok(SIGNAL_TIMED_OUT << 32);
        }
        // Hold the instance for a while (a prompt signal costs no replay),
        // then park it until the deadline or a signal.
        let held = held_since.elapsed();
        if held >= st.park_threshold {
            return Err(st.stop(Ending::Park { wake_at: deadline, status: RunStatus::Waiting, signal: Some(name) }));
        }
        if !shown && held >= SHOW_WAIT {
            st.show_wait(RunStatus::Waiting).await?;
            shown = true;
        }
        let st = caller.data_mut();
        let mut wait = st.park_threshold - held;
        if !shown {
            wait = wait.min(SHOW_WAIT - held);
        }
        if let Some(d) = deadline {
            wait = wait.min(Duration::from_millis(d.saturating_sub(now_ms()).max(0) as u64));
        }
        wait = wait.min(Duration::from_millis(st.grace_left() as u64));
        let watch = st.watch.clone();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = watch.changed() => {}
        }
        let st = caller.data_mut();
        st.enter()?;
        if let Some(message) = st.deliver_cancel().await? {
            if shown {
                st.defer_write(Write::status(st.run.run, RunStatus::Running));
            }
            st.staged = message.into_bytes();
            return Ok((CANCELLED << 32) | st.staged.len() as i64);
        }
    }
}
