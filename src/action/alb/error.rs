//! Errors of the ALB revert and their classification: not found, retryable (throttling,
//! 5xx, transport) or permanent, each naming the ELBv2 call that failed.

use std::collections::BTreeMap;

use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::display::DisplayErrorContext;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use serde::Serialize;

use super::{ForwardState, Resource, TargetHealthSeen};
use crate::action::retry::{Classify, ErrorClass};

/// Errors of the ALB revert.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize)]
#[serde(tag = "error", rename_all = "snake_case")]
pub enum AlbError {
    /// Listener, rule or target group does not exist (AWS code kept).
    #[error("{code}: {message}")]
    NotFound {
        /// `ListenerNotFound`, `RuleNotFound`, `TargetGroupNotFound`, `LoadBalancerNotFound`.
        code: String,
        /// AWS message.
        message: String,
    },
    /// The stable group has too few healthy targets; nothing was written.
    #[error(
        "pre-check failed: stable target group {target_group_arn} has {healthy} healthy target(s), \
         {required} required (states: {states:?})"
    )]
    PreCheckFailed {
        /// The stable target group.
        target_group_arn: String,
        /// Targets in state `healthy`.
        healthy: u32,
        /// `min_healthy_targets`.
        required: u32,
        /// Count of targets per health state.
        states: BTreeMap<String, u32>,
        /// Up to 20 individual targets.
        targets: Vec<TargetHealthSeen>,
    },
    /// The target definition is unusable (bad ARN, default rule, ...).
    #[error("invalid ALB target: {message}")]
    InvalidTarget {
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The action list has no forward action, so there is no traffic split to revert.
    #[error("no forward action to revert (action types: {action_types:?})")]
    NoForwardAction {
        /// Types of the actions that were found.
        action_types: Vec<String>,
    },
    /// More than one forward action; ELBv2 allows one, so the state is not understood.
    #[error("{count} forward actions found; expected exactly one")]
    MultipleForwardActions {
        /// Number of forward actions.
        count: usize,
    },
    /// The stable group is not in the forward; we do not invent routes.
    #[error("stable target group {stable_target_group_arn} is not in the forward action (groups: {present:?})")]
    StableGroupNotInForward {
        /// The configured stable group.
        stable_target_group_arn: String,
        /// Groups the forward has.
        present: Vec<String>,
    },
    /// `scope: listener`: a forward that sends traffic to canary groups but not to the stable
    /// group, and the stable group cannot take its traffic (`reason` says why); not written.
    #[error(
        "{} forwards only to canary group(s) {} and not to the stable group {stable_target_group_arn}: \
         not reverted, because {reason}",
        resource.describe(),
        canary_target_groups.join(", ")
    )]
    CanaryForwardWithoutStable {
        /// The rule (or default action).
        resource: Resource,
        /// The canary groups it forwards to.
        canary_target_groups: Vec<String>,
        /// The configured stable group.
        stable_target_group_arn: String,
        /// Why the stable group cannot take its traffic, and what to do.
        reason: String,
    },
    /// The write succeeded but reading back shows different routing.
    #[error("write did not take: expected [{expected}], read back [{got}]")]
    WeightsDidNotTake {
        /// Routing written.
        expected: ForwardState,
        /// Routing read back.
        got: ForwardState,
    },
    /// `scope: listener`: some forwards to the canary were reverted, others failed; what was
    /// reverted stays reverted.
    #[error("{}", partial_message(done, failed, *dry_run))]
    Partial {
        /// Listener (default action) and rule ARNs that were reverted or found already stable.
        done: Vec<String>,
        /// The forwards that failed, each with its error.
        failed: Vec<FailedForward>,
        /// A dry run: nothing was written, `done` would be reverted.
        dry_run: bool,
    },
    /// A write failed without a clear answer (timed out, the connection cut, an unreadable or
    /// 5xx response: AWS may have applied it) and the resource could not be read back since,
    /// so whether it took is not known. Never said as "not reverted".
    #[error(
        "{operation} on {arn}: whether it took is UNKNOWN: an attempt failed without a clear answer and it \
         could not be read back since ({cause}); check it before acting"
    )]
    OutcomeUnknown {
        /// The write (`ModifyListener`, `ModifyRule`).
        operation: String,
        /// The listener or rule.
        arn: String,
        /// The last error, with its code.
        cause: String,
    },
    /// Any other AWS or transport error.
    #[error("AWS error {code}: {message}")]
    Aws {
        /// AWS error code, or `Timeout`, `IoError`, `DispatchFailure`, ...
        code: String,
        /// Message with its cause chain.
        message: String,
        /// Whether another attempt may succeed.
        retryable: bool,
    },
}

