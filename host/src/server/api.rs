//! The JSON routes: runs, their histories, signals, cancels, modules.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::schema::{Accepted, CancelRun, HistoryPage, ModuleInfo, ModuleList, RunDetail, RunPage, StartRun, Started};
use super::{ApiError, AppState, ErrorBody, long_read};
use crate::model::{Role, RunConfig, RunKey, RunStatus, TokenRecord};
use crate::service::ErrorCode;
use crate::service::request;
use crate::service::tokens::AuthError;
use crate::service::{Cancelled, StartMode, StartModule, StartRequest, views};
use crate::store::RunFilter;

type Reply = Result<(StatusCode, Json<Value>), ApiError>;

/// The caller's token, if it is live and at least `need`.
pub(super) async fn authorize(state: &AppState, headers: &HeaderMap, need: Role) -> Result<TokenRecord, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(AuthError::Unauthorized)?;
    Ok(state.service.authenticate(token.trim(), need).await?)
}

/// A request body within the server's limit (`413 too_large` past it).
pub(super) fn body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(413, ErrorCode::TooLarge, e.body_text()),
        status => ApiError::new(status.as_u16(), ErrorCode::InvalidRequest, e.body_text()),
    })
}

/// A JSON value as a body, whatever its Content-Type says.
pub(super) fn json_value(bytes: &[u8]) -> Result<Value, ApiError> {
    json_body(bytes)
}

/// A JSON body, whatever its Content-Type says (`curl -d` sends a form type).
fn json_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::new(422, ErrorCode::InvalidRequest, e.to_string()),
        _ => ApiError::new(400, ErrorCode::BadJson, e.to_string()),
    })
}

pub(super) fn number<T: std::str::FromStr>(q: &HashMap<String, String>, name: &str) -> Result<Option<T>, ApiError> {
    q.get(name)
        .map(|v| {
            v.parse().map_err(|_| ApiError::new(422, ErrorCode::InvalidRequest, format!("`{name}` must be a number")))
        })
        .transpose()
}

