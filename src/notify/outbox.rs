//! The outbox worker: delivers stored notifications, one loop per channel so a slow Slack
//! never holds up PagerDuty, in order per incident, with exponential backoff and jitter
//! (Retry-After wins when the peer gives one). Runs on every replica; a claim with a lease
//! makes sure one replica sends each message. Its progress is stored, so a restart resumes
//! where it stopped and the stored Slack ts / Statuspage id make later messages updates,
//! not duplicates.

use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use chrono::Utc;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Channel, DeliveryError, Message, Notifiers};
use crate::metrics::Metrics;
use crate::store::{Committed, OutboxRow, Store};

/// Retry policy of the outbox.
#[derive(Debug, Clone)]
pub struct Retry {
    pub max_attempts: u32,
    pub initial: Duration,
    pub max: Duration,
}

impl Retry {
    /// Delay before attempt `attempts + 1`: exponential from `initial`, capped, jittered.
    fn delay(&self, attempts: u32) -> Duration {
        backon::ExponentialBuilder::default()
            .with_min_delay(self.initial)
            .with_max_delay(self.max)
            .with_jitter()
            .without_max_times()
            .build()
            .nth(attempts.saturating_sub(1) as usize)
            .unwrap_or(self.max)
    }
}

/// Wakes the delivery loops (one per channel) when new messages are committed.
#[derive(Default)]
pub struct Wake([tokio::sync::Notify; 3]);

impl Wake {
    fn index(c: Channel) -> usize {
        match c {
            Channel::Slack => 0,
            Channel::PagerDuty => 1,
            Channel::Statuspage => 2,
        }
    }

    /// Wakes the loops of the channels a commit queued messages for (a permit is kept if a
    /// loop is busy); the others sleep until their tick.
    pub fn queued(&self, committed: &Committed) {
        for c in committed.queued.iter().filter_map(|c| Channel::parse(c)) {
            self.0[Self::index(c)].notify_one();
        }
    }

    async fn wait(&self, c: Channel) {
        self.0[Self::index(c)].notified().await
    }
}

/// The delivery lease and the request timeout limit it leaves room for are settings-level
/// constants (config checks `notifications.timeout` against them).
pub use crate::config::{DELIVERY_LEASE, MAX_REQUEST_TIMEOUT};

/// How long one delivery (all its requests) may take: well inside [`DELIVERY_LEASE`], so the
/// lease never runs out while a replica is still sending.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(DELIVERY_LEASE.as_secs() - 5);

/// Everything a delivery loop needs.
pub struct Outbox {
    pub store: Store,
    pub notifiers: Notifiers,
    pub retry: Retry,
    pub metrics: Arc<Metrics>,
    pub replica: String,
    pub wake: Arc<Wake>,
}

