//! The web view: static files embedded in the binary (`host/web/`). They
//! hold no data: the page asks for a token and reads everything through
//! the API, so they are served without one.

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rust_embed::Embed;

use super::{ApiError, ErrorBody};
use crate::service::ErrorCode;

#[derive(Embed)]
#[folder = "web/"]
struct Assets;

/// What the page may load: its own files, and connections to its own API.
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

fn file(name: &str) -> Result<Response, ApiError> {
    let Some(file) = Assets::get(name) else {
        return Err(ApiError::new(404, ErrorCode::NotFound, format!("no asset {name}")));
    };
    let kind = match name.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("txt") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    };
    let mut response = (StatusCode::OK, file.data.into_owned()).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// The web view.
#[utoipa::path(get, path = "/", security(()), responses((status = 200, description = "the web view", body = String, content_type = "text/html")))]
pub(super) async fn index() -> Result<Response, ApiError> {
    file("index.html")
}

/// The web view's scripts, styles and licences.
#[utoipa::path(get, path = "/assets/{file}", security(()), params(("file" = String, Path)), responses(
    (status = 200, description = "a static file", body = String),
    (status = 404, body = ErrorBody),
))]
pub(super) async fn asset(Path(name): Path<String>) -> Result<Response, ApiError> {
    if name == "index.html" || name.contains('/') {
        return Err(ApiError::new(404, ErrorCode::NotFound, format!("no asset {name}")));
    }
    file(&name)
}
