use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{json, Value};

use super::error::{classify, Op};
use super::plan::*;
use super::settings::KubeSettings;
use super::verify::{poll_interval, MAX_POLL, MIN_POLL};
use super::views::*;
use super::*;

const UID: &str = "uid-1";

pub(super) fn tpl(version: &str, hash: Option<&str>) -> Value {
    let mut labels = json!({"app": "web", "version": version});
    if let Some(h) = hash {
        labels[POD_TEMPLATE_HASH_LABEL] = json!(h);
    }
    json!({"metadata": {"labels": labels},
           "spec": {"containers": [{"name": "web", "image": format!("web:{version}")}],
                    "initContainers": [{"name": "migrate", "image": "migrate:1"}]}})
}

/// kubectl's "previous revision", nothing pinned.
const PREVIOUS: Good = Good::BeforeBad;

pub(super) fn deploy(version: &str) -> DeploymentView {
    DeploymentView {
        name: "web".into(),
        uid: UID.into(),
        resource_version: "42".into(),
        generation: Some(5),
        observed_generation: Some(5),
        annotations: [
            (REVISION_ANNOTATION.to_string(), "3".to_string()),
            ("team".to_string(), "portal".to_string()),
        ]
        .into(),
        paused: false,
        selector: "app=web".into(),
        template: tpl(version, None),
        template_change: None,
        template_change_exact: false,
    }
}

pub(super) fn rs(name: &str, version: &str, revision: Option<u64>, owner: Option<&str>) -> RsView {
    RsView {
        name: name.into(),
        revision,
        controller_uid: owner.map(str::to_string),
        annotations: [
            (
                REVISION_ANNOTATION.to_string(),
                revision.unwrap_or_default().to_string(),
            ),
            ("deployment.kubernetes.io/desired-replicas".to_string(), "3".to_string()),
            ("kubernetes.io/change-cause".to_string(), format!("deploy {version}")),
        ]
        .into(),
        template: tpl(version, Some(&format!("h-{name}"))),
        replicas: 0,
        ready: 0,
        revision_history: Vec::new(),
        created: None,
    }
}

pub(super) fn history() -> Vec<RsView> {
    vec![
        rs("web-1", "v1", Some(1), Some(UID)),
        rs("web-2", "v2", Some(2), Some(UID)),
        rs("web-3", "v3", Some(3), Some(UID)),
        rs("other-9", "evil", Some(9), Some("uid-other")),
        rs("orphan-8", "orphan", Some(8), None),
        rs("web-x", "broken", None, Some(UID)),
    ]
}

#[test]
fn previous_revision_is_the_second_highest_owned_one() {
    let d = deploy("v3");
    let rses = history();
    assert_eq!(
        select_replica_set(&d, &rses, None).map(|r| &r.name),
        Ok(&"web-2".to_string())
    );
    assert_eq!(
        select_replica_set(&d, &rses, Some(0)).map(|r| &r.name),
        Ok(&"web-2".to_string())
    );
    assert_eq!(
        select_replica_set(&d, &rses, Some(1)).map(|r| &r.name),
        Ok(&"web-1".to_string())
    );
    assert_eq!(
        select_replica_set(&d, &rses, Some(9)).map(|r| &r.name),
        Err(KubeError::RevisionNotFound {
            deployment: "web".into(),
            revision: 9,
            available: vec![1, 2, 3]
        }),
        "revision 9 belongs to another Deployment"
    );
    let only_current = vec![
        rs("web-3", "v3", Some(3), Some(UID)),
        rs("other-9", "evil", Some(9), Some("uid-other")),
    ];
    assert_eq!(
        select_replica_set(&d, &only_current, None).map(|r| &r.name),
        Err(KubeError::NoRolloutHistory {
            deployment: "web".into()
        })
    );
}

