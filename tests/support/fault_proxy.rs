//! A fault-injecting HTTP proxy on loopback, for tests that put trouble between the responder
//! and a peer (moto, the fake Kubernetes API server) and assert what the peer saw.
//!
//! Every request is forwarded to the upstream unless a queued fault matches it; a fault
//! answers with its own status and body instead (the upstream never sees that request), for
//! a given number of matching requests. Each request is logged with the answer given and
//! whether it reached the upstream, so a test can count, for example, how many
//! `ModifyListener` calls moto really received.

use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use tokio::task::JoinHandle;

/// A canned answer for the next `times` requests whose method, path or awsQuery action
/// contains `matching` (empty: every request).
#[derive(Debug, Clone)]
pub struct Fault {
    pub matching: String,
    pub times: u32,
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Fault {
    /// The Kubernetes API server's 503 `Status`.
    pub fn kube_unavailable(times: u32) -> Fault {
        Fault {
            matching: String::new(),
            times,
            status: 503,
            content_type: "application/json",
            body: serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "etcdserver: leader changed", "reason": "ServiceUnavailable", "code": 503,
            })
            .to_string(),
        }
    }

    /// An awsQuery error (ELBv2), e.g. 503 `ServiceUnavailable` or 400 `Throttling`.
    pub fn aws(matching: &str, times: u32, status: u16, code: &str) -> Fault {
        Fault {
            matching: matching.to_string(),
            times,
            status,
            content_type: "text/xml",
            body: super::fake_elb::error_xml(code, "injected by the test proxy"),
        }
    }
}

/// One request as the proxy handled it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// awsQuery `Action=` of the body, if any.
    pub action: Option<String>,
    pub status: u16,
    /// Whether the upstream received it (false: a fault answered).
    pub forwarded: bool,
}

#[derive(Default)]
struct Shared {
    faults: Vec<Fault>,
    seen: Vec<Seen>,
}

#[derive(Clone)]
struct Ctx {
    upstream: String,
    client: reqwest::Client,
    shared: Arc<Mutex<Shared>>,
}

/// The running proxy; it stops when dropped.
pub struct FaultProxy {
    pub url: String,
    shared: Arc<Mutex<Shared>>,
    task: JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    /// Starts a proxy forwarding to `upstream` (a base URL).
    pub async fn start(upstream: &str) -> FaultProxy {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let ctx = Ctx {
            upstream: upstream.trim_end_matches('/').to_string(),
            client: reqwest::Client::builder().no_proxy().build().expect("proxy client"),
            shared: shared.clone(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fault proxy");
        let url = format!("http://{}", listener.local_addr().expect("proxy address"));
        let app = axum::Router::new().fallback(handle).with_state(ctx);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FaultProxy { url, shared, task }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a fault (faults are tried in the order queued).
    pub fn inject(&self, fault: Fault) {
        self.lock().faults.push(fault);
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    /// Requests a fault answered.
    pub fn injected(&self) -> usize {
        self.seen().iter().filter(|s| !s.forwarded).count()
    }

    /// `action` requests that reached the upstream.
    pub fn forwarded(&self, action: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.forwarded && s.action.as_deref() == Some(action))
            .count()
    }
}

fn action_of(body: &[u8]) -> Option<String> {
    String::from_utf8_lossy(body)
        .split('&')
        .find_map(|kv| kv.strip_prefix("Action="))
        .map(str::to_string)
}

fn hop_by_hop(name: &str) -> bool {
    matches!(name, "host" | "content-length" | "transfer-encoding" | "connection")
}

async fn handle(State(ctx): State<Ctx>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let action = action_of(&body);
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
    let fault = {
        let mut shared = ctx.shared.lock().unwrap_or_else(|e| e.into_inner());
        let key = format!("{method} {path} {}", action.as_deref().unwrap_or(""));
        let hit = shared
            .faults
            .iter_mut()
            .find(|f| f.times > 0 && key.contains(&f.matching));
        let answer = hit.map(|f| {
            f.times -= 1;
            f.clone()
        });
        if let Some(f) = &answer {
            shared.seen.push(Seen {
                method: method.to_string(),
                path: path.clone(),
                action: action.clone(),
                status: f.status,
                forwarded: false,
            });
        }
        answer
    };
    if let Some(f) = fault {
        return Response::builder()
            .status(f.status)
            .header("content-type", f.content_type)
            .body(Body::from(f.body))
            .unwrap_or_else(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response());
    }
    let mut req = ctx
        .client
        .request(method.clone(), format!("{}{path}", ctx.upstream))
        .body(body);
    for (name, value) in &headers {
        if !hop_by_hop(name.as_str()) {
            req = req.header(name, value);
        }
    }
    let answer = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::BAD_GATEWAY,
                format!("fault proxy: upstream unreachable: {e}"),
            )
                .into_response()
        }
    };
    let status = answer.status();
    let answer_headers = answer.headers().clone();
    let bytes = answer.bytes().await.unwrap_or_default();
    ctx.shared.lock().unwrap_or_else(|e| e.into_inner()).seen.push(Seen {
        method: method.to_string(),
        path,
        action,
        status: status.as_u16(),
        forwarded: true,
    });
    let mut out = Response::builder().status(status);
    for (name, value) in &answer_headers {
        if !hop_by_hop(name.as_str()) {
            out = out.header(name, value);
        }
    }
    out.body(Body::from(bytes))
        .unwrap_or_else(|e| (StatusCode::BAD_GATEWAY, e.to_string()).into_response())
}
