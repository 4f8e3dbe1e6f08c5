//! `cairn serve`: the HTTP API, a second shell over the service layer (the
//! command line is the first). Every `/api` route needs a bearer token of a
//! role high enough (`service::tokens`); errors are
//! `{"error": CODE, "detail": TEXT}` with the status of
//! `ServiceError::class`; events are Server-Sent Events fed by the store's
//! change feed, with no polling loop here.

mod api;
mod error;
mod events;

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};

use crate::runtime::Executor;
use crate::service::Service;
pub use error::ApiError;

/// What the handlers share.
pub struct AppState {
    pub service: Service,
    /// Checks modules and starts runs (and executes them, unless `--no-worker`).
    pub executor: Arc<Executor>,
    /// False with `--no-worker`: runs are executed by other processes.
    pub worker: bool,
    /// Directories that `dirs` of a new run must lie inside (`--allow-dir`).
    pub allow_dirs: Vec<PathBuf>,
    /// Largest module, bytes (`--max-module-mib`).
    pub max_module: usize,
}

/// The routes.
pub fn router(state: Arc<AppState>) -> Router {
    // Bodies are payloads (capped per run) or modules (capped here).
    let max_body = state.max_module.max(crate::model::Limits::default().max_payload_bytes()) + 1;
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/api/runs", get(api::list_runs).post(api::start_run))
        .route("/api/runs/{id}", get(api::get_run))
        .route("/api/runs/{id}/history", get(api::history))
        .route("/api/runs/{id}/signals/{name}", post(api::signal))
        .route("/api/runs/{id}/cancel", post(api::cancel))
        .route("/api/runs/{id}/resume", post(api::resume))
        .route("/api/runs/{id}/events", get(events::run_events))
        .route("/api/events", get(events::all_events))
        .route("/api/modules", get(api::list_modules).post(api::upload_module))
        .route("/api/modules/{hash}", get(api::get_module))
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// Serve on `listener` until `stop` resolves; requests in flight finish first.
pub async fn serve(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    eprintln!("cairn serve: listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router(state)).with_graceful_shutdown(stop).await
}
