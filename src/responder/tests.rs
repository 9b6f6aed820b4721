//! The responder driven by a clock set by hand, on a SQLite store of its own.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::*;
use crate::action::Executors;
use crate::alert::Notification;
use crate::policy::{GlobalGuards, PolicySet};

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

pub(super) async fn responder(clock: Clock) -> (tempfile::TempDir, Responder) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("r.db").display());
    let store = Store::connect(&url, 1).await.unwrap();
    (dir, responder_on(store, clock))
}

/// A dry-run responder with one minimal policy on `store`.
pub(crate) fn responder_on(store: Store, clock: Clock) -> Responder {
    let set = PolicySet::from_sources(
        Path::new("p"),
        vec![(PathBuf::from("p/web.yaml"), crate::policy::tests::MINIMAL.into())],
    )
    .unwrap();
    let global = GlobalGuards {
        dry_run: true,
        max_rollbacks: None,
    };
    Responder::new(
        store,
        set,
        global,
        Executors::default(),
        "replica-a".into(),
        Duration::from_secs(30),
        Arc::new(Metrics::new()),
    )
    .with_clock(clock)
}

/// A trigger's `for` runs on the responder's clock: an alert too young is decided again when
/// that clock reaches its due time, not a moment before, with no waiting in the test.
#[tokio::test]
async fn a_waiting_incident_is_decided_again_when_the_clock_reaches_its_due_time() {
    let clock = Clock::manual(at("2026-11-30T10:01:00Z"));
    let (_dir, r) = responder(clock.clone()).await;
    let delivery: Notification = serde_json::from_str(
        r#"{"version":"4","status":"firing","receiver":"rr","groupKey":"{}:{alertname=\"HighErrorRate\"}",
            "groupLabels":{},"commonLabels":{},"commonAnnotations":{},"externalURL":"http://am",
            "alerts":[{"status":"firing","labels":{"alertname":"HighErrorRate","service":"web"},"annotations":{},
            "startsAt":"2026-11-30T10:00:00Z","endsAt":"0001-01-01T00:00:00Z","generatorURL":"","fingerprint":"a1b2c3d4e5f60701"}]}"#,
    )
    .unwrap();
    r.store.ingest(&delivery, clock.now()).await.unwrap();
    r.process_pending(10).await.unwrap();
    let inc = r.store.incidents(false, 10).await.unwrap().remove(0);
    assert_eq!(inc.phase, Phase::Waiting, "firing for 1m of 5m");
    assert_eq!(inc.due_at, Some(at("2026-11-30T10:05:00Z")));
    assert_eq!(
        inc.opened_at,
        at("2026-11-30T10:01:00Z"),
        "opened on the responder's clock"
    );

    clock.set(at("2026-11-30T10:04:59Z"));
    assert!(r.run_due().await.unwrap().is_empty());
    assert_eq!(r.store.incident(&inc.id).await.unwrap().unwrap().phase, Phase::Waiting);

    clock.set(at("2026-11-30T10:05:00Z"));
    assert_eq!(r.run_due().await.unwrap(), vec![inc.id.clone()]);
    let now = r.store.incident(&inc.id).await.unwrap().unwrap();
    assert_eq!(now.phase, Phase::Executing);
    assert_eq!(now.updated_at, at("2026-11-30T10:05:00Z"));
}

/// A delivery of one firing HighErrorRate alert for `web` with this fingerprint.
fn firing(fingerprint: &str) -> Notification {
    serde_json::from_str(&format!(
        r#"{{"version":"4","status":"firing","receiver":"rr","groupKey":"{{}}:{{alertname=\"HighErrorRate\"}}",
            "groupLabels":{{}},"commonLabels":{{}},"commonAnnotations":{{}},"externalURL":"http://am",
            "alerts":[{{"status":"firing","labels":{{"alertname":"HighErrorRate","service":"web"}},"annotations":{{}},
            "startsAt":"2026-11-30T10:00:00Z","endsAt":"0001-01-01T00:00:00Z","generatorURL":"","fingerprint":"{fingerprint}"}}]}}"#
    ))
    .unwrap()
}

