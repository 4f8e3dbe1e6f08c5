//! Noticing other processes' commits. SQLite cannot notify another
//! process, so while anyone in this process listens to the change feed, a
//! thread looks at `PRAGMA data_version` of the write connection every few
//! milliseconds. That number changes only when another connection
//! committed, so a process that commits a lot itself pays nothing more than
//! the look; when it did change, the changes since the last look are read
//! and published, skipping this process's own (published at commit).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread;
use std::time::Duration;

use rusqlite::{Connection, params};

use super::writer::{WriteConn, WriteSide, max_seq};
use crate::model::{RunKey, RunStatus};
use crate::store::{ChangeEvent, ChangeFeed, ChangeKind, StoreError};

/// How often the watcher looks while someone listens: a signal or cancel
/// from another process reaches a waiting run within about this long.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(10);

/// Changes read at once when catching up.
const PAGE: usize = 1024;

/// Where the watcher is; lives with the write connection, under its lock,
/// so that commits and looks never interleave.
#[derive(Debug, Default)]
pub(in crate::store::sqlite) struct WatchState {
    active: bool,
    /// Every change up to here was published (or was this process's own).
    cursor: u64,
    /// `PRAGMA data_version` at the last look.
    version: i64,
    /// [first, next) ranges of sequence numbers this process committed
    /// since the last look.
    own: Vec<(u64, u64)>,
}

impl WatchState {
    pub(in crate::store::sqlite) fn is_active(&self) -> bool {
        self.active
    }

    pub(in crate::store::sqlite) fn own_commit(&mut self, first: u64, next: u64) {
        if !self.active || next <= first {
            return;
        }
        match self.own.last_mut() {
            Some(last) if last.1 == first => last.1 = next,
            _ => self.own.push((first, next)),
        }
    }

    fn is_own(&self, seq: u64) -> bool {
        self.own.iter().any(|&(a, b)| a <= seq && seq < b)
    }
}

fn data_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("PRAGMA data_version")?.query_row([], |r| r.get(0))
}

/// Start watching from the current end of the sequence (called with the
/// write connection locked, so no commit falls between).
pub(in crate::store::sqlite) fn start(wc: &mut WriteConn) -> Result<(), StoreError> {
    let version = data_version(&wc.conn)?;
    let cursor = max_seq(&wc.conn)? as u64;
    wc.watch = WatchState { active: true, cursor, version, own: Vec::new() };
    Ok(())
}

/// One look: publish what other processes committed since the last one.
fn look(w: &WriteSide) -> Result<(), StoreError> {
    let mut guard = w.lock();
    let wc = &mut *guard;
    if !w.feed.listening() {
        wc.watch.active = false;
        return Ok(());
    }
    if !wc.watch.active {
        return start(wc);
    }
    let version = data_version(&wc.conn)?;
    if version == wc.watch.version {
        // Nobody else committed: everything since was ours, and published.
        if let Some(&(_, next)) = wc.watch.own.last() {
            wc.watch.cursor = wc.watch.cursor.max(next - 1);
        }
        wc.watch.own.clear();
        return Ok(());
    }
    // One snapshot: other processes go on committing meanwhile.
    let snapshot = wc.conn.unchecked_transaction()?;
    if w.feed.wants_all() {
        publish_others(&w.feed, &snapshot, &mut wc.watch, u64::MAX)?;
    } else {
        // Only executing runs listen: read control events, not every
        // history row other processes wrote.
        for event in read_control_changes(&snapshot, wc.watch.cursor)? {
            if !wc.watch.is_own(event.seq) {
                w.feed.publish(event);
            }
        }
        wc.watch.cursor = wc.watch.cursor.max(max_seq(&snapshot)? as u64);
    }
    snapshot.commit()?;
    wc.watch.own.clear();
    wc.watch.version = version;
    Ok(())
}

/// Before this process's commit numbered from `first` is published to a
/// whole feed (`wants_all`: an SSE client resumes from the last number it
/// saw): what other processes committed before it and the watcher has not
/// published yet, so that the feed goes in the order of the numbers. Called
/// under the write connection's lock, once the commit is durable: every
/// number below `first` is committed. Costs one look at `data_version`
/// unless another process committed since the watcher's last look.
pub(in crate::store::sqlite) fn publish_before_own(
    feed: &ChangeFeed,
    wc: &mut WriteConn,
    first: u64,
) -> Result<(), StoreError> {
    if !wc.watch.active || wc.watch.cursor + 1 >= first || data_version(&wc.conn)? == wc.watch.version {
        return Ok(());
    }
    let snapshot = wc.conn.unchecked_transaction()?;
    publish_others(feed, &snapshot, &mut wc.watch, first)?;
    snapshot.commit()?;
    // The watcher's version stays: it reads on from here at its next look.
    wc.watch.cursor = wc.watch.cursor.max(first - 1);
    Ok(())
}

/// Publish, page by page, the changes after the watcher's cursor and below
/// `below` that are not this process's own, moving the cursor over them.
fn publish_others(feed: &ChangeFeed, conn: &Connection, watch: &mut WatchState, below: u64) -> Result<(), StoreError> {
    loop {
        let events = read_changes(conn, watch.cursor, PAGE)?;
        let whole_page = events.len() == PAGE;
        for event in events {
            if event.seq >= below {
                return Ok(());
            }
            watch.cursor = event.seq;
            if !watch.is_own(event.seq) {
                feed.publish(event);
            }
        }
        if !whole_page {
            return Ok(());
        }
    }
}

