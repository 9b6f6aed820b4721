//! Unit tests: whether the pod template changed since the incident opened, from managedFields
//! (one time per manager) and the ReplicaSets.

use serde_json::{json, Value};

use super::plan::*;
use super::tests::{at, change, deploy, history, tpl};
use super::views::*;

/// managedFields keep one time per manager: helm, which owns the pod template and the labels,
/// relabelling the Deployment after the incident opened is no template change (the template
/// still runs the newest revision's ReplicaSet, made before the opening), while a template
/// change of its own, or one that cannot be ruled out, still refuses.
#[test]
fn a_managers_change_of_another_field_after_opening_does_not_pin_the_template_as_changed() {
    let opened = at("2026-12-03T10:00:00Z");
    let mut rses = history();
    for (rs, created) in rses
        .iter_mut()
        .zip(["2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z"])
    {
        rs.created = Some(at(created));
    }
    let mut d = deploy("v3");
    d.template_change = change("helm", "2026-12-03T10:02:00Z");
    let plan = plan_rollout_undo(&d, &rses, &Good::BeforeBad, Some(opened));
    let Ok(Plan::Write(w)) = plan else {
        panic!("expected the undo: {plan:?}");
    };
    assert_eq!(w.patch[1]["value"], tpl("v2", None));
    assert_eq!(template_changed_since(&d, &rses, opened), None);
    // helm owns nothing but the template: its time is the template's.
    let mut exact = d.clone();
    exact.template_change_exact = true;
    let err = plan_rollout_undo(&exact, &rses, &Good::BeforeBad, Some(opened)).expect_err("changed");
    assert_eq!(err.code(), "changed_since_opened");
    // The controller has not acted on the latest spec yet: the ReplicaSets say nothing.
    let mut unseen = d.clone();
    unseen.observed_generation = Some(4);
    assert!(template_changed_since(&unseen, &rses, opened).is_some());
    // The current ReplicaSet was made after the opening (a new release), or reused by a
    // rollback (it has a revision history), or its creation is unknown: changed.
    for edit in [
        (|rs: &mut RsView| rs.created = Some(at("2026-12-03T10:01:00Z"))) as fn(&mut RsView),
        |rs: &mut RsView| rs.revision_history = vec![1],
        |rs: &mut RsView| rs.created = None,
    ] {
        let mut r = rses.clone();
        edit(&mut r[2]);
        assert!(template_changed_since(&d, &r, opened).is_some(), "{:?}", r[2]);
    }
    // A step found done is not said to be someone's change since the opening.
    let named = plan_rollout_undo(&d, &rses, &Good::Revision(3), Some(opened));
    assert!(matches!(named, Ok(Plan::Done { by: None, .. })), "{named:?}");
}

#[test]
fn managed_fields_say_whether_a_managers_time_is_the_templates() {
    let meta = |fields: Value| -> k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        serde_json::from_value(json!({"managedFields": [{
            "manager": "helm", "operation": "Update", "time": "2026-12-03T10:02:00Z",
            "fieldsType": "FieldsV1", "fieldsV1": fields,
        }]}))
        .expect("meta")
    };
    let only = meta(json!({"f:spec": {"f:template": {"f:spec": {"f:containers": {}}}}}));
    assert_eq!(last_change_exact(&only, TEMPLATE_PATH).map(|(_, e)| e), Some(true));
    let more = meta(json!({"f:metadata": {"f:labels": {".": {}, "f:team": {}}}, "f:spec": {"f:template": {}}}));
    assert_eq!(last_change_exact(&more, TEMPLATE_PATH).map(|(_, e)| e), Some(false));
    let replicas = meta(json!({"f:spec": {"f:replicas": {}, "f:template": {}}}));
    assert_eq!(last_change_exact(&replicas, TEMPLATE_PATH).map(|(_, e)| e), Some(false));
    let other = meta(json!({"f:metadata": {"f:labels": {}}}));
    assert_eq!(last_change_exact(&other, TEMPLATE_PATH), None);
}

/// A Service's selector found already switched names whoever owns the selector, at that
/// manager's time; when the manager owns the ports too, that time may be a port's change, and
/// what we say names that doubt (the time still counts as a change since the opening, so such
/// a step is never counted as our own rollback on its strength).
#[test]
fn a_selector_owner_that_owns_other_fields_is_named_with_its_time_in_doubt() {
    let entry = |manager: &str, time: &str, fields: Value| json!({"manager": manager, "operation": "Update", "time": time, "fieldsType": "FieldsV1", "fieldsV1": fields});
    let meta = |entries: Vec<Value>| -> k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        serde_json::from_value(json!({ "managedFields": entries })).expect("meta")
    };
    let selector_and_ports = json!({"f:spec": {"f:selector": {}, "f:ports": {}}});
    let helm = meta(vec![entry("helm", "2026-12-03T10:02:00Z", selector_and_ports)]);
    let change = field_change(&helm, SELECTOR_PATH).expect("helm owns the selector");
    assert_eq!(change.manager, "helm");
    assert_eq!(change.time, Some(at("2026-12-03T10:02:00Z")));
    assert!(change.shared_time);
    assert!(change.since(at("2026-12-03T10:00:00Z")));
    assert_eq!(
        change.describe(),
        "by `helm` (Update at 2026-12-03T10:02:00Z, its last change of any field it owns)"
    );
    // The selector alone: its owner's time is the selector's.
    let patched = meta(vec![
        entry("helm", "2026-12-03T09:00:00Z", json!({"f:spec": {"f:ports": {}}})),
        entry(
            "kubectl-patch",
            "2026-12-03T10:02:00Z",
            json!({"f:spec": {"f:selector": {}}}),
        ),
    ]);
    let change = field_change(&patched, SELECTOR_PATH).expect("kubectl-patch owns the selector");
    assert_eq!(change.manager, "kubectl-patch");
    assert!(!change.shared_time);
    assert_eq!(change.describe(), "by `kubectl-patch` (Update at 2026-12-03T10:02:00Z)");
    // Nobody owns it.
    let ports = meta(vec![entry(
        "helm",
        "2026-12-03T10:02:00Z",
        json!({"f:spec": {"f:ports": {}}}),
    )]);
    assert_eq!(field_change(&ports, SELECTOR_PATH), None);
}
