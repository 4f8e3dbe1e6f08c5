//! What people see of runs, as JSON: the objects of `cairn runs --json`
//! and `cairn show --json` (and of the HTTP API). Guest-provided text is
//! carried as JSON strings, so it is escaped whatever it holds.

use serde_json::{Value, json};

use crate::model::{Entry, EntryKind, EntryStatus, RunRecord};

/// A run with its history and its branches' attempts.
#[derive(Debug, Clone)]
pub struct RunView {
    pub run: RunRecord,
    pub history: Vec<Entry>,
    pub branches: Vec<Entry>,
}

/// A branch's state as its spawn entry shows it: status, output, error.
pub struct BranchState {
    pub status: String,
    pub output: Value,
    pub error: Option<String>,
}

impl RunView {
    /// The branch a spawn entry started, by its final attempt.
    pub fn spawn_state(&self, spawn: &Entry) -> BranchState {
        let last = self
            .branches
            .iter()
            .filter(|b| b.name == spawn.name && b.occurrence == spawn.occurrence)
            .max_by_key(|b| b.attempt);
        match last {
            Some(b) if b.status != EntryStatus::Failed => {
                BranchState { status: b.status.as_str().to_string(), output: entry_output(b), error: b.error.clone() }
            }
            _ => BranchState { status: "running".to_string(), output: Value::Null, error: None },
        }
    }

    /// The history's entries as JSON, the first at position `first`.
    pub fn history_json(&self, first: usize) -> Vec<Value> {
        self.history
            .iter()
            .enumerate()
            .map(|(i, e)| {
                if e.kind == EntryKind::Spawn {
                    let state = self.spawn_state(e);
                    let mut v = entry_json(Some(first + i), e, state.output);
                    v["branch_status"] = json!(state.status);
                    v["error"] = json!(state.error);
                    v
                } else {
                    entry_json(Some(first + i), e, entry_output(e))
                }
            })
            .collect()
    }

    /// `cairn show --json`.
    pub fn to_json(&self) -> Value {
        let entries = self.history_json(0);
        let mut obj = run_summary(&self.run);
        obj["input"] = output_json(Some(&self.run.input));
        obj["output"] = output_json(self.run.output.as_deref());
        obj["history"] = Value::Array(entries);
        obj["branches"] = Value::Array(self.branches.iter().map(|b| entry_json(None, b, entry_output(b))).collect());
        obj
    }
}

/// The last millisecond RFC 3339 can write (9999-12-31T23:59:59.999Z).
const LAST_MS: i64 = 253_402_300_799_999;

/// RFC 3339 with milliseconds, for Unix ms; any value (a guest's timer far
/// in the future, a row edited by hand) is written, clamped to the years
/// 1970 to 9999.
pub fn time(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.clamp(0, LAST_MS) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Stored JSON bytes as a value (text that is not JSON as a string).
pub fn output_json(bytes: Option<&[u8]>) -> Value {
    bytes.map_or(Value::Null, |b| {
        serde_json::from_slice(b).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(b).into()))
    })
}

/// One run, as `cairn runs --json` lists it.
pub fn run_summary(r: &RunRecord) -> Value {
    json!({
        "id": r.id,
        "module": r.module,
        "module_path": r.module_path,
        "status": r.status.as_str(),
        "steps": r.steps,
        "created_at": time(r.created_at),
        "finished_at": r.finished_at.map(time),
        "error": r.error,
    })
}

/// A key-value entry, for people and API clients.
pub fn kv_entry(key: &str, v: &crate::store::KvValue) -> Value {
    json!({
        "key": key,
        "value": output_json(v.value.as_deref()),
        "version": v.version,
        "updated_at": time(v.updated_at),
    })
}

/// What an entry holds, for people.
pub fn entry_output(e: &Entry) -> Value {
    match e.kind {
        EntryKind::Step if e.status == EntryStatus::Completed => output_json(Some(&e.output)),
        EntryKind::Step => e.time_value().map_or(Value::Null, |t| json!({ "retry_at": time(t) })),
        EntryKind::Timer => e.time_value().map_or(Value::Null, |t| json!({ "wake_at": time(t) })),
        EntryKind::Signal if e.output.is_empty() => json!({ "timed_out": true }),
        EntryKind::Signal => output_json(Some(&e.output)),
        // Filled in from the branch's attempts (`RunView::spawn_state`).
        EntryKind::Spawn => Value::Null,
        EntryKind::Clock => e.clock_value().map_or(Value::Null, |v| json!(v)),
        EntryKind::Random => Value::String(hex::encode(&e.output)),
        EntryKind::Cancel => e.time_value().map_or(Value::Null, |t| json!({ "grace_until": time(t) })),
    }
}

fn entry_json(position: Option<usize>, e: &Entry, output: Value) -> Value {
    let mut v = json!({
        "kind": e.kind.as_str(),
        "name": e.name,
        "occurrence": e.occurrence,
        "attempt": e.attempt,
        "status": e.status.as_str(),
        "output": output,
        "error": e.error,
        "started_at": time(e.started_at),
        "finished_at": time(e.finished_at),
        "duration_ms": e.finished_at.saturating_sub(e.started_at),
    });
    if let Some(p) = position {
        v["position"] = json!(p);
    }
    v
}
