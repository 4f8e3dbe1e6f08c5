//! What the Cairn host and `cairn-sdk` must agree on byte for byte
//! (`docs/abi.md`): the ABI version, the status codes host calls return in
//! bits 32..40 of their result, and retry policies with their 48-byte form.
//! One definition for both sides, so they cannot drift apart. Workflows do
//! not depend on this crate: `cairn-sdk` re-exports what they need.

mod http;
mod retry;

pub use http::{HttpRequest, HttpResponse};
pub use retry::{POLICY_BYTES, RetryPolicy};

/// The ABI version a module declares (export `cairn_abi_version`) and the
/// newest the host speaks. Version 2 added `http`, `kv_get`, `kv_put`,
/// `kv_delete` and cancellation delivered to the workflow.
pub const ABI_VERSION: i32 = 2;
/// The oldest version the host still runs, unchanged.
pub const MIN_ABI_VERSION: i32 = 1;

/// `step_begin`: the step has a recorded value; the payload is its output.
pub const STEP_MEMOIZED_OK: i64 = 0;
/// `step_begin`: the step has a recorded error; the payload is its message.
pub const STEP_MEMOIZED_ERR: i64 = 1;
/// `step_begin`: run the closure; the payload is the idempotency key.
pub const STEP_RUN: i64 = 2;
/// `step_begin`, `sleep`, `signal_wait` (version 2): the run was cancelled
/// with a grace period; the payload is the message. Delivered once.
pub const CANCELLED: i64 = 3;

/// `spawn`: the low 32 bits are a branch handle.
pub const SPAWN_HANDLE: i64 = 0;
/// `spawn`: this instance exists to run the branch; the payload is its key.
pub const SPAWN_RUN_HERE: i64 = 1;

/// `signal_wait`: the payload is the signal's.
pub const SIGNAL_RECEIVED: i64 = 0;
/// `signal_wait`: the wait timed out.
pub const SIGNAL_TIMED_OUT: i64 = 1;

/// `http`: the payload is the response ([`HttpResponse`]).
pub const HTTP_RESPONSE: i64 = 0;
/// `http`, `kv_*`: a failure retrying may fix (network, timeout); the
/// payload is the message.
pub const EFFECT_FAILED: i64 = 1;
/// `http`, `kv_*`: refused (not allowed, too large, not inside a step);
/// the payload is the message. Retrying cannot help.
pub const EFFECT_REFUSED: i64 = 2;

/// `kv_get`: the payload is the value (JSON).
pub const KV_VALUE: i64 = 0;
/// `kv_get`: no such key. `kv_put`, `kv_delete`: done.
pub const KV_ABSENT: i64 = 3;
/// `kv_put`, `kv_delete`: staged with the step.
pub const KV_DONE: i64 = 0;
