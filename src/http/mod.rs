//! The HTTP edge only: routes, authentication, and mapping errors to status codes. Handlers
//! store and answer; all deciding and acting happens in the responder's background loops.

mod alertmanager;
mod api;
pub(crate) mod auth;
mod error;
pub mod pagerduty;
pub mod pages;
pub mod slack;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::middleware::from_fn_with_state;
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
    /// Who may read the incident pages and the read-only API.
    pub read: Arc<pages::ReadAccess>,
    /// Whether the policy files on disk were refused at the last reload (for `/readyz`).
    pub policy_reload: Arc<crate::app::reload::ReloadStatus>,
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
            read: Arc::default(),
            policy_reload: Arc::default(),
        }
    }

    /// Enables the operator API with this bearer token.
    pub fn with_api_token(mut self, token: Option<secrecy::SecretString>) -> Self {
        self.api_token = token;
        self
    }

    /// Sets who may read the pages and the read-only API.
    pub fn with_read_access(mut self, read: pages::ReadAccess) -> Self {
        self.read = Arc::new(read);
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
    // The read-only API needs what the pages need (`api.read_token` or the SSO proxy's header).
    let read_api = Router::new()
        .route("/api/v1/incidents", get(api::list_incidents))
        .route("/api/v1/incidents/{id}", get(api::get_incident))
        .route("/api/v1/policies", get(api::policies))
        .route("/api/v1/alerts/undecidable", get(api::undecidable_alerts))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), pages::require_read));
    // Credentials are checked in a layer, before the handler reads the body: an
    // unauthenticated caller gets 401 whatever it sends, never a 413 that tells it the limit,
    // and no body is buffered for it. (Slack and PagerDuty sign the body, so theirs is read
    // first, under its limit.)
    let operator = from_fn_with_state(state.clone(), auth::operator_credentials);
    Router::new()
        .route("/", get(pages::index))
        .route("/incidents", get(pages::list))
        .route("/incidents/{id}", get(pages::show))
        .merge(read_api)
        .route(
            "/webhook/alertmanager",
            post(alertmanager::receive)
                .route_layer(from_fn_with_state(state.clone(), auth::webhook_credentials))
                .layer(DefaultBodyLimit::max(body_limit)),
        )
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/metrics", get(api::metrics))
        .route(
            "/api/v1/incidents/{id}/close",
            post(api::close_incident).route_layer(operator.clone()),
        )
        .route(
            "/api/v1/freezes",
            get(api::freezes).merge(post(api::freeze).route_layer(operator.clone())),
        )
        .route(
            "/api/v1/freezes/{scope}",
            axum::routing::delete(api::unfreeze).route_layer(operator),
        )
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
            post(pagerduty::action)
                .route_layer(from_fn_with_state(state.clone(), auth::pagerduty_action_credentials))
                .layer(DefaultBodyLimit::max(64 * 1024)),
        )
        .layer(catch_panic(state.responder.metrics.clone()))
        .with_state(state)
}

/// A handler that panics answers 500 and the service keeps serving; the panic is counted here
/// and logged once, by the process's panic hook (installed by `main`).
fn catch_panic(metrics: Arc<crate::metrics::Metrics>) -> tower_http::catch_panic::CatchPanicLayer<PanicAnswer> {
    tower_http::catch_panic::CatchPanicLayer::custom(PanicAnswer(metrics))
}

/// The 500 for a handler that panicked.
#[derive(Clone)]
struct PanicAnswer(Arc<crate::metrics::Metrics>);

impl tower_http::catch_panic::ResponseForPanic for PanicAnswer {
    type ResponseBody = axum::body::Body;
    fn response_for_panic(
        &mut self,
        _: Box<dyn std::any::Any + Send + 'static>,
    ) -> axum::http::Response<axum::body::Body> {
        self.0.panic("http");
        let body = serde_json::json!({ "error": "internal error; it has been logged" }).to_string();
        axum::http::Response::builder()
            .status(axum::http::StatusCode::INTERNAL_SERVER_ERROR)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;

    #[tokio::test]
    async fn a_handler_that_panics_is_answered_500_counted_and_the_router_keeps_serving() {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let app: Router = Router::new()
            .route("/boom", get(|| async { panic!("boom") as &str }))
            .route("/fine", get(|| async { "fine" }))
            .layer(catch_panic(metrics.clone()));
        let r = app
            .clone()
            .oneshot(Request::get("/boom").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), axum::http::StatusCode::INTERNAL_SERVER_ERROR);
        let body = http_body_util::BodyExt::collect(r.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert!(
            !String::from_utf8_lossy(&body).contains("boom"),
            "the panic stays in the log"
        );
        let r = app
            .oneshot(Request::get("/fine").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), axum::http::StatusCode::OK);
        assert!(
            metrics
                .render()
                .contains(r#"rollback_responder_panics_total{where="http"} 1"#),
            "{}",
            metrics.render()
        );
    }
}
