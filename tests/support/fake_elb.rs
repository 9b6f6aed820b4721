//! A scripted ELBv2 endpoint on loopback for failure modes moto cannot produce (throttling,
//! access denied, a write that does not take). It speaks just enough HTTP/1.1 and awsQuery:
//! one request per connection, answer chosen by a handler from the `Action=` form field.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub const NS: &str = "http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/";

/// (HTTP status, XML body) for the n-th request (0-based) with the given action.
pub type Handler = dyn Fn(usize, &str) -> (u16, String) + Send + Sync;

pub struct FakeElb {
    pub endpoint: String,
    /// Action names in arrival order.
    pub actions: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl FakeElb {
    pub async fn start(handler: Box<Handler>) -> FakeElb {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake ELB");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let actions = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::from(handler);
        let counter = Arc::new(AtomicUsize::new(0));
        let seen = actions.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let handler = handler.clone();
                let seen = seen.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, &*handler, &seen, &counter).await;
                });
            }
        });
        FakeElb {
            endpoint,
            actions,
            task,
        }
    }

    pub fn actions(&self) -> Vec<String> {
        self.actions.lock().unwrap().clone()
    }
}

impl Drop for FakeElb {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut stream: TcpStream,
    handler: &Handler,
    seen: &Mutex<Vec<String>>,
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
    let action = body
        .split('&')
        .find_map(|p| p.strip_prefix("Action="))
        .unwrap_or("")
        .to_string();
    seen.lock().unwrap().push(action.clone());
    let n = counter.fetch_add(1, Ordering::SeqCst);
    let (status, xml) = handler(n, &action);
    let response = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
        xml.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
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
    let members: String = groups
        .iter()
        .map(|(arn, w)| format!("<member><TargetGroupArn>{arn}</TargetGroupArn><Weight>{w}</Weight></member>"))
        .collect();
    format!(
        "<DescribeListenersResponse xmlns=\"{NS}\"><DescribeListenersResult><Listeners><member>\
         <ListenerArn>{listener_arn}</ListenerArn><DefaultActions><member><Type>forward</Type>\
         <ForwardConfig><TargetGroups>{members}</TargetGroups></ForwardConfig></member></DefaultActions>\
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
