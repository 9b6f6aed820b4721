//! Request shapes of the Kubernetes executor, asserted one request at a time through
//! `tower_test::mock::pair` (kube-rs's own testing pattern): method, path, query
//! (labelSelector, dryRun, fieldManager), content type and the exact patch bodies; plus how
//! 409, 422, 404, 403 and 503 answers are handled.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::{Request, Response};
use kube::client::Body;
use rollback_responder::action::kubernetes::{
    KubeError, KubeExecutor, KubeOutcome, KubeSettings, KubeStep, KubeStepRecord, KubernetesTarget, StepResult,
};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use crate::support::rbac::{Access, Role};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type RunResult = (Result<KubeOutcome, KubeError>, Vec<KubeStepRecord>);

const NS: &str = "portal";
const UID: &str = "11111111-1111-4111-8111-111111111111";

/// One request as seen by the mock server.
#[derive(Debug)]
struct Seen {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    content_type: Option<String>,
    body: Value,
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("utf8");
                out.push(u8::from_str_radix(hex, 16).expect("hex escape"));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).expect("utf8 query")
}

/// Takes the next request and answers it with `status` and `response`. Every request must be
/// one the shipped RBAC Role allows (in a cluster anything else is a 403).
async fn answer(handle: &mut Handle, status: u16, response: Value) -> Seen {
    let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("a request within 5s")
        .expect("the client is still there");
    static ROLE: std::sync::OnceLock<Role> = std::sync::OnceLock::new();
    let watch = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
    let access = Access::of(req.method().as_str(), req.uri().path(), watch);
    assert!(
        ROLE.get_or_init(Role::shipped).allows(&access),
        "the executor sent {access} ({} {}), which the shipped Role does not allow",
        req.method(),
        req.uri()
    );
    let query = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    let seen_head = (
        req.method().to_string(),
        req.uri().path().to_string(),
        req.headers()
            .get("content-type")
            .map(|v| v.to_str().expect("ascii").to_string()),
    );
    let bytes = req.into_body().collect_bytes().await.expect("request body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("json body")
    };
    send.send_response(
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&response).expect("response json")))
            .expect("response"),
    );
    Seen {
        method: seen_head.0,
        path: seen_head.1,
        query,
        content_type: seen_head.2,
        body,
    }
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn start(t: KubernetesTarget, dry_run: bool, settings: KubeSettings) -> (Handle, JoinHandle<RunResult>) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let exec = KubeExecutor::new(kube::Client::new(svc, "default"), &settings);
    let task = tokio::spawn(async move {
        let mut records = Vec::new();
        let result = exec.revert(&t, dry_run, &mut |r| records.push(r)).await;
        (result, records)
    });
    (handle, task)
}

fn target(steps: Vec<KubeStep>) -> KubernetesTarget {
    KubernetesTarget {
        namespace: NS.into(),
        steps,
        min_ready_replicas: 1,
        rollout_timeout: Duration::from_secs(1),
        gitops: None,
    }
}

fn switch() -> KubeStep {
    KubeStep::SwitchService {
        service: "portal-api-prod".into(),
        selector: [("app", "portal-api"), ("version", "v1.0.0-rc.0")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn svc(rv: &str, selector: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "portal-api-prod", "namespace": NS, "resourceVersion": rv},
           "spec": {"selector": selector, "ports": [{"port": 80}]}})
}

fn old_selector() -> Value {
    json!({"app": "portal-api", "version": "v1.0.0", "track": "canary"})
}

fn new_selector() -> Value {
    json!({"app": "portal-api", "version": "v1.0.0-rc.0"})
}

fn ready_pods() -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "5"}, "items": [
        {"metadata": {"name": "stable-0", "namespace": NS, "labels": new_selector()},
         "status": {"conditions": [{"type": "Ready", "status": "True"}]}},
    ]})
}

fn selector_patch(rv: &str) -> Value {
    json!([
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "add", "path": "/spec/selector", "value": new_selector()},
    ])
}

