//! Kubernetes takeovers and people: a human undo first, a replica dying mid-revert.

use super::*;

/// A scale step verifies only once the controller has observed it and the pods are gone.
#[tokio::test]
async fn verify_waits_for_a_scale_step_to_take_effect() {
    let fake = FakeKube::start().await;
    seed_world(&fake, true);
    fake.insert(
        "endpointslices",
        endpointslice(
            NS,
            "portal-api-prod",
            "x1",
            &[("portal-api-stable-0", true), ("portal-api-stable-1", true)],
        ),
    );
    let exec = executor(&fake);
    let mut t = target(vec![switch_step(), scale_step()]);
    t.rollout_timeout = Duration::from_millis(300);
    run(&exec, &t, false).await.0.expect("revert");
    let err = exec.verify(&t, &mut |_| {}).await.expect_err("not observed yet");
    assert!(
        matches!(&err, KubeError::RolloutTimedOut { deployment, last_status, .. }
            if deployment == "portal-api-canary" && last_status == "waiting for the deployment spec update to be observed"),
        "{err:?}"
    );
    // Observed, but the canary's pods are still there.
    fake.modify("deployments", NS, "portal-api-canary", |d| {
        d["status"]["observedGeneration"] = d["metadata"]["generation"].clone();
    });
    let err = exec.verify(&t, &mut |_| {}).await.expect_err("pods left");
    assert!(
        matches!(&err, KubeError::RolloutTimedOut { last_status, .. } if last_status == "scaled to 0: 3 replicas left, 3 available"),
        "{err:?}"
    );
    scaled_down(&fake);
    exec.verify(&t, &mut |_| {}).await.expect("scaled to 0");
}

/// Deployment `portal-api` released three times through the API (0.9.0, 1.0.0-rc.0, then the
/// bad 1.0.0) with the fake's Deployment controller making ReplicaSets and revisions.
pub(crate) async fn released_three_times(fake: &FakeKube) -> Vec<Value> {
    fake.run_controllers();
    let tpls = vec![
        template(&[("app", "portal-api"), ("version", "v0.9.0")], "portal-api:0.9.0"),
        template(
            &[("app", "portal-api"), ("version", "v1.0.0-rc.0")],
            "portal-api:1.0.0-rc.0",
        ),
        template(&[("app", "portal-api"), ("version", "v1.0.0")], "portal-api:1.0.0"),
    ];
    fake.insert(
        "deployments",
        deployment(
            NS,
            "portal-api",
            DEPLOY_UID,
            &[("app", "portal-api")],
            tpls[0].clone(),
            1,
        ),
    );
    fake.run_controllers();
    for tpl in &tpls[1..] {
        patch_template(fake, tpl, "argocd-controller").await;
    }
    tpls
}

/// What `kubectl rollout undo` (or a release tool) sends: the pod template replaced.
pub(crate) async fn patch_template(fake: &FakeKube, tpl: &Value, manager: &str) {
    let api: kube::Api<k8s_openapi::api::apps::v1::Deployment> = kube::Api::namespaced(fake.client(), NS);
    let patch: json_patch::Patch =
        serde_json::from_value(json!([{"op": "replace", "path": "/spec/template", "value": tpl}])).expect("patch");
    let pp = kube::api::PatchParams {
        field_manager: Some(manager.into()),
        ..Default::default()
    };
    api.patch("portal-api", &pp, &kube::api::Patch::Json::<()>(patch))
        .await
        .expect("template patched");
}

