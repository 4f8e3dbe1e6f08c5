//! Errors of the HTTP API: a status and `{"error": CODE, "detail": TEXT}`,
//! CODE from the fixed list of [`ErrorCode`].

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::service::tokens::AuthError;
use crate::service::{ErrorCode, ServiceError};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub detail: String,
}

/// The body of every error.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorCode,
    /// What went wrong, for people.
    pub detail: String,
}

impl ApiError {
    pub fn new(status: u16, code: ErrorCode, detail: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code,
            detail: detail.into(),
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let class = e.class();
        ApiError::new(class.http, class.code, e.to_string())
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ServiceError::from(e).into()
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthorized => {
                ApiError::new(401, ErrorCode::Unauthorized, "a valid `Authorization: Bearer TOKEN` is needed")
            }
            AuthError::Forbidden => ApiError::new(403, ErrorCode::Forbidden, "this token's role may not do that"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorBody { error: self.code, detail: self.detail })).into_response()
    }
}
