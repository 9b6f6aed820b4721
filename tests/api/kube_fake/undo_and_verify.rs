//! Rollout undo, verification, the client from a kubeconfig, and the fake server itself.

use super::*;

#[tokio::test]
async fn rollout_undo_to_previous_revision_keeps_annotations_and_is_idempotent() {
    let fake = FakeKube::start().await;
    let tpls = undo_world(&fake);
    let exec = executor(&fake);
    let t = target(vec![undo_step(None)]);
    let (result, records) = run(&exec, &t, false).await;
    let outcome = result.expect("undo");
    assert!(outcome.changed);

    let d = fake.get("deployments", NS, "portal-api").expect("deployment");
    assert_eq!(
        template_without_hash(&d),
        tpls[1],
        "revision 2's template, without pod-template-hash"
    );
    let ann = d["metadata"]["annotations"].as_object().expect("annotations");
    assert_eq!(
        ann["team"], "portal",
        "our own annotations survive (kubectl would drop them)"
    );
    assert_eq!(
        ann["kubernetes.io/change-cause"], "deploy revision 2",
        "copied from the ReplicaSet"
    );
    assert_eq!(
        ann["deployment.kubernetes.io/revision"], "3",
        "skip-list: kept from the Deployment"
    );
    assert!(
        !ann.contains_key("deployment.kubernetes.io/desired-replicas"),
        "skip-list: not copied"
    );
    let marker: Value =
        serde_json::from_str(ann[UNDO_MARKER_ANNOTATION].as_str().expect("marker")).expect("marker json");
    assert_eq!(marker["to_replica_set"], "portal-api-bbb222");
    assert_eq!(d["metadata"]["generation"], 2);
    match &outcome.steps[0].result {
        StepResult::Changed { before, after } => {
            assert!(
                matches!(before, ObjectState::Deployment { images, replica_set: Some(rs), .. }
                if images["api"] == "portal-api:1.0.0" && rs == "portal-api-ccc333")
            );
            assert!(
                matches!(after, ObjectState::Deployment { images, replica_set: Some(rs), .. }
                if images["api"] == "portal-api:1.0.0-rc.0" && rs == "portal-api-bbb222")
            );
        }
        other => panic!("{other:?}"),
    }
    // The restored ReplicaSet is at 0: recorded, not blocking.
    assert!(records.iter().any(|r| matches!(r,
        KubeStepRecord::PreCheck { passed: true, ready: 0, note: Some(_), object, .. } if object == "replicaset/portal-api-bbb222")));

    // The controller now gives the restored ReplicaSet the newest revision, so "previous"
    // would be the canary again; the marker makes a second run a no-op instead of a flip back.
    fake.modify("replicasets", NS, "portal-api-bbb222", |rs| {
        rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = json!("4");
    });
    fake.modify("deployments", NS, "portal-api", |d| {
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = json!("4");
    });
    let writes = fake.writes();
    let (again, _) = run(&exec, &t, false).await;
    let again = again.expect("second run");
    assert!(!again.changed);
    assert!(matches!(&again.steps[0].result, StepResult::AlreadyDone { reason, .. } if reason.contains("earlier run")));
    assert_eq!(fake.writes(), writes);
}

#[tokio::test]
async fn rollout_undo_to_a_named_revision() {
    let fake = FakeKube::start().await;
    let tpls = undo_world(&fake);
    let exec = executor(&fake);
    let (result, _) = run(&exec, &target(vec![undo_step(Some(1))]), false).await;
    result.expect("undo to 1");
    let d = fake.get("deployments", NS, "portal-api").expect("deployment");
    assert_eq!(template_without_hash(&d), tpls[0]);
    assert_eq!(d["metadata"]["annotations"]["team"], "portal");
    assert_eq!(
        d["metadata"]["annotations"]["kubernetes.io/change-cause"],
        "deploy revision 1"
    );

    let (missing, _) = run(&exec, &target(vec![undo_step(Some(7))]), false).await;
    assert!(
        matches!(missing, Err(KubeError::RevisionNotFound { revision: 7, ref available, .. }) if *available == vec![1, 2, 3])
    );
}

