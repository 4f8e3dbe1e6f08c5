//! A run's history: the ordered list of everything that happened in it, and
//! the cursor that walks it on replay.
//!
//! Live execution appends at the end; replay walks the same list from the
//! start and hands each recorded outcome back instead of doing the work
//! again. The whole history is loaded in one query when a run (re)starts, so
//! replay never touches SQL.

use std::collections::HashMap;
use std::fmt;

use crate::model::{Entry, EntryKind, EntryStatus};

/// What an entry takes in memory, roughly: its variable parts and a fixed
/// overhead.
pub fn entry_bytes(e: &Entry) -> usize {
    64 + e.name.len() + e.output.len() + e.error.as_ref().map_or(0, String::len)
}

/// What the workflow is asking for at a host call, checked against the
/// entry under the cursor during replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    Step { name: &'a str, occurrence: u32 },
    Clock { name: &'a str },
    Random { len: usize },
    Timer,
    Signal { name: &'a str },
    Spawn { name: &'a str, occurrence: u32 },
    Finish,
}

impl fmt::Display for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Step { name, occurrence } => write!(f, "step \"{name}\" #{occurrence}"),
            Request::Clock { name } => write!(f, "a read of the {name} clock"),
            Request::Random { len } => write!(f, "a read of {len} random bytes"),
            Request::Timer => write!(f, "a timer"),
            Request::Signal { name } => write!(f, "signal \"{name}\""),
            Request::Spawn { name, occurrence } => write!(f, "branch \"{name}\" #{occurrence}"),
            Request::Finish => write!(f, "to finish the workflow"),
        }
    }
}

/// A replay that does not match the history.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "non-determinism in run {run_id} at history position {position}: the history holds {recorded}, \
     but the module asked for {requested}. The history is unchanged. Workflow code between steps \
     must do the same thing on every execution: restore what it read (files, environment) or \
     start a new run."
)]
pub struct NonDeterminism {
    pub run_id: String,
    pub position: usize,
    pub recorded: String,
    pub requested: String,
}

/// The in-memory history of one run and the replay cursor over it.
#[derive(Debug, Default)]
pub struct Journal {
    entries: Vec<Entry>,
    /// Next position to replay; equal to `entries.len()` once live.
    cursor: usize,
    /// `entries[..submitted]` have been handed to the store.
    submitted: usize,
    /// What the entries take, roughly ([`entry_bytes`]): bounded by
    /// `--max-history-mib`.
    bytes: usize,
    occurrences: HashMap<String, u32>,
    /// The history holds a delivered cancellation.
    cancel_delivered: bool,
}

/// What `Journal::begin_step` found.
#[derive(Debug)]
pub enum StepStart<'a> {
    /// The step has a recorded outcome: return it, do not run the closure.
    Memoized(&'a Entry),
    /// Run the closure live; this is its attempt number, and the time
    /// (Unix ms) before which it must not start (a failed attempt's backoff).
    Live { occurrence: u32, attempt: u32, not_before: Option<i64> },
}

impl Journal {
    pub fn new(mut entries: Vec<Entry>) -> Self {
        // A new run: room for a short run's entries without regrowing. (A
        // loaded history is not reserved: that would copy all of it.)
        if entries.is_empty() {
            entries.reserve(16);
        }
        let submitted = entries.len();
        let bytes = entries.iter().map(entry_bytes).sum();
        let cancel_delivered = entries.iter().any(|e| e.kind == EntryKind::Cancel);
        Journal { entries, cursor: 0, submitted, bytes, occurrences: HashMap::new(), cancel_delivered }
    }

    /// Roughly the bytes the entries take in memory.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Entries recorded and not yet handed to the store.
    pub fn unsubmitted(&self) -> usize {
        self.entries.len() - self.submitted
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// True while the cursor is still inside the recorded history.
    pub fn replaying(&self) -> bool {
        self.cursor < self.entries.len()
    }

    pub fn cursor(&self) -> usize {
        self.cursor
    }

    fn diverged(&self, run_id: &str, requested: &Request) -> NonDeterminism {
        NonDeterminism {
            run_id: run_id.to_string(),
            position: self.cursor,
            recorded: self
                .entries
                .get(self.cursor)
                .map_or_else(|| "nothing more (the workflow had finished)".to_string(), Entry::describe),
            requested: requested.to_string(),
        }
    }

    /// Count one more occurrence of `name` (steps and spawns share the
    /// count); the name is copied only the first time it is seen.
    fn next_occurrence(&mut self, name: &str) -> u32 {
        let n = match self.occurrences.get_mut(name) {
            Some(n) => n,
            None => self.occurrences.entry(name.to_string()).or_insert(0),
        };
        *n += 1;
        *n
    }

    /// A step begins: return its memoized outcome, or say it must run live.
    /// Failed attempts recorded for it are skipped and counted.
    pub fn begin_step(&mut self, run_id: &str, name: &str) -> Result<StepStart<'_>, NonDeterminism> {
        let occurrence = self.next_occurrence(name);
        let mut attempt = 1;
        let mut not_before = None;
        while let Some(e) = self.entries.get(self.cursor) {
            // A cancellation delivered while the step waited for its retry
            // (the caller replays it next).
            if e.kind == EntryKind::Cancel {
                break;
            }
            if e.kind != EntryKind::Step || e.name != name || e.occurrence != occurrence {
                return Err(self.diverged(run_id, &Request::Step { name, occurrence }));
            }
            self.cursor += 1;
            if e.status == EntryStatus::Failed {
                attempt = e.attempt + 1;
                not_before = e.time_value();
                continue;
            }
            return Ok(StepStart::Memoized(&self.entries[self.cursor - 1]));
        }
        Ok(StepStart::Live { occurrence, attempt, not_before })
    }

