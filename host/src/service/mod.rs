//! What Cairn does for its users, whichever way they reach it: start,
//! resume, cancel and signal runs, list and view them, claim work for a
//! worker, and subscribe to changes. Typed values in, typed values and
//! [`ServiceError`]s out; the command line (`cli`) and the coming HTTP
//! server are shells over these calls.

mod error;
pub mod request;
pub mod tokens;
pub mod views;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

pub use error::{ErrorClass, ErrorCode, ServiceError, exit};
pub use request::{StartModule, StartRequest};
pub use views::RunView;

use crate::model::{NewRun, RunKey, RunRecord, RunStatus};
use crate::runtime::random;
use crate::runtime::{Executor, RunOutcome};
use crate::store::{ChangeKind, Lease, RunStore, Subscription, Write, commit};

/// Undelivered signals kept per run; more are refused until it takes some.
pub const MAX_PENDING_SIGNALS: u64 = 10_000;

/// How long `cancel` waits for the executing process to stop the run.
const CANCEL_WAIT: Duration = Duration::from_secs(5);

/// A run this process may execute: it holds the lease, and the record was
/// read under it.
#[derive(Debug)]
pub struct ClaimedRun {
    /// Shared with the executor while it runs (one copy per parked run).
    pub run: Arc<RunRecord>,
    pub lease: Lease,
}

/// How a new run is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    /// `running`, leased by this process, to execute here at once.
    Execute,
    /// `pending`, for a worker (or `resume`) to claim.
    Queue,
}

/// A created run, with its lease when it was created to execute here.
#[derive(Debug)]
pub struct StartedRun {
    pub run: RunRecord,
    pub lease: Option<Lease>,
}

/// What an attempt to claim a run found.
#[derive(Debug)]
pub enum Claim {
    Claimed(ClaimedRun),
    /// Another process holds it.
    Busy,
    /// It is finished.
    Finished(Box<RunRecord>),
}

/// What `resume` found.
#[derive(Debug)]
pub enum Resumed {
    /// The run is finished; nothing was executed.
    Finished(Box<RunRecord>),
    /// The run is claimed by this process, to execute.
    Claimed(ClaimedRun),
}

/// What `cancel` did.
#[derive(Debug)]
pub enum Cancelled {
    /// It was cancelled before.
    Already,
    /// It is cancelled now.
    Done,
    /// The process executing it was asked to stop it (and has not yet).
    Requested,
    /// Nobody executed it, and it has a grace period to clean up in: the
    /// caller holds it now and should execute it (or drop it for a worker).
    Graced(Box<ClaimedRun>),
}

pub struct Service {
    store: Arc<dyn RunStore>,
}

impl Service {
    pub fn new(store: Arc<dyn RunStore>) -> Self {
        Service { store }
    }

    pub fn store(&self) -> &Arc<dyn RunStore> {
        &self.store
    }

    /// Committed changes from now on (see `store::feed`).
    pub fn subscribe(&self) -> Subscription {
        self.store.subscribe()
    }

    /// A run by id, or the error that names what is missing.
    pub async fn find_run(&self, id: &str) -> Result<RunRecord, ServiceError> {
        self.store.run(id).await?.ok_or_else(|| ServiceError::RunNotFound {
            id: id.to_string(),
            location: self.store.location().to_string(),
        })
    }

    /// Check the module and record a new run of it. With
    /// [`StartMode::Execute`] the run is leased by this process before
    /// anyone else can see it.
    pub async fn start_run(
        &self,
        executor: &Executor,
        request: StartRequest,
        mode: StartMode,
    ) -> Result<StartedRun, ServiceError> {
        let given = request.run_id.is_some();
        let id = match request.run_id {
            Some(id) => id,
            None => uuid::Uuid::now_v7().to_string(),
        };
        // A new UUID is not taken; a given id is checked before any work
        // (the insert would refuse it too).
        if given && self.store.run(&id).await?.is_some() {
            return Err(ServiceError::RunExists(id));
        }
        let mut writes = Vec::with_capacity(2);
        let (hash, shown) = match request.module {
            StartModule::Bytes(source) => {
                let prepared = executor
                    .prepare(source.bytes, &source.shown)
                    .await
                    .map_err(|e| ServiceError::BadModule(e.to_string()))?;
                let hash = prepared.hash.clone();
                writes.push(Write::PutModule { hash: prepared.hash, bytes: prepared.bytes });
                (hash, source.shown)
            }
            StartModule::Stored { hash, shown } => (hash, shown),
        };
        let random_key = random::new_key()
            .map_err(|e| ServiceError::Store(crate::store::StoreError::Backend(format!("no randomness: {e}"))))?;
        let status = match mode {
            StartMode::Execute => RunStatus::Running,
            StartMode::Queue => RunStatus::Pending,
        };
        let new = NewRun {
            id,
            module: hash,
            module_path: shown,
            input: request.input,
            config: request.config,
            status,
            random_key,
        };
        writes.push(Write::CreateRun { run: Box::new(new), lease: mode == StartMode::Execute });
        let committed = commit(&*self.store, writes).await?;
        let (run, lease) =
            committed.created.into_iter().next().ok_or_else(|| {
                ServiceError::Store(crate::store::StoreError::Commit("the run was not created".into()))
            })?;
        Ok(StartedRun { run, lease })
    }

