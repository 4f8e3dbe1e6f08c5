//! The shapes of the API's bodies, for the OpenAPI document. Run objects
//! are the JSON of `cairn runs --json` and `cairn show --json`
//! (`service::views`), so they are described here rather than typed twice.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// A run as `cairn runs --json` lists it.
#[derive(Serialize, ToSchema)]
pub struct RunSummary {
    pub id: String,
    /// The module's SHA-256, hex.
    pub module: String,
    pub module_path: String,
    /// pending, running, sleeping, waiting, completed, failed or cancelled.
    pub status: String,
    pub steps: u64,
    /// RFC 3339.
    pub created_at: String,
    pub finished_at: Option<String>,
    pub error: Option<String>,
}

/// A page of runs, newest first.
#[derive(Serialize, ToSchema)]
pub struct RunPage {
    pub runs: Vec<RunSummary>,
    /// The `after` of the next page; null on the last.
    pub next: Option<i64>,
    /// The change-feed position this page is current to (`Last-Event-ID`
    /// for `/api/events`).
    pub seq: u64,
}

/// A history entry: a step attempt, a timer, a signal, a branch spawn, a
/// clock or random read.
#[derive(Serialize, ToSchema)]
pub struct Entry {
    pub position: Option<u64>,
    /// step, timer, signal, spawn, clock or random.
    pub kind: String,
    pub name: String,
    pub occurrence: u32,
    pub attempt: u32,
    /// completed, failed (to be retried: `output.retry_at`), error, ...
    pub status: String,
    pub output: Value,
    pub error: Option<String>,
    pub started_at: String,
    pub finished_at: String,
    pub duration_ms: i64,
    /// For a spawn: its branch's state.
    pub branch_status: Option<String>,
}

/// A run as `cairn show --json` shows it, plus `seq`.
#[derive(Serialize, ToSchema)]
pub struct RunDetail {
    #[serde(flatten)]
    pub summary: RunSummary,
    pub input: Value,
    pub output: Value,
    pub history: Vec<Entry>,
    /// Every attempt of the run's parallel branches.
    pub branches: Vec<Entry>,
    /// The change-feed position this view is current to: subscribe to
    /// `/api/runs/{id}/events` with `Last-Event-ID: seq` to miss nothing.
    pub seq: u64,
}

/// A page of a run's history.
#[derive(Serialize, ToSchema)]
pub struct HistoryPage {
    pub entries: Vec<Entry>,
    /// The `after` of the next page; null on the last.
    pub next: Option<u64>,
}

/// A stored module.
#[derive(Serialize, ToSchema)]
pub struct ModuleInfo {
    /// SHA-256 of the bytes, hex.
    pub hash: String,
    pub size: usize,
    /// `module.name` of each import.
    pub imports: Vec<String>,
    pub exports: Vec<String>,
}

/// A module of the list.
#[derive(Serialize, ToSchema)]
pub struct ModuleEntry {
    pub hash: String,
    pub size: u64,
    pub created_at: String,
}

#[derive(Serialize, ToSchema)]
pub struct ModuleList {
    pub modules: Vec<ModuleEntry>,
}

/// `POST /api/runs`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRun {
    /// A module's hash (`POST /api/modules` first).
    pub module: String,
    /// The workflow's input.
    #[serde(default)]
    pub input: Value,
    /// An id of your own (letters, digits, `-`, `_`, `.`); by default a new UUID.
    pub run_id: Option<String>,
    /// `HOST::GUEST` directory grants (admin; inside an `--allow-dir`).
    #[serde(default)]
    pub dirs: Vec<String>,
    #[serde(default)]
    pub env: std::collections::HashMap<String, String>,
    /// Hosts steps may reach over HTTP, as `--allow-http` (admin).
    #[serde(default)]
    pub allow_http: Vec<String>,
    /// Plain `http://` beyond loopback, as `--allow-http-insecure` (admin).
    #[serde(default)]
    pub allow_http_insecure: bool,
    /// `HOST:NAME=@env:VAR` headers from the server's environment, as `--http-header` (admin).
    #[serde(default)]
    pub http_headers: Vec<String>,
    /// The key-value namespace of the run's steps, as `--kv-namespace`.
    pub kv_namespace: Option<String>,
    /// The limits of `cairn run` by flag name without dashes, e.g. `{"max_memory": 64}`.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub limits: crate::service::request::LimitArgs,
}

/// `POST /api/runs/{id}/cancel` (the body is optional).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelRun {
    /// Seconds the workflow may clean up (compensate) before it is stopped;
    /// without it, the run stops at its next host call and is not told.
    pub grace: Option<f64>,
}

#[derive(Serialize, ToSchema)]
pub struct Started {
    pub run_id: String,
}

/// A request taken: the run acts on it soon.
#[derive(Serialize, ToSchema)]
pub struct Accepted {
    /// What the run is now (`requested`, `cancelled`, or its status).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// A key-value entry (`cairn kv`).
#[derive(Serialize, ToSchema)]
pub struct KvEntry {
    pub key: String,
    /// The value, JSON.
    #[schema(value_type = Object)]
    pub value: Value,
    /// Grows with every write of the key.
    pub version: u64,
    pub updated_at: String,
}

/// `GET /api/kv/{namespace}`.
#[derive(Serialize, ToSchema)]
pub struct KvPage {
    pub entries: Vec<KvEntry>,
    /// The `after` of the next page; null on the last.
    pub next: Option<String>,
}