#[test]
fn templates_compare_without_the_hash_label_and_nil_equals_empty() {
    assert!(templates_equal(&tpl("v2", Some("abc")), &tpl("v2", None)));
    assert!(templates_equal(&tpl("v2", Some("abc")), &tpl("v2", Some("def"))));
    assert!(!templates_equal(&tpl("v2", None), &tpl("v3", None)));
    let mut with_empties = tpl("v2", None);
    with_empties["metadata"]["annotations"] = json!({});
    with_empties["spec"]["volumes"] = json!([]);
    with_empties["spec"]["nodeSelector"] = Value::Null;
    assert!(templates_equal(&with_empties, &tpl("v2", Some("abc"))));
    assert_eq!(strip_hash(&tpl("v2", Some("abc"))), tpl("v2", None));
}

#[test]
fn annotations_keep_the_deployments_and_add_the_replicasets_except_the_skip_list() {
    let d: BTreeMap<String, String> = [
        (REVISION_ANNOTATION, "3"),
        ("team", "portal"),
        ("kubernetes.io/change-cause", "deploy v3"),
        ("kubectl.kubernetes.io/last-applied-configuration", "{\"v\":3}"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let r: BTreeMap<String, String> = [
        (REVISION_ANNOTATION, "2"),
        ("deployment.kubernetes.io/desired-replicas", "3"),
        ("deployment.kubernetes.io/max-replicas", "4"),
        ("kubectl.kubernetes.io/last-applied-configuration", "{\"v\":2}"),
        ("kubernetes.io/change-cause", "deploy v2"),
        ("owner", "payments"),
        (UNDO_MARKER_ANNOTATION, "{\"stale\":true}"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let merged = merge_annotations(&d, &r);
    let expect: BTreeMap<String, String> = [
        (REVISION_ANNOTATION, "3"),
        ("team", "portal"),
        ("kubernetes.io/change-cause", "deploy v2"),
        ("kubectl.kubernetes.io/last-applied-configuration", "{\"v\":3}"),
        ("owner", "payments"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(merged, expect);
}

#[test]
fn patch_bodies_are_exact() {
    let sel: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
    assert_eq!(
        selector_patch("7", &sel),
        json!([{"op": "test", "path": "/metadata/resourceVersion", "value": "7"},
               {"op": "add", "path": "/spec/selector", "value": {"app": "web"}}])
    );
    assert_eq!(
        scale_patch("8", 0),
        json!({"metadata": {"resourceVersion": "8"}, "spec": {"replicas": 0}})
    );
    let ann: BTreeMap<String, String> = [("a".to_string(), "b".to_string())].into();
    assert_eq!(
        undo_patch("9", &tpl("v2", None), &ann),
        json!([{"op": "test", "path": "/metadata/resourceVersion", "value": "9"},
               {"op": "replace", "path": "/spec/template", "value": tpl("v2", None)},
               {"op": "add", "path": "/metadata/annotations", "value": {"a": "b"}}])
    );
    // Every body we send as a JSON patch parses as one.
    assert!(serde_json::from_value::<json_patch::Patch>(selector_patch("7", &sel)).is_ok());
}

#[test]
fn undo_plan_writes_the_previous_template_and_a_marker_then_is_done() {
    let mut d = deploy("v3");
    let mut rses = history();
    let Ok(Plan::Write(w)) = plan_rollout_undo(&d, &rses, &PREVIOUS, None) else {
        panic!("expected a write");
    };
    let ops = w.patch.as_array().expect("ops");
    assert_eq!(ops[1]["value"], tpl("v2", None));
    let ann: BTreeMap<String, String> = serde_json::from_value(ops[2]["value"].clone()).expect("map");
    assert_eq!(ann["team"], "portal");
    assert_eq!(ann["kubernetes.io/change-cause"], "deploy v2");
    assert!(!ann.contains_key("deployment.kubernetes.io/desired-replicas"));
    assert!(matches!(w.precheck, PreCheckNeed::ReplicaSet { ref name, revision: 2, .. } if name == "web-2"));

    // Apply it as the server would, and let the controller renumber web-2 to revision 4.
    d.template = ops[1]["value"].clone();
    d.annotations = ann;
    rses[1].revision = Some(4);
    assert!(
        matches!(plan_rollout_undo(&d, &rses, &PREVIOUS, None), Ok(Plan::Done { ref reason, .. }) if reason.contains("earlier run"))
    );
    // A different request is judged on its own.
    assert!(matches!(
        plan_rollout_undo(&d, &rses, &Good::Revision(1), None),
        Ok(Plan::Write(_))
    ));
    // Without our marker, kubectl semantics would flip back to the canary (web-3).
    d.annotations.remove(UNDO_MARKER_ANNOTATION);
    let Ok(Plan::Write(w)) = plan_rollout_undo(&d, &rses, &PREVIOUS, None) else {
        panic!("expected a write");
    };
    assert_eq!(w.patch[1]["value"], tpl("v3", None));

    d.paused = true;
    assert_eq!(
        plan_rollout_undo(&d, &rses, &PREVIOUS, None),
        Err(KubeError::Paused {
            deployment: "web".into()
        })
    );
}

#[test]
fn undo_to_the_current_template_is_done() {
    // The Deployment already runs revision 2's template, which is also "the previous".
    let d = deploy("v2");
    let rses = history();
    assert!(matches!(
        plan_rollout_undo(&d, &rses, &PREVIOUS, None),
        Ok(Plan::Done { ref reason, .. }) if reason == "current template already matches revision 2 (replicaset web-2)"
    ));
    assert!(matches!(
        plan_rollout_undo(&d, &rses, &Good::Revision(1), None),
        Ok(Plan::Write(_))
    ));
}

#[test]
fn service_and_scale_plans() {
    let want: BTreeMap<String, String> = [
        ("app".to_string(), "web".to_string()),
        ("version".to_string(), "v1".to_string()),
    ]
    .into();
    let step = KubeStep::SwitchService {
        service: "web".into(),
        selector: want.clone(),
    };
    let mut view = ServiceView {
        name: "web".into(),
        resource_version: "5".into(),
        selector: [
            ("app".to_string(), "web".to_string()),
            ("version".to_string(), "v2".to_string()),
            ("stale".to_string(), "x".to_string()),
        ]
        .into(),
        selector_change: None,
    };
    let Ok(Plan::Write(w)) = plan_step(&step, &Current::Service(view.clone()), None) else {
        panic!("expected a write");
    };
    assert_eq!(w.content_type, JSON_PATCH);
    assert_eq!(w.patch, selector_patch("5", &want));
    view.selector = want;
    assert!(matches!(
        plan_step(&step, &Current::Service(view), None),
        Ok(Plan::Done { .. })
    ));

    let step = KubeStep::Scale {
        deployment: "web".into(),
        replicas: 0,
    };
    let mut scale = ScaleView {
        deployment: "web".into(),
        resource_version: "8".into(),
        replicas: 3,
    };
    let Ok(Plan::Write(w)) = plan_step(&step, &Current::Scale(scale.clone()), None) else {
        panic!("expected a write");
    };
    assert_eq!((w.content_type, w.patch.clone()), (MERGE_PATCH, scale_patch("8", 0)));
    assert_eq!(w.precheck, PreCheckNeed::None);
    scale.replicas = 0;
    assert!(matches!(
        plan_step(&step, &Current::Scale(scale), None),
        Ok(Plan::Done { .. })
    ));
}

#[test]
fn label_selectors_render_like_kubernetes() {
    let sel = json!({"matchLabels": {"app": "web", "tier": "api"},
                     "matchExpressions": [
                         {"key": "env", "operator": "In", "values": ["prod", "canary"]},
                         {"key": "legacy", "operator": "DoesNotExist"},
                         {"key": "zone", "operator": "Exists"},
                         {"key": "x", "operator": "NotIn", "values": ["y"]}]});
    assert_eq!(
        label_selector_string(&sel),
        Ok("app=web,tier=api,env in (prod,canary),!legacy,zone,x notin (y)".to_string())
    );
    assert!(label_selector_string(&json!({"matchExpressions": [{"key": "a", "operator": "Gt"}]})).is_err());
}

fn op() -> Op<'static> {
    Op {
        verb: "patch",
        kind: "Deployment",
        api_group: "apps",
        resource: "deployments/scale",
        namespace: "portal",
        name: "web",
    }
}

fn api_err(code: u16, reason: &str) -> kube::Error {
    kube::Error::Api(
        kube::core::Status::failure("server says no", reason)
            .with_code(code)
            .boxed(),
    )
}

#[test]
fn errors_are_classified_for_people_and_metrics() {
    let nf = classify(api_err(404, "NotFound"), &op());
    assert_eq!(nf.to_string(), "Deployment portal/web not found");
    assert_eq!((nf.code(), nf.is_retryable()), ("not_found", false));

    let fb = classify(api_err(403, "Forbidden"), &op());
    assert!(matches!(&fb, KubeError::Forbidden { verb, resource, api_group, .. }
        if verb == "patch" && resource == "deployments/scale" && api_group == "apps"));
    assert!(fb
        .to_string()
        .contains("add verb \"patch\" for resource \"deployments/scale\""));
    assert_eq!((fb.code(), fb.is_retryable()), ("forbidden", false));

    let cf = classify(api_err(409, "Conflict"), &op());
    assert!(matches!(cf, KubeError::Conflict { attempts: 1, .. }));
    assert!(cf.is_retryable());

    let inv = classify(api_err(422, "Invalid"), &op());
    assert!(matches!(inv, KubeError::Api { code: 422, .. }));
    assert!(!inv.is_retryable() && !inv.is_transient());

    let busy = classify(api_err(503, "ServiceUnavailable"), &op());
    assert!(busy.is_retryable() && busy.is_transient());
    let throttled = classify(api_err(429, "TooManyRequests"), &op());
    assert!(throttled.is_transient());

    let pre = KubeError::PreCheckFailed {
        service: "web".into(),
        namespace: "portal".into(),
        selector: "app=web".into(),
        matching: 1,
        ready: 0,
        required: 1,
    };
    assert!(pre.is_precheck() && !fb.is_precheck());
    assert_eq!(pre.code(), "precheck_failed");
}

#[test]
fn every_error_serializes_with_its_tag() {
    let errors = [
        KubeError::Client {
            message: "x".into(),
            retryable: true,
        },
        KubeError::InvalidTarget { message: "x".into() },
        KubeError::Paused { deployment: "d".into() },
        KubeError::Api {
            code: 500,
            reason: "InternalError".into(),
            message: "x".into(),
        },
    ];
    for e in errors {
        let v = serde_json::to_value(&e).expect("serializes");
        assert_eq!(v["error"], e.code());
    }
}

fn deployment_with(generation: i64, status: Value) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": "web", "generation": generation},
        "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}}, "template": tpl("v1", None)},
        "status": status,
    }))
    .expect("deployment")
}

#[test]
fn rollout_progress_follows_kubectl_rollout_status() {
    let done = json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 3});
    assert!(rollout_progress(&deployment_with(2, done.clone())).complete);
    assert!(
        !rollout_progress(&deployment_with(3, done)).complete,
        "spec change not observed yet"
    );
    let old_left = json!({"observedGeneration": 2, "replicas": 4, "updatedReplicas": 3, "availableReplicas": 3});
    let p = rollout_progress(&deployment_with(2, old_left));
    assert!(!p.complete && p.message.contains("pending termination"));
    let unavailable = json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 2});
    assert!(!rollout_progress(&deployment_with(2, unavailable)).complete);
    let stuck = json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 1, "availableReplicas": 2,
                       "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]});
    let p = rollout_progress(&deployment_with(2, stuck));
    assert!(p.deadline_exceeded && !p.complete);
}

