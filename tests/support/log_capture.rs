//! The test process's log subscriber: the service's output on stderr as before (RUST_LOG,
//! default `warn`), plus a copy of every warning and error in memory, so an in-process test
//! can wait for the event that proves work was done (a policy reload refused) instead of
//! sleeping. The service's own `telemetry::init` finds this subscriber installed and leaves it.

use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

struct Line(String);

impl Visit for Line {
    fn record_str(&mut self, field: &Field, value: &str) {
        let _ = write!(self.0, " {}={value}", field.name());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
}

impl<S: tracing::Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut line = Line(format!("{} {}:", meta.level(), meta.target()));
        event.record(&mut line);
        LINES.lock().unwrap_or_else(|p| p.into_inner()).push(line.0);
    }
}

/// Installs the subscriber once per test process (before the service initializes its own).
pub fn install() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
        let _ = tracing_subscriber::registry()
            .with(fmt::layer().with_writer(std::io::stderr).with_filter(filter))
            .with(Capture.with_filter(LevelFilter::WARN))
            .try_init();
    });
}

/// The captured warnings and errors that contain every one of `parts`.
pub fn logged(parts: &[&str]) -> Vec<String> {
    LINES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .cloned()
        .collect()
}

/// Waits until a warning or error containing every one of `parts` has been logged (by any
/// test of this process: make one part unique to the test, such as its temp dir); panics
/// after 20 s.
pub async fn wait_logged(parts: &[&str]) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = logged(parts);
        if !found.is_empty() {
            return found;
        }
        assert!(Instant::now() < deadline, "nothing logged with {parts:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
