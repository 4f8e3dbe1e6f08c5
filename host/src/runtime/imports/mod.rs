//! The host side of the guest interface (`docs/abi.md`): the `cairn`
//! import module and the WASI calls taken over for determinism, one concern
//! per file, assembled here into a linker. A new capability is a new file
//! and its lines in [`add_to_linker`] (and in [`FUNCTIONS`]).

mod branch;
mod http;
mod kv;
mod limits;
mod memory;
mod signal;
mod state;
mod step;
mod timer;
pub mod wasi;
mod workflow;

use wasmtime::{Caller, Linker};

pub use kv::MAX_KEY_BYTES as MAX_KV_KEY_BYTES;
pub use limits::MemoryLimiter;
pub use state::{Ending, Fatal, Finished, HostState, InstanceSetup, LiveStep, RunContext};
pub use step::failed_attempt;
pub use wasi::output::GuestOutput;

// The version, status codes and policy form shared with cairn-sdk.
pub use cairn_abi::{ABI_VERSION, MIN_ABI_VERSION, RetryPolicy};

/// The import module of the Cairn interface.
pub const MODULE: &str = "cairn";
/// Every function of the `cairn` import module.
pub const FUNCTIONS: &[&str] = &[
    "input",
    "take",
    "step_begin",
    "step_end",
    "finish",
    "panic",
    "sleep",
    "signal_wait",
    "spawn",
    "join",
    // Version 2: effects.
    "http",
    "kv_get",
    "kv_put",
    "kv_delete",
];

/// Define the `cairn` module and the WASI overrides on `linker` (which must
/// already hold WASI preview 1).
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);

    // The workflow's life (workflow.rs).
    linker.func_wrap(MODULE, "input", workflow::input)?;
    linker.func_wrap(MODULE, "take", workflow::take)?;
    linker.func_wrap(MODULE, "panic", workflow::panic)?;
    linker.func_wrap_async(
        MODULE,
        "finish",
        |mut caller: Caller<'_, HostState>, (status, ptr, len): (i32, i32, i32)| {
            Box::new(async move { workflow::finish(&mut caller, status, ptr, len).await })
        },
    )?;

    // Steps (step.rs).
    linker.func_wrap_async(
        MODULE,
        "step_begin",
        |mut caller: Caller<'_, HostState>, (ptr, len, policy_ptr, policy_len): (i32, i32, i32, i32)| {
            Box::new(async move { step::step_begin(&mut caller, ptr, len, policy_ptr, policy_len).await })
        },
    )?;
    linker.func_wrap_async(
        MODULE,
        "step_end",
        |mut caller: Caller<'_, HostState>, (status, ptr, len): (i32, i32, i32)| {
            Box::new(async move { step::step_end(&mut caller, status, ptr, len).await })
        },
    )?;

    // Branches (branch.rs).
    linker.func_wrap_async(
        MODULE,
        "spawn",
        |mut caller: Caller<'_, HostState>, (ptr, len, policy_ptr, policy_len): (i32, i32, i32, i32)| {
            Box::new(async move { branch::spawn(&mut caller, ptr, len, policy_ptr, policy_len).await })
        },
    )?;
    linker.func_wrap_async(MODULE, "join", |mut caller: Caller<'_, HostState>, (ptr, count): (i32, i32)| {
        Box::new(async move { branch::join(&mut caller, ptr, count).await })
    })?;

    // Timers (timer.rs) and signals (signal.rs).
    linker.func_wrap_async(MODULE, "sleep", |mut caller: Caller<'_, HostState>, (millis,): (i64,)| {
        Box::new(async move { timer::sleep(&mut caller, millis).await })
    })?;
    linker.func_wrap_async(
        MODULE,
        "signal_wait",
        |mut caller: Caller<'_, HostState>, (ptr, len, timeout_ms): (i32, i32, i64)| {
            Box::new(async move { signal::signal_wait(&mut caller, ptr, len, timeout_ms).await })
        },
    )?;

    // Effects inside steps (http.rs, kv.rs).
    linker.func_wrap_async(MODULE, "http", |mut caller: Caller<'_, HostState>, (ptr, len): (i32, i32)| {
        Box::new(async move { http::http(&mut caller, ptr, len).await })
    })?;
    linker.func_wrap_async(MODULE, "kv_get", |mut caller: Caller<'_, HostState>, (ptr, len): (i32, i32)| {
        Box::new(async move { kv::kv_get(&mut caller, ptr, len).await })
    })?;
    linker.func_wrap(MODULE, "kv_put", kv::kv_put)?;
    linker.func_wrap(MODULE, "kv_delete", kv::kv_delete)?;

    // WASI taken over (wasi/).
    linker.func_wrap_async(
        wasi::MODULE,
        "clock_time_get",
        |mut caller: Caller<'_, HostState>, (id, precision, out): (i32, i64, i32)| {
            Box::new(async move { wasi::clock::clock_time_get(&mut caller, id, precision, out).await })
        },
    )?;
    linker.func_wrap_async(
        wasi::MODULE,
        "random_get",
        |mut caller: Caller<'_, HostState>, (ptr, len): (i32, i32)| {
            Box::new(async move { wasi::random::random_get(&mut caller, ptr, len).await })
        },
    )?;
    linker.func_wrap_async(
        wasi::MODULE,
        "poll_oneoff",
        |mut caller: Caller<'_, HostState>, (subs, events, n, nevents): (i32, i32, i32, i32)| {
            Box::new(async move { wasi::poll::poll_oneoff(&mut caller, subs, events, n, nevents).await })
        },
    )?;
    Ok(())
}
