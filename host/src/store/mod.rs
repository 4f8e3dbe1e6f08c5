//! The store contract: what the engine needs from a database, and nothing
//! of how one database provides it.
//!
//! - Writes go through [`RunStore::submit`] as *commit items*: every write
//!   of one item lands together or not at all, one bad item never takes its
//!   batch-mates down with it, and the returned ticket resolves once the
//!   commit is durable at the configured [`Durability`].
//! - Every commit that changes a run gets a place in one store-wide,
//!   strictly increasing, durable sequence, and is published as a
//!   [`ChangeEvent`] (see [`feed`]); [`RunStore::changes_since`] replays
//!   them for whoever missed some.
//! - A run is executed by one process at a time: whoever holds its
//!   [`Lease`].
//!
//! `sqlite` implements it today; [`conformance`] is the suite any
//! implementation must pass.

pub mod feed;
pub mod postgres;
pub mod sqlite;

#[cfg(test)]
mod conformance;

use std::fmt;

use tokio::sync::oneshot;

pub use crate::model::{Entry, NewRun, RunKey, RunRecord, RunStatus, TokenRecord};
pub use feed::{ChangeEvent, ChangeFeed, ChangeKind, Subscription};

/// One write; a commit item is a list of them, applied together.
#[derive(Debug)]
pub enum Write {
    /// Store a module's bytes under their hash (kept if already there).
    PutModule { hash: String, bytes: Vec<u8> },
    /// Create a run; with `lease`, this process holds the run's lease before
    /// the commit makes the run visible to anyone else.
    CreateRun { run: Box<NewRun>, lease: bool },
    /// Append history entries starting at `position`.
    Append { run: RunKey, position: usize, entries: Vec<Entry> },
    /// Set a run's status (and, when it finishes, its output or error).
    SetStatus { run: RunKey, status: RunStatus, output: Option<Vec<u8>>, error: Option<String> },
    /// Deliver a signal (kept until the run waits for it), unless the run
    /// already has `max_pending` undelivered ones.
    SendSignal { run: RunKey, name: String, payload: Vec<u8>, max_pending: u64 },
    /// Ask the run's executor to stop it: at once (`grace_until` `None`),
    /// or by telling the workflow and stopping it at `grace_until` (Unix
    /// ms). Of several requests, the earliest stop holds.
    RequestCancel { run: RunKey, grace_until: Option<i64> },
    /// Key-value writes, applied only if every key read still has the
    /// version read; else the whole item fails with `KvConflict`.
    Kv(Box<KvCommit>),
    /// An ended attempt of a parallel branch (a `Step` entry).
    BranchAttempt { run: RunKey, entry: Entry },
    /// Take the oldest undelivered signal `name` of the run, if any, and
    /// append `entry` (its output replaced by the payload) at the position.
    ConsumeSignal { run: RunKey, name: String, entry: (usize, Entry) },
    /// Record an API token (its hash); its id and name must be new.
    CreateToken { token: TokenRecord },
    /// Revoke the token with this id or name (once; later revokes are no-ops).
    RevokeToken { id_or_name: String },
}

impl Write {
    /// The existing run this write changes, if any.
    pub fn run(&self) -> Option<RunKey> {
        match self {
            Write::PutModule { .. }
            | Write::CreateRun { .. }
            | Write::CreateToken { .. }
            | Write::RevokeToken { .. }
            | Write::Kv(_) => None,
            Write::Append { run, .. }
            | Write::SetStatus { run, .. }
            | Write::SendSignal { run, .. }
            | Write::RequestCancel { run, .. }
            | Write::BranchAttempt { run, .. }
            | Write::ConsumeSignal { run, .. } => Some(*run),
        }
    }

    /// The run ends as failed, with this error.
    pub fn failed(run: RunKey, error: String) -> Self {
        Write::SetStatus { run, status: RunStatus::Failed, output: None, error: Some(error) }
    }

    /// The run ends as cancelled.
    pub fn cancelled(run: RunKey) -> Self {
        Write::SetStatus { run, status: RunStatus::Cancelled, output: None, error: Some("cancelled".into()) }
    }