#[test]
fn only_ready_endpoints_of_the_new_pods_count() {
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "web-1"},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["10.0.0.1"], "targetRef": {"kind": "Pod", "name": "stable-0"}},
            {"addresses": ["10.0.0.2"], "conditions": {"ready": false}, "targetRef": {"kind": "Pod", "name": "stable-1"}},
            {"addresses": ["10.0.0.3"], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "canary-0"}},
            {"addresses": ["10.0.0.4"], "conditions": {"ready": true}},
        ],
    }))
    .expect("slice");
    let pods: BTreeSet<String> = ["stable-0".to_string(), "stable-1".to_string()].into();
    assert_eq!(ready_endpoints(&[slice], &pods), 1);
}

#[test]
fn settings_have_defaults_and_reject_unknown_fields() {
    let s: KubeSettings = serde_json::from_value(json!({})).expect("defaults");
    assert_eq!(s, KubeSettings::default());
    assert_eq!(
        (s.field_manager.as_str(), s.max_conflict_retries, s.in_cluster),
        ("rollback-responder", 3, false)
    );
    assert!(serde_json::from_value::<KubeSettings>(json!({"kube_config": "/x"})).is_err());
}

#[test]
fn poll_interval_is_bounded() {
    assert_eq!(poll_interval(Duration::from_millis(100)), MIN_POLL);
    assert_eq!(poll_interval(Duration::from_secs(5)), Duration::from_millis(500));
    assert_eq!(poll_interval(Duration::from_secs(300)), MAX_POLL);
}

