//! Incidents from alert to settled phase, straight at the webhook (no Alertmanager): decisions,
//! dedup, joining, resolution, waiting, approval expiry, restart.

use serde_json::Value;

use rollback_responder::action::alb::AlbExecutor;

use crate::helpers::*;
use crate::support::alb_fixture::{elb_client, fast_settings, weights, LISTENER_WEIGHTS, RULE_WEIGHTS};
use crate::support::aws_proxy::AwsProxy;

fn phase(i: &Value) -> &str {
    i["phase"].as_str().unwrap_or("")
}

#[tokio::test]
async fn automatic_decision_records_the_plan_and_says_nothing_was_executed() {
    // No executor: the test app runs in dry run (outside it, start-up would refuse).
    let app = spawn_app(Options::default()).await;
    let r = app
        .post_webhook(&payload(
            "firing",
            vec![alert("HighErrorRate", "checkout", "ba01", &ago(30), None)],
        ))
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["stored"], 1);
    let list = app
        .wait_incidents("a settled incident", |l| l.len() == 1 && phase(&l[0]) == "dry_run")
        .await;
    let inc = app.incident(list[0]["id"].as_str().unwrap()).await;
    assert_eq!(inc["policy"], "checkout");
    assert_eq!(inc["executed"], false);
    assert_eq!(inc["decision"]["outcome"], "suppressed");
    assert_eq!(inc["decision"]["kind"], "dry_run");
    assert_eq!(inc["decision"]["would"]["outcome"], "auto");
    assert!(inc["decision"]["reason"]
        .as_str()
        .unwrap()
        .contains("roll back automatically"));
    assert_eq!(
        inc["decision"]["policy_hash"],
        app.get_json("/api/v1/policies").await["hash"]
    );
    let kinds: Vec<&str> = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["opened", "decided", "action_started", "action_succeeded"]);
    let last = &inc["timeline"][3];
    assert!(
        last["summary"]
            .as_str()
            .unwrap()
            .starts_with("not executed (dry run): would forward 100 % of"),
        "{last}"
    );
    assert_eq!(last["detail"]["executed"], false);
    assert_eq!(inc["alerts"][0]["labels"]["alertname"], "HighErrorRate");
}

#[tokio::test]
async fn duplicate_and_superset_deliveries_open_one_incident() {
    let app = spawn_app(Options::default()).await;
    let starts = ago(30);
    let first = payload(
        "firing",
        vec![alert("HighErrorRate", "checkout", "bb01", &starts, None)],
    );
    for _ in 0..3 {
        assert_eq!(app.post_webhook(&first).await.status(), 200);
    }
    // The group grows: the same alert again plus a new one for the same target.
    let grown = payload(
        "firing",
        vec![
            alert("HighErrorRate", "checkout", "bb01", &starts, None),
            alert("HealthCheckFailing", "checkout", "bb02", &ago(30), None),
        ],
    );
    let v: Value = app.post_webhook(&grown).await.json().await.unwrap();
    assert_eq!((v["stored"].as_u64(), v["duplicates"].as_u64()), (Some(1), Some(1)));
    let list = app
        .wait_incidents("one settled incident", |l| l.len() == 1 && phase(&l[0]) == "dry_run")
        .await;
    let inc = app
        .wait_incident(list[0]["id"].as_str().unwrap(), "both alerts attached", |i| {
            i["alerts"].as_array().unwrap().len() == 2
        })
        .await;
    let decided = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "decided")
        .count();
    assert_eq!(decided, 1, "one decision for one incident");
    assert_eq!(app.responder.store.alert_count().await.unwrap(), 2);
}

