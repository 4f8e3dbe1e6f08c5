//! Other processes' commits, pushed: every writing transaction sends
//! `NOTIFY cairn_changes` (delivered at its commit, never if it rolls
//! back); a dedicated connection listens, reads the changes since the last
//! it saw and publishes those this process did not publish itself.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client};

use super::{Inner, pg_error};
use crate::model::{RunKey, RunStatus};
use crate::store::{ChangeEvent, ChangeKind, StoreError};

/// The channel of change notifications.
pub(super) const CHANNEL: &str = "cairn_changes";

/// Ranges [first, next) of sequence numbers this process committed and
/// published itself, noted before the commit.
#[derive(Debug, Default)]
pub(crate) struct Own {
    ranges: Vec<(u64, u64)>,
}

impl Own {
    pub(super) fn add(&mut self, first: u64, next: u64) {
        if next > first {
            self.ranges.push((first, next));
        }
    }

    fn contains(&self, seq: u64) -> bool {
        self.ranges.iter().any(|&(a, b)| a <= seq && seq < b)
    }

    /// Forget ranges below `seq`: everything there was seen.
    fn forget_below(&mut self, seq: u64) {
        self.ranges.retain(|&(_, b)| b > seq);
    }
}

/// Listen from now on: the listening connection is up and its cursor set
/// before this returns, so no commit after it is missed. If the connection
/// drops (a server restart), the task reconnects with backoff and catches
/// up from its cursor: what was committed meanwhile is published then.
pub(super) async fn start(inner: &Arc<Inner>, config: tokio_postgres::Config) -> Result<(), StoreError> {
    let (client, rx) = connect(&config).await?;
    let cursor: u64 =
        client.query_one("SELECT next - 1 FROM cairn_seq", &[]).await.map_err(pg_error)?.get::<_, i64>(0).max(0) as u64;
    tokio::spawn(run(Arc::downgrade(inner), config, client, rx, cursor));
    Ok(())
}

/// A listening connection, and a receiver woken by each notification (it
/// ends when the connection does).
async fn connect(config: &tokio_postgres::Config) -> Result<(Client, mpsc::UnboundedReceiver<()>), StoreError> {
    let (client, mut connection) = config.connect(tokio_postgres::NoTls).await.map_err(pg_error)?;
    let (tx, rx) = mpsc::unbounded_channel::<()>();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(_)) => {
                    if tx.send(()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("cairn: the change listener's connection failed: {e}");
                    return;
                }
            }
        }
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await.map_err(pg_error)?;
    Ok((client, rx))
}

async fn run(
    weak: std::sync::Weak<Inner>,
    config: tokio_postgres::Config,
    mut client: Client,
    mut rx: mpsc::UnboundedReceiver<()>,
    mut cursor: u64,
) {
    loop {
        while rx.recv().await.is_some() {
            while rx.try_recv().is_ok() {}
            let Some(inner) = weak.upgrade() else { return };
            catch_up(&client, &inner, &mut cursor).await;
        }
        // The connection ended: again, with backoff, while the store lives.
        let mut delay = Duration::from_millis(100);
        loop {
            tokio::time::sleep(delay).await;
            let Some(inner) = weak.upgrade() else { return };
            match connect(&config).await {
                Ok((c, r)) => {
                    (client, rx) = (c, r);
                    eprintln!("cairn: the change listener reconnected");
                    catch_up(&client, &inner, &mut cursor).await;
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

/// Publish what other processes committed after `cursor`.
async fn catch_up(client: &Client, inner: &Inner, cursor: &mut u64) {
    loop {
        let changes = match read_changes(client, *cursor, 1000).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("cairn: cannot read changes: {e}");
                return;
            }
        };
        let Some(last) = changes.last().map(|c| c.seq) else { return };
        let own = inner.own.lock().unwrap_or_else(|p| p.into_inner());
        let fresh: Vec<ChangeEvent> = changes.into_iter().filter(|c| !own.contains(c.seq)).collect();
        drop(own);
        if inner.feed.listening() {
            for event in fresh {
                inner.feed.publish(event);
            }
        }
        *cursor = last;
        inner.own.lock().unwrap_or_else(|p| p.into_inner()).forget_below(*cursor);
    }
}

/// Up to `limit` changes after `after`, history appends and other changes
/// merged in sequence order.
pub(super) async fn read_changes(client: &Client, after: u64, limit: usize) -> Result<Vec<ChangeEvent>, StoreError> {
    let (after, limit) = (after as i64, limit as i64);
    let rows = client
        .query(
            "SELECT seq, run, kind, position, status, committed_us FROM ( \
               SELECT id AS seq, run, 'history' AS kind, position, NULL::TEXT AS status, committed_us \
                 FROM history WHERE id > $1 \
               UNION ALL \
               SELECT seq, run, kind, NULL::INT, status, committed_us FROM changes WHERE seq > $1 \
             ) c ORDER BY seq LIMIT $2",
            &[&after, &limit],
        )
        .await
        .map_err(pg_error)?;
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