#[test]
fn rbac_rules_cover_every_call_the_executor_makes() {
    // (group, resource, verb) of every Op in this file.
    let calls = [
        ("", "services", "get"),
        ("", "services", "patch"),
        ("apps", "deployments", "get"),
        ("apps", "deployments", "patch"),
        ("apps", "replicasets", "list"),
        ("apps", "deployments/scale", "get"),
        ("apps", "deployments/scale", "patch"),
        ("", "pods", "list"),
        ("discovery.k8s.io", "endpointslices", "list"),
    ];
    let granted: BTreeSet<(&str, &str, &str)> = RBAC_RULES
        .iter()
        .flat_map(|(g, r, vs)| vs.iter().map(move |v| (*g, *r, *v)))
        .collect();
    assert_eq!(granted, calls.into_iter().collect());
}

pub(super) fn at(s: &str) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(s)
        .expect("time")
        .with_timezone(&chrono::Utc)
}

pub(super) fn change(manager: &str, time: &str) -> Option<FieldChange> {
    Some(FieldChange {
        manager: manager.into(),
        operation: "Update".into(),
        time: Some(at(time)),
        shared_time: false,
    })
}

/// A human ran `kubectl rollout undo` after the incident opened: web-2 (v2) was reused and
/// renumbered to revision 4; web-3 (v3, the bad release) is now "the previous revision".
fn undone_by_a_human(undone: &str) -> (DeploymentView, Vec<RsView>) {
    let mut d = deploy("v2");
    d.annotations.insert(REVISION_ANNOTATION.into(), "4".into());
    d.template_change = change("kubectl-rollout", undone);
    let mut rses = history();
    rses[1].revision = Some(4);
    rses[1].revision_history = vec![2];
    for (rs, created) in rses
        .iter_mut()
        .zip(["2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z"])
    {
        rs.created = Some(at(created));
    }
    (d, rses)
}

