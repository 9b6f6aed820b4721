//! The `rollback-responder` command: `serve`, `policy check`, `simulate`, and the terminal view
//! (`incidents`, `incident ID`). Thin by design: the work is in the library.

mod terminal;

/// mimalloc instead of the system allocator: the decision path allocates per alert (rows,
/// labels, JSON), and glibc's malloc and free were about a quarter of its instructions
/// (docs/benchmarks.md, seventh round).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use rollback_responder::alert::{AlertStatus, Notification};
use rollback_responder::app::preflight::Unexecutable;
use rollback_responder::app::{shutdown_signal, Application};
use rollback_responder::policy::{self, FreezeState, GlobalGuards, History, PolicySet};
use rollback_responder::{config, telemetry};

#[derive(Parser)]
#[command(
    name = "rollback-responder",
    version,
    about = "Rolls back canary releases when Alertmanager says so, under policy.",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The same for every subcommand (see `terminal::exit`).
const EXIT_CODES: &str = "Exit codes (every subcommand):
  0  done
  1  refused or failed: invalid policies, an unknown incident, serve could not start or stopped on an error
  2  usage: bad arguments, an unreadable or invalid config or input file, a missing read token,
     a policy whose executor (aws:, kubernetes:) the config lacks outside dry run
  3  unavailable: the service's API did not answer or answered 5xx (try again)";

/// The API a terminal view reads (default: the local service).
#[derive(clap::Args)]
struct Remote {
    /// Base URL of a running rollback-responder.
    #[arg(long, env = "ROLLBACK_RESPONDER_URL", default_value = "http://127.0.0.1:9095")]
    url: String,
    /// The read token (`api.read_token`), when the service requires one.
    #[arg(long, env = "ROLLBACK_RESPONDER_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl Remote {
    fn target(self) -> terminal::Target {
        terminal::Target {
            url: self.url,
            token: self.token,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// List a running service's incidents as a table, newest first.
    #[command(after_help = EXIT_CODES)]
    Incidents {
        #[command(flatten)]
        remote: Remote,
        /// Only open incidents.
        #[arg(long)]
        open: bool,
        /// Only this service's incidents.
        #[arg(long)]
        service: Option<String>,
    },
    /// One incident of a running service: facts, alerts and its timeline.
    #[command(after_help = EXIT_CODES)]
    Incident {
        #[command(flatten)]
        remote: Remote,
        /// The incident's id, as `incidents` lists it.
        id: String,
    },
    /// Run the service (embedded default without --config: SQLite file, policies/, dry run, loopback).
    Serve {
        /// YAML config file; ROLLBACK_RESPONDER__SECTION__KEY variables override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen address, overriding server.listen.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Policy files.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Print the decision for each alert of an Alertmanager payload, touching nothing.
    Simulate {
        /// Policy directory.
        #[arg(long, default_value = "policies")]
        policies: PathBuf,
        /// Decide as of this time (RFC 3339); default now.
        #[arg(long)]
        at: Option<chrono::DateTime<chrono::Utc>>,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// An Alertmanager webhook payload (JSON); `-` for standard input.
        payload: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate policy files: exit 0 when valid, else 1 with one FILE:LINE: message per error.
    Check {
        #[arg(default_value = "policies")]
        dir: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Incidents { remote, open, service } => terminal::incidents(&remote.target(), open, service.as_deref()),
        Command::Incident { remote, id } => terminal::incident(&remote.target(), &id),
        Command::Serve { config, listen } => serve(config, listen),
        Command::Policy {
            command: PolicyCommand::Check { dir },
        } => check(&dir),
        Command::Simulate {
            policies,
            at,
            format,
            payload,
        } => match simulate(&policies, at, format, &payload) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(terminal::exit::USAGE)
            }
        },
    }
}

fn serve(config_path: Option<PathBuf>, listen: Option<SocketAddr>) -> ExitCode {
    let cfg = match config::load(config_path.as_deref(), listen) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(terminal::exit::USAGE);
        }
    };
    telemetry::init(cfg.settings.log.format, &cfg.settings.log.level);
    log_panics();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(terminal::exit::REFUSED);
        }
    };
    let result = rt.block_on(async {
        let app = Application::build(cfg).await?;
        app.run(shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitCode::from(terminal::exit::OK),
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            // A policy this config cannot carry out is fixed in the config (or dry run).
            if e.downcast_ref::<Unexecutable>().is_some() {
                ExitCode::from(terminal::exit::USAGE)
            } else {
                ExitCode::from(terminal::exit::REFUSED)
            }
        }
    }
}

fn check(dir: &std::path::Path) -> ExitCode {
    match PolicySet::load_dir(dir) {
        Ok(set) => {
            println!(
                "{}: {} policies, {} triggers, hash {}",
                dir.display(),
                set.policies.len(),
                set.iter().map(|p| p.triggers.len()).sum::<usize>(),
                set.hash
            );
            // Warnings do not fail the check: the set loads and the service would run it.
            for w in &set.warnings {
                println!("{w}");
            }
            ExitCode::from(terminal::exit::OK)
        }
        Err(errs) => {
            for e in errs {
                println!("{e}");
            }
            ExitCode::from(terminal::exit::REFUSED)
        }
    }
}

fn simulate(
    dir: &std::path::Path,
    at: Option<chrono::DateTime<chrono::Utc>>,
    format: Format,
    payload: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    let set = match PolicySet::load_dir(dir) {
        Ok(s) => s,
        Err(errs) => {
            for e in errs {
                eprintln!("{e}");
            }
            return Ok(ExitCode::from(terminal::exit::REFUSED));
        }
    };
    let body = if payload.as_os_str() == "-" {
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut s)?;
        s
    } else {
        std::fs::read(payload).with_context(|| format!("reading {}", payload.display()))?
    };
    let n = Notification::parse(&body)
        .with_context(|| format!("{} is not an Alertmanager webhook payload", payload.display()))?;
    let now = at.unwrap_or_else(chrono::Utc::now);
    for a in &n.alerts {
        let d = policy::decide(
            a,
            policy::find(a, &set),
            now,
            &History::default(),
            &FreezeState::default(),
            &GlobalGuards::default(),
            &set.hash,
        );
        let (label, reason) = if a.status == AlertStatus::Resolved {
            (
                "suppressed",
                "resolved: a resolved alert never starts a rollback".to_string(),
            )
        } else {
            (d.outcome.label(), d.reason.clone())
        };
        match format {
            Format::Json => println!(
                "{}",
                serde_json::json!({
                    "alertname": a.alertname(), "fingerprint": a.fingerprint, "status": a.status,
                    "decision": label, "policy": d.policy, "trigger": d.trigger, "reason": reason,
                    "detail": d.outcome, "policy_hash": d.policy_hash,
                })
            ),
            Format::Text => println!(
                "{} {}: {} [{}] {}",
                a.alertname(),
                a.fingerprint,
                label,
                d.policy.as_deref().unwrap_or("-"),
                reason
            ),
        }
    }
    Ok(ExitCode::from(terminal::exit::OK))
}

/// Panics go to the log, once, as one event with where it happened: a handler's panic is
/// answered 500 and a loop's is survived (both counted in `rollback_responder_panics`), so the
/// default hook's bare stderr line would be the only trace of it outside the log pipeline.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map(|l| l.to_string()).unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        tracing::error!(%location, panic = %message, "panic caught; the service keeps serving");
    }));
}
