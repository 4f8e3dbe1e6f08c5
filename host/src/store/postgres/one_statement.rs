//! The common batch as one statement: history appends and status changes
//! of runs this process holds (what executing runs write at every step).
//!
//! One statement in autocommit is one transaction and one round trip, like
//! the single-row insert it is measured against: it takes the gate and its
//! numbers (`gate`: commits are ordered), fences every run of the batch
//! and changes the statuses (`cairn_commit_batch`, which fails the
//! statement if a run was taken over, and takes its locks in the order
//! every writer takes them), inserts all history rows and change rows, updates
//! the statuses and notifies, all in data-modifying `WITH` clauses, so the
//! batch lands whole or not at all. `synchronous_commit` is the session's
//! (set on every connection from `--durability`). When the server refuses
//! it (a lease lost, a run gone), the writer commits the batch again item by
//! item (`writer`), so that only the bad item fails.
//!
//! A batch of appends alone, whose runs' epochs this process saw current at
//! the gate generation it still finds once it holds the gate,
//! needs no fence check (`APPEND_UNMOVED`): no run changed hands since.
//! That is every step of a run after its first, until another process
//! takes a run. History rows alone notify other processes at most every few
//! milliseconds (`writer`): a notification wakes every listener.

use deadpool_postgres::ClientWrapper;
use tokio_postgres::types::ToSql;

use super::Inner;
use super::gate::gate_cte;
use super::listen::notify_sql;
use super::writer::{Job, history_change, other_change};
use crate::model::{RunKey, now_ms, now_us};
use crate::store::{ChangeEvent, ChangeKind, StoreError, Write};

/// How a batch fared.
pub(super) enum Outcome {
    /// Not of the kind this path takes: commit it item by item.
    NotEligible,
    /// Committed; these are its changes, in sequence order, and whether
    /// other processes were notified of them.
    Committed(Vec<ChangeEvent>, bool),
    /// The server refused it (nothing landed): commit it item by item.
    Refused,
    /// The connection failed, and reading the history again on another
    /// showed that it did not land: commit it again (item by item).
    NotLanded,
    /// The connection failed: whether it landed is not known.
    Unknown(StoreError),
}

const COMMIT_BATCH: &str = concat!(
    "\
WITH seq AS (
    SELECT b.first, b.generation
      FROM cairn_commit_batch($1::BIGINT, $2::BIGINT[], $3::BIGINT[], $18::BIGINT[], $19::TEXT[], $20::BYTEA[],
                              $21::TEXT[], $22::BIGINT[]) AS b
), history_rows AS (
    INSERT INTO history (id, run, position, kind, name, occurrence, attempt, status, output, error,
                         started_at, finished_at, epoch, committed_us)
    SELECT seq.first + u.off, u.run, u.position, u.kind, u.name, u.occurrence, u.attempt, u.status, u.output,
           u.error, u.started_at, u.finished_at, u.epoch, $4::BIGINT
      FROM seq, unnest($5::BIGINT[], $6::BIGINT[], $7::INT[], $8::TEXT[], $9::TEXT[], $10::INT[], $11::INT[],
                       $12::TEXT[], $13::BYTEA[], $14::TEXT[], $15::BIGINT[], $16::BIGINT[], $17::BIGINT[])
           AS u(off, run, position, kind, name, occurrence, attempt, status, output, error, started_at,
                finished_at, epoch)
), status_changes AS (
    INSERT INTO changes (seq, run, kind, status, committed_us)
    SELECT seq.first + u.off, u.run, 'status', u.status, $4::BIGINT
      FROM seq, unnest($23::BIGINT[], $24::BIGINT[], $25::TEXT[]) AS u(off, run, status)
)
SELECT seq.first, seq.generation,
       CASE WHEN $28::BOOLEAN THEN ",
    notify_sql!("$26", "seq.first + $1::BIGINT", "$27::TEXT"),
    " END
  FROM seq"
);

