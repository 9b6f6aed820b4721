//! A scripted ELBv2 endpoint on loopback for failure modes moto cannot produce (throttling,
//! access denied, a write that does not take). It speaks just enough HTTP/1.1 and awsQuery:
//! one request per connection.
//!
//! Two ways to run it:
//! - [`FakeElb::start`]: a handler chooses each answer from the request's number and action.
//! - [`FakeElb::listener`]: it behaves like ELBv2 for one listener. DescribeListeners answers
//!   the weights the last ModifyListener wrote, an unknown listener is `ListenerNotFound`, and
//!   the test can inject faults (errors for the next requests, writes that do not take) or
//!   move the weights itself mid-test, as someone else changing the ALB would.
//!
//! Either way every request is recorded with its decoded form body ([`FakeElb::requests`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub const NS: &str = "http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/";

/// (HTTP status, XML body) for the n-th request (0-based) with the given action.
pub type Handler = dyn Fn(usize, &str) -> (u16, String) + Send + Sync;

/// One request as the fake received it: the awsQuery form, decoded, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElbRequest {
    pub action: String,
    pub params: Vec<(String, String)>,
}

impl ElbRequest {
    /// The value of form field `key`.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The (target group ARN, weight) pairs of the first forward action the request writes
    /// (`DefaultActions` of ModifyListener, `Actions` of ModifyRule), in order. A group sent
    /// without a weight is listed with weight 1, ELBv2's default.
    pub fn forward_weights(&self) -> Vec<(String, i32)> {
        let list = if self.action == "ModifyRule" {
            "Actions"
        } else {
            "DefaultActions"
        };
        let prefix = format!("{list}.member.1.ForwardConfig.TargetGroups.member.");
        let mut groups = Vec::new();
        for i in 1.. {
            let Some(arn) = self.param(&format!("{prefix}{i}.TargetGroupArn")) else {
                break;
            };
            let weight = self
                .param(&format!("{prefix}{i}.Weight"))
                .and_then(|w| w.parse().ok())
                .unwrap_or(1);
            groups.push((arn.to_string(), weight));
        }
        if groups.is_empty() {
            if let Some(arn) = self.param(&format!("{list}.member.1.TargetGroupArn")) {
                groups.push((arn.to_string(), 1));
            }
        }
        groups
    }
}

/// A fault the stateful fake applies to the next matching requests.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this HTTP status and awsQuery error code.
    Error { status: u16, code: String },
    /// Answer ModifyListener with success but keep the old weights (a write that does not take).
    IgnoreWrite,
}

struct PendingFault {
    /// `None`: any action.
    action: Option<String>,
    fault: Fault,
    times: usize,
}

/// The listener a stateful fake serves.
struct Listener {
    arn: String,
    groups: Vec<(String, i32)>,
    /// (enabled, duration) of the forward's stickiness, as last written.
    stickiness: Option<(bool, Option<i32>)>,
    healthy_targets: usize,
}

#[derive(Default)]
struct State {
    requests: Vec<ElbRequest>,
    listener: Option<Listener>,
    faults: VecDeque<PendingFault>,
    /// Successful ModifyListener calls that changed the state.
    writes: usize,
}

pub struct FakeElb {
    pub endpoint: String,
    /// Action names in arrival order.
    pub actions: Arc<Mutex<Vec<String>>>,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

enum Mode {
    Scripted(Box<Handler>),
    Stateful,
}

impl FakeElb {
    /// A fake whose every answer `handler` chooses.
    pub async fn start(handler: Box<Handler>) -> FakeElb {
        Self::run(Mode::Scripted(handler), State::default()).await
    }

    /// A fake ELBv2 holding one listener that forwards to `groups` (ARN, weight), each target
    /// group with `healthy_targets` healthy targets.
    pub async fn listener(listener_arn: &str, groups: &[(&str, i32)], healthy_targets: usize) -> FakeElb {
        let state = State {
            listener: Some(Listener {
                arn: listener_arn.to_string(),
                groups: groups.iter().map(|(a, w)| (a.to_string(), *w)).collect(),
                stickiness: None,
                healthy_targets,
            }),
            ..State::default()
        };
        Self::run(Mode::Stateful, state).await
    }

