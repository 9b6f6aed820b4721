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
