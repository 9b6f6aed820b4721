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
mod tests {
    use super::*;
    use aws_sdk_elasticloadbalancingv2::types::{AuthenticateOidcActionConfig, FixedResponseActionConfig};

    use crate::policy::target::alb::example::{target, LISTENER, STABLE};

    const CANARY: &str = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/canary/2453ed029918f21f";
    const OTHER: &str = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/other/1111ed029918f21f";

    fn fixed() -> Action {
        Action::builder()
            .r#type(ActionTypeEnum::FixedResponse)
            .fixed_response_config(FixedResponseActionConfig::builder().status_code("404").build())
            .build()
    }

    fn list(arn: &str, kind: ResourceKind, actions: Vec<Action>) -> (Resource, Vec<Action>) {
        (Resource { arn: arn.into(), kind }, actions)
    }

    #[test]
    fn listener_scope_takes_every_forward_naming_a_canary_and_nothing_else() {
        let t = AlbTarget {
            scope: Scope::Listener,
            ..target()
        };
        let lists = vec![
            list(
                LISTENER,
                ResourceKind::ListenerDefaultActions,
                vec![weighted(&[(STABLE, 75), (CANARY, 25)], None)],
            ),
            list(
                "rule/files",
                ResourceKind::Rule,
                vec![weighted(&[(STABLE, 50), (CANARY, 50)], None)],
            ),
            list("rule/admin", ResourceKind::Rule, vec![weighted(&[(OTHER, 1)], None)]),
            list("rule/gone", ResourceKind::Rule, vec![fixed()]),
            list("rule/canary-only", ResourceKind::Rule, vec![legacy(CANARY)]),
        ];
        assert_eq!(canary_groups(&t, &lists), BTreeSet::from([CANARY.to_string()]));
        let arns: Vec<String> = in_scope(&t, &lists).unwrap().into_iter().map(|r| r.arn).collect();
        assert_eq!(arns, vec![LISTENER, "rule/files", "rule/canary-only"]);

        // Named canaries: only forwards naming them, even where the stable group is absent.
        let named = AlbTarget {
            canary_target_group_arns: vec![OTHER.into()],
            ..t.clone()
        };
        let arns: Vec<String> = in_scope(&named, &lists).unwrap().into_iter().map(|r| r.arn).collect();
        assert_eq!(arns, vec!["rule/admin"]);

        // A scope-one target is its own list, whatever the listener holds.
        assert_eq!(in_scope(&target(), &lists).unwrap(), vec![Resource::of(&target())]);
    }

    #[test]
    fn listener_scope_without_the_stable_group_anywhere_is_an_error_not_a_no_op() {
        let t = AlbTarget {
            scope: Scope::Listener,
            ..target()
        };
        let lists = vec![list(
            LISTENER,
            ResourceKind::ListenerDefaultActions,
            vec![weighted(&[(OTHER, 1), (CANARY, 1)], None)],
        )];
        assert!(matches!(
            in_scope(&t, &lists),
            Err(AlbError::StableGroupNotInForward { .. })
        ));
        // Stable present but already alone: nothing sends traffic to a canary.
        let lists = vec![list(
            LISTENER,
            ResourceKind::ListenerDefaultActions,
            vec![weighted(&[(STABLE, 1)], None)],
        )];
        assert_eq!(in_scope(&t, &lists).unwrap(), Vec::<Resource>::new());
    }

    #[test]
    fn a_named_canary_in_no_forward_is_an_error_naming_the_groups_that_share_one() {
        let named = AlbTarget {
            scope: Scope::Listener,
            canary_target_group_arns: vec![OTHER.into()],
            ..target()
        };
        // Last release's canary is named; this release's takes 25 %.
        let lists = vec![list(
            LISTENER,
            ResourceKind::ListenerDefaultActions,
            vec![weighted(&[(STABLE, 75), (CANARY, 25)], None)],
        )];
        let Err(AlbError::InvalidTarget { message }) = in_scope(&named, &lists) else {
            panic!("expected InvalidTarget: {:?}", in_scope(&named, &lists));
        };
        assert!(message.contains(OTHER) && message.contains(CANARY), "{message}");
        // Nothing shares a forward with stable: truly all-stable, an empty scope.
        let lists = vec![list(
            LISTENER,
            ResourceKind::ListenerDefaultActions,
            vec![weighted(&[(STABLE, 1)], None)],
        )];
        assert_eq!(in_scope(&named, &lists).unwrap(), Vec::<Resource>::new());
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
    pub(super) fn same_routing_compares_shares_and_stickiness() {
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
}