/// The watcher thread of one store: idle while nobody listens.
pub(in crate::store::sqlite) fn spawn(
    write: Weak<WriteSide>,
    feed: Arc<ChangeFeed>,
    closed: Arc<AtomicBool>,
) -> std::io::Result<()> {
    thread::Builder::new().name("cairn-watch".into()).spawn(move || {
        while !closed.load(Ordering::Relaxed) {
            if !feed.wait_for_listeners(Duration::from_secs(1)) {
                if let Some(w) = write.upgrade() {
                    // Checked again under the lock: a subscriber may have
                    // started watching meanwhile.
                    let mut wc = w.lock();
                    if !w.feed.listening() {
                        wc.watch.active = false;
                    }
                }
                continue;
            }
            thread::sleep(WATCH_INTERVAL);
            let Some(w) = write.upgrade() else { break };
            if let Err(e) = look(&w) {
                eprintln!("cairn: cannot read other processes' changes: {e}");
                thread::sleep(Duration::from_millis(200));
            }
        }
    })?;
    Ok(())
}

/// The control events (`ChangeEvent::is_control`) after `after`.
fn read_control_changes(conn: &Connection, after: u64) -> Result<Vec<ChangeEvent>, StoreError> {
    // The kinds from `ChangeKind::may_be_control`, not a list of its own:
    // one written out here once lacked `created`.
    static QUERY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let kinds: Vec<String> =
            ChangeKind::ALL.into_iter().filter(|k| k.may_be_control()).map(|k| format!("'{}'", k.as_str())).collect();
        format!(
            "SELECT seq, run, kind, status, committed_us FROM changes WHERE seq > ?1 AND kind IN ({}) ORDER BY seq",
            kinds.join(", ")
        )
    });
    let mut stmt = conn.prepare_cached(&QUERY)?;
    let rows = stmt.query_map([after as i64], change_row)?.collect::<Result<Vec<_>, _>>()?;
    let mut events = Vec::new();
    for row in rows {
        match change_event(row) {
            Ok(event) if event.is_control() => events.push(event),
            Ok(_) => {}
            Err(e) => eprintln!("cairn: skipping a change: {e}"),
        }
    }
    Ok(events)
}

type ChangeRow = (i64, i64, String, Option<String>, i64);

fn change_row(r: &rusqlite::Row) -> rusqlite::Result<ChangeRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

/// A `changes` row as an event.
fn change_event((seq, run, kind, status, ts_us): ChangeRow) -> Result<ChangeEvent, StoreError> {
    let seq = seq as u64;
    let kind = ChangeKind::parse(&kind)
        .ok_or_else(|| StoreError::Corrupt(format!("change {seq} has an unknown kind {kind:?}")))?;
    let status = match status {
        None => None,
        Some(s) => Some(
            RunStatus::parse(&s)
                .ok_or_else(|| StoreError::Corrupt(format!("change {seq} has an unknown status {s:?}")))?,
        ),
    };
    Ok(ChangeEvent { seq, run: RunKey(run), kind, position: None, status, ts_us })
}

/// Up to `limit` changes after `after`, in sequence order: history rows
/// and `changes` rows merged. Call it inside one read transaction, or a
/// commit between its two queries could be half seen.
pub(in crate::store::sqlite) fn read_changes(
    conn: &Connection,
    after: u64,
    limit: usize,
) -> Result<Vec<ChangeEvent>, StoreError> {
    let (after, n) = (after as i64, limit as i64);
    let mut history = conn.prepare_cached(
        "SELECT h.id, h.run, h.position, coalesce( \
             (SELECT c.committed_us FROM commits c WHERE c.first_seq <= h.id ORDER BY c.first_seq DESC LIMIT 1), \
             h.finished_at * 1000) \
         FROM history h WHERE h.id > ?1 ORDER BY h.id LIMIT ?2",
    )?;
    let history = history
        .query_map(params![after, n], |r| {
            Ok(ChangeEvent {
                seq: r.get::<_, i64>(0)? as u64,
                run: RunKey(r.get(1)?),
                kind: ChangeKind::History,
                position: Some(r.get::<_, i64>(2)? as u64),
                status: None,
                ts_us: r.get(3)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut changes = conn.prepare_cached(
        "SELECT seq, run, kind, status, committed_us FROM changes WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    )?;
    let changes = changes.query_map(params![after, n], change_row)?.collect::<Result<Vec<_>, _>>()?;
    let mut merged = Vec::with_capacity(limit.min(history.len() + changes.len()));
    let mut history = history.into_iter().peekable();
    for row in changes {
        // One malformed row (edited by hand) must not stop the feed at it.
        let event = match change_event(row) {
            Ok(event) => event,
            Err(e) => {
                eprintln!("cairn: skipping a change: {e}");
                continue;
            }
        };
        while let Some(h) = history.next_if(|h| h.seq < event.seq) {
            merged.push(h);
        }
        merged.push(event);
    }
    merged.extend(history);
    merged.truncate(limit);
    Ok(merged)
}
