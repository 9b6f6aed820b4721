//! A check step of a Kubernetes target, as written in a policy file: verify something before
//! the next step runs (seed 000 runs `curl -f https://portal.example.com/v1/health` between
//! the selector switch and the scale-down). Plain data and its validation; the executor runs
//! it in `action::kubernetes::check`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Shortest timeout a check may have: below it one slow answer fails the rollback.
pub const MIN_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest timeout of one check. The responder renews the action's lease while a step runs,
/// as it does through a call's retry window; past ten minutes of waiting a person should act.
pub const MAX_CHECK_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// The checks of one target together wait at most as long as the longest retry window (30
/// minutes, `action::retry::MAX_WINDOW`, which a test there keeps equal to this), so an action
/// stays bounded however many there are. Spelled out here: policy imports nothing from action.
pub const MAX_CHECKS_TOTAL: Duration = Duration::from_secs(30 * 60);
/// Longest single request of a check.
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What a check step verifies.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum KubeCheck {
    /// `curl -f URL` until it answers as expected `successes` times in a row.
    Http(HttpCheck),
}

/// An HTTP GET that must answer the expected status `successes` times in a row, polled every
/// `interval`, within `timeout` (a failure resets the count).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    pub url: String,
    #[serde(default)]
    pub expect_status: ExpectStatus,
    #[serde(default = "three")]
    pub successes: u32,
    #[serde(default = "two_seconds", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "one_minute", with = "humantime_serde")]
    pub timeout: Duration,
}

fn three() -> u32 {
    3
}
fn two_seconds() -> Duration {
    Duration::from_secs(2)
}
fn one_minute() -> Duration {
    Duration::from_secs(60)
}

/// The status a check accepts: one code (`200`) or a class (`2xx`, the default: what
/// `curl -f` accepts apart from redirects, which are not followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "StatusSpec", into = "StatusSpec")]
pub enum ExpectStatus {
    Code(u16),
    Class(u8),
}

impl Default for ExpectStatus {
    fn default() -> Self {
        ExpectStatus::Class(2)
    }
}

/// How `expect_status` is written: a number or a string.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
enum StatusSpec {
    Code(u16),
    Text(String),
}

impl TryFrom<StatusSpec> for ExpectStatus {
    type Error = String;
    fn try_from(s: StatusSpec) -> Result<Self, String> {
        let bad = |what: &str| {
            format!("expect_status: {what:?} is not a status; use a code such as 200 or a class such as 2xx")
        };
        match s {
            StatusSpec::Code(c) if (100..=599).contains(&c) => Ok(ExpectStatus::Code(c)),
            StatusSpec::Code(c) => Err(bad(&c.to_string())),
            StatusSpec::Text(t) => {
                let lower = t.trim().to_ascii_lowercase();
                match lower.as_bytes() {
                    [d @ b'1'..=b'5', b'x', b'x'] => Ok(ExpectStatus::Class(d - b'0')),
                    _ => lower
                        .parse::<u16>()
                        .ok()
                        .filter(|c| (100..=599).contains(c))
                        .map(ExpectStatus::Code)
                        .ok_or_else(|| bad(&t)),
                }
            }
        }
    }
}

impl From<ExpectStatus> for StatusSpec {
    fn from(e: ExpectStatus) -> Self {
        match e {
            ExpectStatus::Code(c) => StatusSpec::Code(c),
            ExpectStatus::Class(d) => StatusSpec::Text(format!("{d}xx")),
        }
    }
}

impl ExpectStatus {
    /// Whether `status` is accepted.
    pub fn accepts(self, status: u16) -> bool {
        match self {
            ExpectStatus::Code(c) => status == c,
            ExpectStatus::Class(d) => status / 100 == u16::from(d),
        }
    }

    /// `2xx` or `200`.
    pub fn describe(self) -> String {
        match self {
            ExpectStatus::Code(c) => c.to_string(),
            ExpectStatus::Class(d) => format!("{d}xx"),
        }
    }
}

impl KubeCheck {
    /// How long the check may wait in all.
    pub fn timeout(&self) -> Duration {
        match self {
            KubeCheck::Http(h) => h.timeout,
        }
    }

    /// One line: `GET https://host/health answers 2xx 3 times in a row (every 2s, within 1m)`.
    pub fn describe(&self) -> String {
        match self {
            KubeCheck::Http(h) => format!(
                "GET {} answers {} {} time(s) in a row (every {}, within {})",
                h.url,
                h.expect_status.describe(),
                h.successes,
                humantime::format_duration(h.interval),
                humantime::format_duration(h.timeout)
            ),
        }
    }

