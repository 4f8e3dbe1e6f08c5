//! The key-value store over HTTP: what `cairn kv` does. Keys go in one
//! path segment, URL-encoded (`stock%2Fbook`); values are JSON.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::api::{authorize, body, json_value, number};
use super::schema::{KvEntry, KvPage};
use super::{ApiError, AppState, ErrorBody, long_read};
use crate::model::Role;
use crate::service::ErrorCode;
use crate::service::views;

type Reply = Result<(StatusCode, Json<Value>), ApiError>;

/// `GET /api/kv/{namespace}?prefix=&after=&limit=`: live keys in key order.
#[utoipa::path(get, path = "/api/kv/{namespace}", params(
    ("namespace" = String, Path),
    ("prefix" = Option<String>, Query, description = "only keys starting with this"),
    ("after" = Option<String>, Query, description = "the `next` of the previous page"),
    ("limit" = Option<usize>, Query, description = "at most this many (100 by default, 1000 at most)"),
), responses((status = 200, body = KvPage), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(namespace): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Reply {
    authorize(&state, &headers, Role::Viewer).await?;
    let limit = number::<usize>(&q, "limit")?.unwrap_or(100).clamp(1, 1000);
    let prefix = q.get("prefix").map_or("", String::as_str);
    let rows =
        long_read(state.service.kv_list(&namespace, prefix, q.get("after").map(String::as_str), limit + 1)).await?;
    let more = rows.len() > limit;
    let entries: Vec<Value> = rows.iter().take(limit).map(|(k, v)| views::kv_entry(k, v)).collect();
    let next = if more { entries.last().map(|e| e["key"].clone()) } else { None };
    Ok((StatusCode::OK, Json(json!({"entries": entries, "next": next}))))
}

/// `GET /api/kv/{namespace}/{key}`.
#[utoipa::path(get, path = "/api/kv/{namespace}/{key}", params(("namespace" = String, Path), ("key" = String, Path)),
    responses((status = 200, body = KvEntry), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn get(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((namespace, key)): Path<(String, String)>,
) -> Reply {
    authorize(&state, &headers, Role::Viewer).await?;
    match state.service.kv_get(&namespace, &key).await? {
        Some(v) => Ok((StatusCode::OK, Json(views::kv_entry(&key, &v)))),
        None => Err(ApiError::new(404, ErrorCode::NotFound, format!("namespace {namespace:?} has no key {key:?}"))),
    }
}

/// `PUT /api/kv/{namespace}/{key}`: the body is the value, JSON.
#[utoipa::path(put, path = "/api/kv/{namespace}/{key}", params(("namespace" = String, Path), ("key" = String, Path)),
    request_body(content = Object, description = "the value, JSON"),
    responses((status = 200, body = KvEntry), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
    (status = 403, body = ErrorBody), (status = 413, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn put(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((namespace, key)): Path<(String, String)>,
    bytes: Result<Bytes, BytesRejection>,
) -> Reply {
    authorize(&state, &headers, Role::Operator).await?;
    let value = json_value(&body(bytes)?)?;
    let value = serde_json::to_vec(&value).expect("a JSON value serializes");
    state.service.kv_set(&namespace, &key, Some(value)).await?;
    let written = state.service.kv_get(&namespace, &key).await?;
    Ok((StatusCode::OK, Json(written.map_or(Value::Null, |v| views::kv_entry(&key, &v)))))
}

/// `DELETE /api/kv/{namespace}/{key}`.
#[utoipa::path(delete, path = "/api/kv/{namespace}/{key}", params(("namespace" = String, Path), ("key" = String, Path)),
    responses((status = 200, body = Object), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn delete(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((namespace, key)): Path<(String, String)>,
) -> Reply {
    authorize(&state, &headers, Role::Operator).await?;
    state.service.kv_set(&namespace, &key, None).await?;
    Ok((StatusCode::OK, Json(json!({}))))
}
