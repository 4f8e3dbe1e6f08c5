//! Other processes' commits, pushed: every writing transaction notifies
//! `cairn_changes` (delivered at its commit, in commit order, never if it
//! rolls back) with "OWNER NEXT": who committed, and the sequence's next
//! number after it. A dedicated connection listens. A notification of this
//! process's own needs no read (the writer published those changes): the
//! cursor just moves past them. Any other makes the listener read the
//! changes since its cursor and publish those this process did not, and
//! so does the writer's word that it left a commit of its own to be read
//! back, because changes before it were not published yet
//! ([`Inner::publish_own`]): a feed read whole gets every change in the
//! order of its number.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client};

use super::tls::{Driver, Tls};
use super::{Inner, pg_error};
use crate::model::{RunKey, RunStatus};
use crate::store::{ChangeEvent, ChangeKind, StoreError};

/// The channel of change notifications, for statements built with `concat!`.
macro_rules! channel {
    () => {
        "cairn_changes"
    };
}
pub(super) use channel;

/// The channel of change notifications.
pub(super) const CHANNEL: &str = channel!();

/// A [`payload`] notified from inside a statement that learns its numbers
/// on the server: the owner, the next number and the kind (`'h'` or `'c'`)
/// are SQL expressions.
macro_rules! notify_sql {
    ($owner:literal, $next:literal, $kind:literal) => {
        concat!(
            "pg_notify('",
            $crate::store::postgres::listen::channel!(),
            "', ",
            $owner,
            "::TEXT || ' ' || (",
            $next,
            ") || ' ' || ",
            $kind,
            ")"
        )
    };
}
pub(super) use notify_sql;

/// What this process's feed has published, so that a feed read whole gets
/// events in the order of their numbers: a listener that keeps the last
/// number it saw (an SSE client's `Last-Event-ID`) then misses nothing by
/// resuming from it.
#[derive(Debug, Default)]
pub(crate) struct Published {
    /// Every change numbered up to here was published (or is not wanted by
    /// this feed, or no commit took the number).
    cursor: u64,
    /// Ranges [first, next) of numbers this process committed and published
    /// itself above the cursor, which the listener must not publish again.
    own: Vec<(u64, u64)>,
    /// Ranges [first, next) of numbers this process committed above the
    /// cursor whose control events went out at once and whose whole-feed
    /// events wait for the listener to read them back, in order.
    deferred: Vec<(u64, u64)>,
}

impl Published {
    fn is_own(&self, seq: u64) -> bool {
        self.own.iter().any(|&(a, b)| a <= seq && seq < b)
    }

    fn is_deferred(&self, seq: u64) -> bool {
        self.deferred.iter().any(|&(a, b)| a <= seq && seq < b)
    }

    /// Move the cursor on to `seq`, and forget the ranges it passed.
    fn advance(&mut self, seq: u64) {
        self.cursor = self.cursor.max(seq);
        let cursor = self.cursor;
        self.own.retain(|&(_, b)| b > cursor + 1);
        self.deferred.retain(|&(_, b)| b > cursor + 1);
    }
}

impl Inner {
    /// Publish this process's commit of the numbers [first, next), once
    /// committed (the writer holds `writing`). Commits take their numbers
    /// under the gate, so every number below `first` is committed already.
    /// If the feed published all of them, these go out at once. If not
    /// (another process's commits, heard of later) and someone reads the
    /// feed whole (`wants_all`, an SSE client), that reader must not get
    /// these first: their control events (what executing runs wait for) go
    /// out at once, and the listener, poked, reads the rest back with the
    /// others, in order.
    pub(crate) fn publish_own(&self, first: u64, next: u64, events: Vec<ChangeEvent>) {
        if next <= first {
            return;
        }
        let mut published = self.published.lock().unwrap_or_else(|p| p.into_inner());
        if published.cursor + 1 >= first {
            // The listener filters out what its last read has of these
            // by the cursor.
            published.advance(next - 1);
            self.publish(events);
        } else if self.feed.wants_all() {
            published.deferred.push((first, next));
            drop(published);
            for event in &events {
                self.feed.publish_control(event);
            }
            self.catch_up.notify_one();
        } else {
            published.own.push((first, next));
            self.publish(events);
        }
    }
}

