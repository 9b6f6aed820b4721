//! A small fake Kubernetes API server on loopback for the Kubernetes executor's end-to-end
//! tests (no real kube-apiserver can run here).
//!
//! It keeps Services, Pods, Deployments, ReplicaSets and EndpointSlices in memory (and, for
//! the GitOps suspend, Argo CD Applications and Flux Kustomizations and HelmReleases, stored
//! like any other object: GET and merge/JSON patch, no controller), and serves
//! the Deployment `scale` subresource as an autoscaling/v1 `Scale`. Like the real server it
//! assigns `uid`, `resourceVersion` (one counter for everything) and `generation` (bumped when
//! `spec` changes), answers 409 `Conflict` to a PUT or merge patch carrying a stale
//! resourceVersion, 422 `Invalid` to a JSON patch whose `test` op fails, honours
//! `dryRun=All` (validated, not stored), and returns standard `Status` objects (`NotFound`,
//! `Conflict`, `Invalid`, `Forbidden`, `BadRequest`) because kube-core classifies errors by
//! their reason. Lists filter by namespace and `labelSelector`; only equality-based
//! selectors (`a=b`, `a==b`, `a!=b`) and `key` / `!key` are understood, anything set-based
//! answers 400. By default it runs no controllers: tests change status (ready pods, rollout
//! progress, revisions) themselves with [`FakeKube::modify`]; [`FakeKube::run_controllers`]
//! turns on managedFields and the Deployment controller (`support::kube_controllers`).
//!
//! Every request is logged with the access it makes in RBAC terms ([`Logged::access`]). When
//! the fake is dropped at the end of a test that did not fail, each logged request is checked
//! against the Role shipped in deploy/kubernetes/base/rbac.yaml: a request the Role does not
//! allow (a call the executor makes but the Role forgets, which would be a 403 in a cluster)
//! fails the test. A test that sends such requests on purpose calls
//! [`FakeKube::expect_outside_rbac`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use super::kube_controllers::{reconcile_deployment, record_manager};
use super::rbac::{Access, Role};

/// One request as received.
#[derive(Debug, Clone, PartialEq)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub content_type: Option<String>,
    /// What the request asks to do, as the RBAC authorizer sees it.
    pub access: Access,
}

#[derive(Default)]
struct Store {
    next_rv: u64,
    next_uid: u64,
    /// (plural, namespace, name) -> object.
    objects: BTreeMap<(String, String, String), Value>,
    /// (verb, resource[/subresource]) answered with 403.
    denied: HashSet<(String, String)>,
    /// Simulated other writers: before each of the next N patches, bump the object's
    /// resourceVersion as if someone else had written it.
    concurrent_writes: u32,
    /// Writes that changed stored objects through the API (not `modify`).
    writes: u32,
    requests: Vec<Logged>,
    /// The test sends requests outside the Role on purpose: no check when dropped.
    outside_rbac_expected: bool,
    /// managedFields and the Deployment controller run (`kube_controllers`).
    controllers: bool,
}

impl Store {
    fn rv(&mut self) -> String {
        self.next_rv += 1;
        self.next_rv.to_string()
    }
}

