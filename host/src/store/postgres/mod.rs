//! The PostgreSQL store: several `cairn` processes on several machines
//! share one database. A pool of connections for reads (`deadpool`), one
//! writer task that commits everything queued in one transaction
//! (`writer`), leases as rows with an epoch that grows with every takeover
//! and fences every write (`lease`), and `LISTEN`/`NOTIFY` feeding every
//! process's change feed (`listen`).
//!
//! The change sequence stays one store-wide, strictly increasing, durable
//! order across processes: each writing transaction takes the gate first
//! (`gate`), so transactions that write changes commit one after the
//! other, in the order of their numbers.

mod gate;
mod import;
mod lease;
mod listen;
mod new_runs;
mod one_statement;
mod pipelined;
mod schema;
mod spin;
mod tls;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::mpsc;
use tokio_postgres::Row;

use crate::model::{Entry, EntryKind, EntryStatus, Role, RunConfig, RunKey, RunRecord, RunStatus, TokenRecord, now_ms};
use crate::store::{
    ChangeEvent, ChangeFeed, CommitTicket, Durability, KvValue, Lease, RunFilter, RunStore, StoreError, Subscription,
    Write,
};

pub use lease::{DEFAULT_LEASE, settle_releases};
/// The statement that commits a lone run's step once its lease is known
/// current and its writer counts on the next change number (most steps of
/// a run alone): `make bench` measures its commit rate alone, next to
/// W1-pg's, so that the engine's overhead and the statement's own show
/// apart. Parameters: generation, run, position, kind, name, occurrence,
/// attempt, status, output, error, started_at, finished_at, epoch,
/// committed_us, the number; it writes one row or none.
#[doc(hidden)]
pub use one_statement::APPEND_ONE_KNOWN as STEP_STATEMENT;

/// A `--db` value that names a PostgreSQL database.
pub fn is_postgres_url(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

/// A PostgreSQL error in the store's words.
pub(crate) fn pg_error(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) if db.code().code() == FENCE_FAILED => fence_error(db.detail()),
        Some(db) => StoreError::Backend(format!("{}: {}", db.code().code(), db.message())),
        None => match std::error::Error::source(&e) {
            Some(cause) => StoreError::Backend(format!("{e}: {cause}")),
            None => StoreError::Backend(e.to_string()),
        },
    }
}

/// The SQLSTATE `cairn_fence` fails with.
const FENCE_FAILED: &str = "CN001";

/// A failed fence: its DETAIL is "run held now", now -1 if the run is gone.
fn fence_error(detail: Option<&str>) -> StoreError {
    let numbers: Vec<i64> = detail.unwrap_or_default().split(' ').filter_map(|n| n.parse().ok()).collect();
    match numbers[..] {
        [run, _, -1] => StoreError::NoSuchRun(RunKey(run)),
        [run, held, now] => StoreError::LeaseLost { run: RunKey(run), held: held as u64, now: now as u64 },
        _ => StoreError::Backend(format!("{FENCE_FAILED}: a failed fence without its detail ({detail:?})")),
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Backend(format!("no database connection: {}", pool_why(e)))
}

/// Why the pool has no connection, with the server's own words if it said any.
fn pool_why(e: deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => match pg_error(e) {
            StoreError::Backend(why) => why,
            other => other.to_string(),
        },
        other => other.to_string(),
    }
}

