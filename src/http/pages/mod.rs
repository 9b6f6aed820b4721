//! The incident pages: server-rendered HTML for people (`/` leads to `/incidents`, the list;
//! `/incidents/{id}`, one incident's timeline). Read-only: they only read the store the
//! responder writes. No JavaScript, nothing fetched from elsewhere; an open incident's page
//! refreshes itself. Everything shown from input (alert labels are attacker-controlled) is
//! escaped by the templates in [`view`]. Access: [`ReadAccess`].

mod access;
mod view;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

pub use access::{require_read, ReadAccess};

use super::AppState;
use crate::incident::{IncidentId, Phase};
use crate::store::IncidentFilter;

/// How many incidents the list shows at most.
const LIST_LIMIT: i64 = 200;
/// Longest service name accepted in a filter (service names are label values).
const MAX_SERVICE_LEN: usize = 256;

/// `/` leads to the list.
pub async fn index() -> Redirect {
    Redirect::to("/incidents")
}

/// `/incidents?service=S&phase=P&open=true`: empty values mean "any" (what a form sends).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    phase: Option<String>,
    #[serde(default)]
    open: Option<String>,
}

/// An answer that is not the page: 400 naming what is wrong, 401, 404, 503.
pub(crate) fn problem(status: StatusCode, message: &str) -> Response {
    let mut resp = (status, Html(view::problem(status, message).into_string())).into_response();
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            "www-authenticate",
            axum::http::HeaderValue::from_static("Basic realm=\"rollback-responder\", charset=\"UTF-8\""),
        );
    }
    resp
}

fn unavailable(e: &crate::store::StoreError) -> Response {
    tracing::warn!(error = %e, "store error on an incident page answered with 503");
    let mut resp = problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "The store is unavailable; retry in a moment.",
    );
    resp.headers_mut()
        .insert("retry-after", axum::http::HeaderValue::from_static("5"));
    resp
}

/// Parses the list's query: 400 naming the parameter for anything it does not know.
fn filter(params: ListParams) -> Result<IncidentFilter, String> {
    let service = params.service.filter(|s| !s.is_empty());
    if let Some(s) = &service {
        if s.len() > MAX_SERVICE_LEN || s.chars().any(char::is_control) {
            return Err(format!(
                "service: not a service name (at most {MAX_SERVICE_LEN} characters, no control characters)"
            ));
        }
    }
    let phase = match params.phase.as_deref() {
        None | Some("") => None,
        Some(p) => Some(Phase::parse(p).ok_or_else(|| {
            let all: Vec<&str> = Phase::ALL.iter().map(|p| p.as_str()).collect();
            format!("phase: unknown phase {p:?}; one of {}", all.join(", "))
        })?),
    };
    let open_only = match params.open.as_deref() {
        None | Some("") | Some("false") => false,
        Some("true") | Some("on") => true,
        Some(o) => return Err(format!("open: {o:?} is not true or false")),
    };
    Ok(IncidentFilter {
        service,
        phase,
        open_only,
    })
}

/// The list of incidents, open first, filtered by service and phase.
pub async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Response {
    let viewer = match state.read.check(&headers) {
        Ok(v) => v,
        Err(_) => return problem(StatusCode::UNAUTHORIZED, "Sign in to read incidents."),
    };
    let params = match params {
        Ok(Query(p)) => p,
        Err(e) => return problem(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    let f = match filter(params) {
        Ok(f) => f,
        Err(msg) => return problem(StatusCode::BAD_REQUEST, &msg),
    };
    let store = &state.responder.store;
    let incidents = match store.incidents_filtered(&f, LIST_LIMIT).await {
        Ok(l) => l,
        Err(e) => return unavailable(&e),
    };
    let services = match store.incident_services(500).await {
        Ok(s) => s,
        Err(e) => return unavailable(&e),
    };
    let page = view::List {
        incidents: &incidents,
        services: &services,
        filter: &f,
        limit: LIST_LIMIT,
        viewer: viewer.as_deref(),
        now: chrono::Utc::now(),
    };
    Html(page.render().into_string()).into_response()
}

/// One incident: decision, alerts, timeline, notifications.
pub async fn show(
    State(state): State<AppState>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let viewer = match state.read.check(&headers) {
        Ok(v) => v,
        Err(_) => return problem(StatusCode::UNAUTHORIZED, "Sign in to read incidents."),
    };
    // The path after the credentials: one that does not decode is a 400 only for a reader.
    let id = match id {
        Ok(Path(id)) => id,
        Err(e) => return problem(StatusCode::BAD_REQUEST, &format!("incident id: {}", e.body_text())),
    };
    if uuid::Uuid::parse_str(&id).is_err() {
        return problem(
            StatusCode::BAD_REQUEST,
            "incident id: not an incident id (incident ids are UUIDs, as in the list)",
        );
    }
    let id = IncidentId(id);
    let store = &state.responder.store;
    let inc = match store.incident(&id).await {
        Ok(Some(i)) => i,
        Ok(None) => return problem(StatusCode::NOT_FOUND, &format!("No incident {id}.")),
        Err(e) => return unavailable(&e),
    };
    let (alerts, events, notices) =
        match tokio::try_join!(store.incident_alerts(&id), store.events(&id), store.notices(&id)) {
            Ok(t) => t,
            Err(e) => return unavailable(&e),
        };
    let page = view::Detail {
        incident: &inc,
        alerts: &alerts,
        events: &events,
        notices: &notices,
        public_url: state.read.public_url.as_deref(),
        viewer: viewer.as_deref(),
        now: chrono::Utc::now(),
    };
    Html(page.render().into_string()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(service: Option<&str>, phase: Option<&str>, open: Option<&str>) -> ListParams {
        ListParams {
            service: service.map(str::to_string),
            phase: phase.map(str::to_string),
            open: open.map(str::to_string),
        }
    }

    #[test]
    fn empty_form_values_mean_any() {
        assert_eq!(
            filter(params(Some(""), Some(""), Some(""))).unwrap(),
            IncidentFilter::default()
        );
    }

    #[test]
    fn a_known_phase_and_service_filter_the_list() {
        let f = filter(params(Some("checkout"), Some("awaiting_approval"), Some("true"))).unwrap();
        assert_eq!(f.service.as_deref(), Some("checkout"));
        assert_eq!(f.phase, Some(Phase::AwaitingApproval));
        assert!(f.open_only);
    }

    #[test]
    fn bad_filters_are_named() {
        let e = filter(params(None, Some("exploded"), None)).unwrap_err();
        assert!(
            e.starts_with("phase: unknown phase \"exploded\"; one of waiting,"),
            "{e}"
        );
        let e = filter(params(None, None, Some("maybe"))).unwrap_err();
        assert!(e.starts_with("open:"), "{e}");
        let e = filter(params(Some(&"x".repeat(MAX_SERVICE_LEN + 1)), None, None)).unwrap_err();
        assert!(e.starts_with("service:"), "{e}");
        let e = filter(params(Some("a\u{0}b"), None, None)).unwrap_err();
        assert!(e.starts_with("service:"), "{e}");
    }
}
