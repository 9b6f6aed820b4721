//! Policy files: what to do about which alert, for which service, under which guards.
//!
//! `policies/*.yaml` are loaded here ([`PolicySet::load_dir`]), parsed strictly (unknown keys
//! are errors, every error names file and line) and checked. [`decide`] is the pure step that
//! turns an alert, the incident history and the loaded set into a [`Decision`]; the responder
//! stores that decision and acts on it. Nothing in this module does I/O beyond reading the files.
//!
//! `schema.rs` is what a policy file says, `load.rs` reads and checks the files, `matcher.rs`
//! holds the label matchers, `decide.rs` the decision and its guards.

mod decide;
mod follow_ups;
mod load;
mod matcher;
mod schema;
pub mod target;
#[cfg(test)]
pub(crate) mod tests;

pub use decide::{
    checked_after, decide, decide_manual, find, holds_automatic, saturating_after, Decision, Freeze, FreezeState,
    GlobalGuards, History, Outcome, Suppression,
};
pub use load::{LoadedPolicy, PolicyError, PolicySet};
pub use matcher::{all_match, MatchOp, Matcher};
pub use schema::*;

use crate::alert::LabelSet;
pub use target::Target;

/// Labels that identify a policy's match for display: `alertname` first.
pub fn describe_labels(labels: &LabelSet) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(n) = labels.get("alertname") {
        parts.push(n.clone());
    }
    parts.extend(
        labels
            .iter()
            .filter(|(k, _)| k.as_str() != "alertname")
            .map(|(k, v)| format!("{k}={v}")),
    );
    parts.join(" ")
}
