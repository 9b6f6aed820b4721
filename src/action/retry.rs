//! One retry policy and one error classification for every executor's API calls.
//!
//! Both executors (ALB through the ELBv2 SDK, Kubernetes through kube-rs) send each call
//! through [`RetryPolicy::run`]: an error the executor classifies as [`ErrorClass::Retryable`]
//! (5xx, 429 and throttling, timeouts, connection trouble) is sent again after an exponential
//! backoff with jitter, for as long as the policy's window allows; a permanent one (not found,
//! forbidden, invalid) ends the call at once. Every failed attempt is reported as an
//! [`Attempt`] naming the call, so the incident's timeline shows each one. The responder keeps
//! its lease on the incident renewed while this runs, so a window of minutes stays ours.

use std::future::Future;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use serde::Serialize;
use tokio::time::Instant;

/// Whether sending the same call again may succeed without anyone's help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Throttling, server trouble (5xx), timeouts, connection errors.
    Retryable,
    /// The request, the target or the permissions are wrong: retrying cannot help.
    Permanent,
}

/// What an executor's error says about itself, for the shared retry loop.
pub trait Classify: std::fmt::Display {
    /// Retryable or permanent.
    fn class(&self) -> ErrorClass;
    /// Short code for people and metrics (AWS error code, `api`, `client`, ...).
    fn code(&self) -> &str;
    /// The same error, saying which call failed and after how many attempts (unless the
    /// message names the call already).
    fn for_call(self, call: &str, attempts: u32) -> Self;
}

/// One failed attempt of a call, for the incident's timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attempt {
    /// The call: an ELBv2 operation (`ModifyListener`) or a Kubernetes request
    /// (`patch deployments/scale/web in portal`).
    pub call: String,
    /// 1-based attempt number.
    pub attempt: u32,
    /// Error code (see [`Classify::code`]).
    pub code: String,
    /// Error message.
    pub message: String,
    /// Whether the error class is retryable.
    pub retryable: bool,
    /// Whether another attempt follows.
    pub will_retry: bool,
    /// Backoff before the next attempt.
    pub retry_in_ms: Option<u64>,
}

impl Attempt {
    /// Worth telling people as it happens: the first failure of a call and the last one;
    /// the attempts in between are in the timeline.
    pub fn is_notable(&self) -> bool {
        self.attempt == 1 || !self.will_retry
    }

    /// One line for the timeline and Slack.
    pub fn describe(&self) -> String {
        let next = match (self.will_retry, self.retry_in_ms) {
            (true, Some(ms)) => format!("retrying in {ms} ms"),
            (true, None) => "retrying".to_string(),
            (false, _) if self.retryable => "retry window used up, giving up".to_string(),
            (false, _) => "permanent error, not retried".to_string(),
        };
        format!(
            "{} attempt {} failed: {} {} ({next})",
            self.call, self.attempt, self.code, self.message
        )
    }
}

/// How long and how often a failing call is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// No new attempt starts later than this after the first one.
    pub window: Duration,
    /// First backoff; it doubles (with jitter) up to `max_delay`.
    pub initial: Duration,
    /// Longest single backoff.
    pub max_delay: Duration,
    /// Optional cap on attempts (including the first); `None`: the window decides.
    pub max_attempts: Option<u32>,
}

/// Default retry window: long enough to ride out an API server restart or a throttling burst,
/// short enough that a person hears about a failed rollback within minutes.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(120);
/// Longest single backoff sleep.
pub const MAX_DELAY: Duration = Duration::from_secs(10);
/// Longest window a configuration may ask for: past that, a person should act.
pub const MAX_WINDOW: Duration = Duration::from_secs(30 * 60);

impl RetryPolicy {
    /// A policy with `window` (at most [`MAX_WINDOW`]), starting at `initial` backoff; an
    /// attempt cap of 0 means none.
    pub fn new(window: Duration, initial: Duration, max_attempts: Option<u32>) -> Self {
        Self {
            window: window.min(MAX_WINDOW),
            initial,
            max_delay: MAX_DELAY.max(initial),
            max_attempts: max_attempts.filter(|&n| n > 0),
        }
    }

