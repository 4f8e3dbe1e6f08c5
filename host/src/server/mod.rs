//! `cairn serve`: the HTTP API, a second shell over the service layer (the
//! command line is the first). Every `/api` route needs a bearer token of a
//! role high enough (`service::tokens`); errors are
//! `{"error": CODE, "detail": TEXT}` with the status of
//! `ServiceError::class`; events are Server-Sent Events fed by the store's
//! change feed, with no polling loop here.
//!
//! The routes are registered through `utoipa-axum`, so the OpenAPI document
//! at `/api/openapi.json` is made from the same list the router is: a route
//! cannot be served and missing from it, or the other way round.

mod api;
mod error;
mod events;
mod kv;
mod meta;
mod schema;
mod web;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::http::{HeaderValue, header};
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::CompressionLayer;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::runtime::Executor;
use crate::service::Service;
pub use error::{ApiError, ErrorBody};

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
    /// Renders `/metrics` (`None`: another recorder owns the process's metrics).
    pub metrics: Option<PrometheusHandle>,
    /// Becomes true when the server stops: event streams end, so that the
    /// graceful shutdown does not wait for them forever.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// The OpenAPI document, rendered once.
    openapi: OnceLock<String>,
    /// Hashes of modules known to be stored (modules are never deleted):
    /// starting a run of one reads nothing.
    known_modules: std::sync::RwLock<std::collections::HashSet<String>>,
}

impl AppState {
    pub fn new(service: Service, executor: Arc<Executor>, stopping: tokio::sync::watch::Receiver<bool>) -> Self {
        AppState {
            service,
            executor,
            worker: true,
            allow_dirs: Vec::new(),
            max_module: 64 << 20,
            metrics: None,
            stopping,
            openapi: OnceLock::new(),
            known_modules: Default::default(),
        }
    }

    /// Whether the store holds a module with this hash.
    async fn module_known(&self, hash: &str) -> Result<bool, ApiError> {
        if self.known_modules.read().unwrap_or_else(|e| e.into_inner()).contains(hash) {
            return Ok(true);
        }
        let stored = self.service.store().module(hash).await?.is_some();
        if stored {
            self.remember_module(hash.to_string());
        }
        Ok(stored)
    }

    /// A module now known to be stored.
    fn remember_module(&self, hash: String) {
        self.known_modules.write().unwrap_or_else(|e| e.into_inner()).insert(hash);
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Cairn",
        description = "The HTTP API of `cairn serve`: runs, their histories and live events, signals, cancels, modules. \
                       Every `/api` route and `/metrics` needs `Authorization: Bearer TOKEN` (`cairn token create`). \
                       Errors are `{\"error\": CODE, \"detail\": TEXT}`, with CODE from `ErrorCode`."
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(ErrorBody, crate::service::ErrorCode))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        let scheme =
            HttpBuilder::new().scheme(HttpAuthScheme::Bearer).description(Some("a token of `cairn token create`"));
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme.build()));
    }
}

/// Await a store read that can be long (a page of a long history, a page
/// of runs, a replay of missed events) with this worker thread handed over
/// first, so that the requests and event streams sharing it go on. Short
/// point reads (a token, a run by id) are awaited directly.
pub(crate) async fn long_read<T>(read: impl std::future::Future<Output = T>) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| h.block_on(read))
        }
        _ => read.await,
    }
}

/// The routes, and the OpenAPI document made from them.
pub fn router(state: Arc<AppState>) -> Router {
    // Bodies are payloads (capped per run) or modules (capped here).
    let max_body = state.max_module.max(crate::model::Limits::default().max_payload_bytes()) + 1;
    let (router, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(api::list_runs, api::start_run))
        .routes(routes!(api::get_run))
        .routes(routes!(api::history))
        .routes(routes!(api::signal))
        .routes(routes!(api::cancel))
        .routes(routes!(api::resume))
        .routes(routes!(events::run_events))
        .routes(routes!(events::all_events))
        .routes(routes!(api::list_modules, api::upload_module))
        .routes(routes!(api::get_module))
        .routes(routes!(kv::list))
        .routes(routes!(kv::get, kv::put, kv::delete))
        .routes(routes!(meta::openapi))
        .routes(routes!(meta::metrics))
        .routes(routes!(meta::healthz))
        .routes(routes!(web::index))
        .routes(routes!(web::asset))
        .split_for_parts();
    let rendered = doc.to_pretty_json().unwrap_or_else(|e| format!("{{\"error\": \"internal\", \"detail\": \"{e}\"}}"));
    let _ = state.openapi.set(rendered);
    router
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        // Event streams are left uncompressed by the default predicate.
        .layer(CompressionLayer::new())
        .layer(tower_http::set_header::SetResponseHeaderLayer::if_not_present(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(TraceLayer::new_for_http())
        // A bug in a handler is a 500 with the documented body, not a dropped connection.
        .layer(CatchPanicLayer::custom(|_| {
            use axum::response::IntoResponse;
            ApiError::new(500, crate::service::ErrorCode::Internal, "the handler failed").into_response()
        }))
        .with_state(state)
}

/// Serve on `listener` until `stop` resolves; requests in flight finish
/// first, and event streams end.
pub async fn serve(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
    stopping: tokio::sync::watch::Sender<bool>,
) -> std::io::Result<()> {
    eprintln!("cairn serve: listening on http://{}", listener.local_addr()?);
    let stop = async move {
        stop.await;
        tracing::info!("stopping: finishing requests in flight");
        let _ = stopping.send(true);
    };
    axum::serve(listener, router(state)).with_graceful_shutdown(stop).await
}
