//! Reverting an AWS Application Load Balancer's weighted forward to the stable target group.
//!
//! This step runs after the responder has decided (from alerts and policies) to roll back a
//! target of kind ALB. It reads the listener's default actions (ModifyListener) or one
//! listener rule's actions (ModifyRule), checks that the stable target group has enough healthy
//! targets, writes the same action list back with all weight on the stable group (optionally in
//! gradual steps), and reads it back to prove the change took. What follows is the caller's
//! business: verification that the alert clears, and notifications. Every notable step is
//! reported through a callback so the caller can keep an audit trail of the incident.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use aws_sdk_elasticloadbalancingv2 as elbv2;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::display::DisplayErrorContext;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use backon::{ExponentialBuilder, Retryable};
use elbv2::types::{Action, ActionTypeEnum, ForwardActionConfig, TargetGroupStickinessConfig, TargetGroupTuple};
use serde::{Deserialize, Serialize};

/// Reading the target back during the bake (verification).
#[path = "alb_readback.rs"]
mod readback;

/// Largest weight ELBv2 accepts in a `TargetGroupTuple`.
pub const MAX_WEIGHT: i32 = 999;

/// Longest wait we accept between two gradual steps; longer looks like a unit typo.
const MAX_GRADUAL_INTERVAL: Duration = Duration::from_secs(3600);
/// More steps than this is not a rollback any more but a slow rollout.
const MAX_GRADUAL_STEPS: usize = 20;
/// Upper bound for one backoff sleep, so a large max_attempts cannot stall an incident.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// ELBv2 reads are normally consistent right after a write, but allow a short settling time
/// before declaring that the write did not take.
const READBACK_ATTEMPTS: u32 = 3;
const READBACK_SPACING: Duration = Duration::from_millis(500);
/// Per-attempt limits so a hung connection becomes a retryable timeout instead of a stall.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How many individual targets a pre-check report lists (the per-state counts are complete).
const MAX_TARGETS_REPORTED: usize = 20;

/// What to do with the forward action's target-group stickiness when reverting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stickiness {
    /// Write the stickiness config back as read (omitting it would reset it to disabled).
    #[default]
    Keep,
    /// Write `enabled = false` so sticky clients stop being pinned to the canary.
    Disable,
}

/// Shift traffic back in steps: stable share percentages, waiting `interval` between them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GradualShift {
    /// Stable share in percent per step, strictly increasing, ending at 100.
    pub steps: Vec<u8>,
    /// Wait between two steps (humantime, e.g. "30s").
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl GradualShift {
    /// Checks the steps and interval; the message names the field and the fix.
    pub fn validate(&self) -> Result<(), String> {
        let Some(&last) = self.steps.last() else {
            return Err("gradual.steps is empty: list stable percentages ending at 100, e.g. [50, 100]".into());
        };
        if self.steps.len() > MAX_GRADUAL_STEPS {
            return Err(format!(
                "gradual.steps has {} entries; use at most {MAX_GRADUAL_STEPS}",
                self.steps.len()
            ));
        }
        if let Some(bad) = self.steps.iter().find(|&&p| p == 0 || p > 100) {
            return Err(format!(
                "gradual.steps contains {bad}: every step is a stable percentage from 1 to 100"
            ));
        }
        if let Some(w) = self.steps.windows(2).find(|w| w[0] >= w[1]) {
            return Err(format!(
                "gradual.steps must be strictly increasing, but {} is followed by {}",
                w[0], w[1]
            ));
        }
        if last != 100 {
            return Err(format!(
                "gradual.steps ends at {last}: the last step must be 100 so the revert completes"
            ));
        }
        if self.interval.is_zero() {
            return Err("gradual.interval is 0: set a wait between steps, e.g. \"30s\"".into());
        }
        if self.interval > MAX_GRADUAL_INTERVAL {
            return Err(format!(
                "gradual.interval is {}; use at most 1h",
                humantime_serde::re::humantime::format_duration(self.interval)
            ));
        }
        Ok(())
    }
}

fn default_min_healthy_targets() -> u32 {
    1
}

/// The ALB listener (default action) or listener rule to revert, as written in a policy file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlbTarget {
    /// Listener whose default action (or whose rule) carries the weighted forward.
    pub listener_arn: String,
    /// `None`: revert the listener's default action; `Some`: revert this (non-default) rule.
    #[serde(default)]
    pub rule_arn: Option<String>,
    /// Target group that receives all traffic after the revert.
    pub stable_target_group_arn: String,
    /// Keep or disable target-group stickiness on the forward action.
    #[serde(default)]
    pub stickiness: Stickiness,
    /// Healthy targets the stable group needs before we shift traffic onto it.
    #[serde(default = "default_min_healthy_targets")]
    pub min_healthy_targets: u32,
    /// Optional stepwise shift instead of one write.
    #[serde(default)]
    pub gradual: Option<GradualShift>,
}

impl AlbTarget {
    /// Checks ARNs, rule/listener consistency, min_healthy_targets and gradual steps.
    pub fn validate(&self) -> Result<(), String> {
        let (listener_prefix, listener_path) = check_arn("listener_arn", &self.listener_arn, ":listener/")?;
        if let Some(rule_arn) = &self.rule_arn {
            let (rule_prefix, rule_path) = check_arn("rule_arn", rule_arn, ":listener-rule/")?;
            // A rule ARN is the listener ARN's path plus one more segment; checking this
            // catches a rule copied from another listener before we touch anything.
            let belongs = rule_prefix == listener_prefix
                && rule_path
                    .strip_prefix(listener_path)
                    .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1);
            if !belongs {
                return Err(format!(
                    "rule_arn {rule_arn} does not belong to listener_arn {}: take both from the same listener \
                     (aws elbv2 describe-rules --listener-arn <listener_arn>)",
                    self.listener_arn
                ));
            }
        }
        check_arn(
            "stable_target_group_arn",
            &self.stable_target_group_arn,
            ":targetgroup/",
        )?;
        if self.min_healthy_targets == 0 {
            return Err(
                "min_healthy_targets is 0: set at least 1, shifting traffic onto a group \
                 without healthy targets would drop it"
                    .into(),
            );
        }
        if let Some(g) = &self.gradual {
            g.validate()?;
        }
        Ok(())
    }

    /// Stable identity of what this target changes: `alb:<rule arn or listener arn>`.
    pub fn key(&self) -> String {
        format!("alb:{}", self.resource_arn())
    }

    /// The ARN whose action list is rewritten: the rule if set, else the listener.
    pub fn resource_arn(&self) -> &str {
        self.rule_arn.as_deref().unwrap_or(&self.listener_arn)
    }

    fn resource_kind(&self) -> ResourceKind {
        if self.rule_arn.is_some() {
            ResourceKind::Rule
        } else {
            ResourceKind::ListenerDefaultActions
        }
    }
}

/// Splits `arn` at `marker` after basic shape checks; returns (prefix, path after marker).
fn check_arn<'a>(field: &str, arn: &'a str, marker: &str) -> Result<(&'a str, &'a str), String> {
    let kind = marker.trim_matches(|c| c == ':' || c == '/');
    if arn.is_empty() {
        return Err(format!("{field} is empty: set the {kind} ARN"));
    }
    if arn.chars().any(char::is_whitespace) {
        return Err(format!("{field} contains whitespace: {arn:?}"));
    }
    if !arn.starts_with("arn:") || !arn.contains(":elasticloadbalancing:") {
        return Err(format!(
            "{field} {arn:?} is not an ELBv2 ARN (expected arn:<partition>:elasticloadbalancing:<region>:<account>:{kind}/...)"
        ));
    }
    match arn.split_once(marker) {
        Some((prefix, path)) if !path.is_empty() => Ok((prefix, path)),
        _ => Err(format!("{field} {arn:?} is not a {kind} ARN (expected ...:{kind}/...)")),
    }
}

