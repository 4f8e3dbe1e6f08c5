//! The routes about the server itself: health, metrics, its API document.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::api::authorize;
use super::{ApiError, AppState, ErrorBody};
use crate::model::Role;
use crate::service::ErrorCode;

/// Liveness: answers without a token.
#[utoipa::path(get, path = "/healthz", security(()), responses((status = 200, description = "the server is up", body = String, content_type = "text/plain")))]
pub(super) async fn healthz() -> &'static str {
    "ok\n"
}

/// This document.
#[utoipa::path(get, path = "/api/openapi.json", responses(
    (status = 200, description = "OpenAPI 3.1", body = Object),
    (status = 401, body = ErrorBody),
))]
pub(super) async fn openapi(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&state, &headers, Role::Viewer).await?;
    let doc = state.openapi.get().cloned().unwrap_or_default();
    Ok(([(header::CONTENT_TYPE, "application/json")], doc).into_response())
}

/// Prometheus text: runs by status, steps committed, step latency, commit
/// batch sizes, fsync latency, replays, retries, live instances, parked
/// runs, event-stream clients.
#[utoipa::path(get, path = "/metrics", responses(
    (status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain"),
    (status = 401, body = ErrorBody),
    (status = 503, description = "metrics are not recorded by this process", body = ErrorBody),
))]
pub(super) async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&state, &headers, Role::Viewer).await?;
    let Some(handle) = &state.metrics else {
        return Err(ApiError::new(503, ErrorCode::Internal, "this process records no metrics"));
    };
    crate::telemetry::set_run_counts(&state.service.store().run_counts().await?);
    let text = handle.render();
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}
