//! The words every layer shares: runs, their status and grants, history
//! entries. Nothing here knows about a database, wasmtime or a terminal.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The store's own number for a run: never reused, compact, and what every
/// write and change event names. (People use the run's id, a string.)
/// On SQLite it is also the run's byte in the lock file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunKey(pub i64);

impl fmt::Display for RunKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// The status of a run, as stored and as printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
    pub const ALL: [RunStatus; 7] = [
        RunStatus::Pending,
        RunStatus::Running,
        RunStatus::Sleeping,
        RunStatus::Waiting,
        RunStatus::Completed,
        RunStatus::Failed,
        RunStatus::Cancelled,
    ];

    /// The statuses a run never leaves.
    pub const FINISHED: [RunStatus; 3] = [RunStatus::Completed, RunStatus::Failed, RunStatus::Cancelled];

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
        RunStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Completed, failed and cancelled runs never execute again.
    pub fn is_finished(self) -> bool {
        RunStatus::FINISHED.contains(&self)
    }
}

/// What a run was granted and limited to; stored with the run and reused by
/// every resume, so a resumed run sees the same sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    /// Preopened directories, read-write: (host path, guest path).
    #[serde(default)]
    pub dirs: Vec<(PathBuf, String)>,
    /// Preopened directories, read-only: (host path, guest path).
    #[serde(default)]
    pub dirs_ro: Vec<(PathBuf, String)>,
    /// Environment variables (stored in the database in clear).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// The hosts steps may reach over HTTP, and headers the host adds;
    /// `None`: no network. (Boxed: every parked run holds its config.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<Box<HttpGrants>>,
    /// The key-value namespace of the run's steps; `None`: the module's hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_namespace: Option<Box<str>>,
    #[serde(flatten)]
    pub limits: Limits,
}

impl RunConfig {
    /// No grants, the default limits.
    pub fn new(limits: Limits) -> Self {
        RunConfig { dirs: Vec::new(), dirs_ro: Vec::new(), env: Vec::new(), http: None, kv_namespace: None, limits }
    }

    /// The key-value namespace of a run of `module` (its hash).
    pub fn kv_namespace_of<'a>(&'a self, module: &'a str) -> &'a str {
        self.kv_namespace.as_deref().unwrap_or(module)
    }
}

/// What a run may reach over HTTP (`--allow-http`, `--allow-http-insecure`,
/// `--http-header`): stored with the run, like its directories.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpGrants {
    /// `HOST[:PORT]`, `*.DOMAIN[:PORT]`, or an IP address (`[v6]` with a port).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Plain `http://` to hosts other than loopback.
    #[serde(default)]
    pub insecure: bool,
    /// Headers the host adds to requests to a host, from its own
    /// environment at request time: the values are never stored.
    #[serde(default)]
    pub headers: Vec<SecretHeader>,
}

impl HttpGrants {
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && !self.insecure && self.headers.is_empty()
    }

    /// As a run's config keeps them: nothing when there are none.
    pub fn boxed(self) -> Option<Box<HttpGrants>> {
        (!self.is_empty()).then(|| Box::new(self))
    }
}

/// `--http-header HOST:NAME=@env:VAR`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretHeader {
    /// A pattern as in `HttpGrants::allow`.
    pub host: String,
    pub name: String,
    /// The environment variable of the executing process that holds the value.
    pub env: String,
}

/// What a run may cost the host, each with the flag of `cairn run` and
/// `cairn start` that sets it (and, in snake case without the dashes, its
/// name in JSON). Runs stored before a limit existed get its default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Linear memory per instance, MiB (`--max-memory`).
    pub max_memory_mib: u64,
    /// Guest CPU between two durable points (steps, timers, signals,
    /// branches), milliseconds (`--max-cpu`, in seconds).
    pub max_cpu_ms: u64,
    /// History entries (`--max-history`).
    #[serde(default = "Limits::default_max_history")]
    pub max_history: u64,
    /// History size, MiB (`--max-history-mib`).
    #[serde(default = "Limits::default_max_history_mib")]
    pub max_history_mib: u64,
    /// One payload: a step's output, a signal's payload, the run's input or
    /// its final output, MiB (`--max-payload-mib`).
    #[serde(default = "Limits::default_max_payload_mib")]
    pub max_payload_mib: u64,
    /// Guest CPU over the whole execution of the run in one process,
    /// milliseconds (`--max-run-cpu`, in seconds).
    #[serde(default = "Limits::default_max_run_cpu_ms")]
    pub max_run_cpu_ms: u64,
    /// Wall time from the run's creation to its end, milliseconds
    /// (`--max-wall`, in seconds); none by default.
    #[serde(default)]
    pub max_wall_ms: Option<u64>,
    /// Branches the run may spawn (`--max-branches`).
    #[serde(default = "Limits::default_max_branches")]
    pub max_branches: u64,
    /// One HTTP response body, MiB (`--max-http-response-mib`).
    #[serde(default = "Limits::default_max_http_response_mib")]
    pub max_http_response_mib: u64,
    /// One HTTP request, from connecting to the last byte of the response,
    /// milliseconds (`--http-timeout`, in seconds).
    #[serde(default = "Limits::default_http_timeout_ms")]
    pub http_timeout_ms: u64,
    /// Keys in the run's key-value namespace (`--max-kv-keys`); a value is
    /// a payload (`--max-payload-mib`).
    #[serde(default = "Limits::default_max_kv_keys")]
    pub max_kv_keys: u64,
}

