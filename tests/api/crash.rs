//! kill -9 at each step of an ALB rollback (issue 19, fault suite): the real binary as a
//! process, a recording proxy in front of moto that holds one AWS call at an exact point, and
//! a second process started on the same store after the kill.
//!
//! The points, in the order a rollback passes them: the first AWS call (the read) held before
//! it reaches AWS, i.e. right after the decision and the action's start were committed; that
//! read answered; the stable group's health pre-check, before and after AWS answered; the
//! write held after its intent (its plan) was committed but before it reached AWS; the write
//! applied by AWS but its answer not yet heard (so not recorded); and the read-back after the
//! write. Each case asserts from the outside: exactly one ModifyListener reached moto, the
//! listener forwards 100 % to stable, the incident ends verified and closed with one rollback
//! counted, every alert answered 2xx before the kill is in the store, and every Slack message
//! went out once. The store is SQLite (the first process is dead before the second starts)
//! or, when TEST_DATABASE_URL is a postgres URL, a fresh PostgreSQL database.
//!
//! The Kubernetes cases run the seed's two-step rollback (switch the Service's selector, scale
//! the canary to zero) against the fake API server, through the same proxy: killed after the
//! switch's intent was committed, before the switch reached the server and after the server
//! applied it (before the scale-down). One switch and one scale-down reach the server.

use std::time::{Duration, Instant};

use rollback_responder::incident::{Incident, Phase};
use rollback_responder::store::Store;
use serde_json::Value;

use crate::helpers::{self, ago, alert, payload, TestDb, TOKEN};
use crate::notify::{policy_with_notify, received, Peers};
use crate::replicas::{of_kind, show};
use crate::support::alb_fixture::{weights, AlbFixture};
use crate::support::aws_proxy::{AwsProxy, HoldPoint};
use crate::support::responder_process::ResponderProcess;

/// Where the first process dies.
struct KillPoint {
    action: &'static str,
    /// Calls of `action` let through before the held one.
    skip: usize,
    point: HoldPoint,
    /// Whether the write had reached AWS when the process died.
    written_at_kill: bool,
}

pub(crate) fn env_for(
    db: &str,
    policies: &std::path::Path,
    replica: &str,
    aws: &str,
    peers: &Peers,
) -> Vec<(String, String)> {
    let mut env = helpers::env(&[
        ("ROLLBACK_RESPONDER__STORE__URL", db),
        ("ROLLBACK_RESPONDER__POLICIES_DIR", policies.to_str().unwrap()),
        ("ROLLBACK_RESPONDER__WEBHOOK__BEARER_TOKEN", TOKEN),
        ("ROLLBACK_RESPONDER__SAFETY__DRY_RUN", "false"),
        ("ROLLBACK_RESPONDER__WORKERS__TICK", "100ms"),
        ("ROLLBACK_RESPONDER__WORKERS__LEASE", "2s"),
        ("ROLLBACK_RESPONDER__WORKERS__REPLICA_ID", replica),
        ("ROLLBACK_RESPONDER__AWS__ENDPOINT_URL", aws),
        ("ROLLBACK_RESPONDER__AWS__REGION", "us-east-1"),
        ("ROLLBACK_RESPONDER__LOG__LEVEL", "info"),
        ("NO_COLOR", "1"),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]);
    env.extend(peers.env());
    env
}

pub(crate) async fn post(p: &ResponderProcess, body: &Value) {
    let r = reqwest::Client::new()
        .post(p.url("/webhook/alertmanager"))
        .bearer_auth(TOKEN)
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", p.name));
    assert_eq!(r.status(), 200, "{}: {}", p.name, r.text().await.unwrap_or_default());
}

