//! The JSON routes: runs, their histories, signals, cancels, modules.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{ApiError, AppState};
use crate::model::{Role, RunConfig, TokenRecord};
use crate::service::request::{self, LimitArgs, ModuleSource};
use crate::service::tokens::AuthError;
use crate::service::{Cancelled, StartMode, StartRequest, views};

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
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(413, "too_large", e.body_text()),
        status => ApiError::new(status.as_u16(), "invalid_request", e.body_text()),
    })
}

/// A JSON body, whatever its Content-Type says (`curl -d` sends a form type).
fn json_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::new(422, "invalid_request", e.to_string()),
        _ => ApiError::new(400, "bad_json", e.to_string()),
    })
}

fn number<T: std::str::FromStr>(q: &HashMap<String, String>, name: &str) -> Result<Option<T>, ApiError> {
    q.get(name)
        .map(|v| v.parse().map_err(|_| ApiError::new(422, "invalid_request", format!("`{name}` must be a number"))))
        .transpose()
}

/// `GET /api/runs?status=&module=&limit=&after=`: newest first.
pub(super) async fn list_runs(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Reply {
    authorize(&state, &headers, Role::Viewer).await?;
    let limit = number::<usize>(&q, "limit")?.unwrap_or(50).clamp(1, 1000);
    let after = number::<i64>(&q, "after")?;
    let mut runs = state.service.list_runs().await?;
    runs.reverse();
    let page: Vec<_> = runs
        .into_iter()
        .filter(|r| q.get("status").is_none_or(|s| r.status.as_str() == s))
        .filter(|r| q.get("module").is_none_or(|m| r.module.starts_with(m.as_str())))
        .filter(|r| after.is_none_or(|a| r.key.0 < a))
        .take(limit + 1)
        .collect();
    let next = (page.len() > limit).then(|| page[limit - 1].key.0);
    let runs: Vec<Value> = page.iter().take(limit).map(views::run_summary).collect();
    Ok((StatusCode::OK, Json(json!({"runs": runs, "next": next}))))
}

/// `GET /api/runs/{id}`: `cairn show --json`, and the feed position to
/// subscribe from.
pub(super) async fn get_run(State(state): State<Arc<AppState>>, headers: HeaderMap, Path(id): Path<String>) -> Reply {
    authorize(&state, &headers, Role::Viewer).await?;
    let seq = state.service.store().last_seq().await?;
    let mut view = state.service.run_view(&id).await?.to_json();
    view["seq"] = json!(seq);
    Ok((StatusCode::OK, Json(view)))
}

/// `GET /api/runs/{id}/history?after=POSITION&limit=N`: a page of entries.
pub(super) async fn history(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Reply {
    authorize(&state, &headers, Role::Viewer).await?;
    let limit = number::<usize>(&q, "limit")?.unwrap_or(100).clamp(1, 1000);
    let from = number::<i64>(&q, "after")?.map_or(0, |a| (a + 1).max(0) as usize);
    let view = state.service.run_view(&id).await?.to_json();
    let all = view["history"].as_array().cloned().unwrap_or_default();
    let page: Vec<Value> = all.iter().skip(from).take(limit).cloned().collect();
    let next = (from + page.len() < all.len()).then(|| page.last().map(|e| e["position"].clone()));
    Ok((StatusCode::OK, Json(json!({"entries": page, "next": next.flatten()}))))
}

/// `POST /api/runs/{id}/signals/{name}`: the body is the payload (empty: null).
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
pub(super) async fn cancel(State(state): State<Arc<AppState>>, headers: HeaderMap, Path(id): Path<String>) -> Reply {
    authorize(&state, &headers, Role::Operator).await?;
    let done = match state.service.cancel(&id).await? {
        Cancelled::Already | Cancelled::Done => "cancelled",
        Cancelled::Requested => "requested",
    };
    Ok((StatusCode::ACCEPTED, Json(json!({"status": done}))))
}

/// `POST /api/runs/{id}/resume`: the server's worker takes it up (an
/// unfinished run no live process holds); 409 with `--no-worker` or for a
/// finished run.
pub(super) async fn resume(State(state): State<Arc<AppState>>, headers: HeaderMap, Path(id): Path<String>) -> Reply {
    authorize(&state, &headers, Role::Operator).await?;
    let run = state.service.find_run(&id).await?;
    if !state.worker {
        return Err(ApiError::new(409, "conflict", "this server executes no runs (--no-worker): `cairn resume` it"));
    }
    if run.status.is_finished() {
        return Err(ApiError::new(409, "finished", format!("run {id} is {}", run.status.as_str())));
    }
    Ok((StatusCode::ACCEPTED, Json(json!({"status": run.status.as_str()}))))
}

/// `GET /api/modules`: every stored module.
pub(super) async fn list_modules(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Reply {
    authorize(&state, &headers, Role::Viewer).await?;
    let modules = state.service.store().modules().await?;
    let list: Vec<Value> = modules
        .into_iter()
        .map(|(hash, size, at)| json!({"hash": hash, "size": size, "created_at": views::time(at)}))
        .collect();
    Ok((StatusCode::OK, Json(json!({"modules": list}))))
}

/// A module's metadata: hash, size, imports and exports.
fn module_json(hash: &str, size: usize, module: &wasmtime::Module) -> Value {
    let imports: Vec<String> = module.imports().map(|i| format!("{}.{}", i.module(), i.name())).collect();
    let exports: Vec<String> = module.exports().map(|e| e.name().to_string()).collect();
    json!({"hash": hash, "size": size, "imports": imports, "exports": exports})
}

/// `POST /api/modules`: raw wasm bytes, checked and stored by hash.
pub(super) async fn upload_module(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Reply {
    authorize(&state, &headers, Role::Admin).await?;
    let body = self::body(body)?;
    if body.len() > state.max_module {
        return Err(ApiError::new(413, "too_large", format!("the module is larger than {} bytes", state.max_module)));
    }
    let prepared = state
        .executor
        .prepare(body.to_vec(), "the uploaded module")
        .await
        .map_err(|e| ApiError::new(400, "invalid_module", e.to_string()))?;
    let store = state.service.store();
    let known = store.module(&prepared.hash).await?.is_some();
    let reply = module_json(&prepared.hash, prepared.bytes.len(), &prepared.module);
    if !known {
        let put = crate::store::Write::PutModule { hash: prepared.hash.clone(), bytes: prepared.bytes };
        crate::store::commit(&**store, vec![put]).await?;
    }
    Ok((if known { StatusCode::OK } else { StatusCode::CREATED }, Json(reply)))
}

/// `GET /api/modules/{hash}`.
pub(super) async fn get_module(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(hash): Path<String>,
) -> Reply {
    authorize(&state, &headers, Role::Viewer).await?;
    let bytes = state.service.store().module(&hash).await?;
    let Some(bytes) = bytes else { return Err(ApiError::new(404, "not_found", format!("no module {hash}"))) };
    let size = bytes.len();
    let prepared =
        state.executor.prepare(bytes, &hash).await.map_err(|e| ApiError::new(500, "internal", e.to_string()))?;
    Ok((StatusCode::OK, Json(module_json(&hash, size, &prepared.module))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    module: String,
    #[serde(default)]
    input: Value,
    run_id: Option<String>,
    #[serde(default)]
    dirs: Vec<String>,
    #[serde(default)]
    env: HashMap<String, String>,
    #[serde(default)]
    limits: LimitArgs,
}

/// `POST /api/runs`: a run of a stored module, pending for the worker.
pub(super) async fn start_run(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Reply {
    let caller = authorize(&state, &headers, Role::Operator).await?;
    let body: StartBody = json_body(&self::body(body)?)?;
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
            return Err(ApiError::new(422, "invalid_request", detail));
        }
        dirs.push((host, guest));
    }
    let bytes = state.service.store().module(&body.module).await?;
    let Some(bytes) = bytes else {
        return Err(ApiError::new(
            422,
            "unknown_module",
            format!("no module {} (POST /api/modules first)", body.module),
        ));
    };
    let env = body.env.into_iter().collect();
    let config = RunConfig { dirs, dirs_ro: Vec::new(), env, limits };
    let shown = format!("module {}", body.module.chars().take(12).collect::<String>());
    let request = StartRequest { module: ModuleSource { bytes, shown }, input, run_id, config };
    let started = state.service.start_run(&state.executor, request, StartMode::Queue).await?;
    Ok((StatusCode::CREATED, Json(json!({"run_id": started.run.id}))))
}