/// The open incident a batch kept for the next one is used only while the store still has it
/// open at that version: once another writer (a replica, a person) closed it, the next alert
/// for the target opens a new incident instead of joining the closed one; and a change made
/// meanwhile is read, not overwritten with the kept copy.
#[tokio::test]
async fn a_kept_incident_closed_or_changed_elsewhere_is_not_joined_as_kept() {
    let clock = Clock::manual(at("2026-11-30T10:01:00Z"));
    let (_dir, r) = responder(clock.clone()).await;
    r.store.ingest(&firing("a1b2c3d4e5f60701"), clock.now()).await.unwrap();
    r.process_pending(10).await.unwrap();
    r.store.ingest(&firing("a1b2c3d4e5f60702"), clock.now()).await.unwrap();
    r.process_pending(10).await.unwrap();
    let first = r.store.incidents(false, 10).await.unwrap().remove(0);
    assert_eq!(
        r.store.incident_alerts(&first.id).await.unwrap().len(),
        2,
        "the second alert joined"
    );
    assert!(
        r.open_incidents.lock().unwrap().values().any(|i| i.id == first.id),
        "kept for the next batch"
    );

    // Changed elsewhere (a later due time): the next join sees the store's version.
    let mut changed = first.clone();
    changed.due_at = Some(at("2026-11-30T10:09:00Z"));
    let mut tx = r.store.begin().await.unwrap();
    assert!(tx.save_incident(&changed).await.unwrap());
    tx.commit().await.unwrap();
    r.store.ingest(&firing("a1b2c3d4e5f60703"), clock.now()).await.unwrap();
    r.process_pending(10).await.unwrap();
    assert_eq!(
        r.store.incident_alerts(&first.id).await.unwrap().len(),
        3,
        "the third alert joined"
    );
    let stored = r.store.incident(&first.id).await.unwrap().unwrap();
    assert!(
        stored.version > first.version,
        "the change elsewhere was kept, not overwritten"
    );
    let kept = r
        .open_incidents
        .lock()
        .unwrap()
        .values()
        .find(|i| i.id == first.id)
        .cloned();
    if let Some(kept) = kept {
        assert_eq!(kept.version, stored.version, "a copy kept is the store's");
    }

    // Closed elsewhere: a new alert opens a new incident.
    let mut closed = r.store.incident(&first.id).await.unwrap().unwrap();
    closed.closed_at = Some(clock.now());
    let mut tx = r.store.begin().await.unwrap();
    assert!(tx.save_incident(&closed).await.unwrap());
    tx.commit().await.unwrap();
    r.store.ingest(&firing("a1b2c3d4e5f60704"), clock.now()).await.unwrap();
    r.process_pending(10).await.unwrap();
    let all = r.store.incidents(false, 10).await.unwrap();
    assert_eq!(all.len(), 2, "{all:#?}");
    let second = all.iter().find(|i| i.id != first.id).unwrap();
    assert_eq!(r.store.incident_alerts(&first.id).await.unwrap().len(), 3);
    assert_eq!(
        r.store.incident_alerts(&second.id).await.unwrap().len(),
        1,
        "the fourth alert opened its own"
    );
}

/// Incidents held with a due time (a cooldown, a rate limit) for `run_due` to look at, on
/// targets of their own, due at `due`.
async fn held_incidents(r: &Responder, n: usize, due: DateTime<Utc>) -> Vec<IncidentId> {
    let mut tx = r.store.begin().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..n {
        let mut inc = Incident::sample(Phase::Suppressed, due);
        inc.target_key = format!("alb:listener/held-{i}");
        inc.due_at = Some(due);
        inc.context = serde_json::to_value(notify::Context::default()).unwrap();
        tx.insert_incident(&inc).await.unwrap();
        ids.push(inc.id);
    }
    tx.commit().await.unwrap();
    ids
}

