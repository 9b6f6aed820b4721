//! `scope: listener`: what a revert knows about the listener around one action list, read once
//! per revert: the canary groups and, for each, the other groups it shares a forward with (its
//! stable partners). With it, a forward that sends traffic only to a canary (a header- or
//! cookie-based canary rule, `X-Canary: 1` -> canary 100 %) is reverted like any other: the
//! stable group is added to its forward at weight 0 and planned as read, so the rule keeps its
//! conditions and ends at 100 % stable. Pure: the executor reads and writes.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_elasticloadbalancingv2::types::{Action, ForwardActionConfig, TargetGroupTuple};

use super::plan::{canary_groups, forward_state, is_forward};
use super::{AlbError, AlbTarget, Resource};

/// The canaries of a `scope: listener` revert and the partners each has on the listener.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct ListenerView {
    canaries: BTreeSet<String>,
    /// Canary -> the groups other than canaries it shares a forward with.
    partners: BTreeMap<String, BTreeSet<String>>,
}

/// A canary-only forward with the stable group added: the action list to plan from, and the
/// canary groups it forwarded to.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct WithStable {
    pub actions: Vec<Action>,
    pub canaries: Vec<String>,
}

impl ListenerView {
    /// From every action list of the listener, as read for the revert.
    pub(super) fn of(t: &AlbTarget, lists: &[(Resource, Vec<Action>)]) -> ListenerView {
        let canaries = canary_groups(t, lists);
        let mut partners: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for f in lists
            .iter()
            .flat_map(|(_, actions)| actions.iter().filter(|a| is_forward(a)).map(forward_state))
        {
            let groups: Vec<&str> = f.target_groups.iter().map(|g| g.target_group_arn.as_str()).collect();
            for c in groups.iter().filter(|g| canaries.contains(**g)) {
                partners.entry((*c).to_string()).or_default().extend(
                    groups
                        .iter()
                        .filter(|g| !canaries.contains(**g))
                        .map(|g| (*g).to_string()),
                );
            }
        }
        ListenerView { canaries, partners }
    }