/// What the store's tasks share.
pub(crate) struct Inner {
    pub(crate) pool: Pool,
    pub(crate) feed: Arc<ChangeFeed>,
    pub(crate) durability: Durability,
    /// This process's name in `runs.owner`.
    pub(crate) owner: String,
    pub(crate) lease: Duration,
    /// Runs this process holds: writes of them are fenced.
    pub(crate) held: Mutex<HashMap<RunKey, Held>>,
    /// How far the feed published, and what of this process's own above
    /// that, which the listener must not publish again.
    pub(crate) published: Mutex<listen::Published>,
    /// The writer's word to the listener that a commit of its own waits
    /// to be read back and published in order.
    pub(crate) catch_up: Arc<tokio::sync::Notify>,
    /// Held by the writer while a commit is on its way: a commit may land
    /// before the writer has noted its numbers in `published`, and the listener,
    /// which may read them first, waits for this before it filters.
    pub(crate) writing: tokio::sync::Mutex<()>,
    #[cfg(test)]
    pub(crate) guesses: one_statement::Guesses,
    /// New runs committed by `new_runs`' statement, for the tests.
    #[cfg(test)]
    pub(crate) new_runs_by_statement: std::sync::atomic::AtomicU64,
    /// Batches sent by the fenced statement (`one_statement`'s `COMMIT_BATCH`).
    #[cfg(test)]
    pub(crate) fenced_batches: std::sync::atomic::AtomicU64,
    /// Signals and cancels sent in a crowd's one round trip.
    #[cfg(test)]
    pub(crate) items_pipelined: std::sync::atomic::AtomicU64,
}

/// A lease this process holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Held {
    pub(crate) epoch: u64,
    /// A gate generation (`gate`) at which this epoch was known to be the
    /// run's: its lease was taken then, or a fenced commit saw it then.
    /// While the generation has not moved, no run changed hands, so a
    /// commit that finds it unchanged once it holds the gate needs no fence
    /// of its own (`one_statement`).
    pub(crate) checked_at: Option<i64>,
    /// Dropping the lease needs no write of its own: its run's end is
    /// committed (no one claims a finished run), or it was given back
    /// already (`lease::release_parked`).
    pub(crate) released: bool,
}

impl Inner {
    /// Changes to this process's feed, if anyone listens.
    pub(crate) fn publish(&self, events: impl IntoIterator<Item = ChangeEvent>) {
        if self.feed.listening() {
            for event in events {
                self.feed.publish(event);
            }
        }
    }
}

pub struct PostgresStore {
    inner: Arc<Inner>,
    location: String,
    db_id: String,
    cache_key: [u8; 32],
    writer: mpsc::UnboundedSender<writer::Job>,
    /// Dropped with the store: the listener stops.
    _listener: tokio::sync::oneshot::Sender<()>,
}

