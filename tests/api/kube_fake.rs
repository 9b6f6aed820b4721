//! The Kubernetes executor end to end against the fake API server in `support::fake_kube`
//! (a real kube client over plain HTTP on loopback): the seed's rollback commands, rollout
//! undo, pre-checks, crash-safe re-runs, dry runs, conflicts, RBAC errors and verification.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::support::fake_kube::{deployment, endpointslice, pod, replicaset, service, template, FakeKube};
use rollback_responder::action::kubernetes::{
    KubeError, KubeExecutor, KubeSettings, KubeStep, KubeStepRecord, KubernetesTarget, ObjectState, StepResult,
    UNDO_MARKER_ANNOTATION,
};
use rollback_responder::incident::AuditKind;
use serde_json::{json, Value};

pub(crate) const NS: &str = "portal";
const DEPLOY_UID: &str = "11111111-1111-4111-8111-111111111111";

fn sel(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

pub(crate) fn target(steps: Vec<KubeStep>) -> KubernetesTarget {
    KubernetesTarget {
        namespace: NS.into(),
        steps,
        min_ready_replicas: 2,
        rollout_timeout: Duration::from_secs(5),
        gitops: None,
    }
}

fn switch_step() -> KubeStep {
    KubeStep::SwitchService {
        service: "portal-api-prod".into(),
        selector: sel(&[("app", "portal-api"), ("version", "v1.0.0-rc.0")]),
    }
}

fn scale_step() -> KubeStep {
    KubeStep::Scale {
        deployment: "portal-api-canary".into(),
        replicas: 0,
    }
}

/// The seed's world: portal-api-prod points at v1.0.0 (plus a stale `track` key), stable pods
/// v1.0.0-rc.0 (ready unless told otherwise), and the canary Deployment at 3 replicas.
pub(crate) fn seed_world(fake: &FakeKube, stable_ready: bool) {
    fake.insert(
        "services",
        service(
            NS,
            "portal-api-prod",
            &[("app", "portal-api"), ("version", "v1.0.0"), ("track", "canary")],
        ),
    );
    for i in 0..2 {
        fake.insert(
            "pods",
            pod(
                NS,
                &format!("portal-api-stable-{i}"),
                &[("app", "portal-api"), ("version", "v1.0.0-rc.0")],
                stable_ready,
            ),
        );
    }
    fake.insert(
        "pods",
        pod(
            NS,
            "portal-api-canary-0",
            &[("app", "portal-api"), ("version", "v1.0.0")],
            true,
        ),
    );
    let canary_tpl = template(&[("app", "portal-api"), ("version", "v1.0.0")], "portal-api:1.0.0");
    fake.insert(
        "deployments",
        deployment(
            NS,
            "portal-api-canary",
            "22222222-2222-4222-8222-222222222222",
            &[("app", "portal-api"), ("version", "v1.0.0")],
            canary_tpl,
            1,
        ),
    );
}

/// Deployment `portal-api` at revision 3 (image 1.0.0) with ReplicaSets for revisions 1-3, and
/// a foreign ReplicaSet (other owner, higher revision) that the label selector also matches.
fn undo_world(fake: &FakeKube) -> [Value; 3] {
    let sel = [("app", "portal-api")];
    let tpls = [
        template(&[("app", "portal-api"), ("version", "v0.9.0")], "portal-api:0.9.0"),
        template(
            &[("app", "portal-api"), ("version", "v1.0.0-rc.0")],
            "portal-api:1.0.0-rc.0",
        ),
        template(&[("app", "portal-api"), ("version", "v1.0.0")], "portal-api:1.0.0"),
    ];
    let mut d = deployment(NS, "portal-api", DEPLOY_UID, &sel, tpls[2].clone(), 3);
    d["metadata"]["annotations"]["team"] = json!("portal");
    d["metadata"]["annotations"]["kubernetes.io/change-cause"] = json!("deploy 1.0.0");
    fake.insert("deployments", d);
    let hashes = ["aaa111", "bbb222", "ccc333"];
    for (i, tpl) in tpls.iter().enumerate() {
        let rev = i as u64 + 1;
        let (replicas, ready) = if rev == 3 { (3, 3) } else { (0, 0) };
        let mut rs = replicaset(NS, "portal-api", DEPLOY_UID, hashes[i], tpl, rev, replicas, ready);
        rs["metadata"]["annotations"]["kubernetes.io/change-cause"] = json!(format!("deploy revision {rev}"));
        fake.insert("replicasets", rs);
    }
    let foreign = replicaset(
        NS,
        "portal-api-shadow",
        "99999999-9999-4999-8999-999999999999",
        "zzz999",
        &template(&[("app", "portal-api"), ("version", "evil")], "evil:1"),
        9,
        0,
        0,
    );
    fake.insert("replicasets", foreign);
    tpls
}

pub(crate) fn undo_step(to_revision: Option<u64>) -> KubeStep {
    KubeStep::RolloutUndo {
        deployment: "portal-api".into(),
        to_revision,
        to_image: None,
    }
}

pub(crate) fn executor(fake: &FakeKube) -> KubeExecutor {
    KubeExecutor::new(fake.client(), &KubeSettings::default())
}

async fn run(
    exec: &KubeExecutor,
    t: &KubernetesTarget,
    dry_run: bool,
) -> (
    Result<rollback_responder::action::kubernetes::KubeOutcome, KubeError>,
    Vec<KubeStepRecord>,
) {
    let mut records = Vec::new();
    let mut record = |r: KubeStepRecord| records.push(r);
    let result = exec.revert(t, dry_run, &mut record).await;
    (result, records)
}

fn template_without_hash(d: &Value) -> Value {
    let mut t = d["spec"]["template"].clone();
    if let Some(l) = t["metadata"]["labels"].as_object_mut() {
        l.remove("pod-template-hash");
    }
    t
}

#[tokio::test]
async fn seed_order_switches_the_selector_whole_then_scales_the_canary_to_zero() {
    let fake = FakeKube::start().await;
    seed_world(&fake, true);
    let exec = executor(&fake);
    let t = target(vec![switch_step(), scale_step()]);

    let (result, records) = run(&exec, &t, false).await;
    let outcome = result.expect("revert succeeds");
    assert!(outcome.changed && !outcome.dry_run);
    assert_eq!(outcome.steps.len(), 2);

    // The selector is replaced as a whole: the stale `track` key is gone. (The seed's literal
    // `kubectl patch service -p '{"spec":{"selector":{"version":..}}}'` is a strategic merge and
    // would have kept both `track` and any other key.)
    let svc = fake.get("services", NS, "portal-api-prod").expect("service");
    assert_eq!(
        svc["spec"]["selector"],
        json!({"app": "portal-api", "version": "v1.0.0-rc.0"})
    );
    assert_eq!(
        svc["spec"]["ports"][0]["port"], 80,
        "the rest of the Service is untouched"
    );
    let canary = fake.get("deployments", NS, "portal-api-canary").expect("canary");
    assert_eq!(canary["spec"]["replicas"], 0);
    assert_eq!(
        canary["spec"]["template"]["spec"]["containers"][0]["image"],
        "portal-api:1.0.0"
    );
    assert_eq!(fake.writes(), 2);

    match &outcome.steps[0].result {
        StepResult::Changed { before, after } => {
            assert!(matches!(before, ObjectState::Service { selector, .. } if selector.get("track").is_some()));
            assert!(matches!(after, ObjectState::Service { selector, .. }
                if *selector == sel(&[("app", "portal-api"), ("version", "v1.0.0-rc.0")])));
        }
        other => panic!("switch: {other:?}"),
    }
    match &outcome.steps[1].result {
        StepResult::Changed { before, after } => {
            assert!(matches!(before, ObjectState::Scale { replicas: 3, .. }));
            assert!(matches!(after, ObjectState::Scale { replicas: 0, .. }));
        }
        other => panic!("scale: {other:?}"),
    }
    assert!(records.iter().any(|r| matches!(
        r,
        KubeStepRecord::PreCheck {
            index: 0,
            matching: 2,
            ready: 2,
            required: 2,
            passed: true,
            ..
        }
    )));
    assert!(records.iter().any(|r| matches!(
        r,
        KubeStepRecord::ReadBack {
            index: 1,
            matches: true,
            ..
        }
    )));

    let patches: Vec<_> = fake.requests().into_iter().filter(|r| r.method == "PATCH").collect();
    assert_eq!(patches.len(), 2);
    assert_eq!(patches[0].path, "/api/v1/namespaces/portal/services/portal-api-prod");
    assert_eq!(patches[0].content_type.as_deref(), Some("application/json-patch+json"));
    assert_eq!(
        patches[0].query.get("fieldManager").map(String::as_str),
        Some("rollback-responder")
    );
    assert_eq!(
        patches[1].path,
        "/apis/apps/v1/namespaces/portal/deployments/portal-api-canary/scale"
    );
    assert_eq!(patches[1].content_type.as_deref(), Some("application/merge-patch+json"));

    // The outcome and every record serialize for the audit trail.
    let v = serde_json::to_value(&outcome).expect("outcome json");
    assert_eq!(v["steps"][0]["result"], "changed");
    for r in &records {
        assert!(serde_json::to_value(r).expect("record json")["step"].is_string());
    }
}

#[tokio::test]
async fn rerun_after_a_partial_run_finishes_without_repeating_done_steps() {
    let fake = FakeKube::start().await;
    seed_world(&fake, true);
    let exec = executor(&fake);
    // "Crash" after step 1: only the switch ran.
    let (first, _) = run(&exec, &target(vec![switch_step()]), false).await;
    first.expect("first step");
    assert_eq!(fake.writes(), 1);

    let t = target(vec![switch_step(), scale_step()]);
    let (second, records) = run(&exec, &t, false).await;
    let outcome = second.expect("takeover run");
    assert!(matches!(outcome.steps[0].result, StepResult::AlreadyDone { .. }));
    assert!(matches!(outcome.steps[1].result, StepResult::Changed { .. }));
    assert_eq!(fake.writes(), 2, "only the scale was written");
    // A done step needs no pre-check (its traffic already moved).
    assert!(!records.iter().any(|r| matches!(r, KubeStepRecord::PreCheck { .. })));

    let (third, _) = run(&exec, &t, false).await;
    let outcome = third.expect("third run");
    assert!(!outcome.changed);
    assert!(outcome
        .steps
        .iter()
        .all(|s| matches!(s.result, StepResult::AlreadyDone { .. })));
    assert_eq!(fake.writes(), 2);
}

#[tokio::test]
async fn precheck_failure_writes_nothing() {
    let fake = FakeKube::start().await;
    seed_world(&fake, false);
    let exec = executor(&fake);
    let (result, records) = run(&exec, &target(vec![switch_step(), scale_step()]), false).await;
    let err = result.expect_err("stable pods are not ready");
    assert!(err.is_precheck(), "{err}");
    assert!(matches!(
        err,
        KubeError::PreCheckFailed {
            matching: 2,
            ready: 0,
            required: 2,
            ..
        }
    ));
    assert_eq!(fake.writes(), 0);
    assert!(records
        .iter()
        .any(|r| matches!(r, KubeStepRecord::PreCheck { passed: false, .. })));
    assert!(!fake.requests().iter().any(|r| r.method == "PATCH"));
}

#[tokio::test]
async fn dry_run_validates_on_the_server_and_writes_nothing() {
    let fake = FakeKube::start().await;
    seed_world(&fake, true);
    let exec = executor(&fake);
    let (result, records) = run(&exec, &target(vec![switch_step(), scale_step()]), true).await;
    let outcome = result.expect("dry run");
    assert!(outcome.dry_run && !outcome.changed);
    assert_eq!(fake.writes(), 0);
    match &outcome.steps[0].result {
        StepResult::DryRun { would_write, .. } => {
            assert!(matches!(would_write, ObjectState::Service { selector, .. }
            if *selector == sel(&[("app", "portal-api"), ("version", "v1.0.0-rc.0")])))
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        &outcome.steps[1].result,
        StepResult::DryRun {
            would_write: ObjectState::Scale { replicas: 0, .. },
            ..
        }
    ));
    let patches: Vec<_> = fake.requests().into_iter().filter(|r| r.method == "PATCH").collect();
    assert_eq!(patches.len(), 2);
    assert!(patches
        .iter()
        .all(|p| p.query.get("dryRun").map(String::as_str) == Some("All")));
    assert!(records
        .iter()
        .any(|r| matches!(r, KubeStepRecord::Planned { dry_run: true, .. })));
    let svc = fake.get("services", NS, "portal-api-prod").expect("service");
    assert_eq!(svc["spec"]["selector"]["version"], "v1.0.0");
}

#[tokio::test]
async fn forbidden_scale_is_reported_with_the_missing_permission_even_in_a_dry_run() {
    let fake = FakeKube::start().await;
    seed_world(&fake, true);
    fake.deny("patch", "deployments/scale");
    let exec = executor(&fake);
    let (result, _) = run(&exec, &target(vec![switch_step(), scale_step()]), true).await;
    let err = result.expect_err("scale patch is denied");
    match &err {
        KubeError::Forbidden {
            verb,
            resource,
            api_group,
            namespace,
            message,
        } => {
            assert_eq!(
                (verb.as_str(), resource.as_str(), api_group.as_str()),
                ("patch", "deployments/scale", "apps")
            );
            assert_eq!(namespace, NS);
            assert!(message.contains("cannot patch resource"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        err.to_string()
            .contains("add verb \"patch\" for resource \"deployments/scale\""),
        "{err}"
    );
    assert_eq!(err.code(), "forbidden");
    assert!(!err.is_retryable());
    assert_eq!(fake.writes(), 0);
}

#[tokio::test]
async fn missing_service_is_not_found_before_anything_is_written() {
    let fake = FakeKube::start().await;
    seed_world(&fake, true);
    let exec = executor(&fake);
    let t = target(vec![
        switch_step(),
        KubeStep::Scale {
            deployment: "no-such-deployment".into(),
            replicas: 0,
        },
    ]);
    let (result, _) = run(&exec, &t, false).await;
    let err = result.expect_err("missing deployment");
    assert_eq!(
        err,
        KubeError::NotFound {
            kind: "Deployment".into(),
            namespace: NS.into(),
            name: "no-such-deployment".into()
        }
    );
    assert_eq!(fake.writes(), 0, "all reads happen before the first write");
}

#[tokio::test]
async fn conflicting_writer_is_retried_after_a_re_read() {
    let fake = FakeKube::start().await;
    seed_world(&fake, true);
    fake.concurrent_writes(1);
    let exec = executor(&fake);
    let (result, records) = run(&exec, &target(vec![switch_step()]), false).await;
    result.expect("second attempt wins");
    let retries: Vec<_> = records
        .iter()
        .filter(|r| matches!(r, KubeStepRecord::ConflictRetry { .. }))
        .collect();
    assert_eq!(retries.len(), 1);
    assert!(
        matches!(retries[0], KubeStepRecord::ConflictRetry { attempt: 1, will_retry: true, code, .. } if code == "api")
    );
    let svc = fake.get("services", NS, "portal-api-prod").expect("service");
    assert_eq!(
        svc["spec"]["selector"],
        json!({"app": "portal-api", "version": "v1.0.0-rc.0"})
    );

    // A writer that never stops wins: Conflict after 1 + max_conflict_retries attempts.
    let fake = FakeKube::start().await;
    seed_world(&fake, true);
    fake.concurrent_writes(100);
    let exec = KubeExecutor::new(
        fake.client(),
        &KubeSettings {
            max_conflict_retries: 2,
            ..KubeSettings::default()
        },
    );
    let (result, _) = run(&exec, &target(vec![scale_step()]), false).await;
    let err = result.expect_err("never wins");
    assert!(matches!(err, KubeError::Conflict { attempts: 3, .. }), "{err:?}");
    assert!(err.is_retryable());
    assert_eq!(fake.writes(), 0);
}

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

/// Issue 4's end to end: a real Alertmanager delivers an alert matching an automatic
/// Kubernetes policy; the Service selector and the canary's replicas end as the seed's
/// `kubectl patch service` and `kubectl scale --replicas=0` would leave them, verified.
#[tokio::test]
async fn alertmanager_alert_runs_the_seed_rollback_commands_on_kubernetes() {
    use crate::helpers::*;
    use crate::peers::Alertmanager;
    use rollback_responder::action::Executors;

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
    for: 2m
    mode: auto
verification:
  bake: 3s
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
    let am = Alertmanager::start(&app.url("/webhook/alertmanager"), TOKEN).await;
    let run = uuid::Uuid::now_v7().simple().to_string();
    am.post(
        json!({"alertname": "HealthCheckFailing", "service": "portal-api", "severity": "critical", "run": run}),
        &ago(150),
        None,
    )
    .await;
    app.wait_incidents("verifying", |l| l.len() == 1 && l[0]["phase"] == "verifying")
        .await;
    scaled_down(&fake);
    let list = app
        .wait_incidents("verified kubernetes rollback", |l| {
            l.len() == 1 && l[0]["phase"] == "verified"
        })
        .await;
    let svc = fake.get("services", NS, "portal-api-prod").unwrap();
    assert_eq!(
        svc["spec"]["selector"],
        json!({"app": "portal-api", "version": "v1.0.0-rc.0"}),
        "replaced, stale key gone"
    );
    assert_eq!(
        fake.get("deployments", NS, "portal-api-canary").unwrap()["spec"]["replicas"],
        0
    );
    // Exactly two writes reached the API server: the selector patch and the scale patch.
    assert_eq!(fake.writes(), 2);
    let patched: Vec<String> = fake
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(
        patched,
        [
            format!("/api/v1/namespaces/{NS}/services/portal-api-prod"),
            format!("/apis/apps/v1/namespaces/{NS}/deployments/portal-api-canary/scale"),
        ]
    );
    let inc = app.incident(list[0]["id"].as_str().unwrap()).await;
    assert_eq!(inc["executed"], true);
    let done = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "action_succeeded")
        .unwrap();
    assert_eq!(done["detail"]["steps"][0]["before"]["selector"]["version"], "v1.0.0");
    assert_eq!(
        done["detail"]["steps"][0]["after"]["selector"]["version"],
        "v1.0.0-rc.0"
    );
    let checks: Vec<&Value> = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "verification_check")
        .collect();
    let names: Vec<&str> = checks.iter().map(|c| c["detail"]["check"].as_str().unwrap()).collect();
    assert_eq!(names, ["read_back", "ready"]);
    assert!(checks.iter().all(|c| c["detail"]["passed"] == true), "{checks:#?}");
    // The readiness evidence is kept: two ready endpoints of the stable pods.
    let ready = &checks[1]["detail"];
    assert!(
        ready["evidence"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["ready_endpoints"] == 2 && s["passed"] == true),
        "{ready}"
    );
    let rb = &checks[0]["detail"];
    assert!(
        rb["value"]
            .as_str()
            .unwrap()
            .contains("svc/portal-api-prod app=portal-api,version=v1.0.0-rc.0; deploy/portal-api-canary replicas 0"),
        "{rb}"
    );
}

/// Drift during the bake: someone puts the Service back on the canary (`kubectl edit`). The
/// read-back sees it, names the field's manager, fails verification and writes nothing back.
#[tokio::test]
async fn a_service_selector_changed_back_during_the_bake_is_drift_with_its_manager() {
    use crate::helpers::*;
    use rollback_responder::action::Executors;

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
    mode: auto
verification:
  bake: 60s
  interval: 200ms
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
        vec![alert("HealthCheckFailing", "portal-api", "kd01", &ago(60), None)],
    ))
    .await;
    let list = app
        .wait_incidents("verifying", |l| l.len() == 1 && l[0]["phase"] == "verifying")
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    scaled_down(&fake);
    let writes = fake.writes();
    assert_eq!(
        fake.get("services", NS, "portal-api-prod").unwrap()["spec"]["selector"]["version"],
        "v1.0.0-rc.0"
    );
    // `kubectl edit` puts the canary back; the API server records who owns the selector now.
    fake.modify("services", NS, "portal-api-prod", |s| {
        s["spec"]["selector"] = json!({"app": "portal-api", "version": "v1.0.0"});
        s["metadata"]["managedFields"] = json!([
            {"manager": "rollback-responder", "operation": "Update", "time": "2026-12-03T06:00:00Z",
             "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:selector": {}}}},
            {"manager": "kubectl-edit", "operation": "Update", "time": "2026-12-03T06:00:02Z",
             "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:selector": {}}}}
        ]);
    });
    let inc = app
        .wait_incident(&id, "verification failed on drift", |i| {
            i["phase"] == "verification_failed"
        })
        .await;
    let rb = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "verification_check" && e["detail"]["check"] == "read_back")
        .unwrap()["detail"]
        .clone();
    assert_eq!(rb["passed"], false, "{rb}");
    let drift = rb["drift"].as_str().unwrap();
    assert!(
        drift.starts_with(
            "service/portal-api-prod selector changed back to app=portal-api,version=v1.0.0 \
             (written: app=portal-api,version=v1.0.0-rc.0) by `kubectl-edit` (Update at 2026-12-03T06:00:02Z"
        ),
        "{drift}"
    );
    // Good samples before the drift, then the drift: the check read all along.
    let samples = rb["samples"].as_array().unwrap();
    assert!(samples.len() >= 2 && samples[0][2] == true, "{rb}");
    let failed = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "verification_failed")
        .unwrap();
    assert!(
        failed["summary"]
            .as_str()
            .unwrap()
            .contains("read_back: DRIFT: service/portal-api-prod"),
        "{failed}"
    );
    // Not fought: nothing written after the drift; the selector is what the person set.
    assert_eq!(fake.writes(), writes);
    assert_eq!(
        fake.get("services", NS, "portal-api-prod").unwrap()["spec"]["selector"]["version"],
        "v1.0.0"
    );
    assert_eq!(inc["open"], true, "a failed verification waits for a human");
}

