//! "Changed since the incident opened" from managedFields, per field: a manager's time is
//! when it last changed any field it owns, so a Deployment relabelled after the opening by the
//! manager that also owns the pod template does not block the rollback, while a template
//! change after the opening still does. Against the fake API server with its Deployment
//! controller (ReplicaSets, revisions, managedFields).

use rollback_responder::action::kubernetes::{KubeError, KubeStep, StepResult};
use rollback_responder::action::RevertedBy;
use serde_json::json;

use crate::kube_fake::{
    executor, incident_opens, patch_template, released_three_times, revision_and_image, target, undo_step,
};
use crate::support::fake_kube::{service, template, FakeKube};

const NS: &str = "portal";

/// A metadata-only change (a label) through the API, as `manager`.
async fn relabel(fake: &FakeKube, manager: &str, value: &str) {
    let api: kube::Api<k8s_openapi::api::apps::v1::Deployment> = kube::Api::namespaced(fake.client(), NS);
    let pp = kube::api::PatchParams {
        field_manager: Some(manager.into()),
        ..Default::default()
    };
    let patch = json!({"metadata": {"labels": {"synced-by": value}}});
    api.patch("portal-api", &pp, &kube::api::Patch::Merge(&patch))
        .await
        .expect("relabelled");
}

/// `manager`'s managedFields entry on `obj`.
fn managed_by(obj: Option<serde_json::Value>, manager: &str) -> serde_json::Value {
    let obj = obj.expect("the object");
    obj["metadata"]["managedFields"]
        .as_array()
        .and_then(|entries| entries.iter().find(|e| e["manager"] == manager))
        .unwrap_or_else(|| panic!("no managedFields entry of {manager}: {obj}"))
        .clone()
}

/// The release tool that owns the pod template (it made all three releases) also owns the
/// Deployment's labels, and relabels it after the incident opened: its managedFields time is
/// after the opening, but the template is the one current then (the newest ReplicaSet, made
/// before), so the undo goes ahead.
#[tokio::test]
async fn a_label_changed_after_opening_by_the_templates_manager_does_not_block_the_undo() {
    let fake = FakeKube::start().await;
    released_three_times(&fake).await;
    relabel(&fake, "argocd-controller", "sync-1").await;
    let opened_at = incident_opens().await;
    relabel(&fake, "argocd-controller", "sync-2").await;
    let entry = managed_by(fake.get("deployments", NS, "portal-api"), "argocd-controller");
    assert!(entry["fieldsV1"]["f:spec"]["f:template"].is_object(), "{entry}");
    assert!(entry["fieldsV1"]["f:metadata"]["f:labels"].is_object(), "{entry}");

    let t = target(vec![undo_step(None)]);
    let outcome = executor(&fake)
        .revert_since(&t, false, opened_at, &mut |_| {})
        .await
        .expect("the undo is not refused");
    assert!(outcome.changed);
    assert!(matches!(outcome.steps[0].result, StepResult::Changed { .. }));
    assert_eq!(revision_and_image(&fake), ("4".into(), "portal-api:1.0.0-rc.0".into()));
}

/// The same manager changing the pod template itself after the opening (a new release) is
/// still a change since the opening: refused, nothing written.
#[tokio::test]
async fn a_template_changed_after_opening_by_the_same_manager_still_refuses() {
    let fake = FakeKube::start().await;
    released_three_times(&fake).await;
    relabel(&fake, "argocd-controller", "sync-1").await;
    let opened_at = incident_opens().await;
    let newer = template(&[("app", "portal-api"), ("version", "v1.0.1")], "portal-api:1.0.1");
    patch_template(&fake, &newer, "argocd-controller").await;
    assert_eq!(revision_and_image(&fake), ("4".into(), "portal-api:1.0.1".into()));
    let writes = fake.writes();
    let t = target(vec![undo_step(None)]);
    let err = executor(&fake)
        .revert_since(&t, false, opened_at, &mut |_| {})
        .await
        .expect_err("refused");
    assert!(matches!(err, KubeError::ChangedSinceOpened { .. }), "{err:?}");
    assert!(err.to_string().contains("by `argocd-controller`"), "{err}");
    assert_eq!(fake.writes(), writes, "nothing written");
    assert_eq!(revision_and_image(&fake), ("4".into(), "portal-api:1.0.1".into()));
}