/// A person closing a held incident ends its due time with it: more closed incidents than one
/// round takes, all due before an open incident, neither come back nor keep that one waiting.
#[tokio::test]
async fn incidents_closed_by_a_person_are_not_due_and_do_not_hold_up_due_work() {
    let clock = Clock::manual(at("2026-11-30T10:01:00Z"));
    let (_dir, r) = responder(clock.clone()).await;
    let held = held_incidents(&r, 101, at("2026-11-30T10:02:00Z")).await;
    for id in &held {
        let closed = r.close_by_human(id, "alice", "fixed by hand").await.unwrap();
        assert!(matches!(closed, HumanClose::Closed { .. }), "{closed:?}");
    }
    r.store.ingest(&firing("a1b2c3d4e5f60701"), clock.now()).await.unwrap();
    r.process_pending(10).await.unwrap();
    let waiting = r.store.incidents(true, 10).await.unwrap().remove(0);
    assert_eq!(waiting.phase, Phase::Waiting);

    clock.set(at("2026-11-30T10:05:00Z"));
    assert_eq!(r.run_due().await.unwrap(), vec![waiting.id.clone()]);
    assert_eq!(
        r.store.incident(&waiting.id).await.unwrap().unwrap().phase,
        Phase::Executing
    );
    for id in &held {
        let inc = r.store.incident(id).await.unwrap().unwrap();
        assert_eq!(inc.due_at, None, "closed, nothing is due");
    }
}

/// One due incident that cannot be decided again (its stored row is unreadable) is skipped:
/// the incidents due after it in the same round are still decided.
#[tokio::test]
async fn an_unreadable_due_incident_does_not_hold_up_the_others() {
    use sqlx::Connection;
    let clock = Clock::manual(at("2026-11-30T10:01:00Z"));
    let (dir, r) = responder(clock.clone()).await;
    let broken = held_incidents(&r, 1, at("2026-11-30T10:02:00Z")).await.remove(0);
    r.store.ingest(&firing("a1b2c3d4e5f60701"), clock.now()).await.unwrap();
    r.process_pending(10).await.unwrap();
    let waiting = r
        .store
        .incidents(true, 10)
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.id != broken)
        .unwrap();
    let url = format!("sqlite://{}", dir.path().join("r.db").display());
    let mut outside = sqlx::AnyConnection::connect(&url).await.unwrap();
    sqlx::query("UPDATE incidents SET decision = '{not json' WHERE id = $1")
        .bind(&broken.0)
        .execute(&mut outside)
        .await
        .unwrap();
    outside.close().await.unwrap();

    clock.set(at("2026-11-30T10:05:00Z"));
    assert_eq!(r.run_due().await.unwrap(), vec![waiting.id.clone()]);
    assert_eq!(
        r.store.incident(&waiting.id).await.unwrap().unwrap().phase,
        Phase::Executing
    );
    assert!(
        r.metrics.render().contains("rollback_responder_store_errors_total 1\n"),
        "the skipped one is counted"
    );
}

/// A person's `/rollback now` under a two-person rule waits for a second approver although no
/// alert fires for it: deciding what waits again (a start, a policy reload) leaves it waiting
/// with its own expiry, and it escalates when that comes, as its policy says.
#[tokio::test]
async fn a_persons_request_decided_again_keeps_waiting_for_its_second_approver() {
    let clock = Clock::manual(at("2026-11-30T10:01:00Z"));
    let (_dir, r) = responder(clock.clone()).await;
    let two_person = format!(
        "{}approval:\n  approvers: {{slack_users: [U1, U2]}}\n  required_approvals: 2\n  timeout: 15m\n  on_timeout: escalate\n",
        crate::policy::tests::MINIMAL
    );
    r.set_policies(PolicySet::from_sources(Path::new("p"), vec![(PathBuf::from("p/web.yaml"), two_person)]).unwrap());
    let who = crate::approval::Person::slack("U1", vec![]);
    let (id, _) = r.start_manual("web", &who, "customers report errors").await.unwrap();
    let asked = r.store.incident(&id).await.unwrap().unwrap();
    assert_eq!(asked.phase, Phase::AwaitingApproval);
    assert_eq!(asked.due_at, Some(at("2026-11-30T10:16:00Z")));

    // The reload above asked for every waiting incident to be decided again.
    assert!(r.run_due().await.unwrap().is_empty());
    let still = r.store.incident(&id).await.unwrap().unwrap();
    assert_eq!(
        still.phase,
        Phase::AwaitingApproval,
        "not cancelled: no alert was ever its reason"
    );
    assert_eq!(still.due_at, asked.due_at);

    clock.set(at("2026-11-30T10:16:00Z"));
    assert!(r.run_due().await.unwrap().is_empty());
    assert_eq!(r.store.incident(&id).await.unwrap().unwrap().phase, Phase::Escalated);
}
