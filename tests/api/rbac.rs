//! The Role in deploy/kubernetes/base/rbac.yaml grants exactly what the Kubernetes executor
//! calls (`RBAC_RULES`): no permission missing (the revert would fail with 403 mid-incident),
//! none extra (least privilege).

use std::collections::BTreeSet;

use rollback_responder::action::kubernetes::RBAC_RULES;
use serde::Deserialize;
use serde_norway::Value;

const RBAC_YAML: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes/base/rbac.yaml");

fn strings(v: &Value, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_sequence)
        .map(|s| s.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default()
}

#[test]
fn role_grants_exactly_the_executor_rules() {
    let text = std::fs::read_to_string(RBAC_YAML).expect("read rbac.yaml");
    let docs: Vec<Value> = serde_norway::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("yaml document"))
        .collect();
    let role = docs
        .iter()
        .find(|d| d.get("kind").and_then(Value::as_str) == Some("Role"))
        .expect("a Role document");
    let role_name = role["metadata"]["name"].as_str().expect("role name");
    let binding = docs
        .iter()
        .find(|d| d.get("kind").and_then(Value::as_str) == Some("RoleBinding"))
        .expect("a RoleBinding document");
    assert_eq!(binding["roleRef"]["kind"].as_str(), Some("Role"));
    assert_eq!(binding["roleRef"]["name"].as_str(), Some(role_name));

    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_sequence().expect("rules") {
        assert!(
            rule.get("resourceNames").is_none(),
            "resourceNames would break the executor: {rule:?}"
        );
        for group in strings(rule, "apiGroups") {
            for resource in strings(rule, "resources") {
                for verb in strings(rule, "verbs") {
                    granted.insert((group.clone(), resource.clone(), verb));
                }
            }
        }
    }
    let needed: BTreeSet<(String, String, String)> = RBAC_RULES
        .iter()
        .flat_map(|(g, r, verbs)| verbs.iter().map(move |v| (g.to_string(), r.to_string(), v.to_string())))
        .collect();
    let missing: Vec<_> = needed.difference(&granted).collect();
    let extra: Vec<_> = granted.difference(&needed).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "rbac.yaml and RBAC_RULES differ: missing {missing:?}, extra {extra:?}"
    );
}
