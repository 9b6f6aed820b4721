//! The one place that wires the steps in order: stored alert -> policy decision -> incident
//! -> (approval) -> action -> verification, each state change through [`Responder::apply`].
//!
//! Every step runs in the background, never while Alertmanager waits: the webhook only stores
//! alerts and wakes [`Responder::process_pending`]. Each replica runs the same loops
//! (`worker.rs`); the store's conditional updates decide which replica does a piece of work,
//! so duplicates from an HA Alertmanager pair, several replicas, or a restart never act twice.

mod human;
mod verify;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tracing::{info, warn, Instrument};

use crate::action::{ActionReport, Executors, Target};
use crate::alert::AlertStatus;
use crate::incident::{should_close, transition, Event, Incident, IncidentId, InvalidTransition, Phase};
use crate::metrics::Metrics;
use crate::notify::{self, Change};
use crate::policy::{self, Decision, FreezeState, GlobalGuards, Outcome, PolicySet, Suppression};
use crate::store::{NewEvent, Store, StoreError, StoreTx, StoredAlert};

/// Why a step could not complete; the loops log it and retry on the next tick.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Transition(#[from] InvalidTransition),
    /// Someone else changed the incident between our read and write.
    #[error("incident {0} changed concurrently; retrying")]
    Conflict(IncidentId),
    #[error("incident {0}: stored plan is unreadable: {1}")]
    Plan(IncidentId, String),
}

/// The wiring, shared by the HTTP edge and the workers.
pub struct Responder {
    pub store: Store,
    policies: RwLock<Arc<PolicySet>>,
    pub global: GlobalGuards,
    pub executors: Executors,
    pub replica: String,
    pub lease: Duration,
    pub metrics: Arc<Metrics>,
    pub wake: tokio::sync::Notify,
    /// Which notification channels are configured, for new incidents' routes.
    pub notify_defaults: notify::Defaults,
    /// Wakes the outbox after a commit that queued messages.
    pub outbox_wake: Arc<notify::outbox::Wake>,
    /// HTTP client for health probes and Prometheus queries.
    pub http: reqwest::Client,
    /// Freezes from the config file; run-time ones live in the store.
    pub config_freezes: FreezeState,
    /// Prometheus base URL for verification queries.
    pub prometheus_url: Option<String>,
}

pub use human::HumanError;
pub use verify::HumanClose;

/// Who made a change, for the audit trail.
const SYSTEM: &str = "rollback-responder";

/// What the decisions of one transaction share: the time, the freezes read before it, and the
/// guards' history per policy and target, read once per batch instead of once per alert. Only
/// a rollback that starts changes that history (it counts against the rate limits while it
/// runs), so starting one forgets it.
struct Deciding {
    now: DateTime<Utc>,
    freezes: FreezeState,
    history: std::collections::HashMap<(String, String), policy::History>,
    /// (incident, alertname) pairs known to be in an incident: in a storm most joining
    /// alerts share a name, and an alert never leaves its incident, so one look-up serves
    /// the batch.
    named: std::collections::HashSet<(IncidentId, String)>,
}

/// How long one batch of decisions may hold its transaction. On SQLite that transaction holds
/// the only connection, and webhook intake waits behind it: a short batch keeps the intake's
/// latency low while a storm is decided.
const BATCH_BUDGET: Duration = Duration::from_millis(2);

/// Alerts a batch decides before it makes way for waiting webhook deliveries: Alertmanager is
/// waiting on those, while a backlog still moves at least this much per commit.
const BATCH_MIN: usize = 8;

impl Responder {
    /// Builds the responder around a store and a loaded policy set.
    pub fn new(
        store: Store,
        policies: PolicySet,
        global: GlobalGuards,
        executors: Executors,
        replica: String,
        lease: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Responder {
            store,
            policies: RwLock::new(Arc::new(policies)),
            global,
            executors,
            replica,
            lease,
            metrics,
            wake: tokio::sync::Notify::new(),
            notify_defaults: notify::Defaults::default(),
            outbox_wake: Arc::default(),
            // The health probe judges the status it gets: a redirect to a login or maintenance
            // page that answers 200 is not the service being healthy.
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_default(),
            prometheus_url: None,
            config_freezes: FreezeState::default(),
        }
    }

    /// Turns on notifications: which channels exist, and how to wake the outbox.
    pub fn with_notifications(mut self, defaults: notify::Defaults, wake: Arc<notify::outbox::Wake>) -> Self {
        self.notify_defaults = defaults;
        self.outbox_wake = wake;
        self
    }

