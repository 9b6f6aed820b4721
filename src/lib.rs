//! rollback-responder: the rollback section of a go-live checklist, as a service.
//!
//! The flow, module by module: Alertmanager POSTs a webhook to [`http`], which authenticates
//! it, parses it into [`alert`] types and stores every alert durably in [`store`] before
//! answering. The [`responder`] (woken at once, and on every [`worker`] tick) matches each
//! stored alert against the [`policy`] files and decides (a pure function: auto, needs
//! approval, escalate later, suppressed and why, or no match). The decision opens or joins an
//! [`incident`], whose phases change only through `incident::transition`, each change appended
//! to an audit trail. Incidents to roll back are claimed by exactly one replica and handed to
//! an [`action`] executor (ALB listener weights, Kubernetes objects), then verified.
//! [`config`] holds every setting and external base URL; [`metrics`] and [`telemetry`] make
//! it observable. [`app`] puts the pieces together for `serve` and for tests. The pure steps
//! (`policy`, `incident`, `approval`) import no store, no HTTP and no SDK client (the target
//! schema `policy::Target` is still defined beside its executor in `action`); [`store`] holds
//! all SQL, one file per table family, with phase and audit-kind names taken from their enums.

pub mod action;
pub mod alert;
pub mod app;
pub mod approval;
pub mod config;
pub mod http;
pub mod incident;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod responder;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod verify;
pub mod worker;
