//! What the Cairn host and `cairn-sdk` must agree on byte for byte
//! (`docs/abi.md`): the ABI version, the status codes host calls return in
//! bits 32..40 of their result, and retry policies with their 48-byte form.
//! One definition for both sides, so they cannot drift apart. Workflows do
//! not depend on this crate: `cairn-sdk` re-exports what they need.

mod retry;

pub use retry::{POLICY_BYTES, RetryPolicy};

/// The ABI version a module declares (export `cairn_abi_version`) and the
/// host speaks.
pub const ABI_VERSION: i32 = 1;

/// `step_begin`: the step has a recorded value; the payload is its output.
pub const STEP_MEMOIZED_OK: i64 = 0;
/// `step_begin`: the step has a recorded error; the payload is its message.
pub const STEP_MEMOIZED_ERR: i64 = 1;
/// `step_begin`: run the closure; the payload is the idempotency key.
pub const STEP_RUN: i64 = 2;

/// `spawn`: the low 32 bits are a branch handle.
pub const SPAWN_HANDLE: i64 = 0;
/// `spawn`: this instance exists to run the branch; the payload is its key.
pub const SPAWN_RUN_HERE: i64 = 1;

/// `signal_wait`: the payload is the signal's.
pub const SIGNAL_RECEIVED: i64 = 0;
/// `signal_wait`: the wait timed out.
pub const SIGNAL_TIMED_OUT: i64 = 1;