impl Limits {
    pub const DEFAULT_MAX_MEMORY_MIB: u64 = 256;
    pub const DEFAULT_MAX_CPU_MS: u64 = 60_000;

    fn default_max_history() -> u64 {
        1_000_000
    }
    fn default_max_history_mib() -> u64 {
        256
    }
    fn default_max_payload_mib() -> u64 {
        16
    }
    fn default_max_run_cpu_ms() -> u64 {
        3_600_000
    }
    fn default_max_branches() -> u64 {
        1_000
    }
    pub(crate) fn default_max_http_response_mib() -> u64 {
        16
    }
    pub(crate) fn default_http_timeout_ms() -> u64 {
        30_000
    }
    pub(crate) fn default_max_kv_keys() -> u64 {
        100_000
    }

    pub fn max_payload_bytes(&self) -> usize {
        usize::try_from(self.max_payload_mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_memory_mib: Limits::DEFAULT_MAX_MEMORY_MIB,
            max_cpu_ms: Limits::DEFAULT_MAX_CPU_MS,
            max_history: Limits::default_max_history(),
            max_history_mib: Limits::default_max_history_mib(),
            max_payload_mib: Limits::default_max_payload_mib(),
            max_run_cpu_ms: Limits::default_max_run_cpu_ms(),
            max_wall_ms: None,
            max_branches: Limits::default_max_branches(),
            max_http_response_mib: Limits::default_max_http_response_mib(),
            http_timeout_ms: Limits::default_http_timeout_ms(),
            max_kv_keys: Limits::default_max_kv_keys(),
        }
    }
}

/// A run as stored.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub key: RunKey,
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
    /// Entries of the history that count as steps ([`Entry::counts_as_step`]).
    pub steps: u64,
    /// `cairn cancel` asked for this run to stop.
    pub cancel_requested: bool,
    /// With `--grace`: when the grace period ends (Unix ms). Until then the
    /// workflow is told and may compensate; then it is stopped.
    pub cancel_grace_until: Option<i64>,
    /// The key of the random bytes workflow code reads outside step
    /// closures (see `runtime::random`), drawn when the run was created.
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
    pub random_key: [u8; 32],
}

impl NewRun {
    /// The record of this run as created, with the store's key for it.
    pub fn record(&self, key: RunKey, created_at: i64) -> RunRecord {
        RunRecord {
            key,
            id: self.id.clone(),
            module: self.module.clone(),
            module_path: self.module_path.clone(),
            input: self.input.clone(),
            config: self.config.clone(),
            status: self.status,
            output: None,
            error: None,
            created_at,
            finished_at: None,
            steps: 0,
            cancel_requested: false,
            random_key: Some(self.random_key),
            cancel_grace_until: None,
        }
    }
}

/// What kind of thing a history entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// The outcome of one attempt of a durable step.
    Step,
    /// A clock read by workflow code (outside step closures).
    Clock,
    /// Random bytes read by workflow code (outside step closures), in runs
    /// without a random key.
    Random,
    /// A durable timer (`ctx.sleep`, or `std::thread::sleep` in workflow
    /// code): its absolute wake-up time.
    Timer,
    /// A signal received: its payload (JSON), or empty if the wait timed out.
    Signal,
    /// A parallel branch started (its outcome is kept by branch, elsewhere).
    Spawn,
    /// A cancellation with a grace period, delivered to the workflow here.
    Cancel,
}

