//! Several replicas (issue 8): the real binary, three processes on one PostgreSQL store, each
//! with its own port and replica id, in front of one moto ALB and one set of wiremock peers.
//! The same alerts go to every replica at once; a replica is SIGKILLed in the middle of an
//! incident. An AWS proxy between the replicas and moto ([`AwsProxy`]) tells which replica
//! made which call, counts the writes that reached moto, and holds one call at an exact point
//! so that the kill lands where the test says, not where the scheduler happens to be.
//!
//! These tests only make sense on PostgreSQL (processes cannot share SQLite) and still run in
//! the SQLite pass of tests/run.sh: [`PgDb`] falls back to the local PostgreSQL that
//! tests/setup.sh always installs when TEST_DATABASE_URL is not a postgres URL.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rollback_responder::incident::{AuditKind, Incident, IncidentId, Phase};
use rollback_responder::store::{EventRecord, Store};
use serde_json::Value;

use crate::helpers::{self, ago, alert, payload, TOKEN};
use crate::notify::{policy_with_notify, received, Peers};
use crate::support::alb_fixture::{weights, AlbFixture, LISTENER_WEIGHTS};
use crate::support::aws_proxy::{AwsProxy, HeldCall, HoldPoint};
use crate::support::pg::PgDb;
use crate::support::responder_process::ResponderProcess;

const REPLICAS: usize = 3;
/// How many times the same notification goes to all three replicas at once.
const ROUNDS: usize = 20;

fn replica_id(i: usize) -> String {
    format!("replica-{i}")
}

/// Three responder processes and their peers. Fields drop in order: the processes die first,
/// the database goes last.
struct Cluster {
    replicas: Vec<ResponderProcess>,
    proxy: AwsProxy,
    peers: Peers,
    fx: AlbFixture,
    /// The test's own view of the shared store.
    store: Store,
    http: reqwest::Client,
    _policies: tempfile::TempDir,
    _db: PgDb,
}

impl Cluster {
    async fn start() -> Cluster {
        let (fx, peers, db) = tokio::join!(AlbFixture::start(), Peers::start(), PgDb::create());
        let proxy = AwsProxy::start(&fx.moto.endpoint, REPLICAS).await;
        // Connecting runs the migrations once, before any replica starts.
        let store = Store::connect(&db.url, 4).await.expect("connect to the test database");
        let policies = tempfile::tempdir().unwrap();
        std::fs::write(policies.path().join("portal-api.yaml"), policy_with_notify(&fx, "auto")).unwrap();
        let starts = (0..REPLICAS).map(|i| {
            let id = replica_id(i);
            let mut env = helpers::env(&[
                ("ROLLBACK_RESPONDER__STORE__URL", &db.url),
                ("ROLLBACK_RESPONDER__POLICIES_DIR", policies.path().to_str().unwrap()),
                ("ROLLBACK_RESPONDER__WEBHOOK__BEARER_TOKEN", TOKEN),
                ("ROLLBACK_RESPONDER__SAFETY__DRY_RUN", "false"),
                ("ROLLBACK_RESPONDER__WORKERS__TICK", "100ms"),
                ("ROLLBACK_RESPONDER__WORKERS__LEASE", "2s"),
                ("ROLLBACK_RESPONDER__WORKERS__REPLICA_ID", &id),
                ("ROLLBACK_RESPONDER__AWS__ENDPOINT_URL", proxy.endpoint(i)),
                ("ROLLBACK_RESPONDER__AWS__REGION", "us-east-1"),
                ("ROLLBACK_RESPONDER__LOG__LEVEL", "info"),
                ("NO_COLOR", "1"),
                // The default credential chain of the child; never set on the test process.
                ("AWS_ACCESS_KEY_ID", "testing"),
                ("AWS_SECRET_ACCESS_KEY", "testing"),
                ("AWS_EC2_METADATA_DISABLED", "true"),
            ]);
            env.extend(peers.env());
            async move { ResponderProcess::start(&id, &env).await }
        });
        let replicas = futures::future::join_all(starts).await;
        Cluster {
            replicas,
            proxy,
            peers,
            fx,
            store,
            http: reqwest::Client::new(),
            _policies: policies,
            _db: db,
        }
    }