/// The incident opens after the release, in a later second: managedFields keep whole seconds,
/// and a change in the incident's own second counts as made after it opened.
pub(crate) async fn incident_opens() -> chrono::DateTime<chrono::Utc> {
    let released = chrono::Utc::now().timestamp();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while chrono::Utc::now().timestamp() == released {
        assert!(tokio::time::Instant::now() < deadline, "the clock does not move");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    chrono::Utc::now()
}

pub(crate) fn revision_and_image(fake: &FakeKube) -> (String, String) {
    let d = fake.get("deployments", NS, "portal-api").expect("deployment");
    (
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        d["spec"]["template"]["spec"]["containers"][0]["image"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

#[tokio::test]
async fn a_human_rollout_undo_before_the_responder_acts_is_not_undone_again() {
    let fake = FakeKube::start().await;
    let tpls = released_three_times(&fake).await;
    assert_eq!(revision_and_image(&fake), ("3".into(), "portal-api:1.0.0".into()));
    let opened_at = incident_opens().await;
    // A person runs `kubectl rollout undo` while the incident waits for approval: 1.0.0-rc.0
    // is back, renumbered to revision 4; the bad 1.0.0 is now "the previous revision".
    patch_template(&fake, &tpls[1], "kubectl-rollout").await;
    assert_eq!(revision_and_image(&fake), ("4".into(), "portal-api:1.0.0-rc.0".into()));
    let writes = fake.writes();

    let exec = executor(&fake);
    let t = target(vec![undo_step(None)]);
    let mut records = Vec::new();
    let outcome = exec
        .revert_since(&t, false, opened_at, &mut |r| records.push(r))
        .await
        .expect("revert");
    assert!(!outcome.changed, "{outcome:?}");
    assert_eq!(fake.writes(), writes, "nothing written");
    assert_eq!(revision_and_image(&fake), ("4".into(), "portal-api:1.0.0-rc.0".into()));
    let StepResult::AlreadyDone { reason, by, .. } = &outcome.steps[0].result else {
        panic!("expected done: {outcome:?}");
    };
    assert_eq!(by.as_ref().map(|b| b.manager.as_str()), Some("kubectl-rollout"));
    assert!(
        reason.starts_with(
            "deployment portal-api was already rolled back after the incident opened, by `kubectl-rollout` (Update at "
        ),
        "{reason}"
    );
    assert!(reason.contains("images api=portal-api:1.0.0-rc.0"), "{reason}");
    let said: Vec<String> = records
        .iter()
        .filter(|r| matches!(r, KubeStepRecord::AlreadyDone { .. }))
        .map(KubeStepRecord::describe)
        .collect();
    assert_eq!(said, vec![format!("already done, nothing written: {reason}")]);

    // Without the incident's opening time, kubectl's rule would put the bad release back.
    let (result, _) = run(&exec, &t, false).await;
    assert!(result.expect("unpinned revert").changed);
    assert_eq!(revision_and_image(&fake), ("5".into(), "portal-api:1.0.0".into()));
}

#[tokio::test]
async fn rollout_undo_restores_the_release_before_the_one_current_when_the_incident_opened() {
    let fake = FakeKube::start().await;
    released_three_times(&fake).await;
    let exec = executor(&fake);
    let t = target(vec![undo_step(None)]);
    let opened_at = incident_opens().await;
    let outcome = exec
        .revert_since(&t, false, opened_at, &mut |_| {})
        .await
        .expect("revert");
    assert!(outcome.changed);
    // The controller reused 1.0.0-rc.0's ReplicaSet and numbered it 4, as a cluster does.
    assert_eq!(revision_and_image(&fake), ("4".into(), "portal-api:1.0.0-rc.0".into()));
    // A takeover running it again finds our own undo (revision 4 is now the newest, the bad
    // release the second-newest) and writes nothing.
    let writes = fake.writes();
    let again = exec
        .revert_since(&t, false, opened_at, &mut |_| {})
        .await
        .expect("again");
    assert!(!again.changed);
    assert_eq!(fake.writes(), writes);
    // A policy naming the known-good image reaches further back, by image, not by number.
    let mut named = target(vec![KubeStep::RolloutUndo {
        deployment: "portal-api".into(),
        to_revision: None,
        to_image: Some("portal-api:0.9.0".into()),
    }]);
    named.min_ready_replicas = 0;
    exec.revert_since(&named, false, opened_at, &mut |_| {})
        .await
        .expect("to image");
    assert_eq!(revision_and_image(&fake), ("5".into(), "portal-api:0.9.0".into()));
    // And the original revision 2 (1.0.0-rc.0, renumbered to 4) is still found by its old number.
    let by_number = target(vec![undo_step(Some(2))]);
    exec.revert_since(&by_number, false, opened_at, &mut |_| {})
        .await
        .expect("to revision 2");
    assert_eq!(revision_and_image(&fake), ("6".into(), "portal-api:1.0.0-rc.0".into()));
}

#[tokio::test]
async fn a_selector_that_drops_the_app_key_is_refused_naming_the_other_apps_pods() {
    let fake = FakeKube::start().await;
    seed_world(&fake, true);
    // Another app in the namespace released the same version string.
    fake.insert(
        "pods",
        pod(
            NS,
            "billing-7f9c-0",
            &[("app", "billing"), ("version", "v1.0.0-rc.0")],
            true,
        ),
    );
    let exec = executor(&fake);
    // Seed 000's patch copied as the whole selector: {version: v1.0.0-rc.0}, no app.
    let copied = KubeStep::SwitchService {
        service: "portal-api-prod".into(),
        selector: sel(&[("version", "v1.0.0-rc.0")]),
    };
    let (result, records) = run(&exec, &target(vec![copied, scale_step()]), false).await;
    let err = result.expect_err("foreign pods");
    assert!(err.is_precheck(), "{err}");
    assert_eq!(err.code(), "foreign_pods");
    assert_eq!(
        err.to_string(),
        "pre-check failed: service portal/portal-api-prod: the new selector version=v1.0.0-rc.0 also selects pod(s) \
         of another app, which neither the current selector (app=portal-api,track=canary,version=v1.0.0) selects nor \
         carry its app labels: billing-7f9c-0 (app=billing); the selector was not switched; list the app's key in the \
         policy's selector (e.g. app: NAME)"
    );
    assert_eq!(fake.writes(), 0);
    let said: Vec<String> = records
        .iter()
        .filter(|r| matches!(r, KubeStepRecord::PreCheck { .. }))
        .map(KubeStepRecord::describe)
        .collect();
    assert_eq!(
        said,
        vec![
            "pre-check service/portal-api-prod: 3 of 3 pod(s) matching version=v1.0.0-rc.0 Ready, 2 required: FAILED, \
             not switched (1 of them belong to another app (neither selected now nor labelled like \
             app=portal-api,track=canary,version=v1.0.0): billing-7f9c-0 (app=billing))"
                .to_string()
        ]
    );
    // The selector with the app key leaves the other app alone and goes ahead.
    let (result, _) = run(&exec, &target(vec![switch_step(), scale_step()]), false).await;
    assert!(result.expect("switch with app").changed);
}

/// The replica that died mid-action in the takeover tests.
const DEAD: &str = "replica-dead";

/// A Kubernetes world (switch the Service, then scale the canary down) and a service whose
/// manual policy has opened an incident awaiting approval.
async fn takeover_world() -> (
    FakeKube,
    crate::helpers::TestApp,
    rollback_responder::incident::IncidentId,
) {
    use crate::helpers::{ago, alert, payload, spawn_app, Options};
    use rollback_responder::action::Executors;
    use rollback_responder::incident::IncidentId;

    let fake = FakeKube::start().await;
    seed_world(&fake, true);
    fake.insert(
        "endpointslices",
        endpointslice(
            NS,
            "portal-api-prod",
            "x1",
            &[("portal-api-stable-0", true), ("portal-api-stable-1", true)],
        ),
    );
    fake.run_controllers();
    let policy = r#"
name: portal-api-k8s
service: portal-api
matchers: ['service="portal-api"']
target:
  kubernetes:
    namespace: portal
    min_ready_replicas: 2
    rollout_timeout: 5s
    steps:
      - switch_service: {service: portal-api-prod, selector: {app: portal-api, version: v1.0.0-rc.0}}
      - scale: {deployment: portal-api-canary, replicas: 0}
triggers:
  - name: health-check-failing
    matchers: ['alertname="HealthCheckFailing"']
    mode: manual
approval:
  approvers:
    slack_users: [U0APPROVER]
  timeout: 15m
  on_timeout: escalate
verification:
  bake: 1s
  interval: 500ms
"#;
    let app = spawn_app(Options {
        policies: vec![("portal-api-k8s.yaml", policy.to_string())],
        executors: Some(Executors {
            kube: Some(executor(&fake)),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HealthCheckFailing", "portal-api", "kt01", &ago(60), None)],
    ))
    .await;
    let list = app
        .wait_incidents("awaiting approval", |l| {
            l.len() == 1 && l[0]["phase"] == "awaiting_approval"
        })
        .await;
    let id = IncidentId(list[0]["id"].as_str().unwrap().to_string());
    (fake, app, id)
}

/// What a replica that died mid-action leaves: approved, its expired lease, its start mark
/// and the plan of its first write (the Service switch).
async fn leave_a_dead_attempt(app: &crate::helpers::TestApp, id: &rollback_responder::incident::IncidentId) {
    use rollback_responder::incident::Event;
    use rollback_responder::store::NewEvent;

    let r = &app.responder;
    let now = chrono::Utc::now();
    let mut tx = r.store.begin().await.unwrap();
    let mut inc = tx.incident(id).await.unwrap().unwrap();
    r.apply(
        &mut tx,
        &mut inc,
        Event::Approved {
            by: vec!["U0APPROVER".into()],
        },
        "U0APPROVER",
        "approved".into(),
        Value::Null,
        now,
    )
    .await
    .unwrap();
    inc.owner = Some(DEAD.into());
    inc.lease_until = Some(now - chrono::Duration::seconds(1));
    assert!(tx.take_lease(&inc).await.unwrap());
    for (kind, detail) in [
        (AuditKind::ActionStarted, json!({"dry_run": false})),
        (
            AuditKind::ActionStep,
            json!({"step": "planned", "dry_run": false, "object": "service/portal-api-prod"}),
        ),
    ] {
        tx.append_event(
            id,
            now,
            NewEvent {
                kind,
                actor: DEAD,
                phase_from: None,
                phase_to: None,
                summary: kind.as_str().into(),
                detail,
            },
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
}

/// A replica planned its selector patch and died; meanwhile a person switched the Service with
/// `kubectl patch` and scaled the canary down. The takeover finds it done and says who: not our
/// rollback (before, the planned write alone made it count as ours).
#[tokio::test]
async fn a_takeover_that_finds_a_persons_revert_says_who_and_does_not_count_it() {
    let (fake, app, id) = takeover_world().await;
    // The person: `kubectl patch service` and `kubectl scale`.
    let client = fake.client();
    let services: kube::Api<k8s_openapi::api::core::v1::Service> = kube::Api::namespaced(client.clone(), NS);
    let patch: json_patch::Patch = serde_json::from_value(json!([{"op": "add", "path": "/spec/selector",
        "value": {"app": "portal-api", "version": "v1.0.0-rc.0"}}]))
    .unwrap();
    let pp = |m: &str| kube::api::PatchParams {
        field_manager: Some(m.into()),
        ..Default::default()
    };
    services
        .patch(
            "portal-api-prod",
            &pp("kubectl-patch"),
            &kube::api::Patch::Json::<()>(patch),
        )
        .await
        .expect("kubectl patch");
    let deployments: kube::Api<k8s_openapi::api::apps::v1::Deployment> = kube::Api::namespaced(client, NS);
    deployments
        .patch_scale(
            "portal-api-canary",
            &pp("kubectl-scale"),
            &kube::api::Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await
        .expect("kubectl scale");
    scaled_down(&fake);
    let writes = fake.writes();

    leave_a_dead_attempt(&app, &id).await;

    let list = app
        .wait_incidents("taken over and settled", |l| l[0]["phase"] == "verified")
        .await;
    assert_eq!(list[0]["executed"], false, "not our rollback: {}", list[0]);
    assert_eq!(fake.writes(), writes, "nothing written by the takeover");
    let inc = app.incident(&id.0).await;
    let done = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "action_succeeded")
        .expect("the takeover's result");
    let summary = done["summary"].as_str().unwrap();
    assert!(
        summary.contains("switch service/portal-api-prod selector to app=portal-api,version=v1.0.0-rc.0: already done, by `kubectl-patch` (Update at "),
        "{summary}"
    );
    assert!(
        summary.starts_with("found already reverted (service/portal-api-prod by `kubectl-patch` (Update at ")
            && summary.contains(&format!(
            "(the interrupted earlier attempt by {DEAD} did not write it): not counted as this incident's rollback; "
        )),
        "{summary}"
    );
    assert!(
        summary.ends_with("scale deployment/portal-api-canary to 0: already done"),
        "{summary}"
    );
}

/// A takeover that fails after the dead replica had begun to write (it switched the Service,
/// then died; the takeover finds the switch done and the scale refused) is a partial
/// rollback: counted for the guards and said so, never "nothing was changed".
#[tokio::test]
async fn a_takeover_that_fails_after_the_dead_replicas_write_is_a_partial_rollback() {
    let (fake, app, id) = takeover_world().await;
    // The dead replica's write took: the Service is switched, by our field manager.
    let services: kube::Api<k8s_openapi::api::core::v1::Service> = kube::Api::namespaced(fake.client(), NS);
    let patch: json_patch::Patch = serde_json::from_value(json!([{"op": "add", "path": "/spec/selector",
        "value": {"app": "portal-api", "version": "v1.0.0-rc.0"}}]))
    .unwrap();
    let params = kube::api::PatchParams {
        field_manager: Some("rollback-responder".into()),
        ..Default::default()
    };
    services
        .patch("portal-api-prod", &params, &kube::api::Patch::Json::<()>(patch))
        .await
        .expect("the dead replica's switch");
    fake.deny("patch", "deployments/scale");
    leave_a_dead_attempt(&app, &id).await;

    let list = app
        .wait_incidents("taken over and failed", |l| l[0]["phase"] == "failed")
        .await;
    assert_eq!(list[0]["executed"], true, "the switch was ours: {}", list[0]);
    let inc = app.incident(&id.0).await;
    let failed = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "action_failed")
        .expect("the takeover's result");
    let summary = failed["summary"].as_str().unwrap();
    assert!(
        summary.starts_with(&format!(
            "partial rollback: the writes of the interrupted earlier attempt of {DEAD} (begun at "
        )),
        "{summary}"
    );
    assert!(!summary.contains("nothing was changed"), "{summary}");
}

/// The usual Helm/Kustomize switch from the canary's instance to the stable one's: every pod
/// the new selector picks has another `app.kubernetes.io/instance` than the current selector,
/// by design; they are the same app, so the switch is made (a revert that was always refused
/// as foreign pods before).
#[tokio::test]
async fn a_switch_from_the_canary_instance_to_the_stable_one_is_made() {
    let fake = FakeKube::start().await;
    fn instance(i: &str) -> [(&str, &str); 2] {
        [("app", "portal-api"), ("app.kubernetes.io/instance", i)]
    }
    fake.insert(
        "services",
        service(NS, "portal-api-prod", &instance("portal-api-canary")),
    );
    for i in 0..2 {
        fake.insert(
            "pods",
            pod(NS, &format!("portal-api-{i}"), &instance("portal-api"), true),
        );
    }
    fake.insert(
        "pods",
        pod(NS, "portal-api-canary-0", &instance("portal-api-canary"), true),
    );
    let exec = executor(&fake);
    let to_stable = KubeStep::SwitchService {
        service: "portal-api-prod".into(),
        selector: sel(&instance("portal-api")),
    };
    let (result, _) = run(&exec, &target(vec![to_stable]), false).await;
    assert!(result.expect("switched").changed);
    assert_eq!(
        fake.get("services", NS, "portal-api-prod").unwrap()["spec"]["selector"],
        json!({"app": "portal-api", "app.kubernetes.io/instance": "portal-api"})
    );
}
