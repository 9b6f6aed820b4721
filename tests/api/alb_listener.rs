//! `scope: listener` against moto: every forward on the listener that sends traffic to the
//! canary is reverted (default action and each rule found at run time), the others are left
//! alone, a failure on one rule leaves the rest reverted and says so, and the bake's read-back
//! checks every reverted forward.

use aws_sdk_elasticloadbalancingv2::types::{Action, ActionTypeEnum, FixedResponseActionConfig};

use crate::support::alb_fixture::{elb_client, fast_settings, forward, weights, AlbFixture};
use crate::support::aws_proxy::AwsProxy;
use rollback_responder::action::alb::{AlbError, AlbExecutor, AlbOutcome, AlbStep, AlbTarget, ResourceKind, Scope};

/// The fixture's listener (default 75/25, rule `/api/*` 10/90) plus three rules: `/v1/files/*`
/// 50/50 to the same canary, `/admin/*` to a group of its own, `/gone/*` a fixed response.
struct Listener {
    fx: AlbFixture,
    files: String,
    admin: String,
    admin_tg: String,
    gone: String,
}

async fn listener() -> Listener {
    let fx = AlbFixture::start().await;
    let files = fx
        .add_rule(
            20,
            "/v1/files/*",
            forward(&[(&fx.stable_tg, 50), (&fx.canary_tg, 50)], None),
        )
        .await;
    let admin_tg = fx.empty_target_group("admin").await;
    let admin = fx.add_rule(30, "/admin/*", forward(&[(&admin_tg, 1)], None)).await;
    let fixed = Action::builder()
        .r#type(ActionTypeEnum::FixedResponse)
        .fixed_response_config(FixedResponseActionConfig::builder().status_code("410").build())
        .build();
    let gone = fx.add_rule(40, "/gone/*", fixed).await;
    Listener {
        fx,
        files,
        admin,
        admin_tg,
        gone,
    }
}

fn listener_scope(fx: &AlbFixture) -> AlbTarget {
    AlbTarget {
        scope: Scope::Listener,
        ..fx.listener_target()
    }
}

async fn revert(exec: &AlbExecutor, t: &AlbTarget) -> (Result<AlbOutcome, AlbError>, Vec<AlbStep>) {
    let mut steps = Vec::new();
    let mut record = |s: AlbStep| steps.push(s);
    let result = exec.revert(t, false, &mut record).await;
    (result, steps)
}

/// An executor through a proxy that answers every ModifyRule of the files rule with 503.
async fn files_rule_failing(l: &Listener) -> (AwsProxy, AlbExecutor) {
    let proxy = AwsProxy::start(&l.fx.moto.endpoint, 1).await;
    proxy.fail("ModifyRule", &l.files, 503, "ServiceUnavailable");
    let exec = AlbExecutor::new(elb_client(proxy.endpoint(0)), &fast_settings());
    (proxy, exec)
}

fn wrote(steps: &[AlbStep]) -> usize {
    steps.iter().filter(|s| matches!(s, AlbStep::Wrote { .. })).count()
}

fn all_stable(l: &Listener) -> Vec<(String, i32)> {
    vec![(l.fx.stable_tg.clone(), 100), (l.fx.canary_tg.clone(), 0)]
}

