//! `random_get`: bytes read by workflow code come from the run's keyed
//! stream (`runtime::random`; this also covers std's `HashMap` keys), or
//! are journaled for runs without a key; reads inside a live step closure
//! are fresh.

use wasmtime::Caller;

use super::{ERRNO_FAULT, ERRNO_SUCCESS};
use crate::model::{Entry, EntryKind};
use crate::runtime::imports::HostState;
use crate::runtime::imports::memory::write_guest;
use crate::runtime::journal::Request;

pub(in crate::runtime::imports) fn random_get(
    mut caller: Caller<'_, HostState>,
    ptr: i32,
    len: i32,
) -> wasmtime::Result<i32> {
    let st = caller.data_mut();
    st.enter()?;
    let len = len as u32 as usize;
    let bytes = if st.live_step.is_some() {
        fresh_random(len)?
    } else if let Some(stream) = &mut st.run.random {
        let mut bytes = vec![0u8; len];
        stream.fill(&mut bytes);
        bytes
    } else {
        match st.journal.replay_read(&st.run.run_id, &Request::Random { len }) {
            Err(nd) => return Err(st.diverged(nd)),
            Ok(Some(entry)) => entry.output.clone(),
            Ok(None) => {
                let bytes = fresh_random(len)?;
                st.journal.record(Entry::event(EntryKind::Random, "", 0, bytes.clone()));
                bytes
            }
        }
    };
    st.sync_replaying();
    Ok(if write_guest(&mut caller, ptr, &bytes) { ERRNO_SUCCESS } else { ERRNO_FAULT })
}

fn fresh_random(len: usize) -> wasmtime::Result<Vec<u8>> {
    let mut bytes = vec![0u8; len];
    getrandom::fill(&mut bytes).map_err(|e| wasmtime::Error::msg(format!("host randomness failed: {e}")))?;
    Ok(bytes)
}