#[test]
fn a_rollback_made_after_the_incident_opened_is_done_by_someone_else_not_undone() {
    let opened = at("2026-12-03T10:00:00.500Z");
    let (d, rses) = undone_by_a_human("2026-12-03T10:05:00Z");
    let pinned = Good::BeforeBad;
    let Ok(Plan::Done { reason, by }) = plan_rollout_undo(&d, &rses, &pinned, Some(opened)) else {
        panic!(
            "expected done: {:?}",
            plan_rollout_undo(&d, &rses, &pinned, Some(opened))
        );
    };
    assert_eq!(
        reason,
        "deployment web was already rolled back after the incident opened, by `kubectl-rollout` (Update at \
         2026-12-03T10:05:00Z): it runs revision 4 (replicaset web-2, images init:migrate=migrate:1,web=web:v2) \
         instead of the bad release (replicaset web-3)"
    );
    assert_eq!(by, change("kubectl-rollout", "2026-12-03T10:05:00Z"));
    // kubectl's rule (the second-highest revision) would put the bad release back.
    let Ok(Plan::Write(w)) = plan_rollout_undo(&d, &rses, &PREVIOUS, None) else {
        panic!("expected a write");
    };
    assert_eq!(w.patch[1]["value"], tpl("v3", None));
    // The same second as the opening counts as after it (managedFields keep whole seconds).
    let (mut d, rses) = undone_by_a_human("2026-12-03T10:00:00Z");
    assert!(matches!(
        plan_rollout_undo(&d, &rses, &pinned, Some(opened)),
        Ok(Plan::Done { .. })
    ));
    // A template change before the incident opened is the bad release itself: undo it.
    d = deploy("v3");
    d.template_change = change("argocd-controller", "2026-12-03T09:59:59Z");
    let Ok(Plan::Write(w)) = plan_rollout_undo(&d, &history(), &pinned, Some(opened)) else {
        panic!("expected a write");
    };
    assert_eq!(w.patch[1]["value"], tpl("v2", None));
}