#[tokio::test]
async fn paused_deployment_is_refused() {
    let fake = FakeKube::start().await;
    undo_world(&fake);
    fake.modify("deployments", NS, "portal-api", |d| d["spec"]["paused"] = json!(true));
    let exec = executor(&fake);
    let (result, _) = run(&exec, &target(vec![undo_step(None)]), false).await;
    assert_eq!(
        result.expect_err("paused"),
        KubeError::Paused {
            deployment: "portal-api".into()
        }
    );
    assert_eq!(fake.writes(), 0);
}

#[tokio::test]
async fn undo_to_the_current_template_is_a_no_op() {
    let fake = FakeKube::start().await;
    undo_world(&fake);
    let exec = executor(&fake);
    let (result, _) = run(&exec, &target(vec![undo_step(Some(3))]), false).await;
    let outcome = result.expect("no-op");
    assert!(!outcome.changed);
    assert!(matches!(&outcome.steps[0].result,
        StepResult::AlreadyDone { reason, .. } if reason.contains("current template already matches")));
    assert_eq!(fake.writes(), 0);
}

#[tokio::test]
async fn verify_passes_with_ready_endpoints_and_a_completed_rollout() {
    let fake = FakeKube::start().await;
    seed_world(&fake, true);
    undo_world(&fake);
    fake.insert(
        "endpointslices",
        endpointslice(
            NS,
            "portal-api-prod",
            "x1",
            &[("portal-api-stable-0", true), ("portal-api-canary-0", true)],
        ),
    );
    let exec = executor(&fake);
    let t = target(vec![switch_step(), undo_step(None)]);
    run(&exec, &t, false).await.0.expect("revert");
    // The fake runs no controller: finish the rollout by hand.
    fake.modify("deployments", NS, "portal-api", |d| {
        d["status"] = json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3, "readyReplicas": 3, "availableReplicas": 3});
    });
    // One ready endpoint of the stable pods is not `min_ready_replicas: 2`.
    let mut short = t.clone();
    short.rollout_timeout = Duration::from_millis(300);
    let err = exec.verify(&short, &mut |_| {}).await.expect_err("1 of 2 ready");
    assert!(
        matches!(
            err,
            KubeError::NoReadyEndpoints {
                ready: 1,
                required: 2,
                ..
            }
        ),
        "only the stable pod's endpoint counts, and one is not enough: {err:?}"
    );
    fake.insert(
        "endpointslices",
        endpointslice(NS, "portal-api-prod", "x2", &[("portal-api-stable-1", true)]),
    );
    let mut records = Vec::new();
    exec.verify(&t, &mut |r| records.push(r)).await.expect("verified");
    assert!(
        records.iter().any(|r| matches!(
            r,
            KubeStepRecord::Endpoints {
                ready_endpoints: 2,
                passed: true,
                ..
            }
        )),
        "{records:?}"
    );
    assert!(records
        .iter()
        .any(|r| matches!(r, KubeStepRecord::Rollout { progress, .. } if progress.complete)));
}

