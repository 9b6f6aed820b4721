//! The ALB read-back during the bake: re-read the listener's default actions (or the rule's;
//! with `scope: listener`, every forward on the listener that names a canary group, found
//! again at each read) and the stable target group's health, and compare them with what the
//! revert wrote. A change back on any of them is drift: reported with what changed, never
//! written over (no fight in a loop).

use aws_sdk_elasticloadbalancingv2::types::Action;

use super::{plan, AlbError, AlbExecutor, AlbTarget, ForwardSnapshot, ForwardState, Resource, Scope};
use crate::action::ReadBack;

/// The last path segment of an ARN's resource (`targetgroup/stable/abc` -> `stable`).
fn short(arn: &str) -> &str {
    let resource = arn.rsplit(':').next().unwrap_or(arn);
    let mut parts = resource.split('/');
    match (parts.next(), parts.next()) {
        (Some(_), Some(name)) => name,
        _ => resource,
    }
}

/// `stable=100, canary=0; sticky 60s` with target group names instead of ARNs.
pub(crate) fn describe_forward(f: Option<&ForwardState>) -> String {
    let Some(f) = f else {
        return "no forward action".into();
    };
    let groups: Vec<String> = f
        .target_groups
        .iter()
        .map(|g| match g.weight {
            Some(w) => format!("{}={w}", short(&g.target_group_arn)),
            None => format!("{}=(unweighted)", short(&g.target_group_arn)),
        })
        .collect();
    let sticky = match &f.stickiness {
        Some(s) if s.enabled => format!("; sticky {}s", s.duration_seconds.unwrap_or_default()),
        _ => String::new(),
    };
    format!("{}{sticky}", groups.join(", "))
}

/// Compares one read with what was written and with the bake's first read. Pure.
pub(crate) fn judge(t: &AlbTarget, snap: &ForwardSnapshot, baseline: Option<&ForwardSnapshot>) -> Option<String> {
    let resource = snap.resource_arn.as_str();
    let now = describe_forward(snap.forward.as_ref());
    if super::needs_write(snap, t) {
        return Some(format!(
            "{resource} no longer forwards as written (100% to {}): now [{now}], {}% stable",
            short(&t.stable_target_group_arn),
            snap.stable_percent(&t.stable_target_group_arn)
        ));
    }
    match baseline {
        Some(b) if b.actions != snap.actions => Some(format!(
            "{resource}: the action list changed during the bake: was [{}] ({} action(s)), now [{now}] ({} action(s))",
            describe_forward(b.forward.as_ref()),
            b.actions.len(),
            snap.actions.len()
        )),
        _ => None,
    }
}

/// Compares every forward read with what was written and with the bake's first reads (a
/// forward of the baseline that is no longer found counts too). Pure.
pub(crate) fn judge_all(t: &AlbTarget, snaps: &[ForwardSnapshot], baseline: Option<&[ForwardSnapshot]>) -> Vec<String> {
    let mut drift: Vec<String> = snaps
        .iter()
        .filter_map(|s| {
            judge(
                t,
                s,
                baseline.and_then(|b| b.iter().find(|x| x.resource_arn == s.resource_arn)),
            )
        })
        .collect();
    for gone in baseline
        .unwrap_or_default()
        .iter()
        .filter(|b| !snaps.iter().any(|s| s.resource_arn == b.resource_arn))
    {
        drift.push(format!(
            "{}: was reverted, no longer found among the forwards to the canary",
            gone.resource_arn
        ));
    }
    drift
}

/// Who changed it: ELBv2 does not say; CloudTrail does.
fn who(t: &AlbTarget) -> String {
    let (calls, arn) = match (t.scope, &t.rule_arn) {
        (Scope::Listener, _) => ("ModifyListener and ModifyRule", t.listener_arn.as_str()),
        (Scope::One, Some(rule)) => ("ModifyRule", rule.as_str()),
        (Scope::One, None) => ("ModifyListener", t.listener_arn.as_str()),
    };
    format!("ELBv2 does not record who wrote it: look for {calls} events on {arn} in CloudTrail")
}