/// AWS settings from the service's config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AwsSettings {
    /// Region; `None` uses the default chain (env, profile, IMDS).
    pub region: Option<String>,
    /// Endpoint override for ELBv2 (emulators, VPC endpoints).
    pub endpoint_url: Option<String>,
    /// Named profile from the shared config files.
    pub profile: Option<String>,
    /// Attempts per AWS call, including the first (our retries; the SDK's are off).
    pub max_attempts: u32,
    /// First backoff delay in milliseconds; grows exponentially with jitter.
    pub initial_backoff_ms: u64,
}

impl Default for AwsSettings {
    fn default() -> Self {
        Self {
            region: None,
            endpoint_url: None,
            profile: None,
            max_attempts: 4,
            initial_backoff_ms: 200,
        }
    }
}

/// Which API owns the action list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceKind {
    /// Listener default actions: restore with ModifyListener `--default-actions`.
    ListenerDefaultActions,
    /// Listener rule actions: restore with ModifyRule `--actions`.
    Rule,
}

impl ResourceKind {
    fn write_operation(self) -> &'static str {
        match self {
            ResourceKind::ListenerDefaultActions => "ModifyListener",
            ResourceKind::Rule => "ModifyRule",
        }
    }
}

/// One target group of a forward action with its weight as read (`None`: not given).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct WeightedGroup {
    /// Target group ARN.
    pub target_group_arn: String,
    /// Weight 0..=999; absent in the legacy single-group shape.
    pub weight: Option<i32>,
}

/// Target-group stickiness of a forward action.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct StickinessSnapshot {
    /// Whether clients stick to the target group they first hit.
    pub enabled: bool,
    /// Stickiness duration in seconds, if set.
    pub duration_seconds: Option<i32>,
}

/// The forward action's routing: target groups with weights, and stickiness.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct ForwardState {
    /// Target groups in the order AWS returned them.
    pub target_groups: Vec<WeightedGroup>,
    /// Stickiness config; `None` when AWS returned none (treated as disabled).
    pub stickiness: Option<StickinessSnapshot>,
}

impl ForwardState {
    fn stickiness_enabled(&self) -> bool {
        self.stickiness.as_ref().is_some_and(|s| s.enabled)
    }

    /// Effective weights: a missing weight counts as 1 (single-group legacy shape).
    fn effective(&self) -> impl Iterator<Item = (&str, i64)> {
        self.target_groups
            .iter()
            .map(|g| (g.target_group_arn.as_str(), i64::from(g.weight.unwrap_or(1))))
    }

    /// Stable share in whole percent, rounded down; 0 when all weights are 0.
    fn stable_percent(&self, stable_arn: &str) -> u8 {
        let total: i64 = self.effective().map(|(_, w)| w.max(0)).sum();
        let stable: i64 = self
            .effective()
            .filter(|(arn, _)| *arn == stable_arn)
            .map(|(_, w)| w.max(0))
            .sum();
        if total == 0 {
            return 0;
        }
        u8::try_from(stable * 100 / total).unwrap_or(100)
    }

    /// Same routing: same groups with proportional weights, and same stickiness.
    fn same_routing(&self, other: &ForwardState) -> bool {
        let a: BTreeMap<&str, i64> = self.effective().collect();
        let b: BTreeMap<&str, i64> = other.effective().collect();
        if a.len() != b.len() || a.keys().ne(b.keys()) {
            return false;
        }
        let sum_a: i64 = a.values().sum();
        let sum_b: i64 = b.values().sum();
        // Weights are relative, so compare shares by cross-multiplying instead of dividing.
        let weights_match = a.iter().all(|(arn, wa)| {
            let wb = b.get(arn).copied().unwrap_or(0);
            wa * sum_b == wb * sum_a
        });
        let stick_match = self.stickiness_enabled() == other.stickiness_enabled()
            && (!self.stickiness_enabled()
                || self.stickiness.as_ref().map(|s| s.duration_seconds)
                    == other.stickiness.as_ref().map(|s| s.duration_seconds));
        weights_match && stick_match
    }
}

impl fmt::Display for ForwardState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.target_groups.is_empty() {
            return f.write_str("no forward");
        }
        for (i, g) in self.target_groups.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            match g.weight {
                Some(w) => write!(f, "{}={w}", g.target_group_arn)?,
                None => write!(f, "{}=(unweighted)", g.target_group_arn)?,
            }
        }
        match &self.stickiness {
            Some(s) if s.enabled => write!(f, "; stickiness on ({}s)", s.duration_seconds.unwrap_or_default()),
            _ => f.write_str("; stickiness off"),
        }
    }
}

/// One action of the list as read, enough to restore it by hand.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ActionSnapshot {
    /// Action type as AWS spells it (`forward`, `redirect`, `fixed-response`, `authenticate-oidc`, ...).
    #[serde(rename = "type")]
    pub action_type: String,
    /// Position in the action list, if AWS returned one.
    pub order: Option<i32>,
    /// Legacy single target group of a forward action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_group_arn: Option<String>,
    /// Forward target groups and weights (empty for other action types).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_groups: Vec<WeightedGroup>,
    /// Forward stickiness (only for forward actions with a stickiness config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stickiness: Option<StickinessSnapshot>,
}

/// The action list of a listener default action or rule, plus the forward's routing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ForwardSnapshot {
    /// Listener ARN (default actions) or rule ARN.
    pub resource_arn: String,
    /// Which API writes this list.
    pub resource_kind: ResourceKind,
    /// Every action, in the order read.
    pub actions: Vec<ActionSnapshot>,
    /// Routing of the (first) forward action; `None` if the list has no forward.
    pub forward: Option<ForwardState>,
}

impl ForwardSnapshot {
    /// Builds a snapshot from SDK actions (as read, or as planned).
    pub fn from_actions(resource_arn: &str, resource_kind: ResourceKind, actions: &[Action]) -> Self {
        let snaps: Vec<ActionSnapshot> = actions.iter().map(action_snapshot).collect();
        let forward = actions.iter().find(|a| is_forward(a)).map(forward_state);
        Self {
            resource_arn: resource_arn.to_string(),
            resource_kind,
            actions: snaps,
            forward,
        }
    }

    /// True if all weight is on `stable_arn`: it has weight > 0 and every other group has 0.
    pub fn is_fully_stable(&self, stable_arn: &str) -> bool {
        let Some(fwd) = &self.forward else {
            return false;
        };
        let mut stable_seen = false;
        for (arn, w) in fwd.effective() {
            if arn == stable_arn {
                if w <= 0 {
                    return false;
                }
                stable_seen = true;
            } else if w != 0 {
                return false;
            }
        }
        stable_seen
    }

    /// Stable share in whole percent (rounded down), 0 if there is no forward.
    pub fn stable_percent(&self, stable_arn: &str) -> u8 {
        self.forward.as_ref().map_or(0, |f| f.stable_percent(stable_arn))
    }
}

