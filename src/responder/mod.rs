//! The one place that wires the steps in order: stored alert -> policy decision -> incident
//! -> (approval) -> action -> verification, each state change through [`Responder::apply`].
//!
//! Every step runs in the background, never while Alertmanager waits: the webhook only stores
//! alerts and wakes [`Responder::process_pending`]. Each replica runs the same loops
//! (`worker.rs`); the store's conditional updates decide which replica does a piece of work,
//! so duplicates from an HA Alertmanager pair, several replicas, or a restart never act twice.
//! Every step takes its time from the responder's [`Clock`] (the system clock in service), read
//! once per step and passed down, so tests can move time instead of waiting for it.

mod act;
mod batch;
mod claim;
mod clock;
mod decide;
mod human;
mod lease;
mod reconcile;
mod verify;

#[cfg(test)]
pub(crate) mod tests;

pub use claim::Unclaimable;
pub use clock::Clock;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tracing::{info, Instrument};

use crate::action::Executors;
use crate::incident::{should_close, transition, AuditKind, Event, Incident, IncidentId, InvalidTransition, Phase};
use crate::metrics::Metrics;
use crate::notify::{self, Change};
use crate::policy::{self, Decision, FreezeState, GlobalGuards, Outcome, PolicySet, Suppression};
use crate::store::{NewEvent, Store, StoreError, StoreTx};

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
    /// Deciding an alert panicked (a bug, or data nobody foresaw); caught, never fatal.
    #[error("deciding alert {0} panicked: {1}")]
    Panicked(i64, String),
}

impl StepError {
    /// Whether retrying cannot help: the failure comes from the alert (its data, or a bug it
    /// hits), not from the store or a race with another replica.
    fn is_about_the_alert(&self) -> bool {
        matches!(
            self,
            StepError::Panicked(..) | StepError::Transition(_) | StepError::Plan(..)
        ) || matches!(self, StepError::Store(StoreError::Corrupt(_)))
    }

    /// Whether another writer won a race (a version check, a unique key): worth doing again.
    fn is_conflict(&self) -> bool {
        matches!(self, StepError::Conflict(_)) || matches!(self, StepError::Store(e) if e.is_conflict())
    }
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
    /// Set (with a wake) when this replica made work for the worker other than new alerts:
    /// approved or taken-over work, incidents made due. The worker's round then looks for
    /// unowned and due work at once; a wake for stored alerts alone does not, since that
    /// look-up cost as much as storing a delivery (others' work is found on the next tick).
    pub work_hint: std::sync::atomic::AtomicBool,
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
    /// Set at start-up, by a policy reload, or when a lifted freeze could not make what it
    /// held due: the next tick decides waiting and pending incidents again.
    redecide: std::sync::atomic::AtomicBool,
    /// The last Alertmanager group whose oldest pending alert went ahead of the backlog.
    fair_cursor: std::sync::Mutex<String>,
    /// Open incidents per target as the last deciding batch committed them: the next batch
    /// uses one only if the store still has it open at the same version (one small query
    /// instead of reading and parsing the whole incident); see `decide::Deciding::open`.
    pub(super) open_incidents: std::sync::Mutex<foldhash::HashMap<String, std::sync::Arc<crate::incident::Incident>>>,
    /// (incident, alertname) pairs that committed batches put in an incident: an alert never
    /// leaves its incident, so once true this stays true, and the next batch's first alert of
    /// that name is not looked up again; see `decide::Deciding::named`.
    pub(super) named_incidents: std::sync::Mutex<foldhash::HashSet<(crate::incident::IncidentId, String)>>,
    /// Where "now" comes from for every step.
    pub clock: Clock,
    /// How long one batch of decisions may hold its transaction (`workers.decision_batch_budget`).
    decision_budget: Duration,
    /// Whether this replica decides stored alerts (`workers.decide`); false: intake only.
    pub decides: bool,
    /// Work in flight this replica cannot run as decided, left to others.
    left: claim::Left,
}

pub use human::HumanError;
pub use verify::HumanClose;

