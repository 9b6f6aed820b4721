//! Start-up: build the store, policies, responder, HTTP server and workers from resolved
//! settings. The server binds its own port and exposes it, so tests start the real thing on
//! port 0 ([`Application::build`] then [`Application::run`]).

pub mod preflight;
pub mod reload;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::action::alb::AlbExecutor;
use crate::action::kubernetes::KubeExecutor;
use crate::action::Executors;
use crate::config::Resolved;
use crate::http::pagerduty::PagerDutyEdge;
use crate::http::slack::SlackEdge;
use crate::http::{router, AppState};
use crate::metrics::Metrics;
use crate::notify::outbox::{self, Outbox};
use crate::notify::slack::Directory;
use crate::notify::Notifiers;
use crate::policy::{Freeze, FreezeState, GlobalGuards, PolicySet};
use crate::responder::Responder;
use crate::store::Store;
use crate::worker;

/// A built, bound, not yet running service.
pub struct Application {
    listener: TcpListener,
    port: u16,
    responder: Arc<Responder>,
    outbox: Arc<Outbox>,
    state: AppState,
    body_limit: usize,
    tick: std::time::Duration,
    grace: std::time::Duration,
    policies_dir: std::path::PathBuf,
}

impl Application {
    /// Connects the store, loads the policies (refusing to start on any error) and binds.
    pub async fn build(cfg: Resolved) -> anyhow::Result<Application> {
        Self::build_with(cfg, None).await
    }