/// Appends only, of runs whose epochs were seen current at generation $2:
/// if the generation is still $2 once the gate is held (read as of then,
/// not as of the statement's snapshot: a take that committed meanwhile
/// moved it on), no run changed hands since, and none can before this
/// commits; otherwise
/// nothing is written and no row comes back (the batch then goes the
/// fenced way). The fence of `cairn_commit_batch` is a function call with
/// statements of its own, which costs more than the insert it guards.
const APPEND_UNMOVED: &str = concat!(
    "WITH ",
    gate_cte!(),
    ", seq AS MATERIALIZED (
    SELECT setval('cairn_ids', pg_sequence_last_value('cairn_ids') + $1::BIGINT) - $1::BIGINT + 1 AS first
      FROM gate WHERE gate.locked IS NOT NULL AND pg_sequence_last_value('cairn_gen') = $2::BIGINT
), history_rows AS (
    INSERT INTO history (id, run, position, kind, name, occurrence, attempt, status, output, error,
                         started_at, finished_at, epoch, committed_us)
    SELECT seq.first + u.off, u.run, u.position, u.kind, u.name, u.occurrence, u.attempt, u.status, u.output,
           u.error, u.started_at, u.finished_at, u.epoch, $3::BIGINT
      FROM seq, unnest($4::BIGINT[], $5::BIGINT[], $6::INT[], $7::TEXT[], $8::TEXT[], $9::INT[], $10::INT[],
                       $11::TEXT[], $12::BYTEA[], $13::TEXT[], $14::BIGINT[], $15::BIGINT[], $16::BIGINT[])
           AS u(off, run, position, kind, name, occurrence, attempt, status, output, error, started_at,
                finished_at, epoch)
)
SELECT seq.first, CASE WHEN $18::BOOLEAN THEN ",
    notify_sql!("$17", "seq.first + $1::BIGINT", "'h'"),
    " END
  FROM seq"
);

/// The history rows of a batch, column by column.
#[derive(Default)]
struct Rows<'a> {
    off: Vec<i64>,
    run: Vec<i64>,
    position: Vec<i32>,
    kind: Vec<&'a str>,
    name: Vec<&'a str>,
    occurrence: Vec<i32>,
    attempt: Vec<i32>,
    status: Vec<&'a str>,
    output: Vec<&'a [u8]>,
    error: Vec<Option<&'a str>>,
    started_at: Vec<i64>,
    finished_at: Vec<i64>,
    epoch: Vec<i64>,
}

/// The start of a lone step's statement: the gate, then the next number
/// if the generation is still $1. A macro, so that the statements built
/// with `concat!` stay `&'static str`.
macro_rules! lone_number {
    () => {
        concat!(
            "WITH ",
            gate_cte!(),
            ", seq AS MATERIALIZED (
    SELECT nextval('cairn_ids') AS first
      FROM gate WHERE gate.locked IS NOT NULL AND pg_sequence_last_value('cairn_gen') = $1::BIGINT
)"
        )
    };
}

/// A lone step's row, its values as they are ($2 to $14), numbered by `seq`.
macro_rules! lone_row {
    () => {
        "INSERT INTO history (id, run, position, kind, name, occurrence, attempt, status, output, error,
                     started_at, finished_at, epoch, committed_us)
SELECT seq.first, $2::BIGINT, $3::INT, $4::TEXT, $5::TEXT, $6::INT, $7::INT, $8::TEXT, $9::BYTEA, $10::TEXT,
       $11::BIGINT, $12::BIGINT, $13::BIGINT, $14::BIGINT
  FROM seq"
    };
}

/// `APPEND_UNMOVED` for one row (a lone run's step), its values as they
/// are: one array per column costs the server more than the row.
pub const APPEND_ONE_UNMOVED: &str = concat!(
    lone_number!(),
    ", history_row AS (",
    lone_row!(),
    ")
SELECT seq.first, CASE WHEN $16::BOOLEAN THEN ",
    notify_sql!("$15", "seq.first + 1", "'h'"),
    " END
  FROM seq"
);

/// `APPEND_ONE_UNMOVED` for a writer that knows which number the gate
/// will hand out ($15: `Numbers::expected`): the row goes in only with that
/// number, and nothing comes back but the count. Returning the number costs
/// the server a few microseconds a commit; a lone run's step is all round
/// trip. If another process took numbers meanwhile, nothing is written (the
/// number taken is a gap, as a failed statement's is) and the writer sends
/// the fenced statement (`COMMIT_BATCH`). No notification: a commit that
/// owes one returns its number anyway.
pub const APPEND_ONE_KNOWN: &str = concat!(lone_number!(), "\n", lone_row!(), " WHERE seq.first = $15::BIGINT");

/// What the writer knows of the change numbers: the one the gate hands out
/// next if no other process commits first, and for how many of its commits
/// in a row that held. Only after a run of them does a lone commit count on
/// it (`APPEND_ONE_KNOWN`): where other processes commit all the time, a
/// guess that fails costs a round trip.
#[derive(Default)]
pub(super) struct Numbers {
    next: Option<i64>,
    streak: u32,
}

impl Numbers {
    /// Commits in a row whose numbers ran on from this writer's last.
    const TRUSTED_AFTER: u32 = 8;