#[tokio::test]
async fn resolved_alert_closes_the_incident_and_cancels_a_pending_approval() {
    let app = spawn_app(Options::default()).await;
    let starts = ago(5);
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighLatency", "checkout", "bc01", &starts, None)],
    ))
    .await;
    let list = app
        .wait_incidents("awaiting approval", |l| {
            l.len() == 1 && phase(&l[0]) == "awaiting_approval"
        })
        .await;
    assert_eq!(list[0]["decision"]["would"]["outcome"], "needs_approval");
    app.post_webhook(&payload(
        "resolved",
        vec![alert("HighLatency", "checkout", "bc01", &starts, Some(&ago(0)))],
    ))
    .await;
    let list = app
        .wait_incidents("cancelled", |l| phase(&l[0]) == "cancelled" && l[0]["open"] == false)
        .await;
    let inc = app.incident(list[0]["id"].as_str().unwrap()).await;
    let kinds: Vec<&str> = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["opened", "decided", "alert_resolved", "all_alerts_resolved", "closed"]
    );
    // A late firing duplicate from an HA peer does not reopen anything.
    let v: Value = app
        .post_webhook(&payload(
            "firing",
            vec![alert("HighLatency", "checkout", "bc01", &starts, None)],
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (v["stored"].as_u64(), v["duplicates"].as_u64()),
        (Some(0), Some(1)),
        "{v}"
    );
    app.wait_alerts_decided().await;
    assert_eq!(app.incidents().await.len(), 1);
    assert_eq!(phase(&app.incidents().await[0]), "cancelled");
}

#[tokio::test]
async fn too_young_alert_waits_then_rolls_back_if_still_firing() {
    let app = spawn_app(Options::default()).await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HealthCheckFailing", "checkout", "bd01", &ago(0), None)],
    ))
    .await;
    let list = app
        .wait_incidents("waiting", |l| l.len() == 1 && phase(&l[0]) == "waiting")
        .await;
    assert!(list[0]["decision"]["reason"].as_str().unwrap().starts_with("too young"));
    let list = app
        .wait_incidents("re-decided after 2s", |l| phase(&l[0]) == "dry_run")
        .await;
    let inc = app.incident(list[0]["id"].as_str().unwrap()).await;
    let redecided = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["summary"].as_str().unwrap().starts_with("re-evaluated:"));
    assert!(redecided, "{inc}");
}

/// The startsAt of the incident's first alert.
async fn list_start(app: &TestApp, list: &[Value]) -> String {
    let inc = app.incident(list[0]["id"].as_str().unwrap()).await;
    inc["alerts"][0]["startsAt"]
        .as_str()
        .or_else(|| inc["alerts"][0]["starts_at"].as_str())
        .unwrap_or_else(|| panic!("startsAt of {}", inc["alerts"][0]))
        .to_string()
}

/// A second instance that is too young as well joins the waiting incident without moving its
/// re-check later: the first alert qualifies at its own time.
#[tokio::test]
async fn a_younger_alert_joining_a_waiting_incident_does_not_postpone_it() {
    let app = spawn_app(Options::default()).await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HealthCheckFailing", "checkout", "bd11", &ago(0), None)],
    ))
    .await;
    let list = app
        .wait_incidents("waiting", |l| l.len() == 1 && phase(&l[0]) == "waiting")
        .await;
    let due = list[0]["due_at"].as_str().unwrap().to_string();
    // The second instance started 1.1 s after the first (its startsAt says so; no need to
    // wait that long), so on its own it would qualify 1.1 s later.
    let first_start = chrono::DateTime::parse_from_rfc3339(&list_start(&app, &list).await).unwrap();
    let second_start = (first_start + chrono::Duration::milliseconds(1100)).to_rfc3339();
    app.post_webhook(&payload(
        "firing",
        vec![alert("HealthCheckFailing", "checkout", "bd12", &second_start, None)],
    ))
    .await;
    let id = list[0]["id"].as_str().unwrap();
    for _ in 0..50 {
        let inc = app.incident(id).await;
        let joined = inc["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "alert_joined");
        if joined {
            assert_eq!(inc["due_at"].as_str(), Some(due.as_str()), "{inc}");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("the second alert never joined");
}

#[tokio::test]
async fn escalate_later_rolls_back_when_the_approval_window_ends() {
    let app = spawn_app(Options::default()).await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("CircuitBreakerOpen", "checkout", "be01", &ago(0), None)],
    ))
    .await;
    let list = app
        .wait_incidents("awaiting approval", |l| {
            l.len() == 1 && phase(&l[0]) == "awaiting_approval"
        })
        .await;
    assert_eq!(list[0]["decision"]["would"]["outcome"], "escalate_later");
    let list = app.wait_incidents("auto after 2s", |l| phase(&l[0]) == "dry_run").await;
    let inc = app.incident(list[0]["id"].as_str().unwrap()).await;
    assert!(
        inc["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "approval_expired"),
        "{inc}"
    );
}

