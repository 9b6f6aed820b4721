//! The decision loop's transactions: pending alerts are taken in small batches, oldest first
//! (with other groups' heads ahead of a backlog), each decided (`decide.rs`) inside one
//! transaction and committed together. An alert that cannot be decided (bad data, even a panic)
//! is set aside with its reason and never holds up the others. Before: the webhook stored the
//! alert; after: the action path (`Responder::run_started`) runs what a batch claimed.

use std::time::Instant;

use tracing::{info, warn};

use super::decide::Deciding;
use super::{Responder, StepError};
use crate::incident::IncidentId;
use crate::store::StoreTx;

/// Open incidents kept between batches ([`Responder::open_incidents`]) before they are all
/// forgotten: more targets than this with an open incident at once is not a release going bad.
const MAX_KEPT_INCIDENTS: usize = 1024;

/// (incident, alertname) pairs kept between batches ([`Responder::named_incidents`]) before
/// they are all forgotten.
const MAX_KEPT_NAMES: usize = 4096;

/// Groups whose oldest pending alert goes ahead of the backlog in each batch.
const FAIR_GROUPS: i64 = 8;

/// Alerts a batch decides before it makes way for waiting webhook deliveries: Alertmanager is
/// waiting on those, while a backlog still moves at least this much per commit.
const BATCH_MIN: usize = 8;