    /// The number a lone commit can count on, if any.
    fn expected(&self) -> Option<i64> {
        self.next.filter(|_| self.streak >= Self::TRUSTED_AFTER)
    }

    /// This writer committed `n` numbers from `first`.
    pub(super) fn took(&mut self, first: i64, n: i64) {
        self.streak = if self.next == Some(first) { self.streak.saturating_add(1) } else { 0 };
        self.next = Some(first + n);
    }

    /// Numbers were taken since this writer's last commit that it did not see.
    pub(super) fn missed(&mut self) {
        *self = Numbers::default();
    }
}

/// How a writer's guesses of the next number fared, for the tests.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Guesses {
    pub(crate) hits: std::sync::atomic::AtomicU64,
    pub(crate) misses: std::sync::atomic::AtomicU64,
}

#[cfg(test)]
impl Guesses {
    fn hit(&self) {
        self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn miss(&self) {
        self.misses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Rows<'_> {
    /// The columns as the statements' parameters, in the order their
    /// `unnest` takes them.
    fn params(&self) -> [&(dyn ToSql + Sync); 13] {
        [
            &self.off,
            &self.run,
            &self.position,
            &self.kind,
            &self.name,
            &self.occurrence,
            &self.attempt,
            &self.status,
            &self.output,
            &self.error,
            &self.started_at,
            &self.finished_at,
            &self.epoch,
        ]
    }
}

/// A batch ready to send.
struct Sendable<'a> {
    /// How many sequence numbers it takes.
    n: i64,
    ts_us: i64,
    /// The runs to fence, with the epochs their writes were submitted under.
    fenced: Vec<(i64, i64)>,
    rows: Rows<'a>,
    statuses: Vec<StatusChange<'a>>,
    notify: bool,
}

struct StatusChange<'a> {
    off: i64,
    run: i64,
    status: &'static str,
    output: &'a Option<Vec<u8>>,
    error: &'a Option<String>,
    finished_at: Option<i64>,
}

/// `notify_history`: whether a batch of history rows alone notifies (one
/// with status changes always does).
pub(super) async fn commit(
    inner: &Inner,
    client: &ClientWrapper,
    jobs: &[Job],
    notify_history: bool,
    numbers: &mut Numbers,
) -> Outcome {
    let ts_us = now_us();
    // The runs to fence, with the epochs their writes were submitted under.
    let mut fenced: Vec<(i64, i64)> = Vec::new();
    let mut rows = Rows::default();
    let mut statuses: Vec<StatusChange> = Vec::new();
    // Sequence numbers as offsets from the first the server hands out.
    let mut events: Vec<ChangeEvent> = Vec::new();
    for job in jobs {
        for write in &job.writes {
            // Every write appends to or sets the status of a run held here.
            let run = match write {
                Write::Append { run, .. } | Write::SetStatus { run, .. } => *run,
                _ => return Outcome::NotEligible,
            };
            let Some(epoch) = job.epoch(run).map(|e| e as i64) else { return Outcome::NotEligible };
            match fenced.iter().find(|&&(r, _)| r == run.0) {
                None => fenced.push((run.0, epoch)),
                // Two leases of one run in one batch (given back and taken
                // again meanwhile): item by item, each under its own.
                Some(&(_, e)) if e != epoch => return Outcome::NotEligible,
                Some(_) => {}
            }
            match write {
                Write::Append { position, entries, .. } => {
                    for (i, e) in entries.iter().enumerate() {
                        let off = events.len() as i64;
                        let position = position + i;
                        rows.off.push(off);
                        rows.run.push(run.0);
                        rows.position.push(position as i32);
                        rows.kind.push(e.kind.as_str());
                        rows.name.push(&e.name);
                        rows.occurrence.push(e.occurrence as i32);
                        rows.attempt.push(e.attempt as i32);
                        rows.status.push(e.status.as_str());
                        rows.output.push(&e.output);
                        rows.error.push(e.error.as_deref());
                        rows.started_at.push(e.started_at);
                        rows.finished_at.push(e.finished_at);
                        rows.epoch.push(epoch);
                        events.push(history_change(off as u64, run, position, ts_us));
                    }
                }
                Write::SetStatus { status, output, error, .. } => {
                    let off = events.len() as i64;
                    let finished_at = status.is_finished().then(now_ms);
                    statuses.push(StatusChange {
                        off,
                        run: run.0,
                        status: status.as_str(),
                        output,
                        error,
                        finished_at,
                    });
                    events.push(other_change(off as u64, run, ChangeKind::Status, Some(*status), ts_us));
                }
                _ => return Outcome::NotEligible,
            }
        }
    }
    if fenced.is_empty() {
        return Outcome::NotEligible;
    }
    let n = events.len() as i64;
    let notify = notify_history || !statuses.is_empty();
    let batch = Sendable { n, ts_us, fenced, rows, statuses, notify };

    // Whether every run's epoch was seen current at one same generation.
    let unmoved = if batch.statuses.is_empty() { checked_at(inner, &batch.fenced) } else { None };
    let sent = match unmoved {
        Some(generation) => match send_unmoved(inner, client, &batch, generation, numbers).await {
            Ok(Some(first)) => Ok(first),
            // It moved: fenced, which notes the new generation.
            Ok(None) => send(inner, client, &batch).await,
            Err(e) => Err(e),
        },
        None => send(inner, client, &batch).await,
    };
    // The connection failed: what landed is read back under the same epoch.
    let sent = match sent {
        Err(e) if e.as_db_error().is_none() => match settle(inner, &batch).await {
            Some(Some(first)) => Ok(first),
            Some(None) => return Outcome::NotLanded,
            None => Err(e),
        },
        other => other,
    };
    match sent {
        Ok(first) => {
            numbers.took(first, n);
            for e in &mut events {
                e.seq += first as u64;
            }
            Outcome::Committed(events, notify)
        }
        Err(e) if e.as_db_error().is_some() => Outcome::Refused,
        Err(e) => Outcome::Unknown(super::pg_error(e)),
    }
}