#[tokio::test]
async fn cooldown_suppresses_a_new_incident_on_a_target_just_rolled_back_and_says_why() {
    let app = spawn_app(Options::default()).await;
    // Give the target a recent real rollback (acted_at) by hand: the executor is not configured.
    let s1 = ago(30);
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "checkout", "bf01", &s1, None)],
    ))
    .await;
    let list = app
        .wait_incidents("settled", |l| l.len() == 1 && phase(&l[0]) == "dry_run")
        .await;
    mark_acted(&app, list[0]["id"].as_str().unwrap()).await;
    app.post_webhook(&payload(
        "resolved",
        vec![alert("HighErrorRate", "checkout", "bf01", &s1, Some(&ago(0)))],
    ))
    .await;
    app.wait_incidents("closed", |l| l[0]["open"] == false).await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "checkout", "bf01", &ago(1), None)],
    ))
    .await;
    let list = app.wait_incidents("second incident", |l| l.len() == 2).await;
    assert_eq!(phase(&list[0]), "suppressed");
    assert!(
        list[0]["decision"]["reason"].as_str().unwrap().starts_with("cooldown:"),
        "{}",
        list[0]
    );
}

async fn mark_acted(app: &TestApp, id: &str) {
    let store = &app.responder.store;
    let mut tx = store.begin().await.unwrap();
    let mut inc = tx
        .incident(&rollback_responder::incident::IncidentId(id.into()))
        .await
        .unwrap()
        .unwrap();
    inc.acted_at = Some(chrono::Utc::now());
    assert!(tx.save_incident(&inc).await.unwrap());
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn dry_run_mode_is_visible_in_the_decision() {
    let app = spawn_app(Options {
        dry_run: Some(true),
        ..Options::default()
    })
    .await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "checkout", "bg01", &ago(30), None)],
    ))
    .await;
    let list = app
        .wait_incidents("dry run", |l| l.len() == 1 && phase(&l[0]) == "dry_run")
        .await;
    assert_eq!(list[0]["decision"]["outcome"], "suppressed");
    assert_eq!(list[0]["decision"]["kind"], "dry_run");
    assert!(list[0]["decision"]["reason"]
        .as_str()
        .unwrap()
        .starts_with("dry run (global)"));
    assert_eq!(list[0]["executed"], false);
}

#[tokio::test]
async fn unmatched_alerts_are_stored_but_open_no_incident() {
    let app = spawn_app(Options::default()).await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("DiskFull", "checkout", "bh01", &ago(30), None)],
    ))
    .await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "billing", "bh02", &ago(30), None)],
    ))
    .await;
    // Both alerts were decided (matching no policy) and opened nothing.
    app.wait_alerts_decided().await;
    assert!(app.incidents().await.is_empty());
    assert_eq!(app.responder.store.alert_count().await.unwrap(), 2);
}

#[tokio::test]
async fn a_pending_approval_survives_a_restart() {
    let app = spawn_app(Options::default()).await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighLatency", "checkout", "bi01", &ago(5), None)],
    ))
    .await;
    let before = app
        .wait_incidents("awaiting approval", |l| {
            l.len() == 1 && phase(&l[0]) == "awaiting_approval"
        })
        .await;
    let app = app.restart(Options::default()).await;
    // A start decides what waits again (the settings may have changed): for a request still
    // pending that keeps its expiry, once the first round has looked at it.
    let after = app
        .wait_incidents("the request's own due time", |l| {
            l.len() == 1 && l[0]["due_at"] == before[0]["due_at"]
        })
        .await;
    assert_eq!(after[0]["id"], before[0]["id"]);
    assert_eq!(phase(&after[0]), "awaiting_approval");
}