    /// Runs `f` until it succeeds, fails permanently, or the window (or attempt cap) is used
    /// up; every failed attempt goes to `on_attempt`. The error returned names the call.
    pub async fn run<T, E, F, Fut>(
        &self,
        call: &str,
        on_attempt: &mut (dyn FnMut(Attempt) + Send),
        f: F,
    ) -> Result<T, E>
    where
        E: Classify,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.run_gated(call, on_attempt, None, f).await
    }

    /// [`RetryPolicy::run`] for a write: every attempt after the first waits at `gate` before
    /// it goes out, as the first one did (the responder's [`BeforeWrite`]: the steps recorded,
    /// the lease still ours). A replica that lost its lease while a write was failing sends it
    /// no more; the gate never opens and the work is dropped there.
    pub async fn run_gated<T, E, F, Fut>(
        &self,
        call: &str,
        on_attempt: &mut (dyn FnMut(Attempt) + Send),
        gate: Option<BeforeWrite<'_>>,
        f: F,
    ) -> Result<T, E>
    where
        E: Classify,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let started = Instant::now();
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(self.initial)
            .with_max_delay(self.max_delay)
            .with_jitter()
            .without_max_times();
        if let Some(n) = self.max_attempts {
            backoff = backoff.with_max_times(usize::try_from(n.saturating_sub(1)).unwrap_or(usize::MAX));
        }
        let window = self.window;
        let mut f = f;
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let result = (|| {
            let retry = attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed) > 0;
            // Made now, run only once the gate opens: a future sends nothing until polled.
            let attempt = f();
            async move {
                if let Some(gate) = gate.filter(|_| retry) {
                    gate().await;
                }
                attempt.await
            }
        })
        .retry(backoff)
        .when(|e: &E| e.class() == ErrorClass::Retryable)
        // The window bounds when the next attempt may start: stop once it would start late.
        .adjust(|_, delay| delay.filter(|d| started.elapsed().saturating_add(*d) <= window))
        .notify(|e: &E, delay: Duration| {
            let attempt = attempts.load(std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(call, attempt, code = e.code(), error = %e, retry_in = ?delay, "API call failed, retrying");
            on_attempt(Attempt {
                call: call.to_string(),
                attempt,
                code: e.code().to_string(),
                message: e.to_string(),
                retryable: true,
                will_retry: true,
                retry_in_ms: Some(millis(delay)),
            });
        })
        .await;
        result.map_err(|e| {
            let n = attempts.load(std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(call, attempt = n, code = e.code(), error = %e, "API call failed, giving up");
            on_attempt(Attempt {
                call: call.to_string(),
                attempt: n,
                code: e.code().to_string(),
                message: e.to_string(),
                retryable: e.class() == ErrorClass::Retryable,
                will_retry: false,
                retry_in_ms: None,
            });
            e.for_call(call, n)
        })
    }
}

/// Awaited by an executor right before each write it sends, and before each retry of one
/// ([`RetryPolicy::run_gated`]; not in a dry run): the caller uses it to make its record of
/// the write intent durable first, so that a replica taking over after a crash can tell a
/// revert it wrote from one somebody else made, and to stop there once its lease is lost.
pub type BeforeWrite<'a> = &'a (dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>> + Send + Sync);

/// A [`BeforeWrite`] that waits for nothing.
pub fn no_gate() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
    Box::pin(async {})
}