/// The fake server; dropped, it stops.
pub struct FakeKube {
    pub addr: SocketAddr,
    state: Arc<Mutex<Store>>,
    task: JoinHandle<()>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.task.abort();
        // A failing test has already said what went wrong; a panic here would abort.
        if std::thread::panicking() || self.lock().outside_rbac_expected {
            return;
        }
        let outside = self.outside_roles(&Role::shipped_all());
        assert!(
            outside.is_empty(),
            "requests the shipped Roles ({} and {:?}) do not allow; in a cluster they would be 403:\n{}",
            super::rbac::RBAC_YAML,
            super::rbac::GITOPS_RBAC_YAMLS,
            outside
                .iter()
                .map(|l| format!("  {} ({} {})", l.access, l.method, l.path))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// (API group path prefix, apiVersion, kind) per plural resource.
fn kind_of(plural: &str) -> Option<(&'static str, &'static str, &'static str)> {
    Some(match plural {
        "services" => ("/api/v1", "v1", "Service"),
        "pods" => ("/api/v1", "v1", "Pod"),
        "deployments" => ("/apis/apps/v1", "apps/v1", "Deployment"),
        "replicasets" => ("/apis/apps/v1", "apps/v1", "ReplicaSet"),
        "endpointslices" => ("/apis/discovery.k8s.io/v1", "discovery.k8s.io/v1", "EndpointSlice"),
        "applications" => ("/apis/argoproj.io/v1alpha1", "argoproj.io/v1alpha1", "Application"),
        "kustomizations" => (
            "/apis/kustomize.toolkit.fluxcd.io/v1",
            "kustomize.toolkit.fluxcd.io/v1",
            "Kustomization",
        ),
        "helmreleases" => (
            "/apis/helm.toolkit.fluxcd.io/v2",
            "helm.toolkit.fluxcd.io/v2",
            "HelmRelease",
        ),
        _ => return None,
    })
}

fn group_of(plural: &str) -> &'static str {
    match plural {
        "deployments" | "replicasets" => "apps",
        "endpointslices" => "discovery.k8s.io",
        "applications" => "argoproj.io",
        "kustomizations" => "kustomize.toolkit.fluxcd.io",
        "helmreleases" => "helm.toolkit.fluxcd.io",
        _ => "",
    }
}

impl FakeKube {
    pub async fn start() -> FakeKube {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake kube");
        let addr = listener.local_addr().expect("fake kube addr");
        let state = Arc::new(Mutex::new(Store::default()));
        let app = Router::new().fallback(handle).with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeKube { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A real kube client talking plain HTTP to this server.
    pub fn client(&self) -> kube::Client {
        rollback_responder::tls::install_crypto_provider();
        let mut config = kube::Config::new(self.url().parse().expect("fake kube url"));
        config.default_retry = false;
        kube::Client::try_from(config).expect("kube client for the fake server")
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores an object as created: uid (unless given), resourceVersion, generation 1.
    pub fn insert(&self, plural: &str, mut obj: Value) -> Value {
        let (_, api_version, kind) = kind_of(plural).expect("known resource");
        let mut s = self.lock();
        let rv = s.rv();
        s.next_uid += 1;
        let uid = format!("00000000-0000-4000-8000-{:012}", s.next_uid);
        obj["apiVersion"] = json!(api_version);
        obj["kind"] = json!(kind);
        let meta = &mut obj["metadata"];
        if meta.get("uid").is_none() {
            meta["uid"] = json!(uid);
        }
        meta["resourceVersion"] = json!(rv);
        meta["generation"] = json!(1);
        meta["creationTimestamp"] = json!("2025-09-02T02:00:00Z");
        let key = (
            plural.to_string(),
            meta["namespace"].as_str().expect("metadata.namespace").to_string(),
            meta["name"].as_str().expect("metadata.name").to_string(),
        );
        s.objects.insert(key, obj.clone());
        obj
    }

    pub fn get(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(plural.into(), ns.into(), name.into()))
            .cloned()
    }

    /// Changes a stored object as a controller would (status, revisions): new resourceVersion,
    /// not counted as an API write.
    pub fn modify(&self, plural: &str, ns: &str, name: &str, f: impl FnOnce(&mut Value)) {
        let mut s = self.lock();
        let rv = s.rv();
        let obj = s
            .objects
            .get_mut(&(plural.into(), ns.into(), name.into()))
            .expect("object to modify exists");
        f(obj);
        obj["metadata"]["resourceVersion"] = json!(rv);
    }

    /// From now on, writes record managedFields and Deployments get ReplicaSets and revisions
    /// as in a cluster (see `support::kube_controllers`); reconciles the Deployments stored.
    pub fn run_controllers(&self) {
        let mut s = self.lock();
        s.controllers = true;
        let deployments: Vec<(String, String)> = s
            .objects
            .keys()
            .filter(|(p, _, _)| p == "deployments")
            .map(|(_, ns, n)| (ns.clone(), n.clone()))
            .collect();
        for (ns, name) in deployments {
            let Store { objects, next_rv, .. } = &mut *s;
            reconcile_deployment(objects, &ns, &name, &mut || {
                *next_rv += 1;
                next_rv.to_string()
            });
        }
    }

    /// Answer 403 to `verb` on `resource` (e.g. `("patch", "deployments/scale")`).
    pub fn deny(&self, verb: &str, resource: &str) {
        self.lock().denied.insert((verb.into(), resource.into()));
    }

    /// Before each of the next `n` patches, someone else writes the object first.
    pub fn concurrent_writes(&self, n: u32) {
        self.lock().concurrent_writes = n;
    }

    /// Writes through the API that changed stored objects.
    pub fn writes(&self) -> u32 {
        self.lock().writes
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.lock().requests.clone()
    }

    /// The requests so far that `role` does not allow.
    pub fn outside_rbac(&self, role: &Role) -> Vec<Logged> {
        self.outside_roles(std::slice::from_ref(role))
    }

    /// The requests so far that none of `roles` allows.
    pub fn outside_roles(&self, roles: &[Role]) -> Vec<Logged> {
        self.requests()
            .into_iter()
            .filter(|l| !roles.iter().any(|r| r.allows(&l.access)))
            .collect()
    }

    /// This test sends requests outside the shipped Role on purpose: do not check them when
    /// the fake is dropped.
    pub fn expect_outside_rbac(&self) {
        self.lock().outside_rbac_expected = true;
    }
}

fn status(code: StatusCode, reason: &str, message: String, kind: &str, name: &str) -> Response {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": {"name": name, "kind": kind},
        "code": code.as_u16(),
    });
    (code, axum::Json(body)).into_response()
}

fn ok(v: Value) -> Response {
    (StatusCode::OK, axum::Json(v)).into_response()
}

/// Parsed request path.
struct Target {
    plural: String,
    ns: String,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (prefix_len, rest) = match segs.first() {
        Some(&"api") => (2, &segs[2.min(segs.len())..]),
        Some(&"apis") => (3, &segs[3.min(segs.len())..]),
        _ => return None,
    };
    if rest.len() < 3 || rest[0] != "namespaces" || rest.len() > 5 {
        return None;
    }
    let plural = rest[2].to_string();
    let (prefix, _, _) = kind_of(&plural)?;
    if format!("/{}", segs[..prefix_len].join("/")) != prefix {
        return None;
    }
    Some(Target {
        plural,
        ns: rest[1].to_string(),
        name: rest.get(3).map(|s| s.to_string()),
        sub: rest.get(4).map(|s| s.to_string()),
    })
}

/// Equality-based label selector match; `Err` for syntax the fake does not support.
fn selector_matches(selector: &str, labels: &Value) -> Result<bool, String> {
    for req in selector.split(',').map(str::trim).filter(|r| !r.is_empty()) {
        let label = |k: &str| labels.get(k.trim()).and_then(Value::as_str).map(str::to_string);
        let ok = if let Some((k, v)) = req.split_once("!=") {
            label(k).as_deref() != Some(v.trim())
        } else if let Some((k, v)) = req.split_once("==").or_else(|| req.split_once('=')) {
            label(k).as_deref() == Some(v.trim())
        } else if req.contains(' ') || req.contains('(') {
            return Err(format!("set-based selector {req:?} is not supported by the fake"));
        } else if let Some(k) = req.strip_prefix('!') {
            label(k).is_none()
        } else {
            label(req).is_some()
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

fn scale_of(d: &Value) -> Value {
    let labels = d.pointer("/spec/selector/matchLabels").cloned().unwrap_or(json!({}));
    let selector: Vec<String> = labels
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect()
        })
        .unwrap_or_default();
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": d["metadata"]["name"],
            "namespace": d["metadata"]["namespace"],
            "uid": d["metadata"]["uid"],
            "resourceVersion": d["metadata"]["resourceVersion"],
            "creationTimestamp": d["metadata"]["creationTimestamp"],
        },
        "spec": {"replicas": d.pointer("/spec/replicas").cloned().unwrap_or(json!(1))},
        "status": {
            "replicas": d.pointer("/status/replicas").cloned().unwrap_or(json!(0)),
            "selector": selector.join(","),
        },
    })
}