    /// Freezes that the config file sets (they cannot be lifted at run time).
    pub fn with_config_freezes(mut self, f: FreezeState) -> Self {
        self.config_freezes = f;
        self
    }

    /// Every freeze in force: the config's and the store's (API, Slack).
    pub async fn freezes(&self, now: DateTime<Utc>) -> Result<FreezeState, StoreError> {
        let mut f = self.store.freezes(now).await?;
        if f.global.is_none() {
            f.global = self.config_freezes.global.clone();
        }
        for (k, v) in &self.config_freezes.policies {
            f.policies.entry(k.clone()).or_insert_with(|| v.clone());
        }
        Ok(f)
    }

    /// Where verification queries go.
    pub fn with_prometheus(mut self, url: Option<String>) -> Self {
        self.prometheus_url = url;
        self
    }

    /// The policy set in force.
    pub fn policies(&self) -> Arc<PolicySet> {
        match self.policies.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the policy set (reload); decisions made after this record the new hash.
    pub fn set_policies(&self, set: PolicySet) {
        let mut guard = match self.policies.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        *guard = Arc::new(set);
    }

    /// Processes up to `batch` pending alerts, oldest first; returns incidents whose action
    /// this replica has claimed and must now run, and whether more alerts are waiting. Small
    /// batches let the caller start a rollback while an alert storm is still being stored and
    /// decided.
    pub async fn process_pending(&self, batch: i64) -> Result<(Vec<IncidentId>, bool), StepError> {
        let ids = self.store.pending_alert_ids(batch).await?;
        let more = ids.len() as i64 == batch;
        if ids.is_empty() {
            return Ok((Vec::new(), false));
        }
        // The whole batch in one transaction: one commit (an fsync) instead of one per alert,
        // which is what lets decisions keep up with a storm. If any alert of it fails (another
        // replica opened an incident for the same target at the same moment), nothing of the
        // batch is kept and each alert is done again on its own, with retries.
        match self.process_batch(&ids).await {
            Ok((work, left)) => Ok((work, more || left)),
            Err(e) if ids.len() > 1 => {
                info!(error = %e, alerts = ids.len(), "deciding a batch failed; deciding its alerts one at a time");
                let mut work = Vec::new();
                for id in ids {
                    match self.process_alert(id).await {
                        Ok(w) => work.extend(w),
                        // Work committed before this alert failed is claimed and started: it
                        // runs now, not once its lease has run out. The failed alert stays
                        // pending for the next call.
                        Err(e) if !work.is_empty() => {
                            warn!(error = %e, alert = id, "deciding an alert failed; starting what was already decided");
                            return Ok((work, true));
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok((work, more))
            }
            Err(e) => Err(e),
        }
    }

    /// Decides alerts of `ids` in one transaction until [`BATCH_BUDGET`] is spent or, after
    /// [`BATCH_MIN`], webhook deliveries are waiting; returns the claimed work and whether
    /// alerts were left for the next batch.
    async fn process_batch(&self, ids: &[i64]) -> Result<(Vec<IncidentId>, bool), StepError> {
        // Read before the transaction: on SQLite the transaction holds the only connection.
        let mut ctx = self.deciding().await?;
        let started = Instant::now();
        let mut tx = self.store.begin().await?;
        // Claimed in one statement; what the batch does not get to is handed back below.
        let claimed = tx.claim_alerts(ids).await?;
        let mut work = Vec::new();
        let mut decided = 0;
        for stored in &claimed {
            work.extend(self.decide_claimed(&mut tx, stored, &mut ctx).await?);
            decided += 1;
            if started.elapsed() > BATCH_BUDGET || (decided >= BATCH_MIN && self.store.intake_waiting()) {
                break;
            }
        }
        let left: Vec<i64> = claimed[decided..].iter().map(|a| a.id).collect();
        tx.unclaim_alerts(&left).await?;
        let committed = tx.commit().await?;
        self.outbox_wake.queued(&committed);
        Ok((work, !left.is_empty()))
    }

    /// One alert, in one transaction; retried when another replica wins a race on the target.
    async fn process_alert(&self, alert_id: i64) -> Result<Option<IncidentId>, StepError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut ctx = self.deciding().await?;
            let mut tx = self.store.begin().await?;
            match self.decide_alert(&mut tx, alert_id, &mut ctx).await {
                Ok(work) => match tx.commit().await.inspect(|c| self.outbox_wake.queued(c)) {
                    Ok(_) => return Ok(work),
                    Err(e) if e.is_conflict() && attempt < 3 => continue,
                    Err(e) => return Err(e.into()),
                },
                // Another replica opened an incident for this target at the same moment:
                // start over, and this time attach to it.
                Err(StepError::Store(e)) if e.is_conflict() && attempt < 3 => continue,
                Err(StepError::Conflict(_)) if attempt < 3 => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The shared context of a deciding transaction, read before it begins (on SQLite the
    /// transaction holds the only connection).
    async fn deciding(&self) -> Result<Deciding, StepError> {
        let now = Utc::now();
        Ok(Deciding {
            now,
            freezes: self.freezes(now).await?,
            history: Default::default(),
            named: Default::default(),
        })
    }

    /// Claims a pending alert in `tx` and acts on it; `None` if another worker took it first
    /// or it leads to no action by this replica.
    async fn decide_alert(
        &self,
        tx: &mut StoreTx,
        alert_id: i64,
        ctx: &mut Deciding,
    ) -> Result<Option<IncidentId>, StepError> {
        let Some(stored) = tx.claim_alert(alert_id).await? else {
            return Ok(None);
        };
        self.decide_claimed(tx, &stored, ctx).await
    }

    /// Acts on an alert this transaction has claimed.
    async fn decide_claimed(
        &self,
        tx: &mut StoreTx,
        stored: &StoredAlert,
        ctx: &mut Deciding,
    ) -> Result<Option<IncidentId>, StepError> {
        match stored.alert.status {
            AlertStatus::Firing => self.on_firing(tx, stored, ctx).await,
            AlertStatus::Resolved => self.on_resolved(tx, stored, ctx.now).await.map(|_| None),
        }
    }

    fn decide_for(
        &self,
        set: &PolicySet,
        stored: &StoredAlert,
        history: &policy::History,
        freezes: &FreezeState,
        now: DateTime<Utc>,
    ) -> Decision {
        let matched = policy::find(&stored.alert, set);
        policy::decide(&stored.alert, matched, now, history, freezes, &self.global, &set.hash)
    }

    async fn load_history(
        &self,
        tx: &mut StoreTx,
        p: &policy::Policy,
        now: DateTime<Utc>,
    ) -> Result<policy::History, StoreError> {
        tx.history(
            &p.name,
            &p.target.key(),
            p.guards.max_rollbacks.map(|r| r.per),
            self.global.max_rollbacks.map(|r| r.per),
            now,
        )
        .await
    }

    async fn on_firing(
        &self,
        tx: &mut StoreTx,
        stored: &StoredAlert,
        ctx: &mut Deciding,
    ) -> Result<Option<IncidentId>, StepError> {
        let (now, freezes) = (ctx.now, &ctx.freezes);
        let set = self.policies();
        let Some((p, _)) = policy::find(&stored.alert, &set) else {
            let d = self.decide_for(&set, stored, &policy::History::default(), freezes, now);
            self.metrics.decision(d.outcome.label(), "");
            tx.set_alert_outcome(stored.id, None, Some(&d)).await?;
            info!(alertname = stored.alert.alertname(), fingerprint = %stored.alert.fingerprint, "no policy matches; stored only");
            return Ok(None);
        };
        let target_key = p.target.key();
        let history = match ctx.history.entry((p.name.clone(), target_key.clone())) {
            std::collections::hash_map::Entry::Occupied(h) => h.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(self.load_history(tx, p, now).await?),
        };
        let d = self.decide_for(&set, stored, history, freezes, now);
        self.metrics.decision(d.outcome.label(), &p.name);

        if let Some(mut inc) = tx.open_incident_for(&target_key).await? {
            // One open incident per target: further alerts join it and never start a second
            // rollback; they can only promote a pending one (a stronger trigger fired).
            tx.set_alert_outcome(stored.id, Some(&inc.id), Some(&d)).await?;
            let summary = format!("{} joined the incident ({})", describe_alert(stored), d.reason);
            Self::record(
                tx,
                &inc,
                "alert_joined",
                SYSTEM,
                summary.clone(),
                json!({ "alert": stored.alert, "decision": d }),
                now,
            )
            .await?;
            // One thread reply per kind of alert: in a storm thousands of instances of one alert
            // join, and a reply each would bury the thread and hold the rollback's own messages
            // behind them in the ordered outbox for hours. The timeline keeps every one.
            let named = (inc.id.clone(), stored.alert.alertname().to_string());
            if !ctx.named.contains(&named)
                && !tx
                    .incident_has_alertname(&inc.id, stored.alert.alertname(), stored.id)
                    .await?
            {
                self.tell(tx, &inc, Change::Note { summary: &summary }, now).await?;
            }
            ctx.named.insert(named);
            let promotes = match (inc.phase, Phase::for_outcome(&d.outcome)) {
                // Too young as well: only an earlier re-check is news. A later one would hold
                // off a rollback that the first alert qualifies for at its own time, and in a
                // storm every new instance would push it back again.
                (Phase::Waiting, Some(Phase::Waiting)) => due_at(Phase::Waiting, &d.outcome)
                    .zip(inc.due_at)
                    .is_some_and(|(new, old)| new < old),
                (Phase::Waiting, Some(_)) | (Phase::AwaitingApproval, Some(Phase::Executing)) => true,
                _ => false,
            };
            if promotes {
                let reason = d.reason.clone();
                let event = Event::Decided {
                    outcome: d.outcome.clone(),
                };
                inc.decision = d;
                if self
                    .apply(tx, &mut inc, event, SYSTEM, reason, Value::Null, now)
                    .await?
                    == Phase::Executing
                {
                    self.claim_and_start(tx, &mut inc, now).await?;
                    ctx.history.clear();
                    return Ok(Some(inc.id));
                }
            }
            // Already executing (or not to be acted on): whoever holds it runs it, and work
            // whose holder died is picked up as unowned work.
            return Ok(None);
        }

        let Some(phase) = Phase::for_outcome(&d.outcome) else {
            return Ok(None);
        };
        let context = notify::Context {
            labels: stored.alert.labels.clone(),
            summary: stored.alert.annotations.get("summary").cloned(),
            external_url: Some(stored.external_url.clone()).filter(|u| !u.is_empty()),
            generator_url: Some(stored.alert.generator_url.clone()).filter(|u| !u.is_empty()),
            runbook: p
                .links
                .runbook
                .clone()
                .or_else(|| stored.alert.annotations.get("runbook_url").cloned()),
            dashboard: p
                .links
                .dashboard
                .clone()
                .or_else(|| stored.alert.annotations.get("dashboard").cloned()),
            target: p.target.describe(),
            verification: p.verification.clone(),
            routes: notify::Routes::resolve(p, &self.notify_defaults),
        };
        let inc = Incident {
            alertname: stored.alert.alertname().to_string(),
            first_alert_starts_at: stored.alert.starts_at,
            ..opening(p, d.clone(), phase, &context, now)
        };
        tx.insert_incident(&inc).await?;
        tx.set_alert_outcome(stored.id, Some(&inc.id), Some(&d)).await?;
        ctx.named.insert((inc.id.clone(), inc.alertname.clone()));
        let opened = format!(
            "{} opened an incident under policy {} (trigger {})",
            describe_alert(stored),
            p.name,
            d.trigger.as_deref().unwrap_or("-")
        );
        Self::record(tx, &inc, "opened", SYSTEM, opened, json!({ "alert": stored.alert, "group_key": stored.group_key, "external_url": stored.external_url, "plan": p.target.describe() }), now).await?;
        tx.append_event(
            &inc.id,
            now,
            NewEvent {
                kind: "decided",
                actor: SYSTEM,
                phase_from: None,
                phase_to: Some(phase),
                summary: d.reason.clone(),
                detail: serde_json::to_value(&d).unwrap_or(Value::Null),
            },
        )
        .await?;
        self.tell(tx, &inc, Change::Opened, now).await?;
        info!(incident = %inc.id, policy = %p.name, decision = d.outcome.label(), reason = %d.reason, "incident opened");
        if phase != Phase::Executing {
            return Ok(None);
        }
        let mut inc = inc;
        self.claim_and_start(tx, &mut inc, now).await?;
        ctx.history.clear();
        Ok(Some(inc.id))
    }

    async fn on_resolved(&self, tx: &mut StoreTx, stored: &StoredAlert, now: DateTime<Utc>) -> Result<(), StepError> {
        let Some(id) = &stored.incident_id else {
            return Ok(());
        };
        let Some(mut inc) = tx.incident(id).await? else {
            return Ok(());
        };
        let summary = format!("{} resolved", describe_alert(stored));
        Self::record(
            tx,
            &inc,
            "alert_resolved",
            "alertmanager",
            summary.clone(),
            json!({ "ends_at": stored.alert.ended_at() }),
            now,
        )
        .await?;
        self.tell(tx, &inc, Change::Note { summary: &summary }, now).await?;
        if tx.firing_alerts(&inc.id).await? == 0 {
            self.apply(
                tx,
                &mut inc,
                Event::AllAlertsResolved,
                "alertmanager",
                "every alert of the incident has resolved".into(),
                Value::Null,
                now,
            )
            .await?;
            self.close_if_done(tx, &mut inc, now).await?;
        }
        Ok(())
    }

    /// Re-decides waiting incidents and expires approval requests whose time has come.
    pub async fn run_due(&self) -> Result<Vec<IncidentId>, StepError> {
        let now = Utc::now();
        let mut work = Vec::new();
        for id in self.store.due_incidents(now).await? {
            let freezes = self.freezes(now).await?;
            let mut tx = self.store.begin().await?;
            let Some(mut inc) = tx.incident(&id).await? else {
                continue;
            };
            if inc.due_at.is_none_or(|d| d > now) {
                continue;
            }
            match inc.phase {
                Phase::Waiting => {
                    let firing = tx.firing_alerts_of(&inc.id).await?;
                    let Some(oldest) = firing.first() else {
                        self.apply(
                            &mut tx,
                            &mut inc,
                            Event::AllAlertsResolved,
                            SYSTEM,
                            "no alert fires any more".into(),
                            Value::Null,
                            now,
                        )
                        .await?;
                        self.close_if_done(&mut tx, &mut inc, now).await?;
                        self.commit(tx, &inc).await?;
                        continue;
                    };
                    let set = self.policies();
                    let history = match set.get(&inc.policy) {
                        Some(p) => self.load_history(&mut tx, p, now).await?,
                        None => policy::History::default(),
                    };
                    let d = self.decide_for(&set, oldest, &history, &freezes, now);
                    self.metrics.decision(d.outcome.label(), &inc.policy);
                    // A reload may have removed the trigger: "no match" cancels the wait.
                    let reason = format!("re-evaluated: {}", d.reason);
                    let event = Event::Decided {
                        outcome: d.outcome.clone(),
                    };
                    inc.decision = d;
                    self.apply(&mut tx, &mut inc, event, SYSTEM, reason, Value::Null, now)
                        .await?;
                }
                Phase::AwaitingApproval => {
                    let on_timeout = approval_timeout_action(&inc.decision.outcome);
                    let summary = format!(
                        "approval request expired; policy says {}",
                        serde_json::to_value(on_timeout)
                            .unwrap_or(Value::Null)
                            .as_str()
                            .unwrap_or("?")
                    );
                    // Rolling back on expiry is an automatic rollback, decided now: a freeze
                    // switched on, or a rollback of the target, while the request was open
                    // holds it like it would hold a fresh alert.
                    let set = self.policies();
                    let held = match (on_timeout, set.get(&inc.policy)) {
                        (policy::OnTimeout::Rollback, Some(p)) => {
                            let history = self.load_history(&mut tx, p, now).await?;
                            policy::holds_automatic(p, &history, &freezes, &self.global, now)
                        }
                        _ => None,
                    };
                    let (event, summary) = match held {
                        Some((why, reason)) => {
                            let outcome = Outcome::Suppressed(why);
                            inc.decision = Decision {
                                outcome: outcome.clone(),
                                reason: format!("{summary}, but {reason}"),
                                policy_hash: set.hash.clone(),
                                decided_at: now,
                                ..inc.decision.clone()
                            };
                            (Event::ExpiryHeld { outcome }, inc.decision.reason.clone())
                        }
                        None => (Event::ApprovalExpired { on_timeout }, summary),
                    };
                    self.apply(&mut tx, &mut inc, event, SYSTEM, summary, Value::Null, now)
                        .await?;
                }
                _ => continue,
            }
            self.commit(tx, &inc).await?;
            if inc.phase == Phase::Executing {
                work.push(inc.id.clone());
            }
        }
        Ok(work)
    }

    async fn commit(&self, tx: StoreTx, inc: &Incident) -> Result<(), StepError> {
        let committed = tx.commit().await.map_err(|e| {
            if e.is_conflict() {
                StepError::Conflict(inc.id.clone())
            } else {
                e.into()
            }
        })?;
        // Messages queued by this change can go out now.
        self.outbox_wake.queued(&committed);
        Ok(())
    }

    /// Runs an incident's action and verification, if this replica can claim it.
    pub async fn run_work(&self, id: &IncidentId) -> Result<(), StepError> {
        if !self.store.claim(id, &self.replica, Utc::now(), self.lease).await? {
            return Ok(());
        }
        let span = tracing::info_span!("incident", incident = %id);
        self.run_claimed(id, false).instrument(span).await
    }

    /// Runs the action of an incident whose deciding transaction already claimed it and
    /// recorded the start ([`Responder::process_pending`]'s work).
    pub async fn run_started(&self, id: &IncidentId) -> Result<(), StepError> {
        let span = tracing::info_span!("incident", incident = %id);
        self.run_claimed(id, true).instrument(span).await
    }

    /// Takes the lease on an incident that `tx` has just moved into `executing` and records
    /// the start of its action, both in the deciding transaction: the rollback starts right
    /// after that one commit, with no separate claim and start to commit (two fsyncs less on
    /// the way from alert to AWS).
    async fn claim_and_start(&self, tx: &mut StoreTx, inc: &mut Incident, now: DateTime<Utc>) -> Result<(), StepError> {
        inc.owner = Some(self.replica.clone());
        inc.lease_until = Some(now + chrono::Duration::from_std(self.lease).unwrap_or(chrono::Duration::seconds(60)));
        if !tx.take_lease(inc).await? {
            return Err(StepError::Conflict(inc.id.clone()));
        }
        inc.version += 1;
        self.record_start(tx, inc, now).await
    }

    /// The `action_started` mark (and its note): a replica taking over later reads it to know
    /// that an earlier attempt may already have written to the target.
    async fn record_start(&self, tx: &mut StoreTx, inc: &Incident, now: DateTime<Utc>) -> Result<(), StepError> {
        let target: Target =
            serde_json::from_value(inc.plan.clone()).map_err(|e| StepError::Plan(inc.id.clone(), e.to_string()))?;
        let started = format!(
            "{}: {}",
            if notify::is_dry_run(inc) {
                "dry run"
            } else {
                "rolling back"
            },
            target.describe()
        );
        Self::record(
            tx,
            inc,
            "action_started",
            &self.replica,
            started.clone(),
            json!({ "dry_run": notify::is_dry_run(inc) }),
            now,
        )
        .await?;
        self.tell(tx, inc, Change::Note { summary: &started }, now).await?;
        Ok(())
    }

    async fn run_claimed(&self, id: &IncidentId, started: bool) -> Result<(), StepError> {
        let Some(mut inc) = self.store.incident(id).await? else {
            return Ok(());
        };
        if inc.phase == Phase::Executing {
            let target: Target =
                serde_json::from_value(inc.plan.clone()).map_err(|e| StepError::Plan(inc.id.clone(), e.to_string()))?;
            let dry_run = notify::is_dry_run(&inc);
            let mut interrupted = None;
            if !started {
                // An earlier start on this incident without a result (the phase is still
                // `executing`): that replica died or was stopped mid-action, maybe after its
                // write.
                interrupted = self
                    .store
                    .events(id)
                    .await?
                    .iter()
                    .rev()
                    .find(|e| e.kind == "action_started")
                    .map(|e| e.actor.clone());
                let mut tx = self.store.begin().await?;
                self.record_start(&mut tx, &inc, Utc::now()).await?;
                self.commit(tx, &inc).await?;
            }

            let started = Instant::now();
            let (result, steps) = self.with_lease(id, self.executors.execute(&target, dry_run)).await;
            let secs = started.elapsed().as_secs_f64();
            let now = Utc::now();
            let mut tx = self.store.begin().await?;
            let Some(fresh) = tx.incident(id).await? else {
                return Ok(());
            };
            inc = fresh;
            for step in steps {
                let summary = step_summary(&step);
                Self::record(&mut tx, &inc, "action_step", &self.replica, summary, step, now).await?;
            }
            match result {
                Ok(report) => {
                    self.metrics.action(
                        target.kind().as_str(),
                        if report.dry_run {
                            "dry_run"
                        } else if report.changed {
                            "changed"
                        } else {
                            "no_op"
                        },
                        secs,
                    );
                    if report.changed {
                        inc.acted_at = Some(now);
                        self.metrics
                            .alert_to_action((now - inc.first_alert_starts_at).num_milliseconds() as f64 / 1000.0);
                    }
                    let ActionReport {
                        changed,
                        dry_run,
                        mut summary,
                        detail,
                    } = report;
                    // Found reverted after an interrupted attempt: most likely that attempt's
                    // write (a crash after AWS applied it). Count it as this incident's rollback,
                    // or the guards (cooldown, rate limits) and people (PagerDuty change event,
                    // "executed") would never learn that the target was changed.
                    if let Some(by) = interrupted.filter(|_| !changed && !dry_run && inc.acted_at.is_none()) {
                        inc.acted_at = Some(now);
                        summary.push_str(&format!(
                            " (an interrupted earlier attempt by {by} most likely wrote it: counted as this incident's rollback)"
                        ));
                    }
                    self.apply(
                        &mut tx,
                        &mut inc,
                        Event::ActionSucceeded { changed, dry_run },
                        &self.replica,
                        summary,
                        detail,
                        now,
                    )
                    .await?;
                }
                Err(e) => {
                    self.metrics.action(target.kind().as_str(), "failed", secs);
                    warn!(error = %e, "rollback action failed; escalating");
                    self.apply(
                        &mut tx,
                        &mut inc,
                        Event::ActionFailed,
                        &self.replica,
                        format!("rollback failed: {e}; nothing more will be tried automatically, a human must act"),
                        json!({ "error": e.to_string(), "detail": e.detail() }),
                        now,
                    )
                    .await?;
                }
            }
            self.close_if_done(&mut tx, &mut inc, now).await?;
            self.commit(tx, &inc).await?;
        }
        if inc.phase == Phase::Verifying {
            self.verify(&mut inc).await?;
        }
        Ok(())
    }

    /// Runs `fut` while renewing this replica's lease on the incident, so a long action
    /// (a gradual shift) is not taken over by another replica.
    async fn with_lease<T>(&self, id: &IncidentId, fut: impl std::future::Future<Output = T>) -> T {
        let renew_every = self.lease / 3;
        tokio::pin!(fut);
        let mut tick = tokio::time::interval(renew_every);
        tick.tick().await;
        loop {
            tokio::select! {
                out = &mut fut => return out,
                _ = tick.tick() => {
                    match self.store.renew(id, &self.replica, Utc::now(), self.lease).await {
                        Ok(true) => {}
                        Ok(false) => warn!("lost the lease on this incident; another replica may take over"),
                        Err(e) => warn!(error = %e, "could not renew the lease"),
                    }
                }
            }
        }
    }

    /// Every state change of a stored incident: validate with [`transition`], update the
    /// row if nobody else did (version check), and append the audit entry, in `tx`.
    #[allow(clippy::too_many_arguments)]
    pub async fn apply(
        &self,
        tx: &mut StoreTx,
        inc: &mut Incident,
        event: Event,
        actor: &str,
        summary: String,
        detail: Value,
        now: DateTime<Utc>,
    ) -> Result<Phase, StepError> {
        let from = inc.phase;
        let next = transition(from, &event)?;
        inc.phase = next;
        inc.updated_at = now;
        inc.due_at = match next {
            Phase::Waiting | Phase::AwaitingApproval if from != next || matches!(event, Event::Decided { .. }) => {
                due_at(next, &inc.decision.outcome).or(inc.due_at)
            }
            Phase::Waiting | Phase::AwaitingApproval => inc.due_at,
            _ => None,
        };
        if next.is_settled() {
            inc.owner = None;
            inc.lease_until = None;
        }
        if !tx.save_incident(inc).await? {
            return Err(StepError::Conflict(inc.id.clone()));
        }
        inc.version += 1;
        let detail = if detail.is_null() {
            serde_json::to_value(&event).unwrap_or(Value::Null)
        } else {
            detail
        };
        self.tell(
            tx,
            inc,
            Change::Phase {
                from,
                to: next,
                summary: &summary,
                actor,
                detail: &detail,
            },
            now,
        )
        .await?;
        tx.append_event(
            &inc.id,
            now,
            NewEvent {
                kind: event.name(),
                actor,
                phase_from: Some(from),
                phase_to: Some(next),
                summary,
                detail,
            },
        )
        .await?;
        if from != next {
            info!(incident = %inc.id, from = %from, to = %next, "incident phase changed");
        }
        Ok(next)
    }

    async fn record(
        tx: &mut StoreTx,
        inc: &Incident,
        kind: &str,
        actor: &str,
        summary: String,
        detail: Value,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        tx.append_event(
            &inc.id,
            now,
            NewEvent {
                kind,
                actor,
                phase_from: None,
                phase_to: None,
                summary,
                detail,
            },
        )
        .await
    }

    async fn close_if_done(&self, tx: &mut StoreTx, inc: &mut Incident, now: DateTime<Utc>) -> Result<(), StepError> {
        if inc.closed_at.is_some() || !should_close(inc.phase, tx.firing_alerts(&inc.id).await?) {
            return Ok(());
        }
        inc.closed_at = Some(now);
        if !tx.save_incident(inc).await? {
            return Err(StepError::Conflict(inc.id.clone()));
        }
        inc.version += 1;
        Self::record(
            tx,
            inc,
            "closed",
            SYSTEM,
            format!("incident closed in phase {}", inc.phase),
            Value::Null,
            now,
        )
        .await?;
        self.tell(tx, inc, Change::Closed, now).await?;
        Ok(())
    }

    /// Queues what people must hear about a change, in the change's own transaction.
    async fn tell(
        &self,
        tx: &mut StoreTx,
        inc: &Incident,
        change: Change<'_>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let ctx = verify::notification_context(inc);
        for msg in notify::plan(inc, &ctx, &change) {
            let payload = serde_json::to_string(&msg).unwrap_or_default();
            tx.enqueue(&inc.id, msg.channel().as_str(), &payload, now).await?;
        }
        Ok(())
    }
}

/// A new incident under policy `p` with decision `d`, as of `now`; the caller fills in what
/// opened it (an alert, or a person).
fn opening(p: &policy::Policy, d: Decision, phase: Phase, context: &notify::Context, now: DateTime<Utc>) -> Incident {
    Incident {
        id: IncidentId::new(),
        policy: p.name.clone(),
        trigger: d.trigger.clone(),
        service: p.service.clone(),
        target_key: p.target.key(),
        phase,
        due_at: due_at(phase, &d.outcome),
        plan: serde_json::to_value(&p.target).unwrap_or(Value::Null),
        alertname: String::new(),
        first_alert_starts_at: now,
        opened_at: now,
        updated_at: now,
        closed_at: None,
        acted_at: None,
        verified_at: None,
        owner: None,
        lease_until: None,
        version: 0,
        decision: d,
        context: serde_json::to_value(context).unwrap_or(Value::Null),
    }
}

/// When an incident in `phase` next needs attention, derived from its decision.
fn due_at(phase: Phase, outcome: &Outcome) -> Option<DateTime<Utc>> {
    match (phase, outcome) {
        (_, Outcome::Suppressed(Suppression::DryRun { would })) => due_at(phase, would),
        (Phase::Waiting, Outcome::Suppressed(Suppression::TooYoung { recheck_at, .. })) => Some(*recheck_at),
        (Phase::AwaitingApproval, Outcome::NeedsApproval { expires_at, .. }) => Some(*expires_at),
        (Phase::AwaitingApproval, Outcome::EscalateLater { auto_at }) => Some(*auto_at),
        _ => None,
    }
}

/// What an expiring approval request does, derived from the decision that opened it.
fn approval_timeout_action(outcome: &Outcome) -> policy::OnTimeout {
    match outcome {
        Outcome::NeedsApproval { on_timeout, .. } => *on_timeout,
        Outcome::EscalateLater { .. } => policy::OnTimeout::Rollback,
        Outcome::Suppressed(Suppression::DryRun { would }) => approval_timeout_action(would),
        _ => policy::OnTimeout::Escalate,
    }
}

/// One line per executor step: what it did, with the AWS code for failed attempts.
fn step_summary(step: &Value) -> String {
    let kind = step.get("step").and_then(Value::as_str).unwrap_or("step");
    match kind {
        "attempt_failed" => format!(
            "{} attempt {} failed: {} {}{}",
            step["operation"].as_str().unwrap_or("?"),
            step["attempt"],
            step["code"].as_str().unwrap_or("?"),
            step["message"].as_str().unwrap_or(""),
            if step["will_retry"].as_bool() == Some(true) {
                " (retrying)"
            } else {
                " (not retried)"
            }
        ),
        "pre_check" => format!(
            "pre-check: {} of {} required targets healthy in the stable group",
            step["healthy"], step["required"]
        ),
        "wrote" => format!(
            "{} written ({}% stable)",
            step["operation"].as_str().unwrap_or("?"),
            step["stable_percent"]
        ),
        "read_back" => format!(
            "read back: {}% stable, {}",
            step["stable_percent"],
            if step["matches"].as_bool() == Some(true) {
                "as written"
            } else {
                "NOT as written"
            }
        ),
        other => other.replace('_', " "),
    }
}

fn describe_alert(s: &StoredAlert) -> String {
    format!("{} ({})", policy::describe_labels(&s.alert.labels), s.alert.fingerprint)
}
