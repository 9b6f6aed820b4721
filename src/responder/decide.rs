//! Deciding one claimed alert: under the policy in force (`policy::decide`, pure) it opens an
//! incident or joins the target's open one, and has that incident reconciled (`reconcile.rs`)
//! when the joining alert could change its next step. Before: the decision loop (`batch.rs`)
//! claimed the alert inside its transaction; after: the action path
//! (`Responder::run_started`) runs what this claimed.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tracing::{info, warn};

use super::{opening, Responder, StepError, SYSTEM};
use crate::alert::AlertStatus;
use crate::incident::reconcile::{may_change, Candidate};
use crate::incident::{joins, AuditKind, Event, Incident, IncidentId, Phase};
use crate::notify::{self, Change};
use crate::policy::{self, Decision, FreezeState, Outcome, PolicySet};
use crate::store::{NewEvent, StoreError, StoreTx, StoredAlert};

/// What the decisions of one transaction share: the time, the freezes read before it, and the
/// guards' history per policy and target, read once per batch instead of once per alert. Only
/// a rollback that starts changes that history (it counts against the rate limits while it
/// runs), so starting one forgets it.
pub(super) struct Deciding {
    pub(super) now: DateTime<Utc>,
    pub(super) freezes: FreezeState,
    pub(super) history: foldhash::HashMap<(String, String), policy::History>,
    /// (incident, alertname) pairs known to be in an incident: in a storm most joining
    /// alerts share a name, and an alert never leaves its incident, so one look-up serves
    /// the batch. Kept for later batches once committed ([`Responder::named_incidents`]).
    pub(super) named: foldhash::HashSet<(IncidentId, String)>,
    /// The open incident per target, read once per batch: in a storm every alert of a target
    /// joins the same incident, and reading and parsing it again for each cost more than the
    /// rest of the join. Only a plain join (one that changed nothing of the incident) puts it
    /// back; any other path reads it again. Before the batch commits, each cached incident is
    /// checked to be unchanged and still open (another replica may have changed it meanwhile
    /// on PostgreSQL); if not, the batch is redone alert by alert.
    pub(super) open: foldhash::HashMap<String, Arc<Incident>>,
    /// Every incident an alert of this transaction joined: `true` for a plain join, which
    /// relied on the incident being open and is checked before the commit
    /// ([`Responder::joined_still_hold`]); `false` where this transaction changed the incident
    /// itself (its version-checked write holds it). Either way not kept for the next batch. So a
    /// join to an incident that another replica changed or closed meanwhile is redone.
    pub(super) joined: foldhash::HashMap<IncidentId, bool>,
}

