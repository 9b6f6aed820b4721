//! The HTTP edge only: routes, authentication, and mapping errors to status codes. Handlers
//! store and answer; all deciding and acting happens in the responder's background loops.

mod alertmanager;
mod api;
pub(crate) mod auth;
mod error;
pub mod pagerduty;
pub mod slack;

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
    pub slack: Arc<slack::SlackEdge>,
    pub pagerduty: Arc<pagerduty::PagerDutyEdge>,
    /// Bearer token of the operator API (freezes); none: that API answers 401.
    pub api_token: Option<secrecy::SecretString>,
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
            slack: Arc::new(slack::SlackEdge::new(None, None)),
            pagerduty: Arc::default(),
            api_token: None,
        }
    }

    /// Enables the operator API with this bearer token.
    pub fn with_api_token(mut self, token: Option<secrecy::SecretString>) -> Self {
        self.api_token = token;
        self
    }

    /// Adds the Slack and PagerDuty edges (approvals).
    pub fn with_humans(mut self, slack: slack::SlackEdge, pagerduty: pagerduty::PagerDutyEdge) -> Self {
        self.slack = Arc::new(slack);
        self.pagerduty = Arc::new(pagerduty);
        self
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
        .route("/api/v1/alerts/undecidable", get(api::undecidable_alerts))
        .route("/api/v1/policies", get(api::policies))
        .route("/api/v1/freezes", get(api::freezes).post(api::freeze))
        .route("/api/v1/freezes/{scope}", axum::routing::delete(api::unfreeze))
        .route(
            "/slack/commands",
            post(slack::command).layer(DefaultBodyLimit::max(64 * 1024)),
        )
        .route(
            "/slack/interactions",
            post(slack::interaction).layer(DefaultBodyLimit::max(256 * 1024)),
        )
        .route(
            "/pagerduty/webhook",
            post(pagerduty::webhook).layer(DefaultBodyLimit::max(256 * 1024)),
        )
        .route(
            "/pagerduty/action",
            post(pagerduty::action).layer(DefaultBodyLimit::max(64 * 1024)),
        )
        .with_state(state)
}