#[tokio::test]
async fn switch_service_sends_a_guarded_json_patch_replacing_the_selector() {
    let (mut h, task) = start(target(vec![switch()]), false, KubeSettings::default());

    let get = answer(&mut h, 200, svc("100", old_selector())).await;
    assert_eq!(
        (get.method.as_str(), get.path.as_str()),
        ("GET", "/api/v1/namespaces/portal/services/portal-api-prod")
    );

    let pods = answer(&mut h, 200, ready_pods()).await;
    assert_eq!(
        (pods.method.as_str(), pods.path.as_str()),
        ("GET", "/api/v1/namespaces/portal/pods")
    );
    assert_eq!(pods.query["labelSelector"], "app=portal-api,version=v1.0.0-rc.0");

    let patch = answer(&mut h, 200, svc("101", new_selector())).await;
    assert_eq!(
        (patch.method.as_str(), patch.path.as_str()),
        ("PATCH", "/api/v1/namespaces/portal/services/portal-api-prod")
    );
    assert_eq!(patch.content_type.as_deref(), Some("application/json-patch+json"));
    assert_eq!(
        patch.query.get("fieldManager").map(String::as_str),
        Some("rollback-responder")
    );
    assert!(!patch.query.contains_key("dryRun"));
    assert_eq!(patch.body, selector_patch("100"));

    let read_back = answer(&mut h, 200, svc("101", new_selector())).await;
    assert_eq!(read_back.method, "GET");

    let (result, records) = task.await.expect("task");
    let outcome = result.expect("switched");
    assert!(outcome.changed);
    assert!(matches!(outcome.steps[0].result, StepResult::Changed { .. }));
    let kinds: Vec<String> = records
        .iter()
        .map(|r| {
            serde_json::to_value(r).expect("json")["step"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(kinds, ["read", "pre_check", "planned", "patched", "read_back"]);
}

#[tokio::test]
async fn conflict_is_retried_after_a_re_read_with_the_new_resource_version() {
    let (mut h, task) = start(target(vec![switch()]), false, KubeSettings::default());
    switch_read_and_pre_checked(&mut h).await;
    let first = answer(
        &mut h,
        409,
        status_body(409, "Conflict", "the object has been modified"),
    )
    .await;
    assert_eq!(first.body, selector_patch("100"));
    let reread = answer(&mut h, 200, svc("102", old_selector())).await;
    assert_eq!(reread.method, "GET");
    let second = answer(&mut h, 200, svc("103", new_selector())).await;
    assert_eq!(
        second.body,
        selector_patch("102"),
        "the retry tests the re-read version"
    );
    answer(&mut h, 200, svc("103", new_selector())).await;

    let (result, records) = task.await.expect("task");
    assert!(result.expect("second attempt").changed);
    assert!(records.iter().any(|r| matches!(r,
        KubeStepRecord::ConflictRetry { attempt: 1, will_retry: true, code, .. } if code == "conflict")));
    assert!(records
        .iter()
        .any(|r| matches!(r, KubeStepRecord::Patched { attempt: 2, .. })));
}

#[tokio::test]
async fn invalid_patch_with_unchanged_object_is_not_retried() {
    let (mut h, task) = start(target(vec![switch()]), false, KubeSettings::default());
    switch_read_and_pre_checked(&mut h).await;
    answer(&mut h, 422, status_body(422, "Invalid", "spec.selector: Invalid value")).await;
    answer(&mut h, 200, svc("100", old_selector())).await;
    let (result, _) = task.await.expect("task");
    let err = result.expect_err("invalid");
    assert!(
        matches!(&err, KubeError::Api { code: 422, reason, .. } if reason == "Invalid"),
        "{err:?}"
    );
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn not_found_and_forbidden_are_named_plainly() {
    let (mut h, task) = start(target(vec![switch()]), false, KubeSettings::default());
    answer(
        &mut h,
        404,
        status_body(404, "NotFound", "services \"portal-api-prod\" not found"),
    )
    .await;
    let (result, _) = task.await.expect("task");
    let err = result.expect_err("missing");
    assert_eq!(err.to_string(), "Service portal/portal-api-prod not found");
    assert_eq!(err.code(), "not_found");

    let (mut h, task) = start(target(vec![switch()]), false, KubeSettings::default());
    let msg = "services \"portal-api-prod\" is forbidden: User \"system:serviceaccount:rollback-responder:rollback-responder\" cannot get resource \"services\" in API group \"\" in the namespace \"portal\"";
    answer(&mut h, 403, status_body(403, "Forbidden", msg)).await;
    let (result, _) = task.await.expect("task");
    let err = result.expect_err("forbidden");
    assert_eq!(
        err,
        KubeError::Forbidden {
            verb: "get".into(),
            resource: "services".into(),
            api_group: String::new(),
            namespace: NS.into(),
            message: msg.into(),
        }
    );
    assert!(
        err.to_string().contains("add verb \"get\" for resource \"services\""),
        "{err}"
    );
}

#[tokio::test]
async fn transient_503_is_resent() {
    let (mut h, task) = start(target(vec![switch()]), false, KubeSettings::default());
    answer(
        &mut h,
        503,
        status_body(503, "ServiceUnavailable", "etcd leader changed"),
    )
    .await;
    answer(&mut h, 200, svc("100", new_selector())).await;
    let (result, records) = task.await.expect("task");
    assert!(matches!(
        result.expect("done").steps[0].result,
        StepResult::AlreadyDone { .. }
    ));
    assert!(records
        .iter()
        .any(|r| matches!(r, KubeStepRecord::AttemptFailed(a) if a.attempt == 1 && a.will_retry)));
}

/// Answers the switch's read of the Service (the canary selector) and its pre-check (the
/// stable pods, ready): its PATCH comes next.
async fn switch_read_and_pre_checked(h: &mut Handle) {
    answer(h, 200, svc("100", old_selector())).await;
    answer(h, 200, ready_pods()).await;
}

/// A patch answered with 503 is sent again only through the write gate (the responder's:
/// steps recorded, lease still ours). Here the gate opens once, for the first PATCH, and then
/// stays closed, as after a lost lease: no second PATCH goes out, and the revert waits there.
#[tokio::test]
async fn a_failing_patch_is_retried_only_through_the_write_gate() {
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
    let (svc_mock, mut h) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let exec = KubeExecutor::new(kube::Client::new(svc_mock, "default"), &KubeSettings::default());
    let gated = std::sync::Arc::new(AtomicU32::new(0));
    let calls = gated.clone();
    let task = tokio::spawn(async move {
        let gate = move || -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
            let open = calls.fetch_add(1, SeqCst) == 0;
            Box::pin(async move {
                if !open {
                    std::future::pending::<()>().await;
                }
            })
        };
        exec.revert_gated(&target(vec![switch()]), false, None, &mut |_| {}, &gate)
            .await
    });
    switch_read_and_pre_checked(&mut h).await;
    let patch = answer(
        &mut h,
        503,
        status_body(503, "ServiceUnavailable", "etcd leader changed"),
    )
    .await;
    assert_eq!(patch.method, "PATCH");
    let next = tokio::time::timeout(Duration::from_millis(1500), h.next_request()).await;
    assert!(next.is_err(), "a retry went out past the closed gate");
    assert_eq!(gated.load(SeqCst), 2, "the write, then its retry, at the gate");
    assert!(!task.is_finished(), "the revert waits at the gate");
    task.abort();
}

fn tpl(version: &str, hash: Option<&str>) -> Value {
    let mut labels = json!({"app": "portal-api", "version": version});
    if let Some(h) = hash {
        labels["pod-template-hash"] = json!(h);
    }
    json!({"metadata": {"labels": labels},
           "spec": {"containers": [{"name": "api", "image": format!("portal-api:{version}")}]}})
}

fn deploy(rv: &str, version: &str, paused: bool) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
           "metadata": {"name": "portal-api", "namespace": NS, "uid": UID, "resourceVersion": rv, "generation": 3,
                        "annotations": {"deployment.kubernetes.io/revision": "3", "team": "portal",
                                        "kubectl.kubernetes.io/last-applied-configuration": "{}"}},
           "spec": {"replicas": 2, "paused": paused, "selector": {"matchLabels": {"app": "portal-api"}}, "template": tpl(version, None)}})
}

