//! Shared helpers for the integration tests. Each test binary uses a different subset, so
//! unused items in one binary are expected.
#![allow(dead_code)]

pub mod alb_fixture;
pub mod aws_proxy;
pub mod fake_elb;
pub mod fake_kube;
pub mod moto;
pub mod pg;
pub mod responder_process;