/// A notification's payload, "OWNER NEXT KIND": who committed, the next
/// number after it, and whether it has changes other than history rows
/// (`c`) or not (`h`).
pub(super) fn payload(owner: &str, next: u64, has_changes: bool) -> String {
    format!("{owner} {next} {}", if has_changes { 'c' } else { 'h' })
}

fn parse_payload(payload: &str) -> Option<(&str, u64, bool)> {
    let (rest, kind) = payload.rsplit_once(' ')?;
    let (owner, next) = rest.rsplit_once(' ')?;
    Some((owner, next.parse().ok()?, kind != "h"))
}

/// Listen from now on: the listening connection is up and its cursor set
/// before this returns, so no commit after it is missed. If the connection
/// drops (a server restart), the task reconnects with backoff and catches
/// up from its cursor: what was committed meanwhile is published then.
/// The listener stops (and its connection closes) when the returned
/// sender is dropped, with the store.
pub(super) async fn start(
    inner: &Arc<Inner>,
    config: tokio_postgres::Config,
    tls: Tls,
) -> Result<tokio::sync::oneshot::Sender<()>, StoreError> {
    let (client, rx) = connect(&config, &tls).await?;
    let cursor: u64 =
        client.query_one(super::gate::LAST_COMMITTED, &[]).await.map_err(pg_error)?.get::<_, i64>(0).max(0) as u64;
    {
        let mut published = inner.published.lock().unwrap_or_else(|p| p.into_inner());
        published.cursor = published.cursor.max(cursor);
    }
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let weak = Arc::downgrade(inner);
    let poked = inner.catch_up.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = run(weak, config, tls, client, rx, poked) => {}
            _ = stopped => {}
        }
    });
    Ok(stop)
}

/// A listening connection, and a receiver of each notification's payload
/// (it ends when the connection does).
async fn connect(
    config: &tokio_postgres::Config,
    tls: &Tls,
) -> Result<(Client, mpsc::UnboundedReceiver<String>), StoreError> {
    let (tx, rx) = mpsc::unbounded_channel::<String>();
    let client = tls.connect(config, Notifications(tx)).await.map_err(pg_error)?;
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await.map_err(pg_error)?;
    Ok((client, rx))
}

/// Polls the listening connection, passing each notification's payload on.
struct Notifications(mpsc::UnboundedSender<String>);

impl Driver for Notifications {
    fn drive<S, T>(self, mut connection: tokio_postgres::Connection<S, T>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let tx = self.0;
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        if tx.send(n.payload().to_string()).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("cairn: the change listener's connection failed: {}", pg_error(e));
                        return;
                    }
                }
            }
        });
    }
}