/// Applies a patch body by content type.
fn apply_patch(doc: &mut Value, content_type: &str, body: &[u8], kind: &str, name: &str) -> Result<(), Box<Response>> {
    match content_type {
        "application/json-patch+json" => {
            let patch: json_patch::Patch = serde_json::from_slice(body).map_err(|e| {
                Box::new(status(StatusCode::BAD_REQUEST, "BadRequest", format!("invalid JSON patch: {e}"), kind, name))
            })?;
            // The real server answers a failed operation (including a failed `test`) with 422.
            json_patch::patch(doc, &patch.0).map_err(|e| {
                Box::new(status(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    format!("the server rejected our request due to an error in our request: {e}"),
                    kind,
                    name,
                ))
            })
        }
        "application/merge-patch+json" => {
            let patch: Value = serde_json::from_slice(body).map_err(|e| {
                Box::new(status(StatusCode::BAD_REQUEST, "BadRequest", format!("invalid merge patch: {e}"), kind, name))
            })?;
            json_patch::merge(doc, &patch);
            Ok(())
        }
        other => Err(Box::new(status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json (got {other})"),
            kind,
            name,
        ))),
    }
}

fn conflict(kind: &str, plural: &str, name: &str) -> Response {
    status(
        StatusCode::CONFLICT,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {plural} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
        ),
        kind,
        name,
    )
}