/// Who made a change, for the audit trail.
const SYSTEM: &str = crate::incident::SYSTEM_ACTOR;

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
            work_hint: Default::default(),
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
            redecide: std::sync::atomic::AtomicBool::new(false),
            fair_cursor: std::sync::Mutex::new(String::new()),
            open_incidents: Default::default(),
            named_incidents: Default::default(),
            clock: Clock::System,
            decision_budget: Duration::from_millis(2),
            decides: true,
            left: claim::Left::default(),
        }
    }

    /// Runs on `clock` instead of the system clock (tests set the time by hand).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// How decisions run here: each batch's time budget, and whether this replica decides
    /// at all (an intake-only replica leaves its alerts pending for others).
    pub fn with_decisions(mut self, batch_budget: Duration, decides: bool) -> Self {
        self.decision_budget = batch_budget;
        self.decides = decides;
        self
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

    /// Wakes the worker for work other than stored alerts (see [`Responder::work_hint`]).
    pub fn wake_for_work(&self) {
        self.work_hint.store(true, std::sync::atomic::Ordering::SeqCst);
        self.wake.notify_one();
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
        self.redecide.store(true, std::sync::atomic::Ordering::Release);
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
        // Only work this replica can run as it was decided: a real rollback is never claimed
        // by a replica that could only record it.
        if let Some(inc) = self.store.incident(id).await? {
            if let Some(why) = self.cannot_run(&inc) {
                self.leave(id, why);
                return Ok(());
            }
        }
        if !self
            .store
            .claim(id, &self.replica, self.clock.now(), self.lease)
            .await?
        {
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
        self.record_start(tx, inc, None, now).await
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
                kind: event.kind(),
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
        kind: AuditKind,
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
        inc.close(now);
        if !tx.save_incident(inc).await? {
            return Err(StepError::Conflict(inc.id.clone()));
        }
        inc.version += 1;
        Self::record(
            tx,
            inc,
            AuditKind::Closed,
            SYSTEM,
            format!("incident closed in phase {}", inc.phase),
            Value::Null,
            now,
        )
        .await?;
        let closed = Self::closing(tx, inc).await?;
        self.tell(tx, inc, closed, now).await?;
        Ok(())
    }

    /// The closing of `inc`, with what it must know beyond the incident's row, read in the
    /// closing's transaction: whether its alerts have all resolved, whether an escalation page
    /// is still open (from the outbox).
    async fn closing(tx: &mut StoreTx, inc: &Incident) -> Result<Change<'static>, StoreError> {
        let firing = tx.firing_alerts(&inc.id).await?;
        let queued: Vec<notify::Message> = tx
            .queued_payloads(&inc.id, notify::Channel::PagerDuty.as_str())
            .await?
            .iter()
            .filter_map(|p| serde_json::from_str(p).ok())
            .collect();
        let status_page_opened = tx
            .queued_payloads(&inc.id, notify::Channel::Statuspage.as_str())
            .await?
            .iter()
            .filter_map(|p| serde_json::from_str::<notify::Message>(p).ok())
            .any(|m| matches!(m, notify::Message::StatuspageCreate { .. }));
        Ok(Change::Closed {
            alerts_resolved: firing == 0,
            escalation_open: notify::pagerduty::escalation_open(inc, &queued),
            paged: !queued.is_empty(),
            status_page_opened,
        })
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
        // A held incident is looked at again when its hold ends.
        due_at: due_at(phase, &d.outcome).or_else(|| {
            (phase == Phase::Suppressed)
                .then(|| crate::incident::reconcile::hold_ends(&d.outcome, now))
                .flatten()
        }),
        plan: p.target.clone().into(),
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

impl Responder {
    /// Whether `p`'s rollbacks are dry runs now (its `guards.dry_run`, or the global switch).
    pub(super) fn dry_run_for(&self, p: &policy::Policy) -> bool {
        p.guards.dry_run || self.global.dry_run
    }

    /// Dry run as it is in force now (the global switch, the policy's `guards.dry_run`): a
    /// request decided live and answered after dry run was switched on (approved, or expired
    /// into a rollback) runs as a dry run, and its decision says so, so the action, the
    /// timeline and every message agree. The other way round (decided in dry run, live now)
    /// it stays a rehearsal: nobody approved a real change. Returns whether it changed.
    pub(super) fn dry_run_in_force(&self, inc: &mut Incident) -> bool {
        let on = self.global.dry_run || self.policies().get(&inc.policy).is_some_and(|p| self.dry_run_for(p));
        if !on || notify::is_dry_run(inc) {
            return false;
        }
        let would = std::mem::replace(&mut inc.decision.outcome, Outcome::Auto);
        inc.decision.outcome = Outcome::Suppressed(Suppression::DryRun { would: Box::new(would) });
        inc.decision.reason = format!(
            "dry run is in force now, so nothing will be changed; decided before: {}",
            inc.decision.reason
        );
        true
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
