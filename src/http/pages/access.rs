//! Who may read the incident pages and the read-only API: with `api.read_token` set, a request
//! presents it as a bearer token (scripts, the terminal view) or as the password of basic auth
//! (a browser asks for it); with `api.trusted_user_header` set, an SSO proxy in front of the
//! service vouches for the user. With neither, reading is open (loopback or NetworkPolicy).

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

use crate::http::{ApiError, AppState};

/// The read side's credentials and the public base URL of the pages.
#[derive(Default)]
pub struct ReadAccess {
    token: Option<SecretString>,
    /// The operator API's token reads too: whoever may freeze may look.
    operator: Option<SecretString>,
    user_header: Option<HeaderName>,
    /// Where people reach the service (`server.public_url`), without a trailing slash.
    pub public_url: Option<String>,
}

/// The request must authenticate to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unauthenticated;

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

impl ReadAccess {
    /// From resolved settings; an invalid header name was refused by the config check.
    pub fn new(
        token: Option<SecretString>,
        operator: Option<SecretString>,
        user_header: Option<&str>,
        public_url: Option<&str>,
    ) -> ReadAccess {
        ReadAccess {
            token,
            operator,
            user_header: user_header.and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
            public_url: public_url.map(|u| u.trim_end_matches('/').to_string()),
        }
    }

    /// Whether reading needs credentials at all.
    pub fn required(&self) -> bool {
        self.token.is_some() || self.user_header.is_some()
    }

    /// `Ok(who)` when the request may read (`who`: the proxy's user, or "token"; `None` when
    /// reading is open), `Err` when it must authenticate.
    pub fn check(&self, headers: &HeaderMap) -> Result<Option<String>, Unauthenticated> {
        if !self.required() {
            return Ok(None);
        }
        if let Some(h) = &self.user_header {
            if let Some(user) = headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|u| !u.is_empty())
            {
                return Ok(Some(user.to_string()));
            }
        }
        let Some(value) = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return Err(Unauthenticated);
        };
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        let given: Vec<u8> = if scheme.eq_ignore_ascii_case("bearer") {
            rest.trim().as_bytes().to_vec()
        } else if scheme.eq_ignore_ascii_case("basic") {
            // Any user name; the password is the token.
            let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(rest.trim()) else {
                return Err(Unauthenticated);
            };
            match decoded.iter().position(|b| *b == b':') {
                Some(i) => decoded[i + 1..].to_vec(),
                None => return Err(Unauthenticated),
            }
        } else {
            return Err(Unauthenticated);
        };
        let matches =
            |t: &Option<SecretString>| t.as_ref().is_some_and(|t| ct_eq(&given, t.expose_secret().as_bytes()));
        if matches(&self.token) || matches(&self.operator) {
            Ok(Some("token".into()))
        } else {
            Err(Unauthenticated)
        }
    }
}

/// Middleware for the read-only JSON API: 401 unless [`ReadAccess::check`] admits the request.
pub async fn require_read(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match state.read.check(req.headers()) {
        Ok(_) => next.run(req).await,
        Err(Unauthenticated) => ApiError::Unauthorized.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    fn basic(user_pass: &str) -> String {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(user_pass))
    }

    #[test]
    fn without_credentials_configured_reading_is_open() {
        let a = ReadAccess::new(None, Some("op".to_string().into()), None, None);
        assert_eq!(a.check(&HeaderMap::new()), Ok(None));
    }

    #[test]
    fn the_read_token_as_bearer_or_basic_password_admits() {
        let a = ReadAccess::new(
            Some("r3ad".to_string().into()),
            Some("op".to_string().into()),
            None,
            None,
        );
        assert!(a.check(&headers(&[("authorization", "Bearer r3ad")])).is_ok());
        assert!(a.check(&headers(&[("authorization", &basic("alice:r3ad"))])).is_ok());
        assert!(a.check(&headers(&[("authorization", "Bearer op")])).is_ok());
        assert!(a.check(&headers(&[("authorization", "Bearer r3a")])).is_err());
        assert!(a.check(&headers(&[("authorization", &basic("r3ad:x"))])).is_err());
        assert!(a.check(&headers(&[("authorization", &basic("r3ad"))])).is_err());
        assert!(a.check(&headers(&[("authorization", "Basic %%%")])).is_err());
        assert!(a.check(&HeaderMap::new()).is_err());
        // A proxy header means nothing unless it is the configured one.
        assert!(a.check(&headers(&[("x-forwarded-user", "mallory")])).is_err());
    }

    #[test]
    fn a_trusted_proxy_header_names_the_viewer() {
        let a = ReadAccess::new(None, None, Some("X-Auth-Request-User"), None);
        assert_eq!(
            a.check(&headers(&[("x-auth-request-user", "alice@example.com")])),
            Ok(Some("alice@example.com".into()))
        );
        assert!(a.check(&headers(&[("x-auth-request-user", "  ")])).is_err());
        assert!(a.check(&HeaderMap::new()).is_err());
    }
}