async fn handle(
    State(state): State<Arc<Mutex<Store>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or(v).trim().to_string());
    let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    s.requests.push(Logged {
        method: method.to_string(),
        path: uri.path().to_string(),
        query: query.clone().into_iter().collect(),
        content_type: content_type.clone(),
        access: Access::of(method.as_str(), uri.path(), watch),
    });
    let Some(t) = parse_path(uri.path()) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource".into(),
            "",
            "",
        );
    };
    let (_, api_version, kind) = kind_of(&t.plural).unwrap_or(("", "v1", "Unknown"));
    let name = t.name.clone().unwrap_or_default();
    let resource = match &t.sub {
        Some(sub) => format!("{}/{sub}", t.plural),
        None => t.plural.clone(),
    };
    let verb = match (&method, t.name.is_some()) {
        (&Method::GET, true) => "get",
        (&Method::GET, false) => "list",
        (&Method::PATCH, true) => "patch",
        (&Method::PUT, true) => "update",
        _ => {
            return status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "not supported by the fake".into(),
                kind,
                &name,
            )
        }
    };
    let group = group_of(&t.plural);
    if s.denied.contains(&(verb.to_string(), resource.clone())) {
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "{}{} \"{name}\" is forbidden: User \"system:serviceaccount:rollback-responder:rollback-responder\" cannot {verb} resource \"{resource}\" in API group \"{group}\" in the namespace \"{}\"",
                t.plural,
                if group.is_empty() { String::new() } else { format!(".{group}") },
                t.ns
            ),
            kind,
            &name,
        );
    }
    if t.sub
        .as_deref()
        .is_some_and(|sub| sub != "scale" || t.plural != "deployments")
    {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource".into(),
            kind,
            &name,
        );
    }
    let dry_run = query.get("dryRun").is_some_and(|v| v == "All");

    if verb == "list" {
        let selector = query.get("labelSelector").cloned().unwrap_or_default();
        let mut items = Vec::new();
        for ((plural, ns, _), obj) in &s.objects {
            if plural != &t.plural || ns != &t.ns {
                continue;
            }
            let labels = obj.pointer("/metadata/labels").cloned().unwrap_or(json!({}));
            match selector_matches(&selector, &labels) {
                Ok(true) => items.push(obj.clone()),
                Ok(false) => {}
                Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e, kind, ""),
            }
        }
        return ok(json!({
            "apiVersion": api_version,
            "kind": format!("{kind}List"),
            "metadata": {"resourceVersion": s.next_rv.to_string()},
            "items": items,
        }));
    }

    let key = (t.plural.clone(), t.ns.clone(), name.clone());
    let not_found = || {
        let qualified = if group.is_empty() {
            t.plural.clone()
        } else {
            format!("{}.{group}", t.plural)
        };
        status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{qualified} \"{name}\" not found"),
            kind,
            &name,
        )
    };
    if !s.objects.contains_key(&key) {
        return not_found();
    }
    if verb == "patch" && s.concurrent_writes > 0 {
        s.concurrent_writes -= 1;
        let rv = s.rv();
        if let Some(obj) = s.objects.get_mut(&key) {
            obj["metadata"]["resourceVersion"] = json!(rv);
        }
    }
    let Some(current) = s.objects.get(&key).cloned() else {
        return not_found();
    };
    let current_rv = current["metadata"]["resourceVersion"].clone();
    let is_scale = t.sub.is_some();

    // The object (or Scale) as the request would leave it.
    let mut updated = if is_scale { scale_of(&current) } else { current.clone() };
    match verb {
        "get" => return ok(updated),
        "patch" => {
            if let Err(r) = apply_patch(&mut updated, content_type.as_deref().unwrap_or(""), &body, kind, &name) {
                return *r;
            }
        }
        _ => {
            updated = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => {
                    return status(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        format!("invalid body: {e}"),
                        kind,
                        &name,
                    )
                }
            };
            // An update without resourceVersion is unconditional.
            if updated.pointer("/metadata/resourceVersion").is_none() {
                updated["metadata"]["resourceVersion"] = current_rv.clone();
            }
        }
    }
    // A resourceVersion in the result that is not the stored one is a failed precondition.
    if updated["metadata"]["resourceVersion"] != current_rv {
        return conflict(kind, &t.plural, &name);
    }
    if updated["metadata"]["name"] != current["metadata"]["name"]
        || updated["metadata"]["uid"] != current["metadata"]["uid"]
    {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!("{kind} \"{name}\" is invalid: metadata.name/uid: field is immutable"),
            kind,
            &name,
        );
    }

    let mut new_obj = if is_scale {
        let mut d = current.clone();
        d["spec"]["replicas"] = updated.pointer("/spec/replicas").cloned().unwrap_or(json!(0));
        d
    } else {
        updated
    };
    if let Some(sel) = new_obj.pointer("/spec/selector") {
        if t.plural == "services" && !sel.as_object().is_some_and(|m| m.values().all(Value::is_string)) {
            return status(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                format!("Service \"{name}\" is invalid: spec.selector: must be a map of strings"),
                kind,
                &name,
            );
        }
    }
    // Status is not writable through the main resource.
    new_obj["status"] = current.get("status").cloned().unwrap_or(Value::Null);
    if new_obj["status"].is_null() {
        if let Some(m) = new_obj.as_object_mut() {
            m.remove("status");
        }
    }
    if new_obj.get("spec") != current.get("spec") {
        let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
        new_obj["metadata"]["generation"] = json!(generation + 1);
    }
    if !dry_run && new_obj != current {
        if s.controllers {
            let manager = query.get("fieldManager").map_or("unknown", String::as_str);
            record_manager(&current, &mut new_obj, manager, t.sub.as_deref());
        }
        let rv = s.rv();
        new_obj["metadata"]["resourceVersion"] = json!(rv);
        s.objects.insert(key, new_obj.clone());
        s.writes += 1;
        if s.controllers && t.plural == "deployments" {
            let Store { objects, next_rv, .. } = &mut *s;
            reconcile_deployment(objects, &t.ns, &name, &mut || {
                *next_rv += 1;
                next_rv.to_string()
            });
            if let Some(d) = s.objects.get(&(t.plural.clone(), t.ns.clone(), name.clone())) {
                new_obj = d.clone();
            }
        }
    }
    if is_scale {
        ok(scale_of(&new_obj))
    } else {
        ok(new_obj)
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

pub fn labels(pairs: &[(&str, &str)]) -> Value {
    Value::Object(pairs.iter().map(|(k, v)| (k.to_string(), json!(v))).collect())
}

pub fn service(ns: &str, name: &str, selector: &[(&str, &str)]) -> Value {
    json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": labels(selector), "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}], "type": "ClusterIP"},
    })
}

