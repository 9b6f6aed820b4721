//! Pure planning of an ALB revert: reading an action list into snapshots, deciding whether a
//! write is needed, and the action list to write for a stable share (weights and stickiness).
//! No I/O: the executor reads and writes, this decides what.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use aws_sdk_elasticloadbalancingv2::types::{
    Action, ActionTypeEnum, ForwardActionConfig, TargetGroupStickinessConfig, TargetGroupTuple,
};
use serde::{Deserialize, Serialize};

use super::{AlbError, AlbTarget, Scope, Stickiness};

/// Largest weight ELBv2 accepts in a `TargetGroupTuple`.
pub const MAX_WEIGHT: i32 = 999;

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
    pub(super) fn write_operation(self) -> &'static str {
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
    pub(super) fn stickiness_enabled(&self) -> bool {
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
    pub(super) fn same_routing(&self, other: &ForwardState) -> bool {
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

pub(super) fn is_forward(a: &Action) -> bool {
    a.r#type == Some(ActionTypeEnum::Forward)
}

pub(super) fn action_snapshot(a: &Action) -> ActionSnapshot {
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
pub(super) fn forward_state(a: &Action) -> ForwardState {
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
pub(super) fn needs_write(snap: &ForwardSnapshot, t: &AlbTarget) -> bool {
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

/// Which API writes `t`'s action list: ModifyRule for a rule, ModifyListener otherwise.
pub fn resource_kind(t: &AlbTarget) -> ResourceKind {
    if t.rule_arn.is_some() {
        ResourceKind::Rule
    } else {
        ResourceKind::ListenerDefaultActions
    }
}

/// One action list a revert rewrites: the listener's default actions or one rule's actions.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Resource {
    /// Listener ARN (default actions) or rule ARN.
    pub arn: String,
    /// Which API writes it.
    pub kind: ResourceKind,
}

impl Resource {
    /// The one action list of a `scope: one` target.
    pub fn of(t: &AlbTarget) -> Resource {
        Resource {
            arn: t.resource_arn().to_string(),
            kind: resource_kind(t),
        }
    }

    /// `the default action of <listener>` or `rule <arn>`, for people.
    pub fn describe(&self) -> String {
        match self.kind {
            ResourceKind::ListenerDefaultActions => format!("the default action of {}", self.arn),
            ResourceKind::Rule => format!("rule {}", self.arn),
        }
    }
}

/// The groups a `scope: listener` revert takes traffic from: the policy's list, or else every
/// group other than the stable one that shares a forward with it.
pub fn canary_groups(t: &AlbTarget, lists: &[(Resource, Vec<Action>)]) -> BTreeSet<String> {
    if !t.canary_target_group_arns.is_empty() {
        return t.canary_target_group_arns.iter().cloned().collect();
    }
    sharing_stable(t, lists)
}

/// Every group other than the stable one that shares a forward with it.
fn sharing_stable(t: &AlbTarget, lists: &[(Resource, Vec<Action>)]) -> BTreeSet<String> {
    let stable = t.stable_target_group_arn.as_str();
    lists
        .iter()
        .flat_map(|(_, actions)| actions.iter().filter(|a| is_forward(a)).map(forward_state))
        .filter(|f| f.target_groups.iter().any(|g| g.target_group_arn == stable))
        .flat_map(|f| f.target_groups.into_iter().map(|g| g.target_group_arn))
        .filter(|arn| arn != stable)
        .collect()
}

/// Pure: which of the listener's action lists a `scope: listener` revert rewrites, in the
/// order given (default action first, then rules by priority): every list with a forward that
/// names a canary group. A `scope: one` target has exactly its own list. When no canary can be
/// derived because no forward names the stable group, that is an error, not "nothing to do":
/// the stable ARN is most likely wrong.
pub fn in_scope(t: &AlbTarget, lists: &[(Resource, Vec<Action>)]) -> Result<Vec<Resource>, AlbError> {
    if t.scope == Scope::One {
        return Ok(vec![Resource::of(t)]);
    }
    let canaries = canary_groups(t, lists);
    let groups = |actions: &[Action]| -> Vec<String> {
        actions
            .iter()
            .filter(|a| is_forward(a))
            .flat_map(|a| forward_state(a).target_groups)
            .map(|g| g.target_group_arn)
            .collect()
    };
    if canaries.is_empty()
        && !lists
            .iter()
            .any(|(_, a)| groups(a).contains(&t.stable_target_group_arn))
    {
        let present: BTreeSet<String> = lists.iter().flat_map(|(_, a)| groups(a)).collect();
        return Err(AlbError::StableGroupNotInForward {
            stable_target_group_arn: t.stable_target_group_arn.clone(),
            present: present.into_iter().collect(),
        });
    }
    // Named canaries that match no forward are most likely last release's (a stale ARN):
    // an empty scope would then be reported "already reverted" while the current canary
    // still takes traffic. Only a listener where nothing shares a forward with the stable
    // group is truly all-stable.
    let present: BTreeSet<String> = lists.iter().flat_map(|(_, a)| groups(a)).collect();
    if !t.canary_target_group_arns.is_empty() && canaries.is_disjoint(&present) {
        let sharing = sharing_stable(t, lists);
        if !sharing.is_empty() {
            return Err(AlbError::InvalidTarget {
                message: format!(
                    "none of canary_target_group_arns {:?} is in any forward of listener {}; \
                     the groups sharing a forward with the stable group are {:?}: \
                     list the current canary in canary_target_group_arns (or leave it empty)",
                    t.canary_target_group_arns,
                    t.listener_arn,
                    sharing.into_iter().collect::<Vec<_>>()
                ),
            });
        }
    }
    Ok(lists
        .iter()
        .filter(|(_, actions)| groups(actions).iter().any(|g| canaries.contains(g)))
        .map(|(r, _)| r.clone())
        .collect())
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
