//! "Changed since the incident opened" from managedFields, per field: a manager's time is
//! when it last changed any field it owns, so a Deployment relabelled after the opening by the
//! manager that also owns the pod template does not block the rollback, while a template
//! change after the opening still does. Against the fake API server with its Deployment
//! controller (ReplicaSets, revisions, managedFields).

use rollback_responder::action::kubernetes::{KubeError, StepResult};
use serde_json::json;

use crate::kube_fake::{
    executor, incident_opens, patch_template, released_three_times, revision_and_image, target, undo_step,
};
use crate::support::fake_kube::{template, FakeKube};

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
    let d = fake.get("deployments", NS, "portal-api").expect("deployment");
    let entry = d["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["manager"] == "argocd-controller")
        .expect("the release tool's entry")
        .clone();
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