/// The one incident once `pred` holds; panics at the deadline with its timeline.
pub(crate) async fn wait_incident(store: &Store, what: &str, pred: impl Fn(&Incident) -> bool) -> Incident {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = store.incidents(false, 10).await.expect("incidents");
        assert!(list.len() <= 1, "more than one incident: {list:#?}");
        if let Some(one) = list.first().filter(|i| pred(i)) {
            return one.clone();
        }
        if Instant::now() > deadline {
            let timeline = match list.first() {
                Some(i) => show(&store.events(&i.id).await.unwrap_or_default()),
                None => "no incident".into(),
            };
            panic!("timed out waiting for {what}:\n{timeline}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every message queued for the incident so far, once all are delivered.
pub(crate) async fn wait_delivered(store: &Store, inc: &Incident) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let msgs = store.messages(&inc.id).await.expect("outbox");
        if !msgs.is_empty() && msgs.iter().all(|m| m["state"] == "delivered") {
            return msgs;
        }
        assert!(Instant::now() < deadline, "messages not delivered: {msgs:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn kill_at(k: KillPoint) {
    let (fx, peers) = tokio::join!(AlbFixture::start(), Peers::start());
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new(dir.path()).await;
    // Connecting runs the migrations before either process starts.
    let store = Store::connect(&db.url, 2).await.expect("connect to the test store");
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("portal-api.yaml"), policy_with_notify(&fx, "auto")).unwrap();
    let proxy = AwsProxy::start(&fx.moto.endpoint, 2).await;
    let stable_only = vec![(fx.stable_tg.clone(), 100), (fx.canary_tg.clone(), 0)];

    let mut first = ResponderProcess::start(
        "first",
        &env_for(&db.url, &policies, "first", proxy.endpoint(0), &peers),
    )
    .await;
    let mut held = proxy.hold_nth(k.action, k.skip, k.point);
    let starts = ago(60);
    post(
        &first,
        &payload(
            "firing",
            vec![alert("HighErrorRate", "portal-api", "crash01", &starts, None)],
        ),
    )
    .await;
    assert_eq!(
        held.caught(Duration::from_secs(20)).await,
        0,
        "the first process made the call"
    );
    let caught_at = Instant::now();
    // Another alert joins while the action is held: answered 2xx, so it must survive the kill.
    let joined = ago(30);
    post(
        &first,
        &payload(
            "firing",
            vec![alert("HighErrorRate", "portal-api", "crash02", &joined, None)],
        ),
    )
    .await;

    let inc = wait_incident(&store, "executing", |i| i.phase == Phase::Executing).await;
    // What was queued goes out first, so the kill interrupts the action, not a delivery.
    wait_delivered(&store, &inc).await;
    let at_kill = store.events(&inc.id).await.unwrap();
    let intent = at_kill
        .iter()
        .any(|e| e.kind.as_str() == "action_step" && e.detail["step"] == "planned" && e.detail["dry_run"] == false);
    let planned_by_then = k.action == "ModifyListener" || k.skip > 0;
    assert_eq!(
        intent,
        planned_by_then,
        "the write's intent is committed before the write is sent:\n{}",
        show(&at_kill)
    );
    assert_eq!(
        proxy.count("ModifyListener"),
        usize::from(k.written_at_kill),
        "{:#?}",
        proxy.calls()
    );
    assert!(
        caught_at.elapsed() < Duration::from_secs(8),
        "the SDK would retry the held call"
    );
    first.kill();

    let second = ResponderProcess::start(
        "second",
        &env_for(&db.url, &policies, "second", proxy.endpoint(1), &peers),
    )
    .await;
    let inc = wait_incident(&store, "verified after the restart", |i| i.phase == Phase::Verified).await;
    assert_eq!(
        proxy.count("ModifyListener"),
        1,
        "one write reached AWS: {:#?}",
        proxy.calls()
    );
    assert_eq!(weights(&fx.listener_actions().await), stable_only);
    assert!(inc.executed(), "one rollback counted (acted_at): {inc:#?}");
    let timeline = store.events(&inc.id).await.unwrap();
    if k.written_at_kill {
        // Found reverted and counted as ours: counted from when our write was recorded (the
        // traffic moved then), as a failed takeover does, not from the takeover's end.
        let intent = timeline
            .iter()
            .find(|e| e.kind.as_str() == "action_step" && e.detail["step"] == "planned" && e.detail["dry_run"] == false)
            .expect("the write's intent");
        assert_eq!(inc.acted_at, Some(intent.at), "{}", show(&timeline));
    }
    assert_eq!(of_kind(&timeline, "action_succeeded").len(), 1, "{}", show(&timeline));
    assert_eq!(
        of_kind(&timeline, "action_succeeded")[0].actor,
        "second",
        "{}",
        show(&timeline)
    );
    assert!(of_kind(&timeline, "action_failed").is_empty(), "{}", show(&timeline));

    // Nothing acknowledged before the kill is lost: both alerts are stored and resolve.
    assert_eq!(store.alert_count().await.unwrap(), 2);
    post(
        &second,
        &payload(
            "resolved",
            vec![
                alert("HighErrorRate", "portal-api", "crash01", &starts, Some(&ago(0))),
                alert("HighErrorRate", "portal-api", "crash02", &joined, Some(&ago(0))),
            ],
        ),
    )
    .await;
    let inc = wait_incident(&store, "closed", |i| i.closed_at.is_some()).await;
    assert_eq!(inc.phase, Phase::Verified);
    assert_eq!(store.alert_count().await.unwrap(), 2);

    // Every message went out once: as many requests per channel as messages queued, one
    // Slack root, one PagerDuty change event for the one rollback.
    let msgs = wait_delivered(&store, &inc).await;
    drop(second);
    for (channel, server) in [
        ("slack", &peers.slack),
        ("pagerduty", &peers.pagerduty),
        ("statuspage", &peers.statuspage),
    ] {
        let queued = msgs.iter().filter(|m| m["channel"] == channel).count();
        let sent = received(server).await.len();
        assert_eq!(sent, queued, "{channel}: sent once per queued message: {msgs:#?}");
    }
    let slack = received(&peers.slack).await;
    let roots = slack
        .iter()
        .filter(|(_, p, b, _)| p == "/chat.postMessage" && b.get("thread_ts").is_none())
        .count();
    assert_eq!(roots, 1, "one Slack root message");
    let mut replies: Vec<String> = slack
        .iter()
        .filter(|(_, p, b, _)| p == "/chat.postMessage" && b.get("thread_ts").is_some())
        .map(|(_, _, b, _)| b["text"].to_string())
        .collect();
    let said = replies.clone();
    replies.sort();
    replies.dedup();
    // The second process's start names the interrupted attempt: no line is said twice.
    assert_eq!(replies.len(), said.len(), "Slack replies repeated: {said:#?}");
    let change_events = received(&peers.pagerduty)
        .await
        .iter()
        .filter(|(_, p, _, _)| p == "/v2/change/enqueue")
        .count();
    assert_eq!(change_events, 1);
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_the_decision_commit_before_aws_saw_anything() {
    kill_at(KillPoint {
        action: "DescribeListeners",
        skip: 0,
        point: HoldPoint::BeforeForward,
        written_at_kill: false,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_aws_answered_the_first_read() {
    kill_at(KillPoint {
        action: "DescribeListeners",
        skip: 0,
        point: HoldPoint::AfterForward,
        written_at_kill: false,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_the_health_pre_check() {
    kill_at(KillPoint {
        action: "DescribeTargetHealth",
        skip: 0,
        point: HoldPoint::AfterForward,
        written_at_kill: false,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_the_write_intent_before_the_write_reached_aws() {
    kill_at(KillPoint {
        action: "ModifyListener",
        skip: 0,
        point: HoldPoint::BeforeForward,
        written_at_kill: false,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_aws_applied_the_write_before_it_was_recorded() {
    kill_at(KillPoint {
        action: "ModifyListener",
        skip: 0,
        point: HoldPoint::AfterForward,
        written_at_kill: true,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_the_read_back_after_the_write() {
    kill_at(KillPoint {
        action: "DescribeListeners",
        skip: 1,
        point: HoldPoint::BeforeForward,
        written_at_kill: true,
    })
    .await;
}

/// The seed's Kubernetes rollback (switch the Service's selector to the stable pods, then scale
/// the canary to zero), automatic, with notifications.
const KUBE_POLICY: &str = r##"
name: portal-api-k8s
service: portal-api
matchers: ['service="portal-api"']
target:
  kubernetes:
    namespace: portal
    min_ready_replicas: 2
    rollout_timeout: 5s
    steps:
      - switch_service: {service: portal-api-prod, selector: {app: portal-api, version: v1.0.0-rc.0}}
      - scale: {deployment: portal-api-canary, replicas: 0}
triggers:
  - name: errors
    matchers: ['alertname="HighErrorRate"']
    mode: auto
approval:
  approvers: {slack_users: [U0APPROVER]}
  timeout: 1h
  on_timeout: escalate
verification: {bake: 1s, interval: 200ms}
notify:
  slack: {channel: "#portal-alerts"}
  pagerduty: {severity: error}
"##;

/// The selector switch and the scale-down as the proxy names them.
const SWITCH: &str = "PATCH /api/v1/namespaces/portal/services/portal-api-prod";
const SCALE_DOWN: &str = "PATCH /apis/apps/v1/namespaces/portal/deployments/portal-api-canary/scale";

/// A kubeconfig for a process that reaches the fake API server at `server`.
fn kubeconfig(dir: &std::path::Path, name: &str, server: &str) -> String {
    let path = dir.join(format!("kubeconfig-{name}"));
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {server}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: tester\n    namespace: portal\ncurrent-context: fake\nusers:\n- name: tester\n  user:\n    token: test-token\n"
    );
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// kill -9 of the process running a Kubernetes rollback with the `action` call held at
/// `point`; a second process on the same store takes over. One switch and one scale-down
/// reach the API server, the rollback counts once, every message goes out once.
async fn kube_kill_at(action: &str, point: HoldPoint, switched_at_kill: bool) {
    use crate::kube_fake::{seed_world, NS};
    use crate::support::fake_kube::{endpointslice, FakeKube};

    let (fake, peers) = tokio::join!(FakeKube::start(), Peers::start());
    seed_world(&fake, true);
    fake.insert(
        "endpointslices",
        endpointslice(
            NS,
            "portal-api-prod",
            "x1",
            &[("portal-api-stable-0", true), ("portal-api-stable-1", true)],
        ),
    );
    fake.run_controllers();
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new(dir.path()).await;
    let store = Store::connect(&db.url, 2).await.expect("connect to the test store");
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("portal-api-k8s.yaml"), KUBE_POLICY).unwrap();
    let proxy = AwsProxy::start(&fake.url(), 2).await;
    let env = |name: &str, caller: usize| {
        let mut env = env_for(&db.url, &policies, name, "http://127.0.0.1:9", &peers);
        env.push((
            "ROLLBACK_RESPONDER__KUBERNETES__KUBECONFIG".into(),
            kubeconfig(dir.path(), name, proxy.endpoint(caller)),
        ));
        env
    };

    let mut first = ResponderProcess::start("first", &env("first", 0)).await;
    let mut held = proxy.hold_next(action, point);
    let starts = ago(60);
    post(
        &first,
        &payload(
            "firing",
            vec![alert("HighErrorRate", "portal-api", "kcrash01", &starts, None)],
        ),
    )
    .await;
    assert_eq!(
        held.caught(Duration::from_secs(20)).await,
        0,
        "the first process made the call"
    );
    let inc = wait_incident(&store, "executing", |i| i.phase == Phase::Executing).await;
    wait_delivered(&store, &inc).await;
    let at_kill = store.events(&inc.id).await.unwrap();
    assert!(
        at_kill
            .iter()
            .any(|e| e.kind.as_str() == "action_step" && e.detail["step"] == "planned" && e.detail["dry_run"] == false),
        "the switch's intent is committed before it is sent:\n{}",
        show(&at_kill)
    );
    assert_eq!(
        proxy.count(SWITCH),
        usize::from(switched_at_kill),
        "{:#?}",
        proxy.calls()
    );
    assert_eq!(proxy.count(SCALE_DOWN), 0, "{:#?}", proxy.calls());
    first.kill();

    let second = ResponderProcess::start("second", &env("second", 1)).await;
    let inc = wait_incident(&store, "verified after the takeover", |i| i.phase == Phase::Verified).await;
    assert_eq!(proxy.count(SWITCH), 1, "one selector switch: {:#?}", proxy.calls());
    assert_eq!(proxy.count(SCALE_DOWN), 1, "one scale-down: {:#?}", proxy.calls());
    let svc = fake.get("services", NS, "portal-api-prod").expect("service");
    assert_eq!(
        svc["spec"]["selector"],
        serde_json::json!({"app": "portal-api", "version": "v1.0.0-rc.0"})
    );
    let canary = fake.get("deployments", NS, "portal-api-canary").expect("canary");
    assert_eq!(canary["spec"]["replicas"], 0, "{canary}");
    assert!(inc.executed(), "one rollback counted (acted_at): {inc:#?}");
    let timeline = store.events(&inc.id).await.unwrap();
    let succeeded = of_kind(&timeline, "action_succeeded");
    assert_eq!(succeeded.len(), 1, "{}", show(&timeline));
    assert_eq!(succeeded[0].actor, "second", "{}", show(&timeline));
    assert!(of_kind(&timeline, "action_failed").is_empty(), "{}", show(&timeline));

    let msgs = wait_delivered(&store, &inc).await;
    drop(second);
    for (channel, server) in [("slack", &peers.slack), ("pagerduty", &peers.pagerduty)] {
        let queued = msgs.iter().filter(|m| m["channel"] == channel).count();
        assert_eq!(
            received(server).await.len(),
            queued,
            "{channel}: sent once per queued message: {msgs:#?}"
        );
    }
    let slack = received(&peers.slack).await;
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
    assert_eq!(
        unique.len(),
        said.len(),
        "Slack replies repeated after the takeover: {said:#?}"
    );
    let change_events = received(&peers.pagerduty)
        .await
        .iter()
        .filter(|(_, p, _, _)| p == "/v2/change/enqueue")
        .count();
    assert_eq!(change_events, 1, "one rollback announced");
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_killed_after_the_switch_intent_before_the_switch_reached_the_api_server() {
    kube_kill_at(SWITCH, HoldPoint::BeforeForward, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_killed_after_the_switch_was_applied_before_the_scale_down() {
    kube_kill_at(SWITCH, HoldPoint::AfterForward, true).await;
}

/// A replica dies between two steps of a gradual shift; the one that takes over goes on from
/// the weights at the listener, counts the wait before its first step from the last step the
/// first replica recorded (neither skipping it nor waiting a whole interval again), waits the
/// interval before the next, and the timeline and Slack say where it resumed. The rollback is
/// counted from the first replica's first write, when the traffic first moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_two_gradual_steps_the_takeover_resumes_with_the_interval() {
    let (fx, peers) = tokio::join!(AlbFixture::start(), Peers::start());
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new(dir.path()).await;
    let store = Store::connect(&db.url, 2).await.expect("connect to the test store");
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let interval = chrono::Duration::seconds(3);
    let policy = format!(
        r##"
name: portal-api
service: portal-api
matchers: ['service="portal-api"']
target:
  alb:
    listener_arn: {listener}
    stable_target_group_arn: {stable}
    gradual: {{steps: [80, 90, 100], interval: 3s}}
triggers:
  - name: errors
    matchers: ['alertname="HighErrorRate"']
    mode: auto
verification: {{bake: 1s, interval: 200ms}}
notify:
  slack: {{channel: "#portal-alerts"}}
"##,
        listener = fx.listener_arn,
        stable = fx.stable_tg
    );
    std::fs::write(policies.join("portal-api.yaml"), policy).unwrap();
    let proxy = AwsProxy::start(&fx.moto.endpoint, 2).await;

    let mut first = ResponderProcess::start(
        "first",
        &env_for(&db.url, &policies, "first", proxy.endpoint(0), &peers),
    )
    .await;
    post(
        &first,
        &payload(
            "firing",
            vec![alert("HighErrorRate", "portal-api", "crashgr01", &ago(60), None)],
        ),
    )
    .await;
    // Killed once it has written 80 % and begun waiting for the 90 % step.
    let inc = wait_incident(&store, "executing", |i| i.phase == Phase::Executing).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let events = store.events(&inc.id).await.unwrap();
        if events
            .iter()
            .any(|e| e.kind.as_str() == "action_step" && e.detail["step"] == "waiting")
        {
            break;
        }
        assert!(Instant::now() < deadline, "no wait recorded:\n{}", show(&events));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // What was queued goes out first, so the kill interrupts the wait, not a delivery (a
    // message cut mid-request is held for the outbox's 60 s delivery lease).
    wait_delivered(&store, &inc).await;
    first.kill();
    assert_eq!(
        weights(&fx.listener_actions().await)[0].1,
        80,
        "killed during the wait after the 80 % step"
    );

    let _second = ResponderProcess::start(
        "second",
        &env_for(&db.url, &policies, "second", proxy.endpoint(1), &peers),
    )
    .await;
    let inc = wait_incident(&store, "verified after the takeover", |i| i.phase == Phase::Verified).await;
    let timeline = store.events(&inc.id).await.unwrap();
    let wrote: Vec<(&str, u64, chrono::DateTime<chrono::Utc>)> = timeline
        .iter()
        .filter(|e| e.kind.as_str() == "action_step" && e.detail["step"] == "wrote")
        .map(|e| (e.actor.as_str(), e.detail["stable_percent"].as_u64().unwrap(), e.at))
        .collect();
    assert_eq!(
        wrote.iter().map(|w| (w.0, w.1)).collect::<Vec<_>>(),
        vec![("first", 80), ("second", 90), ("second", 100)],
        "{}",
        show(&timeline)
    );
    assert_eq!(proxy.count("ModifyListener"), 3, "{:#?}", proxy.calls());
    assert_eq!(
        weights(&fx.listener_actions().await),
        vec![(fx.stable_tg.clone(), 100), (fx.canary_tg.clone(), 0)]
    );
    let taken_over = of_kind(&timeline, "action_started")
        .into_iter()
        .find(|e| e.actor == "second")
        .expect("the takeover's start")
        .at;
    // 90 % an interval after the 80 % write, not at the takeover and not an interval after it.
    assert!(wrote[1].2 - wrote[0].2 >= interval, "{}", show(&timeline));
    assert!(
        wrote[1].2 - taken_over < interval - chrono::Duration::milliseconds(500),
        "the wait began again at the takeover:\n{}",
        show(&timeline)
    );
    assert!(wrote[2].2 - wrote[1].2 >= interval, "{}", show(&timeline));
    let resumed = timeline
        .iter()
        .find(|e| e.kind.as_str() == "action_step" && e.detail["step"] == "resumed")
        .unwrap_or_else(|| panic!("no resumed step:\n{}", show(&timeline)));
    assert_eq!(resumed.actor, "second");
    assert!(
        resumed.summary.starts_with(&format!(
            "resuming the interrupted gradual shift of {} at 80% stable (the earlier attempt's 80% step, recorded ",
            fx.listener_arn
        )) && resumed.summary.contains("before shifting to 90% stable"),
        "{}",
        resumed.summary
    );
    let succeeded = of_kind(&timeline, "action_succeeded");
    assert_eq!(succeeded.len(), 1, "{}", show(&timeline));
    assert!(
        succeeded[0]
            .summary
            .starts_with("resumed the change the interrupted earlier attempt of first had begun (its first write at "),
        "{}",
        succeeded[0].summary
    );
    // Counted from the first replica's first write (its intent, committed right before it).
    let intent = timeline
        .iter()
        .find(|e| e.kind.as_str() == "action_step" && e.detail["step"] == "planned")
        .unwrap();
    assert_eq!((intent.actor.as_str(), inc.acted_at), ("first", Some(intent.at)));
    // Slack's thread says it too.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let slack = received(&peers.slack).await;
        if slack.iter().any(|(_, _, b, _)| {
            b["text"]
                .as_str()
                .is_some_and(|t| t.contains("resuming the interrupted gradual shift"))
        }) {
            break;
        }
        if Instant::now() > deadline {
            let texts: Vec<&str> = slack.iter().filter_map(|(_, _, b, _)| b["text"].as_str()).collect();
            let outbox: Vec<String> = store
                .messages(&inc.id)
                .await
                .expect("outbox")
                .iter()
                .map(|m| {
                    format!(
                        "{} {} {} {} {}",
                        m["id"], m["channel"], m["state"], m["attempts"], m["message"]["text"]
                    )
                })
                .collect();
            panic!("not said in Slack: {texts:#?}\noutbox: {outbox:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
