//! What a cluster does after a write, for the fake API server in `fake_kube` (turned on with
//! [`super::fake_kube::FakeKube::run_controllers`]):
//!
//! - managedFields: each write through the API makes its field manager (the `fieldManager`
//!   query parameter, else `unknown`) own the fields it changed, at the time of the write
//!   (whole seconds, as the API server records it); other managers lose those fields.
//! - the Deployment controller: a Deployment whose pod template changed gets a ReplicaSet with
//!   the next `deployment.kubernetes.io/revision`, reusing an owned one whose template is equal
//!   apart from `pod-template-hash` (a rollback: the old number goes into
//!   `deployment.kubernetes.io/revision-history`, as a cluster does), scaled to the Deployment's
//!   replicas while the others go to 0; the Deployment's revision annotation and status follow.
//!   Pods do not follow ReplicaSets here.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

const REVISION: &str = "deployment.kubernetes.io/revision";
const HISTORY: &str = "deployment.kubernetes.io/revision-history";
const HASH: &str = "pod-template-hash";

type Objects = BTreeMap<(String, String, String), Value>;

/// Now, as the API server writes times.
pub fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Changed fields between two versions of an object, as managedFields paths
/// (`["f:spec", "f:template"]`): spec keys and metadata labels/annotations.
fn changed_fields(before: &Value, after: &Value) -> Vec<[String; 2]> {
    let mut out = Vec::new();
    let empty = Map::new();
    let keys = |v: Option<&Value>| v.and_then(Value::as_object).unwrap_or(&empty).clone();
    let (b, a) = (keys(before.get("spec")), keys(after.get("spec")));
    for k in b.keys().chain(a.keys()) {
        if b.get(k) != a.get(k) && !out.iter().any(|p: &[String; 2]| p[1] == format!("f:{k}")) {
            out.push(["f:spec".to_string(), format!("f:{k}")]);
        }
    }
    for k in ["labels", "annotations"] {
        if before["metadata"].get(k) != after["metadata"].get(k) {
            out.push(["f:metadata".to_string(), format!("f:{k}")]);
        }
    }
    out
}

/// Records `manager` as the owner of what changed from `before` to `after` (in `after`).
pub fn record_manager(before: &Value, after: &mut Value, manager: &str, subresource: Option<&str>) {
    let changed = changed_fields(before, after);
    if changed.is_empty() {
        return;
    }
    let mut entries: Vec<Value> = after["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for e in &mut entries {
        for [top, field] in &changed {
            if let Some(m) = e
                .pointer_mut(&format!("/fieldsV1/{top}"))
                .and_then(Value::as_object_mut)
            {
                m.remove(field);
            }
        }
    }
    entries.retain(|e| {
        e["fieldsV1"]
            .as_object()
            .is_some_and(|m| m.values().any(|v| v.as_object().is_some_and(|f| !f.is_empty())))
    });
    let mut mine = entries
        .iter()
        .position(|e| e["manager"] == manager && e.get("subresource").and_then(Value::as_str) == subresource)
        .map(|i| entries.remove(i))
        .unwrap_or_else(
            || json!({"manager": manager, "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": {}}),
        );
    mine["apiVersion"] = after["apiVersion"].clone();
    mine["time"] = json!(now());
    if let Some(sub) = subresource {
        mine["subresource"] = json!(sub);
    }
    for [top, field] in &changed {
        mine["fieldsV1"][top][field] = json!({});
    }
    entries.push(mine);
    after["metadata"]["managedFields"] = Value::Array(entries);
}

fn without_hash(template: &Value) -> Value {
    let mut t = template.clone();
    if let Some(l) = t.pointer_mut("/metadata/labels").and_then(Value::as_object_mut) {
        l.remove(HASH);
    }
    t
}

fn revision_of(rs: &Value) -> u64 {
    rs["metadata"]["annotations"][REVISION]
        .as_str()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

/// Reconciles Deployment `ns/name` once (see the module docs). `rv` hands out resourceVersions.
pub fn reconcile_deployment(objects: &mut Objects, ns: &str, name: &str, rv: &mut dyn FnMut() -> String) {
    let Some(d) = objects.get(&("deployments".into(), ns.into(), name.into())).cloned() else {
        return;
    };
    let uid = d["metadata"]["uid"].clone();
    let template = without_hash(&d["spec"]["template"]);
    let replicas = d["spec"]["replicas"].as_i64().unwrap_or(1);
    let owned: Vec<(String, String, String)> = objects
        .iter()
        .filter(|((plural, n, _), rs)| {
            plural == "replicasets"
                && n == ns
                && rs["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|o| o.iter().any(|r| r["controller"] == true && r["uid"] == uid))
        })
        .map(|(k, _)| k.clone())
        .collect();
    let max = owned.iter().map(|k| revision_of(&objects[k])).max().unwrap_or(0);
    let current = owned
        .iter()
        .find(|k| without_hash(&objects[*k]["spec"]["template"]) == template)
        .cloned();
    let current = match current {
        Some(k) => {
            let rs = objects.get_mut(&k).expect("owned replicaset");
            let old = revision_of(rs);
            if old != max {
                let ann = &mut rs["metadata"]["annotations"];
                let mut history: Vec<String> = ann[HISTORY]
                    .as_str()
                    .map(|h| h.split(',').map(str::to_string).collect())
                    .unwrap_or_default();
                history.push(old.to_string());
                ann[HISTORY] = json!(history.join(","));
                ann[REVISION] = json!((max + 1).to_string());
            }
            k
        }
        None => {
            let hash = format!("{:010x}", fnv(&template.to_string()));
            let mut tpl = template.clone();
            tpl["metadata"]["labels"][HASH] = json!(hash);
            let rs_name = format!("{name}-{hash}");
            let rs = json!({
                "apiVersion": "apps/v1", "kind": "ReplicaSet",
                "metadata": {
                    "name": rs_name, "namespace": ns, "uid": format!("rs-{hash}"),
                    "generation": 1, "creationTimestamp": now(),
                    "labels": tpl["metadata"]["labels"],
                    "annotations": {REVISION: (max + 1).to_string()},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": name, "uid": uid,
                                         "controller": true, "blockOwnerDeletion": true}],
                },
                "spec": {"replicas": 0, "selector": {"matchLabels": tpl["metadata"]["labels"]}, "template": tpl},
                "status": {"replicas": 0},
            });
            let key = ("replicasets".to_string(), ns.to_string(), rs_name);
            objects.insert(key.clone(), rs);
            key
        }
    };
    let keys: Vec<_> = owned.into_iter().chain([current.clone()]).collect();
    for k in keys {
        let n = if k == current { replicas } else { 0 };
        let rs = objects.get_mut(&k).expect("owned replicaset");
        rs["spec"]["replicas"] = json!(n);
        rs["status"] = json!({"replicas": n, "readyReplicas": n, "availableReplicas": n});
        rs["metadata"]["resourceVersion"] = json!(rv());
    }
    let revision = revision_of(&objects[&current]);
    let d = objects
        .get_mut(&("deployments".into(), ns.into(), name.into()))
        .expect("deployment");
    d["metadata"]["annotations"][REVISION] = json!(revision.to_string());
    d["status"] = json!({
        "observedGeneration": d["metadata"]["generation"], "replicas": replicas, "updatedReplicas": replicas,
        "readyReplicas": replicas, "availableReplicas": replicas,
    });
    d["metadata"]["resourceVersion"] = json!(rv());
}

/// FNV-1a, for a stable pod-template-hash.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }) & 0xff_ffff_ffff
}