#[tokio::test]
async fn every_forward_to_the_canary_ends_at_100_stable_and_the_others_are_untouched() {
    let l = listener().await;
    let fx = &l.fx;
    let t = listener_scope(fx);
    let exec = fx.executor();

    let (result, steps) = revert(&exec, &t).await;
    let outcome = result.expect("listener-wide revert");
    assert!(outcome.changed());
    let Some(AlbStep::Scope {
        forwards, left_alone, ..
    }) = steps.iter().find(|s| matches!(s, AlbStep::Scope { .. }))
    else {
        panic!("no scope step: {steps:?}");
    };
    let arns: Vec<&str> = forwards.iter().map(|r| r.arn.as_str()).collect();
    assert_eq!(
        arns,
        vec![fx.listener_arn.as_str(), fx.rule_arn.as_str(), l.files.as_str()]
    );
    assert_eq!(forwards[0].kind, ResourceKind::ListenerDefaultActions);
    assert_eq!(*left_alone, 2, "the admin rule and the fixed response");
    assert_eq!(wrote(&steps), 3, "one write per forward to the canary: {steps:?}");
    let prechecks = steps
        .iter()
        .filter(|s| matches!(s, AlbStep::PreCheck { passed: true, .. }))
        .count();
    let read_backs = steps
        .iter()
        .filter(|s| matches!(s, AlbStep::ReadBack { matches: true, .. }))
        .count();
    assert_eq!(
        (prechecks, read_backs),
        (3, 3),
        "each forward has its pre-check and read-back"
    );

    // What moto holds now, read without the module.
    assert_eq!(weights(&fx.listener_actions().await), all_stable(&l));
    assert_eq!(weights(&fx.rule_actions().await), all_stable(&l));
    assert_eq!(weights(fx.rule(&l.files).await.actions()), all_stable(&l));
    assert_eq!(
        weights(fx.rule(&l.admin).await.actions()),
        vec![(l.admin_tg.clone(), 1)]
    );
    let gone = fx.rule(&l.gone).await;
    assert_eq!(gone.actions().len(), 1);
    assert_eq!(gone.actions()[0].r#type, Some(ActionTypeEnum::FixedResponse));

    // Run again (a takeover after a crash): everything is found stable, nothing written.
    let (again, steps) = revert(&exec, &t).await;
    assert!(!again.expect("second run").changed());
    assert_eq!(wrote(&steps), 0);

    // The bake's read-back checks every reverted forward: a rule put back is drift.
    let mut baseline = None;
    let sample = exec.read_back_sample(&t, &mut baseline).await.expect("read back");
    assert!(sample.ok && sample.drift.is_none(), "{sample:?}");
    assert_eq!(baseline.as_ref().map(Vec::len), Some(3));
    fx.elb
        .modify_rule()
        .rule_arn(&l.files)
        .actions(forward(&[(&fx.stable_tg, 50), (&fx.canary_tg, 50)], None))
        .send()
        .await
        .expect("ModifyRule (someone else)");
    let sample = exec.read_back_sample(&t, &mut baseline).await.expect("read back");
    assert!(!sample.ok);
    let drift = sample.drift.expect("drift");
    assert!(drift.contains(&l.files) && drift.contains("50% stable"), "{drift}");
    assert!(!drift.contains(&fx.rule_arn), "only the changed rule is named: {drift}");
}

#[tokio::test]
async fn a_rule_that_cannot_be_written_leaves_the_others_reverted_and_the_revert_partial() {
    let l = listener().await;
    let fx = &l.fx;
    // Every ModifyRule of the files rule answers 503: retried up to fast_settings' 3 attempts.
    let (proxy, exec) = files_rule_failing(&l).await;

    let (result, steps) = revert(&exec, &listener_scope(fx)).await;
    let Err(AlbError::Partial { done, failed, dry_run }) = result else {
        panic!("expected a partial revert, got {result:?}");
    };
    assert_eq!(done, vec![fx.listener_arn.clone(), fx.rule_arn.clone()]);
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].resource.arn, l.files);
    assert_eq!(failed[0].error.code(), "ServiceUnavailable");
    assert_eq!(proxy.refused("ModifyRule"), 3);
    assert_eq!(wrote(&steps), 2, "the two forwards written: {steps:?}");
    assert!(!dry_run);
    let message = AlbError::Partial { done, failed, dry_run }.to_string();
    assert!(
        message.starts_with("1 of 3 forward(s) to the canary NOT reverted: rule ")
            && message.contains(&l.files)
            && message.contains("ServiceUnavailable"),
        "{message}"
    );

    assert_eq!(weights(&fx.listener_actions().await), all_stable(&l));
    assert_eq!(weights(&fx.rule_actions().await), all_stable(&l));
    assert_eq!(
        weights(fx.rule(&l.files).await.actions()),
        vec![(fx.stable_tg.clone(), 50), (fx.canary_tg.clone(), 50)],
        "the failed rule is as it was"
    );
}