pub fn pod(ns: &str, name: &str, pod_labels: &[(&str, &str)], ready: bool) -> Value {
    json!({
        "metadata": {"name": name, "namespace": ns, "labels": labels(pod_labels)},
        "spec": {"containers": [{"name": "api", "image": "portal-api"}]},
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
        },
    })
}

/// A pod template with one container.
pub fn template(template_labels: &[(&str, &str)], image: &str) -> Value {
    json!({
        "metadata": {"labels": labels(template_labels)},
        "spec": {"containers": [{"name": "api", "image": image, "ports": [{"containerPort": 8080, "protocol": "TCP"}]}]},
    })
}

pub fn deployment(ns: &str, name: &str, uid: &str, selector: &[(&str, &str)], tpl: Value, revision: u64) -> Value {
    json!({
        "metadata": {
            "name": name, "namespace": ns, "uid": uid,
            "annotations": {"deployment.kubernetes.io/revision": revision.to_string()},
        },
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": labels(selector)},
            "template": tpl,
            "strategy": {"type": "RollingUpdate"},
        },
        "status": {"observedGeneration": 1, "replicas": 3, "updatedReplicas": 3, "readyReplicas": 3, "availableReplicas": 3},
    })
}

/// A ReplicaSet owned by the Deployment `owner` (uid), with the template plus its hash label.
#[allow(clippy::too_many_arguments)]
pub fn replicaset(
    ns: &str,
    owner: &str,
    owner_uid: &str,
    hash: &str,
    tpl: &Value,
    revision: u64,
    replicas: i64,
    ready: i64,
) -> Value {
    let mut tpl = tpl.clone();
    tpl["metadata"]["labels"]["pod-template-hash"] = json!(hash);
    json!({
        "metadata": {
            "name": format!("{owner}-{hash}"),
            "namespace": ns,
            "labels": tpl["metadata"]["labels"],
            "annotations": {
                "deployment.kubernetes.io/revision": revision.to_string(),
                "deployment.kubernetes.io/desired-replicas": "3",
                "deployment.kubernetes.io/max-replicas": "4",
            },
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "Deployment", "name": owner, "uid": owner_uid,
                "controller": true, "blockOwnerDeletion": true,
            }],
        },
        "spec": {"replicas": replicas, "selector": {"matchLabels": tpl["metadata"]["labels"]}, "template": tpl},
        "status": {"replicas": replicas, "readyReplicas": ready, "availableReplicas": ready},
    })
}

/// An EndpointSlice of `service` with one endpoint per (pod name, ready).
pub fn endpointslice(ns: &str, service: &str, suffix: &str, endpoints: &[(&str, bool)]) -> Value {
    let eps: Vec<Value> = endpoints
        .iter()
        .enumerate()
        .map(|(i, (pod, ready))| {
            json!({
                "addresses": [format!("10.0.0.{}", i + 10)],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
                "targetRef": {"kind": "Pod", "name": pod, "namespace": ns},
            })
        })
        .collect();
    json!({
        "metadata": {"name": format!("{service}-{suffix}"), "namespace": ns, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
    })
}