/// Milliseconds, saturating.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct E(ErrorClass, String);

    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.1)
        }
    }

    impl Classify for E {
        fn class(&self) -> ErrorClass {
            self.0
        }
        fn code(&self) -> &str {
            "e"
        }
        fn for_call(self, call: &str, attempts: u32) -> Self {
            E(self.0, format!("{call} after {attempts}: {}", self.1))
        }
    }

    fn policy(window_ms: u64) -> RetryPolicy {
        RetryPolicy::new(Duration::from_millis(window_ms), Duration::from_millis(1), None)
    }

    /// Each retry of a gated call waits at the gate before it goes out (the first attempt
    /// passed it already, in the executor); a gate that never opens (a lost lease) sends no
    /// further attempt.
    #[tokio::test]
    async fn a_gated_calls_retries_wait_at_the_gate_and_a_closed_gate_stops_them() {
        use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
        let (gated, sent) = (AtomicU32::new(0), AtomicU32::new(0));
        let open_until = AtomicU32::new(2);
        let gate = || -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
            let n = gated.fetch_add(1, SeqCst) + 1;
            let open = n <= open_until.load(SeqCst);
            Box::pin(async move {
                if !open {
                    std::future::pending::<()>().await;
                }
            })
        };
        let (p, mut ignore) = (policy(60_000), |_| {});
        // Counted when the attempt runs, not when its future is made (before the gate).
        let call = p.run_gated("ModifyListener", &mut ignore, Some(&gate), || async {
            sent.fetch_add(1, SeqCst);
            Err::<(), E>(E(ErrorClass::Retryable, "503".into()))
        });
        let stopped = tokio::time::timeout(Duration::from_millis(300), call).await;
        assert!(stopped.is_err(), "the call went on past a closed gate");
        // Attempt 1 (no gate: the executor's own), retries 2 and 3 through an open gate, then
        // the gate closed before a fourth.
        assert_eq!((sent.load(SeqCst), gated.load(SeqCst)), (3, 3));

        // Ungated, the same call retries on its own.
        let sent = AtomicU32::new(0);
        let out: Result<(), E> = RetryPolicy::new(Duration::from_secs(60), Duration::from_millis(1), Some(4))
            .run("ModifyListener", &mut |_| {}, || {
                sent.fetch_add(1, SeqCst);
                async { Err(E(ErrorClass::Retryable, "503".into())) }
            })
            .await;
        assert!(out.is_err());
        assert_eq!(sent.load(SeqCst), 4);
    }

    #[tokio::test]
    async fn retryable_errors_are_retried_until_success_and_each_attempt_reported() {
        let mut seen = Vec::new();
        let mut n = 0;
        let out: Result<u32, E> = policy(60_000)
            .run("get services/web in portal", &mut |a| seen.push(a), || {
                n += 1;
                let this = n;
                async move {
                    if this < 6 {
                        Err(E(ErrorClass::Retryable, "503".into()))
                    } else {
                        Ok(this)
                    }
                }
            })
            .await;
        assert_eq!(out, Ok(6));
        assert_eq!(seen.len(), 5);
        assert!(seen
            .iter()
            .enumerate()
            .all(|(i, a)| a.attempt == i as u32 + 1 && a.will_retry));
        assert_eq!(seen[0].call, "get services/web in portal");
    }

    #[tokio::test]
    async fn permanent_errors_stop_at_once_and_name_the_call() {
        let mut seen = Vec::new();
        let out: Result<(), E> = policy(60_000)
            .run("ModifyListener", &mut |a| seen.push(a), || async {
                Err(E(ErrorClass::Permanent, "denied".into()))
            })
            .await;
        assert_eq!(
            out,
            Err(E(ErrorClass::Permanent, "ModifyListener after 1: denied".into()))
        );
        assert_eq!(seen.len(), 1);
        assert!(!seen[0].will_retry && !seen[0].retryable);
        assert!(
            seen[0].describe().contains("permanent error, not retried"),
            "{}",
            seen[0].describe()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_bounds_the_retries() {
        let mut seen = Vec::new();
        let p = RetryPolicy::new(Duration::from_secs(60), Duration::from_secs(1), None);
        let out: Result<(), E> = p
            .run("DescribeListeners", &mut |a| seen.push(a), || async {
                Err(E(ErrorClass::Retryable, "throttled".into()))
            })
            .await;
        assert!(out.is_err());
        let last = seen.last().expect("attempts");
        assert!(!last.will_retry && last.retryable);
        // 1 s doubling up to 10 s within 60 s: more than the old 3 attempts, and bounded.
        assert!(seen.len() > 3 && seen.len() < 60, "{}", seen.len());
        let slept: u64 = seen.iter().filter_map(|a| a.retry_in_ms).sum();
        assert!(slept <= 60_000, "{slept}");
    }

    #[test]
    fn the_checks_of_a_target_are_bounded_like_the_longest_retry_window() {
        assert_eq!(crate::policy::target::kube_check::MAX_CHECKS_TOTAL, MAX_WINDOW);
    }

    #[test]
    fn windows_and_caps_are_bounded() {
        let p = RetryPolicy::new(Duration::from_secs(7200), Duration::ZERO, Some(0));
        assert_eq!((p.window, p.max_attempts), (MAX_WINDOW, None));
    }
}
