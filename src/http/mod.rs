//! The HTTP edge only: routes, authentication, and mapping errors to status codes. Handlers
//! store and answer; all deciding and acting happens in the responder's background loops.

mod alertmanager;
mod api;
mod auth;
mod error;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

pub use error::ApiError;

use crate::responder::Responder;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub responder: Arc<Responder>,
    pub auth: Arc<auth::WebhookAuth>,
}

impl AppState {
    /// Builds the state; `bearer`/`basic` are Alertmanager's credentials (none: open on loopback).
    pub fn new(
        responder: Arc<Responder>,
        bearer: Option<secrecy::SecretString>,
        basic: Option<(String, secrecy::SecretString)>,
    ) -> Self {
        AppState {
            responder,
            auth: Arc::new(auth::WebhookAuth::new(bearer, basic)),
        }
    }
}

/// The service's routes.
pub fn router(state: AppState, body_limit: usize) -> Router {
    Router::new()
        .route(
            "/webhook/alertmanager",
            post(alertmanager::receive).layer(DefaultBodyLimit::max(body_limit)),
        )
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/metrics", get(api::metrics))
        .route("/api/v1/incidents", get(api::list_incidents))
        .route("/api/v1/incidents/{id}", get(api::get_incident))
        .route("/api/v1/policies", get(api::policies))
        .with_state(state)
}