/// A write answered with 503 is sent again only through the gate the responder guards its
/// writes with (the lease still ours): here the gate closes once a write has failed, as a lost
/// lease would. The failing ModifyRule is sent once, and the revert stops at the gate instead
/// of sending its retries.
#[tokio::test]
async fn a_failing_writes_retries_go_out_only_through_the_write_gate() {
    use rollback_responder::action::alb::Resume;
    let l = listener().await;
    let fx = &l.fx;
    let (proxy, exec) = files_rule_failing(&l).await;
    let gate = || -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        let closed = proxy.refused("ModifyRule") > 0;
        Box::pin(async move {
            if closed {
                std::future::pending::<()>().await;
            }
        })
    };
    let mut record = |_: AlbStep| {};
    let (t, resume) = (listener_scope(fx), Resume::default());
    let run = exec.revert_resuming(&t, false, &mut record, &gate, &resume);
    // Until the files rule's write has failed (however slow the machine), then well past the
    // retries' backoff (10 ms, doubling, 3 attempts).
    let watch = async {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        while proxy.refused("ModifyRule") == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the files rule was never written"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    };
    tokio::select! {
        r = run => panic!("the revert went past a closed gate: {r:?}"),
        () = watch => {}
    }
    assert_eq!(proxy.refused("ModifyRule"), 1, "a retry went out without the gate");
    assert_eq!(
        weights(fx.rule(&l.files).await.actions()),
        vec![(fx.stable_tg.clone(), 50), (fx.canary_tg.clone(), 50)],
        "the failed rule is as it was"
    );
}

#[tokio::test]
async fn a_failed_pre_check_before_any_write_writes_nothing_anywhere() {
    let l = listener().await;
    let fx = &l.fx;
    fx.stop_instances(&fx.stable_instances).await;
    let (result, steps) = revert(&fx.executor(), &listener_scope(fx)).await;
    assert!(matches!(result, Err(AlbError::PreCheckFailed { .. })), "{result:?}");
    assert_eq!(wrote(&steps), 0);
    assert_eq!(
        weights(&fx.listener_actions().await),
        vec![(fx.stable_tg.clone(), 75), (fx.canary_tg.clone(), 25)]
    );
    assert_eq!(
        weights(fx.rule(&l.files).await.actions()),
        vec![(fx.stable_tg.clone(), 50), (fx.canary_tg.clone(), 50)]
    );
}

/// Through the whole service: a listener-wide rollback whose `/v1/files/*` rule cannot be
/// written fails as a PARTIAL rollback: the timeline names the two writes that took and the
/// rule that did not, and the incident counts as executed (the target changed).
#[tokio::test]
async fn the_incident_of_a_partial_listener_revert_says_what_took_and_what_did_not() {
    use rollback_responder::action::Executors;

    use crate::helpers::{ago, alert, payload, spawn_app, Options};

    let l = listener().await;
    let fx = &l.fx;
    let proxy = AwsProxy::start(&fx.moto.endpoint, 1).await;
    proxy.fail("ModifyRule", &l.files, 400, "AccessDenied");
    let policy = format!(
        r#"
name: portal-api
service: portal-api
matchers: ['service="portal-api"']
target:
  alb:
    scope: listener
    listener_arn: {listener}
    stable_target_group_arn: {stable}
triggers:
  - name: health-check-failing
    matchers: ['alertname="HealthCheckFailing"']
    for: 2m
    mode: auto
verification: {{bake: 1s, interval: 200ms}}
"#,
        listener = fx.listener_arn,
        stable = fx.stable_tg
    );
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", policy)],
        executors: Some(Executors {
            alb: Some(AlbExecutor::new(elb_client(proxy.endpoint(0)), &fast_settings())),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HealthCheckFailing", "portal-api", "albpartial", &ago(150), None)],
    ))
    .await;
    let list = app
        .wait_incidents("failed rollback", |l| l.len() == 1 && l[0]["phase"] == "failed")
        .await;
    let inc = app.incident(list[0]["id"].as_str().unwrap()).await;
    assert_eq!(inc["executed"], true, "the target changed: {inc:#}");
    let timeline = inc["timeline"].as_array().unwrap();
    let steps: Vec<&str> = timeline
        .iter()
        .filter(|e| e["kind"] == "action_step")
        .filter_map(|e| e["summary"].as_str())
        .collect();
    assert!(
        steps
            .iter()
            .any(|s| s.starts_with(&format!("listener {}: 3 forward(s)", fx.listener_arn))),
        "{steps:#?}"
    );
    assert!(
        steps.contains(&format!("forward 3 of 3: rule {} (ModifyRule)", l.files).as_str()),
        "{steps:#?}"
    );
    let failed = timeline.iter().find(|e| e["kind"] == "action_failed").expect("failure");
    let summary = failed["summary"].as_str().unwrap();
    assert!(
        summary.starts_with("partial rollback: ModifyListener written: 100% to stable (attempt 1) (at "),
        "{summary}"
    );
    assert!(
        summary.contains(&format!(
            "then it failed: 1 of 3 forward(s) to the canary NOT reverted: rule {}: AWS error AccessDenied: ",
            l.files
        )),
        "{summary}"
    );
    assert_eq!(proxy.refused("ModifyRule"), 1, "a permanent error is not retried");
    assert_eq!(
        weights(fx.rule(&l.files).await.actions()),
        vec![(fx.stable_tg.clone(), 50), (fx.canary_tg.clone(), 50)]
    );
    assert_eq!(weights(&fx.rule_actions().await), all_stable(&l));
}

