//! Storage: one trait, one implementation per database.
//!
//! SQLite (embedded, zero set-up) is the only implementation today; the
//! trait is what a PostgreSQL one will implement. Reads are plain calls.
//! Writes go through [`Store::submit`]: every write of one commit item lands
//! together or not at all, and the returned ticket resolves once the commit
//! is durable at the configured [`Durability`].

pub mod sqlite;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::journal::Entry;
use crate::lock::RunLock;

/// The status of a run, as stored and as printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Pending,
    Running,
    Sleeping,
    Waiting,
    Completed,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Pending => "pending",
            RunStatus::Running => "running",
            RunStatus::Sleeping => "sleeping",
            RunStatus::Waiting => "waiting",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => RunStatus::Pending,
            "running" => RunStatus::Running,
            "sleeping" => RunStatus::Sleeping,
            "waiting" => RunStatus::Waiting,
            "completed" => RunStatus::Completed,
            "failed" => RunStatus::Failed,
            "cancelled" => RunStatus::Cancelled,
            _ => return None,
        })
    }

    /// Completed, failed and cancelled runs never execute again.
    pub fn is_finished(self) -> bool {
        matches!(self, RunStatus::Completed | RunStatus::Failed | RunStatus::Cancelled)
    }
}

/// What a run was granted and limited to; stored with the run and reused by
/// every resume, so a resumed run sees the same sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    /// Preopened directories: (host path, guest path).
    #[serde(default)]
    pub dirs: Vec<(PathBuf, String)>,
    /// Environment variables (stored in the database in clear).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Linear-memory limit per instance, in MiB.
    pub max_memory_mib: u64,
    /// CPU time a guest may run without reaching a host call, in milliseconds.
    pub max_cpu_ms: u64,
}

/// A run as stored.
#[derive(Debug, Clone)]
pub struct RunRecord {
    /// Internal, never reused; also the run's byte in the lock file.
    pub seq: i64,
    pub id: String,
    /// SHA-256 of the module, hex.
    pub module: String,
    /// The path the module was started from (for people; never loaded again).
    pub module_path: String,
    pub input: Vec<u8>,
    pub config: RunConfig,
    pub status: RunStatus,
    pub output: Option<Vec<u8>>,
    pub error: Option<String>,
    pub created_at: i64,
    pub finished_at: Option<i64>,
    /// Completed step outcomes in the history.
    pub steps: u64,
    /// `cairn cancel` asked for this run to stop.
    pub cancel_requested: bool,
    /// The key of the random bytes workflow code reads outside step
    /// closures (see `crate::random`), drawn when the run was created.
    /// `None` for runs created before there were keys: their reads are
    /// journaled instead.
    pub random_key: Option<[u8; 32]>,
}

/// A run to create.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub id: String,
    pub module: String,
    pub module_path: String,
    pub input: Vec<u8>,
    pub config: RunConfig,
    pub status: RunStatus,
}

/// One write; a commit item is a list of them, applied together.
#[derive(Debug)]
pub enum Write {
    /// Store a module's bytes under their hash (kept if already there).
    PutModule { hash: String, bytes: Vec<u8> },
    /// Create a run; with `lock`, the run is locked for this process before
    /// the commit makes it visible to anyone else.
    CreateRun { run: NewRun, lock: bool },
    /// Append history entries starting at `position`.
    Append { run: i64, position: usize, entries: Vec<Entry> },
    /// Set a run's status (and, when it finishes, its output or error).
    SetStatus { run: i64, status: RunStatus, output: Option<Vec<u8>>, error: Option<String> },
    /// Deliver a signal (kept until the run waits for it).
    SendSignal { run: i64, name: String, payload: Vec<u8> },
    /// Ask the run's executor to stop it.
    RequestCancel { run: i64 },
    /// An ended attempt of a parallel branch (a `Step` entry).
    BranchAttempt { run: i64, entry: Entry },
    /// Take the oldest undelivered signal `name` of the run, if any, and
    /// append `entry` (its output replaced by the payload) at the position.
    ConsumeSignal { run: i64, name: String, entry: (usize, Entry) },
}