    /// [`Application::build`] with executors built by the caller (tests hand in an ELBv2
    /// client with static credentials instead of the default credential chain).
    pub async fn build_with(cfg: Resolved, executors: Option<Executors>) -> anyhow::Result<Application> {
        crate::tls::install_crypto_provider();
        let policies = PolicySet::load_dir(&cfg.policies_dir).map_err(|errs| {
            let lines: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
            anyhow::anyhow!("refusing to start: the policy files have errors:\n{}", lines.join("\n"))
        })?;
        // A freeze on a name no policy has would freeze nothing while the log says FROZEN.
        if let Some(unknown) = cfg
            .settings
            .safety
            .freeze
            .policies
            .iter()
            .find(|name| policies.get(name).is_none())
        {
            let known: Vec<&str> = policies.policies.iter().map(|p| p.policy.name.as_str()).collect();
            anyhow::bail!(
                "refusing to start: safety.freeze.policies names {unknown:?}, which no policy in {} has (policies: {}); use the policy's `name:`",
                cfg.policies_dir.display(),
                known.join(", ")
            );
        }
        let store = Store::connect(cfg.store_url.expose_secret(), cfg.settings.store.max_connections)
            .await
            .context("connecting to the store (store.url)")?;
        let replica = cfg.settings.workers.replica_id.clone().unwrap_or_else(|| {
            format!(
                "{}-{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into()),
                std::process::id()
            )
        });
        let global = GlobalGuards {
            dry_run: cfg.settings.safety.dry_run,
            max_rollbacks: cfg.settings.safety.max_rollbacks,
        };
        let metrics = Arc::new(Metrics::new());
        let executors = match executors {
            Some(e) => e,
            None => {
                let mut e = Executors::default();
                match &cfg.settings.aws {
                    Some(aws) => e.alb = Some(AlbExecutor::from_settings(aws).await),
                    None => warn!("no aws settings: ALB rollbacks will be recorded but not executed"),
                }
                match &cfg.settings.kubernetes {
                    Some(k) => {
                        e.kube = Some(
                            KubeExecutor::from_settings(k)
                                .await
                                .context("building the Kubernetes client (kubernetes.*)")?,
                        )
                    }
                    None => warn!("no kubernetes settings: Kubernetes rollbacks will be recorded but not executed"),
                }
                e
            }
        };
        // Outside dry run, a policy nobody here can carry out is a rollback that would only
        // be recorded while people are told it is under way: refuse before serving anything.
        preflight::check(&policies, &executors, global.dry_run)?;
        let listener = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("binding {} (server.listen / --listen)", cfg.listen))?;
        let port = listener.local_addr()?.port();
        info!(
            listen = %listener.local_addr()?, config = %cfg.source, policies = policies.policies.len(),
            policy_hash = %policies.hash, store = ?store.backend(), replica = %replica, "rollback-responder starting"
        );
        if !cfg.webhook_auth_configured() {
            warn!("no webhook credentials configured: listening on loopback only; set webhook.bearer_token to accept Alertmanager from other hosts");
        }
        if !cfg.settings.workers.decide {
            warn!("INTAKE ONLY: alerts are stored but this replica decides none of them (workers.decide: false)");
        }
        if global.dry_run {
            warn!("DRY RUN: decisions are recorded, nothing will be changed (safety.dry_run: true)");
        }
        let notifiers = Notifiers::from_config(&cfg);
        let defaults = crate::notify::Defaults {
            pages_url: cfg.settings.server.public_url.clone(),
            ..notifiers.defaults(cfg.settings.slack.as_ref().and_then(|s| s.default_channel.clone()))
        };
        for (name, on) in [
            ("slack", defaults.slack),
            ("pagerduty", defaults.pagerduty),
            ("statuspage", defaults.statuspage),
        ] {
            if !on {
                info!(channel = name, "not configured: no {name} notifications");
            }
        }
        let wake = Arc::new(outbox::Wake::default());
        let n = &cfg.settings.notifications;
        let outbox = Arc::new(Outbox {
            store: store.clone(),
            notifiers,
            retry: outbox::Retry {
                max_attempts: n.max_attempts,
                initial: n.initial_backoff,
                max: n.max_backoff,
            },
            metrics: metrics.clone(),
            replica: replica.clone(),
            wake: wake.clone(),
        });
        let responder = Arc::new(
            Responder::new(
                store,
                policies,
                global,
                executors,
                replica,
                cfg.settings.workers.lease,
                metrics,
            )
            .with_notifications(defaults, wake)
            .with_prometheus(cfg.settings.verification.prometheus_url.clone())
            .with_decisions(cfg.settings.workers.decision_batch_budget, cfg.settings.workers.decide)
            .with_config_freezes(config_freezes(&cfg.settings.safety.freeze)),
        );
        // The config file's freezes, dry run and the global rate limit change only with a
        // restart, and a hold they made may have no end (a config freeze has none): what the
        // store holds waiting is decided again under the settings in force now, not when an
        // alert changes (Alertmanager's re-sends of a firing alert change nothing). Harmless
        // with several replicas: decisions are made once, under version checks and leases.
        responder.redecide_waiting();
        let directory = cfg
            .settings
            .slack
            .as_ref()
            .zip(cfg.slack_token.clone())
            .map(|(s, token)| Directory::new(reqwest::Client::new(), &s.api_url, token));
        let slack = SlackEdge::new(cfg.slack_signing_secret.as_ref(), directory);
        let pagerduty = PagerDutyEdge {
            webhook_secrets: cfg
                .settings
                .pagerduty
                .as_ref()
                .map(|p| p.webhook_secrets.clone())
                .unwrap_or_default(),
            action_token: cfg.pagerduty_action_token.clone(),
        };
        let state = AppState::new(responder.clone(), cfg.webhook_bearer.clone(), cfg.webhook_basic.clone())
            .with_humans(slack, pagerduty)
            .with_api_token(cfg.api_token.clone())
            .with_read_access(crate::http::pages::ReadAccess::new(
                cfg.read_token.clone(),
                cfg.api_token.clone(),
                cfg.settings.api.trusted_user_header.as_deref(),
                cfg.settings.server.public_url.as_deref(),
            ));
        Ok(Application {
            listener,
            port,
            outbox,
            responder,
            state,
            body_limit: cfg.settings.server.body_limit_bytes,
            policies_dir: cfg.policies_dir.clone(),
            tick: cfg.settings.workers.tick,
            grace: cfg.settings.server.shutdown_grace,
        })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], self.port)))
    }

    /// The responder (tests inspect the store through it).
    pub fn responder(&self) -> Arc<Responder> {
        self.responder.clone()
    }

    /// Serves until `shutdown` resolves: stops taking requests, lets workers finish or hand
    /// over within the grace period, closes the store.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let workers = tokio::spawn(worker::run(
            self.responder.clone(),
            self.tick,
            self.grace,
            stop_rx.clone(),
        ));
        // Notifications have their own loops: a Slack outage never holds up a rollback.
        let outbox = tokio::spawn(self.outbox.clone().run(self.tick, stop_rx.clone()));
        let reloader = tokio::spawn(reload_policies(
            self.responder.clone(),
            self.state.policy_reload.clone(),
            self.policies_dir.clone(),
            stop_rx,
        ));
        let app = router(self.state, self.body_limit);
        axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .context("HTTP server")?;
        let _ = stop_tx.send(true);
        let _ = workers.await;
        let _ = outbox.await;
        let _ = reloader.await;
        self.responder.store.close().await;
        info!("rollback-responder stopped");
        Ok(())
    }
}