impl Responder {
    /// [`Responder::decide_claimed`], with a panic caught and turned into
    /// [`StepError::Panicked`]: one alert's bad data never takes the decision loop down.
    pub(super) async fn decide_guarded(
        &self,
        tx: &mut StoreTx,
        stored: &StoredAlert,
        ctx: &mut Deciding,
    ) -> Result<Option<IncidentId>, StepError> {
        use futures::FutureExt;
        std::panic::AssertUnwindSafe(self.decide_claimed(tx, stored, ctx))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(StepError::Panicked(stored.id, msg))
            })
    }

    /// Whether a committed transaction already put an alert of this name in the incident.
    fn known_named(&self, named: &(IncidentId, String)) -> bool {
        self.named_incidents.lock().is_ok_and(|k| k.contains(named))
    }

    /// The shared context of a deciding transaction, read before it begins (on SQLite the
    /// transaction holds the only connection).
    pub(super) async fn deciding(&self) -> Result<Deciding, StepError> {
        let now = self.clock.now();
        Ok(Deciding {
            now,
            freezes: self.freezes(now).await?,
            history: Default::default(),
            named: Default::default(),
            open: Default::default(),
            joined: Default::default(),
        })
    }

    /// The open incident on a target: the copy the last batch committed if the store still
    /// has it open at that version, else read whole.
    async fn open_incident(&self, tx: &mut StoreTx, target_key: &str) -> Result<Option<Arc<Incident>>, StepError> {
        let Some((id, version)) = tx.open_incident_version(target_key).await? else {
            return Ok(None);
        };
        let kept = self.open_incidents.lock().ok().and_then(|k| {
            k.get(target_key)
                .filter(|i| i.id == id && i.version == version)
                .cloned()
        });
        match kept {
            Some(inc) => Ok(Some(inc)),
            None => Ok(tx.open_incident_for(target_key).await?.map(Arc::new)),
        }
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
            AlertStatus::Resolved => {
                // A resolving alert may close its incident: the batch reads it again, and a
                // join earlier in the batch is checked against what this change left.
                if let Some(touched) = self.on_resolved(tx, stored, ctx.now).await? {
                    ctx.open.retain(|_, inc| inc.id != touched);
                    if let Some(plain) = ctx.joined.get_mut(&touched) {
                        // Changed (maybe closed) by this transaction itself.
                        *plain = false;
                    }
                }
                Ok(None)
            }
        }
    }

    /// The decision on `stored` under `set`, whose policy and trigger for it (`policy::find`)
    /// are `matched`.
    fn decide_for(
        &self,
        set: &PolicySet,
        stored: &StoredAlert,
        matched: Option<(&policy::Policy, &policy::Trigger)>,
        history: &policy::History,
        freezes: &FreezeState,
        now: DateTime<Utc>,
    ) -> Decision {
        policy::decide(&stored.alert, matched, now, history, freezes, &self.global, &set.hash)
    }

    pub(super) async fn load_history(
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
        let Some((p, trigger)) = policy::find(&stored.alert, &set) else {
            let d = self.decide_for(&set, stored, None, &policy::History::default(), freezes, now);
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
        let d = self.decide_for(&set, stored, Some((p, trigger)), history, freezes, now);
        self.metrics.decision(d.outcome.label(), &p.name);
        if let Outcome::Undecidable { problem } = &d.outcome {
            // Bad data: marked, listed by the API, and never in an incident's way.
            warn!(alertname = stored.alert.alertname(), fingerprint = %stored.alert.fingerprint, %problem, "alert cannot be decided");
            tx.set_alert_outcome(stored.id, None, Some(&d)).await?;
            tx.mark_undecidable(stored.id, problem).await?;
            return Ok(None);
        }

        let open = match ctx.open.remove(&target_key) {
            Some(inc) => Some(inc),
            None => self.open_incident(tx, &target_key).await?,
        };
        if let Some(mut inc) = open {
            // One open incident per target: further alerts join it and never start a second
            // rollback; one that could change the next step (a stronger trigger, one that
            // passes its `for` sooner, an automatic one after a deny) has it decided again.
            let joining = Candidate::new(d.clone(), trigger);
            let mut applied = None;
            if may_change(inc.phase, &inc.decision, inc.due_at, &joining, now) {
                // Recorded before the re-decision, which reads the incident's alerts.
                tx.set_alert_outcome(stored.id, Some(&inc.id), Some(&d)).await?;
                // Changing it: from the store as it is now, lease and all, not a kept copy,
                // and only if it is still the open incident the copy was.
                let kept_version = inc.version;
                inc = tx
                    .incident(&inc.id)
                    .await?
                    .filter(|fresh| fresh.version == kept_version && fresh.closed_at.is_none())
                    .map(Arc::new)
                    .ok_or_else(|| StepError::Conflict(inc.id.clone()))?;
                let cands = self.candidates(tx, &inc, &set, freezes, now).await?;
                let a = self
                    .reconcile(tx, Arc::make_mut(&mut inc), &cands, freezes, now)
                    .await?;
                // The alert and its decision are in its row (`alert_id`); the entry says which,
                // and its summary why and what changed.
                let detail = format!(
                    r#"{{"alert_id":{},"fingerprint":{}}}"#,
                    stored.id,
                    serde_json::to_string(&stored.alert.fingerprint).unwrap_or_else(|_| "null".into()),
                );
                let summary = join_summary(stored, &d, &inc, a.note.as_deref());
                tx.append_event_json(
                    &inc.id,
                    now,
                    NewEvent {
                        kind: AuditKind::AlertJoined,
                        actor: SYSTEM,
                        phase_from: None,
                        phase_to: None,
                        summary,
                        detail: Value::Null,
                    },
                    detail,
                );
                applied = Some(a);
            } else {
                // A plain join, a storm's usual case: kept on the alert's row, and the timeline
                // says it where it happened ([`crate::incident::joins`]).
                tx.join_alert(stored.id, &inc.id, &d, now, inc.phase, inc.due_at)
                    .await?;
            }
            // One thread reply per kind of alert: in a storm thousands of instances of one alert
            // join, and a reply each would bury the thread and hold the rollback's own messages
            // behind them in the ordered outbox for hours. The timeline keeps every one.
            let named = (inc.id.clone(), stored.alert.alertname().to_string());
            if !ctx.named.contains(&named)
                && !self.known_named(&named)
                && !tx
                    .incident_has_alertname(&inc.id, stored.alert.alertname(), stored.id)
                    .await?
            {
                // The thread says what the new kind of alert measured, as the root does for the
                // first one; the timeline keeps the whole alert. (Annotations are not read
                // with the claim: only the first of each kind needs them.)
                let full = tx.complete_alert(stored).await?;
                let summary = join_summary(stored, &d, &inc, applied.as_ref().and_then(|a| a.note.as_deref()));
                let told = match notify::Measured::from_annotations(full.alert.alertname(), &full.alert.annotations) {
                    Some(m) => format!("{summary}\n*Measured:* {}", notify::mrkdwn::defuse_mentions(&m.text)),
                    None => summary,
                };
                self.tell(tx, &inc, Change::Note { summary: &told }, now).await?;
            }
            ctx.named.insert(named);
            match applied {
                Some(a) if a.executing => {
                    self.claim_and_start(tx, Arc::make_mut(&mut inc), now).await?;
                    ctx.joined.insert(inc.id.clone(), false);
                    ctx.history.clear();
                    return Ok(Some(inc.id.clone()));
                }
                // Changed: the next alert reads it again.
                Some(_) => {
                    ctx.joined.insert(inc.id.clone(), false);
                }
                None => {
                    ctx.joined.insert(inc.id.clone(), true);
                    ctx.open.insert(target_key, inc);
                }
            }
            // Already executing (or not to be acted on): whoever holds it runs it, and work
            // whose holder died is picked up as unowned work.
            return Ok(None);
        }

        let Some(phase) = Phase::for_outcome(&d.outcome) else {
            return Ok(None);
        };
        // Opening needs all of the alert: its annotations, URLs and group.
        let stored = &tx.complete_alert(stored).await?;
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
            pages_url: self.notify_defaults.pages_url.clone(),
            measured: notify::Measured::from_annotations(stored.alert.alertname(), &stored.alert.annotations),
            follow_ups: p.follow_ups.clone(),
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
        Self::record(tx, &inc, AuditKind::Opened, SYSTEM, opened, json!({ "alert": stored.alert, "group_key": stored.group_key, "external_url": stored.external_url, "plan": p.target.describe() }), now).await?;
        tx.append_event(
            &inc.id,
            now,
            NewEvent {
                kind: AuditKind::Decided,
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

    /// A resolved alert: recorded in its incident, which closes once nothing fires. Returns
    /// the incident it changed, if any.
    async fn on_resolved(
        &self,
        tx: &mut StoreTx,
        stored: &StoredAlert,
        now: DateTime<Utc>,
    ) -> Result<Option<IncidentId>, StepError> {
        let (fingerprint, starts_at) = (&stored.alert.fingerprint, stored.alert.starts_at);
        let (id, older) = match &stored.incident_id {
            Some(id) => (id.clone(), tx.end_older_episodes(id, fingerprint, starts_at).await?),
            None => {
                // Resolved before it was decided, so it never joined: it still ends the older
                // episodes of the same alert in the target's open incident.
                let set = self.policies();
                let Some((p, _)) = policy::find(&stored.alert, &set) else {
                    return Ok(None);
                };
                let Some((id, _)) = tx.open_incident_version(&p.target.key()).await? else {
                    return Ok(None);
                };
                match tx.end_older_episodes(&id, fingerprint, starts_at).await? {
                    0 => return Ok(None),
                    n => (id, n),
                }
            }
        };
        let Some(mut inc) = tx.incident(&id).await? else {
            return Ok(None);
        };
        let summary = match older {
            0 => format!("{} resolved", describe_alert(stored)),
            n => format!(
                "{} resolved, and with it {n} earlier episode(s) of the same alert whose resolve Alertmanager never sent \
                 (it had fired again before its next notification)",
                describe_alert(stored)
            ),
        };
        Self::record(
            tx,
            &inc,
            AuditKind::AlertResolved,
            "alertmanager",
            summary.clone(),
            json!({ "ends_at": stored.alert.ended_at() }),
            now,
        )
        .await?;
        self.tell(tx, &inc, Change::Note { summary: &summary }, now).await?;
        // Alerts resolving in one delivery are each seen with none left firing: the first
        // one closes the incident, the others must not say "every alert resolved" again.
        if inc.closed_at.is_none() && tx.firing_alerts(&inc.id).await? == 0 {
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
        Ok(Some(id))
    }
}

/// The timeline's words for an alert joining `inc` under `d` ([`joins::summary`]).
fn join_summary(stored: &StoredAlert, d: &Decision, inc: &Incident, note: Option<&str>) -> String {
    joins::summary(
        &stored.alert.labels,
        &stored.alert.fingerprint,
        d,
        inc.phase,
        inc.due_at,
        note,
    )
}

/// An alert for the timeline and the Slack thread: its labels can mention nobody.
fn describe_alert(s: &StoredAlert) -> String {
    joins::describe_alert(&s.alert.labels, &s.alert.fingerprint)
}