fn rs(hash: &str, version: &str, revision: u64, owner_uid: &str) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
           "metadata": {"name": format!("portal-api-{hash}"), "namespace": NS,
                        "annotations": {"deployment.kubernetes.io/revision": revision.to_string(),
                                        "deployment.kubernetes.io/desired-replicas": "2",
                                        "kubernetes.io/change-cause": format!("deploy {version}")},
                        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "portal-api",
                                             "uid": owner_uid, "controller": true}]},
           "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "portal-api", "pod-template-hash": hash}},
                    "template": tpl(version, Some(hash))},
           "status": {"replicas": 0}})
}

fn rs_list() -> Value {
    json!({"apiVersion": "apps/v1", "kind": "ReplicaSetList", "metadata": {}, "items": [
        rs("aaa", "v0.9.0", 1, UID),
        rs("bbb", "v1.0.0-rc.0", 2, UID),
        rs("ccc", "v1.0.0", 3, UID),
        rs("zzz", "evil", 9, "someone-else"),
    ]})
}

#[tokio::test]
async fn rollout_undo_sends_kubectls_patch_with_a_test_op_and_kept_annotations() {
    let t = target(vec![KubeStep::RolloutUndo {
        deployment: "portal-api".into(),
        to_revision: None,
        to_image: None,
    }]);
    let (mut h, task) = start(t, false, KubeSettings::default());
    let get = answer(&mut h, 200, deploy("200", "v1.0.0", false)).await;
    assert_eq!(get.path, "/apis/apps/v1/namespaces/portal/deployments/portal-api");
    let list = answer(&mut h, 200, rs_list()).await;
    assert_eq!(list.path, "/apis/apps/v1/namespaces/portal/replicasets");
    assert_eq!(list.query["labelSelector"], "app=portal-api");

    let mut restored = deploy("201", "v1.0.0-rc.0", false);
    let patch = answer(&mut h, 200, restored.clone()).await;
    assert_eq!(
        (patch.method.as_str(), patch.path.as_str()),
        ("PATCH", "/apis/apps/v1/namespaces/portal/deployments/portal-api")
    );
    assert_eq!(patch.content_type.as_deref(), Some("application/json-patch+json"));
    let ops = patch.body.as_array().expect("ops");
    assert_eq!(ops.len(), 3);
    assert_eq!(
        ops[0],
        json!({"op": "test", "path": "/metadata/resourceVersion", "value": "200"})
    );
    assert_eq!(
        ops[1],
        json!({"op": "replace", "path": "/spec/template", "value": tpl("v1.0.0-rc.0", None)})
    );
    assert_eq!(
        (ops[2]["op"].as_str(), ops[2]["path"].as_str()),
        (Some("add"), Some("/metadata/annotations"))
    );
    let ann = ops[2]["value"].as_object().expect("annotations");
    let marker = ann["rollback-responder/rollout-undo"].clone();
    let marker: Value = serde_json::from_str(marker.as_str().expect("string")).expect("marker json");
    assert_eq!(
        marker,
        json!({"to_replica_set": "portal-api-bbb", "to_revision": 2, "from_revision": "3", "requested": null})
    );
    let mut expected_ann = json!({
        "deployment.kubernetes.io/revision": "3",
        "team": "portal",
        "kubectl.kubernetes.io/last-applied-configuration": "{}",
        "kubernetes.io/change-cause": "deploy v1.0.0-rc.0",
    });
    expected_ann["rollback-responder/rollout-undo"] = ann["rollback-responder/rollout-undo"].clone();
    assert_eq!(ops[2]["value"], expected_ann);

    // Read back: the Deployment (with the marker) and its ReplicaSets again.
    restored["metadata"]["annotations"] = ops[2]["value"].clone();
    answer(&mut h, 200, restored).await;
    answer(&mut h, 200, rs_list()).await;
    let (result, _) = task.await.expect("task");
    assert!(result.expect("undone").changed);
}

