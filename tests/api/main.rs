//! Integration tests: one binary (faster to link), one module per area. Everything runs the
//! real service on loopback against real peers (Alertmanager, moto, PostgreSQL when
//! TEST_DATABASE_URL points at it); see the README's Tests section.

// The futures of whole reverts nest deeply (each write's retries wait at the lease gate inside
// the retry loop); computing their layout in a non-incremental build (CI) passes the default
// query depth of 128.
#![recursion_limit = "256"]

mod alb;
mod alb_listener;
mod alertmanager;
mod approvals;
mod crash;
mod due;
mod edges;
mod episodes;
mod faults_actions;
mod faults_store;
mod fuzz;
mod gitops;
mod gitops_incidents;
mod helpers;
mod kube_check;
mod kube_fake;
mod kube_fields;
mod kube_mock;
mod leases;
mod lifecycle;
mod metrics;
mod notify;
mod notify_takeover;
mod operate;
mod pagerduty;
mod pages;
mod peers;
mod rbac;
mod reload;
mod replicas;
mod retries;
mod seed_policies;
mod sequences;
#[path = "../support/mod.rs"]
mod support;
mod unknown_outcome;
mod verify;
mod verify_drift;
mod webhook;
