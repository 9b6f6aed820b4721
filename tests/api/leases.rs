//! Leases between live replicas on one store (SQLite, or PostgreSQL in the PostgreSQL pass):
//! the real binary as processes, an AWS proxy that tells which replica called moto and holds
//! one call at an exact point.
//!
//! - A replica paused (SIGSTOP) past its lease while its write is next: another replica takes
//!   the incident over and finishes it; the paused one, resumed, stops before its write and
//!   records nothing more as its own. One ModifyListener reaches moto.
//! - Replicas with different configs: a replica in dry run never claims a real rollback that
//!   another replica left behind (it would record a dry run for it, or write although it is
//!   configured not to); it says so in `/readyz` and the `work_unclaimable` gauge until a
//!   replica that can run it takes it over.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rollback_responder::incident::{IncidentId, Phase};
use rollback_responder::policy::Outcome;
use rollback_responder::store::{EventRecord, Store};
use serde_json::Value;

use crate::crash::{env_for, post, wait_delivered, wait_incident};
use crate::helpers::{ago, alert, payload, TestDb};
use crate::notify::{policy_with_notify, received, Peers};
use crate::replicas::{of_kind, show};
use crate::support::alb_fixture::{weights, AlbFixture};
use crate::support::aws_proxy::{AwsProxy, HoldPoint};
use crate::support::responder_process::ResponderProcess;

/// One ALB, the notification peers, a store and a policy directory shared by the processes.
struct World {
    fx: AlbFixture,
    peers: Peers,
    proxy: AwsProxy,
    store: Store,
    db: TestDb,
    policies: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl World {
    async fn start(callers: usize) -> World {
        let (fx, peers) = tokio::join!(AlbFixture::start(), Peers::start());
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::new(dir.path()).await;
        // Connecting runs the migrations before any process starts.
        let store = Store::connect(&db.url, 2).await.expect("connect to the test store");
        let policies = dir.path().join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(policies.join("portal-api.yaml"), policy_with_notify(&fx, "auto")).unwrap();
        let proxy = AwsProxy::start(&fx.moto.endpoint, callers).await;
        World {
            fx,
            peers,
            proxy,
            store,
            db,
            policies,
            _dir: dir,
        }
    }

    /// A replica calling AWS through the proxy's port `caller`; `dry_run` sets safety.dry_run.
    async fn replica(&self, name: &str, caller: usize, dry_run: bool) -> ResponderProcess {
        let mut env = env_for(
            &self.db.url,
            &self.policies,
            name,
            self.proxy.endpoint(caller),
            &self.peers,
        );
        for (k, v) in &mut env {
            if k == "ROLLBACK_RESPONDER__SAFETY__DRY_RUN" {
                *v = dry_run.to_string();
            }
        }
        ResponderProcess::start(name, &env).await
    }

    async fn timeline(&self, id: &IncidentId) -> Vec<EventRecord> {
        self.store.events(id).await.expect("events")
    }

    /// Which proxy ports the ModifyListener calls that reached moto came in on.
    fn writers(&self) -> Vec<usize> {
        self.proxy
            .calls()
            .iter()
            .filter(|c| c.action == "ModifyListener")
            .map(|c| c.caller)
            .collect()
    }

    /// One Slack root, no Slack reply said twice, as many requests per peer as queued messages.
    async fn assert_each_message_sent_once(&self, id: &IncidentId) {
        let inc = self.store.incident(id).await.unwrap().expect("incident");
        let msgs = wait_delivered(&self.store, &inc).await;
        for (channel, server) in [("slack", &self.peers.slack), ("pagerduty", &self.peers.pagerduty)] {
            let queued = msgs.iter().filter(|m| m["channel"] == channel).count();
            assert_eq!(received(server).await.len(), queued, "{channel}: {msgs:#?}");
        }
        let slack = received(&self.peers.slack).await;
        let roots = slack
            .iter()
            .filter(|(_, p, b, _)| p == "/chat.postMessage" && b.get("thread_ts").is_none())
            .count();
        assert_eq!(roots, 1, "one Slack root message");
        let said: Vec<String> = slack
            .iter()
            .filter(|(_, p, b, _)| p == "/chat.postMessage" && b.get("thread_ts").is_some())
            .map(|(_, _, b, _)| b["text"].to_string())
            .collect();
        let mut unique = said.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), said.len(), "Slack replies repeated: {said:#?}");
    }
}