/// A write to the Service through the API, as `manager` (a JSON merge patch).
async fn patch_service(fake: &FakeKube, manager: &str, patch: serde_json::Value) {
    let api: kube::Api<k8s_openapi::api::core::v1::Service> = kube::Api::namespaced(fake.client(), NS);
    let pp = kube::api::PatchParams {
        field_manager: Some(manager.into()),
        ..Default::default()
    };
    api.patch("portal-api-prod", &pp, &kube::api::Patch::Merge(&patch))
        .await
        .expect("patched");
}

/// The selector a rollback switches the Service to, and the step that does it.
fn to_stable() -> (serde_json::Value, KubeStep) {
    let selector = [("app", "portal-api"), ("version", "v1.0.0-rc.0")];
    let step = KubeStep::SwitchService {
        service: "portal-api-prod".into(),
        selector: selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    };
    (json!({"app": "portal-api", "version": "v1.0.0-rc.0"}), step)
}

/// The release tool owns the Service's selector and its ports, and the selector already
/// pointed at stable before the incident opened. The tool changing a port after the opening
/// moves its one managedFields time past the opening: the step found done names the tool, and
/// says that its time is its last change of any field it owns, not necessarily the selector's
/// (and, being somebody else's, it is not counted as our rollback). A person's `kubectl patch`
/// of the selector alone, after the opening, is named with its own time.
#[tokio::test]
async fn a_selector_owner_that_changed_a_port_after_opening_is_named_with_the_doubt() {
    let fake = FakeKube::start().await;
    fake.run_controllers();
    fake.insert("services", service(NS, "portal-api-prod", &[("app", "portal-api")]));
    let (stable, step) = to_stable();
    let ports = |port: u16| json!([{"name": "http", "port": port, "protocol": "TCP"}]);
    patch_service(&fake, "helm", json!({"spec": {"selector": stable, "ports": ports(80)}})).await;
    let opened_at = incident_opens().await;
    patch_service(&fake, "helm", json!({"spec": {"ports": ports(8080)}})).await;
    let helm = managed_by(fake.get("services", NS, "portal-api-prod"), "helm");
    assert!(helm["fieldsV1"]["f:spec"]["f:selector"].is_object(), "{helm}");
    assert!(helm["fieldsV1"]["f:spec"]["f:ports"].is_object(), "{helm}");

    let writes = fake.writes();
    let outcome = executor(&fake)
        .revert_since(&target(vec![step.clone()]), false, opened_at, &mut |_| {})
        .await
        .expect("found done");
    assert!(!outcome.changed);
    assert_eq!(fake.writes(), writes, "nothing written");
    let StepResult::AlreadyDone { by, .. } = &outcome.steps[0].result else {
        panic!("{:?}", outcome.steps[0].result);
    };
    let by = by.as_ref().expect("the selector's owner is named");
    assert_eq!((by.manager.as_str(), by.shared_time), ("helm", true), "{by:?}");
    match outcome.found_reverted_by("rollback-responder", Some(opened_at)) {
        Some(RevertedBy::Others { who }) => assert!(
            who.contains("by `helm` (Update at 2") && who.ends_with(", its last change of any field it owns)"),
            "{who}"
        ),
        other => panic!("{other:?}"),
    }

    // A person sends the Service to the canary and back, each a selector-only patch: the
    // selector is all `kubectl-patch` owns, so its time is the selector's.
    patch_service(
        &fake,
        "kubectl-patch",
        json!({"spec": {"selector": {"version": "v1.0.0"}}}),
    )
    .await;
    patch_service(
        &fake,
        "kubectl-patch",
        json!({"spec": {"selector": {"version": "v1.0.0-rc.0"}}}),
    )
    .await;
    let outcome = executor(&fake)
        .revert_since(&target(vec![step]), false, opened_at, &mut |_| {})
        .await
        .expect("found done");
    assert!(!outcome.changed);
    match outcome.found_reverted_by("rollback-responder", Some(opened_at)) {
        Some(RevertedBy::Others { who }) => assert!(
            who.contains("by `kubectl-patch` (Update at 2") && !who.contains("any field it owns"),
            "{who}"
        ),
        other => panic!("{other:?}"),
    }
}