impl EntryKind {
    pub const ALL: [EntryKind; 7] = [
        EntryKind::Step,
        EntryKind::Clock,
        EntryKind::Random,
        EntryKind::Timer,
        EntryKind::Signal,
        EntryKind::Spawn,
        EntryKind::Cancel,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Step => "step",
            EntryKind::Clock => "clock",
            EntryKind::Random => "random",
            EntryKind::Timer => "timer",
            EntryKind::Signal => "signal",
            EntryKind::Spawn => "spawn",
            EntryKind::Cancel => "cancel",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        EntryKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// How an entry ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryStatus {
    /// A step that returned a value, or a recorded read.
    Completed,
    /// A step whose closure returned `Err`: the error is its memoized outcome.
    Error,
    /// A step attempt that failed (an `Err`, a panic, a trap, a limit, a
    /// timeout) and will be retried: not memoized; the next attempt runs the
    /// closure again, not before the retry time in `output`.
    Failed,
}

impl EntryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryStatus::Completed => "completed",
            EntryStatus::Error => "error",
            EntryStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [EntryStatus::Completed, EntryStatus::Error, EntryStatus::Failed].into_iter().find(|st| st.as_str() == s)
    }
}

/// One entry of a run's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: EntryKind,
    /// Step name; clock name (`realtime`, `monotonic`); empty for random.
    pub name: String,
    /// 1 for the first step of this name in the run, 2 for the second, ...
    pub occurrence: u32,
    pub attempt: u32,
    pub status: EntryStatus,
    /// Step value (JSON); clock value (u64 little-endian); random bytes;
    /// timer wake-up or failed attempt's retry time (Unix ms, i64
    /// little-endian).
    pub output: Vec<u8>,
    pub error: Option<String>,
    /// Unix milliseconds.
    pub started_at: i64,
    pub finished_at: i64,
}

impl Entry {
    /// The entry kinds a run's step count counts (a spawn stands for its
    /// branch), when their status is not [`Entry::UNCOUNTED_STATUS`].
    pub const COUNTED_KINDS: [EntryKind; 2] = [EntryKind::Step, EntryKind::Spawn];
    /// A failed attempt is not a step: its retry, or final error, is.
    pub const UNCOUNTED_STATUS: EntryStatus = EntryStatus::Failed;

    /// An entry that records an event rather than a step attempt (a read,
    /// a timer, a signal, a spawn), timestamped now.
    pub fn event(kind: EntryKind, name: impl Into<String>, occurrence: u32, output: Vec<u8>) -> Entry {
        let now = now_ms();
        Entry {
            kind,
            name: name.into(),
            occurrence,
            attempt: 0,
            status: EntryStatus::Completed,
            output,
            error: None,
            started_at: now,
            finished_at: now,
        }
    }

    /// Whether the entry counts in a run's step count.
    pub fn counts_as_step(&self) -> bool {
        Entry::COUNTED_KINDS.contains(&self.kind) && self.status != Entry::UNCOUNTED_STATUS
    }

    /// A short description for error messages: `step "charge" #2`.
    pub fn describe(&self) -> String {
        match self.kind {
            EntryKind::Step => format!("step \"{}\" #{}", self.name, self.occurrence),
            EntryKind::Clock => format!("a read of the {} clock", self.name),
            EntryKind::Random => format!("a read of {} random bytes", self.output.len()),
            EntryKind::Timer => "a timer".to_string(),
            EntryKind::Signal => format!("signal \"{}\"", self.name),
            EntryKind::Spawn => format!("branch \"{}\" #{}", self.name, self.occurrence),
            EntryKind::Cancel => "the delivery of a cancellation".to_string(),
        }
    }

    /// The Unix-ms time of a `Timer` entry or of a `Failed` attempt's retry.
    pub fn time_value(&self) -> Option<i64> {
        let bytes: [u8; 8] = self.output.as_slice().try_into().ok()?;
        Some(i64::from_le_bytes(bytes))
    }

    /// The clock value of a `Clock` entry.
    pub fn clock_value(&self) -> Option<u64> {
        let bytes: [u8; 8] = self.output.as_slice().try_into().ok()?;
        Some(u64::from_le_bytes(bytes))
    }
}

/// What an API token may do; each role may do what the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads runs, histories, modules, events and metrics.
    Viewer,
    /// Also starts, signals, cancels and resumes runs.
    Operator,
    /// Also uploads modules and grants directories.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// An API token as stored: its hash, never the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub role: Role,
    /// SHA-256 of the token's secret part.
    pub hash: [u8; 32],
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Unix microseconds now.
pub fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}
