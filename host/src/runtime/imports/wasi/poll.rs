//! `poll_oneoff`, which `std::thread::sleep` and friends become. Clock
//! subscriptions only: in workflow code the earliest becomes a durable
//! timer; inside a live step it is a live sleep that frees the thread (and
//! respects the attempt's timeout).

use std::time::{Duration, Instant};

use wasmtime::Caller;

use super::clock::live_clock;
use super::{ERRNO_FAULT, ERRNO_INVAL, ERRNO_NOTSUP, ERRNO_SUCCESS};
use crate::model::now_ms;
use crate::runtime::imports::HostState;
use crate::runtime::imports::memory::{guest_bytes, write_guest};
use crate::runtime::imports::state::Ending;
use crate::runtime::imports::timer::durable_timer;

/// The size of one subscription record.
const SUBSCRIPTION: usize = 48;

pub(in crate::runtime::imports) async fn poll_oneoff(
    caller: &mut Caller<'_, HostState>,
    subs: i32,
    events: i32,
    n: i32,
    nevents: i32,
) -> wasmtime::Result<i32> {
    // A durable point only where it becomes a durable timer (below); inside
    // a step a sleep is cheap, and a loop of zero sleeps is a loop.
    caller.data_mut().enter()?;
    if n <= 0 {
        return Ok(ERRNO_INVAL);
    }
    let raw = guest_bytes(caller, subs, n.saturating_mul(SUBSCRIPTION as i32))?;
    // (userdata, clock id, timeout ns, absolute)
    let mut earliest: Option<(u64, u64)> = None; // (wait ns from now, userdata)
    for sub in raw.chunks_exact(SUBSCRIPTION) {
        let userdata = u64::from_le_bytes(sub[0..8].try_into().expect("8 bytes"));
        if sub[8] != 0 {
            return Ok(ERRNO_NOTSUP); // fd readiness: not offered to workflows
        }
        let id = u32::from_le_bytes(sub[16..20].try_into().expect("4 bytes"));
        let timeout = u64::from_le_bytes(sub[24..32].try_into().expect("8 bytes"));
        let absolute = u16::from_le_bytes(sub[40..42].try_into().expect("2 bytes")) & 1 == 1;
        let wait = match (id, absolute) {
            (_, false) => timeout,
            (0, true) => timeout.saturating_sub(live_clock(caller.data(), 0)),
            (1, true) => timeout.saturating_sub(caller.data().monotonic.now()),
            _ => return Ok(ERRNO_INVAL),
        };
        if earliest.is_none_or(|(w, _)| wait < w) {
            earliest = Some((wait, userdata));
        }
    }
    let (wait_ns, userdata) = earliest.expect("n > 0");
    if let Some(live) = caller.data().live_step.clone() {
        let mut until = Instant::now().checked_add(Duration::from_nanos(wait_ns)).unwrap_or_else(far_future);
        let timed_out = live.deadline.is_some_and(|d| d < until);
        if let Some(d) = live.deadline {
            until = until.min(d);
        }
        // Wake at the wall limit if it comes first (the next call stops the run).
        if let Some(left) = caller.data().wall_left() {
            until = until.min(Instant::now() + left);
        }
        let watch = caller.data().watch.clone();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until.into()) => break,
                _ = watch.changed() => caller.data_mut().enter()?,
            }
        }
        if timed_out {
            return Err(caller.data_mut().stop(Ending::TimedOut));
        }
    } else {
        caller.data_mut().durable()?;
        let wake_at = now_ms().saturating_add((wait_ns / 1_000_000) as i64);
        durable_timer(caller, || wake_at).await?;
    }
    let mut event = [0u8; 32];
    event[0..8].copy_from_slice(&userdata.to_le_bytes());
    // error 0 (success), type 0 (clock)
    if !write_guest(caller, events, &event) || !write_guest(caller, nevents, &1u32.to_le_bytes()) {
        return Ok(ERRNO_FAULT);
    }
    Ok(ERRNO_SUCCESS)
}

/// A time no sleep reaches (about 30 years from now).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(30 * 365 * 86_400)
}