    /// Checks what serde cannot; `at` is the step's key path (`target.kubernetes.steps[1]`).
    pub fn validate(&self, at: &str) -> Result<(), String> {
        let KubeCheck::Http(h) = self;
        let at = format!("{at}.check.http");
        match reqwest::Url::parse(&h.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some_and(|h| !h.is_empty()) => {
                // The URL is printed in the timeline and Slack: credentials must not be in it.
                if !u.username().is_empty() || u.password().is_some() {
                    return Err(format!(
                        "{at}.url: remove the user and password from the URL (it is shown in the timeline and Slack)"
                    ));
                }
            }
            _ => {
                return Err(format!(
                    "{at}.url: {:?} is not an http:// or https:// URL, e.g. https://portal.example.com/v1/health",
                    h.url
                ))
            }
        }
        if h.successes == 0 {
            return Err(format!("{at}.successes: at least 1"));
        }
        if h.interval.is_zero() {
            return Err(format!("{at}.interval: must be above zero, e.g. 2s"));
        }
        if h.timeout < MIN_CHECK_TIMEOUT || h.timeout > MAX_CHECK_TIMEOUT {
            return Err(format!(
                "{at}.timeout: {} is out of range; use {} to {} (the action's lease is held while the check waits)",
                humantime::format_duration(h.timeout),
                humantime::format_duration(MIN_CHECK_TIMEOUT),
                humantime::format_duration(MAX_CHECK_TIMEOUT)
            ));
        }
        // Successes are `interval` apart: the last one must fit in the timeout.
        let needed = h.interval.checked_mul(h.successes - 1).unwrap_or(Duration::MAX);
        if needed >= h.timeout {
            return Err(format!(
                "{at}: {} successes {} apart take {}, not less than the timeout {}: the check could never pass; \
                 lower successes or interval, or raise timeout",
                h.successes,
                humantime::format_duration(h.interval),
                humantime::format_duration(needed),
                humantime::format_duration(h.timeout)
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(v: serde_json::Value) -> Result<KubeCheck, String> {
        serde_json::from_value(serde_json::json!({ "http": v })).map_err(|e| e.to_string())
    }

    #[test]
    fn expect_status_is_a_code_or_a_class_and_defaults_to_2xx() {
        let c = http(serde_json::json!({"url": "https://a.example/h"})).unwrap();
        let KubeCheck::Http(h) = &c;
        assert_eq!(h.expect_status, ExpectStatus::Class(2));
        assert!(h.expect_status.accepts(204) && !h.expect_status.accepts(301) && !h.expect_status.accepts(503));
        assert_eq!((h.successes, h.interval, h.timeout), (3, two_seconds(), one_minute()));
        let KubeCheck::Http(h) = http(serde_json::json!({"url": "http://a/h", "expect_status": 200})).unwrap();
        assert!(h.expect_status.accepts(200) && !h.expect_status.accepts(201));
        let KubeCheck::Http(h) = http(serde_json::json!({"url": "http://a/h", "expect_status": "3XX"})).unwrap();
        assert_eq!(h.expect_status.describe(), "3xx");
        for bad in [
            serde_json::json!("2yy"),
            serde_json::json!(700),
            serde_json::json!("ok"),
        ] {
            let e = http(serde_json::json!({"url": "http://a/h", "expect_status": bad})).unwrap_err();
            assert!(
                e.contains("is not a status; use a code such as 200 or a class such as 2xx"),
                "{e}"
            );
        }
    }

    #[test]
    fn bad_checks_are_refused_naming_the_key() {
        let at = "target.kubernetes.steps[1]";
        let check = |v: serde_json::Value| http(v).unwrap().validate(at);
        assert_eq!(
            check(serde_json::json!({"url": "http://portal-api-prod.portal/v1/health"})),
            Ok(())
        );
        let e = check(serde_json::json!({"url": "portal.example.com/v1/health"})).unwrap_err();
        assert!(e.starts_with("target.kubernetes.steps[1].check.http.url: \"portal.example.com/v1/health\" is not an http:// or https:// URL"), "{e}");
        let e = check(serde_json::json!({"url": "ftp://a/h"})).unwrap_err();
        assert!(e.contains(".url:"), "{e}");
        let e = check(serde_json::json!({"url": "https://u:secret@a/h"})).unwrap_err();
        assert!(
            e.contains("remove the user and password") && !e.contains("secret"),
            "{e}"
        );
        assert_eq!(
            check(serde_json::json!({"url": "http://a/h", "successes": 0})).unwrap_err(),
            "target.kubernetes.steps[1].check.http.successes: at least 1"
        );
        assert!(check(serde_json::json!({"url": "http://a/h", "interval": "0s"}))
            .unwrap_err()
            .contains(".interval: must be above zero"));
        for t in ["500ms", "11m", "100d"] {
            let e = check(serde_json::json!({"url": "http://a/h", "timeout": t})).unwrap_err();
            assert!(
                e.starts_with("target.kubernetes.steps[1].check.http.timeout: ")
                    && e.contains("is out of range; use 1s to 10m"),
                "{e}"
            );
        }
        let e = check(serde_json::json!({"url": "http://a/h", "successes": 4, "interval": "20s", "timeout": "1m"}))
            .unwrap_err();
        assert!(e.contains("could never pass"), "{e}");
        // Overflowing interval * successes is refused, not wrapped.
        let e = check(serde_json::json!({"url": "http://a/h", "successes": 4_000_000_000u32, "interval": "10000000h"}))
            .unwrap_err();
        assert!(e.contains("could never pass"), "{e}");
    }
}
