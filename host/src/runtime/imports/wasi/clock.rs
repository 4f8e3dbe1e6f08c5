//! `clock_time_get`: reads by workflow code are journaled (and answered
//! from the history on replay); reads inside a live step closure are live
//! and not journaled, since the closure does not run on replay.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use wasmtime::Caller;

use super::{ERRNO_BADF, ERRNO_FAULT, ERRNO_SUCCESS};
use crate::model::{Entry, EntryKind};
use crate::runtime::imports::HostState;
use crate::runtime::imports::memory::write_guest;
use crate::runtime::journal::Request;

/// Live monotonic time that never falls below what the history recorded.
pub struct MonotonicClock {
    anchor: Instant,
    base: u64,
}

impl MonotonicClock {
    pub fn after(last_recorded: Option<u64>) -> Self {
        MonotonicClock { anchor: Instant::now(), base: last_recorded.map_or(0, |v| v.saturating_add(1)) }
    }

    pub fn now(&self) -> u64 {
        self.base.saturating_add(self.anchor.elapsed().as_nanos() as u64)
    }
}

/// The live value of clock `id` (0 realtime, 1 monotonic), in nanoseconds.
pub(in crate::runtime::imports) fn live_clock(st: &HostState, id: i32) -> u64 {
    if id == 0 {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
    } else {
        st.monotonic.now()
    }
}

pub(in crate::runtime::imports) async fn clock_time_get(
    caller: &mut Caller<'_, HostState>,
    id: i32,
    _precision: i64,
    out: i32,
) -> wasmtime::Result<i32> {
    let st = caller.data_mut();
    // A cheap call: the CPU budget goes on (a loop of clock reads is a loop).
    st.enter()?;
    let name = match id {
        0 => "realtime",
        1 => "monotonic",
        _ => return Ok(ERRNO_BADF), // CPU-time clocks: not offered, as in wasmtime
    };
    let value = if st.live_step.is_some() {
        live_clock(st, id)
    } else {
        match st.journal.replay_read(&st.run.run_id, &Request::Clock { name }) {
            Err(nd) => return Err(st.diverged(nd)),
            Ok(Some(entry)) => match entry.clock_value() {
                Some(v) => v,
                None => return Err(st.abi_error("a recorded clock value is malformed")),
            },
            Ok(None) => {
                let v = live_clock(st, id);
                st.record(Entry::event(EntryKind::Clock, name, 0, v.to_le_bytes().to_vec()))?;
                st.bound_unsubmitted().await?;
                v
            }
        }
    };
    let st = caller.data_mut();
    st.sync_replaying();
    Ok(if write_guest(caller, out, &value.to_le_bytes()) { ERRNO_SUCCESS } else { ERRNO_FAULT })
}