impl PostgresStore {
    /// Connect to the database at `url` (migrating it if needed), inside a
    /// tokio runtime; `lease` is how long a lease lasts without renewal.
    pub async fn connect(url: &str, durability: Durability, lease: Duration) -> Result<Self, StoreError> {
        let location = redact(url);
        let spin_budget = spin::budget(std::env::var(spin::BUDGET_VAR).ok().as_deref())
            .map_err(|why| StoreError::CannotOpen { location: location.clone(), why })?;
        let (config, tls) = tls::config(url, &location)?;
        let manager = tls.manager(config.clone(), ManagerConfig { recycling_method: RecyclingMethod::Fast });
        // The batches the writer commits as one statement in autocommit
        // take the session's durability.
        // Generic plans: the statements are few and simple, and planning a
        // batch's statement anew at every commit would cost as much as running it.
        // A transaction left idle for a lease (its process paused: SIGSTOP, a
        // VM migration) is ended by the server: a take or a writer holds the
        // gate until it commits, and every process waits for the gate. (At
        // least a second: a transaction of several round trips on a slow
        // link is not idle for that long.)
        let sync = match durability {
            Durability::Power => "on",
            Durability::Process => "off",
        };
        let session: Arc<str> = format!(
            "SET synchronous_commit = {sync}; SET plan_cache_mode = force_generic_plan; \
             SET idle_in_transaction_session_timeout = {}",
            lease.max(Duration::from_secs(1)).as_millis()
        )
        .into();
        let pool = Pool::builder(manager)
            .max_size(16)
            .post_create(deadpool_postgres::Hook::async_fn(move |client, _| {
                let session = session.clone();
                Box::pin(
                    async move { client.batch_execute(&session).await.map_err(deadpool_postgres::HookError::Backend) },
                )
            }))
            .build()
            .map_err(|e| StoreError::CannotOpen { location: location.clone(), why: e.to_string() })?;
        let mut client =
            pool.get().await.map_err(|e| StoreError::CannotOpen { location: location.clone(), why: pool_why(e) })?;
        schema::migrate(&mut client, &location).await?;
        let meta = client.query("SELECT key, value FROM cairn_meta", &[]).await.map_err(pg_error)?;
        let get = |k: &str| meta.iter().find(|r| r.get::<_, String>(0) == k).map(|r| r.get::<_, String>(1));
        let db_id = get("db_id")
            .ok_or_else(|| StoreError::NotCairn { location: location.clone(), why: "no database id".into() })?;
        let cache_key: [u8; 32] = get("cache_key")
            .and_then(|k| hex::decode(k).ok())
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| StoreError::Corrupt(format!("{location}: the cache key is not 32 bytes of hex")))?;
        drop(client);
        let mut id = [0u8; 8];
        let _ = getrandom::fill(&mut id);
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        let inner = Arc::new(Inner {
            pool,
            feed: Arc::new(ChangeFeed::default()),
            durability,
            owner: format!("{}:{}:{}", host.trim(), std::process::id(), hex::encode(id)),
            lease,
            held: Mutex::default(),
            published: Mutex::default(),
            catch_up: Arc::default(),
            writing: tokio::sync::Mutex::new(()),
            #[cfg(test)]
            guesses: Default::default(),
            #[cfg(test)]
            new_runs_by_statement: Default::default(),
            #[cfg(test)]
            items_pipelined: Default::default(),
            #[cfg(test)]
            fenced_batches: Default::default(),
        });
        let listener = listen::start(&inner, config, tls).await?;
        lease::start_heartbeat(&inner);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer::run(inner.clone(), rx, spin::Spin::on_this_runtime(spin_budget)));
        Ok(PostgresStore { inner, location, db_id, cache_key, writer: tx, _listener: listener })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.inner.pool.get().await.map_err(pool_error)
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(sql).await.map_err(pg_error)?;
        client.query(&stmt, params).await.map_err(pg_error)
    }

    async fn runs_where(
        &self,
        tail: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<RunRecord>, StoreError> {
        let rows = self.query(&format!("SELECT {RUN_COLUMNS} FROM runs {tail}"), params).await?;
        Ok(rows.iter().filter_map(|r| run_from_row(r).map_err(|why| eprintln!("cairn: skipping {why}")).ok()).collect())
    }
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "a PostgreSQL URL".into(),
    }
}

const RUN_COLUMNS: &str = "seq, id, module, module_path, input, config, status, output, error, created_at, finished_at, \
     (SELECT count(*) FROM history h WHERE h.run = runs.seq AND h.kind IN ('step', 'spawn') AND h.status <> 'failed'), \
     cancel_requested, random_key, cancel_grace_until";

const UNFINISHED: &str = "status NOT IN ('completed', 'failed', 'cancelled')";

fn run_from_row(row: &Row) -> Result<RunRecord, String> {
    let seq: i64 = row.get(0);
    let bad = |why: String| format!("run #{seq} in the database is malformed: {why}");
    let module: String = row.get(2);
    if module.len() != 64 || !module.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(bad(format!("its module hash {module:?} is not 64 lowercase hex characters")));
    }
    let config: String = row.get(5);
    let status: String = row.get(6);
    Ok(RunRecord {
        key: RunKey(seq),
        id: row.get(1),
        module,
        module_path: row.get(3),
        input: row.get(4),
        config: serde_json::from_str::<RunConfig>(&config).map_err(|e| bad(format!("its config: {e}")))?,
        status: RunStatus::parse(&status).ok_or_else(|| bad(format!("unknown status {status:?}")))?,
        output: row.get(7),
        error: row.get(8),
        created_at: row.get(9),
        finished_at: row.get(10),
        steps: row.get::<_, i64>(11) as u64,
        cancel_requested: row.get(12),
        random_key: row.get::<_, Option<Vec<u8>>>(13).and_then(|k| k.try_into().ok()),
        cancel_grace_until: row.get(14),
    })
}

