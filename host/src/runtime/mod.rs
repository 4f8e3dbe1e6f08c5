//! Executing workflows: the wasmtime engine, the executor that runs a run's
//! instances and acts on how each ended, the host imports the guest calls,
//! and the history the imports replay from.

pub mod branch;
pub mod engine;
pub mod executor;
pub mod idempotency;
pub mod imports;
pub mod journal;
pub mod net_policy;
pub mod outcome;
pub mod random;
pub mod watch;

pub use engine::WasmEngine;
pub use executor::{ExecError, Executor, PreparedModule, RunOutcome};