#[tokio::test]
async fn verify_fails_without_ready_endpoints_or_rollout() {
    let fake = FakeKube::start().await;
    seed_world(&fake, true);
    undo_world(&fake);
    // Only the canary pod's endpoint is ready, the stable one is not.
    fake.insert(
        "endpointslices",
        endpointslice(
            NS,
            "portal-api-prod",
            "x1",
            &[("portal-api-stable-0", false), ("portal-api-canary-0", true)],
        ),
    );
    let exec = executor(&fake);
    let mut t = target(vec![switch_step()]);
    t.rollout_timeout = Duration::from_millis(300);
    let err = exec.verify(&t, &mut |_| {}).await.expect_err("no ready endpoint");
    assert!(
        matches!(err, KubeError::NoReadyEndpoints { ref service, .. } if service == "portal-api-prod"),
        "{err:?}"
    );

    let mut t = target(vec![undo_step(None)]);
    t.rollout_timeout = Duration::from_millis(300);
    run(&exec, &t, false).await.0.expect("revert");
    // generation 2, observedGeneration still 1: the controller never picked it up.
    let started = std::time::Instant::now();
    let err = exec.verify(&t, &mut |_| {}).await.expect_err("rollout never completes");
    assert!(
        matches!(
            err,
            KubeError::RolloutTimedOut {
                progress_deadline_exceeded: false,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));

    // ProgressDeadlineExceeded fails at once, whatever the timeout.
    fake.modify("deployments", NS, "portal-api", |d| {
        d["status"] = json!({"observedGeneration": 2, "replicas": 4, "updatedReplicas": 1, "availableReplicas": 3,
            "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]});
    });
    t.rollout_timeout = Duration::from_secs(60);
    let started = std::time::Instant::now();
    let err = exec.verify(&t, &mut |_| {}).await.expect_err("deadline exceeded");
    assert!(
        matches!(
            err,
            KubeError::RolloutTimedOut {
                progress_deadline_exceeded: true,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn from_settings_builds_a_real_client_from_a_kubeconfig() {
    let fake = FakeKube::start().await;
    seed_world(&fake, true);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kubeconfig");
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: other\n  context:\n    cluster: nowhere\n    user: nobody\n- name: fake\n  context:\n    cluster: fake\n    user: tester\n    namespace: portal\ncurrent-context: other\nusers:\n- name: tester\n  user:\n    token: test-token\n- name: nobody\n  user: {{}}\n",
        fake.url()
    );
    std::fs::write(&path, kubeconfig).expect("write kubeconfig");
    let settings = KubeSettings {
        kubeconfig: Some(path),
        context: Some("fake".into()),
        ..KubeSettings::default()
    };
    let exec = KubeExecutor::from_settings(&settings)
        .await
        .expect("client from kubeconfig");
    let (result, _) = run(&exec, &target(vec![switch_step()]), false).await;
    assert!(result.expect("revert through from_settings").changed);

    let bad = KubeSettings {
        in_cluster: true,
        context: Some("fake".into()),
        ..KubeSettings::default()
    };
    let err = KubeExecutor::from_settings(&bad)
        .await
        .expect_err("conflicting settings");
    assert_eq!(err.code(), "config");
}

#[tokio::test]
async fn fake_server_speaks_standard_status_objects() {
    let fake = FakeKube::start().await;
    // This test checks the fake itself with raw requests, not what the executor sends.
    fake.expect_outside_rbac();
    seed_world(&fake, true);
    let http = reqwest::Client::new();
    let url = format!("{}/api/v1/namespaces/portal/services/portal-api-prod", fake.url());
    let stale: Value = http.get(&url).send().await.expect("get").json().await.expect("json");
    fake.modify("services", NS, "portal-api-prod", |s| {
        s["metadata"]["labels"] = json!({"touched": "yes"})
    });
    let resp = http.put(&url).json(&stale).send().await.expect("put");
    assert_eq!(resp.status(), 409);
    let body: Value = resp.json().await.expect("status json");
    assert_eq!(
        (body["kind"].as_str(), body["reason"].as_str()),
        (Some("Status"), Some("Conflict"))
    );

    let missing = http
        .get(format!(
            "{}/apis/apps/v1/namespaces/portal/deployments/nope",
            fake.url()
        ))
        .send()
        .await
        .expect("get missing");
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.expect("status json");
    assert_eq!(body["reason"], "NotFound");

    let failed_test = http
        .patch(&url)
        .header("content-type", "application/json-patch+json")
        .body(r#"[{"op":"test","path":"/metadata/resourceVersion","value":"0"}]"#)
        .send()
        .await
        .expect("patch");
    assert_eq!(failed_test.status(), 422);
    assert_eq!(failed_test.json::<Value>().await.expect("json")["reason"], "Invalid");
}