    /// A status change with nothing else (no output, no error).
    pub fn status(run: RunKey, status: RunStatus) -> Self {
        Write::SetStatus { run, status, output: None, error: None }
    }
}

/// A step attempt's key-value reads and writes in one namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvCommit {
    pub namespace: String,
    /// Keys read, with the version seen ([`KvValue::version`]; 0: never written).
    pub reads: Vec<(String, u64)>,
    /// Keys written, in order: a value (JSON), or `None` to delete.
    pub writes: Vec<(String, Option<Vec<u8>>)>,
    /// Live keys the namespace may hold after the writes.
    pub max_keys: u64,
}

/// A key's state: its value (`None` once deleted) and its version, which
/// grows with every write and is never reused (a deleted key keeps its
/// version), so a version read identifies one state of the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvValue {
    pub value: Option<Vec<u8>>,
    pub version: u64,
    /// When it was last written (Unix ms).
    pub updated_at: i64,
}

/// What a commit produced, for the writes that produce something.
#[derive(Debug, Default)]
pub struct Committed {
    /// Runs created by this item, with their lease if one was asked for.
    pub created: Vec<(RunRecord, Option<Lease>)>,
    /// The payload a `ConsumeSignal` took.
    pub signal: Option<Vec<u8>>,
}

/// Resolves when the item is durable, or says why it is not.
pub type CommitTicket = oneshot::Receiver<Result<Committed, StoreError>>;

/// How durable a commit is before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Flushed to stable storage before a step returns: survives power loss.
    Power,
    /// Handed to the OS before a step returns, no flush per commit:
    /// survives a killed process, not a power loss.
    Process,
}

/// The right to execute one run, held by one process at a time; released
/// when dropped (or when the holder dies). Each store backs it its own way:
/// on SQLite an OS lock that the kernel drops the moment the process dies
/// (takeover is instant, and `epoch` stays 0); a database with leases that
/// expire would count takeovers in `epoch` and check it on every write.
pub struct Lease {
    run: RunKey,
    epoch: u64,
    _held: Box<dyn Send + Sync>,
}

impl Lease {
    /// `held` releases the lease when dropped.
    pub fn new(run: RunKey, epoch: u64, held: Box<dyn Send + Sync>) -> Self {
        Lease { run, epoch, _held: held }
    }

    pub fn run(&self) -> RunKey {
        self.run
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease").field("run", &self.run).field("epoch", &self.epoch).finish()
    }
}