/// Whether a batch whose connection failed before its answer came landed:
/// `Some(Some(first))` with its first sequence number, `Some(None)` if it
/// did not, `None` if the database cannot tell now. One statement lands
/// whole or not at all, so its first history row tells: it is there,
/// written under this epoch, or not. (A batch of status changes alone has
/// no row to tell by.) Looked for, on new connections, for up to a lease's
/// length: a server restarting comes back meanwhile.
async fn settle(inner: &Inner, batch: &Sendable<'_>) -> Option<Option<i64>> {
    let rows = &batch.rows;
    let (&run, &position, &epoch, &off) =
        (rows.run.first()?, rows.position.first()?, rows.epoch.first()?, rows.off.first()?);
    match super::gate::read_when_settled(inner, FIRST_ROW, &[&run, &position]).await?.first() {
        // Landed: its numbers run on from this row's.
        Some(row) if row.get::<_, i64>(1) == epoch => Some(Some(row.get::<_, i64>(0) - off)),
        // Another epoch's row in its place, or none: it did not land.
        _ => Some(None),
    }
}

/// The history row at a run's position ($1, $2): its number and epoch.
pub(super) const FIRST_ROW: &str = "SELECT id, epoch FROM history WHERE run = $1 AND position = $2";

/// The generation at which all these leases (run, epoch) were last seen
/// current, if it is one and the same and they are all still held.
fn checked_at(inner: &Inner, fenced: &[(i64, i64)]) -> Option<i64> {
    let held = inner.held.lock().unwrap_or_else(|p| p.into_inner());
    let mut at = None;
    for &(run, epoch) in fenced {
        let h = held.get(&RunKey(run)).filter(|h| h.epoch as i64 == epoch)?;
        let g = h.checked_at?;
        if *at.get_or_insert(g) != g {
            return None;
        }
    }
    at
}

/// The leases a fenced commit found current at `generation`.
fn note_checked(inner: &Inner, fenced: &[(i64, i64)], generation: i64) {
    let mut held = inner.held.lock().unwrap_or_else(|p| p.into_inner());
    for &(run, epoch) in fenced {
        if let Some(h) = held.get_mut(&RunKey(run)).filter(|h| h.epoch as i64 == epoch) {
            h.checked_at = Some(generation);
        }
    }
}

