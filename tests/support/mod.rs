//! Shared helpers for the integration tests. Each test binary uses a different subset, so
//! unused items in one binary are expected.
#![allow(dead_code)]

pub mod alb_fixture;
pub mod aws_proxy;
pub mod fake_elb;
pub mod fake_kube;
pub mod fake_notify;
pub mod fault_proxy;
pub mod kube_controllers;
pub mod log_capture;
pub mod moto;
pub mod pg;
pub mod pg_cluster;
pub mod rbac;
pub mod responder_process;

/// A free loopback port for a peer (moto, Alertmanager, a responder process).
pub fn free_port() -> u16 {
    // The port is released before the peer binds it. Two tests of this process can be handed
    // the same port in that moment (moto takes a second to import); the loser's peer exits,
    // but its readiness check is answered by the winner's server, and the test then shares
    // that server (seen as DuplicateTargetGroupName on moto). So a port goes to one peer per
    // process. A race with another process still shows up as an early exit, retried by the
    // callers.
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port");
        let port = l.local_addr().expect("local addr").port();
        if !handed.contains(&port) {
            handed.push(port);
            return port;
        }
    }
}
