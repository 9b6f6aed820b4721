use rollback_responder::action::Executors;
use rollback_responder::incident::AuditKind;
use rollback_responder::incident::{Event, IncidentId};
use rollback_responder::store::NewEvent;
use serde_json::{json, Value};

use super::*;
use crate::helpers::*;
use crate::notify::{policy_with_notify, Peers};
use crate::support::alb_fixture::forward;

const DEAD: &str = "replica-dead";

/// An incident whose action a replica (`DEAD`) started and never finished, with the
/// listener already reverted by then; `dead_planned_a_write`: that replica had recorded the
/// plan of its write (its intent) before it died. Returns the app (which takes the work
/// over once the dead replica's lease is found expired) and the incident id.
async fn orphaned_with_listener_reverted(dead_planned_a_write: bool) -> (AlbFixture, Peers, TestApp, IncidentId) {
    let fx = AlbFixture::start().await;
    let peers = Peers::start().await;
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", policy_with_notify(&fx, "manual"))],
        env: peers.env(),
        executors: Some(Executors {
            alb: Some(fx.executor()),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "tk01", &ago(60), None)],
    ))
    .await;
    let list = app
        .wait_incidents("awaiting approval", |l| {
            l.len() == 1 && l[0]["phase"] == "awaiting_approval"
        })
        .await;
    let id = IncidentId(list[0]["id"].as_str().unwrap().to_string());
    // All traffic on stable, by whoever did it.
    fx.elb
        .modify_listener()
        .listener_arn(&fx.listener_arn)
        .default_actions(forward(&[(&fx.stable_tg, 100), (&fx.canary_tg, 0)], Some(300)))
        .send()
        .await
        .expect("ModifyListener");

    // What a replica that died mid-action leaves: approved into `executing`, its lease
    // (already expired), its start mark and, maybe, its write's plan.
    let r = &app.responder;
    let now = chrono::Utc::now();
    let mut tx = r.store.begin().await.unwrap();
    let mut inc = tx.incident(&id).await.unwrap().unwrap();
    r.apply(
        &mut tx,
        &mut inc,
        Event::Approved {
            by: vec!["U0APPROVER".into()],
        },
        "U0APPROVER",
        "approved".into(),
        Value::Null,
        now,
    )
    .await
    .unwrap();
    inc.owner = Some(DEAD.into());
    inc.lease_until = Some(now - chrono::Duration::seconds(1));
    assert!(tx.take_lease(&inc).await.unwrap());
    let event = |kind, summary: &str, detail| NewEvent {
        kind,
        actor: DEAD,
        phase_from: None,
        phase_to: None,
        summary: summary.into(),
        detail,
    };
    tx.append_event(
        &id,
        now,
        event(AuditKind::ActionStarted, "rolling back", json!({"dry_run": false})),
    )
    .await
    .unwrap();
    if dead_planned_a_write {
        tx.append_event(
            &id,
            now,
            event(
                AuditKind::ActionStep,
                "ModifyListener planned",
                json!({"step": "planned", "dry_run": false, "operation": "ModifyListener"}),
            ),
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    (fx, peers, app, id)
}

fn change_events(msgs: &[Value]) -> usize {
    msgs.iter()
        .filter(|m| m["channel"] == "pagerduty" && m["message"]["path"] == "/v2/change/enqueue")
        .count()
}

#[tokio::test]
async fn a_revert_found_after_a_replica_died_before_writing_is_not_counted_as_ours() {
    let (fx, _peers, app, id) = orphaned_with_listener_reverted(false).await;
    let list = app
        .wait_incidents("taken over and settled", |l| l[0]["phase"] == "verified")
        .await;
    assert_eq!(list[0]["executed"], false, "acted_at stays empty: {}", list[0]);
    let inc = app.incident(&id.0).await;
    let done = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "action_succeeded")
        .expect("the takeover's result");
    let summary = done["summary"].as_str().unwrap();
    assert!(
        summary.starts_with(&format!(
            "found already reverted (not by this service) (the interrupted earlier attempt by {DEAD} had not \
                 begun to write): not counted as this incident's rollback; "
        )),
        "{summary}"
    );
    // Nothing written by us, and nobody is told we executed a rollback.
    assert_eq!(weights(&fx.listener_actions().await)[0].1, 100);
    let msgs = app.responder.store.messages(&id).await.unwrap();
    assert_eq!(change_events(&msgs), 0, "{msgs:#?}");
    // The thread says what was found; no channel claims a rollback of ours.
    assert!(
        msgs.iter().any(|m| m["channel"] == "slack"
            && m["message"]["text"]
                .as_str()
                .is_some_and(|t| t.contains("found already reverted (not by this service)"))),
        "{msgs:#?}"
    );
    for m in &msgs {
        let text = m["message"].to_string();
        for claim in [
            "Rollback executed",
            "rolled it back",
            "Executed:* yes",
            "stays rolled back",
        ] {
            assert!(!text.contains(claim), "{claim:?} in {text}");
        }
    }
    let statuspage: Vec<&Value> = msgs.iter().filter(|m| m["channel"] == "statuspage").collect();
    assert_eq!(
        statuspage[0]["message"]["body"]["incident"]["status"], "investigating",
        "{statuspage:#?}"
    );
}

#[tokio::test]
async fn a_revert_found_after_a_replica_died_mid_write_is_counted_as_ours() {
    let (_fx, _peers, app, id) = orphaned_with_listener_reverted(true).await;
    let list = app
        .wait_incidents("taken over and settled", |l| l[0]["phase"] == "verified")
        .await;
    assert_eq!(list[0]["executed"], true, "{}", list[0]);
    let inc = app.incident(&id.0).await;
    let done = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "action_succeeded")
        .expect("the takeover's result");
    assert!(
        done["summary"].as_str().unwrap().starts_with(&format!(
            "found already reverted, most likely by the interrupted earlier attempt of {DEAD}, which had begun \
                 to write it: counted as this incident's rollback"
        )),
        "{done}"
    );
    let msgs = app.responder.store.messages(&id).await.unwrap();
    assert_eq!(change_events(&msgs), 1, "{msgs:#?}");
}
