//! A recording, pausable HTTP proxy in front of moto, for tests that need to know which
//! process made which AWS call and to stop a call at an exact point.
//!
//! ELBv2 speaks awsQuery: every call is a form-encoded POST whose `Action=` field names the
//! operation. The proxy listens on one port per caller (so it knows who calls without
//! parsing signatures), forwards everything to moto, records each call that reached moto, and
//! can hold the first call of a given action, either before forwarding it (AWS never saw it)
//! or after moto answered (the change is made, the caller has not heard), until the test
//! releases it. It serves any HTTP API the same way (the fake Kubernetes API server): a call
//! that is not awsQuery is named by its method and path. Hold for less than the SDK's per-attempt timeout (10 s), or the caller gives
//! up on that attempt and retries.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Where a held call stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldPoint {
    /// Before the request goes to moto: AWS has not seen it.
    BeforeForward,
    /// After moto answered: the change is made, the caller has not got the answer.
    AfterForward,
}

/// One call that reached moto.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// Index of the proxy port it came in on (one per caller).
    pub caller: usize,
    pub action: String,
}

struct Hold {
    action: String,
    /// Calls of `action` to let through before the one held.
    skip: usize,
    point: HoldPoint,
    caught: oneshot::Sender<usize>,
    release: oneshot::Receiver<()>,
}

/// Every call of `action` whose form has a field equal to `value` is answered with an awsQuery
/// error instead of reaching moto.
struct Fault {
    action: String,
    value: String,
    status: StatusCode,
    code: String,
}

#[derive(Default)]
struct Shared {
    calls: Vec<Call>,
    holds: Vec<Hold>,
    faults: Vec<Fault>,
    refused: Vec<Call>,
}

#[derive(Clone)]
struct Ctx {
    caller: usize,
    upstream: String,
    client: reqwest::Client,
    shared: Arc<Mutex<Shared>>,
}

/// The running proxy; its listeners stop when it is dropped.
pub struct AwsProxy {
    endpoints: Vec<String>,
    shared: Arc<Mutex<Shared>>,
    tasks: Vec<JoinHandle<()>>,
}

/// A call the proxy holds (once it arrives). Dropping it releases the call.
pub struct HeldCall {
    action: String,
    caught: Option<oneshot::Receiver<usize>>,
    release: Option<oneshot::Sender<()>>,
}

impl HeldCall {
    /// Waits until the held call arrives and returns the caller's index; panics after `within`.
    pub async fn caught(&mut self, within: Duration) -> usize {
        let rx = self.caught.take().expect("caught() is called once");
        match tokio::time::timeout(within, rx).await {
            Ok(Ok(caller)) => caller,
            Ok(Err(_)) => panic!("the proxy dropped the hold on {} without catching it", self.action),
            Err(_) => panic!("no {} call arrived within {within:?}", self.action),
        }
    }

    /// Lets the held call continue (to a caller that may be dead by now).
    pub fn release(&mut self) {
        if let Some(tx) = self.release.take() {
            let _ = tx.send(());
        }
    }
}

impl AwsProxy {
    /// Starts one listener per caller, all forwarding to `upstream` (moto's endpoint).
    pub async fn start(upstream: &str, callers: usize) -> AwsProxy {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("proxy HTTP client");
        let mut endpoints = Vec::new();
        let mut tasks = Vec::new();
        for caller in 0..callers {
            let ctx = Ctx {
                caller,
                upstream: upstream.trim_end_matches('/').to_string(),
                client: client.clone(),
                shared: shared.clone(),
            };
            let app = axum::Router::new().fallback(forward).with_state(ctx);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind the AWS proxy");
            endpoints.push(format!("http://{}", listener.local_addr().expect("proxy address")));
            tasks.push(tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            }));
        }
        AwsProxy {
            endpoints,
            shared,
            tasks,
        }
    }

    /// The endpoint URL to give caller `i`.
    pub fn endpoint(&self, caller: usize) -> &str {
        &self.endpoints[caller]
    }

    /// Holds the next call of `action` (from any caller) at `point`.
    pub fn hold_next(&self, action: &str, point: HoldPoint) -> HeldCall {
        self.hold_nth(action, 0, point)
    }

    /// Lets `skip` calls of `action` through, then holds the next one at `point`.
    pub fn hold_nth(&self, action: &str, skip: usize, point: HoldPoint) -> HeldCall {
        let (caught_tx, caught_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        self.shared.lock().unwrap().holds.push(Hold {
            action: action.to_string(),
            skip,
            point,
            caught: caught_tx,
            release: release_rx,
        });
        HeldCall {
            action: action.to_string(),
            caught: Some(caught_rx),
            release: Some(release_tx),
        }
    }

    /// From now on, answers every `action` call that names `value` (a rule ARN, say) with
    /// `status` and the awsQuery error `code`, without passing it to moto.
    pub fn fail(&self, action: &str, value: &str, status: u16, code: &str) {
        self.shared.lock().unwrap().faults.push(Fault {
            action: action.to_string(),
            value: value.to_string(),
            status: StatusCode::from_u16(status).expect("status"),
            code: code.to_string(),
        });
    }

    /// From now on, passes every call to moto again (the injected errors end).
    pub fn heal(&self) {
        self.shared.lock().unwrap().faults.clear();
    }

    /// How many `action` calls were answered with an injected error.
    pub fn refused(&self, action: &str) -> usize {
        self.shared
            .lock()
            .unwrap()
            .refused
            .iter()
            .filter(|c| c.action == action)
            .count()
    }

    /// Every call that reached moto, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.lock().unwrap().calls.clone()
    }

    /// How many `action` calls reached moto.
    pub fn count(&self, action: &str) -> usize {
        self.calls().iter().filter(|c| c.action == action).count()
    }
}