/// The read-back through the bake, step by step: a restored template replaced by the canary's
/// and a scaled Deployment scaled back are drift, each named with the field's manager.
#[tokio::test]
async fn read_back_sees_a_replaced_template_and_a_scale_back_with_their_managers() {
    use rollback_responder::action::kubernetes::KubeBaseline;

    let fake = FakeKube::start().await;
    seed_world(&fake, true);
    let tpls = undo_world(&fake);
    let exec = executor(&fake);
    let t = target(vec![undo_step(None), scale_step()]);
    run(&exec, &t, false).await.0.expect("revert");
    let mut baseline: Option<KubeBaseline> = None;
    let first = exec.read_back_sample(&t, &mut baseline).await.expect("read");
    assert!(first.ok, "{first:?}");
    assert_eq!(
        first.value,
        "as written: deploy/portal-api revision 3 [api=portal-api:1.0.0-rc.0]; deploy/portal-api-canary replicas 0"
    );
    let again = exec.read_back_sample(&t, &mut baseline).await.expect("read");
    assert!(again.ok && again.drift.is_none(), "{again:?}");
    let reads = fake.requests().len();

    // A pipeline re-applies the canary's template.
    fake.modify("deployments", NS, "portal-api", |d| {
        d["spec"]["template"] = tpls[2].clone();
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = json!("4");
        d["metadata"]["managedFields"] = json!([
            {"manager": "argocd-controller", "operation": "Apply", "time": "2026-12-03T06:10:00Z",
             "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:template": {"f:spec": {}}}}}
        ]);
    });
    let drift = exec.read_back_sample(&t, &mut baseline).await.expect("read");
    assert!(!drift.ok);
    let what = drift.drift.unwrap();
    assert_eq!(
        what,
        "deployment/portal-api is no longer the restored template: revision 3 [api=portal-api:1.0.0-rc.0] -> \
         4 [api=portal-api:1.0.0] by `argocd-controller` (Apply at 2026-12-03T06:10:00Z)"
    );
    assert!(fake.requests().len() > reads, "it read the API again");

    // Put the template back; then someone scales the canary up again.
    fake.modify("deployments", NS, "portal-api", |d| {
        d["spec"]["template"] = tpls[1].clone();
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = json!("3");
    });
    fake.modify("deployments", NS, "portal-api-canary", |d| {
        d["spec"]["replicas"] = json!(3);
    });
    let scaled = exec.read_back_sample(&t, &mut baseline).await.expect("read");
    assert_eq!(
        scaled.drift.as_deref(),
        Some(
            "deployment/portal-api-canary replicas changed to 3 (written: 0) \
             by unknown (no managed-fields entry owns /f:spec/f:replicas)"
        )
    );
    assert_eq!(
        fake.writes(),
        2,
        "the read-back writes nothing: only the revert's two writes"
    );
}

/// What the Deployment controller does once the canary is scaled to 0: observes the new
/// generation and reports no pods left.
fn scaled_down(fake: &FakeKube) {
    fake.modify("deployments", NS, "portal-api-canary", |d| {
        let generation = d["metadata"]["generation"].clone();
        d["status"] = json!({"observedGeneration": generation, "replicas": 0, "updatedReplicas": 0,
            "readyReplicas": 0, "availableReplicas": 0});
    });
}

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