/// One forward of a `scope: listener` revert that failed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailedForward {
    /// The action list.
    pub resource: Resource,
    /// Why.
    pub error: Box<AlbError>,
}

fn partial_message(done: &[String], failed: &[FailedForward], dry_run: bool) -> String {
    let failures: Vec<String> = failed
        .iter()
        .map(|f| format!("{}: {} (code {})", f.resource.describe(), f.error, f.error.code()))
        .collect();
    // "NOT reverted" would be a claim: say so only of what is known.
    let unknown = failed.iter().filter(|f| f.error.outcome_unknown()).count();
    // A dry run wrote nothing: saying "reverted" would tell a reader traffic moved.
    let (not, done_as) = if dry_run {
        (
            "would NOT be reverted (dry run)",
            "would be reverted (dry run) or already stable",
        )
    } else if unknown > 0 {
        ("NOT reverted or of UNKNOWN outcome", "reverted or already stable")
    } else {
        ("NOT reverted", "reverted or already stable")
    };
    format!(
        "{} of {} forward(s) to the canary {not}: {}; {done_as}: {}",
        failed.len(),
        failed.len() + done.len(),
        failures.join("; "),
        if done.is_empty() {
            "none".to_string()
        } else {
            done.join(", ")
        }
    )
}

/// Codes that mean the addressed resource does not exist.
const NOT_FOUND_CODES: &[&str] = &[
    "ListenerNotFound",
    "RuleNotFound",
    "TargetGroupNotFound",
    "LoadBalancerNotFound",
];

/// Codes that retrying cannot fix (the request or the permissions are wrong).
const NEVER_RETRY_CODES: &[&str] = &[
    "ListenerNotFound",
    "RuleNotFound",
    "TargetGroupNotFound",
    "LoadBalancerNotFound",
    "InvalidConfigurationRequest",
    "IncompatibleProtocols",
    "TooManyActions",
    "TooManyTargetGroups",
    "TargetGroupAssociationLimit",
    "InvalidLoadBalancerAction",
    "OperationNotPermitted",
    "ValidationError",
    "InvalidParameterValue",
    "MissingParameter",
    "AccessDenied",
    "AccessDeniedException",
    "UnauthorizedOperation",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "SignatureDoesNotMatch",
    "IncompleteSignature",
    "ExpiredToken",
    "ExpiredTokenException",
];

/// Throttling and transient server codes (the SDK's own throttling/transient lists).
const RETRY_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "RequestThrottled",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "LimitExceededException",
    "ProvisionedThroughputExceededException",
    "SlowDown",
    "PriorRequestNotComplete",
    "EC2ThrottledException",
    "TransactionInProgressException",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "InternalFailure",
    "InternalServerError",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "Unavailable",
    "Timeout",
    "IoError",
    "DispatchFailure",
];

/// Pure retry classification of an AWS error code and optional HTTP status: throttling,
/// transient and transport codes and any 5xx/429 retry; the never-retry list wins over status.
pub fn is_retryable_code(code: &str, http_status: Option<u16>) -> bool {
    if NEVER_RETRY_CODES.contains(&code) {
        return false;
    }
    if RETRY_CODES.contains(&code) {
        return true;
    }
    matches!(http_status, Some(s) if s >= 500 || s == 429)
}