/// What can go wrong in a store, in words that do not depend on which
/// database it is.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{location} is not a Cairn database ({why}); use --db to pick another file")]
    NotCairn { location: String, why: String },
    #[error(
        "{location} was written by a newer Cairn (schema version {found}; this build knows up to {known}); \
         upgrade cairn, the file was not changed"
    )]
    TooNew { location: String, found: i64, known: i64 },
    #[error(
        "{0} is not empty: cairn migrate moves a database into an empty one only, so nothing there is mixed or lost"
    )]
    NotEmpty(String),
    #[error("the database {location} is locked by another process (waited {waited_ms} ms); try again when it is done")]
    Locked { location: String, waited_ms: u64 },
    #[error("cannot open the database {location}: {why}")]
    CannotOpen { location: String, why: String },
    #[error("a run with id {0:?} already exists; continue it with `cairn resume {0}`")]
    RunExists(String),
    #[error("a token named {0:?} exists already")]
    TokenExists(String),
    #[error("there is no token with id or name {0:?}")]
    NoSuchToken(String),
    #[error("the run being written ({0}) no longer exists")]
    NoSuchRun(RunKey),
    #[error("the run has {0} signals it has not received yet; no more are kept until it takes some")]
    SignalsFull(u64),
    /// A key the item read changed before it committed: nothing of the
    /// item was written, and the attempt can run again.
    #[error("key-value conflict: key {key:?} changed since it was read")]
    KvConflict { key: String },
    #[error("limit `--max-kv-keys` exceeded: namespace {namespace:?} would hold more than {max} keys")]
    KvFull { namespace: String, max: u64 },
    /// Another process took the run over since this one leased it (its
    /// lease expired): nothing is written for it by this process again.
    #[error(
        "the lease of run {run} was taken over by another process (this one held epoch {held}, the run is at {now}); this process no longer writes for it"
    )]
    LeaseLost { run: RunKey, held: u64, now: u64 },
    #[error("commit failed: {0}")]
    Commit(String),
    /// Flushing to stable storage failed. What the OS was given may be lost
    /// without a trace, and a retried flush can report success for data
    /// that is gone (PostgreSQL's "fsyncgate"): the store accepts no more
    /// commits, and the process should stop and recover from what is durable.
    #[error(
        "the database {location} could not be flushed to disk (fsync failed); Cairn stops rather than retry: \
         check the disk, then `cairn resume` continues from what is durable"
    )]
    Unsynced { location: String },
    #[error("the database writer has stopped")]
    WriterGone,
    /// A failure of the database itself (I/O, a constraint, a bug), with
    /// the database's own message.
    #[error("database: {0}")]
    Backend(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// Everything the engine, the service layer and the tools ask of a
/// database. Reads are `async`: a store whose reads never wait for its
/// writer (SQLite in WAL mode) may answer inline, a networked one awaits.
#[async_trait::async_trait]
pub trait RunStore: Send + Sync {
    /// Random id made when the database was created; mixed into every
    /// idempotency key so two databases never hand out the same key.
    fn db_id(&self) -> &str;

    /// A secret of the database: it authenticates the compiled-module cache
    /// entries of its modules (see `runtime::engine::ModuleCache`).
    fn cache_key(&self) -> [u8; 32];

    /// Where the database is, for messages (a path, a URL without secrets).
    fn location(&self) -> &str;

    /// Queue a commit item; the ticket resolves once it is durable.
    fn submit(&self, writes: Vec<Write>) -> CommitTicket;

    /// Committed changes from now on: this process's commits as they
    /// happen, other processes' soon after. Nothing committed after this
    /// call returns is missed (a receiver that falls too far behind is told
    /// so, and can catch up with [`RunStore::changes_since`]).
    fn subscribe(&self) -> Subscription;

    /// Like [`RunStore::subscribe`], but only control events
    /// ([`ChangeEvent::is_control`]): what executing runs wait for.
    fn subscribe_control(&self) -> Subscription;

    async fn module(&self, hash: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every stored module: (hash, size in bytes, stored at Unix ms), oldest first.
    async fn modules(&self) -> Result<Vec<(String, u64, i64)>, StoreError>;
    async fn run(&self, id: &str) -> Result<Option<RunRecord>, StoreError>;
    /// The id of the run with this key.
    async fn run_id(&self, run: RunKey) -> Result<Option<String>, StoreError>;
    /// All runs, oldest first.
    async fn runs(&self) -> Result<Vec<RunRecord>, StoreError>;
    /// A page of runs, newest first.
    async fn runs_page(&self, filter: &RunFilter) -> Result<Vec<RunRecord>, StoreError>;
    /// How many runs there are of each status (statuses with none left out).
    async fn run_counts(&self) -> Result<Vec<(RunStatus, u64)>, StoreError>;
    /// The keys of runs that are not finished, oldest first: what a worker
    /// scans for runs to claim (a cheap read, however many runs are parked).
    async fn unfinished_keys(&self) -> Result<Vec<RunKey>, StoreError>;
    /// The run with this key.
    async fn run_by_key(&self, run: RunKey) -> Result<Option<RunRecord>, StoreError>;
    /// Runs that are not finished, oldest first.
    async fn unfinished_runs(&self) -> Result<Vec<RunRecord>, StoreError>;
    /// A run's whole history, in one query.
    async fn history(&self, run: RunKey) -> Result<Vec<Entry>, StoreError>;
    /// Up to `limit` entries of a run's history from position `from` on.
    async fn history_page(&self, run: RunKey, from: u64, limit: usize) -> Result<Vec<Entry>, StoreError>;
    /// Every ended attempt of the run's parallel branches, in the order they ended.
    async fn branch_attempts(&self, run: RunKey) -> Result<Vec<Entry>, StoreError>;

    /// Every API token, oldest first (revoked ones too).
    async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    /// The API token with this id.
    async fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError>;

    /// A key's value and version (version 0, no value: never written).
    async fn kv_get(&self, namespace: &str, key: &str) -> Result<KvValue, StoreError>;
    /// Up to `limit` live keys of a namespace starting with `prefix`, after
    /// the key `after`, in key order.
    async fn kv_list(
        &self,
        namespace: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, KvValue)>, StoreError>;

    /// Who holds the run's lease and until when (Unix ms), where the store
    /// knows (leases that expire); `None` if nobody does, or it cannot tell.
    async fn lease_holder(&self, _run: RunKey) -> Result<Option<(String, i64)>, StoreError> {
        Ok(None)
    }

    /// Take the run's lease; `None` if another holder has it.
    async fn lease(&self, run: RunKey) -> Result<Option<Lease>, StoreError>;

    /// Claim up to `max` unfinished runs that nobody holds, oldest first,
    /// passing over those `skip` names: each read again under its lease
    /// (a previous holder may have finished it meanwhile).
    async fn claim_runs(
        &self,
        max: usize,
        skip: &(dyn Fn(RunKey) -> bool + Send + Sync),
    ) -> Result<Vec<(RunRecord, Lease)>, StoreError> {
        let mut claimed = Vec::new();
        // Keys first (a worker holding 100,000 parked runs scans them at
        // every look), then a lease and the whole run for each candidate.
        for key in self.unfinished_keys().await? {
            if claimed.len() >= max {
                break;
            }
            if skip(key) {
                continue;
            }
            let Some(lease) = self.lease(key).await? else { continue };
            match self.run_by_key(key).await? {
                Some(run) if !run.status.is_finished() => claimed.push((run, lease)),
                _ => drop(lease),
            }
        }
        Ok(claimed)
    }

    /// Give back every lease this process holds, at once (a clean stop):
    /// others take the runs over without waiting for the leases to expire.
    /// Writes under them are refused afterwards. A no-op where locks go
    /// with their process.
    async fn release_all(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// How soon the earliest lease another process holds on an unfinished
    /// run expires, or a run given back while it sleeps comes due, if either
    /// does (the run can be claimed then); `None` for stores whose locks go
    /// with their process.
    async fn next_takeover_in(&self) -> Result<Option<std::time::Duration>, StoreError> {
        Ok(None)
    }

    /// Runs that sleep, or wait for a signal, at least this long are given
    /// back ([`RunStore::release_parked`]) rather than kept by their holder;
    /// `None`: this store keeps them with their holder (SQLite, where a
    /// lock costs nothing to keep and goes with its process).
    fn releases_parked_after(&self) -> Option<std::time::Duration> {
        None
    }

    /// Give back the lease of a run that sleeps until `wake_at` (Unix ms),
    /// or waits for `signal` (until `wake_at`, if any): nobody holds it
    /// meanwhile (no heartbeat renews it), and a claim takes it again once
    /// it is due, found by an index on the wake-up time, or once the
    /// signal is there ([`RunStore::claim_runs`]). Refused (nothing
    /// changes) if the lease was lost or the run does not wait.
    async fn release_parked(&self, lease: Lease, wake_at: Option<i64>, signal: Option<&str>) -> Result<(), StoreError> {
        let _ = (wake_at, signal);
        drop(lease);
        Ok(())
    }

    /// The highest change sequence number committed so far (0 if none).
    async fn last_seq(&self) -> Result<u64, StoreError>;
    /// Up to `limit` changes with a sequence number above `after`, in order.
    async fn changes_since(&self, after: u64, limit: usize) -> Result<Vec<ChangeEvent>, StoreError>;
}

/// Which runs [`RunStore::runs_page`] returns.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub status: Option<RunStatus>,
    /// The module's hash starts with this.
    pub module_prefix: Option<String>,
    /// Only runs older than this one (the previous page's last).
    pub before: Option<RunKey>,
    pub limit: usize,
}

/// Submit a commit item and wait until it is durable.
pub async fn commit(store: &dyn RunStore, writes: Vec<Write>) -> Result<Committed, StoreError> {
    store.submit(writes).await.unwrap_or(Err(StoreError::WriterGone))
}