    /// A branch is spawned: its occurrence (shared with steps, so keys never
    /// collide), and whether the spawn is replayed (true) or new (false).
    pub fn begin_spawn(&mut self, run_id: &str, name: &str) -> Result<(u32, bool), NonDeterminism> {
        let occurrence = self.next_occurrence(name);
        match self.entries.get(self.cursor) {
            None => Ok((occurrence, false)),
            Some(e) if e.kind == EntryKind::Spawn && e.name == name && e.occurrence == occurrence => {
                self.cursor += 1;
                Ok((occurrence, true))
            }
            Some(_) => Err(self.diverged(run_id, &Request::Spawn { name, occurrence })),
        }
    }

    /// A recorded read (clock or random) for the request, if replaying.
    /// `Ok(None)` means: live, read for real and `record` the result.
    pub fn replay_read(&mut self, run_id: &str, request: &Request) -> Result<Option<&Entry>, NonDeterminism> {
        let Some(e) = self.entries.get(self.cursor) else {
            return Ok(None);
        };
        let matches = match request {
            Request::Clock { name } => e.kind == EntryKind::Clock && e.name == *name,
            Request::Random { len } => e.kind == EntryKind::Random && e.output.len() == *len,
            Request::Timer => e.kind == EntryKind::Timer,
            Request::Signal { name } => e.kind == EntryKind::Signal && e.name == *name,
            _ => false,
        };
        if !matches {
            return Err(self.diverged(run_id, request));
        }
        self.cursor += 1;
        Ok(Some(&self.entries[self.cursor - 1]))
    }

    /// The delivered cancellation under the cursor, if that is what is there.
    pub fn replay_cancel(&mut self) -> Option<&Entry> {
        if self.entries.get(self.cursor).is_some_and(|e| e.kind == EntryKind::Cancel) {
            self.cursor += 1;
            return Some(&self.entries[self.cursor - 1]);
        }
        None
    }

    /// True once a cancellation was delivered to the workflow.
    pub fn cancel_delivered(&self) -> bool {
        self.cancel_delivered
    }

    /// The workflow finished: the history must have been replayed to its end.
    pub fn check_finish(&self, run_id: &str) -> Result<(), NonDeterminism> {
        if self.replaying() {
            return Err(self.diverged(run_id, &Request::Finish));
        }
        Ok(())
    }

    /// Append a new entry at the end (live execution only).
    pub fn record(&mut self, entry: Entry) {
        debug_assert!(!self.replaying());
        self.bytes += entry_bytes(&entry);
        self.cancel_delivered |= entry.kind == EntryKind::Cancel;
        self.entries.push(entry);
        self.cursor = self.entries.len();
    }

    /// Append an entry the store already committed (a consumed signal).
    pub fn record_committed(&mut self, entry: Entry) {
        debug_assert!(!self.replaying() && !self.has_unsubmitted());
        self.record(entry);
        self.submitted = self.entries.len();
    }

    /// True if entries were recorded that the store has not been given yet.
    pub fn has_unsubmitted(&self) -> bool {
        self.submitted < self.entries.len()
    }

    /// The entries not yet handed to the store, with their first position;
    /// marks them as handed over.
    pub fn take_unsubmitted(&mut self) -> (usize, Vec<Entry>) {
        let from = self.submitted;
        self.submitted = self.entries.len();
        (from, self.entries[from..].to_vec())
    }

    /// The largest monotonic clock value recorded so far.
    pub fn last_monotonic(&self) -> Option<u64> {
        self.entries
            .iter()
            .filter(|e| e.kind == EntryKind::Clock && e.name == "monotonic")
            .filter_map(Entry::clock_value)
            .max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(name: &str, occurrence: u32, status: EntryStatus) -> Entry {
        Entry {
            kind: EntryKind::Step,
            name: name.into(),
            occurrence,
            attempt: 1,
            status,
            output: b"1".to_vec(),
            error: None,
            started_at: 0,
            finished_at: 0,
        }
    }

    #[test]
    fn replays_then_goes_live() {
        let mut j = Journal::new(vec![step("a", 1, EntryStatus::Completed)]);
        assert!(matches!(j.begin_step("r", "a").unwrap(), StepStart::Memoized(_)));
        assert!(!j.replaying());
        match j.begin_step("r", "a").unwrap() {
            StepStart::Live { occurrence, attempt, not_before } => {
                assert_eq!((occurrence, attempt, not_before), (2, 1, None))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn failed_attempts_are_counted_not_memoized() {
        let mut failed = step("a", 1, EntryStatus::Failed);
        failed.attempt = 1;
        failed.output = 1234i64.to_le_bytes().to_vec();
        let mut j = Journal::new(vec![failed]);
        match j.begin_step("r", "a").unwrap() {
            StepStart::Live { occurrence, attempt, not_before } => {
                assert_eq!((occurrence, attempt, not_before), (1, 2, Some(1234)))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn divergence_names_run_position_and_both_sides() {
        let mut j = Journal::new(vec![step("a", 1, EntryStatus::Completed)]);
        let err = j.begin_step("run-7", "b").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("run-7") && msg.contains("position 0"), "{msg}");
        assert!(msg.contains("step \"a\" #1") && msg.contains("step \"b\" #1"), "{msg}");
    }

    #[test]
    fn finishing_early_is_divergence() {
        let j = Journal::new(vec![step("a", 1, EntryStatus::Completed)]);
        assert!(j.check_finish("r").is_err());
    }
}