impl Write {
    /// The existing run this write changes, if any.
    pub fn run(&self) -> Option<i64> {
        match self {
            Write::PutModule { .. } | Write::CreateRun { .. } => None,
            Write::Append { run, .. }
            | Write::SetStatus { run, .. }
            | Write::SendSignal { run, .. }
            | Write::RequestCancel { run }
            | Write::BranchAttempt { run, .. }
            | Write::ConsumeSignal { run, .. } => Some(*run),
        }
    }

    /// The run ends as failed, with this error.
    pub fn failed(run: i64, error: String) -> Self {
        Write::SetStatus { run, status: RunStatus::Failed, output: None, error: Some(error) }
    }

    /// The run ends as cancelled.
    pub fn cancelled(run: i64) -> Self {
        Write::SetStatus { run, status: RunStatus::Cancelled, output: None, error: Some("cancelled".into()) }
    }
}

/// What a commit produced, for the writes that produce something.
#[derive(Debug, Default)]
pub struct Committed {
    /// Runs created by this item, with their lock if one was asked for.
    pub created: Vec<(RunRecord, Option<RunLock>)>,
    /// The payload a `ConsumeSignal` took.
    pub signal: Option<Vec<u8>>,
}

/// What changed for executing runs since the watcher last looked.
#[derive(Debug, Default)]
pub struct Notices {
    /// (signal seq, run seq) of signals sent after the given seq.
    pub signals: Vec<(i64, i64)>,
    /// Unfinished runs with a cancel request.
    pub cancelled: Vec<i64>,
}

/// Resolves when the item is durable, or says why it is not.
pub type CommitTicket = oneshot::Receiver<Result<Committed, StoreError>>;

/// How durable a commit is before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// fsync before a step returns: survives power loss.
    Power,
    /// Written to the OS before a step returns, no fsync per commit: survives
    /// a killed process, not a power loss.
    Process,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path} is not a Cairn database ({why}); use --db to pick another file")]
    NotCairn { path: String, why: String },
    #[error(
        "{path} was written by a newer Cairn (schema version {found}; this build knows up to {known}); \
         upgrade cairn, the file was not changed"
    )]
    TooNew { path: String, found: i64, known: i64 },
    #[error("the database {path} is locked by another process (waited {waited_ms} ms); try again when it is done")]
    Locked { path: String, waited_ms: u64 },
    #[error("cannot open the database {path}: {why}")]
    CannotOpen { path: String, why: String },
    #[error("a run with id {0:?} already exists; continue it with `cairn resume {0}`")]
    RunExists(String),
    #[error("the run being written ({0}) no longer exists")]
    NoSuchRun(i64),
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("the database writer has stopped")]
    WriterGone,
    #[error("lock file: {0}")]
    Lock(#[from] std::io::Error),
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// The storage every part of the host uses.
pub trait Store: Send + Sync {
    /// Random id made when the database was created; mixed into every
    /// idempotency key so two databases never hand out the same key.
    fn db_id(&self) -> &str;

    /// Queue a commit item; the ticket resolves once it is durable.
    fn submit(&self, writes: Vec<Write>) -> CommitTicket;

    fn module(&self, hash: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn run(&self, id: &str) -> Result<Option<RunRecord>, StoreError>;
    /// All runs, oldest first.
    fn runs(&self) -> Result<Vec<RunRecord>, StoreError>;
    /// Runs that are not finished, oldest first.
    fn unfinished_runs(&self) -> Result<Vec<RunRecord>, StoreError>;
    /// A run's whole history, in one query.
    fn history(&self, run: i64) -> Result<Vec<Entry>, StoreError>;

    /// Every ended attempt of the run's parallel branches.
    fn branch_attempts(&self, run: i64) -> Result<Vec<Entry>, StoreError>;

    /// Lock a run for this process (fails at once if another process holds it).
    fn lock_run(&self, run: i64) -> Result<Option<RunLock>, StoreError>;

    /// The highest signal sequence number so far (0 if none).
    fn last_signal_seq(&self) -> Result<i64, StoreError>;

    /// Signals sent after `after_signal`, and runs with a cancel request.
    fn notices(&self, after_signal: i64) -> Result<Notices, StoreError>;
}

/// Submit a commit item and wait until it is durable.
pub async fn commit(store: &dyn Store, writes: Vec<Write>) -> Result<Committed, StoreError> {
    store.submit(writes).await.unwrap_or(Err(StoreError::WriterGone))
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