/// Reloads the policies on SIGHUP and when a file in their directory changes. A set with
/// errors is refused as a whole (each error logged with file and line, shown by `/readyz`,
/// counted in `policy_reloads_total{result="refused"}`) and the set in force stays; decisions
/// record the hash of the set they were made under.
///
/// `dir` may be a symlink switched to another directory (`ln -sfn v2 current`, a ConfigMap's
/// `..data`): its parent is watched too, and the watch follows the link to its new target.
async fn reload_policies(
    responder: Arc<Responder>,
    status: Arc<reload::ReloadStatus>,
    dir: std::path::PathBuf,
    mut stop: watch::Receiver<bool>,
) {
    use notify::Watcher;
    let (tx, mut changed) = tokio::sync::mpsc::channel::<()>(16);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            let _ = tx.try_send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "cannot watch the policy directory; reload with SIGHUP");
            None
        }
    };
    {
        let set = responder.policies();
        responder.metrics.known_policies(set.iter().map(|p| p.name.as_str()));
    }
    // The directory the link points at now; watched until the link moves.
    let mut target: Option<std::path::PathBuf> = None;
    if let Some(w) = watcher.as_mut() {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            if dir.is_symlink() {
                if let Err(e) = w.watch(parent, notify::RecursiveMode::NonRecursive) {
                    warn!(dir = %parent.display(), error = %e, "cannot watch the parent of the policy directory link; reload with SIGHUP after switching it");
                }
            }
        }
        target = follow(w, &dir, None);
    }
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        let why = tokio::select! {
            _ = hangup => "SIGHUP",
            Some(()) = changed.recv() => {
                // Editors write in several steps: let the burst settle, then read once.
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                while changed.try_recv().is_ok() {}
                "file change"
            }
            _ = stop.changed() => return,
        };
        if let Some(w) = watcher.as_mut() {
            target = follow(w, &dir, target);
        }
        let old = responder.policies().hash.clone();
        // A set this responder could not carry out (an executor missing outside dry run) is
        // refused like a set with errors.
        let loaded = PolicySet::load_dir(&dir)
            .map_err(|errs| errs.iter().map(|e| e.to_string()).collect::<Vec<_>>())
            .and_then(|set| {
                preflight::check(&set, &responder.executors, responder.global.dry_run)
                    .map(|()| set)
                    .map_err(|preflight::Unexecutable(lines)| lines)
            });
        match loaded {
            Ok(set) if set.hash == old => {
                responder.metrics.policy_reload("unchanged");
                status.loaded();
            }
            Ok(set) => {
                info!(trigger = why, old_hash = %old, new_hash = %set.hash, policies = set.policies.len(), "policies reloaded");
                responder.metrics.known_policies(set.iter().map(|p| p.name.as_str()));
                responder.set_policies(set);
                responder.metrics.policy_reload("applied");
                status.loaded();
            }
            Err(errors) => {
                for e in &errors {
                    tracing::error!(trigger = why, error = %e, "policy reload rejected");
                }
                warn!(hash = %old, errors = errors.len(), "the new policy set has errors; the old set stays in force");
                responder.metrics.policy_reload("refused");
                status.refused(reload::Refusal {
                    at: chrono::Utc::now(),
                    trigger: why.to_string(),
                    dir: dir.display().to_string(),
                    errors,
                });
            }
        }
    }
}

/// Watches the directory `dir` resolves to now, moving the watch off `watched` when the link
/// was switched; returns what is watched.
fn follow(
    w: &mut notify::RecommendedWatcher,
    dir: &std::path::Path,
    watched: Option<std::path::PathBuf>,
) -> Option<std::path::PathBuf> {
    use notify::Watcher;
    let now = std::fs::canonicalize(dir).ok();
    if now == watched {
        return watched;
    }
    if let Some(old) = &watched {
        let _ = w.unwatch(old);
    }
    let now = now?;
    match w.watch(&now, notify::RecursiveMode::NonRecursive) {
        Ok(()) => {
            if watched.is_some() {
                info!(dir = %dir.display(), target = %now.display(), "the policy directory now points elsewhere; watching it");
            }
            Some(now)
        }
        Err(e) => {
            warn!(dir = %now.display(), error = %e, "cannot watch the policy directory; reload with SIGHUP");
            None
        }
    }
}

/// The config file's freezes, also shown in the `frozen` metric.
fn config_freezes(c: &crate::config::ConfigFreeze) -> FreezeState {
    let freeze = || Freeze {
        reason: c
            .reason
            .clone()
            .unwrap_or_else(|| "frozen in the config file (safety.freeze)".into()),
        by: "config".into(),
        until: None,
    };
    let mut f = FreezeState::default();
    if c.global {
        f.global = Some(freeze());
        warn!("automatic rollbacks are FROZEN for all policies (safety.freeze.global)");
    }
    for p in &c.policies {
        f.policies.insert(p.clone(), freeze());
        warn!(policy = %p, "automatic rollbacks are FROZEN for this policy (safety.freeze.policies)");
    }
    f
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    info!("shutdown signal received");
}