#[tokio::test]
async fn the_same_alert_twice_in_one_payload_is_stored_once_and_resolved_wins() {
    let app = spawn_app(Options::default()).await;
    let starts = ago(30);
    let body = payload(
        "firing",
        vec![
            alert("HighLatency", "checkout", "bj01", &starts, None),
            alert("HighLatency", "checkout", "bj01", &starts, Some(&ago(0))),
            alert("HighLatency", "checkout", "bj01", &starts, None),
        ],
    );
    let v: Value = app.post_webhook(&body).await.json().await.unwrap();
    assert_eq!((v["stored"].as_u64(), v["duplicates"].as_u64()), (Some(1), Some(2)));
    app.wait_alerts_decided().await;
    assert_eq!(app.responder.store.alert_count().await.unwrap(), 1);
    assert!(app.incidents().await.is_empty(), "a resolved alert opens nothing");
}

/// Alertmanager's own fingerprint format (16 hex digits), which the intake's memory of stored
/// alerts is keyed by.
fn fp(n: u64) -> String {
    format!("{:016x}", 0x5eed_0000_0000_0000 + n)
}

#[tokio::test]
async fn re_sent_alerts_are_answered_from_memory_and_their_resolve_still_goes_through() {
    let app = spawn_app(Options::default()).await;
    let starts = ago(5);
    let firing = payload("firing", vec![alert("HighLatency", "checkout", &fp(1), &starts, None)]);
    let resolved = payload(
        "resolved",
        vec![alert("HighLatency", "checkout", &fp(1), &starts, Some(&ago(0)))],
    );
    let counts = |v: Value| (v["stored"].as_u64(), v["duplicates"].as_u64());
    let post = |body: Value| {
        let app = &app;
        async move { counts(app.post_webhook(&body).await.json().await.unwrap()) }
    };
    assert_eq!(post(firing.clone()).await, (Some(1), Some(0)));
    assert_eq!(
        post(firing.clone()).await,
        (Some(0), Some(1)),
        "a re-send changes nothing"
    );
    app.wait_incidents("awaiting approval", |l| {
        l.len() == 1 && phase(&l[0]) == "awaiting_approval"
    })
    .await;
    assert_eq!(
        post(resolved.clone()).await,
        (Some(1), Some(0)),
        "firing -> resolved is stored"
    );
    app.wait_incidents("cancelled", |l| phase(&l[0]) == "cancelled" && l[0]["open"] == false)
        .await;
    assert_eq!(post(resolved).await, (Some(0), Some(1)));
    assert_eq!(
        post(firing).await,
        (Some(0), Some(1)),
        "a late firing copy reopens nothing"
    );
    app.wait_alerts_decided().await;
    assert_eq!(app.incidents().await.len(), 1);
    assert_eq!(phase(&app.incidents().await[0]), "cancelled");
    assert_eq!(app.responder.store.alert_count().await.unwrap(), 1);
}

#[tokio::test]
async fn concurrent_deliveries_each_get_their_own_counts_and_every_alert_is_stored_once() {
    let app = spawn_app(Options::default()).await;
    let starts = ago(5);
    // Forty deliveries at once, each overlapping its neighbour by one alert: 41 distinct.
    let bodies: Vec<Value> = (0..40)
        .map(|i| {
            payload(
                "firing",
                vec![
                    alert("HighLatency", "checkout", &fp(100 + i), &starts, None),
                    alert("HighLatency", "checkout", &fp(101 + i), &starts, None),
                ],
            )
        })
        .collect();
    let answers = futures::future::join_all(bodies.iter().map(|b| async {
        let r = app.post_webhook(b).await;
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()
    }))
    .await;
    let (mut stored, mut duplicates) = (0, 0);
    for a in &answers {
        let (s, d) = (a["stored"].as_u64().unwrap(), a["duplicates"].as_u64().unwrap());
        assert_eq!(s + d, 2, "{a}");
        stored += s;
        duplicates += d;
    }
    assert_eq!((stored, duplicates), (41, 39));
    assert_eq!(app.responder.store.alert_count().await.unwrap(), 41);
}