impl Responder {
    /// Processes up to `batch` pending alerts, oldest first; returns incidents whose action
    /// this replica has claimed and must now run, and whether more alerts are waiting. Small
    /// batches let the caller start a rollback while an alert storm is still being stored and
    /// decided. Behind a backlog, the oldest pending alert of a few other Alertmanager groups
    /// goes first: a flood of one group never holds up another group's alert.
    pub async fn process_pending(&self, batch: i64) -> Result<(Vec<IncidentId>, bool), StepError> {
        let mut ids = self.store.pending_alert_ids(batch).await?;
        let more = ids.len() as i64 == batch;
        if ids.is_empty() {
            return Ok((Vec::new(), false));
        }
        if more {
            ids = self.fair_order(ids).await?;
        }
        // The whole batch in one transaction: one commit (an fsync) instead of one per alert,
        // which is what lets decisions keep up with a storm. If any alert of it fails (another
        // replica opened an incident for the same target at the same moment), nothing of the
        // batch is kept and each alert is done again on its own, with retries.
        match self.process_batch(&ids).await {
            // Nothing claimed: another replica holds every one of them (PostgreSQL) and will
            // settle them; asking again at once would only spin until it commits.
            Ok((work, None)) => Ok((work, false)),
            Ok((work, Some(left))) => Ok((work, more || left)),
            // A conflict (another writer changed the target's incident at the same moment) is
            // retried alert by alert even for a batch of one, at once rather than next tick.
            Err(e) if ids.len() > 1 || e.is_conflict() => {
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

    /// The oldest pending alert of up to [`FAIR_GROUPS`] groups (rotating through the groups
    /// from one call to the next) that `fifo` does not already hold, then `fifo`.
    async fn fair_order(&self, fifo: Vec<i64>) -> Result<Vec<i64>, StepError> {
        let after = self.fair_cursor.lock().map(|c| c.clone()).unwrap_or_default();
        let heads = self.store.pending_group_heads(&after, FAIR_GROUPS).await?;
        let next = match heads.last() {
            Some((k, _)) if heads.len() as i64 == FAIR_GROUPS => k.clone(),
            // Every group after the cursor had its turn: start again from the first.
            _ => String::new(),
        };
        if let Ok(mut c) = self.fair_cursor.lock() {
            *c = next;
        }
        // The heads behind the backlog first: a batch may end after its first alert (its time
        // budget), and the backlog's own head is next in `fifo` anyway.
        let mut ids: Vec<i64> = heads
            .into_iter()
            .map(|(_, id)| id)
            .filter(|id| !fifo.contains(id))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.extend(fifo);
        Ok(ids)
    }

    /// Decides alerts of `ids` in one transaction until its time budget is spent or, after
    /// [`BATCH_MIN`], webhook deliveries are waiting; returns the claimed work and whether
    /// alerts were left for the next batch (`None`: none of `ids` could be claimed).
    async fn process_batch(&self, ids: &[i64]) -> Result<(Vec<IncidentId>, Option<bool>), StepError> {
        // Read before the transaction: on SQLite the transaction holds the only connection.
        let mut ctx = self.deciding().await?;
        let started = Instant::now();
        let mut tx = self.store.begin().await?;
        // Claimed a few at a time, in the order asked for (the other groups' heads first: see
        // `fair_order`): a batch often ends after its first few alerts (the budget, or webhook
        // deliveries waiting), and each alert claimed is read and its labels parsed. What the
        // batch does not get to stays pending (see below). All of them are locked first, as one
        // claim did before: another replica asking for the same oldest alerts skips the batch
        // rather than deciding its later alerts alongside.
        let ids = tx.lock_alerts(ids).await?;
        let mut work = Vec::new();
        let mut settled: Vec<i64> = Vec::new();
        let (mut any_claimed, mut left) = (false, false);
        let mut chunks = ids.chunks(BATCH_MIN).peekable();
        'batch: while let Some(chunk) = chunks.next() {
            let mut claimed = tx.claim_alerts(chunk).await?;
            any_claimed |= !claimed.is_empty();
            claimed.sort_by_key(|a| chunk.iter().position(|id| *id == a.id));
            for (i, stored) in claimed.iter().enumerate() {
                work.extend(self.decide_guarded(&mut tx, stored, &mut ctx).await?);
                settled.push(stored.id);
                // The budget (`workers.decision_batch_budget`, 2 ms): on SQLite this
                // transaction holds the only connection and webhook intake waits behind it, so
                // a short batch keeps the intake's latency low while a storm is decided.
                if started.elapsed() > self.decision_budget
                    || (settled.len() >= BATCH_MIN && self.store.intake_waiting())
                {
                    left = i + 1 < claimed.len() || chunks.peek().is_some();
                    break 'batch;
                }
            }
        }
        if !any_claimed {
            return Ok((Vec::new(), None));
        }
        // The decided ones are settled; the rest stay pending for the next batch.
        tx.settle_alerts(&settled);
        self.joined_still_hold(&mut tx, &ctx).await?;
        let (open, joined) = (std::mem::take(&mut ctx.open), std::mem::take(&mut ctx.joined));
        let committed = tx.commit().await?;
        self.outbox_wake.queued(&committed);
        self.keep_named(std::mem::take(&mut ctx.named));
        if let Ok(mut kept) = self.open_incidents.lock() {
            // Bounded by the targets with an open incident; forgetting is always safe.
            if kept.len() > MAX_KEPT_INCIDENTS {
                kept.clear();
            }
            // A joined incident this batch changed is not kept: the next batch reads it.
            kept.retain(|_, i| !joined.contains_key(&i.id));
            kept.extend(open);
        }
        Ok((work, Some(left)))
    }

    /// One alert, in one transaction; retried when another replica wins a race on the target.
    /// An alert whose decision panics or fails for good (its data, not the store) is marked
    /// undecidable in a transaction of its own, so it never holds up the alerts behind it.
    async fn process_alert(&self, alert_id: i64) -> Result<Option<IncidentId>, StepError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut ctx = self.deciding().await?;
            let mut tx = self.store.begin().await?;
            let decided = match tx.claim_alert(alert_id).await? {
                Some(stored) => self.decide_guarded(&mut tx, &stored, &mut ctx).await,
                None => Ok(None),
            };
            match decided {
                Err(e) if e.is_about_the_alert() => {
                    drop(tx);
                    let problem = e.to_string();
                    warn!(alert = alert_id, %problem, "alert cannot be decided; marked and skipped");
                    self.metrics.decision("undecidable", "");
                    self.store.mark_undecidable(alert_id, &problem).await?;
                    return Ok(None);
                }
                Ok(work) => {
                    match self.joined_still_hold(&mut tx, &ctx).await {
                        Err(StepError::Conflict(_)) if attempt < 3 => continue,
                        Err(e) => return Err(e),
                        Ok(()) => {}
                    }
                    match tx.commit().await.inspect(|c| self.outbox_wake.queued(c)) {
                        Ok(_) => {
                            self.keep_named(ctx.named);
                            return Ok(work);
                        }
                        Err(e) if e.is_conflict() && attempt < 3 => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                // Another replica opened an incident for this target at the same moment:
                // start over, and this time attach to it.
                Err(StepError::Store(e)) if e.is_conflict() && attempt < 3 => continue,
                Err(StepError::Conflict(_)) if attempt < 3 => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Keeps what a committed transaction put in its incidents ([`Responder::named_incidents`]).
    fn keep_named(&self, named: foldhash::HashSet<(IncidentId, String)>) {
        if let Ok(mut kept) = self.named_incidents.lock() {
            // Bounded; forgetting only costs a look-up.
            if kept.len() > MAX_KEPT_NAMES {
                kept.clear();
            }
            kept.extend(named);
        }
    }

    /// Whether every incident this transaction's alerts plainly joined is still open;
    /// [`StepError::Conflict`] if not (another replica closed it meanwhile), and the caller
    /// decides again. Other changes (an action moving its phase) do not undo a join. On
    /// PostgreSQL the rows stay share-locked until the commit, so none closes in between.
    async fn joined_still_hold(&self, tx: &mut StoreTx, ctx: &Deciding) -> Result<(), StepError> {
        let plain: Vec<&IncidentId> = ctx
            .joined
            .iter()
            .filter(|(_, plain)| **plain)
            .map(|(id, _)| id)
            .collect();
        match tx.first_not_open(&plain).await? {
            Some(id) => Err(StepError::Conflict(id)),
            None => Ok(()),
        }
    }
}