#[tokio::test]
async fn rollout_undo_refuses_paused_and_reports_missing_history() {
    let t = target(vec![KubeStep::RolloutUndo {
        deployment: "portal-api".into(),
        to_revision: None,
        to_image: None,
    }]);
    let (mut h, task) = start(t.clone(), false, KubeSettings::default());
    answer(&mut h, 200, deploy("200", "v1.0.0", true)).await;
    answer(&mut h, 200, rs_list()).await;
    let (result, _) = task.await.expect("task");
    assert_eq!(result.expect_err("paused").code(), "paused");

    let (mut h, task) = start(t, false, KubeSettings::default());
    answer(&mut h, 200, deploy("200", "v1.0.0", false)).await;
    answer(
        &mut h,
        200,
        json!({"apiVersion": "apps/v1", "kind": "ReplicaSetList", "metadata": {},
                               "items": [rs("ccc", "v1.0.0", 3, UID), rs("zzz", "evil", 9, "someone-else")]}),
    )
    .await;
    let (result, _) = task.await.expect("task");
    assert_eq!(
        result.expect_err("one own revision"),
        KubeError::NoRolloutHistory {
            deployment: "portal-api".into()
        }
    );
}

fn scale(rv: &str, replicas: i32) -> Value {
    json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
           "metadata": {"name": "portal-api-canary", "namespace": NS, "resourceVersion": rv},
           "spec": {"replicas": replicas}, "status": {"replicas": replicas}})
}