async fn get_json(p: &ResponderProcess, path: &str) -> Value {
    reqwest::get(p.url(path))
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", p.name))
        .json()
        .await
        .unwrap_or(Value::Null)
}

async fn metrics(p: &ResponderProcess) -> String {
    reqwest::get(p.url("/metrics"))
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", p.name))
        .text()
        .await
        .unwrap_or_default()
}

/// Polls `what` until it holds; panics at the deadline with `p`'s log.
async fn until<F, Fut>(p: &ResponderProcess, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}:\n{}", p.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_paused_past_its_lease_stops_before_its_write_and_leaves_the_incident_to_the_holder() {
    let w = World::start(2).await;
    let first = w.replica("first", 0, false).await;
    // The health pre-check answered by AWS, not yet heard: the write's plan and the write
    // come next.
    let mut held = w.proxy.hold_next("DescribeTargetHealth", HoldPoint::AfterForward);
    post(
        &first,
        &payload(
            "firing",
            vec![alert("HighErrorRate", "portal-api", "lease01", &ago(60), None)],
        ),
    )
    .await;
    assert_eq!(held.caught(Duration::from_secs(20)).await, 0);
    let inc = wait_incident(&w.store, "executing", |i| i.phase == Phase::Executing).await;
    assert_eq!(inc.owner.as_deref(), Some("first"));
    wait_delivered(&w.store, &inc).await;
    // Pause right after a renewal, so that the pause does not catch it inside a transaction.
    let seen = w.store.incident(&inc.id).await.unwrap().unwrap().lease_until;
    until(&first, "a renewal", || async {
        w.store.incident(&inc.id).await.unwrap().unwrap().lease_until != seen
    })
    .await;
    first.pause();
    let paused_at: DateTime<Utc> = Utc::now();

    let second = w.replica("second", 1, false).await;
    let inc = wait_incident(&w.store, "verified by the second replica", |i| {
        i.phase == Phase::Verified
    })
    .await;
    first.resume();
    held.release();
    until(&first, "the first replica to see its lease gone", || async {
        metrics(&first).await.contains("rollback_responder_leases_lost_total 1")
    })
    .await;
    assert!(
        first.log().contains("lost the lease on this incident"),
        "{}",
        first.log()
    );
    // Whatever the first replica still had in hand when it stopped has had its time: its
    // worker ran (it answered /metrics after its tick loop resumed), and it wrote nothing.
    let timeline = w.timeline(&inc.id).await;
    assert_eq!(w.writers(), vec![1], "one write, by the holder: {:#?}", w.proxy.calls());
    assert_eq!(
        weights(&w.fx.listener_actions().await),
        vec![(w.fx.stable_tg.clone(), 100), (w.fx.canary_tg.clone(), 0)]
    );
    let late: Vec<&EventRecord> = timeline
        .iter()
        .filter(|e| e.actor == "first" && e.at >= paused_at)
        .collect();
    assert!(
        late.is_empty(),
        "nothing recorded as the first replica's after its pause:\n{}",
        show(&timeline)
    );
    assert!(
        !timeline
            .iter()
            .any(|e| e.actor == "first" && e.detail["step"] == "planned"),
        "the first replica never recorded a write's intent:\n{}",
        show(&timeline)
    );
    let succeeded = of_kind(&timeline, "action_succeeded");
    assert_eq!(succeeded.len(), 1, "{}", show(&timeline));
    assert_eq!(succeeded[0].actor, "second");
    assert_eq!(succeeded[0].detail["outcome"], "reverted", "{}", show(&timeline));
    assert_eq!(
        of_kind(&timeline, "verification_passed").len(),
        1,
        "{}",
        show(&timeline)
    );
    // No step twice: each step the holder took appears once.
    let mut steps: Vec<String> = timeline
        .iter()
        .filter(|e| e.kind.as_str() == "action_step")
        .map(|e| format!("{} {}", e.actor, e.summary))
        .collect();
    let n = steps.len();
    steps.sort();
    steps.dedup();
    assert_eq!(steps.len(), n, "a step recorded twice:\n{}", show(&timeline));
    let inc = w.store.incident(&inc.id).await.unwrap().unwrap();
    assert!(inc.executed(), "one rollback counted: {inc:#?}");
    assert_eq!(inc.phase, Phase::Verified);
    w.assert_each_message_sent_once(&inc.id).await;
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_in_dry_run_leaves_a_real_rollback_to_a_replica_that_can_run_it() {
    let w = World::start(3).await;
    let mut real = w.replica("real-1", 0, false).await;
    // The real replica claims the rollback and dies before AWS sees anything.
    let mut held = w.proxy.hold_next("DescribeListeners", HoldPoint::BeforeForward);
    post(
        &real,
        &payload(
            "firing",
            vec![alert("HighErrorRate", "portal-api", "lease02", &ago(60), None)],
        ),
    )
    .await;
    assert_eq!(held.caught(Duration::from_secs(20)).await, 0);
    let inc = wait_incident(&w.store, "executing", |i| i.phase == Phase::Executing).await;
    assert_eq!(inc.owner.as_deref(), Some("real-1"));
    assert!(
        matches!(inc.decision.outcome, Outcome::Auto),
        "decided for a real rollback: {:?}",
        inc.decision
    );
    wait_delivered(&w.store, &inc).await;
    // Started only now, so it cannot have decided the alert itself.
    let dry = w.replica("dry", 1, true).await;
    real.kill();

    let id = inc.id.0.clone();
    until(&dry, "the dry-run replica to show the work it leaves", || async {
        let ready = get_json(&dry, "/readyz").await;
        ready["unclaimable_work"]
            .as_array()
            .is_some_and(|l| l.len() == 1 && l[0]["incident"] == id.as_str())
    })
    .await;
    let ready = get_json(&dry, "/readyz").await;
    assert_eq!(ready["ready"], true, "a warning, not unreadiness: {ready}");
    let why = ready["unclaimable_work"][0]["why"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(why.contains("dry run"), "{why}");
    assert!(metrics(&dry).await.contains("rollback_responder_work_unclaimable 1"));
    // Its lease ran out long ago, and the dry-run replica still leaves it.
    let now = w.store.incident(&inc.id).await.unwrap().unwrap();
    assert_eq!((now.phase, now.owner.as_deref()), (Phase::Executing, Some("real-1")));
    assert!(now.lease_until.is_some_and(|t| t < Utc::now()), "{now:#?}");

    let heir = w.replica("real-2", 2, false).await;
    let inc = wait_incident(&w.store, "verified by the second real replica", |i| {
        i.phase == Phase::Verified
    })
    .await;
    let timeline = w.timeline(&inc.id).await;
    assert!(
        timeline.iter().all(|e| e.actor != "dry"),
        "the dry-run replica recorded nothing:\n{}",
        show(&timeline)
    );
    let started: Vec<&str> = of_kind(&timeline, "action_started")
        .iter()
        .map(|e| e.actor.as_str())
        .collect();
    assert_eq!(started, vec!["real-1", "real-2"], "{}", show(&timeline));
    let succeeded = of_kind(&timeline, "action_succeeded");
    assert_eq!(succeeded.len(), 1, "{}", show(&timeline));
    assert_eq!(
        (succeeded[0].actor.as_str(), &succeeded[0].detail["outcome"]),
        ("real-2", &Value::from("reverted"))
    );
    assert_eq!(w.writers(), vec![2], "{:#?}", w.proxy.calls());
    assert!(
        w.proxy.calls().iter().all(|c| c.caller != 1),
        "the dry-run replica never called AWS"
    );
    // Taken: the warning goes away; it was logged once.
    until(&dry, "the warning to clear", || async {
        get_json(&dry, "/readyz").await["unclaimable_work"] == serde_json::json!([])
    })
    .await;
    assert!(metrics(&dry).await.contains("rollback_responder_work_unclaimable 0"));
    assert_eq!(
        dry.log().matches("leaving this incident's work").count(),
        1,
        "logged once:\n{}",
        dry.log()
    );
    w.assert_each_message_sent_once(&inc.id).await;
    drop((heir, held));
}