    /// A forward of `r` that names no stable group but canaries only: the action list with
    /// the stable group added to that forward at weight 0 (what to plan from; the canaries
    /// keep their weights as read and the other actions stay as they are), and the canaries.
    /// `Ok(None)`: nothing to add (the forward names the stable group, or there is no single
    /// forward, which planning reports). An error names the rule and why the stable group
    /// cannot take its traffic: the forward also sends traffic to a group that is neither
    /// stable nor a canary, or its canary is paired elsewhere on the listener with another
    /// group and never with the stable one (forwarding it to ours could hand one service's
    /// traffic to another).
    pub(super) fn add_stable(
        &self,
        t: &AlbTarget,
        r: &Resource,
        current: &[Action],
    ) -> Result<Option<WithStable>, AlbError> {
        let stable = t.stable_target_group_arn.as_str();
        let positions: Vec<usize> = (0..current.len()).filter(|&i| is_forward(&current[i])).collect();
        let [idx] = positions.as_slice() else {
            return Ok(None);
        };
        let read = forward_state(&current[*idx]);
        if read.target_groups.is_empty() || read.target_groups.iter().any(|g| g.target_group_arn == stable) {
            return Ok(None);
        }
        let (canaries, others): (Vec<String>, Vec<String>) = read
            .target_groups
            .iter()
            .map(|g| g.target_group_arn.clone())
            .partition(|g| self.canaries.contains(g));
        if canaries.is_empty() {
            return Ok(None);
        }
        let refuse = |reason: String| AlbError::CanaryForwardWithoutStable {
            resource: r.clone(),
            canary_target_groups: canaries.clone(),
            stable_target_group_arn: stable.to_string(),
            reason,
        };
        if !others.is_empty() {
            return Err(refuse(format!(
                "it also forwards to {}, which is neither the stable group nor a canary, so which group should \
                 take the canary's share cannot be derived: revert this rule by hand, or list that group in \
                 canary_target_group_arns",
                others.join(", ")
            )));
        }
        for c in &canaries {
            let paired = self.partners.get(c).cloned().unwrap_or_default();
            if !paired.is_empty() && !paired.contains(stable) {
                return Err(refuse(format!(
                    "canary group {c} shares a forward elsewhere on this listener with {} and never with the \
                     stable group, so its stable partner is not the configured one: revert this rule by hand, or \
                     remove {c} from canary_target_group_arns",
                    paired.into_iter().collect::<Vec<_>>().join(", ")
                )));
            }
        }
        let mut tuples: Vec<TargetGroupTuple> = read
            .target_groups
            .iter()
            .map(|g| {
                TargetGroupTuple::builder()
                    .target_group_arn(g.target_group_arn.clone())
                    .set_weight(g.weight)
                    .build()
            })
            .collect();
        tuples.push(TargetGroupTuple::builder().target_group_arn(stable).weight(0).build());
        let mut adopted = current.to_vec();
        let forward = &mut adopted[*idx];
        let stickiness = forward
            .forward_config
            .as_ref()
            .and_then(|fc| fc.target_group_stickiness_config.clone());
        forward.target_group_arn = None;
        forward.forward_config = Some(
            ForwardActionConfig::builder()
                .set_target_groups(Some(tuples))
                .set_target_group_stickiness_config(stickiness)
                .build(),
        );
        Ok(Some(WithStable {
            actions: adopted,
            canaries,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::alb::{plan_revert, ResourceKind, Scope};
    use crate::policy::target::alb::example::{target, LISTENER, STABLE};
    use aws_sdk_elasticloadbalancingv2::types::ActionTypeEnum;

    const CANARY: &str = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/canary/2453ed029918f21f";
    const OTHER_STABLE: &str = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/b-stable/1111";
    const OTHER_CANARY: &str = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/b-canary/2222";

    fn weighted(groups: &[(&str, i32)]) -> Action {
        let mut fc = ForwardActionConfig::builder();
        for (arn, w) in groups {
            fc = fc.target_groups(TargetGroupTuple::builder().target_group_arn(*arn).weight(*w).build());
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

    fn rule(arn: &str) -> Resource {
        Resource {
            arn: arn.into(),
            kind: ResourceKind::Rule,
        }
    }

    fn listener_lists(header_rule: Action) -> Vec<(Resource, Vec<Action>)> {
        vec![
            (
                Resource {
                    arn: LISTENER.into(),
                    kind: ResourceKind::ListenerDefaultActions,
                },
                vec![weighted(&[(STABLE, 75), (CANARY, 25)])],
            ),
            (rule("rule/header"), vec![header_rule]),
            (
                rule("rule/b"),
                vec![weighted(&[(OTHER_STABLE, 90), (OTHER_CANARY, 10)])],
            ),
        ]
    }

    fn listener() -> AlbTarget {
        AlbTarget {
            scope: Scope::Listener,
            ..target()
        }
    }

    #[test]
    fn a_canary_only_forward_gets_the_stable_group_and_plans_to_100_stable() {
        let t = listener();
        for header_rule in [weighted(&[(CANARY, 100)]), legacy(CANARY)] {
            let lists = listener_lists(header_rule.clone());
            let view = ListenerView::of(&t, &lists);
            let WithStable {
                actions: adopted,
                canaries,
            } = view
                .add_stable(&t, &rule("rule/header"), &lists[1].1)
                .unwrap()
                .expect("stable added");
            assert_eq!(canaries, vec![CANARY.to_string()]);
            let planned = plan_revert(&adopted, &t, 100).unwrap();
            let groups: Vec<(String, Option<i32>)> = forward_state(&planned[0])
                .target_groups
                .into_iter()
                .map(|g| (g.target_group_arn, g.weight))
                .collect();
            assert_eq!(
                groups,
                vec![(CANARY.to_string(), Some(0)), (STABLE.to_string(), Some(100))]
            );
            // A gradual step shares the rest with the canary.
            let half = plan_revert(&adopted, &t, 50).unwrap();
            assert_eq!(forward_state(&half[0]).target_groups[1].weight, Some(50));
            // The forwards naming the stable group are planned as read.
            assert_eq!(view.add_stable(&t, &rule("x"), &lists[0].1).unwrap(), None);
        }
    }

    #[test]
    fn a_canary_forward_whose_stable_partner_is_another_group_is_refused_naming_the_rule() {
        // Both releases named: b-canary's partner is b-stable, never ours.
        let t = AlbTarget {
            canary_target_group_arns: vec![CANARY.into(), OTHER_CANARY.into()],
            ..listener()
        };
        let lists = listener_lists(weighted(&[(OTHER_CANARY, 100)]));
        let view = ListenerView::of(&t, &lists);
        let err = view.add_stable(&t, &rule("rule/header"), &lists[1].1).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("rule rule/header forwards only to canary group(s)")
                && text.contains(OTHER_CANARY)
                && text.contains(OTHER_STABLE)
                && text.contains("never with the stable group"),
            "{text}"
        );
        assert_eq!(err.code(), "CanaryForwardWithoutStable");

        // A canary sharing the forward with a group that is neither stable nor a canary.
        let t = listener();
        let mixed = weighted(&[(CANARY, 50), (OTHER_STABLE, 50)]);
        let err = ListenerView::of(&t, &listener_lists(mixed.clone()))
            .add_stable(&t, &rule("rule/header"), &[mixed])
            .unwrap_err();
        assert!(
            err.to_string().contains("neither the stable group nor a canary"),
            "{err}"
        );

        // A named canary with no partner anywhere: the configured stable group takes it.
        let t = AlbTarget {
            canary_target_group_arns: vec![OTHER_CANARY.into()],
            ..listener()
        };
        let lone = vec![(rule("rule/header"), vec![weighted(&[(OTHER_CANARY, 100)])])];
        assert!(ListenerView::of(&t, &lone)
            .add_stable(&t, &rule("rule/header"), &lone[0].1)
            .unwrap()
            .is_some());
    }
}