    async fn run(mode: Mode, state: State) -> FakeElb {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake ELB");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let actions = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(Mutex::new(state));
        let mode = Arc::new(mode);
        let counter = Arc::new(AtomicUsize::new(0));
        let (seen, shared) = (actions.clone(), state.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (mode, seen, shared, counter) = (mode.clone(), seen.clone(), shared.clone(), counter.clone());
                tokio::spawn(async move {
                    let _ = serve(stream, &mode, &seen, &shared, &counter).await;
                });
            }
        });
        FakeElb {
            endpoint,
            actions,
            state,
            task,
        }
    }

    pub fn actions(&self) -> Vec<String> {
        self.actions.lock().unwrap().clone()
    }

    /// Every request received, with its decoded body, in arrival order.
    pub fn requests(&self) -> Vec<ElbRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The requests of one action, in arrival order.
    pub fn requests_of(&self, action: &str) -> Vec<ElbRequest> {
        self.requests().into_iter().filter(|r| r.action == action).collect()
    }

    /// The listener's weights now (stateful fake only).
    pub fn weights(&self) -> Vec<(String, i32)> {
        let state = self.state.lock().unwrap();
        state.listener.as_ref().expect("a stateful fake").groups.clone()
    }

    /// ModifyListener calls that changed the listener (stateful fake only).
    pub fn writes(&self) -> usize {
        self.state.lock().unwrap().writes
    }

    /// Changes the listener's weights behind the caller's back (someone else editing the ALB).
    pub fn set_weights(&self, groups: &[(&str, i32)]) {
        let mut state = self.state.lock().unwrap();
        let l = state.listener.as_mut().expect("a stateful fake");
        l.groups = groups.iter().map(|(a, w)| (a.to_string(), *w)).collect();
    }

    /// Applies `fault` to the next `times` requests of `action` (`None`: of any action), after
    /// faults queued earlier are used up.
    pub fn fail_next(&self, action: Option<&str>, times: usize, fault: Fault) {
        self.state.lock().unwrap().faults.push_back(PendingFault {
            action: action.map(str::to_string),
            fault,
            times,
        });
    }

    /// [`FakeElb::fail_next`] with an awsQuery error.
    pub fn error_next(&self, action: Option<&str>, times: usize, status: u16, code: &str) {
        self.fail_next(
            action,
            times,
            Fault::Error {
                status,
                code: code.to_string(),
            },
        );
    }
}