/// `APPEND_UNMOVED` (or `APPEND_ONE_KNOWN`): the first sequence number it
/// took, or `None` if the generation moved or the number counted on was
/// taken (nothing written).
async fn send_unmoved(
    inner: &Inner,
    client: &ClientWrapper,
    batch: &Sendable<'_>,
    generation: i64,
    numbers: &mut Numbers,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let (n, ts_us, rows) = (batch.n, batch.ts_us, &batch.rows);
    if n == 1 && rows.run.len() == 1 {
        let row: [&(dyn ToSql + Sync); 14] = [
            &generation,
            &rows.run[0],
            &rows.position[0],
            &rows.kind[0],
            &rows.name[0],
            &rows.occurrence[0],
            &rows.attempt[0],
            &rows.status[0],
            &rows.output[0],
            &rows.error[0],
            &rows.started_at[0],
            &rows.finished_at[0],
            &rows.epoch[0],
            &ts_us,
        ];
        if let Some(expected) = numbers.expected().filter(|_| !batch.notify) {
            let statement = client.prepare_cached(APPEND_ONE_KNOWN).await?;
            let mut params = row.to_vec();
            params.push(&expected);
            if client.execute(&statement, &params).await? == 1 {
                #[cfg(test)]
                inner.guesses.hit();
                return Ok(Some(expected));
            }
            // Another process took numbers, or a run changed hands (which
            // moved the generation on): the fenced statement, which tells
            // the number and notes the generation either way, in one more
            // round trip.
            numbers.missed();
            #[cfg(test)]
            inner.guesses.miss();
            return Ok(None);
        }
        let statement = client.prepare_cached(APPEND_ONE_UNMOVED).await?;
        let mut params = row.to_vec();
        params.extend([&inner.owner as &(dyn ToSql + Sync), &batch.notify]);
        let row = client.query_opt(&statement, &params).await?;
        return Ok(row.map(|r| r.get(0)));
    }
    let statement = client.prepare_cached(APPEND_UNMOVED).await?;
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&n, &generation, &ts_us];
    params.extend(rows.params());
    params.extend([&inner.owner as &(dyn ToSql + Sync), &batch.notify]);
    let row = client.query_opt(&statement, &params).await?;
    Ok(row.map(|r| r.get(0)))
}

/// The batch's one statement; the first sequence number it took.
async fn send(inner: &Inner, client: &ClientWrapper, batch: &Sendable<'_>) -> Result<i64, tokio_postgres::Error> {
    #[cfg(test)]
    inner.fenced_batches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Prepared once per connection (a round trip the first time only).
    let statement = client.prepare_cached(COMMIT_BATCH).await?;
    let Sendable { n, ts_us, ref fenced, ref rows, ref statuses, notify } = *batch;
    let (fence_runs, fence_epochs): (Vec<i64>, Vec<i64>) = fenced.iter().copied().unzip();
    // A run's last status change in the batch is the one its row keeps;
    // every change gets its change row.
    let mut last: Vec<&StatusChange> = Vec::with_capacity(statuses.len());
    for s in statuses {
        match last.iter_mut().find(|l| l.run == s.run) {
            Some(l) => *l = s,
            None => last.push(s),
        }
    }
    let update_runs: Vec<i64> = last.iter().map(|s| s.run).collect();
    let update_status: Vec<&str> = last.iter().map(|s| s.status).collect();
    let update_output: Vec<Option<&[u8]>> = last.iter().map(|s| s.output.as_deref()).collect();
    let update_error: Vec<Option<&str>> = last.iter().map(|s| s.error.as_deref()).collect();
    let update_finished: Vec<Option<i64>> = last.iter().map(|s| s.finished_at).collect();
    let change_offs: Vec<i64> = statuses.iter().map(|s| s.off).collect();
    let change_runs: Vec<i64> = statuses.iter().map(|s| s.run).collect();
    let change_status: Vec<&str> = statuses.iter().map(|s| s.status).collect();
    // See `listen::payload`.
    let kind = if statuses.is_empty() { "h" } else { "c" };
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&n, &fence_runs, &fence_epochs, &ts_us];
    params.extend(rows.params());
    params.extend([
        &update_runs as &(dyn ToSql + Sync),
        &update_status,
        &update_output,
        &update_error,
        &update_finished,
        &change_offs,
        &change_runs,
        &change_status,
        &inner.owner,
        &kind,
        &notify,
    ]);
    let row = client.query_one(&statement, &params).await?;
    note_checked(inner, fenced, row.get(1));
    Ok(row.get(0))
}

#[cfg(test)]
mod tests {
    use super::Numbers;

    #[test]
    fn a_lone_commit_counts_on_its_number_only_after_a_run_of_commits_that_ran_on() {
        let mut numbers = Numbers::default();
        numbers.took(10, 1);
        // Seven more that ran on from each other: not yet.
        for first in 11..18 {
            assert_eq!(numbers.expected(), None, "trusted after {first}");
            numbers.took(first, 1);
        }
        numbers.took(18, 3);
        assert_eq!(numbers.expected(), Some(21), "eight in a row ran on (a batch of 3 included)");
        // Another process took 21: one gap starts the count again.
        numbers.took(22, 1);
        assert_eq!(numbers.expected(), None);
        for first in 23..31 {
            numbers.took(first, 1);
        }
        assert_eq!(numbers.expected(), Some(31));
        numbers.missed();
        assert_eq!(numbers.expected(), None);
        numbers.took(40, 1);
        assert_eq!(numbers.expected(), None, "a guess that failed is not trusted again at once");
    }
}