    fn index_of(&self, replica: &str) -> usize {
        (0..REPLICAS)
            .find(|&i| replica_id(i) == replica)
            .unwrap_or_else(|| panic!("{replica:?} is not a replica of this test"))
    }

    /// Sends `body` to every replica at the same moment; each must answer 200.
    async fn post_all(&self, body: &Value) -> Vec<Value> {
        let posts = self.replicas.iter().map(|r| {
            let req = self
                .http
                .post(r.url("/webhook/alertmanager"))
                .bearer_auth(TOKEN)
                .json(body);
            let name = r.name.clone();
            async move {
                let resp = req.send().await.unwrap_or_else(|e| panic!("{name}: {e}"));
                let status = resp.status();
                let answer: Value = resp.json().await.unwrap_or(Value::Null);
                assert_eq!(status, 200, "{name}: {answer}");
                answer
            }
        });
        futures::future::join_all(posts).await
    }

    /// Sends `body` to all three at once, `rounds` times; returns (stored, duplicates) summed.
    async fn post_rounds(&self, body: &Value, rounds: usize) -> (u64, u64) {
        let (mut stored, mut duplicates) = (0, 0);
        for _ in 0..rounds {
            for answer in self.post_all(body).await {
                stored += answer["stored"].as_u64().unwrap();
                duplicates += answer["duplicates"].as_u64().unwrap();
            }
            // Spread the rounds over the incident's life: opening, action, verification.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (stored, duplicates)
    }

    async fn timeline(&self, id: &IncidentId) -> Vec<EventRecord> {
        self.store.events(id).await.expect("events")
    }

    /// Polls until there is exactly one incident and `pred` holds for it (panics on a second
    /// incident or at the deadline, showing the timelines).
    async fn wait_incident(&self, what: &str, pred: impl Fn(&Incident) -> bool) -> Incident {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let list = self.store.incidents(false, 10).await.expect("incidents");
            if list.len() > 1 {
                panic!("more than one incident:\n{}", self.describe(&list).await);
            }
            if let [one] = list.as_slice() {
                if pred(one) {
                    return one.clone();
                }
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}:\n{}", self.describe(&list).await);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn describe(&self, list: &[Incident]) -> String {
        let mut out = Vec::new();
        for i in list {
            let t = self.timeline(&i.id).await;
            out.push(format!("{} phase {} owner {:?}\n{}", i.id, i.phase, i.owner, show(&t)));
        }
        out.join("\n")
    }

    /// Waits until every queued message of the incident is delivered, and returns them.
    async fn wait_delivered(&self, id: &IncidentId) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let msgs = self.store.messages(id).await.expect("outbox");
            if !msgs.is_empty() && msgs.iter().all(|m| m["state"] == "delivered") {
                return msgs;
            }
            assert!(Instant::now() < deadline, "messages not delivered: {msgs:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every message the incident queued went out exactly once: one delivery attempt each,
    /// and each peer received exactly as many requests as its channel has messages. The
    /// Slack root message and the PagerDuty trigger are among them, once.
    /// Stops every replica still running first (SIGTERM, waiting for each to exit), so no
    /// delivery can still be on its way when the peers' requests are counted.
    async fn assert_each_message_sent_once(&mut self, id: &IncidentId) {
        self.wait_delivered(id).await;
        for r in &mut self.replicas {
            r.terminate().await;
        }
        let msgs = self.wait_delivered(id).await;
        for m in &msgs {
            assert_eq!(m["attempts"], 1, "one attempt per message: {msgs:#?}");
        }
        for (channel, server) in [
            ("slack", &self.peers.slack),
            ("pagerduty", &self.peers.pagerduty),
            ("statuspage", &self.peers.statuspage),
        ] {
            let queued = msgs.iter().filter(|m| m["channel"] == channel).count();
            let sent: Vec<String> = received(server)
                .await
                .iter()
                .map(|(m, p, b, _)| format!("{m} {p} {}", b.to_string().chars().take(160).collect::<String>()))
                .collect();
            assert!(queued > 0, "{channel}: nothing queued: {msgs:#?}");
            assert_eq!(sent.len(), queued, "{channel}: sent once per queued message: {sent:#?}");
        }
        let slack = received(&self.peers.slack).await;
        let roots = slack
            .iter()
            .filter(|(_, p, b, _)| p == "/chat.postMessage" && b.get("thread_ts").is_none())
            .count();
        assert_eq!(roots, 1, "one Slack root message");
        let pd = received(&self.peers.pagerduty).await;
        let triggers = pd.iter().filter(|(_, _, b, _)| b["event_action"] == "trigger").count();
        assert_eq!(triggers, 1, "one PagerDuty trigger");
    }

    /// PagerDuty change events ("Rollback executed by rollback-responder").
    async fn pagerduty_change_events(&self) -> usize {
        received(&self.peers.pagerduty)
            .await
            .iter()
            .filter(|(_, p, _, _)| p == "/v2/change/enqueue")
            .count()
    }

    async fn listener_weights(&self) -> Vec<(String, i32)> {
        weights(&self.fx.listener_actions().await)
    }

    fn stable_only(&self) -> Vec<(String, i32)> {
        vec![(self.fx.stable_tg.clone(), 100), (self.fx.canary_tg.clone(), 0)]
    }
}

pub(crate) fn of_kind<'a>(timeline: &'a [EventRecord], kind: &str) -> Vec<&'a EventRecord> {
    timeline.iter().filter(|e| e.kind.as_str() == kind).collect()
}