/// `GET /api/runs?status=&module=&limit=&after=`: newest first.
#[utoipa::path(get, path = "/api/runs", params(
    ("status" = Option<String>, Query, description = "only runs of this status"),
    ("module" = Option<String>, Query, description = "only runs of modules whose hash starts so"),
    ("limit" = Option<usize>, Query, description = "at most this many (50 by default, 1000 at most)"),
    ("after" = Option<i64>, Query, description = "the `next` of the previous page"),
), responses((status = 200, body = RunPage), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn list_runs(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Reply {
    authorize(&state, &headers, Role::Viewer).await?;
    let limit = number::<usize>(&q, "limit")?.unwrap_or(50).clamp(1, 1000);
    let status = match q.get("status").filter(|s| !s.is_empty()) {
        Some(s) => Some(RunStatus::parse(s).ok_or_else(|| {
            ApiError::new(
                422,
                ErrorCode::InvalidRequest,
                format!("`status` must be one of {}", RunStatus::ALL.map(|s| s.as_str()).join(", ")),
            )
        })?),
        None => None,
    };
    let filter = RunFilter {
        status,
        module_prefix: q.get("module").filter(|m| !m.is_empty()).cloned(),
        before: number::<i64>(&q, "after")?.map(RunKey),
        limit: limit + 1,
    };
    // Read first: events after it reach a client that subscribes from it.
    let seq = state.service.store().last_seq().await?;
    let page = long_read(state.service.runs_page(&filter)).await?;
    let next = (page.len() > limit).then(|| page[limit - 1].key.0);
    let runs: Vec<Value> = page.iter().take(limit).map(views::run_summary).collect();
    Ok((StatusCode::OK, Json(json!({"runs": runs, "next": next, "seq": seq}))))
}

/// `GET /api/runs/{id}`: `cairn show --json`, and the feed position to
/// subscribe from.
#[utoipa::path(get, path = "/api/runs/{id}", params(("id" = String, Path),
    ("history" = Option<bool>, Query, description = "`false` leaves the history out (page it with `/history`)")), responses(
    (status = 200, body = RunDetail), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn get_run(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Reply {
    authorize(&state, &headers, Role::Viewer).await?;
    let seq = state.service.store().last_seq().await?;
    let mut view = if q.get("history").is_some_and(|h| h == "false") {
        // The run page pages the history itself (`/history`).
        let run = state.service.find_run(&id).await?;
        let branches = long_read(state.service.store().branch_attempts(run.key)).await?;
        let mut view = views::RunView { run, history: Vec::new(), branches }.to_json();
        view.as_object_mut().map(|o| o.remove("history"));
        view
    } else {
        long_read(state.service.run_view(&id)).await?.to_json()
    };
    view["seq"] = json!(seq);
    Ok((StatusCode::OK, Json(view)))
}

/// `GET /api/runs/{id}/history?after=POSITION&limit=N`: a page of entries.
#[utoipa::path(get, path = "/api/runs/{id}/history", params(
    ("id" = String, Path),
    ("after" = Option<i64>, Query, description = "entries after this position"),
    ("limit" = Option<usize>, Query, description = "at most this many (100 by default, 1000 at most)"),
), responses((status = 200, body = HistoryPage), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn history(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Reply {
    authorize(&state, &headers, Role::Viewer).await?;
    let limit = number::<usize>(&q, "limit")?.unwrap_or(100).clamp(1, 1000);
    let from = number::<i64>(&q, "after")?.map_or(0, |a| a.saturating_add(1).max(0) as u64);
    let run = state.service.find_run(&id).await?;
    let store = state.service.store();
    let mut history = long_read(store.history_page(run.key, from, limit + 1)).await?;
    let more = history.len() > limit;
    history.truncate(limit);
    // A spawn's entry shows its branch's state, from the branch attempts.
    let spawned = history.iter().any(|e| e.kind == crate::model::EntryKind::Spawn);
    let branches = if spawned { long_read(store.branch_attempts(run.key)).await? } else { Vec::new() };
    let page = views::RunView { run, history, branches }.history_json(from as usize);
    let next = if more { page.last().map(|e| e["position"].clone()) } else { None };
    Ok((StatusCode::OK, Json(json!({"entries": page, "next": next}))))
}

/// `POST /api/runs/{id}/signals/{name}`: the body is the payload (empty: null).
#[utoipa::path(post, path = "/api/runs/{id}/signals/{name}", params(("id" = String, Path), ("name" = String, Path)),
    request_body(content = Object, description = "the payload, JSON (empty: null)"),
    responses((status = 202, body = Accepted), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub(super) async fn signal(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((id, name)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Reply {
    authorize(&state, &headers, Role::Operator).await?;
    let body = self::body(body)?;
    let payload: Value = if body.iter().all(u8::is_ascii_whitespace) { Value::Null } else { json_body(&body)? };
    let payload = serde_json::to_vec(&payload).expect("a JSON value serializes");
    state.service.signal(&id, &name, payload).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({}))))
}

/// `POST /api/runs/{id}/cancel`.
/// With `{"grace": 30}` the workflow is told and may clean up for that long.
#[utoipa::path(post, path = "/api/runs/{id}/cancel", params(("id" = String, Path)), request_body(content = Option<CancelRun>), responses(
    (status = 202, body = Accepted), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
    (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn cancel(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Reply {
    authorize(&state, &headers, Role::Operator).await?;
    let body = self::body(body)?;
    let grace = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let body: CancelRun = json_body(&body)?;
        match body.grace {
            None => None,
            Some(s) if s.is_finite() && (0.0..1e9).contains(&s) => Some(std::time::Duration::from_secs_f64(s)),
            Some(_) => return Err(ApiError::new(422, ErrorCode::InvalidRequest, "grace must be seconds, 0 or more")),
        }
    };
    let done = match state.service.cancel(&id, grace).await? {
        Cancelled::Already | Cancelled::Done => "cancelled",
        Cancelled::Requested => "requested",
        // Nobody executes it: the server's worker (or `cairn resume`)
        // takes it up once the lease is let go, and the workflow cleans up.
        Cancelled::Graced(claimed) => {
            drop(claimed);
            "requested"
        }
    };
    Ok((StatusCode::ACCEPTED, Json(json!({"status": done}))))
}

/// `POST /api/runs/{id}/resume`: the server's worker takes it up (an
/// unfinished run no live process holds); 409 with `--no-worker` or for a
/// finished run.
#[utoipa::path(post, path = "/api/runs/{id}/resume", params(("id" = String, Path)), responses(
    (status = 202, body = Accepted), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn resume(State(state): State<Arc<AppState>>, headers: HeaderMap, Path(id): Path<String>) -> Reply {
    authorize(&state, &headers, Role::Operator).await?;
    let run = state.service.find_run(&id).await?;
    if !state.worker {
        return Err(ApiError::new(
            409,
            ErrorCode::Conflict,
            "this server executes no runs (--no-worker): `cairn resume` it",
        ));
    }
    if run.status.is_finished() {
        return Err(ApiError::new(409, ErrorCode::Finished, format!("run {id} is {}", run.status.as_str())));
    }
    Ok((StatusCode::ACCEPTED, Json(json!({"status": run.status.as_str()}))))
}

/// `GET /api/modules`: every stored module.
#[utoipa::path(get, path = "/api/modules", responses((status = 200, body = ModuleList), (status = 401, body = ErrorBody)))]
pub(super) async fn list_modules(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Reply {
    authorize(&state, &headers, Role::Viewer).await?;
    let modules = long_read(state.service.store().modules()).await?;
    let list: Vec<Value> = modules
        .into_iter()
        .map(|(hash, size, at)| json!({"hash": hash, "size": size, "created_at": views::time(at)}))
        .collect();
    Ok((StatusCode::OK, Json(json!({"modules": list}))))
}

/// A module's metadata: hash, size, imports and exports.
fn module_json(hash: &str, size: usize, module: &wasmtime::Module) -> Value {
    let info = ModuleInfo {
        hash: hash.to_string(),
        size,
        imports: module.imports().map(|i| format!("{}.{}", i.module(), i.name())).collect(),
        exports: module.exports().map(|e| e.name().to_string()).collect(),
    };
    serde_json::to_value(info).expect("module metadata serializes")
}

/// `POST /api/modules`: raw wasm bytes, checked and stored by hash.
#[utoipa::path(post, path = "/api/modules", request_body(content = Vec<u8>, content_type = "application/wasm", description = "the module's bytes"),
    responses((status = 201, description = "stored", body = ModuleInfo), (status = 200, description = "stored before", body = ModuleInfo),
    (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 413, body = ErrorBody)))]
pub(super) async fn upload_module(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Reply {
    authorize(&state, &headers, Role::Admin).await?;
    let body = self::body(body)?;
    if body.len() > state.max_module {
        return Err(ApiError::new(
            413,
            ErrorCode::TooLarge,
            format!("the module is larger than {} bytes", state.max_module),
        ));
    }
    let prepared = state
        .executor
        .prepare(body.to_vec(), "the uploaded module")
        .await
        .map_err(|e| ApiError::new(400, ErrorCode::InvalidModule, e.to_string()))?;
    let known = state.module_known(&prepared.hash).await?;
    let reply = module_json(&prepared.hash, prepared.bytes.len(), &prepared.module);
    if !known {
        let put = crate::store::Write::PutModule { hash: prepared.hash.clone(), bytes: prepared.bytes };
        crate::store::commit(&**state.service.store(), vec![put]).await?;
        state.remember_module(prepared.hash);
    }
    Ok((if known { StatusCode::OK } else { StatusCode::CREATED }, Json(reply)))
}

/// `GET /api/modules/{hash}`.
#[utoipa::path(get, path = "/api/modules/{hash}", params(("hash" = String, Path)), responses(
    (status = 200, body = ModuleInfo), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn get_module(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(hash): Path<String>,
) -> Reply {
    authorize(&state, &headers, Role::Viewer).await?;
    let bytes = long_read(state.service.store().module(&hash)).await?;
    let Some(bytes) = bytes else { return Err(ApiError::new(404, ErrorCode::NotFound, format!("no module {hash}"))) };
    let size = bytes.len();
    let prepared = state
        .executor
        .prepare(bytes, &hash)
        .await
        .map_err(|e| ApiError::new(500, ErrorCode::Internal, e.to_string()))?;
    Ok((StatusCode::OK, Json(module_json(&hash, size, &prepared.module))))
}

/// `POST /api/runs`: a run of a stored module, pending for the worker.
#[utoipa::path(post, path = "/api/runs", request_body = StartRun, responses(
    (status = 201, body = Started), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn start_run(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Reply {
    let caller = authorize(&state, &headers, Role::Operator).await?;
    let body: StartRun = json_body(&self::body(body)?)?;
    let limits = request::limits(&body.limits)?;
    let input = serde_json::to_vec(&body.input).expect("a JSON value serializes");
    request::payload_size(input.len(), limits.max_payload_bytes(), "the input")?;
    let run_id = body.run_id.as_deref().map(request::run_id).transpose()?;
    if !body.dirs.is_empty() && caller.role < Role::Admin {
        return Err(AuthError::Forbidden.into());
    }
    let mut dirs = Vec::new();
    for spec in &body.dirs {
        let (host, guest) = request::dir_grant(spec, "dirs")?;
        if !state.allow_dirs.iter().any(|allowed| host.starts_with(allowed)) {
            let detail = format!("{} is not inside a directory given to --allow-dir", host.display());
            return Err(ApiError::new(422, ErrorCode::InvalidRequest, detail));
        }
        dirs.push((host, guest));
    }
    if !state.module_known(&body.module).await? {
        return Err(ApiError::new(
            422,
            ErrorCode::UnknownModule,
            format!("no module {} (POST /api/modules first)", body.module),
        ));
    }
    let env = body.env.into_iter().collect();
    // Reaching the network, and secrets from the server's environment, are
    // grants like directories: an admin's.
    let http = request::http_grants(&body.allow_http, body.allow_http_insecure, &body.http_headers)?;
    if !http.is_empty() && caller.role < Role::Admin {
        return Err(AuthError::Forbidden.into());
    }
    let kv_namespace = body.kv_namespace.as_deref().map(request::kv_namespace).transpose()?.map(String::into_boxed_str);
    let config = RunConfig { dirs, dirs_ro: Vec::new(), env, http: http.boxed(), kv_namespace, limits };
    let shown = format!("module {}", body.module.chars().take(12).collect::<String>());
    let request = StartRequest { module: StartModule::Stored { hash: body.module, shown }, input, run_id, config };
    let started = state.service.start_run(&state.executor, request, StartMode::Queue).await?;
    Ok((StatusCode::CREATED, Json(json!({"run_id": started.run.id}))))
}