async fn run(
    weak: std::sync::Weak<Inner>,
    config: tokio_postgres::Config,
    tls: Tls,
    mut client: Client,
    mut rx: mpsc::UnboundedReceiver<String>,
    poked: Arc<tokio::sync::Notify>,
) {
    // Whether every change up to the cursor was published: a failed read
    // leaves a gap that only a read can close.
    let mut caught_up = true;
    loop {
        loop {
            // A notification, the writer's word that it left a commit of
            // its own to be read back (`Inner::publish_own`), or, after a
            // failed read, time to read again.
            let first = tokio::select! {
                payload = rx.recv() => match payload {
                    Some(p) => Some(p),
                    None => break,
                },
                () = poked.notified() => None,
                () = tokio::time::sleep(Duration::from_millis(200)), if !caught_up => None,
            };
            let Some(inner) = weak.upgrade() else { return };
            // What arrived meanwhile too: one read for a burst.
            let (mut others, mut others_history, read) = (false, false, first.is_none());
            let mut own_next = 0;
            let mut payload = first.or_else(|| rx.try_recv().ok());
            while let Some(p) = payload {
                match parse_payload(&p) {
                    Some((owner, next, _)) if owner == inner.owner => own_next = own_next.max(next),
                    Some((_, _, false)) => others_history = true,
                    _ => others = true,
                }
                payload = rx.try_recv().ok();
            }
            // A process whose feed nobody reads whole (a worker: it waits
            // for new runs, signals and cancels) reads no history rows.
            let whole = inner.feed.wants_all();
            let cursor = inner.published.lock().unwrap_or_else(|p| p.into_inner()).cursor;
            // Another process's history-only commits below this process's
            // own may not be notified yet (they notify every few
            // milliseconds): a whole feed reads past its own commits
            // instead of skipping them.
            let own_past = own_next > cursor + 1;
            if read || others || (others_history && whole) || (own_past && whole) || !caught_up {
                caught_up = catch_up(&client, &inner, whole).await;
            }
            // This process's commits notified so far: every other commit
            // with changes before them notified at once (commit order) and
            // was read, so a feed without history passes them unread.
            if caught_up && !whole {
                let mut published = inner.published.lock().unwrap_or_else(|p| p.into_inner());
                // (Checked again under the lock: a feed read whole from now
                // on needs those history rows read.)
                if own_next > published.cursor + 1 && !inner.feed.wants_all() {
                    published.advance(own_next - 1);
                }
            }
        }
        // The connection ended: again, with backoff, while the store lives.
        let mut delay = Duration::from_millis(100);
        loop {
            tokio::time::sleep(delay).await;
            let Some(inner) = weak.upgrade() else { return };
            match connect(&config, &tls).await {
                Ok((c, r)) => {
                    (client, rx) = (c, r);
                    eprintln!("cairn: the change listener reconnected");
                    caught_up = catch_up(&client, &inner, true).await;
                    break;
                }
                Err(e) => {
                    eprintln!("cairn: the change listener cannot reconnect yet: {e}");
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Publish, in order, what was committed after the cursor and is not
/// published yet: other processes' commits, and this process's own that
/// the writer left to be read back (their whole-feed events only); false
/// if the changes could not be read. Without `history`, only other
/// changes than history rows are read (a feed of control events only),
/// unless someone came to read the feed whole meanwhile.
async fn catch_up(client: &Client, inner: &Inner, mut history: bool) -> bool {
    loop {
        let cursor = inner.published.lock().unwrap_or_else(|p| p.into_inner()).cursor;
        let changes = match read_changes(client, cursor, 1000, history).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("cairn: cannot read changes: {e}");
                return false;
            }
        };
        let Some(last) = changes.last().map(|c| c.seq) else { return true };
        // A commit of this process that these include is published (or
        // left to this read) once the writer lets go of this; it waits
        // for this in turn while these go out.
        let _writing = inner.writing.lock().await;
        let mut published = inner.published.lock().unwrap_or_else(|p| p.into_inner());
        if !history && inner.feed.wants_all() {
            // Moving the cursor past history rows not read would lose them.
            history = true;
            continue;
        }
        // The writer may have published commits of its own past the cursor
        // meanwhile (it does only when nothing before them was missing).
        let floor = published.cursor;
        if inner.feed.listening() {
            for change in changes.into_iter().filter(|c| c.seq > floor && !published.is_own(c.seq)) {
                if published.is_deferred(change.seq) {
                    inner.feed.publish_whole(change);
                } else {
                    inner.feed.publish(change);
                }
            }
        }
        published.advance(last);
    }
}

/// Up to `limit` changes after `after`, history appends and other changes
/// merged in sequence order.
/// (Without `history`, the other changes only.)
pub(super) async fn read_changes(
    client: &Client,
    after: u64,
    limit: usize,
    history: bool,
) -> Result<Vec<ChangeEvent>, StoreError> {
    let (after, limit) = (after as i64, limit as i64);
    let query = if history {
        "SELECT seq, run, kind, position, status, committed_us FROM ( \
           SELECT id AS seq, run, 'history' AS kind, position, NULL::TEXT AS status, committed_us \
             FROM history WHERE id > $1 \
           UNION ALL \
           SELECT seq, run, kind, NULL::INT, status, committed_us FROM changes WHERE seq > $1 \
         ) c ORDER BY seq LIMIT $2"
    } else {
        "SELECT seq, run, kind, NULL::INT, status, committed_us FROM changes WHERE seq > $1 ORDER BY seq LIMIT $2"
    };
    let rows = client.query(query, &[&after, &limit]).await.map_err(pg_error)?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let kind: String = r.get(2);
        let Some(kind) = ChangeKind::parse(&kind) else {
            eprintln!("cairn: skipping a change of unknown kind {kind:?}");
            continue;
        };
        out.push(ChangeEvent {
            seq: r.get::<_, i64>(0) as u64,
            run: RunKey(r.get(1)),
            kind,
            position: r.get::<_, Option<i32>>(3).map(|p| p as u64),
            status: r.get::<_, Option<String>>(4).and_then(|s| RunStatus::parse(&s)),
            ts_us: r.get(5),
        });
    }
    Ok(out)
}