#[tokio::test]
async fn a_stale_named_canary_is_an_error_not_already_reverted_and_the_read_back_fails() {
    let fx = AlbFixture::start().await;
    // Last release's canary is named; the listener now sends 25 % to this release's.
    let stale = fx.empty_target_group("canary-v1").await;
    let t = AlbTarget {
        canary_target_group_arns: vec![stale.clone()],
        ..listener_scope(&fx)
    };
    let exec = fx.executor();
    let (result, steps) = revert(&exec, &t).await;
    let Err(AlbError::InvalidTarget { message }) = result else {
        panic!("expected InvalidTarget, got {result:?} {steps:?}");
    };
    assert!(
        message.contains(&stale) && message.contains(&fx.canary_tg),
        "names the stale ARN and the group that shares the forward: {message}"
    );
    assert_eq!(wrote(&steps), 0);
    assert_eq!(
        weights(&fx.listener_actions().await),
        vec![(fx.stable_tg.clone(), 75), (fx.canary_tg.clone(), 25)],
        "nothing written"
    );
    // The bake's read-back does not pass on it either.
    let mut baseline = None;
    assert!(matches!(
        exec.read_back_sample(&t, &mut baseline).await,
        Err(AlbError::InvalidTarget { .. })
    ));

    // A named canary and a listener where no forward names it nor the stable group: zero
    // forwards in scope, and a read-back that checks nothing must not pass.
    let elsewhere = AlbTarget {
        stable_target_group_arn: stale.clone(),
        ..t.clone()
    };
    let sample = exec.read_back_sample(&elsewhere, &mut None).await.expect("read back");
    assert!(!sample.ok, "{sample:?}");
    assert!(sample.value.contains("NO FORWARD"), "{sample:?}");
}

/// Adds a header-based canary rule (`X-Canary: 1` -> `groups`) at `priority`; returns its ARN.
async fn header_rule(fx: &AlbFixture, priority: i32, groups: &[(&str, i32)]) -> String {
    use aws_sdk_elasticloadbalancingv2::types::{HttpHeaderConditionConfig, RuleCondition};
    let out = fx
        .elb
        .create_rule()
        .listener_arn(&fx.listener_arn)
        .priority(priority)
        .conditions(
            RuleCondition::builder()
                .field("http-header")
                .http_header_config(
                    HttpHeaderConditionConfig::builder()
                        .http_header_name("X-Canary")
                        .values("1")
                        .build(),
                )
                .build(),
        )
        .actions(forward(groups, None))
        .send()
        .await
        .expect("CreateRule (header canary)");
    out.rules()[0].rule_arn().expect("rule ARN").to_string()
}

