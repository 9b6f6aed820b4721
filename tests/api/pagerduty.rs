//! PagerDuty webhooks: signed, deduplicated by their event id, and each one's change made
//! once. The receipt of a webhook is committed with the change it made, so a delivery answered
//! 5xx (whatever failed) leaves nothing behind and its redelivery is processed, and two copies
//! processed at the same moment change the incident once.

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::approvals::{command, world, PD_ACTION_TOKEN, PD_SECRET};
use crate::helpers::*;

pub(crate) fn pd_sign(secret: &str, body: &str) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    m.update(body.as_bytes());
    format!("v1={}", hex::encode(m.finalize().into_bytes()))
}

pub(crate) async fn pd_post(app: &TestApp, webhook_id: &str, body: &Value, secret: &str) -> reqwest::Response {
    let text = body.to_string();
    app.http
        .post(app.url("/pagerduty/webhook"))
        .header("content-type", "application/json")
        .header("x-webhook-id", webhook_id)
        .header(
            "x-pagerduty-signature",
            format!("v1=deadbeef,{}", pd_sign(secret, &text)),
        )
        .body(text)
        .send()
        .await
        .unwrap()
}

pub(crate) fn pd_event(kind: &str, agent: &str, data: Value) -> Value {
    json!({"event": {"id": uuid::Uuid::now_v7().to_string(), "event_type": kind, "resource_type": "incident",
        "occurred_at": chrono::Utc::now().to_rfc3339(), "agent": {"id": agent, "type": "user_reference", "summary": "On Call"},
        "client": null, "data": data}})
}