impl Outbox {
    /// Runs the delivery loops until shutdown.
    pub async fn run(self: Arc<Self>, tick: Duration, shutdown: watch::Receiver<bool>) {
        let loops: Vec<_> = [Channel::Slack, Channel::PagerDuty, Channel::Statuspage]
            .into_iter()
            .map(|c| {
                let me = self.clone();
                let mut stop = shutdown.clone();
                tokio::spawn(async move {
                    let mut ticker = tokio::time::interval(tick);
                    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tokio::select! {
                            _ = me.wake.wait(c) => {}
                            _ = ticker.tick() => {}
                            _ = stop.changed() => break,
                        }
                        if let Err(e) = me.deliver_due(c).await {
                            me.metrics.store_error();
                            warn!(channel = c.as_str(), error = %e, "outbox delivery loop failed; retrying next tick");
                        }
                    }
                })
            })
            .collect();
        for l in loops {
            let _ = l.await;
        }
    }

    /// Delivers every due message of one channel.
    pub async fn deliver_due(&self, channel: Channel) -> Result<(), crate::store::StoreError> {
        loop {
            let now = Utc::now();
            let ids = self.store.due_messages(channel.as_str(), now, 50).await?;
            if ids.is_empty() {
                break;
            }
            let mut progressed = false;
            for id in ids {
                // The lease outlives the request timeout, so nobody else sends it meanwhile.
                let Some(row) = self
                    .store
                    .claim_message(id, &self.replica, Utc::now(), DELIVERY_LEASE)
                    .await?
                else {
                    continue;
                };
                progressed |= self.deliver_one(&row, channel).await?;
            }
            if !progressed {
                break;
            }
        }
        if let Ok(depth) = self.store.outbox_depth().await {
            for c in [Channel::Slack, Channel::PagerDuty, Channel::Statuspage] {
                let n = depth
                    .iter()
                    .find(|(name, _)| name == c.as_str())
                    .map(|(_, n)| *n)
                    .unwrap_or(0);
                self.metrics.set_outbox_depth(c.as_str(), n);
            }
        }
        Ok(())
    }

    /// One attempt at one message; true when it is settled (delivered or failed for good).
    async fn deliver_one(&self, row: &OutboxRow, channel: Channel) -> Result<bool, crate::store::StoreError> {
        let msg: Message = match serde_json::from_str(&row.payload) {
            Ok(m) => m,
            Err(e) => {
                self.store
                    .message_failed(row, &self.replica, &format!("unreadable outbox entry: {e}"), Utc::now())
                    .await?;
                return Ok(true);
            }
        };
        let refs = self.store.refs(&row.incident_id, &row.channel).await?;
        // Sent before if an attempt failed (a timeout may have reached the channel) or a sender
        // died mid-request: look before creating.
        let retried = row.attempts > 0 || row.taken_over;
        // One delivery can be several requests (a Slack root looks for an earlier copy first,
        // page by page): all of them end inside the lease, or another replica could send the
        // message while this one still is. A delivery cut short may have reached the channel;
        // its retry looks before it sends.
        let delivered = tokio::time::timeout(DELIVERY_DEADLINE, self.notifiers.deliver(&msg, &refs, retried))
            .await
            .unwrap_or_else(|_| {
                Err(DeliveryError::Retry {
                    reason: format!(
                        "no answer within {} (the message's delivery lease)",
                        humantime::format_duration(DELIVERY_DEADLINE)
                    ),
                    after: None,
                })
            });
        match delivered {
            Ok(new_refs) => {
                self.store
                    .message_delivered(row, &self.replica, &new_refs, Utc::now())
                    .await?;
                Ok(true)
            }
            Err(DeliveryError::Retry { reason, after }) if row.attempts + 1 < self.retry.max_attempts => {
                self.metrics.outbox_failure(channel.as_str());
                let wait = after.unwrap_or_else(|| self.retry.delay(row.attempts + 1));
                info!(incident = %row.incident_id, channel = channel.as_str(), attempt = row.attempts + 1, retry_in_ms = wait.as_millis() as u64, %reason, "notification not delivered; will retry");
                let next = chrono::Duration::from_std(wait)
                    .ok()
                    .and_then(|d| Utc::now().checked_add_signed(d))
                    .unwrap_or_else(|| Utc::now() + chrono::Duration::seconds(60));
                self.store.message_retry(row, &self.replica, &reason, next).await?;
                Ok(false)
            }
            Err(e) => {
                self.metrics.outbox_failure(channel.as_str());
                warn!(incident = %row.incident_id, channel = channel.as_str(), error = %e, "notification failed for good");
                self.store
                    .message_failed(row, &self.replica, &e.to_string(), Utc::now())
                    .await?;
                Ok(true)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let r = Retry {
            max_attempts: 10,
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        let d1 = r.delay(1);
        let d5 = r.delay(5);
        assert!(
            d1 >= Duration::from_millis(100) && d1 <= Duration::from_millis(200),
            "{d1:?}"
        );
        assert!(d5 >= Duration::from_millis(1600), "{d5:?}");
        assert!(r.delay(30) <= Duration::from_secs(4), "jitter at most doubles the cap");
    }
}
