//! `random_get`: bytes read by workflow code come from the run's keyed
//! stream (`runtime::random`; this also covers std's `HashMap` keys), or
//! are journaled for runs without a key; reads inside a live step closure
//! are fresh. The guest's buffer is checked first and filled in place: a
//! length the guest's memory cannot hold costs the host nothing.

use wasmtime::Caller;

use super::{ERRNO_FAULT, ERRNO_SUCCESS};
use crate::model::{Entry, EntryKind};
use crate::runtime::imports::HostState;
use crate::runtime::journal::Request;

pub(in crate::runtime::imports) async fn random_get(
    caller: &mut Caller<'_, HostState>,
    ptr: i32,
    len: i32,
) -> wasmtime::Result<i32> {
    // A cheap call: the CPU budget goes on.
    caller.data_mut().enter()?;
    let Some(memory) = caller.data().memory else {
        return Err(caller.data_mut().abi_error("the module exports no memory"));
    };
    let (start, len) = (ptr as u32 as usize, len as u32 as usize);
    let (data, st) = memory.data_and_store_mut(&mut *caller);
    let Some(buf) = start.checked_add(len).and_then(|end| data.get_mut(start..end)) else {
        return Ok(ERRNO_FAULT);
    };
    if st.live_step.is_some() {
        if getrandom::fill(buf).is_err() {
            return Err(wasmtime::Error::msg("host randomness failed"));
        }
    } else if let Some(stream) = &mut st.run.random {
        stream.fill(buf);
    } else {
        // A run from before random keys: its reads are journaled.
        match st.journal.replay_read(&st.run.run_id, &Request::Random { len }) {
            Err(nd) => return Err(st.diverged(nd)),
            Ok(Some(entry)) => buf.copy_from_slice(&entry.output),
            Ok(None) => {
                if getrandom::fill(buf).is_err() {
                    return Err(wasmtime::Error::msg("host randomness failed"));
                }
                let entry = Entry::event(EntryKind::Random, "", 0, buf.to_vec());
                st.record(entry)?;
                st.bound_unsubmitted().await?;
            }
        }
    }
    caller.data().sync_replaying();
    Ok(ERRNO_SUCCESS)
}
