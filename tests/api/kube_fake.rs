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

/// What the Deployment controller does once the canary is scaled to 0: observes the new
/// generation and reports no pods left.
fn scaled_down(fake: &FakeKube) {
    fake.modify("deployments", NS, "portal-api-canary", |d| {
        let generation = d["metadata"]["generation"].clone();
        d["status"] = json!({"observedGeneration": generation, "replicas": 0, "updatedReplicas": 0,
            "readyReplicas": 0, "availableReplicas": 0});
    });
}

// The rest, by theme; each sees this file's helpers.
mod incidents;
mod takeovers;

pub(crate) use takeovers::{incident_opens, patch_template, released_three_times, revision_and_image};
mod undo_and_verify;