#[tokio::test]
async fn a_rollback_still_running_counts_against_the_global_rate_limit() {
    // Two policies, two targets (the listener and one of its rules), at most one rollback: both
    // alerts in one delivery are decided together, while the first rollback has not finished.
    let fx = crate::support::alb_fixture::AlbFixture::start().await;
    let policy = |name: &str, target: &str| {
        format!(
            "name: {name}\nservice: {name}\nmatchers: ['service=\"{name}\"']\ntarget:\n  alb:\n{target}    \
             stable_target_group_arn: {}\ntriggers:\n  - name: errors\n    matchers: ['alertname=\"HighErrorRate\"']\n    \
             for: 0s\n    mode: auto\nverification: {{bake: 1s, interval: 200ms}}\n",
            fx.stable_tg
        )
    };
    let aws = AwsProxy::start(&fx.moto.endpoint, 1).await;
    let app = spawn_app(Options {
        policies: vec![
            (
                "listener.yaml",
                policy("listener-api", &format!("    listener_arn: {}\n", fx.listener_arn)),
            ),
            (
                "rule.yaml",
                policy(
                    "rule-api",
                    &format!("    listener_arn: {}\n    rule_arn: {}\n", fx.listener_arn, fx.rule_arn),
                ),
            ),
        ],
        env: env(&[("ROLLBACK_RESPONDER__SAFETY__MAX_ROLLBACKS__COUNT", "1")]),
        executors: Some(rollback_responder::action::Executors {
            alb: Some(AlbExecutor::new(elb_client(aws.endpoint(0)), &fast_settings())),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    app.post_webhook(&payload(
        "firing",
        vec![
            alert("HighErrorRate", "listener-api", &fp(200), &ago(60), None),
            alert("HighErrorRate", "rule-api", &fp(201), &ago(60), None),
        ],
    ))
    .await;
    let list = app
        .wait_incidents("one rollback done, one held", |l| {
            l.len() == 2 && l.iter().any(|i| phase(i) == "verified") && l.iter().any(|i| phase(i) == "suppressed")
        })
        .await;
    let held = list.iter().find(|i| phase(i) == "suppressed").unwrap();
    assert!(
        held["decision"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("rate limit: global"),
        "{held}"
    );
    // Moto saw one write, to the target of the incident that went ahead; the other target is
    // as created.
    let done = list.iter().find(|i| phase(i) == "verified").unwrap();
    let (listener, rule) = (weights(&fx.listener_actions().await), weights(&fx.rule_actions().await));
    let split = |(stable, canary): (i32, i32)| vec![(fx.stable_tg.clone(), stable), (fx.canary_tg.clone(), canary)];
    let writes = (aws.count("ModifyListener"), aws.count("ModifyRule"));
    if done["policy"] == "listener-api" {
        assert_eq!((listener, rule, writes), (split((100, 0)), split(RULE_WEIGHTS), (1, 0)));
    } else {
        assert_eq!(done["policy"], "rule-api", "{done}");
        assert_eq!(
            (listener, rule, writes),
            (split(LISTENER_WEIGHTS), split((100, 0)), (0, 1))
        );
    }
    assert_eq!(held["executed"], false, "{held}");
}

#[tokio::test]
async fn two_alerts_resolving_in_one_delivery_close_the_incident_once() {
    let app = spawn_app(Options::default()).await;
    let (s1, s2) = (ago(30), ago(20));
    app.post_webhook(&payload(
        "firing",
        vec![
            alert("HighErrorRate", "checkout", "bz01", &s1, None),
            alert("HighErrorRate", "checkout", "bz02", &s2, None),
        ],
    ))
    .await;
    let list = app
        .wait_incidents("settled", |l| l.len() == 1 && phase(&l[0]) == "dry_run")
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    app.post_webhook(&payload(
        "resolved",
        vec![
            alert("HighErrorRate", "checkout", "bz01", &s1, Some(&ago(0))),
            alert("HighErrorRate", "checkout", "bz02", &s2, Some(&ago(0))),
        ],
    ))
    .await;
    app.wait_incident(&id, "closed", |i| i["open"] == false).await;
    app.wait_alerts_decided().await;
    let inc = app.incident(&id).await;
    let said = |text: &str| {
        inc["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["summary"] == text)
            .count()
    };
    assert_eq!(timeline_count(&inc, "alert_resolved"), 2, "{}", inc["timeline"]);
    assert_eq!(
        said("every alert of the incident has resolved"),
        1,
        "{}",
        inc["timeline"]
    );
    assert_eq!(timeline_count(&inc, "closed"), 1, "{}", inc["timeline"]);
}
