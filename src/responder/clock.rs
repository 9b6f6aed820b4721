//! The responder's clock: every "now" it decides, records and leases by comes from here, read
//! once per step and passed down. The system clock in service; a clock set by hand in tests, so
//! that a trigger passing its `for`, an approval expiring or a hold ending is a step, not a wait.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

/// Where the responder's "now" comes from.
#[derive(Debug, Clone, Default)]
pub enum Clock {
    /// The system clock.
    #[default]
    System,
    /// A time set by hand; it stays where it is until set again.
    Manual(Arc<Mutex<DateTime<Utc>>>),
}

impl Clock {
    /// A clock set by hand, at `at`.
    pub fn manual(at: DateTime<Utc>) -> Clock {
        Clock::Manual(Arc::new(Mutex::new(at)))
    }

    /// The time now.
    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Clock::System => Utc::now(),
            Clock::Manual(at) => *at.lock().unwrap_or_else(|poisoned| poisoned.into_inner()),
        }
    }

    /// Sets a clock set by hand to `to`; the system clock cannot be set (nothing happens).
    pub fn set(&self, to: DateTime<Utc>) {
        if let Clock::Manual(at) = self {
            *at.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = to;
        }
    }
}