/// A timeline, one line per entry, for failure messages.
pub(crate) fn show(timeline: &[EventRecord]) -> String {
    timeline
        .iter()
        .map(|e| {
            format!(
                "  {} {} {}: {}",
                e.at.format("%H:%M:%S%.3f"),
                e.actor,
                e.kind,
                e.summary
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn firing(fingerprint: &str) -> Value {
    payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", fingerprint, &ago(60), None)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_given_the_same_alerts_roll_back_once_and_tell_once() {
    let mut c = Cluster::start().await;
    let starts = ago(60);
    let firing = payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "rep01", &starts, None)],
    );
    let (stored, duplicates) = c.post_rounds(&firing, ROUNDS).await;
    assert_eq!(
        (stored, duplicates),
        (1, (REPLICAS * ROUNDS - 1) as u64),
        "one replica stored the alert, every other delivery was a duplicate"
    );

    let inc = c.wait_incident("verified", |i| i.phase == Phase::Verified).await;
    assert_eq!(c.proxy.count("ModifyListener"), 1, "{:#?}", c.proxy.calls());
    assert_eq!(c.listener_weights().await, c.stable_only());
    let timeline = c.timeline(&inc.id).await;
    let started = of_kind(&timeline, "action_started");
    assert_eq!(started.len(), 1, "one action:\n{}", show(&timeline));
    let owner = c.index_of(&started[0].actor);
    let succeeded = of_kind(&timeline, "action_succeeded");
    assert_eq!(succeeded.len(), 1, "{}", show(&timeline));
    assert_eq!(
        (succeeded[0].actor.as_str(), &succeeded[0].detail["outcome"]),
        (replica_id(owner).as_str(), &Value::from("reverted"))
    );
    // Only the owner talked to AWS.
    let callers: BTreeSet<usize> = c.proxy.calls().iter().map(|x| x.caller).collect();
    assert_eq!(callers, BTreeSet::from([owner]), "{:#?}", c.proxy.calls());
    assert!(inc.executed());

    // The resolution, the same way: all three at once, several times; one close.
    let resolved = payload(
        "resolved",
        vec![alert("HighErrorRate", "portal-api", "rep01", &starts, Some(&ago(0)))],
    );
    let (stored, _) = c.post_rounds(&resolved, 5).await;
    assert_eq!(stored, 1);
    let inc = c.wait_incident("closed", |i| i.closed_at.is_some()).await;
    assert_eq!(inc.phase, Phase::Verified);
    let timeline = c.timeline(&inc.id).await;
    assert_eq!(of_kind(&timeline, "closed").len(), 1, "{}", show(&timeline));
    assert_eq!(of_kind(&timeline, "opened").len(), 1, "{}", show(&timeline));
    c.assert_each_message_sent_once(&inc.id).await;
    let pd = received(&c.peers.pagerduty).await;
    assert_eq!(
        pd.iter().filter(|(_, _, b, _)| b["event_action"] == "resolve").count(),
        1
    );
    assert_eq!(c.proxy.count("ModifyListener"), 1, "{:#?}", c.proxy.calls());
    assert_eq!(c.pagerduty_change_events().await, 1);
}

/// What a kill test leaves for its case-specific checks.
struct Takeover {
    c: Cluster,
    inc: Incident,
    timeline: Vec<EventRecord>,
    victim: usize,
    heir: usize,
    /// The listener's weights (moto) at the moment of the kill.
    weights_at_kill: Vec<(String, i32)>,
    /// The held call; kept (not released) so nothing is forwarded for the dead process.
    _held: HeldCall,
}

/// Sends one alert to all three replicas, holds the first `action` call at `point`,
/// SIGKILLs the replica that made it (the incident's owner) while it waits, and lets the
/// others finish. `at_kill` checks the state at the moment of the kill.
async fn sigkill_the_owner_at(action: &str, point: HoldPoint, at_kill: impl Fn(&Cluster, usize)) -> Takeover {
    let mut c = Cluster::start().await;
    let mut held = c.proxy.hold_next(action, point);
    c.post_all(&firing("repkill01")).await;
    let victim = held.caught(Duration::from_secs(20)).await;
    let caught_at = Instant::now();

    let inc = c.wait_incident("executing", |i| i.phase == Phase::Executing).await;
    assert_eq!(
        inc.owner.as_deref(),
        Some(replica_id(victim).as_str()),
        "the caller holds the claim"
    );
    // Let what was queued so far go out first, so that the kill cannot interrupt a delivery
    // (a message a dead replica had claimed waits out the outbox lease; not the subject here).
    // The victim is blocked in the AWS call meanwhile and queues nothing.
    let delivered = c.wait_delivered(&inc.id).await;
    let timeline = c.timeline(&inc.id).await;
    assert!(of_kind(&timeline, "action_succeeded").is_empty(), "{}", show(&timeline));
    at_kill(&c, victim);
    let weights_at_kill = c.listener_weights().await;
    assert!(
        caught_at.elapsed() < Duration::from_secs(8),
        "held {:?}: the SDK's 10 s attempt timeout would retry the call",
        caught_at.elapsed()
    );
    let killed_at: DateTime<Utc> = Utc::now();
    c.replicas[victim].kill();
    for (i, r) in c.replicas.iter_mut().enumerate() {
        assert_eq!(r.is_running(), i != victim, "{} running", r.name);
    }

    let inc = c
        .wait_incident("verified after the takeover", |i| i.phase == Phase::Verified)
        .await;
    let timeline = c.timeline(&inc.id).await;
    let started = of_kind(&timeline, "action_started");
    assert_eq!(
        started.len(),
        2,
        "the victim's start and the heir's:\n{}",
        show(&timeline)
    );
    assert_eq!(started[0].actor, replica_id(victim), "{}", show(&timeline));
    let heir = c.index_of(&started[1].actor);
    assert_ne!(heir, victim);
    assert!(
        started[1].at > killed_at,
        "the heir started only after the kill (the lease ran out):\n{}",
        show(&timeline)
    );
    let succeeded = of_kind(&timeline, "action_succeeded");
    assert_eq!(succeeded.len(), 1, "{}", show(&timeline));
    assert_eq!(succeeded[0].actor, replica_id(heir));
    assert!(of_kind(&timeline, "action_failed").is_empty(), "{}", show(&timeline));
    let passed = of_kind(&timeline, "verification_passed");
    assert_eq!(passed.len(), 1, "{}", show(&timeline));
    assert_eq!(passed[0].actor, replica_id(heir));
    assert_eq!(inc.owner, None, "a settled incident holds no lease");

    assert_eq!(
        c.proxy.count("ModifyListener"),
        1,
        "one rollback write: {:#?}",
        c.proxy.calls()
    );
    assert_eq!(c.listener_weights().await, c.stable_only());
    // Nothing lost, nothing twice: what was delivered before the kill stays delivered once,
    // and what the heir queued went out once too.
    assert!(delivered.len() < c.store.messages(&inc.id).await.unwrap().len());
    c.assert_each_message_sent_once(&inc.id).await;
    // The rollback is on record whoever wrote it: guards and people see it.
    assert!(inc.executed(), "acted_at is set: {inc:#?}");
    assert_eq!(c.pagerduty_change_events().await, 1);
    Takeover {
        c,
        inc,
        timeline,
        victim,
        heir,
        weights_at_kill,
        _held: held,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_after_its_claim_before_the_aws_call_is_taken_over() {
    // The owner's first call, the read before the write, never reaches AWS.
    let t = sigkill_the_owner_at("DescribeListeners", HoldPoint::BeforeForward, |c, _| {
        assert!(
            c.proxy.calls().is_empty(),
            "AWS saw nothing yet: {:#?}",
            c.proxy.calls()
        );
    })
    .await;
    let Takeover {
        c,
        inc,
        timeline,
        victim,
        heir,
        weights_at_kill,
        ..
    } = &t;
    assert_eq!(
        weights_at_kill,
        &vec![
            (c.fx.stable_tg.clone(), LISTENER_WEIGHTS.0),
            (c.fx.canary_tg.clone(), LISTENER_WEIGHTS.1)
        ],
        "the victim died before changing anything"
    );
    let writes: Vec<usize> = c
        .proxy
        .calls()
        .iter()
        .filter(|x| x.action == "ModifyListener")
        .map(|x| x.caller)
        .collect();
    assert_eq!(writes, vec![*heir], "the heir wrote, the victim never did");
    assert!(c.proxy.calls().iter().all(|x| x.caller != *victim));
    let succeeded = of_kind(timeline, "action_succeeded");
    assert_eq!(succeeded[0].detail["outcome"], "reverted", "{}", show(timeline));
    assert!(
        !succeeded[0].summary.contains("interrupted"),
        "{}",
        succeeded[0].summary
    );
    assert_eq!(
        succeeded[0].detail["before"]["forward"]["target_groups"][0]["weight"], LISTENER_WEIGHTS.0,
        "the heir found the listener as the release left it: {}",
        succeeded[0].detail
    );
    assert!(inc.executed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_after_aws_applied_its_write_is_taken_over_as_a_no_op() {
    // The owner's ModifyListener reaches moto and takes effect; the answer never reaches it.
    let t = sigkill_the_owner_at("ModifyListener", HoldPoint::AfterForward, |c, victim| {
        let calls = c.proxy.calls();
        let writes: Vec<usize> = calls
            .iter()
            .filter(|x| x.action == "ModifyListener")
            .map(|x| x.caller)
            .collect();
        assert_eq!(writes, vec![victim], "{calls:#?}");
    })
    .await;
    let Takeover {
        c,
        timeline,
        victim,
        heir,
        weights_at_kill,
        ..
    } = &t;
    assert_eq!(
        weights_at_kill,
        &c.stable_only(),
        "AWS applied the victim's write before the kill"
    );
    // The heir read, found the revert done, and wrote nothing.
    let heir_calls: Vec<String> = c
        .proxy
        .calls()
        .iter()
        .filter(|x| x.caller == *heir)
        .map(|x| x.action.clone())
        .collect();
    // Its first call read the listener; everything after is verification's read-back (the
    // listener and the stable group's health), never a write.
    assert_eq!(heir_calls.first().map(String::as_str), Some("DescribeListeners"));
    assert!(
        heir_calls
            .iter()
            .all(|a| a == "DescribeListeners" || a == "DescribeTargetHealth"),
        "{:#?}",
        c.proxy.calls()
    );
    let heir_steps: Vec<&Value> = timeline
        .iter()
        .filter(|e| e.kind == AuditKind::ActionStep && e.actor == replica_id(*heir))
        .map(|e| &e.detail)
        .collect();
    assert_eq!(
        heir_steps
            .iter()
            .map(|d| d["step"].as_str().unwrap_or("?"))
            .collect::<Vec<_>>(),
        vec!["read", "already_stable"],
        "{}",
        show(timeline)
    );
    let succeeded = of_kind(timeline, "action_succeeded");
    assert_eq!(succeeded[0].detail["outcome"], "already_stable", "{}", show(timeline));
    // Nothing written by the heir, yet the victim's write counts as the incident's rollback.
    let summary = &succeeded[0].summary;
    assert!(summary.contains("nothing written"), "{summary}");
    assert!(
        summary.contains(&format!("interrupted earlier attempt of {}", replica_id(*victim))),
        "{summary}"
    );
}

/// A batch locks every alert it asked for before it reads any (it reads them eight at a time):
/// a second replica asking for the same oldest alerts gets none of them, not the ones the first
/// has not read yet, and so does not decide the same storm alongside it. Once the first ends
/// without deciding them, they are there for the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replica_gets_none_of_the_alerts_a_batch_holds() {
    let db = PgDb::create().await;
    let store = Store::connect(&db.url, 4).await.expect("connect");
    let alerts: Vec<Value> = (0..20)
        .map(|i| {
            alert(
                "HighErrorRate",
                "checkout",
                &format!("{i:016x}"),
                "2026-12-01T10:00:00Z",
                None,
            )
        })
        .collect();
    let body = serde_json::to_vec(&payload("firing", alerts)).unwrap();
    let n = rollback_responder::alert::Notification::parse(&body).unwrap();
    store.ingest(&n, Utc::now()).await.unwrap();
    let ids = store.pending_alert_ids(32).await.unwrap();
    assert_eq!(ids.len(), 20);

    let mut first = store.begin().await.unwrap();
    assert_eq!(
        first.lock_alerts(&ids).await.unwrap(),
        ids,
        "the first takes them all, in order"
    );
    let read = first.claim_alerts(&ids[..8]).await.unwrap();
    assert_eq!(read.len(), 8);

    let mut second = store.begin().await.unwrap();
    assert!(
        second.lock_alerts(&ids).await.unwrap().is_empty(),
        "held by the first, read or not"
    );
    assert!(second.claim_alerts(&ids[8..]).await.unwrap().is_empty());
    second.commit().await.unwrap();

    // Ended (committed, having settled nothing), not dropped: a dropped transaction's
    // rollback is sent later, and its locks would outlive the assertion below.
    first.commit().await.unwrap();
    let mut third = store.begin().await.unwrap();
    assert_eq!(
        third.lock_alerts(&ids).await.unwrap(),
        ids,
        "nothing was decided: all still pending"
    );
}
