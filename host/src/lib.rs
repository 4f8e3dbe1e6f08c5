//! Cairn: a durable-execution engine for Rust workflows compiled to
//! `wasm32-wasip1`.
//!
//! The layers, from the user inwards (`docs/architecture.md` follows one
//! step through them):
//! - [`cli`]: the `cairn` command, a thin shell: parse, call the service,
//!   print, exit with the error's code.
//! - [`service`]: what Cairn does for its users (start, resume, cancel,
//!   signal, list, view, claim, subscribe), with typed errors and the one
//!   table of exit codes and HTTP statuses; `service::worker` is `cairn worker`.
//! - [`runtime`]: executing workflows: the wasmtime engine, the executor,
//!   how an instance ended (`runtime::outcome`), the host imports the guest
//!   calls (`runtime::imports`, one concern per file), the history and its
//!   replay cursor (`runtime::journal`), parallel branches.
//! - [`store`]: the store contract (commit items, leases, the change feed)
//!   and its SQLite implementation; `store::conformance` is the suite any
//!   store must pass.
//! - [`model`]: the words every layer shares: runs, statuses, history entries.

pub mod cli;
pub mod model;
pub mod runtime;
pub mod server;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod terminal;