impl AlbError {
    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, AlbError::Aws { retryable: true, .. })
    }

    /// AWS error code or our own short code, for metric labels.
    pub fn code(&self) -> &str {
        match self {
            AlbError::NotFound { code, .. } | AlbError::Aws { code, .. } => code,
            AlbError::PreCheckFailed { .. } => "PreCheckFailed",
            AlbError::InvalidTarget { .. } => "InvalidTarget",
            AlbError::NoForwardAction { .. } => "NoForwardAction",
            AlbError::MultipleForwardActions { .. } => "MultipleForwardActions",
            AlbError::StableGroupNotInForward { .. } => "StableGroupNotInForward",
            AlbError::CanaryForwardWithoutStable { .. } => "CanaryForwardWithoutStable",
            AlbError::WeightsDidNotTake { .. } => "WeightsDidNotTake",
            AlbError::Partial { .. } => "PartialRevert",
            AlbError::OutcomeUnknown { .. } => "OutcomeUnknown",
        }
    }

    /// Whether a write that failed so may have been applied all the same: no clear answer came
    /// back (a timeout, a cut connection, an unreadable response) or AWS failed inside (500).
    /// A clear refusal (a 4xx with its code, throttling, 503 "unavailable") was not applied.
    pub fn may_have_been_applied(&self) -> bool {
        match self {
            AlbError::Aws { code, .. } => matches!(
                code.as_str(),
                "Timeout"
                    | "IoError"
                    | "DispatchFailure"
                    | "ResponseError"
                    | "Unknown"
                    | "InternalError"
                    | "InternalFailure"
                    | "InternalServerError"
            ),
            _ => false,
        }
    }

    /// Whether this error leaves unknown whether the target changed.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            AlbError::OutcomeUnknown { .. } => true,
            AlbError::Partial { failed, .. } => failed.iter().any(|f| f.error.outcome_unknown()),
            _ => false,
        }
    }

    /// Builds the error for an AWS error code, classifying not-found and retryability.
    pub fn from_code(code: &str, message: &str, http_status: Option<u16>) -> Self {
        if NOT_FOUND_CODES.contains(&code) {
            AlbError::NotFound {
                code: code.to_string(),
                message: message.to_string(),
            }
        } else {
            AlbError::Aws {
                code: code.to_string(),
                message: message.to_string(),
                retryable: is_retryable_code(code, http_status),
            }
        }
    }

    pub(crate) fn from_sdk<E>(err: SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let status = err.raw_response().map(|r| r.status().as_u16());
        let detail = DisplayErrorContext(&err).to_string();
        let (code, retryable) = match &err {
            SdkError::ServiceError(se) => {
                let code = se.err().code().unwrap_or("Unknown");
                let message = se.err().message().unwrap_or(&detail);
                return Self::from_code(code, message, status);
            }
            SdkError::TimeoutError(_) => ("Timeout", true),
            SdkError::DispatchFailure(d) if d.is_user() => ("InvalidRequest", false),
            SdkError::DispatchFailure(d) if d.is_timeout() => ("Timeout", true),
            SdkError::DispatchFailure(d) if d.is_io() => ("IoError", true),
            SdkError::DispatchFailure(_) => ("DispatchFailure", true),
            // Unparseable response: a proxy's error page is transient, a 4xx is not.
            SdkError::ResponseError(_) => ("ResponseError", status.is_none_or(|s| s >= 500 || s == 429)),
            SdkError::ConstructionFailure(_) => ("ConstructionFailure", false),
            _ => ("Unknown", false),
        };
        AlbError::Aws {
            code: code.to_string(),
            message: detail,
            retryable,
        }
    }
}

impl Classify for AlbError {
    fn class(&self) -> ErrorClass {
        if self.is_retryable() {
            ErrorClass::Retryable
        } else {
            ErrorClass::Permanent
        }
    }

    fn code(&self) -> &str {
        AlbError::code(self)
    }

    fn for_call(self, call: &str, attempts: u32) -> Self {
        match self {
            AlbError::Aws {
                code,
                message,
                retryable,
            } => AlbError::Aws {
                code,
                message: if attempts > 1 {
                    format!("{call}: {message} (gave up after {attempts} attempts)")
                } else {
                    format!("{call}: {message}")
                },
                retryable,
            },
            AlbError::NotFound { code, message } => AlbError::NotFound {
                code,
                message: format!("{call}: {message}"),
            },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_classification() {
        for code in [
            "Throttling",
            "ThrottlingException",
            "RequestLimitExceeded",
            "TooManyRequestsException",
            "ServiceUnavailable",
            "InternalFailure",
            "RequestTimeout",
            "Timeout",
            "IoError",
        ] {
            assert!(is_retryable_code(code, Some(400)), "{code}");
        }
        for code in [
            "ListenerNotFound",
            "RuleNotFound",
            "TargetGroupNotFound",
            "InvalidConfigurationRequest",
            "IncompatibleProtocols",
            "TooManyActions",
            "TargetGroupAssociationLimit",
            "InvalidLoadBalancerAction",
            "OperationNotPermitted",
            "ValidationError",
            "AccessDenied",
        ] {
            assert!(!is_retryable_code(code, Some(400)), "{code}");
            // The code wins over a 5xx status.
            assert!(!is_retryable_code(code, Some(503)), "{code}");
        }
        assert!(is_retryable_code("SomethingNew", Some(502)));
        assert!(is_retryable_code("SomethingNew", Some(429)));
        assert!(!is_retryable_code("SomethingNew", Some(400)));
        assert!(!is_retryable_code("SomethingNew", None));
    }

    #[test]
    fn errors_from_codes() {
        let e = AlbError::from_code("ListenerNotFound", "gone", Some(400));
        assert!(matches!(e, AlbError::NotFound { .. }));
        assert_eq!(e.code(), "ListenerNotFound");
        assert!(!e.is_retryable());
        let e = AlbError::from_code("Throttling", "Rate exceeded", Some(400));
        assert!(e.is_retryable());
        assert_eq!(e.code(), "Throttling");
        let e = AlbError::from_code("AccessDenied", "no", Some(403));
        assert!(!e.is_retryable());
        assert_eq!(AlbError::InvalidTarget { message: "x".into() }.code(), "InvalidTarget");
    }
}
