//! What the last policy reload did, for `/readyz`: when the files on disk were refused, it says
//! so and why (file:line per error) until a reload succeeds again. The set in force stays
//! either way; this only makes a refused reload visible where operators look.

use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::Serialize;

/// Why the files on disk are not the set in force.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Refusal {
    pub at: DateTime<Utc>,
    /// What started the reload: `SIGHUP` or `file change`.
    pub trigger: String,
    /// The policy directory as configured.
    pub dir: String,
    /// One `FILE:LINE: message` per error.
    pub errors: Vec<String>,
}

/// The latest refusal, cleared by the next reload that loads cleanly.
#[derive(Debug, Default)]
pub struct ReloadStatus {
    refused: Mutex<Option<Refusal>>,
}

impl ReloadStatus {
    /// The files on disk were refused.
    pub fn refused(&self, r: Refusal) {
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    }

    /// The files on disk loaded cleanly (applied, or the same as the set in force).
    pub fn loaded(&self) {
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The refusal in force, if any.
    pub fn refusal(&self) -> Option<Refusal> {
        self.refused.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
