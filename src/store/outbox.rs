//! The `outbox` and `notification_refs` tables: messages queued in the transaction of the
//! change that caused them, claimed (leased) and settled by the delivery workers, and the
//! handles a channel returned (Slack channel and ts, the PagerDuty or Statuspage incident).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::Row;

use super::{could_be_stored, lease_end, ms, storable, Result, Store, StoreError, StoreTx};
use super::{events, NewEvent};
use crate::incident::{AuditKind, IncidentId};

/// A notification claimed for delivery.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub incident_id: IncidentId,
    pub channel: String,
    pub payload: String,
    pub attempts: u32,
    /// Claimed from a sender whose lease ran out before it settled the message (it died
    /// mid-request, maybe after the channel got it).
    pub taken_over: bool,
}

impl Store {
    /// Pending notifications whose time has come, only the oldest per (incident, channel) so
    /// that a thread reply never overtakes the message it replies to.
    pub async fn due_messages(&self, channel: &str, now: DateTime<Utc>, limit: i64) -> Result<Vec<i64>> {
        let rows = sqlx::query(
            "SELECT o.id FROM outbox o
             WHERE o.channel = $1 AND o.state = 'pending' AND o.next_attempt_at <= $2
               AND (o.owner IS NULL OR o.lease_until < $2)
               AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.incident_id = o.incident_id AND p.channel = o.channel
                                 AND p.state = 'pending' AND p.id < o.id)
             ORDER BY o.id LIMIT $3",
        )
        .bind(channel)
        .bind(ms(now))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| r.try_get::<i64, _>(0).map_err(StoreError::from))
            .collect()
    }

    /// Claims one notification for delivery; `None` if another replica holds it or it is done.
    pub async fn claim_message(
        &self,
        id: i64,
        owner: &str,
        now: DateTime<Utc>,
        lease: Duration,
    ) -> Result<Option<OutboxRow>> {
        let until = ms(lease_end(now, lease));
        // An owner is cleared whenever a sender settles or reschedules the message; one still
        // set when its lease has run out is a sender that died mid-request.
        let previous: Option<String> = sqlx::query("SELECT owner FROM outbox WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| r.try_get::<Option<String>, _>(0))
            .transpose()?
            .flatten();
        let r = sqlx::query(
            "UPDATE outbox SET owner = $1, lease_until = $2 WHERE id = $3 AND state = 'pending' AND (owner IS NULL OR lease_until < $4)",
        )
        .bind(owner)
        .bind(until)
        .bind(id)
        .bind(ms(now))
        .execute(&self.pool)
        .await?;
        self.durable().await?;
        if r.rows_affected() == 0 {
            return Ok(None);
        }
        let row = sqlx::query("SELECT id, incident_id, channel, payload, attempts FROM outbox WHERE id = $1")
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
        Ok(Some(OutboxRow {
            id: row.try_get("id")?,
            incident_id: IncidentId(row.try_get("incident_id")?),
            channel: row.try_get("channel")?,
            payload: row.try_get("payload")?,
            attempts: row.try_get::<i64, _>("attempts")? as u32,
            taken_over: previous.is_some(),
        }))
    }

    /// Marks a notification delivered and keeps the handles it returned, together.
    pub async fn message_delivered(
        &self,
        row: &OutboxRow,
        owner: &str,
        refs: &[(String, String)],
        now: DateTime<Utc>,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE outbox SET state = 'delivered', delivered_at = $1, attempts = attempts + 1, owner = NULL, lease_until = NULL WHERE id = $2 AND owner = $3")
            .bind(ms(now))
            .bind(row.id)
            .bind(owner)
            .execute(&mut *tx)
            .await?;
        for (k, v) in refs {
            sqlx::query(
                "INSERT INTO notification_refs (incident_id, channel, ref_key, value) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (incident_id, channel, ref_key) DO UPDATE SET value = excluded.value",
            )
            .bind(&row.incident_id.0)
            .bind(&row.channel)
            .bind(k)
            .bind(v)
            .execute(&mut *tx)
            .await?;
        }
        self.commit_durably(tx).await
    }

    /// Schedules another attempt.
    pub async fn message_retry(&self, row: &OutboxRow, owner: &str, error: &str, next: DateTime<Utc>) -> Result<()> {
        sqlx::query("UPDATE outbox SET attempts = attempts + 1, next_attempt_at = $1, last_error = $2, owner = NULL, lease_until = NULL WHERE id = $3 AND owner = $4")
            .bind(ms(next))
            .bind(error)
            .bind(row.id)
            .bind(owner)
            .execute(&self.pool)
            .await?;
        self.durable().await?;
        Ok(())
    }

    /// Gives up on a notification and says so in the incident's timeline.
    pub async fn message_failed(&self, row: &OutboxRow, owner: &str, error: &str, now: DateTime<Utc>) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query("UPDATE outbox SET state = 'failed', attempts = attempts + 1, last_error = $1, owner = NULL, lease_until = NULL WHERE id = $2 AND owner = $3")
            .bind(error)
            .bind(row.id)
            .bind(owner)
            .execute(&mut *tx)
            .await?;
        if r.rows_affected() == 1 {
            let entry = NewEvent {
                kind: AuditKind::NotificationFailed,
                actor: "rollback-responder",
                phase_from: None,
                phase_to: None,
                summary: format!(
                    "{} notification failed for good after {} attempt(s): {error}",
                    row.channel,
                    row.attempts + 1
                ),
                detail: serde_json::json!({ "channel": row.channel, "error": error, "message": serde_json::from_str::<Value>(&row.payload).unwrap_or(Value::Null) }),
            };
            events::insert(&mut *tx, &row.incident_id, now, &entry).await?;
        }
        self.commit_durably(tx).await
    }

    /// Pending notifications per channel (the outbox depth).
    pub async fn outbox_depth(&self) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query("SELECT channel, COUNT(*) FROM outbox WHERE state = 'pending' GROUP BY channel")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<i64, _>(1)?)))
            .collect()
    }

    /// Every notification of an incident, oldest first (API and tests).
    pub async fn messages(&self, incident: &IncidentId) -> Result<Vec<Value>> {
        let rows = sqlx::query(
            "SELECT id, channel, payload, state, attempts, last_error FROM outbox WHERE incident_id = $1 ORDER BY id",
        )
        .bind(&incident.0)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(serde_json::json!({
                    "id": r.try_get::<i64, _>("id")?,
                    "channel": r.try_get::<String, _>("channel")?,
                    "message": serde_json::from_str::<Value>(&r.try_get::<String, _>("payload")?).unwrap_or(Value::Null),
                    "state": r.try_get::<String, _>("state")?,
                    "attempts": r.try_get::<i64, _>("attempts")?,
                    "last_error": r.try_get::<Option<String>, _>("last_error")?,
                }))
            })
            .collect()
    }

    /// The handles stored for an incident's channel (Slack channel and ts, Statuspage id).
    pub async fn refs(
        &self,
        incident: &IncidentId,
        channel: &str,
    ) -> Result<std::collections::BTreeMap<String, String>> {
        let rows = sqlx::query("SELECT ref_key, value FROM notification_refs WHERE incident_id = $1 AND channel = $2")
            .bind(&incident.0)
            .bind(channel)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<String, _>(1)?)))
            .collect()
    }

    /// Stores a handle for an incident's channel (e.g. the PagerDuty incident id).
    pub async fn set_ref(&self, incident: &IncidentId, channel: &str, key: &str, value: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO notification_refs (incident_id, channel, ref_key, value) VALUES ($1, $2, $3, $4)
             ON CONFLICT (incident_id, channel, ref_key) DO UPDATE SET value = excluded.value",
        )
        .bind(&incident.0)
        .bind(channel)
        .bind(key)
        .bind(storable(value))
        .execute(&self.pool)
        .await?;
        self.durable().await?;
        Ok(())
    }

    /// The incident a handle belongs to (e.g. which of ours a PagerDuty incident id is).
    pub async fn incident_by_ref(&self, channel: &str, key: &str, value: &str) -> Result<Option<IncidentId>> {
        if !could_be_stored(value) {
            return Ok(None);
        }
        let row =
            sqlx::query("SELECT incident_id FROM notification_refs WHERE channel = $1 AND ref_key = $2 AND value = $3")
                .bind(channel)
                .bind(key)
                .bind(value)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|r| r.try_get::<String, _>(0)).transpose()?.map(IncidentId))
    }
}

impl StoreTx {
    /// The payloads of every notification queued for an incident's channel, oldest first,
    /// whatever their state (those this transaction queued included).
    pub async fn queued_payloads(&mut self, incident: &IncidentId, channel: &str) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT payload FROM outbox WHERE incident_id = $1 AND channel = $2 ORDER BY id")
            .bind(&incident.0)
            .bind(channel)
            .fetch_all(self.db().await?)
            .await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>(0).map_err(StoreError::from))
            .collect()
    }

    /// Queues a notification for delivery; it commits (or not) with the change that caused it.
    pub async fn enqueue(
        &mut self,
        incident: &IncidentId,
        channel: &str,
        payload: &str,
        now: DateTime<Utc>,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO outbox (incident_id, channel, payload, state, attempts, next_attempt_at, created_at)
             VALUES ($1, $2, $3, 'pending', 0, $4, $4)",
        )
        .bind(&incident.0)
        .bind(channel)
        .bind(payload)
        .bind(ms(now))
        .execute(self.db().await?)
        .await?;
        if !self.queued.iter().any(|c| c == channel) {
            self.queued.push(channel.to_string());
        }
        Ok(())
    }
}
