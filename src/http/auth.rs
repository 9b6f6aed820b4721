//! Alertmanager's `http_config` credentials: a bearer token and/or basic auth, compared in
//! constant time so response timing does not leak how much of a guess was right.

use axum::http::HeaderMap;
use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

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
/// (constant time); false without a configured token: an unset secret never opens an endpoint.
pub fn bearer_matches(headers: &HeaderMap, token: Option<&SecretString>) -> bool {
    let Some(token) = token else { return false };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    ct_eq(given.as_bytes(), token.expose_secret().as_bytes())
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