    /// Take the run's lease, then read the run again under it (its
    /// previous holder may have finished it meanwhile): the one way a run
    /// is claimed, by `resume`, `resume --all` and workers alike.
    pub async fn claim(&self, run: &RunRecord) -> Result<Claim, ServiceError> {
        let Some(lease) = self.store.lease(run.key).await? else {
            return Ok(Claim::Busy);
        };
        match self.store.run(&run.id).await? {
            Some(run) if !run.status.is_finished() => Ok(Claim::Claimed(ClaimedRun { run: Arc::new(run), lease })),
            Some(run) => Ok(Claim::Finished(Box::new(run))),
            None => Err(ServiceError::RunNotFound { id: run.id.clone(), location: self.store.location().to_string() }),
        }
    }

    /// Claim up to `max` unfinished runs, oldest first, passing over those
    /// `skip` names (held by this process already, or left alone).
    pub async fn claim_next(
        &self,
        max: usize,
        skip: &(dyn Fn(RunKey) -> bool + Send + Sync),
    ) -> Result<Vec<ClaimedRun>, ServiceError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let claimed = self.store.claim_runs(max, skip).await?;
        Ok(claimed.into_iter().map(|(run, lease)| ClaimedRun { run: Arc::new(run), lease }).collect())
    }

    /// Get ready to continue a run: finished runs are answered as they are;
    /// an unfinished one is claimed, or refused while another process holds it.
    pub async fn resume(&self, id: &str) -> Result<Resumed, ServiceError> {
        let run = self.find_run(id).await?;
        if run.status.is_finished() {
            return Ok(Resumed::Finished(Box::new(run)));
        }
        match self.claim(&run).await? {
            Claim::Claimed(claimed) => Ok(Resumed::Claimed(claimed)),
            Claim::Busy => match self.store.lease_holder(run.key).await? {
                Some((holder, until)) => {
                    Err(ServiceError::RunLeased { id: id.to_string(), holder, until: views::time(until) })
                }
                None => Err(ServiceError::RunBusy(id.to_string())),
            },
            Claim::Finished(run) => Ok(Resumed::Finished(run)),
        }
    }

    /// Every unfinished run no live process holds, claimed; the ids of
    /// those another process holds.
    pub async fn resume_all(&self) -> Result<(Vec<ClaimedRun>, Vec<String>), ServiceError> {
        let (mut claimed, mut busy) = (Vec::new(), Vec::new());
        for run in self.store.unfinished_runs().await? {
            match self.claim(&run).await? {
                Claim::Claimed(c) => claimed.push(c),
                Claim::Busy => busy.push(run.id),
                Claim::Finished(_) => {}
            }
        }
        Ok((claimed, busy))
    }

    /// Execute a claimed run to its end in this process.
    pub async fn execute(executor: &Arc<Executor>, claimed: ClaimedRun) -> Result<RunOutcome, ServiceError> {
        let outcome = executor.execute(&claimed.run).await;
        drop(claimed.lease);
        Ok(outcome?)
    }

    /// Deliver a signal; it is kept until the run waits for it.
    pub async fn signal(&self, id: &str, name: &str, payload: Vec<u8>) -> Result<(), ServiceError> {
        let run = self.find_run(id).await?;
        if run.status.is_finished() {
            return Err(ServiceError::RunFinished {
                id: id.to_string(),
                status: run.status.as_str(),
                what: "it will not receive signals",
            });
        }
        request::payload_size(payload.len(), run.config.limits.max_payload_bytes(), "the signal payload")?;
        let write =
            Write::SendSignal { run: run.key, name: name.to_string(), payload, max_pending: MAX_PENDING_SIGNALS };
        commit(&*self.store, vec![write]).await.map_err(|e| match e {
            e @ crate::store::StoreError::SignalsFull(_) => ServiceError::SignalsFull { id: id.to_string(), error: e },
            e => e.into(),
        })?;
        Ok(())
    }

    /// Stop a run: at once if nobody executes it, else by asking its
    /// executor, which stops it at its next host call or wake-up (waited
    /// for a few seconds). With `grace`, the workflow is told instead and
    /// may clean up (compensate) for that long before it is stopped.
    pub async fn cancel(&self, id: &str, grace: Option<Duration>) -> Result<Cancelled, ServiceError> {
        let run = self.find_run(id).await?;
        if run.status == RunStatus::Cancelled {
            return Ok(Cancelled::Already);
        }
        if run.status.is_finished() {
            return Err(ServiceError::RunFinished {
                id: id.to_string(),
                status: run.status.as_str(),
                what: "there is nothing to cancel",
            });
        }
        let grace_until =
            grace.map(|g| crate::model::now_ms().saturating_add(i64::try_from(g.as_millis()).unwrap_or(i64::MAX)));
        let request = Write::RequestCancel { run: run.key, grace_until };
        if let Some(lease) = self.store.lease(run.key).await? {
            if grace.is_some() {
                commit(&*self.store, vec![request]).await?;
                // Read again under the lease: what the executor goes by.
                let run = self.find_run(id).await?;
                return Ok(Cancelled::Graced(Box::new(ClaimedRun { run: Arc::new(run), lease })));
            }
            // Nobody executes it: cancel it here, under its lease.
            commit(&*self.store, vec![request, Write::cancelled(run.key)]).await?;
            drop(lease);
            return Ok(Cancelled::Done);
        }
        let mut changes = self.store.subscribe_control();
        commit(&*self.store, vec![request]).await?;
        // Its executor ends it cancelled (an event), or it ends otherwise
        // first (completed before it saw the request: looked up now and then).
        // (Not the grace period too: the workflow may take all of it.)
        let deadline = tokio::time::Instant::now() + CANCEL_WAIT;
        let mut look = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Ok(Cancelled::Requested),
                event = changes.recv() => match event {
                    Ok(e) if e.run == run.key && e.kind == ChangeKind::Status && e.status.is_some_and(RunStatus::is_finished) => {
                        return Ok(Cancelled::Done)
                    }
                    Ok(_) | Err(crate::store::feed::FeedError::Lagged(_)) => {}
                    Err(crate::store::feed::FeedError::Closed) => return Ok(Cancelled::Requested),
                },
                _ = look.tick() => {
                    if self.store.run(id).await?.is_some_and(|r| r.status.is_finished()) {
                        return Ok(Cancelled::Done);
                    }
                }
            }
        }
    }

    /// A key's value in a key-value namespace (`cairn kv get`).
    pub async fn kv_get(&self, namespace: &str, key: &str) -> Result<Option<crate::store::KvValue>, ServiceError> {
        let found = self.store.kv_get(&request::kv_namespace(namespace)?, key).await?;
        Ok(found.value.is_some().then_some(found))
    }

    /// Set or delete a key (`cairn kv put|delete`): a write of its own,
    /// ordered with the steps' writes (a step that read the key before
    /// runs again, as with any other writer).
    pub async fn kv_set(&self, namespace: &str, key: &str, value: Option<Vec<u8>>) -> Result<(), ServiceError> {
        if key.is_empty() || key.len() > crate::runtime::imports::MAX_KV_KEY_BYTES {
            return Err(ServiceError::BadInput(format!(
                "a key must be 1 to {} bytes",
                crate::runtime::imports::MAX_KV_KEY_BYTES
            )));
        }
        let kv = crate::store::KvCommit {
            namespace: request::kv_namespace(namespace)?,
            reads: Vec::new(),
            writes: vec![(key.to_string(), value)],
            max_keys: u64::MAX,
        };
        commit(&*self.store, vec![Write::Kv(Box::new(kv))]).await?;
        Ok(())
    }

    /// Live keys of a namespace with a prefix, in key order, a page at a time.
    pub async fn kv_list(
        &self,
        namespace: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, crate::store::KvValue)>, ServiceError> {
        Ok(self.store.kv_list(&request::kv_namespace(namespace)?, prefix, after, limit).await?)
    }

    /// All runs, oldest first.
    pub async fn list_runs(&self) -> Result<Vec<RunRecord>, ServiceError> {
        Ok(self.store.runs().await?)
    }

    /// A page of runs, newest first.
    pub async fn runs_page(&self, filter: &crate::store::RunFilter) -> Result<Vec<RunRecord>, ServiceError> {
        Ok(self.store.runs_page(filter).await?)
    }

    /// A run with its history and its branches' attempts.
    pub async fn run_view(&self, id: &str) -> Result<RunView, ServiceError> {
        let run = self.find_run(id).await?;
        let history = self.store.history(run.key).await?;
        let branches = self.store.branch_attempts(run.key).await?;
        Ok(RunView { run, history, branches })
    }
}
