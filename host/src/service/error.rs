//! Every error a user of Cairn can get, and what each becomes: one exit
//! code for the command line and one HTTP status and code for the API, in
//! one table ([`ServiceError::class`]).

use crate::runtime::ExecError;
use crate::runtime::imports::Fatal;
use crate::store::StoreError;

/// Exit codes of the `cairn` command (also in the README).
pub mod exit {
    /// The run completed (or the command succeeded).
    pub const OK: u8 = 0;
    /// The run failed, or the command could not do its job.
    pub const FAILED: u8 = 1;
    /// Bad usage or bad input (the argument parser uses it too).
    pub const USAGE: u8 = 2;
    /// Replay diverged from the history; nothing was written.
    pub const NON_DETERMINISM: u8 = 3;
    /// The run, or the database, is held by another process right now.
    pub const BUSY: u8 = 4;
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A request's own content is wrong (an id, a grant, a JSON payload, a limit).
    #[error("{0}")]
    BadInput(String),
    /// The workflow module cannot be used (not wasm, not a Cairn workflow,
    /// another ABI version, unreadable).
    #[error("{0}")]
    BadModule(String),
    #[error("there is no database at {0} (`cairn run` or `cairn start` creates one; --db or CAIRN_DB picks another)")]
    NoDatabase(String),
    #[error("there is no run with id {id:?} in {location} (`cairn runs` lists them)")]
    RunNotFound { id: String, location: String },
    #[error("a run with id {0:?} already exists; continue it with `cairn resume {0}`")]
    RunExists(String),
    /// The run is finished, so it cannot take what was asked (`what`).
    #[error("run {id} is {status}: {what}")]
    RunFinished { id: String, status: &'static str, what: &'static str },
    #[error(
        "run {0} is being executed by another cairn process right now; wait for it, or stop that process and resume again"
    )]
    RunBusy(String),
    /// As `RunBusy`, where the store knows the holder and its lease's end.
    #[error(
        "run {id} is held by {holder} until {until} (its lease); if that process died, resume after then, \
         when the lease expires"
    )]
    RunLeased { id: String, holder: String, until: String },
    #[error("run {id}: {error}")]
    SignalsFull { id: String, error: StoreError },
    #[error("a token named {0:?} exists already; pick another name, or `cairn token revoke` it")]
    TokenExists(String),
    #[error("there is no token with id or name {0:?} (`cairn token list` lists them)")]
    TokenNotFound(String),
    #[error(transparent)]
    Exec(ExecError),
    #[error(transparent)]
    Store(StoreError),
}

/// The API's `error` codes: a fixed list (the OpenAPI document lists it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body is not JSON.
    BadJson,
    /// The request is JSON of the wrong shape, or a value in it is wrong.
    InvalidRequest,
    /// The module is not a Cairn workflow this host accepts.
    InvalidModule,
    /// `POST /api/runs` named a module that was never uploaded.
    UnknownModule,
    /// A body over the payload limit, or a module over `--max-module-mib`.
    TooLarge,
    /// No token, or not a live one.
    Unauthorized,
    /// The token's role is too low.
    Forbidden,
    NotFound,
    /// The id is taken, or the server cannot do that (`--no-worker`).
    Conflict,
    /// The run is finished.
    Finished,
    /// Another process holds the run or the database.
    Busy,
    TooManySignals,
    NonDeterminism,
    NoDatabase,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidModule => "invalid_module",
            ErrorCode::UnknownModule => "unknown_module",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Finished => "finished",
            ErrorCode::Busy => "busy",
            ErrorCode::TooManySignals => "too_many_signals",
            ErrorCode::NonDeterminism => "non_determinism",
            ErrorCode::NoDatabase => "no_database",
            ErrorCode::Internal => "internal",
        }
    }
}

/// What an error becomes at each edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorClass {
    /// The `cairn` command's exit code.
    pub exit: u8,
    /// The HTTP status of the API.
    pub http: u16,
    /// The API's `error` code.
    pub code: ErrorCode,
}

const fn class(exit: u8, http: u16, code: ErrorCode) -> ErrorClass {
    ErrorClass { exit, http, code }
}

impl ServiceError {
    /// The one table.
    pub fn class(&self) -> ErrorClass {
        use ServiceError as E;
        match self {
            E::BadInput(_) => class(exit::USAGE, 422, ErrorCode::InvalidRequest),
            E::BadModule(_) => class(exit::USAGE, 400, ErrorCode::InvalidModule),
            E::NoDatabase(_) => class(exit::FAILED, 503, ErrorCode::NoDatabase),
            E::RunNotFound { .. } => class(exit::FAILED, 404, ErrorCode::NotFound),
            E::RunExists(_) => class(exit::USAGE, 409, ErrorCode::Conflict),
            E::RunFinished { .. } => class(exit::FAILED, 409, ErrorCode::Finished),
            E::RunBusy(_) | E::RunLeased { .. } => class(exit::BUSY, 409, ErrorCode::Busy),
            E::SignalsFull { .. } => class(exit::FAILED, 429, ErrorCode::TooManySignals),
            E::TokenExists(_) => class(exit::USAGE, 409, ErrorCode::Conflict),
            E::TokenNotFound(_) => class(exit::FAILED, 404, ErrorCode::NotFound),
            E::Exec(ExecError::Fatal(Fatal::NonDeterminism(_))) => {
                class(exit::NON_DETERMINISM, 409, ErrorCode::NonDeterminism)
            }
            E::Exec(ExecError::Store(e)) | E::Exec(ExecError::Fatal(Fatal::Store { error: e, .. })) | E::Store(e) => {
                store_class(e)
            }
            E::Exec(_) => class(exit::FAILED, 500, ErrorCode::Internal),
        }
    }
}

fn store_class(e: &StoreError) -> ErrorClass {
    match e {
        StoreError::Locked { .. } => class(exit::BUSY, 503, ErrorCode::Busy),
        StoreError::RunExists(_) | StoreError::NotEmpty(_) => class(exit::USAGE, 409, ErrorCode::Conflict),
        _ => class(exit::FAILED, 500, ErrorCode::Internal),
    }
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::RunExists(id) => ServiceError::RunExists(id),
            StoreError::TokenExists(name) => ServiceError::TokenExists(name),
            StoreError::NoSuchToken(name) => ServiceError::TokenNotFound(name),
            e => ServiceError::Store(e),
        }
    }
}

impl From<ExecError> for ServiceError {
    fn from(e: ExecError) -> Self {
        ServiceError::Exec(e)
    }
}