/// A header-based canary rule forwards only to the canary: the listener-wide rollback adds the
/// stable group to it (its condition kept) and succeeds; a dry run describes that without
/// writing, a second run finds it stable, and the bake's read-back treats it like any other.
#[tokio::test]
async fn a_rule_that_forwards_only_to_the_canary_is_reverted_to_stable_with_its_conditions() {
    let fx = AlbFixture::start().await;
    let canary_rule = header_rule(&fx, 5, &[(&fx.canary_tg, 100)]).await;
    let before = fx.rule(&canary_rule).await;
    let t = listener_scope(&fx);
    let exec = fx.executor();

    let mut dry = Vec::new();
    let result = exec.revert(&t, true, &mut |s| dry.push(s)).await;
    let outcome = result.expect("dry run");
    assert!(!outcome.changed());
    assert_eq!(wrote(&dry), 0);
    let summary = outcome.describe(&t);
    assert!(
        summary.contains(&format!(
            "dry run, nothing written: {canary_rule} would change from [{}=100; stickiness off] to [{}=0, {}=100",
            fx.canary_tg, fx.canary_tg, fx.stable_tg
        )),
        "{summary}"
    );
    assert_eq!(
        weights(fx.rule(&canary_rule).await.actions()),
        vec![(fx.canary_tg.clone(), 100)]
    );

    let (result, steps) = revert(&exec, &t).await;
    let outcome = result.expect("the listener-wide revert succeeds");
    assert!(outcome.changed());
    assert_eq!(
        wrote(&steps),
        3,
        "default action, /api/* and the header rule: {steps:?}"
    );
    let added = steps
        .iter()
        .find(|s| matches!(s, AlbStep::StableAdded { .. }))
        .expect("the stable group is added to the canary-only rule");
    assert_eq!(
        added.describe(),
        format!(
            "rule {canary_rule} forwards only to canary group(s) {}: stable group {} added to its forward \
             (conditions kept), to take that traffic",
            fx.canary_tg, fx.stable_tg
        )
    );
    let after = fx.rule(&canary_rule).await;
    assert_eq!(
        weights(after.actions()),
        vec![(fx.canary_tg.clone(), 0), (fx.stable_tg.clone(), 100)]
    );
    assert_eq!(after.conditions(), before.conditions());
    assert_eq!(after.priority(), before.priority());
    assert_eq!(
        weights(&fx.listener_actions().await),
        vec![(fx.stable_tg.clone(), 100), (fx.canary_tg.clone(), 0)]
    );

    let (again, steps) = revert(&exec, &t).await;
    assert!(!again.expect("second run").changed());
    assert_eq!(wrote(&steps), 0);

    let mut baseline = None;
    let sample = exec.read_back_sample(&t, &mut baseline).await.expect("read back");
    assert!(sample.ok && sample.drift.is_none(), "{sample:?}");
    assert_eq!(baseline.as_ref().map(Vec::len), Some(3));
    // Put back to the canary only: drift on that rule, named.
    fx.elb
        .modify_rule()
        .rule_arn(&canary_rule)
        .actions(forward(&[(&fx.canary_tg, 100)], None))
        .send()
        .await
        .expect("ModifyRule (someone else)");
    let sample = exec.read_back_sample(&t, &mut baseline).await.expect("read back");
    let drift = sample.drift.expect("drift");
    assert!(drift.contains(&canary_rule) && drift.contains("0% stable"), "{drift}");
}