impl Drop for AwsProxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The `Action=` field of an awsQuery body.
fn action_of(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .split('&')
        .find_map(|kv| kv.strip_prefix("Action="))
        .unwrap_or("?")
        .to_string()
}

/// Headers that describe one hop, not the message.
fn hop_by_hop(name: &str) -> bool {
    matches!(name, "host" | "content-length" | "transfer-encoding" | "connection")
}

async fn forward(State(ctx): State<Ctx>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    // Any other API (the fake Kubernetes API server): the call is its method and path,
    // `PATCH /api/v1/namespaces/portal/services/web`.
    let action = match action_of(&body) {
        a if a == "?" => format!("{method} {}", uri.path()),
        a => a,
    };
    let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let fault = {
        let mut shared = ctx.shared.lock().unwrap();
        let hit = shared
            .faults
            .iter()
            .find(|f| f.action == action && fields.iter().any(|(_, v)| *v == f.value))
            .map(|f| (f.status, f.code.clone()));
        if hit.is_some() {
            shared.refused.push(Call {
                caller: ctx.caller,
                action: action.clone(),
            });
        }
        hit
    };
    if let Some((status, code)) = fault {
        let xml = super::fake_elb::error_xml(&code, "injected by the test proxy");
        return (status, [("content-type", "text/xml")], xml).into_response();
    }
    let hold = {
        let mut shared = ctx.shared.lock().unwrap();
        match shared.holds.iter_mut().position(|h| h.action == action) {
            Some(i) if shared.holds[i].skip > 0 => {
                shared.holds[i].skip -= 1;
                None
            }
            Some(i) => Some(shared.holds.remove(i)),
            None => None,
        }
    };
    let (hold_before, hold_after) = match hold {
        Some(h) if h.point == HoldPoint::BeforeForward => (Some(h), None),
        Some(h) => (None, Some(h)),
        None => (None, None),
    };
    if let Some(h) = hold_before {
        let _ = h.caught.send(ctx.caller);
        let _ = h.release.await;
    }

    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut req = ctx.client.request(method, format!("{}{path}", ctx.upstream)).body(body);
    for (name, value) in &headers {
        if !hop_by_hop(name.as_str()) {
            req = req.header(name, value);
        }
    }
    ctx.shared.lock().unwrap().calls.push(Call {
        caller: ctx.caller,
        action,
    });
    let answer = match req.send().await {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_GATEWAY, format!("proxy: moto unreachable: {e}")).into_response(),
    };
    let status = answer.status();
    let answer_headers = answer.headers().clone();
    let bytes = match answer.bytes().await {
        Ok(b) => b,
        Err(e) => return (StatusCode::BAD_GATEWAY, format!("proxy: reading moto's answer: {e}")).into_response(),
    };

    if let Some(h) = hold_after {
        let _ = h.caught.send(ctx.caller);
        let _ = h.release.await;
    }
    let mut out = Response::builder().status(status);
    for (name, value) in &answer_headers {
        if !hop_by_hop(name.as_str()) {
            out = out.header(name, value);
        }
    }
    out.body(Body::from(bytes))
        .unwrap_or_else(|e| (StatusCode::BAD_GATEWAY, format!("proxy: {e}")).into_response())
}