#[tokio::test]
async fn pagerduty_webhooks_are_signed_deduplicated_and_recorded() {
    let w = world(1, "1h").await;
    let id = w.pending("ei01").await;
    let triggered = pd_event(
        "incident.triggered",
        "P0SYSTEM",
        json!({"id": "Q0PDINC", "type": "incident", "incident_key": format!("rollback-responder/{id}"), "status": "triggered"}),
    );
    assert_eq!(pd_post(&w.app, "wh-1", &triggered, "wrong").await.status(), 401);
    let r: Value = pd_post(&w.app, "wh-1", &triggered, PD_SECRET)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["status"], "ignored", "triggered only links the incidents: {r}");
    let ack = pd_event(
        "incident.acknowledged",
        "P0ONCALL",
        json!({"id": "Q0PDINC", "type": "incident", "status": "acknowledged"}),
    );
    // The old secret of a rotation still verifies.
    let r: Value = pd_post(&w.app, "wh-2", &ack, "old-secret").await.json().await.unwrap();
    assert_eq!(r["status"], "recorded");
    let r: Value = pd_post(&w.app, "wh-2", &ack, PD_SECRET).await.json().await.unwrap();
    assert_eq!(r["status"], "duplicate");
    let inc = w.app.incident(&id).await;
    let acks: Vec<&Value> = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "pagerduty_acknowledged")
        .collect();
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0]["summary"], "PagerDuty: acknowledged by On Call");
    // A note from someone who is not an approver changes nothing.
    let note = pd_event(
        "incident.annotated",
        "P0RANDOM",
        json!({"type": "incident_note", "id": "N1", "content": "rollback approve", "incident": {"id": "Q0PDINC", "type": "incident_reference"}}),
    );
    let r: Value = pd_post(&w.app, "wh-3", &note, PD_SECRET).await.json().await.unwrap();
    assert_eq!(r["status"], "refused");
    assert_eq!(w.phase(&id).await, "awaiting_approval");
    // The workflow action needs its bearer token.
    let body = json!({"action": "approve", "incident_id": "Q0PDINC", "user_id": "P0ONCALL"});
    let r = w
        .app
        .http
        .post(w.app.url("/pagerduty/action"))
        .bearer_auth("wrong")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = w
        .app
        .http
        .post(w.app.url("/pagerduty/action"))
        .bearer_auth(PD_ACTION_TOKEN)
        .json(&json!({"action": "approve", "incident_id": "Q0PDINC", "user_id": "P0NOBODY"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = w
        .app
        .http
        .post(w.app.url("/pagerduty/action"))
        .bearer_auth(PD_ACTION_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "approved");
    assert_eq!(v["by"], json!(["pagerduty:P0ONCALL"]));
    w.app.wait_incidents("verified", |l| l[0]["phase"] == "verified").await;
    assert_eq!(w.alb().await, w.rolled_back_once());
}

async fn pd_post_raw(app: &TestApp, webhook_id: &str, text: &str) -> reqwest::Response {
    app.http
        .post(app.url("/pagerduty/webhook"))
        .header("content-type", "application/json")
        .header("x-webhook-id", webhook_id)
        .header("x-pagerduty-signature", pd_sign(PD_SECRET, text))
        .body(text.to_string())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_captured_pagerduty_webhook_resent_with_a_fresh_webhook_id_is_a_duplicate() {
    let w = world(1, "1h").await;
    let id = w.pending("ei02").await;
    let triggered = pd_event(
        "incident.triggered",
        "P0SYSTEM",
        json!({"id": "Q0REPLAY", "type": "incident", "incident_key": format!("rollback-responder/{id}")}),
    );
    pd_post(&w.app, "link-1", &triggered, PD_SECRET).await;
    let ack = pd_event(
        "incident.acknowledged",
        "P0ONCALL",
        json!({"id": "Q0REPLAY", "type": "incident", "status": "acknowledged"}),
    )
    .to_string();
    let r: Value = pd_post_raw(&w.app, "wh-original", &ack).await.json().await.unwrap();
    assert_eq!(r["status"], "recorded");
    // X-Webhook-Id is not signed: the same signed body under a new one is the same event.
    let r: Value = pd_post_raw(&w.app, "wh-forged", &ack).await.json().await.unwrap();
    assert_eq!(r["status"], "duplicate");
    assert_eq!(timeline_count(&w.app.incident(&id).await, "pagerduty_acknowledged"), 1);
}

#[tokio::test]
async fn a_pagerduty_vote_that_failed_with_503_is_processed_on_redelivery() {
    let w = world(1, "1h").await;
    let id = w.pending("ei03").await;
    let triggered = pd_event(
        "incident.triggered",
        "P0SYSTEM",
        json!({"id": "Q0RETRY", "type": "incident", "incident_key": format!("rollback-responder/{id}")}),
    );
    pd_post(&w.app, "link-2", &triggered, PD_SECRET).await;
    let deny = pd_event(
        "incident.annotated",
        "P0ONCALL",
        json!({"type": "incident_note", "id": "N2", "content": "rollback deny not now", "incident": {"id": "Q0RETRY"}}),
    )
    .to_string();
    refuse(&w.app, "INSERT", "approvals", true).await;
    let r = pd_post_raw(&w.app, "wh-deny", &deny).await;
    assert_eq!(r.status(), 503, "the vote's store error is transient");
    refuse(&w.app, "INSERT", "approvals", false).await;
    assert_eq!(w.phase(&id).await, "awaiting_approval");
    // PagerDuty redelivers the same delivery: it is processed, not answered "duplicate".
    let r: Value = pd_post_raw(&w.app, "wh-deny", &deny).await.json().await.unwrap();
    assert_eq!(r["status"], "denied", "{r}");
    assert_eq!(w.phase(&id).await, "denied");
    let r: Value = pd_post_raw(&w.app, "wh-deny", &deny).await.json().await.unwrap();
    assert_eq!(r["status"], "duplicate");
    assert_eq!(timeline_count(&w.app.incident(&id).await, "denied"), 1);
    w.slack_says("`awaiting_approval` → `denied`").await;
    assert_eq!(w.alb().await, w.untouched());
}

/// Makes every `op` (INSERT, DELETE) on `table` fail, through a connection of the test's own:
/// the store erroring inside a transaction (as a full disk does). `false` removes it again.
async fn refuse(app: &TestApp, op: &str, table: &str, on: bool) {
    sqlx::any::install_default_drivers();
    let mut c = <sqlx::AnyConnection as sqlx::Connection>::connect(&app.db.url)
        .await
        .unwrap();
    let name = format!("test_refuse_{}_{table}", op.to_lowercase());
    let sql: Vec<String> = match (app.db.url.starts_with("postgres"), on) {
        (false, true) => vec![format!(
            "CREATE TRIGGER {name} BEFORE {op} ON {table} BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        )],
        (false, false) => vec![format!("DROP TRIGGER {name}")],
        (true, true) => vec![
            format!("CREATE FUNCTION {name}() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$ LANGUAGE plpgsql"),
            format!("CREATE TRIGGER {name} BEFORE {op} ON {table} FOR EACH ROW EXECUTE FUNCTION {name}()"),
        ],
        (true, false) => vec![format!("DROP TRIGGER {name} ON {table}"), format!("DROP FUNCTION {name}()")],
    };
    for s in sql {
        sqlx::query(&s).execute(&mut c).await.unwrap();
    }
}

/// A PagerDuty incident linked to rollback incident `id`, for the notes and acks below.
async fn linked(w: &crate::approvals::World, id: &str, pd: &str) {
    let triggered = pd_event(
        "incident.triggered",
        "P0SYSTEM",
        json!({"id": pd, "type": "incident", "incident_key": format!("rollback-responder/{id}")}),
    );
    assert_eq!(pd_post(&w.app, "link", &triggered, PD_SECRET).await.status(), 200);
}

/// An escalated incident has two PagerDuty incidents: the first page's (key
/// `rollback-responder/<id>`) and the escalation's (`.../escalation`). A note on either is a
/// vote on ours, whichever PagerDuty told us of last. Before, one link per incident was kept
/// and overwritten, so the escalation's trigger unlinked the first page, and a deny noted there
/// was answered "ignored", its receipt kept, and lost.
#[tokio::test]
async fn a_note_on_the_first_page_still_counts_once_the_escalation_page_is_linked() {
    let w = world(1, "1h").await;
    let id = w.pending("er04").await;
    linked(&w, &id, "Q0FIRST").await;
    let escalation = pd_event(
        "incident.triggered",
        "P0SYSTEM",
        json!({"id": "Q0ESC", "type": "incident", "incident_key": format!("rollback-responder/{id}/escalation")}),
    );
    assert_eq!(pd_post(&w.app, "esc", &escalation, PD_SECRET).await.status(), 200);
    let deny = pd_event(
        "incident.annotated",
        "P0ONCALL",
        json!({"type": "incident_note", "id": "N5", "content": "rollback deny not the release", "incident": {"id": "Q0FIRST"}}),
    );
    let r: Value = pd_post(&w.app, "wh-first", &deny, PD_SECRET)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["status"], "denied", "{r}");
    assert_eq!(w.phase(&id).await, "denied");
    // And the escalation's page is ours too: a second deny there is refused (already
    // denied), not ignored as "not an incident of this responder".
    let again = pd_event(
        "incident.annotated",
        "P0ONCALL",
        json!({"type": "incident_note", "id": "N6", "content": "rollback deny", "incident": {"id": "Q0ESC"}}),
    );
    let r: Value = pd_post(&w.app, "wh-esc", &again, PD_SECRET).await.json().await.unwrap();
    assert_ne!(r["status"], "ignored", "{r}");
    assert_eq!(w.phase(&id).await, "denied");
    assert_eq!(w.alb().await, w.untouched());
}

/// Where nothing can be undone after a failure (a full disk refuses the delete too), a failed
/// delivery must still not be remembered as seen: its receipt is committed with the change or
/// not at all. Before, the receipt was its own commit, forgotten after a 503 by a delete that
/// could fail in turn, and the redelivery of a deny was then answered "duplicate" and lost.
#[tokio::test]
async fn a_failed_pagerduty_delivery_leaves_no_receipt_even_where_nothing_can_be_undone() {
    let w = world(1, "1h").await;
    let id = w.pending("er01").await;
    linked(&w, &id, "Q0NOUNDO").await;
    let deny = pd_event(
        "incident.annotated",
        "P0ONCALL",
        json!({"type": "incident_note", "id": "N3", "content": "rollback deny flaky canary", "incident": {"id": "Q0NOUNDO"}}),
    )
    .to_string();
    let ack = pd_event(
        "incident.acknowledged",
        "P0ONCALL",
        json!({"id": "Q0NOUNDO", "type": "incident", "status": "acknowledged"}),
    )
    .to_string();
    refuse(&w.app, "DELETE", "webhook_receipts", true).await;
    refuse(&w.app, "INSERT", "approvals", true).await;
    refuse(&w.app, "INSERT", "incident_events", true).await;
    assert_eq!(pd_post_raw(&w.app, "wh-deny", &deny).await.status(), 503);
    assert_eq!(pd_post_raw(&w.app, "wh-ack", &ack).await.status(), 503);
    refuse(&w.app, "INSERT", "approvals", false).await;
    refuse(&w.app, "INSERT", "incident_events", false).await;
    assert_eq!(w.phase(&id).await, "awaiting_approval");
    let r: Value = pd_post_raw(&w.app, "wh-deny", &deny).await.json().await.unwrap();
    assert_eq!(r["status"], "denied", "the redelivered deny is processed: {r}");
    let r: Value = pd_post_raw(&w.app, "wh-ack", &ack).await.json().await.unwrap();
    assert_eq!(
        r["status"], "recorded",
        "the redelivered acknowledgement is processed: {r}"
    );
    for body in [&deny, &ack] {
        let r: Value = pd_post_raw(&w.app, "wh-again", body).await.json().await.unwrap();
        assert_eq!(r["status"], "duplicate", "{r}");
    }
    let inc = w.app.incident(&id).await;
    assert_eq!(w.phase(&id).await, "denied");
    assert_eq!(timeline_count(&inc, "denied"), 1);
    assert_eq!(timeline_count(&inc, "pagerduty_acknowledged"), 1);
    assert_eq!(w.alb().await, w.untouched());
}

/// PagerDuty retries a delivery it has no answer for yet, so two copies of one event can be
/// processed at the same moment (on PostgreSQL, by two replicas or two connections): the
/// incident changes once, and the other copy is answered "duplicate", whichever wins.
#[tokio::test]
async fn copies_of_one_pagerduty_event_processed_at_the_same_moment_change_the_incident_once() {
    let w = world(1, "1h").await;
    let id = w.pending("er02").await;
    linked(&w, &id, "Q0TWICE").await;
    for (n, body) in [
        pd_event(
            "incident.acknowledged",
            "P0ONCALL",
            json!({"id": "Q0TWICE", "type": "incident", "status": "acknowledged"}),
        ),
        pd_event(
            "incident.annotated",
            "P0ONCALL",
            json!({"type": "incident_note", "id": "N4", "content": "rollback deny", "incident": {"id": "Q0TWICE"}}),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let text = body.to_string();
        let copies = futures::future::join_all((0..4).map(|i| {
            let (app, text) = (&w.app, &text);
            async move {
                let r = pd_post_raw(app, &format!("wh-{n}-{i}"), text).await;
                assert_eq!(r.status(), 200);
                r.json::<Value>().await.unwrap()["status"].as_str().unwrap().to_string()
            }
        }))
        .await;
        let done = copies.iter().filter(|s| *s != "duplicate").count();
        assert_eq!(done, 1, "one copy processed, the others duplicates: {copies:?}");
    }
    let inc = w.app.incident(&id).await;
    assert_eq!(timeline_count(&inc, "pagerduty_acknowledged"), 1);
    assert_eq!(timeline_count(&inc, "denied"), 1);
    assert_eq!(w.phase(&id).await, "denied");
}

/// A delivery that changed nothing (a refused vote, an ignored note) is remembered all the
/// same: its signed body, replayed later (by anyone who captured it), is a duplicate, never a
/// vote counted once the incident has moved on to where it would act.
#[tokio::test]
async fn a_refused_or_ignored_pagerduty_delivery_replayed_later_is_a_duplicate() {
    let w = world(1, "1h").await;
    let id = w.pending("er03").await;
    linked(&w, &id, "Q0REFUSED").await;
    let said = command(&w.app, "U0APPROVER", &format!("deny {id} not now")).await;
    assert!(said.contains("Denied"), "{said}");
    let note = |n: &str, content: &str| {
        pd_event(
            "incident.annotated",
            "P0ONCALL",
            json!({"type": "incident_note", "id": n, "content": content, "incident": {"id": "Q0REFUSED"}}),
        )
        .to_string()
    };
    let (deny, chatter) = (note("N5", "rollback deny"), note("N6", "looking into it"));
    let r: Value = pd_post_raw(&w.app, "wh-1", &deny).await.json().await.unwrap();
    assert_eq!(r["status"], "refused", "a second deny of a denied incident: {r}");
    let r: Value = pd_post_raw(&w.app, "wh-2", &chatter).await.json().await.unwrap();
    assert_eq!(r["status"], "ignored", "{r}");
    for body in [&deny, &chatter] {
        let r: Value = pd_post_raw(&w.app, "wh-replay", body).await.json().await.unwrap();
        assert_eq!(r["status"], "duplicate", "{r}");
    }
    assert_eq!(w.phase(&id).await, "denied");
    assert_eq!(timeline_count(&w.app.incident(&id).await, "denied"), 1);
}