impl Drop for FakeElb {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut stream: TcpStream,
    mode: &Mode,
    seen: &Mutex<Vec<String>>,
    state: &Mutex<State>,
    counter: &AtomicUsize,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < header_end + len {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[header_end..]).to_string();
    let params: Vec<(String, String)> = serde_urlencoded::from_str(&body).unwrap_or_default();
    let action = params
        .iter()
        .find(|(k, _)| k == "Action")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let request = ElbRequest { action, params };
    seen.lock().unwrap().push(request.action.clone());
    let n = counter.fetch_add(1, Ordering::SeqCst);
    let (status, xml) = {
        let mut state = state.lock().unwrap();
        state.requests.push(request.clone());
        match mode {
            Mode::Scripted(handler) => handler(n, &request.action),
            Mode::Stateful => answer(&mut state, &request),
        }
    };
    let response = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
        xml.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// The next queued fault that applies to `action`, used up by one.
fn take_fault(state: &mut State, action: &str) -> Option<Fault> {
    let i = state
        .faults
        .iter()
        .position(|f| f.action.as_deref().is_none_or(|a| a == action))?;
    let f = &mut state.faults[i];
    let fault = f.fault.clone();
    f.times -= 1;
    if f.times == 0 {
        state.faults.remove(i);
    }
    Some(fault)
}

/// How the stateful fake answers, from the state earlier requests created.
fn answer(state: &mut State, req: &ElbRequest) -> (u16, String) {
    let fault = take_fault(state, &req.action);
    if let Some(Fault::Error { status, code }) = &fault {
        return (*status, error_xml(code, "injected by the test"));
    }
    let l = state.listener.as_mut().expect("a stateful fake has a listener");
    let asks_for_listener = |key: &str| req.param(key).is_none_or(|arn| arn == l.arn);
    match req.action.as_str() {
        "DescribeListeners" => {
            if !asks_for_listener("ListenerArns.member.1") {
                return (400, error_xml("ListenerNotFound", "One or more listeners not found"));
            }
            let groups: Vec<(&str, i32)> = l.groups.iter().map(|(a, w)| (a.as_str(), *w)).collect();
            (200, listener_xml(&l.arn, &groups, l.stickiness))
        }
        "DescribeTargetHealth" => (200, describe_target_health_xml(l.healthy_targets)),
        "ModifyListener" => {
            if req.param("ListenerArn") != Some(l.arn.as_str()) {
                return (400, error_xml("ListenerNotFound", "One or more listeners not found"));
            }
            let groups = req.forward_weights();
            if groups.is_empty() {
                return (
                    400,
                    error_xml("ValidationError", "the fake understands forward actions only"),
                );
            }
            if !matches!(fault, Some(Fault::IgnoreWrite)) {
                let sticky = "DefaultActions.member.1.ForwardConfig.TargetGroupStickinessConfig.";
                l.groups = groups;
                l.stickiness = req.param(&format!("{sticky}Enabled")).map(|e| {
                    (
                        e == "true",
                        req.param(&format!("{sticky}DurationSeconds"))
                            .and_then(|d| d.parse().ok()),
                    )
                });
                state.writes += 1;
            }
            (200, modify_listener_xml())
        }
        other => (
            400,
            error_xml("ValidationError", &format!("the fake does not serve {other}")),
        ),
    }
}

/// An awsQuery error body.
pub fn error_xml(code: &str, message: &str) -> String {
    format!(
        "<ErrorResponse xmlns=\"{NS}\"><Error><Type>Sender</Type><Code>{code}</Code>\
         <Message>{message}</Message></Error><RequestId>fake</RequestId></ErrorResponse>"
    )
}

/// A DescribeListeners answer with one listener forwarding to `groups` (arn, weight).
pub fn describe_listeners_xml(listener_arn: &str, groups: &[(&str, i32)]) -> String {
    listener_xml(listener_arn, groups, None)
}

fn listener_xml(listener_arn: &str, groups: &[(&str, i32)], stickiness: Option<(bool, Option<i32>)>) -> String {
    let members: String = groups
        .iter()
        .map(|(arn, w)| format!("<member><TargetGroupArn>{arn}</TargetGroupArn><Weight>{w}</Weight></member>"))
        .collect();
    let sticky = match stickiness {
        Some((enabled, duration)) => format!(
            "<TargetGroupStickinessConfig><Enabled>{enabled}</Enabled>{}</TargetGroupStickinessConfig>",
            duration
                .map(|d| format!("<DurationSeconds>{d}</DurationSeconds>"))
                .unwrap_or_default()
        ),
        None => String::new(),
    };
    format!(
        "<DescribeListenersResponse xmlns=\"{NS}\"><DescribeListenersResult><Listeners><member>\
         <ListenerArn>{listener_arn}</ListenerArn><DefaultActions><member><Type>forward</Type>\
         <ForwardConfig><TargetGroups>{members}</TargetGroups>{sticky}</ForwardConfig></member></DefaultActions>\
         </member></Listeners></DescribeListenersResult>\
         <ResponseMetadata><RequestId>fake</RequestId></ResponseMetadata></DescribeListenersResponse>"
    )
}

/// A DescribeTargetHealth answer with `healthy` healthy targets.
pub fn describe_target_health_xml(healthy: usize) -> String {
    let members: String = (0..healthy)
        .map(|i| {
            format!(
                "<member><Target><Id>i-{i:017}</Id><Port>80</Port></Target>\
                 <TargetHealth><State>healthy</State></TargetHealth></member>"
            )
        })
        .collect();
    format!(
        "<DescribeTargetHealthResponse xmlns=\"{NS}\"><DescribeTargetHealthResult>\
         <TargetHealthDescriptions>{members}</TargetHealthDescriptions></DescribeTargetHealthResult>\
         <ResponseMetadata><RequestId>fake</RequestId></ResponseMetadata></DescribeTargetHealthResponse>"
    )
}

/// An empty successful ModifyListener answer.
pub fn modify_listener_xml() -> String {
    format!(
        "<ModifyListenerResponse xmlns=\"{NS}\"><ModifyListenerResult><Listeners/></ModifyListenerResult>\
         <ResponseMetadata><RequestId>fake</RequestId></ResponseMetadata></ModifyListenerResponse>"
    )
}