const ENTRY_COLUMNS: &str = "kind, name, occurrence, attempt, status, output, error, started_at, finished_at";

fn entry_from_row(row: &Row) -> Result<Entry, StoreError> {
    let kind: String = row.get(0);
    let status: String = row.get(4);
    Ok(Entry {
        kind: EntryKind::parse(&kind).ok_or_else(|| StoreError::Corrupt(format!("unknown entry kind {kind:?}")))?,
        name: row.get(1),
        occurrence: row.get::<_, i32>(2) as u32,
        attempt: row.get::<_, i32>(3) as u32,
        status: EntryStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown entry status {status:?}")))?,
        output: row.get(5),
        error: row.get(6),
        started_at: row.get(7),
        finished_at: row.get(8),
    })
}

const TOKEN_COLUMNS: &str = "id, name, role, hash, created_at, revoked_at";

fn token_from_row(row: &Row) -> Result<TokenRecord, String> {
    let id: String = row.get(0);
    let role: String = row.get(2);
    let hash: Vec<u8> = row.get(3);
    Ok(TokenRecord {
        name: row.get(1),
        role: Role::parse(&role).ok_or_else(|| format!("token {id}: unknown role {role:?}"))?,
        hash: hash.try_into().map_err(|_| format!("token {id}: its hash is not 32 bytes"))?,
        created_at: row.get(4),
        revoked_at: row.get(5),
        id,
    })
}

fn kv_value(row: &Row, at: usize) -> KvValue {
    KvValue { value: row.get(at), version: row.get::<_, i64>(at + 1) as u64, updated_at: row.get(at + 2) }
}

#[async_trait::async_trait]
impl RunStore for PostgresStore {
    fn db_id(&self) -> &str {
        &self.db_id
    }

    fn cache_key(&self) -> [u8; 32] {
        self.cache_key
    }

    fn location(&self) -> &str {
        &self.location
    }

    fn submit(&self, writes: Vec<Write>) -> CommitTicket {
        let (done, ticket) = tokio::sync::oneshot::channel();
        if let Err(mpsc::error::SendError(job)) = self.writer.send(writer::Job::new(&self.inner, writes, done)) {
            let _ = job.done.send(Err(StoreError::WriterGone));
        }
        ticket
    }

    fn subscribe(&self) -> Subscription {
        // Under the lock the writer and the listener publish under: a new
        // reader of the whole feed does not come between a publisher's
        // look at `wants_all` and what it publishes by it.
        let _published = self.inner.published.lock().unwrap_or_else(|p| p.into_inner());
        self.inner.feed.subscribe_all()
    }

    fn subscribe_control(&self) -> Subscription {
        self.inner.feed.subscribe_control()
    }

