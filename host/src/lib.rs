//! Cairn: a durable-execution engine for Rust workflows compiled to
//! `wasm32-wasip1`.
//!
//! The parts, in the order a step flows through them (see
//! `docs/architecture.md`):
//! - [`cli`]: the `cairn` command.
//! - [`executor`]: runs a run: module, sandbox, history, outcome.
//! - [`abi`]: the host functions the guest calls (`docs/abi.md`), and the
//!   WASI calls taken over for determinism.
//! - [`branch`]: parallel branches (fork by replay).
//! - [`journal`]: a run's history and the replay cursor over it.
//! - [`store`]: the storage trait and its SQLite implementation (group commit).
//! - [`engine`]: wasmtime configuration and the compiled-module cache.
//! - [`lock`]: one executor per run, with instant takeover after a crash.
//! - [`idempotency`]: step idempotency keys.
//! - [`random`]: the per-run random stream workflow code reads.
//! - [`worker`]: `cairn worker`, many runs at once.
//! - [`watch`]: cancel requests and signals reaching an executing run.

pub mod abi;
pub mod branch;
pub mod cli;
pub mod engine;
pub mod executor;
pub mod idempotency;
pub mod journal;
pub mod lock;
pub mod random;
pub mod store;
pub mod watch;
pub mod worker;
