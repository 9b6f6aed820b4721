//! The shipped RBAC Role (deploy/kubernetes/base/rbac.yaml), parsed, and the Kubernetes
//! authorizer's question asked of it: may this request (verb, API group, resource,
//! subresource, namespace) be made? The fake API server logs every request in these terms
//! ([`Access`]) so tests can check that what the executor really sends stays within the Role.

use serde::Deserialize;
use serde_norway::Value;

/// Path of the shipped Role and RoleBinding.
pub const RBAC_YAML: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes/base/rbac.yaml");
/// The optional Roles for the GitOps suspend (Argo CD, Flux), each in its tool's namespace.
pub const GITOPS_RBAC_YAMLS: &[&str] = &[
    concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes/gitops/argocd/rbac.yaml"),
    concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes/gitops/flux/rbac.yaml"),
];

/// One API request in RBAC terms, as the API server's authorizer sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Access {
    /// get, list, watch, create, update, patch, delete, deletecollection; for a request that
    /// names no resource (`/api`, `/version`), the HTTP method in lower case.
    pub verb: String,
    /// "" for the core group.
    pub group: String,
    /// Plural resource (`deployments`), or the path of a non-resource request.
    pub resource: String,
    pub subresource: Option<String>,
    /// The object named, if any (`None` for a list or a create).
    pub name: Option<String>,
    /// `None` for a cluster-scoped or non-resource request.
    pub namespace: Option<String>,
    /// Whether the request names a resource at all (a Role never grants the others).
    pub is_resource: bool,
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let resource = match &self.subresource {
            Some(s) => format!("{}/{s}", self.resource),
            None => self.resource.clone(),
        };
        write!(
            f,
            "{} {}{} in {}",
            self.verb,
            if self.group.is_empty() {
                String::new()
            } else {
                format!("{}/", self.group)
            },
            resource,
            self.namespace.as_deref().unwrap_or("(cluster)")
        )
    }
}

impl Access {
    /// The access a request makes, from its method, path and query (`watch=true` on a list).
    pub fn of(method: &str, path: &str, watch: bool) -> Access {
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let non_resource = || Access {
            verb: method.to_ascii_lowercase(),
            group: String::new(),
            resource: path.to_string(),
            subresource: None,
            name: None,
            namespace: None,
            is_resource: false,
        };
        let (group, rest) = match segs.as_slice() {
            ["api", _version, rest @ ..] if !rest.is_empty() => ("", rest),
            ["apis", group, _version, rest @ ..] if !rest.is_empty() => (*group, rest),
            _ => return non_resource(),
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
            // `/api/v1/namespaces/NAME` is the namespace object itself (cluster-scoped).
            _ => (None, rest),
        };
        let (resource, name, subresource) = match rest {
            [r] => (*r, None, None),
            [r, n] => (*r, Some(*n), None),
            [r, n, s] => (*r, Some(*n), Some(s.to_string())),
            _ => return non_resource(),
        };
        let verb = match (method, name.is_some()) {
            ("GET", true) => "get",
            ("GET", false) if watch => "watch",
            ("GET", false) => "list",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", true) => "delete",
            ("DELETE", false) => "deletecollection",
            (other, _) => {
                return Access {
                    verb: other.to_ascii_lowercase(),
                    ..non_resource()
                }
            }
        };
        Access {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            subresource,
            name: name.map(str::to_string),
            namespace,
            is_resource: true,
        }
    }
}

/// One rule of a Role.
#[derive(Debug, Clone)]
pub struct Rule {
    pub api_groups: Vec<String>,
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
    pub resource_names: Vec<String>,
}

/// A namespaced Role.
#[derive(Debug, Clone)]
pub struct Role {
    pub name: String,
    pub namespace: String,
    pub rules: Vec<Rule>,
}

fn strings(v: &Value, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_sequence)
        .map(|s| s.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default()
}

fn matches(granted: &[String], wanted: &str) -> bool {
    granted.iter().any(|g| g == "*" || g == wanted)
}

impl Role {
    /// The Role of the shipped manifest.
    pub fn shipped() -> Role {
        let text = std::fs::read_to_string(RBAC_YAML).expect("read rbac.yaml");
        Role::parse(&text)
    }

    /// Every Role shipped: the executor's (base) and the optional GitOps ones.
    pub fn shipped_all() -> Vec<Role> {
        std::iter::once(RBAC_YAML)
            .chain(GITOPS_RBAC_YAMLS.iter().copied())
            .flat_map(|path| {
                let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
                Role::parse_all(&text)
            })
            .collect()
    }

    /// The (first) Role in a multi-document manifest.
    pub fn parse(text: &str) -> Role {
        Role::parse_all(text).into_iter().next().expect("a Role document")
    }

    /// Every Role in a multi-document manifest.
    pub fn parse_all(text: &str) -> Vec<Role> {
        serde_norway::Deserializer::from_str(text)
            .map(|d| Value::deserialize(d).expect("yaml document"))
            .filter(|d| d.get("kind").and_then(Value::as_str) == Some("Role"))
            .map(|role| Role::from_doc(&role))
            .collect()
    }

    fn from_doc(role: &Value) -> Role {
        let rules = role["rules"]
            .as_sequence()
            .expect("rules")
            .iter()
            .map(|r| Rule {
                api_groups: strings(r, "apiGroups"),
                resources: strings(r, "resources"),
                verbs: strings(r, "verbs"),
                resource_names: strings(r, "resourceNames"),
            })
            .collect();
        Role {
            name: role["metadata"]["name"].as_str().expect("role name").to_string(),
            namespace: role["metadata"]["namespace"]
                .as_str()
                .expect("role namespace")
                .to_string(),
            rules,
        }
    }

    /// Whether the Role lets `a` through, as the RBAC authorizer decides: the request is in the
    /// Role's namespace and some rule names its group, its resource (with the subresource as
    /// `resource/subresource`, which `resource` alone does not cover) and its verb, and, if the
    /// rule lists `resourceNames`, the object the request names.
    pub fn allows(&self, a: &Access) -> bool {
        if !a.is_resource || a.namespace.as_deref() != Some(self.namespace.as_str()) {
            return false;
        }
        let resource = match &a.subresource {
            Some(s) => format!("{}/{s}", a.resource),
            None => a.resource.clone(),
        };
        self.rules.iter().any(|r| {
            matches(&r.api_groups, &a.group)
                && matches(&r.resources, &resource)
                && matches(&r.verbs, &a.verb)
                && (r.resource_names.is_empty() || a.name.as_ref().is_some_and(|n| r.resource_names.contains(n)))
        })
    }
}