#[test]
fn a_newer_release_rolled_out_after_the_incident_opened_is_refused() {
    let opened = at("2026-12-03T10:00:00Z");
    let mut d = deploy("v4");
    d.template_change = change("kubectl-client-side-apply", "2026-12-03T10:03:00Z");
    let mut rses = history();
    rses.push(rs("web-4", "v4", Some(4), Some(UID)));
    for (rs, created) in rses
        .iter_mut()
        .zip(["2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z"])
    {
        rs.created = Some(at(created));
    }
    let pinned = Good::BeforeBad;
    let err = plan_rollout_undo(&d, &rses, &pinned, Some(opened)).expect_err("refused");
    assert_eq!(err.code(), "changed_since_opened");
    assert_eq!(
        err.to_string(),
        "deployment web changed after the incident opened (2026-12-03T10:00:00Z) by `kubectl-client-side-apply` \
         (Update at 2026-12-03T10:03:00Z), to a newer release (init:migrate=migrate:1,web=web:v4); not undoing \
         someone else's release: a human decides"
    );
}

#[test]
fn a_named_good_revision_survives_renumbering_and_a_named_image_is_found() {
    let (d, rses) = undone_by_a_human("2026-12-03T10:05:00Z");
    // Revision 2 is now 4: found through its revision history, and already current.
    assert!(matches!(
        plan_rollout_undo(&d, &rses, &Good::Revision(2), None),
        Ok(Plan::Done { ref reason, .. }) if reason == "current template already matches revision 4 (replicaset web-2)"
    ));
    let Ok(Plan::Write(w)) = plan_rollout_undo(&d, &rses, &Good::Image("web:v1".into()), None) else {
        panic!("expected a write");
    };
    assert_eq!(w.patch[1]["value"], tpl("v1", None));
    assert!(matches!(w.precheck, PreCheckNeed::ReplicaSet { ref name, .. } if name == "web-1"));
    let err = plan_rollout_undo(&d, &rses, &Good::Image("web:v0".into()), None).expect_err("unknown image");
    assert_eq!(
        err,
        KubeError::ImageNotFound {
            deployment: "web".into(),
            image: "web:v0".into(),
            available: vec!["migrate:1".into(), "web:v1".into(), "web:v2".into(), "web:v3".into()],
        }
    );
    assert!(matches!(
        plan_rollout_undo(&d, &rses, &Good::Revision(7), None),
        Err(KubeError::RevisionNotFound { revision: 7, .. })
    ));
}

fn labelled_pod(name: &str, labels: &[(&str, &str)]) -> k8s_openapi::api::core::v1::Pod {
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": labels.iter().copied().collect::<BTreeMap<_, _>>()}}),
    )
    .expect("pod")
}