#[tokio::test]
async fn scale_uses_the_subresource_with_a_conditional_merge_patch() {
    let t = target(vec![KubeStep::Scale {
        deployment: "portal-api-canary".into(),
        replicas: 0,
    }]);
    let (mut h, task) = start(t, false, KubeSettings::default());
    let get = answer(&mut h, 200, scale("7", 3)).await;
    assert_eq!(
        (get.method.as_str(), get.path.as_str()),
        (
            "GET",
            "/apis/apps/v1/namespaces/portal/deployments/portal-api-canary/scale"
        )
    );
    let patch = answer(&mut h, 200, scale("8", 0)).await;
    assert_eq!(
        (patch.method.as_str(), patch.path.as_str()),
        (
            "PATCH",
            "/apis/apps/v1/namespaces/portal/deployments/portal-api-canary/scale"
        )
    );
    assert_eq!(patch.content_type.as_deref(), Some("application/merge-patch+json"));
    assert_eq!(
        patch.body,
        json!({"metadata": {"resourceVersion": "7"}, "spec": {"replicas": 0}})
    );
    answer(&mut h, 200, scale("8", 0)).await;
    let (result, _) = task.await.expect("task");
    assert!(result.expect("scaled").changed);
}

#[tokio::test]
async fn dry_run_patches_with_dry_run_all_and_reads_nothing_back() {
    let t = target(vec![
        switch(),
        KubeStep::Scale {
            deployment: "portal-api-canary".into(),
            replicas: 0,
        },
    ]);
    let (mut h, task) = start(t, true, KubeSettings::default());
    answer(&mut h, 200, svc("100", old_selector())).await;
    answer(&mut h, 200, scale("7", 3)).await;
    answer(&mut h, 200, ready_pods()).await;
    let p1 = answer(&mut h, 200, svc("100", new_selector())).await;
    assert_eq!(p1.query.get("dryRun").map(String::as_str), Some("All"));
    assert_eq!(p1.body, selector_patch("100"));
    let p2 = answer(&mut h, 200, scale("7", 0)).await;
    assert_eq!(p2.query.get("dryRun").map(String::as_str), Some("All"));
    let (result, _) = task.await.expect("task");
    let outcome = result.expect("dry run");
    assert!(outcome.dry_run && !outcome.changed);
    assert!(outcome
        .steps
        .iter()
        .all(|s| matches!(s.result, StepResult::DryRun { .. })));
    let next = tokio::time::timeout(Duration::from_secs(2), h.next_request()).await;
    assert!(matches!(next, Ok(None)), "no read-back in a dry run");
}