fn is_forward(a: &Action) -> bool {
    a.r#type == Some(ActionTypeEnum::Forward)
}

fn action_snapshot(a: &Action) -> ActionSnapshot {
    let (target_groups, stickiness) = if is_forward(a) {
        let st = forward_state(a);
        (st.target_groups, st.stickiness)
    } else {
        (Vec::new(), None)
    };
    ActionSnapshot {
        action_type: a
            .r#type
            .as_ref()
            .map_or_else(|| "unknown".to_string(), |t| t.as_str().to_string()),
        order: a.order,
        target_group_arn: a.target_group_arn.clone(),
        target_groups,
        stickiness,
    }
}

/// Reads a forward action in either shape: `ForwardConfig` with groups, or only the legacy
/// `TargetGroupArn` (what DescribeListeners may return for a single-group forward).
fn forward_state(a: &Action) -> ForwardState {
    let groups: Vec<WeightedGroup> = a
        .forward_config
        .as_ref()
        .map(|fc| {
            fc.target_groups()
                .iter()
                .filter_map(|t| {
                    Some(WeightedGroup {
                        target_group_arn: t.target_group_arn.clone()?,
                        weight: t.weight,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let target_groups = if groups.is_empty() {
        a.target_group_arn
            .iter()
            .map(|arn| WeightedGroup {
                target_group_arn: arn.clone(),
                weight: None,
            })
            .collect()
    } else {
        groups
    };
    let stickiness = a
        .forward_config
        .as_ref()
        .and_then(|fc| fc.target_group_stickiness_config.as_ref())
        .map(|s| StickinessSnapshot {
            enabled: s.enabled.unwrap_or(false),
            duration_seconds: s.duration_seconds,
        });
    ForwardState {
        target_groups,
        stickiness,
    }
}

/// Whether `snap` still needs a write for target `t` (weights, or stickiness when disabling).
fn needs_write(snap: &ForwardSnapshot, t: &AlbTarget) -> bool {
    if !snap.is_fully_stable(&t.stable_target_group_arn) {
        return true;
    }
    // All weight is already on stable, but enabled stickiness still pins clients that were
    // sent to a weight-0 group until the duration expires, so Disable still has work to do.
    t.stickiness == Stickiness::Disable && snap.forward.as_ref().is_some_and(ForwardState::stickiness_enabled)
}

/// Splits 100 into weights: `stable_percent` for stable, the rest proportionally to the other
/// groups' current weights (equally if they are all 0), largest remainder first.
fn split_weights(groups: &[WeightedGroup], stable_arn: &str, stable_percent: u8) -> Vec<i32> {
    let stable_share = i64::from(stable_percent.min(100));
    let rest = 100 - stable_share;
    let others: Vec<(usize, i64)> = groups
        .iter()
        .enumerate()
        .filter(|(_, g)| g.target_group_arn != stable_arn)
        .map(|(i, g)| (i, i64::from(g.weight.unwrap_or(1).max(0))))
        .collect();
    let mut out: Vec<i64> = groups
        .iter()
        .map(|g| {
            if g.target_group_arn == stable_arn {
                stable_share
            } else {
                0
            }
        })
        .collect();
    if rest > 0 && !others.is_empty() {
        let sum: i64 = others.iter().map(|(_, w)| w).sum();
        let (sum, weights): (i64, Vec<(usize, i64)>) = if sum == 0 {
            (others.len() as i64, others.iter().map(|(i, _)| (*i, 1)).collect())
        } else {
            (sum, others)
        };
        let mut given = 0;
        let mut fractions: Vec<(i64, usize)> = Vec::with_capacity(weights.len());
        for (i, w) in &weights {
            let share = rest * w / sum;
            out[*i] = share;
            given += share;
            fractions.push((rest * w % sum, *i));
        }
        // Stable sort keeps the read order among equal remainders, so results are deterministic.
        fractions.sort_by_key(|f| std::cmp::Reverse(f.0));
        for (_, i) in fractions.into_iter().take(usize::try_from(rest - given).unwrap_or(0)) {
            out[i] += 1;
        }
    }
    out.into_iter()
        .map(|w| i32::try_from(w).unwrap_or(MAX_WEIGHT).clamp(0, MAX_WEIGHT))
        .collect()
}

/// Prepares a read action for writing back unchanged. Describe* never returns an OIDC client
/// secret, and ModifyListener/ModifyRule reject an OIDC action without one unless told to keep
/// the existing secret.
fn prepare_for_write(mut a: Action) -> Action {
    if let Some(oidc) = a.authenticate_oidc_config.as_mut() {
        if oidc.client_secret.is_none() && oidc.use_existing_client_secret.is_none() {
            oidc.use_existing_client_secret = Some(true);
        }
    }
    a
}

/// Pure: the action list to write, from the list read. Every action is kept in order; only the
/// forward's weights (stable gets `stable_percent`, the others share the rest, 0 at 100) and
/// stickiness (per `t.stickiness`) change. Other groups stay listed so the revert is visible.
pub fn plan_revert(current: &[Action], t: &AlbTarget, stable_percent: u8) -> Result<Vec<Action>, AlbError> {
    if stable_percent == 0 || stable_percent > 100 {
        return Err(AlbError::InvalidTarget {
            message: format!("stable percentage {stable_percent} is out of range 1..=100"),
        });
    }
    let forward_positions: Vec<usize> = current
        .iter()
        .enumerate()
        .filter(|(_, a)| is_forward(a))
        .map(|(i, _)| i)
        .collect();
    let idx = match forward_positions.as_slice() {
        [] => {
            return Err(AlbError::NoForwardAction {
                action_types: current.iter().map(|a| action_snapshot(a).action_type).collect(),
            })
        }
        [one] => *one,
        more => return Err(AlbError::MultipleForwardActions { count: more.len() }),
    };
    let read = forward_state(&current[idx]);
    let stable = t.stable_target_group_arn.as_str();
    if !read.target_groups.iter().any(|g| g.target_group_arn == stable) {
        return Err(AlbError::StableGroupNotInForward {
            stable_target_group_arn: stable.to_string(),
            present: read.target_groups.iter().map(|g| g.target_group_arn.clone()).collect(),
        });
    }
    let weights = split_weights(&read.target_groups, stable, stable_percent);
    let tuples: Vec<TargetGroupTuple> = read
        .target_groups
        .iter()
        .zip(weights)
        .map(|(g, w)| {
            TargetGroupTuple::builder()
                .target_group_arn(g.target_group_arn.clone())
                .weight(w)
                .build()
        })
        .collect();
    let stickiness = match t.stickiness {
        // Copy verbatim: a forward written without a stickiness config loses it.
        Stickiness::Keep => current[idx]
            .forward_config
            .as_ref()
            .and_then(|fc| fc.target_group_stickiness_config.clone()),
        Stickiness::Disable => Some(TargetGroupStickinessConfig::builder().enabled(false).build()),
    };
    let mut out: Vec<Action> = current.iter().cloned().map(prepare_for_write).collect();
    let forward = &mut out[idx];
    // With several groups, the legacy TargetGroupArn may not be sent alongside ForwardConfig;
    // ForwardConfig alone expresses every case, so always drop it.
    forward.target_group_arn = None;
    forward.forward_config = Some(
        ForwardActionConfig::builder()
            .set_target_groups(Some(tuples))
            .set_target_group_stickiness_config(stickiness)
            .build(),
    );
    Ok(out)
}

/// One target's health as seen by the pre-check.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct TargetHealthSeen {
    /// Instance ID, IP address or Lambda ARN.
    pub id: String,
    /// Target port, if any.
    pub port: Option<i32>,
    /// ELB health state (`healthy`, `unhealthy`, `unused`, ...).
    pub state: String,
    /// ELB reason code, if any.
    pub reason: Option<String>,
}

/// A notable step of a revert, for the incident's audit trail (serialize it as JSON).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum AlbStep {
    /// The action list as read before any change (or before a gradual step).
    Read {
        /// What was read.
        snapshot: ForwardSnapshot,
    },
    /// All weight already on stable (and stickiness as wanted): nothing to write.
    AlreadyStable,
    /// Result of the stable group's health pre-check.
    PreCheck {
        /// The stable target group.
        target_group_arn: String,
        /// Targets in state `healthy`.
        healthy: u32,
        /// `min_healthy_targets`.
        required: u32,
        /// Whether the revert may proceed.
        passed: bool,
        /// Count of targets per health state.
        states: BTreeMap<String, u32>,
        /// Up to 20 individual targets.
        targets: Vec<TargetHealthSeen>,
    },
    /// The action list about to be written (or that would be, in a dry run).
    Planned {
        /// Stable share of this step.
        stable_percent: u8,
        /// `ModifyListener` or `ModifyRule`.
        operation: String,
        /// Whether this is only a dry run.
        dry_run: bool,
        /// The planned action list.
        actions: ForwardSnapshot,
    },
    /// A write succeeded.
    Wrote {
        /// `ModifyListener` or `ModifyRule`.
        operation: String,
        /// Stable share written.
        stable_percent: u8,
        /// Attempt that succeeded (1-based).
        attempt: u32,
    },
    /// An AWS call failed.
    AttemptFailed {
        /// AWS operation name.
        operation: String,
        /// 1-based attempt number.
        attempt: u32,
        /// AWS error code or our own short code.
        code: String,
        /// Error message.
        message: String,
        /// Whether the error class is retryable.
        retryable: bool,
        /// Whether another attempt follows.
        will_retry: bool,
        /// Backoff before the next attempt.
        retry_in_ms: Option<u64>,
    },
    /// State read after a write, and whether it matches what was written.
    ReadBack {
        /// Stable share written.
        stable_percent: u8,
        /// What was read.
        snapshot: ForwardSnapshot,
        /// Whether weights and stickiness match the write.
        matches: bool,
    },
    /// Waiting between two gradual steps.
    Waiting {
        /// Wait in milliseconds.
        interval_ms: u64,
        /// Stable share of the next step.
        next_stable_percent: u8,
    },
}

/// How a revert ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum AlbOutcome {
    /// Written and confirmed by reading back.
    Reverted {
        /// State before the first write.
        before: ForwardSnapshot,
        /// State read back after the last write.
        after: ForwardSnapshot,
    },
    /// Nothing to do; nothing written.
    AlreadyStable {
        /// State as read.
        state: ForwardSnapshot,
    },
    /// Dry run: nothing written.
    DryRun {
        /// State as read.
        before: ForwardSnapshot,
        /// The final action list a real run would write.
        would_write: ForwardSnapshot,
    },
}

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
    /// The write succeeded but reading back shows different routing.
    #[error("write did not take: expected [{expected}], read back [{got}]")]
    WeightsDidNotTake {
        /// Routing written.
        expected: ForwardState,
        /// Routing read back.
        got: ForwardState,
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
            AlbError::WeightsDidNotTake { .. } => "WeightsDidNotTake",
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

    fn from_sdk<E>(err: SdkError<E, HttpResponse>) -> Self
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

/// Executes ALB reverts against one ELBv2 client.
#[derive(Debug, Clone)]
pub struct AlbExecutor {
    client: elbv2::Client,
    max_attempts: u32,
    initial_backoff: Duration,
}

impl AlbExecutor {
    /// Default credential chain (env, profile, web identity/IRSA, ECS, IMDS), region, optional
    /// endpoint URL; SDK's own retries OFF (max_attempts 1) because we retry ourselves so that
    /// every failed attempt is reported with its AWS error code. HTTP client built with
    /// aws-smithy-http-client's rustls-ring (one crypto provider: ring).
    pub async fn from_settings(s: &AwsSettings) -> Self {
        crate::tls::install_crypto_provider();
        use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
        let http_client = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http_client);
        if let Some(region) = &s.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(profile) = &s.profile {
            loader = loader.profile_name(profile);
        }
        let sdk_config = loader.load().await;
        // The endpoint goes on the ELBv2 client only, so the credential providers (STS, SSO)
        // keep their own endpoints.
        let mut conf = elbv2::config::Builder::from(&sdk_config);
        if let Some(url) = &s.endpoint_url {
            conf = conf.endpoint_url(url);
        }
        Self::new(elbv2::Client::from_conf(conf.build()), s)
    }

    /// Wraps an existing client (tests use static credentials): SDK retries off, and default
    /// connect/attempt timeouts where the client sets none.
    pub fn new(client: elbv2::Client, s: &AwsSettings) -> Self {
        crate::tls::install_crypto_provider();
        let mut conf = client.config().to_builder().retry_config(RetryConfig::disabled());
        // Per-attempt limits turn a hung connection into a retryable timeout; values the
        // client already has (set or explicitly disabled) win over ours.
        let mut timeouts = client
            .config()
            .timeout_config()
            .cloned()
            .unwrap_or_else(|| TimeoutConfig::builder().build());
        timeouts.take_defaults_from(
            &TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                .build(),
        );
        conf = conf.timeout_config(timeouts);
        let conf = conf.build();
        Self {
            client: elbv2::Client::from_conf(conf),
            max_attempts: s.max_attempts.max(1),
            initial_backoff: Duration::from_millis(s.initial_backoff_ms),
        }
    }

    /// Current forward state of the listener default action or the rule.
    pub async fn read(&self, t: &AlbTarget) -> Result<ForwardSnapshot, AlbError> {
        let actions = self.read_actions(t, &mut |_| {}).await?;
        Ok(ForwardSnapshot::from_actions(
            t.resource_arn(),
            t.resource_kind(),
            &actions,
        ))
    }

    /// The whole revert: read, pre-check stable health (DescribeTargetHealth: at least
    /// min_healthy_targets in state "healthy", else AlbError::PreCheckFailed with the states
    /// seen), plan, write (or not, dry_run), read back and compare (AlbError::WeightsDidNotTake
    /// if not), gradual steps with the interval if configured. `on_step` is called for every
    /// notable step so the caller can record it in the incident's audit trail.
    pub async fn revert(
        &self,
        t: &AlbTarget,
        dry_run: bool,
        on_step: &mut (dyn FnMut(AlbStep) + Send),
    ) -> Result<AlbOutcome, AlbError> {
        t.validate().map_err(|message| AlbError::InvalidTarget { message })?;
        let kind = t.resource_kind();
        let resource = t.resource_arn();
        let stable = t.stable_target_group_arn.as_str();

        let mut current = self.read_actions(t, on_step).await?;
        let before = ForwardSnapshot::from_actions(resource, kind, &current);
        on_step(AlbStep::Read {
            snapshot: before.clone(),
        });
        if !needs_write(&before, t) {
            on_step(AlbStep::AlreadyStable);
            return Ok(AlbOutcome::AlreadyStable { state: before });
        }
        // Plan the final state first: a forward without the stable group fails here, before
        // any further AWS call.
        let final_plan = plan_revert(&current, t, 100)?;
        self.precheck(t, on_step).await?;

        let start = before.stable_percent(stable);
        let steps: Vec<u8> = match &t.gradual {
            // Never move traffic back towards the canary: skip steps already exceeded.
            Some(g) => g.steps.iter().copied().filter(|&p| p == 100 || p > start).collect(),
            None => vec![100],
        };
        let interval = t.gradual.as_ref().map_or(Duration::ZERO, |g| g.interval);

        if dry_run {
            for &p in &steps {
                let plan = plan_revert(&current, t, p)?;
                on_step(AlbStep::Planned {
                    stable_percent: p,
                    operation: kind.write_operation().to_string(),
                    dry_run: true,
                    actions: ForwardSnapshot::from_actions(resource, kind, &plan),
                });
            }
            return Ok(AlbOutcome::DryRun {
                before,
                would_write: ForwardSnapshot::from_actions(resource, kind, &final_plan),
            });
        }

        let mut after = before.clone();
        for (i, &p) in steps.iter().enumerate() {
            if i > 0 {
                on_step(AlbStep::Waiting {
                    interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
                    next_stable_percent: p,
                });
                tokio::time::sleep(interval).await;
                // Re-read so changes made by someone else during the wait are not overwritten.
                current = self.read_actions(t, on_step).await?;
                let snap = ForwardSnapshot::from_actions(resource, kind, &current);
                on_step(AlbStep::Read { snapshot: snap.clone() });
                if !needs_write(&snap, t) {
                    after = snap;
                    break;
                }
                if p < 100 && snap.stable_percent(stable) >= p {
                    after = snap;
                    continue;
                }
            }
            let plan = plan_revert(&current, t, p)?;
            let expected = ForwardSnapshot::from_actions(resource, kind, &plan);
            on_step(AlbStep::Planned {
                stable_percent: p,
                operation: kind.write_operation().to_string(),
                dry_run: false,
                actions: expected.clone(),
            });
            let attempt = self.write(t, &plan, on_step).await?;
            on_step(AlbStep::Wrote {
                operation: kind.write_operation().to_string(),
                stable_percent: p,
                attempt,
            });
            let (actions, snap) = self.read_back(t, &expected, p, on_step).await?;
            current = actions;
            after = snap;
        }
        Ok(AlbOutcome::Reverted { before, after })
    }

    /// Reads the action list, refusing the default rule (only ModifyListener can change it).
    async fn read_actions(
        &self,
        t: &AlbTarget,
        on_step: &mut (dyn FnMut(AlbStep) + Send),
    ) -> Result<Vec<Action>, AlbError> {
        match &t.rule_arn {
            None => {
                let out = self
                    .retrying("DescribeListeners", on_step, || async {
                        self.client
                            .describe_listeners()
                            .listener_arns(&t.listener_arn)
                            .send()
                            .await
                            .map_err(AlbError::from_sdk)
                    })
                    .await?;
                let listener = out
                    .listeners()
                    .iter()
                    .find(|l| l.listener_arn() == Some(t.listener_arn.as_str()))
                    .ok_or_else(|| AlbError::NotFound {
                        code: "ListenerNotFound".into(),
                        message: format!("listener {} not returned by DescribeListeners", t.listener_arn),
                    })?;
                Ok(listener.default_actions().to_vec())
            }
            Some(rule_arn) => {
                let out = self
                    .retrying("DescribeRules", on_step, || async {
                        self.client
                            .describe_rules()
                            .rule_arns(rule_arn)
                            .send()
                            .await
                            .map_err(AlbError::from_sdk)
                    })
                    .await?;
                let rule = out
                    .rules()
                    .iter()
                    .find(|r| r.rule_arn() == Some(rule_arn.as_str()))
                    .ok_or_else(|| AlbError::NotFound {
                        code: "RuleNotFound".into(),
                        message: format!("rule {rule_arn} not returned by DescribeRules"),
                    })?;
                if rule.is_default() == Some(true) {
                    return Err(AlbError::InvalidTarget {
                        message: format!(
                            "rule_arn {rule_arn} is the listener's default rule, which ModifyRule cannot change: \
                         remove rule_arn to revert the listener's default action"
                        ),
                    });
                }
                Ok(rule.actions().to_vec())
            }
        }
    }

    async fn precheck(&self, t: &AlbTarget, on_step: &mut (dyn FnMut(AlbStep) + Send)) -> Result<(), AlbError> {
        let tg = t.stable_target_group_arn.as_str();
        let out = self
            .retrying("DescribeTargetHealth", on_step, || async {
                self.client
                    .describe_target_health()
                    .target_group_arn(tg)
                    .send()
                    .await
                    .map_err(AlbError::from_sdk)
            })
            .await?;
        let mut states: BTreeMap<String, u32> = BTreeMap::new();
        let mut targets = Vec::new();
        let mut healthy = 0u32;
        for d in out.target_health_descriptions() {
            let health = d.target_health();
            let state = health
                .and_then(|h| h.state())
                .map_or("unknown", |s| s.as_str())
                .to_string();
            if state == "healthy" {
                healthy += 1;
            }
            *states.entry(state.clone()).or_default() += 1;
            if targets.len() < MAX_TARGETS_REPORTED {
                targets.push(TargetHealthSeen {
                    id: d.target().and_then(|x| x.id()).unwrap_or_default().to_string(),
                    port: d.target().and_then(|x| x.port()),
                    state,
                    reason: health.and_then(|h| h.reason()).map(|r| r.as_str().to_string()),
                });
            }
        }
        let passed = healthy >= t.min_healthy_targets;
        on_step(AlbStep::PreCheck {
            target_group_arn: tg.to_string(),
            healthy,
            required: t.min_healthy_targets,
            passed,
            states: states.clone(),
            targets: targets.clone(),
        });
        if passed {
            Ok(())
        } else {
            Err(AlbError::PreCheckFailed {
                target_group_arn: tg.to_string(),
                healthy,
                required: t.min_healthy_targets,
                states,
                targets,
            })
        }
    }

    /// Writes the whole list (the APIs replace it); returns the attempt that succeeded.
    /// Retrying is safe: the same full list is written each time.
    async fn write(
        &self,
        t: &AlbTarget,
        actions: &[Action],
        on_step: &mut (dyn FnMut(AlbStep) + Send),
    ) -> Result<u32, AlbError> {
        let attempts = AtomicU32::new(0);
        let list = Some(actions.to_vec());
        match &t.rule_arn {
            None => {
                self.retrying("ModifyListener", on_step, || async {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    self.client
                        .modify_listener()
                        .listener_arn(&t.listener_arn)
                        .set_default_actions(list.clone())
                        .send()
                        .await
                        .map(|_| ())
                        .map_err(AlbError::from_sdk)
                })
                .await?;
            }
            Some(rule_arn) => {
                self.retrying("ModifyRule", on_step, || async {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    self.client
                        .modify_rule()
                        .rule_arn(rule_arn)
                        .set_actions(list.clone())
                        .send()
                        .await
                        .map(|_| ())
                        .map_err(AlbError::from_sdk)
                })
                .await?;
            }
        }
        Ok(attempts.load(Ordering::Relaxed))
    }

    async fn read_back(
        &self,
        t: &AlbTarget,
        expected: &ForwardSnapshot,
        stable_percent: u8,
        on_step: &mut (dyn FnMut(AlbStep) + Send),
    ) -> Result<(Vec<Action>, ForwardSnapshot), AlbError> {
        let want = expected.forward.clone().unwrap_or_default();
        let mut got = ForwardState::default();
        for n in 0..READBACK_ATTEMPTS {
            if n > 0 {
                tokio::time::sleep(READBACK_SPACING).await;
            }
            let actions = self.read_actions(t, on_step).await?;
            let snap = ForwardSnapshot::from_actions(t.resource_arn(), t.resource_kind(), &actions);
            got = snap.forward.clone().unwrap_or_default();
            let matches = want.same_routing(&got);
            on_step(AlbStep::ReadBack {
                stable_percent,
                snapshot: snap.clone(),
                matches,
            });
            if matches {
                return Ok((actions, snap));
            }
        }
        Err(AlbError::WeightsDidNotTake { expected: want, got })
    }

    /// Runs `op` with exponential backoff and jitter up to `max_attempts`, reporting every
    /// failed attempt (with its code and whether another follows) through `on_step`.
    async fn retrying<T, F, Fut>(
        &self,
        operation: &'static str,
        on_step: &mut (dyn FnMut(AlbStep) + Send),
        mut op: F,
    ) -> Result<T, AlbError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, AlbError>>,
    {
        let attempt = AtomicU32::new(0);
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.initial_backoff)
            .with_max_delay(MAX_BACKOFF.max(self.initial_backoff))
            .with_max_times(usize::try_from(self.max_attempts.saturating_sub(1)).unwrap_or(0))
            .with_jitter();
        let result = (|| {
            attempt.fetch_add(1, Ordering::Relaxed);
            op()
        })
        .retry(backoff)
        .when(AlbError::is_retryable)
        .notify(|e: &AlbError, delay: Duration| {
            let n = attempt.load(Ordering::Relaxed);
            tracing::warn!(operation, attempt = n, code = e.code(), error = %e, retry_in = ?delay, "ELBv2 call failed, retrying");
            on_step(AlbStep::AttemptFailed {
                operation: operation.to_string(),
                attempt: n,
                code: e.code().to_string(),
                message: e.to_string(),
                retryable: true,
                will_retry: true,
                retry_in_ms: Some(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX)),
            });
        })
        .await;
        if let Err(e) = &result {
            let n = attempt.load(Ordering::Relaxed);
            tracing::warn!(operation, attempt = n, code = e.code(), error = %e, "ELBv2 call failed, giving up");
            on_step(AlbStep::AttemptFailed {
                operation: operation.to_string(),
                attempt: n,
                code: e.code().to_string(),
                message: e.to_string(),
                retryable: e.is_retryable(),
                will_retry: false,
                retry_in_ms: None,
            });
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use elbv2::types::{AuthenticateOidcActionConfig, FixedResponseActionConfig};

    const LISTENER: &str =
        "arn:aws:elasticloadbalancing:us-east-1:123456789012:listener/app/lb/50dc6c495c0c9188/f2f7dc8efc522ab2";
    const RULE: &str = "arn:aws:elasticloadbalancing:us-east-1:123456789012:listener-rule/app/lb/50dc6c495c0c9188/f2f7dc8efc522ab2/9683b2d02a6cabee";
    const STABLE: &str = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/stable/73e2d6bc24d8a067";
    const CANARY: &str = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/canary/2453ed029918f21f";
    const OTHER: &str = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/other/1111ed029918f21f";

    fn target() -> AlbTarget {
        AlbTarget {
            listener_arn: LISTENER.into(),
            rule_arn: None,
            stable_target_group_arn: STABLE.into(),
            stickiness: Stickiness::Keep,
            min_healthy_targets: 1,
            gradual: None,
        }
    }

    fn tuple(arn: &str, w: i32) -> TargetGroupTuple {
        TargetGroupTuple::builder().target_group_arn(arn).weight(w).build()
    }

    fn weighted(groups: &[(&str, i32)], sticky: Option<(bool, Option<i32>)>) -> Action {
        let mut fc = ForwardActionConfig::builder();
        for (arn, w) in groups {
            fc = fc.target_groups(tuple(arn, *w));
        }
        if let Some((enabled, dur)) = sticky {
            fc = fc.target_group_stickiness_config(
                TargetGroupStickinessConfig::builder()
                    .enabled(enabled)
                    .set_duration_seconds(dur)
                    .build(),
            );
        }
        Action::builder()
            .r#type(ActionTypeEnum::Forward)
            .forward_config(fc.build())
            .build()
    }

    fn legacy(arn: &str) -> Action {
        Action::builder()
            .r#type(ActionTypeEnum::Forward)
            .target_group_arn(arn)
            .build()
    }

    fn weights_of(a: &Action) -> Vec<(String, Option<i32>)> {
        forward_state(a)
            .target_groups
            .into_iter()
            .map(|g| (g.target_group_arn, g.weight))
            .collect()
    }

    fn stickiness_of(a: &Action) -> Option<TargetGroupStickinessConfig> {
        a.forward_config
            .as_ref()
            .and_then(|f| f.target_group_stickiness_config.clone())
    }

    #[test]
    fn plan_moves_all_weight_to_stable_and_keeps_others_at_zero() {
        let current = vec![weighted(&[(STABLE, 75), (CANARY, 25)], None)];
        let out = plan_revert(&current, &target(), 100).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(
            weights_of(&out[0]),
            vec![(STABLE.to_string(), Some(100)), (CANARY.to_string(), Some(0))]
        );
        assert_eq!(out[0].target_group_arn, None);
    }

    #[test]
    fn plan_drops_legacy_arn_from_a_multi_group_forward() {
        let mut a = weighted(&[(CANARY, 50), (STABLE, 50)], None);
        a.target_group_arn = Some(CANARY.into());
        let out = plan_revert(&[a], &target(), 100).unwrap();
        assert_eq!(out[0].target_group_arn, None);
        // Order of the groups as read is kept.
        assert_eq!(
            weights_of(&out[0]),
            vec![(CANARY.to_string(), Some(0)), (STABLE.to_string(), Some(100))]
        );
    }

    #[test]
    fn plan_reads_the_legacy_single_group_shape() {
        let out = plan_revert(&[legacy(STABLE)], &target(), 100).unwrap();
        assert_eq!(out[0].target_group_arn, None);
        assert_eq!(weights_of(&out[0]), vec![(STABLE.to_string(), Some(100))]);
        let snap = ForwardSnapshot::from_actions(LISTENER, ResourceKind::ListenerDefaultActions, &[legacy(STABLE)]);
        assert!(snap.is_fully_stable(STABLE));
        let err = plan_revert(&[legacy(CANARY)], &target(), 100).unwrap_err();
        assert!(
            matches!(err, AlbError::StableGroupNotInForward { ref present, .. } if present == &vec![CANARY.to_string()])
        );
    }

    #[test]
    fn plan_gradual_step_shares_the_rest_proportionally() {
        let current = vec![weighted(&[(STABLE, 10), (CANARY, 60), (OTHER, 30)], None)];
        let out = plan_revert(&current, &target(), 50).unwrap();
        assert_eq!(
            weights_of(&out[0]),
            vec![
                (STABLE.to_string(), Some(50)),
                (CANARY.to_string(), Some(33)),
                (OTHER.to_string(), Some(17)),
            ]
        );
        // Others all at 0 (odd state): the rest is shared equally, total stays 100.
        let current = vec![weighted(&[(STABLE, 0), (CANARY, 0), (OTHER, 0)], None)];
        let out = plan_revert(&current, &target(), 33).unwrap();
        let ws: Vec<i32> = weights_of(&out[0]).into_iter().filter_map(|(_, w)| w).collect();
        assert_eq!(ws, vec![33, 34, 33]);
    }

    #[test]
    fn plan_weights_stay_in_range() {
        for p in 1..=100u8 {
            let current = vec![weighted(&[(CANARY, 999), (STABLE, 1), (OTHER, 7)], None)];
            let out = plan_revert(&current, &target(), p).unwrap();
            let ws: Vec<i32> = weights_of(&out[0]).into_iter().filter_map(|(_, w)| w).collect();
            assert!(ws.iter().all(|w| (0..=MAX_WEIGHT).contains(w)), "{ws:?}");
            assert_eq!(ws.iter().sum::<i32>(), 100);
            assert_eq!(ws[1], i32::from(p));
        }
        assert!(matches!(
            plan_revert(&[weighted(&[(STABLE, 1)], None)], &target(), 0),
            Err(AlbError::InvalidTarget { .. })
        ));
        assert!(matches!(
            plan_revert(&[weighted(&[(STABLE, 1)], None)], &target(), 101),
            Err(AlbError::InvalidTarget { .. })
        ));
    }

    #[test]
    fn plan_keeps_stickiness_verbatim() {
        let current = vec![weighted(&[(STABLE, 75), (CANARY, 25)], Some((true, Some(300))))];
        let out = plan_revert(&current, &target(), 100).unwrap();
        assert_eq!(stickiness_of(&out[0]), stickiness_of(&current[0]));
        let none = vec![weighted(&[(STABLE, 75), (CANARY, 25)], None)];
        assert_eq!(stickiness_of(&plan_revert(&none, &target(), 100).unwrap()[0]), None);
    }

    #[test]
    fn plan_disables_stickiness_when_asked() {
        let current = vec![weighted(&[(STABLE, 75), (CANARY, 25)], Some((true, Some(300))))];
        let t = AlbTarget {
            stickiness: Stickiness::Disable,
            ..target()
        };
        let out = plan_revert(&current, &t, 100).unwrap();
        let s = stickiness_of(&out[0]).unwrap();
        assert_eq!(s.enabled, Some(false));
    }

    #[test]
    fn plan_preserves_other_actions_in_order() {
        let oidc = Action::builder()
            .r#type(ActionTypeEnum::AuthenticateOidc)
            .order(1)
            .authenticate_oidc_config(
                AuthenticateOidcActionConfig::builder()
                    .issuer("https://issuer")
                    .authorization_endpoint("https://auth")
                    .token_endpoint("https://token")
                    .user_info_endpoint("https://userinfo")
                    .client_id("client")
                    .build(),
            )
            .build();
        let mut fwd = weighted(&[(STABLE, 1), (CANARY, 1)], Some((true, Some(60))));
        fwd.order = Some(2);
        let current = vec![oidc.clone(), fwd];
        let out = plan_revert(&current, &target(), 100).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].r#type, Some(ActionTypeEnum::AuthenticateOidc));
        assert_eq!(out[0].order, Some(1));
        // Describe never returns the secret, so writing back must keep the existing one.
        let cfg = out[0].authenticate_oidc_config.as_ref().unwrap();
        assert_eq!(cfg.use_existing_client_secret, Some(true));
        assert_eq!(cfg.issuer, oidc.authenticate_oidc_config.as_ref().unwrap().issuer);
        assert_eq!(out[1].order, Some(2));
        assert_eq!(
            weights_of(&out[1]),
            vec![(STABLE.to_string(), Some(100)), (CANARY.to_string(), Some(0))]
        );
    }

    #[test]
    fn plan_errors_without_a_usable_forward() {
        let fixed = Action::builder()
            .r#type(ActionTypeEnum::FixedResponse)
            .fixed_response_config(FixedResponseActionConfig::builder().status_code("503").build())
            .build();
        let err = plan_revert(&[fixed], &target(), 100).unwrap_err();
        assert_eq!(
            err,
            AlbError::NoForwardAction {
                action_types: vec!["fixed-response".into()]
            }
        );
        let err = plan_revert(&[weighted(&[(CANARY, 1), (OTHER, 1)], None)], &target(), 100).unwrap_err();
        assert_eq!(err.code(), "StableGroupNotInForward");
        let two = vec![weighted(&[(STABLE, 1)], None), weighted(&[(STABLE, 1)], None)];
        assert_eq!(
            plan_revert(&two, &target(), 100).unwrap_err(),
            AlbError::MultipleForwardActions { count: 2 }
        );
    }

    #[test]
    fn is_fully_stable_cases() {
        let snap = |a: Action| ForwardSnapshot::from_actions(LISTENER, ResourceKind::ListenerDefaultActions, &[a]);
        assert!(snap(weighted(&[(STABLE, 100), (CANARY, 0)], None)).is_fully_stable(STABLE));
        assert!(snap(weighted(&[(STABLE, 1)], None)).is_fully_stable(STABLE));
        assert!(!snap(weighted(&[(STABLE, 99), (CANARY, 1)], None)).is_fully_stable(STABLE));
        assert!(!snap(weighted(&[(STABLE, 0), (CANARY, 0)], None)).is_fully_stable(STABLE));
        assert!(!snap(weighted(&[(CANARY, 100)], None)).is_fully_stable(STABLE));
        assert!(!snap(legacy(CANARY)).is_fully_stable(STABLE));
        let no_forward = ForwardSnapshot::from_actions(LISTENER, ResourceKind::ListenerDefaultActions, &[]);
        assert!(!no_forward.is_fully_stable(STABLE));
    }

    #[test]
    fn disable_still_writes_when_stable_but_sticky() {
        let snap = ForwardSnapshot::from_actions(
            LISTENER,
            ResourceKind::ListenerDefaultActions,
            &[weighted(&[(STABLE, 100), (CANARY, 0)], Some((true, Some(300))))],
        );
        assert!(!needs_write(&snap, &target()));
        let disable = AlbTarget {
            stickiness: Stickiness::Disable,
            ..target()
        };
        assert!(needs_write(&snap, &disable));
    }

    #[test]
    fn same_routing_compares_shares_and_stickiness() {
        let st = |groups: &[(&str, Option<i32>)], sticky: Option<(bool, Option<i32>)>| ForwardState {
            target_groups: groups
                .iter()
                .map(|(a, w)| WeightedGroup {
                    target_group_arn: a.to_string(),
                    weight: *w,
                })
                .collect(),
            stickiness: sticky.map(|(enabled, duration_seconds)| StickinessSnapshot {
                enabled,
                duration_seconds,
            }),
        };
        let a = st(&[(STABLE, Some(100)), (CANARY, Some(0))], None);
        assert!(a.same_routing(&st(&[(CANARY, Some(0)), (STABLE, Some(1))], Some((false, None)))));
        assert!(!a.same_routing(&st(&[(STABLE, Some(50)), (CANARY, Some(50))], None)));
        assert!(!a.same_routing(&st(&[(STABLE, Some(100))], None)));
        assert!(st(&[(STABLE, Some(100))], None).same_routing(&st(&[(STABLE, None)], None)));
        let sticky = st(&[(STABLE, Some(1))], Some((true, Some(300))));
        assert!(!sticky.same_routing(&st(&[(STABLE, Some(1))], Some((true, Some(60))))));
        assert!(!sticky.same_routing(&st(&[(STABLE, Some(1))], None)));
    }

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

    #[test]
    fn target_validation() {
        assert_eq!(target().validate(), Ok(()));
        let with_rule = AlbTarget {
            rule_arn: Some(RULE.into()),
            ..target()
        };
        assert_eq!(with_rule.validate(), Ok(()));
        assert_eq!(with_rule.key(), format!("alb:{RULE}"));
        assert_eq!(target().key(), format!("alb:{LISTENER}"));

        let foreign_rule = AlbTarget {
            rule_arn: Some(RULE.replace("f2f7dc8efc522ab2", "0000000000000000")),
            ..target()
        };
        assert!(foreign_rule.validate().unwrap_err().contains("does not belong"));
        let bad = AlbTarget {
            listener_arn: STABLE.into(),
            ..target()
        };
        assert!(bad.validate().unwrap_err().starts_with("listener_arn"));
        let bad = AlbTarget {
            stable_target_group_arn: "stable".into(),
            ..target()
        };
        assert!(bad.validate().unwrap_err().starts_with("stable_target_group_arn"));
        let bad = AlbTarget {
            stable_target_group_arn: format!(" {STABLE}"),
            ..target()
        };
        assert!(bad.validate().unwrap_err().contains("whitespace"));
        let bad = AlbTarget {
            min_healthy_targets: 0,
            ..target()
        };
        assert!(bad.validate().unwrap_err().starts_with("min_healthy_targets"));
        let bad = AlbTarget {
            gradual: Some(GradualShift {
                steps: vec![50],
                interval: Duration::from_secs(1),
            }),
            ..target()
        };
        assert!(bad.validate().unwrap_err().contains("100"));
    }

    #[test]
    fn gradual_validation() {
        let g = |steps: Vec<u8>, secs: u64| GradualShift {
            steps,
            interval: Duration::from_secs(secs),
        };
        assert_eq!(g(vec![50, 100], 30).validate(), Ok(()));
        assert_eq!(g(vec![100], 30).validate(), Ok(()));
        assert!(g(vec![], 30).validate().unwrap_err().contains("empty"));
        assert!(g(vec![50, 50, 100], 30)
            .validate()
            .unwrap_err()
            .contains("strictly increasing"));
        assert!(g(vec![80, 50, 100], 30)
            .validate()
            .unwrap_err()
            .contains("strictly increasing"));
        assert!(g(vec![0, 100], 30).validate().unwrap_err().contains("1 to 100"));
        assert!(g(vec![101], 30).validate().unwrap_err().contains("1 to 100"));
        assert!(g(vec![25, 50], 30)
            .validate()
            .unwrap_err()
            .contains("last step must be 100"));
        assert!(g(vec![50, 100], 0).validate().unwrap_err().contains("interval"));
        assert!(g(vec![50, 100], 7200).validate().unwrap_err().contains("interval"));
    }

    #[test]
    fn policy_deserialization_is_strict_with_defaults() {
        let t: AlbTarget = serde_json::from_value(serde_json::json!({
            "listener_arn": LISTENER,
            "stable_target_group_arn": STABLE,
            "gradual": {"steps": [50, 100], "interval": "30s"}
        }))
        .unwrap();
        assert_eq!(t.stickiness, Stickiness::Keep);
        assert_eq!(t.min_healthy_targets, 1);
        assert_eq!(t.gradual.as_ref().unwrap().interval, Duration::from_secs(30));
        let t: AlbTarget = serde_json::from_value(serde_json::json!({
            "listener_arn": LISTENER,
            "stable_target_group_arn": STABLE,
            "stickiness": "disable"
        }))
        .unwrap();
        assert_eq!(t.stickiness, Stickiness::Disable);
        assert!(serde_json::from_value::<AlbTarget>(serde_json::json!({
            "listener_arn": LISTENER,
            "stable_target_group_arn": STABLE,
            "weight": 3
        }))
        .is_err());
        let s: AwsSettings = serde_json::from_value(serde_json::json!({"region": "eu-west-1"})).unwrap();
        assert_eq!(s.max_attempts, 4);
        assert_eq!(s.initial_backoff_ms, 200);
        assert!(serde_json::from_value::<AwsSettings>(serde_json::json!({"retries": 3})).is_err());
    }

    #[test]
    fn steps_and_outcomes_serialize() {
        let snap = ForwardSnapshot::from_actions(
            LISTENER,
            ResourceKind::ListenerDefaultActions,
            &[weighted(&[(STABLE, 75), (CANARY, 25)], Some((true, Some(300))))],
        );
        let v = serde_json::to_value(AlbStep::Read { snapshot: snap.clone() }).unwrap();
        assert_eq!(v["step"], "read");
        assert_eq!(v["snapshot"]["actions"][0]["type"], "forward");
        assert_eq!(v["snapshot"]["forward"]["stickiness"]["duration_seconds"], 300);
        let v = serde_json::to_value(AlbOutcome::AlreadyStable { state: snap }).unwrap();
        assert_eq!(v["outcome"], "already_stable");
        let v = serde_json::to_value(AlbError::from_code("Throttling", "slow down", Some(400))).unwrap();
        assert_eq!(v["error"], "aws");
        assert_eq!(v["retryable"], true);
    }

    #[test]
    fn new_turns_sdk_retries_off_and_fills_timeouts() {
        let client = elbv2::Client::from_conf(
            elbv2::Config::builder()
                .behavior_version(elbv2::config::BehaviorVersion::latest())
                .region(elbv2::config::Region::new("us-east-1"))
                .retry_config(RetryConfig::standard().with_max_attempts(5))
                .timeout_config(TimeoutConfig::builder().connect_timeout(Duration::from_secs(1)).build())
                .build(),
        );
        let exec = AlbExecutor::new(client, &AwsSettings::default());
        let conf = exec.client.config();
        assert_eq!(conf.retry_config().map(|r| r.max_attempts()), Some(1));
        let timeouts = conf.timeout_config().unwrap();
        assert_eq!(timeouts.connect_timeout(), Some(Duration::from_secs(1)));
        assert_eq!(timeouts.operation_attempt_timeout(), Some(ATTEMPT_TIMEOUT));
        assert_eq!(exec.max_attempts, 4);
        assert_eq!(exec.initial_backoff, Duration::from_millis(200));
    }

    #[test]
    fn revert_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let client = elbv2::Client::from_conf(
            elbv2::Config::builder()
                .behavior_version(elbv2::config::BehaviorVersion::latest())
                .region(elbv2::config::Region::new("us-east-1"))
                .build(),
        );
        let exec = AlbExecutor::new(client, &AwsSettings::default());
        let t = target();
        let mut sink = |_: AlbStep| {};
        let fut = exec.revert(&t, true, &mut sink);
        assert_send(&fut);
    }
}
