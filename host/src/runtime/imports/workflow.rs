//! The workflow's own life: its input, the bytes the host stages for it,
//! a panic message, and its result.

use wasmtime::Caller;

use super::memory::{guest_bytes, guest_payload, write_guest};
use super::state::{Finished, HostState};
use crate::model::RunStatus;
use crate::store::Write;

/// `input() -> len`: stage the run's input.
pub(super) fn input(mut caller: Caller<'_, HostState>) -> wasmtime::Result<i32> {
    let st = caller.data_mut();
    st.enter()?;
    st.staged = st.run.input.clone();
    Ok(st.staged.len() as i32)
}

/// `take(ptr, len)`: copy what the last call staged into the guest.
pub(super) fn take(mut caller: Caller<'_, HostState>, ptr: i32, len: i32) -> wasmtime::Result<i32> {
    caller.data_mut().enter()?;
    let staged = std::mem::take(&mut caller.data_mut().staged);
    if staged.len() != len as u32 as usize {
        return Err(caller.data_mut().abi_error(format!("take({len}) but {} bytes are staged", staged.len())));
    }
    if !write_guest(&mut caller, ptr, &staged) {
        return Err(caller.data_mut().abi_error("take: buffer is outside guest memory"));
    }
    Ok(0)
}

/// `panic(ptr, len)`: the message of a panic about to abort the guest.
pub(super) fn panic(mut caller: Caller<'_, HostState>, ptr: i32, len: i32) {
    // The message becomes an error in the history: its start is enough.
    const MAX_PANIC_BYTES: u32 = 64 << 10;
    let len = (len as u32).min(MAX_PANIC_BYTES) as i32;
    let message = guest_bytes(&mut caller, ptr, len).map(|b| String::from_utf8_lossy(&b).into_owned());
    if let Ok(message) = message {
        caller.data_mut().panic_message = Some(message);
    }
}

/// `finish(status, ptr, len)`: the workflow's result, committed with the
/// run's final status once every branch it started has ended.
pub(super) async fn finish(
    caller: &mut Caller<'_, HostState>,
    status: i32,
    ptr: i32,
    len: i32,
) -> wasmtime::Result<i32> {
    caller.data_mut().durable()?;
    let bytes = guest_payload(caller, ptr, len, "the workflow's result")?;
    let st = caller.data_mut();
    if st.live_step.is_some() {
        return Err(st.abi_error("finish inside a step"));
    }
    if let Err(nd) = st.journal.check_finish(&st.run.run_id) {
        return Err(st.diverged(nd));
    }
    // A branch that is never joined still runs to completion and is recorded.
    let board = st.branches.board.clone();
    loop {
        let changed = board.changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if !board.any_running() {
            break;
        }
        changed.await;
    }
    let st = caller.data_mut();
    let finished = match status {
        // Whatever reads the output later (a terminal, an API client)
        // expects JSON: a module that says otherwise fails.
        0 => match serde_json::from_slice::<serde::de::IgnoredAny>(&bytes) {
            Ok(_) => Finished::Completed(bytes),
            Err(e) => Finished::Failed(format!("the workflow's result is not valid JSON: {e}")),
        },
        1 => Finished::Failed(String::from_utf8_lossy(&bytes).into_owned()),
        other => return Err(st.abi_error(format!("finish status {other} is not 0 or 1"))),
    };
    let run = st.run.run;
    let cancelled = st.journal.cancel_delivered();
    let write = match (&finished, cancelled) {
        // Told of a cancellation, the workflow finished as it saw fit
        // (compensated, say): the run was cancelled all the same.
        (Finished::Completed(out), true) => Write::SetStatus {
            run,
            status: RunStatus::Cancelled,
            output: Some(out.clone()),
            error: Some("cancelled".into()),
        },
        (Finished::Failed(msg), true) => Write::SetStatus {
            run,
            status: RunStatus::Cancelled,
            output: None,
            error: Some(format!("cancelled: {msg}")),
        },
        (Finished::Completed(out), false) => {
            Write::SetStatus { run, status: RunStatus::Completed, output: Some(out.clone()), error: None }
        }
        (Finished::Failed(msg), false) => Write::failed(run, msg.clone()),
        (Finished::Cancelled, _) => unreachable!("made below"),
    };
    let finished = if cancelled { Finished::Cancelled } else { finished };
    st.commit(vec![write]).await?;
    // The run is over: the instance stops here, so nothing the guest does
    // after can change the finished run.
    Err(caller.data_mut().stop(super::state::Ending::Finished(finished)))
}
