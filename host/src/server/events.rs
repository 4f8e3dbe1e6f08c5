//! Server-Sent Events from the change feed: `id:` is the store's `seq`,
//! `event:` its kind. A client that reconnects with `Last-Event-ID` first
//! gets what it missed (`changes_since`), then live events, each once. A
//! client that falls behind gets a `reset` event and is dropped: it
//! reconnects with its `Last-Event-ID`; commits never wait for it.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, StreamExt};
use serde_json::json;

use super::api::authorize;
use super::{ApiError, AppState, ErrorBody};
use crate::model::{Role, RunKey};
use crate::store::feed::FeedError;
use crate::store::{ChangeEvent, Subscription};

/// At most this many missed events are replayed; further back, `reset`.
const REPLAY_LIMIT: usize = 10_000;

type Events = axum::response::Response;

/// Every run's committed changes, as Server-Sent Events: `id:` the store's
/// `seq`, `event:` the kind, `data:` `{"seq","run_id","kind","position"?,"status"?,"ts_us"}`.
/// With `Last-Event-ID`, what was missed first; too far back, a `reset` event.
#[utoipa::path(get, path = "/api/events", params(("Last-Event-ID" = Option<u64>, Header, description = "the last `id` received")),
    responses((status = 200, description = "an event stream", body = String, content_type = "text/event-stream"), (status = 401, body = ErrorBody)))]
pub(super) async fn all_events(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Events, ApiError> {
    authorize(&state, &headers, Role::Viewer).await?;
    stream_events(state, headers, None).await
}

/// One run's committed changes, as `/api/events` has them.
#[utoipa::path(get, path = "/api/runs/{id}/events", params(("id" = String, Path), ("Last-Event-ID" = Option<u64>, Header, description = "the last `id` received")),
    responses((status = 200, description = "an event stream", body = String, content_type = "text/event-stream"), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn run_events(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Events, ApiError> {
    authorize(&state, &headers, Role::Viewer).await?;
    let run = state.service.find_run(&id).await?.key;
    stream_events(state, headers, Some(run)).await
}

struct Feed {
    state: Arc<AppState>,
    only: Option<RunKey>,
    backlog: VecDeque<ChangeEvent>,
    /// The client has, or gets from the backlog, every change up to here:
    /// its `Last-Event-ID`, or the backlog's last. A live copy of one is
    /// skipped. (Live events come in order, and the backlog, read after
    /// subscribing, holds every change committed before it was read. A
    /// server whose feed lagged behind another's, where the client was
    /// before, may publish some of the client's late.)
    seen_through: Option<u64>,
    live: Subscription,
    ids: HashMap<RunKey, String>,
    done: bool,
    stopping: tokio::sync::watch::Receiver<bool>,
    _client: crate::telemetry::GaugeGuard,
}

/// The stream of an authorized caller (`only`: one run's events).
async fn stream_events(state: Arc<AppState>, headers: HeaderMap, only: Option<RunKey>) -> Result<Events, ApiError> {
    // Subscribed before the backlog is read: nothing falls between.
    let live = state.service.subscribe();
    let last: Option<u64> =
        headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok());
    let mut backlog = VecDeque::new();
    let mut reset = false;
    if let Some(last) = last {
        let missed = super::long_read(state.service.store().changes_since(last, REPLAY_LIMIT + 1)).await?;
        reset = missed.len() > REPLAY_LIMIT;
        if !reset {
            backlog.extend(missed);
        }
    }
    let seen_through = backlog.back().map(|e| e.seq).max(last);
    let stopping = state.stopping.clone();
    let _client = crate::telemetry::GaugeGuard::new(&crate::telemetry::get().sse_clients);
    let feed = Feed { state, only, backlog, seen_through, live, ids: HashMap::new(), done: false, stopping, _client };
    let reset_event: Option<Result<Event, Infallible>> = reset.then(|| Ok(Event::default().event("reset").data("{}")));
    let events = stream::iter(reset_event).chain(stream::unfold(feed, next_event));
    Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
}

async fn next_event(mut feed: Feed) -> Option<(Result<Event, Infallible>, Feed)> {
    loop {
        if feed.done {
            return None;
        }
        let event = match feed.backlog.pop_front() {
            Some(e) => e,
            None => match tokio::select! {
                event = feed.live.recv() => event,
                // The server stops: the stream ends (the client reconnects
                // with its Last-Event-ID to the next server).
                _ = feed.stopping.wait_for(|stop| *stop) => return None,
            } {
                Ok(e) if feed.seen_through.is_some_and(|s| e.seq <= s) => continue,
                Ok(e) => e,
                // Too far behind: say so and end; the client comes back
                // with its Last-Event-ID.
                Err(FeedError::Lagged(_)) => {
                    feed.done = true;
                    return Some((Ok(Event::default().event("reset").data("{}")), feed));
                }
                Err(FeedError::Closed) => return None,
            },
        };
        if feed.only.is_some_and(|r| r != event.run) {
            continue;
        }
        let run_id = match feed.ids.get(&event.run) {
            Some(id) => id.clone(),
            None => {
                let id = feed.state.service.store().run_id(event.run).await.ok().flatten().unwrap_or_default();
                feed.ids.insert(event.run, id.clone());
                id
            }
        };
        let mut data = json!({"seq": event.seq, "run_id": run_id, "kind": event.kind.as_str(), "ts_us": event.ts_us});
        if let Some(p) = event.position {
            data["position"] = json!(p);
        }
        if let Some(s) = event.status {
            data["status"] = json!(s.as_str());
        }
        let sse = Event::default().id(event.seq.to_string()).event(event.kind.as_str()).data(data.to_string());
        return Some((Ok(sse), feed));
    }
}