/// Two releases on one listener: the other service's canary has its own stable partner, so a
/// rule forwarding only to it is not handed to our stable group; that rule is named with the
/// reason, the others are reverted, and the revert is partial.
#[tokio::test]
async fn a_canary_only_rule_whose_partner_is_another_stable_group_is_named_and_left_alone() {
    let fx = AlbFixture::start().await;
    let b_stable = fx.empty_target_group("b-stable").await;
    let b_canary = fx.empty_target_group("b-canary").await;
    fx.add_rule(20, "/b/*", forward(&[(&b_stable, 90), (&b_canary, 10)], None))
        .await;
    let b_header = header_rule(&fx, 5, &[(&b_canary, 100)]).await;
    let t = AlbTarget {
        canary_target_group_arns: vec![fx.canary_tg.clone(), b_canary.clone()],
        ..listener_scope(&fx)
    };
    let (result, steps) = revert(&fx.executor(), &t).await;
    let Err(AlbError::Partial { done, failed, .. }) = result else {
        panic!("expected a partial revert, got {result:?}");
    };
    assert_eq!(done, vec![fx.listener_arn.clone(), fx.rule_arn.clone()]);
    let failed_arns: Vec<&str> = failed.iter().map(|f| f.resource.arn.as_str()).collect();
    let refused = failed
        .iter()
        .find(|f| f.resource.arn == b_header)
        .unwrap_or_else(|| panic!("the header rule is named: {failed_arns:?}"));
    assert_eq!(refused.error.code(), "CanaryForwardWithoutStable");
    let why = refused.error.to_string();
    assert!(
        why.starts_with(&format!("rule {b_header} forwards only to canary group(s) {b_canary}"))
            && why.contains(&format!("shares a forward elsewhere on this listener with {b_stable}")),
        "{why}"
    );
    assert_eq!(
        weights(fx.rule(&b_header).await.actions()),
        vec![(b_canary.clone(), 100)]
    );
    assert!(wrote(&steps) >= 2);
}

/// Through the whole service: a listener-wide rollback with a header-based canary rule ends
/// verified (the bake's read-back passes on that rule too), and the timeline and the Slack
/// thread say the stable group was added to the rule.
#[tokio::test]
async fn the_incident_of_a_listener_revert_with_a_canary_only_rule_is_verified_and_says_so() {
    use rollback_responder::action::Executors;

    use crate::helpers::{ago, alert, payload, spawn_app, Options};
    use crate::notify::{received, Peers};

    let fx = AlbFixture::start().await;
    let peers = Peers::start().await;
    let canary_rule = header_rule(&fx, 5, &[(&fx.canary_tg, 100)]).await;
    let policy = format!(
        r##"
name: portal-api
service: portal-api
matchers: ['service="portal-api"']
target:
  alb:
    scope: listener
    listener_arn: {listener}
    stable_target_group_arn: {stable}
triggers:
  - name: health-check-failing
    matchers: ['alertname="HealthCheckFailing"']
    mode: auto
verification: {{bake: 1s, interval: 200ms}}
notify:
  slack: {{channel: "#portal-alerts"}}
"##,
        listener = fx.listener_arn,
        stable = fx.stable_tg
    );
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", policy)],
        env: peers.env(),
        executors: Some(Executors {
            alb: Some(fx.executor()),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HealthCheckFailing", "portal-api", "albheader", &ago(60), None)],
    ))
    .await;
    let list = app
        .wait_incidents("verified rollback", |l| l.len() == 1 && l[0]["phase"] == "verified")
        .await;
    let inc = app.incident(list[0]["id"].as_str().unwrap()).await;
    assert_eq!(inc["executed"], true, "{inc:#}");
    let added = format!(
        "rule {canary_rule} forwards only to canary group(s) {}: stable group {} added to its forward",
        fx.canary_tg, fx.stable_tg
    );
    let timeline = inc["timeline"].as_array().unwrap();
    assert!(
        timeline
            .iter()
            .any(|e| e["kind"] == "action_step" && e["summary"].as_str().is_some_and(|s| s.starts_with(&added))),
        "{inc:#}"
    );
    assert_eq!(
        weights(fx.rule(&canary_rule).await.actions()),
        vec![(fx.canary_tg.clone(), 0), (fx.stable_tg.clone(), 100)]
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let slack = received(&peers.slack).await;
        if slack.iter().any(|(_, _, b, _)| {
            b["text"]
                .as_str()
                .is_some_and(|t| t.contains("forwards only to canary group(s)") && t.contains("added to its forward"))
        }) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not said in Slack: {slack:#?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
