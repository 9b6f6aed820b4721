//! Credentials: Alertmanager's `http_config` (a bearer token and/or basic auth) and the bearer
//! tokens of the operator API and PagerDuty's workflow action, compared in constant time so
//! response timing does not leak how much of a guess was right; and the layers that check them
//! before a handler reads the body.

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};

/// The configured credentials; with none, every request is accepted (loopback only).
pub struct WebhookAuth {
    bearer: Option<SecretString>,
    basic: Option<(String, SecretString)>,
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

impl WebhookAuth {
    /// From resolved settings.
    pub fn new(bearer: Option<SecretString>, basic: Option<(String, SecretString)>) -> Self {
        WebhookAuth { bearer, basic }
    }

    /// True when the request carries a configured credential (either kind).
    pub fn check(&self, headers: &HeaderMap) -> bool {
        if self.bearer.is_none() && self.basic.is_none() {
            return true;
        }
        let Some(value) = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            return self
                .bearer
                .as_ref()
                .is_some_and(|t| ct_eq(rest.as_bytes(), t.expose_secret().as_bytes()));
        }
        if scheme.eq_ignore_ascii_case("basic") {
            let Some((user, pass)) = &self.basic else {
                return false;
            };
            let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(rest) else {
                return false;
            };
            let expected = format!("{user}:{}", pass.expose_secret());
            return ct_eq(&decoded, expected.as_bytes());
        }
        false
    }
}

/// True when the request carries `Authorization: Bearer <token>` for the configured token
/// (constant time; the scheme in any case, as RFC 7235 has it); false without a configured
/// token: an unset secret never opens an endpoint.
pub fn bearer_matches(headers: &HeaderMap, token: Option<&SecretString>) -> bool {
    let Some(token) = token else { return false };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, rest)| rest.trim());
    ct_eq(given.as_bytes(), token.expose_secret().as_bytes())
}

/// Alertmanager's credentials (`http_config`), before the webhook's body is read.
pub(super) async fn webhook_credentials(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if !state.auth.check(req.headers()) {
        tracing::warn!("webhook request with missing or wrong credentials rejected");
        return ApiError::Unauthorized.into_response();
    }
    next.run(req).await
}

/// The operator API's bearer token (`api.bearer_token`), before the body is read.
pub(super) async fn operator_credentials(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if !bearer_matches(req.headers(), state.api_token.as_ref()) {
        return ApiError::Unauthorized.into_response();
    }
    next.run(req).await
}

/// The PagerDuty workflow action's bearer token (`pagerduty.action_token`), before the body
/// is read.
pub(super) async fn pagerduty_action_credentials(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if !bearer_matches(req.headers(), state.pagerduty.action_token.as_ref()) {
        return ApiError::Unauthorized.into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("authorization", v.parse().unwrap());
        h
    }

    #[test]
    fn bearer_and_basic() {
        let a = WebhookAuth::new(
            Some("tok".to_string().into()),
            Some(("am".into(), "pw".to_string().into())),
        );
        assert!(a.check(&headers("Bearer tok")));
        assert!(!a.check(&headers("Bearer to")));
        assert!(!a.check(&headers("Bearer tokk")));
        assert!(a.check(&headers(&format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("am:pw")
        ))));
        assert!(!a.check(&headers(&format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("am:px")
        ))));
        assert!(!a.check(&headers("Digest x")));
        assert!(!a.check(&HeaderMap::new()));
    }

    #[test]
    fn no_credentials_configured_accepts() {
        assert!(WebhookAuth::new(None, None).check(&HeaderMap::new()));
    }
}