    async fn module(&self, hash: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.query("SELECT bytes FROM modules WHERE hash = $1", &[&hash]).await?.first().map(|r| r.get(0)))
    }

    async fn modules(&self) -> Result<Vec<(String, u64, i64)>, StoreError> {
        let rows = self
            .query("SELECT hash, length(bytes)::BIGINT, created_at FROM modules ORDER BY created_at, hash", &[])
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get::<_, i64>(1) as u64, r.get(2))).collect())
    }

    async fn run(&self, id: &str) -> Result<Option<RunRecord>, StoreError> {
        let rows = self.query(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"), &[&id]).await?;
        rows.first().map(run_from_row).transpose().map_err(StoreError::Corrupt)
    }

    async fn run_id(&self, run: RunKey) -> Result<Option<String>, StoreError> {
        Ok(self.query("SELECT id FROM runs WHERE seq = $1", &[&run.0]).await?.first().map(|r| r.get(0)))
    }

    async fn runs(&self) -> Result<Vec<RunRecord>, StoreError> {
        self.runs_where("ORDER BY seq", &[]).await
    }

    async fn runs_page(&self, filter: &RunFilter) -> Result<Vec<RunRecord>, StoreError> {
        let status = filter.status.map(|s| s.as_str());
        let module = filter.module_prefix.as_deref();
        let before = filter.before.map_or(i64::MAX, |k| k.0);
        let limit = i64::try_from(filter.limit).unwrap_or(i64::MAX);
        self.runs_where(
            "WHERE seq < $1 AND ($2::TEXT IS NULL OR status = $2) AND ($3::TEXT IS NULL OR starts_with(module, $3)) \
             ORDER BY seq DESC LIMIT $4",
            &[&before, &status, &module, &limit],
        )
        .await
    }

    async fn run_counts(&self) -> Result<Vec<(RunStatus, u64)>, StoreError> {
        let rows = self.query("SELECT status, count(*) FROM runs GROUP BY status", &[]).await?;
        Ok(rows
            .iter()
            .filter_map(|r| Some((RunStatus::parse(r.get::<_, &str>(0))?, r.get::<_, i64>(1).max(0) as u64)))
            .collect())
    }

    async fn unfinished_keys(&self) -> Result<Vec<RunKey>, StoreError> {
        let rows = self.query(&format!("SELECT seq FROM runs WHERE {UNFINISHED} ORDER BY seq"), &[]).await?;
        Ok(rows.iter().map(|r| RunKey(r.get(0))).collect())
    }

    async fn run_by_key(&self, run: RunKey) -> Result<Option<RunRecord>, StoreError> {
        let rows = self.query(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE seq = $1"), &[&run.0]).await?;
        rows.first().map(run_from_row).transpose().map_err(StoreError::Corrupt)
    }

    async fn unfinished_runs(&self) -> Result<Vec<RunRecord>, StoreError> {
        self.runs_where(&format!("WHERE {UNFINISHED} ORDER BY seq"), &[]).await
    }

    async fn history(&self, run: RunKey) -> Result<Vec<Entry>, StoreError> {
        let rows = self
            .query(&format!("SELECT {ENTRY_COLUMNS} FROM history WHERE run = $1 ORDER BY position"), &[&run.0])
            .await?;
        rows.iter().map(entry_from_row).collect()
    }

    async fn history_page(&self, run: RunKey, from: u64, limit: usize) -> Result<Vec<Entry>, StoreError> {
        let from = i32::try_from(from).unwrap_or(i32::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .query(
                &format!(
                    "SELECT {ENTRY_COLUMNS} FROM history WHERE run = $1 AND position >= $2 ORDER BY position LIMIT $3"
                ),
                &[&run.0, &from, &limit],
            )
            .await?;
        rows.iter().map(entry_from_row).collect()
    }

    async fn branch_attempts(&self, run: RunKey) -> Result<Vec<Entry>, StoreError> {
        let rows = self
            .query(
                "SELECT 'step', name, occurrence, attempt, status, output, error, started_at, finished_at \
                 FROM branches WHERE run = $1 ORDER BY finished_at, name, occurrence, attempt",
                &[&run.0],
            )
            .await?;
        rows.iter().map(entry_from_row).collect()
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let rows = self.query(&format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_at, id"), &[]).await?;
        Ok(rows
            .iter()
            .filter_map(|r| token_from_row(r).map_err(|why| eprintln!("cairn: skipping {why}")).ok())
            .collect())
    }

    async fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        let rows = self.query(&format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = $1"), &[&id]).await?;
        rows.first().map(token_from_row).transpose().map_err(StoreError::Corrupt)
    }

    async fn kv_get(&self, namespace: &str, key: &str) -> Result<KvValue, StoreError> {
        let rows = self
            .query("SELECT value, version, updated_at FROM kv WHERE namespace = $1 AND key = $2", &[&namespace, &key])
            .await?;
        Ok(rows.first().map_or(KvValue { value: None, version: 0, updated_at: 0 }, |r| kv_value(r, 0)))
    }

    async fn kv_list(
        &self,
        namespace: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, KvValue)>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .query(
                "SELECT key, value, version, updated_at FROM kv WHERE namespace = $1 AND value IS NOT NULL \
                 AND key >= $2 AND starts_with(key, $2) AND ($3::TEXT IS NULL OR key > $3) ORDER BY key LIMIT $4",
                &[&namespace, &prefix, &after, &limit],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), kv_value(r, 1))).collect())
    }

    async fn lease_holder(&self, run: RunKey) -> Result<Option<(String, i64)>, StoreError> {
        let rows = self
            .query(
                "SELECT owner, (extract(epoch FROM lease_until) * 1000)::BIGINT FROM runs \
                 WHERE seq = $1 AND owner IS NOT NULL AND lease_until >= now()",
                &[&run.0],
            )
            .await?;
        Ok(rows.first().map(|r| (r.get(0), r.get(1))))
    }

    async fn lease(&self, run: RunKey) -> Result<Option<Lease>, StoreError> {
        lease::take(&self.inner, run).await
    }

    async fn claim_runs(
        &self,
        max: usize,
        skip: &(dyn Fn(RunKey) -> bool + Send + Sync),
    ) -> Result<Vec<(RunRecord, Lease)>, StoreError> {
        lease::claim(&self.inner, max, skip).await
    }

    async fn release_all(&self) -> Result<(), StoreError> {
        self.inner.held.lock().unwrap_or_else(|p| p.into_inner()).clear();
        // Rows locked in key order, as writers and heartbeats lock them.
        self.query(
            &format!(
                "UPDATE runs SET owner = NULL, lease_until = NULL WHERE seq IN \
                 (SELECT seq FROM runs WHERE owner = $1 AND {UNFINISHED} ORDER BY seq FOR NO KEY UPDATE)"
            ),
            &[&self.inner.owner],
        )
        .await?;
        Ok(())
    }

    async fn next_takeover_in(&self) -> Result<Option<Duration>, StoreError> {
        // The earliest of another process's leases to expire (the
        // database's clock), and of runs given back to sleep to come due
        // (the wake-up index; the clock of the process that claims).
        let rows = self
            .query(
                &format!(
                    "SELECT (extract(epoch FROM min(lease_until) - now()) * 1000)::BIGINT, \
                            (SELECT min(wake_at) FROM runs WHERE wake_at IS NOT NULL AND {UNFINISHED}) \
                     FROM runs WHERE {UNFINISHED} AND owner IS NOT NULL AND owner <> $1 AND lease_until > now()"
                ),
                &[&self.inner.owner],
            )
            .await?;
        let Some(row) = rows.first() else { return Ok(None) };
        let expiry = row.get::<_, Option<i64>>(0);
        let wake = row.get::<_, Option<i64>>(1).map(|at| at - now_ms());
        Ok([expiry, wake].into_iter().flatten().min().map(|ms| Duration::from_millis(ms.max(0) as u64)))
    }

    fn releases_parked_after(&self) -> Option<Duration> {
        Some(self.inner.lease)
    }

    async fn release_parked(&self, lease: Lease, wake_at: Option<i64>, signal: Option<&str>) -> Result<(), StoreError> {
        lease::release_parked(&self.inner, lease, wake_at, signal).await
    }

    async fn last_seq(&self) -> Result<u64, StoreError> {
        let rows = self.query(gate::LAST_COMMITTED, &[]).await?;
        Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0).max(0) as u64))
    }

    async fn changes_since(&self, after: u64, limit: usize) -> Result<Vec<ChangeEvent>, StoreError> {
        let client = self.client().await?;
        listen::read_changes(&client, after, limit, true).await
    }
}
