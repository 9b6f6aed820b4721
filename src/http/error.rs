//! One error type for the edge: the client sees a clean message and the right status; the
//! cause is logged once, here.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// What a handler can answer besides success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or wrong credentials")]
    Unauthorized,
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("store unavailable, retry later")]
    Unavailable(#[source] crate::store::StoreError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            // 503, not 500 or 429: Alertmanager retries 5xx only, and this is transient.
            ApiError::Unavailable(e) => {
                tracing::warn!(error = %e, "store error answered with 503");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        let mut resp = (status, Json(json!({ "error": self.to_string() }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                "www-authenticate",
                axum::http::HeaderValue::from_static("Bearer, Basic realm=\"rollback-responder\""),
            );
        }
        resp
    }
}
