//! The WASI preview 1 calls Cairn takes over from wasmtime-wasi, so that
//! workflow code replays deterministically (clocks, randomness, sleeps) and
//! stays quiet while it replays (stdout, stderr). Everything else of WASI
//! is wasmtime-wasi's, inside the sandbox the run was granted.

pub mod clock;
pub mod output;
pub mod poll;
pub mod random;

/// The WASI preview 1 import module.
pub const MODULE: &str = "wasi_snapshot_preview1";

const ERRNO_SUCCESS: i32 = 0;
const ERRNO_BADF: i32 = 8;
const ERRNO_FAULT: i32 = 21;
const ERRNO_INVAL: i32 = 28;
const ERRNO_NOTSUP: i32 = 58;
