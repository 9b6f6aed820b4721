//! The Role in deploy/kubernetes/base/rbac.yaml grants exactly what the Kubernetes executor
//! calls (`RBAC_RULES`): no permission missing (the revert would fail with 403 mid-incident),
//! none extra (least privilege). The requests the executor really sends are checked against
//! the same Role by the fake API server (tests/support/fake_kube.rs, when it is dropped).

use std::collections::BTreeSet;

use rollback_responder::action::kubernetes::RBAC_RULES;
use serde::Deserialize;
use serde_norway::Value;

use crate::support::fake_kube::{service, FakeKube};
use crate::support::rbac::{Access, Role};

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

/// The optional GitOps Roles (deploy/kubernetes/gitops/) grant exactly what the suspend calls
/// (`gitops::RBAC_RULES`), in the tools' own namespaces, bound to the responder's account.
#[test]
fn gitops_roles_grant_exactly_the_suspend_rules() {
    use crate::support::rbac::GITOPS_RBAC_YAMLS;
    use rollback_responder::action::gitops;

    let mut granted = BTreeSet::new();
    let mut namespaces = Vec::new();
    for path in GITOPS_RBAC_YAMLS {
        let text = std::fs::read_to_string(path).expect("read a gitops rbac.yaml");
        let docs: Vec<Value> = serde_norway::Deserializer::from_str(&text)
            .map(|d| Value::deserialize(d).expect("yaml document"))
            .collect();
        let roles = Role::parse_all(&text);
        assert_eq!(roles.len(), 1, "{path}: one Role");
        let binding = docs
            .iter()
            .find(|d| d.get("kind").and_then(Value::as_str) == Some("RoleBinding"))
            .unwrap_or_else(|| panic!("{path}: a RoleBinding"));
        assert_eq!(
            binding["metadata"]["namespace"].as_str(),
            Some(roles[0].namespace.as_str())
        );
        assert_eq!(binding["roleRef"]["name"].as_str(), Some(roles[0].name.as_str()));
        assert_eq!(binding["subjects"][0]["name"].as_str(), Some("rollback-responder"));
        assert_eq!(binding["subjects"][0]["namespace"].as_str(), Some("rollback-responder"));
        namespaces.push(roles[0].namespace.clone());
        for rule in &roles[0].rules {
            assert!(rule.resource_names.is_empty(), "{path}: resourceNames");
            for g in &rule.api_groups {
                for r in &rule.resources {
                    for v in &rule.verbs {
                        granted.insert((g.clone(), r.clone(), v.clone()));
                    }
                }
            }
        }
    }
    assert_eq!(namespaces, ["argocd", "flux-system"]);
    let needed: BTreeSet<(String, String, String)> = gitops::RBAC_RULES
        .iter()
        .flat_map(|(g, r, verbs)| verbs.iter().map(move |v| (g.to_string(), r.to_string(), v.to_string())))
        .collect();
    assert_eq!(granted, needed, "gitops Roles and gitops::RBAC_RULES differ");
}

/// The parsed Role answers as the RBAC authorizer would: namespace, group, resource (a
/// subresource only by its own name), verb, and resourceNames all have to match.
#[test]
fn the_role_check_answers_like_the_authorizer() {
    let role = Role::parse(
        "kind: Role\nmetadata: {name: r, namespace: portal}\nrules:\n\
         - {apiGroups: [\"\"], resources: [services], verbs: [get, patch]}\n\
         - {apiGroups: [apps], resources: [deployments], verbs: [get]}\n\
         - {apiGroups: [apps], resources: [replicasets], verbs: [list], resourceNames: [only]}\n",
    );
    let allowed = |m: &str, p: &str| role.allows(&Access::of(m, p, false));
    assert!(allowed("GET", "/api/v1/namespaces/portal/services/web"));
    assert!(allowed("PATCH", "/api/v1/namespaces/portal/services/web"));
    assert!(
        !allowed("GET", "/api/v1/namespaces/other/services/web"),
        "another namespace"
    );
    assert!(!allowed("GET", "/api/v1/namespaces/portal/services"), "list is not get");
    assert!(!allowed("DELETE", "/api/v1/namespaces/portal/services/web"));
    assert!(
        !allowed("PUT", "/api/v1/namespaces/portal/services/web"),
        "update is not patch"
    );
    assert!(
        !allowed("GET", "/apis/extensions/v1/namespaces/portal/deployments/web"),
        "another group"
    );
    assert!(allowed("GET", "/apis/apps/v1/namespaces/portal/deployments/web"));
    assert!(
        !allowed("GET", "/apis/apps/v1/namespaces/portal/deployments/web/scale"),
        "deployments does not cover deployments/scale"
    );
    assert!(
        !allowed("GET", "/apis/apps/v1/namespaces/portal/replicasets"),
        "resourceNames"
    );
    assert!(!allowed("GET", "/api/v1/services"), "cluster-wide");
    assert!(!allowed("GET", "/api"), "non-resource");
    assert!(!role.allows(&Access::of("GET", "/api/v1/namespaces/portal/services", true)));
}

/// The fake API server logs what a client really sends; requests the shipped Role does not
/// allow are found (and would fail the test that sent them when the fake is dropped).
#[tokio::test]
async fn requests_outside_the_shipped_role_are_caught() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::{Secret, Service};
    use kube::api::{Api, DeleteParams, ListParams};

    let role = Role::shipped();
    assert_eq!(role.namespace, "portal");
    let fake = FakeKube::start().await;
    fake.insert("services", service("portal", "web", &[("app", "web")]));
    let client = fake.client();
    let services: Api<Service> = Api::namespaced(client.clone(), "portal");
    services.get("web").await.expect("get the service");
    let _ = Api::<Deployment>::namespaced(client.clone(), "portal")
        .delete("web", &DeleteParams::default())
        .await;
    let _ = Api::<Secret>::namespaced(client.clone(), "portal")
        .list(&ListParams::default())
        .await;
    let _ = Api::<Service>::namespaced(client, "billing").get("web").await;
    let outside: Vec<String> = fake.outside_rbac(&role).iter().map(|l| l.access.to_string()).collect();
    assert_eq!(
        outside,
        [
            "delete apps/deployments in portal",
            "list secrets in portal",
            "get services in billing"
        ]
    );
    fake.expect_outside_rbac();
}