#[test]
fn a_switch_between_instances_or_components_of_one_app_finds_no_foreign_pods() {
    let s = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    };
    let stable = [
        labelled_pod(
            "portal-api-0",
            &[("app", "portal-api"), ("app.kubernetes.io/instance", "portal-api")],
        ),
        labelled_pod(
            "portal-api-1",
            &[("app", "portal-api"), ("app.kubernetes.io/instance", "portal-api")],
        ),
    ];
    // The canary's instance to the stable one's: the instance key tells the tracks apart.
    let current = s(&[
        ("app", "portal-api"),
        ("app.kubernetes.io/instance", "portal-api-canary"),
    ]);
    let new = s(&[("app", "portal-api"), ("app.kubernetes.io/instance", "portal-api")]);
    assert_eq!(foreign_pods(&stable, &current, &new), Vec::<String>::new());
    // The same by component.
    let web = [labelled_pod("web-0", &[("name", "web"), ("component", "stable")])];
    let current = s(&[("name", "web"), ("component", "canary")]);
    let new = s(&[("name", "web"), ("component", "stable")]);
    assert_eq!(foreign_pods(&web, &current, &new), Vec::<String>::new());
    // Seed 000's copied selector drops `app`: another app's pod is still foreign, ours is not.
    let current = s(&[("app", "portal-api"), ("track", "canary"), ("version", "v1.0.0")]);
    let new = s(&[("version", "v1.0.0-rc.0")]);
    let mixed = [
        labelled_pod("portal-api-0", &[("app", "portal-api"), ("version", "v1.0.0-rc.0")]),
        labelled_pod("billing-0", &[("app", "billing"), ("version", "v1.0.0-rc.0")]),
    ];
    assert_eq!(
        foreign_pods(&mixed, &current, &new),
        vec!["billing-0 (app=billing)".to_string()]
    );
    // Dropping the instance key keeps it compared: a pod of another instance is foreign.
    let current = s(&[
        ("app", "portal-api"),
        ("app.kubernetes.io/instance", "portal-api-canary"),
    ]);
    let new = s(&[("app", "portal-api")]);
    let other = [labelled_pod(
        "eu-0",
        &[("app", "portal-api"), ("app.kubernetes.io/instance", "portal-api-eu")],
    )];
    assert_eq!(
        foreign_pods(&other, &current, &new),
        vec!["eu-0 (app=portal-api,app.kubernetes.io/instance=portal-api-eu)".to_string()]
    );
}

#[test]
fn our_undo_marker_counts_only_for_the_incident_that_wrote_it() {
    let first = at("2026-12-03T10:00:00.250Z");
    let mut d = deploy("v3");
    let mut rses = history();
    let Ok(Plan::Write(w)) = plan_rollout_undo(&d, &rses, &PREVIOUS, Some(first)) else {
        panic!("expected a write");
    };
    // Applied as the server would; web-2 renumbered to 4, the change recorded before `later`.
    d.template = w.patch[1]["value"].clone();
    d.annotations = serde_json::from_value(w.patch[2]["value"].clone()).expect("map");
    d.template_change = change("rollback-responder", "2026-12-03T10:01:00Z");
    rses[1].revision = Some(4);
    let marker: Value = serde_json::from_str(&d.annotations[UNDO_MARKER_ANNOTATION]).expect("marker");
    assert_eq!(marker["incident_opened_at"], "2026-12-03T10:00:00.250Z");
    // A takeover in the same incident finds its own undo.
    assert!(
        matches!(plan_rollout_undo(&d, &rses, &PREVIOUS, Some(first)), Ok(Plan::Done { ref reason, .. }) if reason.contains("earlier run"))
    );
    // A later incident (web-2 is now the release that serves badly) does not take that undo
    // for its own: the opening time decides, and the revision before it is restored.
    let later = at("2026-12-04T09:00:00Z");
    let Ok(Plan::Write(w)) = plan_rollout_undo(&d, &rses, &PREVIOUS, Some(later)) else {
        panic!(
            "expected a write: {:?}",
            plan_rollout_undo(&d, &rses, &PREVIOUS, Some(later))
        );
    };
    assert_eq!(w.patch[1]["value"], tpl("v3", None));
    // A marker without the incident's time (an older version wrote it) is not honoured either.
    let mut old = marker.clone();
    old.as_object_mut().expect("object").remove("incident_opened_at");
    d.annotations
        .insert(UNDO_MARKER_ANNOTATION.to_string(), old.to_string());
    assert!(matches!(
        plan_rollout_undo(&d, &rses, &PREVIOUS, Some(later)),
        Ok(Plan::Write(_))
    ));
}