impl AlbExecutor {
    /// One read-back sample: the forward as it is now (drift if it differs from what was
    /// written, or from `baseline`, the bake's first read, which this sets), and the stable
    /// group's health (fewer than `min_healthy_targets` healthy is a bad sample: a target that
    /// was found already stable is pre-checked here all the same).
    pub async fn read_back_sample(
        &self,
        t: &AlbTarget,
        baseline: &mut Option<Vec<ForwardSnapshot>>,
    ) -> Result<ReadBack, AlbError> {
        let mut ignore = |_| {};
        let snaps: Vec<ForwardSnapshot> = match t.scope {
            Scope::One => {
                let r = Resource::of(t);
                let actions = self.read_actions(&r, &mut ignore).await?;
                vec![ForwardSnapshot::from_actions(&r.arn, r.kind, &actions)]
            }
            Scope::Listener => {
                let lists = self.listener_lists(&t.listener_arn, &mut ignore).await?;
                let scope = plan::in_scope(t, &lists)?;
                // Nothing in scope (found all-stable): check the forwards naming the stable
                // group instead, so the sample still looks at something real.
                let checked = |r: &Resource, a: &[Action]| {
                    if scope.is_empty() {
                        ForwardSnapshot::from_actions(&r.arn, r.kind, a)
                            .forward
                            .is_some_and(|f| {
                                f.target_groups
                                    .iter()
                                    .any(|g| g.target_group_arn == t.stable_target_group_arn)
                            })
                    } else {
                        scope.contains(r)
                    }
                };
                lists
                    .iter()
                    .filter(|(r, a)| checked(r, a))
                    .map(|(r, a)| ForwardSnapshot::from_actions(&r.arn, r.kind, a))
                    .collect()
            }
        };
        // Zero forwards checked proves nothing: never a passing sample.
        if snaps.is_empty() {
            return Ok(ReadBack {
                ok: false,
                value: format!(
                    "NO FORWARD in scope: no forward on {} names the stable group or a canary",
                    t.listener_arn
                ),
                drift: None,
                evidence: serde_json::json!({ "snapshots": [] }),
            });
        }
        let drift = judge_all(t, &snaps, baseline.as_deref());
        let forward = snaps
            .iter()
            .map(|s| describe_forward(s.forward.as_ref()))
            .collect::<Vec<_>>()
            .join(" | ");
        if !drift.is_empty() {
            return Ok(ReadBack {
                ok: false,
                value: format!("DRIFT [{forward}]"),
                drift: Some(format!("{}; {}", drift.join("; "), who(t))),
                evidence: serde_json::to_value(&snaps).unwrap_or_default(),
            });
        }
        let snap = snaps;
        if baseline.is_none() {
            *baseline = Some(snap.clone());
        }
        let mut health = None;
        let precheck = self.precheck(t, &mut |s| health = Some(s)).await;
        let (ok, healthy) = match precheck {
            Ok(()) => (true, None),
            Err(AlbError::PreCheckFailed {
                healthy,
                required,
                states,
                ..
            }) => (
                false,
                Some(format!("{healthy} of {required} required healthy ({states:?})")),
            ),
            Err(e) => return Err(e),
        };
        let value = match healthy {
            None => format!("as written [{forward}]"),
            Some(h) => format!(
                "as written [{forward}], stable group {}: {h}",
                short(&t.stable_target_group_arn)
            ),
        };
        Ok(ReadBack {
            ok,
            value,
            drift: None,
            evidence: serde_json::json!({ "snapshots": snap, "stable_health": health }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::alb::{ResourceKind, WeightedGroup};

    const STABLE: &str = "arn:aws:elasticloadbalancing:us-east-1:1:targetgroup/stable/1";
    const CANARY: &str = "arn:aws:elasticloadbalancing:us-east-1:1:targetgroup/canary/2";

    fn target() -> AlbTarget {
        serde_json::from_value(serde_json::json!({
            "listener_arn": "arn:aws:elasticloadbalancing:us-east-1:1:listener/app/lb/1/2",
            "stable_target_group_arn": STABLE,
        }))
        .unwrap()
    }

    fn snap(stable: i32, canary: i32) -> ForwardSnapshot {
        let fwd = ForwardState {
            target_groups: vec![
                WeightedGroup {
                    target_group_arn: STABLE.into(),
                    weight: Some(stable),
                },
                WeightedGroup {
                    target_group_arn: CANARY.into(),
                    weight: Some(canary),
                },
            ],
            stickiness: None,
        };
        ForwardSnapshot {
            resource_arn: "l".into(),
            resource_kind: ResourceKind::ListenerDefaultActions,
            actions: vec![crate::action::alb::ActionSnapshot {
                action_type: "forward".into(),
                order: Some(1),
                target_group_arn: None,
                target_groups: fwd.target_groups.clone(),
                stickiness: None,
            }],
            forward: Some(fwd),
        }
    }

    #[test]
    fn weights_put_back_are_drift_and_say_what_changed() {
        let t = target();
        assert_eq!(judge(&t, &snap(100, 0), None), None);
        let d = judge(&t, &snap(75, 25), Some(&snap(100, 0))).unwrap();
        assert!(d.contains("now [stable=75, canary=25], 75% stable"), "{d}");
    }

    #[test]
    fn a_changed_action_list_is_drift_even_when_still_stable() {
        let t = target();
        let mut other = snap(100, 0);
        other.actions[0].order = Some(2);
        let d = judge(&t, &other, Some(&snap(100, 0))).unwrap();
        assert!(d.contains("action list changed"), "{d}");
        assert_eq!(short(STABLE), "stable");
    }
}
