//! Sequences that real incidents produce: bad data next to good, alerts joining, holds
//! ending. Each test asserts on what the peer saw (moto's listener weights), not only on the
//! incident's phase.

use rollback_responder::action::Executors;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::peers::Alertmanager;
use crate::support::alb_fixture::{weights, AlbFixture};

fn uniq(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// A policy for the ALB on moto, service `svc`, with the shipped error-rate triggers.
fn alb_policy(fx: &AlbFixture, svc: &str) -> String {
    format!(
        r#"
name: {svc}
service: {svc}
matchers: ['service="{svc}"']
target:
  alb:
    listener_arn: {}
    stable_target_group_arn: {}
triggers:
  - name: error-rate-above-5pct
    matchers: ['alertname="HighErrorRate"']
    for: 0s
    mode: auto
verification:
  bake: 1s
  interval: 200ms
"#,
        fx.listener_arn, fx.stable_tg
    )
}

/// The isolation case: an alert whose `startsAt + for` lies past the end of the calendar
/// comes first, an automatic alert of another service right behind it. The bad one is set
/// aside with its reason (API and metric); the good one is decided and rolls back in moto.
#[tokio::test]
async fn an_alert_past_the_calendar_is_set_aside_and_another_service_still_rolls_back() {
    let fx = AlbFixture::start().await;
    let app = spawn_app(Options {
        policies: vec![
            ("checkout.yaml", CHECKOUT_POLICY.to_string()),
            ("portal.yaml", alb_policy(&fx, "portal")),
        ],
        executors: Some(Executors {
            alb: Some(fx.executor()),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    let before = weights(&fx.listener_actions().await);
    assert_eq!(before, vec![(fx.stable_tg.clone(), 75), (fx.canary_tg.clone(), 25)]);

    let mut bad = alert(
        "HealthCheckFailing",
        "checkout",
        "badbadbadbad0001",
        "+262142-12-31T23:59:59Z",
        None,
    );
    bad["labels"]["run"] = json!(uniq("bad"));
    let good = alert("HighErrorRate", "portal", "600d600d600d0001", &ago(60), None);
    let r = app.post_webhook(&payload("firing", vec![bad, good])).await;
    assert!(r.status().is_success(), "{}", r.status());

    let list = app
        .wait_incidents("the portal rollback verified", |l| {
            l.iter().any(|i| i["service"] == "portal" && i["phase"] == "verified")
        })
        .await;
    assert_eq!(list.len(), 1, "the bad alert opens nothing: {list:?}");
    assert_eq!(
        weights(&fx.listener_actions().await),
        vec![(fx.stable_tg.clone(), 100), (fx.canary_tg.clone(), 0)],
        "moto saw the rollback"
    );

    let undecidable = app.get_json("/api/v1/alerts/undecidable").await;
    let alerts = undecidable["alerts"].as_array().unwrap();
    assert_eq!(alerts.len(), 1, "{undecidable}");
    assert_eq!(alerts[0]["fingerprint"], "badbadbadbad0001");
    assert_eq!(alerts[0]["alertname"], "HealthCheckFailing");
    let problem = alerts[0]["problem"].as_str().unwrap();
    assert!(
        problem.contains("+262142") || problem.contains("panicked"),
        "the reason names the bad data: {problem}"
    );
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("decisions_total{") && l.contains("outcome=\"undecidable\"") && !l.ends_with(" 0")),
        "counted in a metric:\n{metrics}"
    );
    assert_eq!(
        app.responder.store.pending_alert_ids(10).await.unwrap(),
        Vec::<i64>::new(),
        "nothing left pending: the loop is not stuck on the bad alert"
    );
}

/// The sequences policy: the shipped modes with `for`s of seconds, a 1-hour approval timeout (so
/// nothing below can be explained by an expiry), and a cooldown of `cooldown`.
fn mixed_policy(fx: &AlbFixture, svc: &str, cooldown: &str, timeout: &str) -> String {
    format!(
        r#"
name: {svc}
service: {svc}
matchers: ['service="{svc}"']
target:
  alb:
    listener_arn: {}
    stable_target_group_arn: {}
triggers:
  - name: health
    matchers: ['alertname="HealthCheckFailing"']
    for: 2s
    mode: auto
  - name: errors
    matchers: ['alertname="HighErrorRate"']
    for: 2s
    mode: auto
  - name: latency
    matchers: ['alertname="HighLatency"']
    mode: manual
  - name: elevated
    matchers: ['alertname="ElevatedErrorRate"']
    for: 6s
    mode: {{auto_after: 1h}}
guards:
  cooldown: {cooldown}
approval:
  approvers: {{slack_users: [U1]}}
  timeout: {timeout}
  on_timeout: escalate
verification:
  bake: 1s
  interval: 200ms
"#,
        fx.listener_arn, fx.stable_tg
    )
}

struct Seq {
    fx: AlbFixture,
    app: TestApp,
    am: Alertmanager,
    svc: String,
    run: String,
}

impl Seq {
    async fn start(cooldown: &str) -> Seq {
        Self::start_with(cooldown, "1h", vec![]).await
    }

    async fn start_with(cooldown: &str, timeout: &str, env: Vec<(String, String)>) -> Seq {
        Self::start_policy(|fx, svc| mixed_policy(fx, svc, cooldown, timeout), env).await
    }

    async fn start_policy(policy: impl FnOnce(&AlbFixture, &str) -> String, env: Vec<(String, String)>) -> Seq {
        let fx = AlbFixture::start().await;
        let svc = "shop".to_string();
        let app = spawn_app(Options {
            policies: vec![("shop.yaml", policy(&fx, &svc))],
            executors: Some(Executors {
                alb: Some(fx.executor()),
                ..Default::default()
            }),
            env,
            ..Options::default()
        })
        .await;
        let am = Alertmanager::start(&app.url("/webhook/alertmanager"), TOKEN).await;
        assert_eq!(
            weights(&fx.listener_actions().await),
            vec![(fx.stable_tg.clone(), 75), (fx.canary_tg.clone(), 25)]
        );
        Seq {
            fx,
            app,
            am,
            svc,
            run: uniq("seq"),
        }
    }

    fn labels(&self, name: &str) -> Value {
        json!({"alertname": name, "service": self.svc, "severity": "critical", "run": self.run})
    }

    /// Fires `name` through Alertmanager, started now.
    async fn fire(&self, name: &str) -> String {
        let starts = ago(0);
        self.am.post(self.labels(name), &starts, None).await;
        starts
    }

    async fn stable_weight(&self) -> i32 {
        weights(&self.fx.listener_actions().await)[0].1
    }

    async fn one_incident(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let list = self.app.wait_incidents(what, |l| l.len() == 1 && pred(&l[0])).await;
        self.app.incident(list[0]["id"].as_str().unwrap()).await
    }
}

fn summaries(inc: &Value) -> Vec<String> {
    inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}: {}",
                e["kind"].as_str().unwrap_or(""),
                e["summary"].as_str().unwrap_or("")
            )
        })
        .collect()
}

/// Case 1: a manual request is pending; an automatic health alert joins young and rolls back
/// when it passes its `for`, not when the (1-hour) request expires. Alertmanager's re-sends
/// carry the same startsAt and wake nothing: the due time is on the incident.
#[tokio::test]
async fn a_young_automatic_alert_joining_a_pending_request_rolls_back_when_it_is_old_enough() {
    let s = Seq::start("1h").await;
    s.fire("HighLatency").await;
    s.one_incident("latency request pending", |i| i["phase"] == "awaiting_approval")
        .await;
    s.fire("HealthCheckFailing").await;
    let inc = s
        .one_incident("rolled back on the health trigger", |i| i["phase"] == "verified")
        .await;
    assert_eq!(s.stable_weight().await, 100, "moto saw the rollback");
    assert_eq!(inc["trigger"], "health", "the stronger trigger names the incident");
    let lines = summaries(&inc);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("decided: trigger health is stronger than latency")),
        "{lines:#?}"
    );
    assert!(!lines.iter().any(|l| l.contains("approval_expired")), "{lines:#?}");
}

/// Case 5 (and 6): ElevatedErrorRate opens the incident (too young for 6 s), HighErrorRate
/// joins and passes its 2 s first: the automatic trigger acts and names the incident instead
/// of being re-evaluated from the oldest alert.
#[tokio::test]
async fn the_strongest_trigger_acts_even_when_a_weaker_one_opened_the_incident() {
    let s = Seq::start("1h").await;
    s.fire("ElevatedErrorRate").await;
    let first = s.one_incident("elevated waiting", |i| i["phase"] == "waiting").await;
    assert_eq!(first["trigger"], "elevated");
    s.fire("HighErrorRate").await;
    let inc = s
        .one_incident("rolled back on the errors trigger", |i| i["phase"] == "verified")
        .await;
    assert_eq!(s.stable_weight().await, 100, "moto saw the rollback");
    assert_eq!(inc["trigger"], "errors");
    assert_eq!(inc["decision"]["trigger"], "errors");
    assert_eq!(inc["decision"]["outcome"], "auto");
}

/// `auto_after` rolls back on its timer for the alert that asked, only while that alert still
/// fires. Here ElevatedErrorRate (auto_after 8 s) asks, HighLatency (manual) joins, and
/// ElevatedErrorRate resolves before its time: the request then stands on the latency trigger,
/// which needs a person. Before, the timer rolled back anyway.
#[tokio::test]
async fn an_auto_after_request_whose_alert_resolved_does_not_roll_back_on_its_timer() {
    let s = Seq::start_policy(
        |fx, svc| {
            mixed_policy(fx, svc, "1h", "1h").replace(
                "for: 6s\n    mode: {auto_after: 1h}",
                "for: 0s\n    mode: {auto_after: 8s}",
            )
        },
        vec![],
    )
    .await;
    let elevated = s.fire("ElevatedErrorRate").await;
    s.one_incident("elevated asks", |i| {
        i["phase"] == "awaiting_approval" && i["trigger"] == "elevated"
    })
    .await;
    s.fire("HighLatency").await;
    s.am.post(s.labels("ElevatedErrorRate"), &elevated, Some(&ago(0))).await;
    // Past the 8 s, with room for Alertmanager's group wait and the due tick.
    tokio::time::sleep(std::time::Duration::from_secs(12)).await;
    let inc = s
        .one_incident("the request re-decided on latency", |i| {
            i["phase"] == "awaiting_approval" && i["decision"]["trigger"] == "latency"
        })
        .await;
    assert_eq!(
        s.stable_weight().await,
        75,
        "nothing rolled back: {:#?}",
        summaries(&inc)
    );
    let lines = summaries(&inc);
    assert!(
        lines.iter().any(|l| l.contains("trigger elevated no longer fires")),
        "{lines:#?}"
    );
    assert!(!lines.iter().any(|l| l.starts_with("approval_expired")), "{lines:#?}");
}

/// Case 2: a deny covers the request denied (the latency trigger); a health check that fires
/// later still rolls back, and the thread says what the deny covered and why this acts.
#[tokio::test]
async fn after_a_deny_a_later_automatic_trigger_still_rolls_back_and_says_why() {
    let s = Seq::start("1h").await;
    s.fire("HighLatency").await;
    let inc = s
        .one_incident("latency request pending", |i| i["phase"] == "awaiting_approval")
        .await;
    let id = rollback_responder::incident::IncidentId(inc["id"].as_str().unwrap().to_string());
    let who = rollback_responder::approval::Person::slack("U1", vec![]);
    let r = s
        .app
        .responder
        .vote(
            &id,
            &who,
            rollback_responder::approval::Verdict::Deny {
                reason: Some("latency is expected during the migration".into()),
            },
            "test",
        )
        .await
        .unwrap();
    assert_eq!(r, rollback_responder::approval::VoteResult::Denied);
    assert_eq!(s.stable_weight().await, 75, "the deny rolled nothing back");

    s.fire("HealthCheckFailing").await;
    let inc = s
        .one_incident("rolled back on the health trigger", |i| i["phase"] == "verified")
        .await;
    assert_eq!(s.stable_weight().await, 100, "moto saw the rollback");
    let lines = summaries(&inc);
    let acted = lines
        .iter()
        .find(|l| l.starts_with("decided: the deny earlier covered the request of trigger(s) latency"))
        .unwrap_or_else(|| panic!("{lines:#?}"));
    assert!(acted.contains("automatic trigger health"), "{acted}");
}

/// Case 4: a new incident held by the cooldown is decided again when the cooldown ends, while
/// its alert still fires, and rolls back then.
#[tokio::test]
async fn an_incident_held_by_the_cooldown_rolls_back_when_the_cooldown_ends() {
    let s = Seq::start("8s").await;
    let starts = s.fire("HighErrorRate").await;
    s.one_incident("first rollback", |i| i["phase"] == "verified").await;
    assert_eq!(s.stable_weight().await, 100);
    // The alert resolves, the first incident closes; someone shifts traffic back to the canary.
    s.am.post(s.labels("HighErrorRate"), &starts, Some(&ago(0))).await;
    s.app
        .wait_incidents("first incident closed", |l| l.len() == 1 && l[0]["open"] == false)
        .await;
    s.fx.elb
        .modify_listener()
        .listener_arn(&s.fx.listener_arn)
        .default_actions(crate::support::alb_fixture::forward(
            &[(s.fx.stable_tg.as_str(), 75), (s.fx.canary_tg.as_str(), 25)],
            Some(300),
        ))
        .send()
        .await
        .unwrap();

    s.fire("HealthCheckFailing").await;
    let list = s
        .app
        .wait_incidents("second incident held by the cooldown", |l| {
            l.iter().any(|i| i["open"] == true && i["phase"] == "suppressed")
        })
        .await;
    let held = list.iter().find(|i| i["open"] == true).unwrap();
    assert_eq!(held["decision"]["kind"], "cooldown", "{held}");
    assert!(held["due_at"].is_string(), "due when the cooldown ends: {held}");
    assert_eq!(s.stable_weight().await, 75, "held: nothing written yet");

    let id = held["id"].as_str().unwrap().to_string();
    let inc = s
        .app
        .wait_incident(&id, "rolled back after the cooldown", |i| i["phase"] == "verified")
        .await;
    assert_eq!(s.stable_weight().await, 100, "moto saw the second rollback");
    let lines = summaries(&inc);
    assert!(
        lines.iter().any(|l| l.starts_with("decided: the hold has ended")),
        "{lines:#?}"
    );
}

/// Case 4 with a freeze: an incident held by the kill switch is decided again the moment the
/// freeze is lifted (its alert still fires) and rolls back then, not at the freeze's planned end.
#[tokio::test]
async fn an_incident_held_by_a_freeze_rolls_back_when_the_freeze_is_lifted() {
    let s = Seq::start_with(
        "1h",
        "1h",
        env(&[("ROLLBACK_RESPONDER__API__BEARER_TOKEN", "operator-token")]),
    )
    .await;
    let r = s
        .app
        .http
        .post(s.app.url("/api/v1/freezes"))
        .bearer_auth("operator-token")
        .json(&json!({"reason": "database failover", "duration": "1h", "by": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    s.fire("HealthCheckFailing").await;
    let held = s
        .one_incident("held by the freeze", |i| {
            i["phase"] == "suppressed" && i["decision"]["kind"] == "frozen"
        })
        .await;
    assert_eq!(s.stable_weight().await, 75, "frozen: nothing written");

    let r = s
        .app
        .http
        .delete(s.app.url("/api/v1/freezes/*"))
        .bearer_auth("operator-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["lifted"], true);
    let id = held["id"].as_str().unwrap().to_string();
    let inc = s
        .app
        .wait_incident(&id, "rolled back after the freeze was lifted", |i| {
            i["phase"] == "verified"
        })
        .await;
    assert_eq!(s.stable_weight().await, 100, "moto saw the rollback");
    let lines = summaries(&inc);
    assert!(
        lines.iter().any(|l| l.starts_with("decided: the hold has ended")),
        "{lines:#?}"
    );
}

/// Case 3: after a request escalated ("ROLLBACK NEEDS A HUMAN"), `/rollback now` by an approver
/// rolls back instead of being refused as "already open on this target".
#[tokio::test]
async fn after_an_escalation_rollback_now_rolls_back() {
    let s = Seq::start_with("1h", "1s", vec![]).await;
    s.fire("HighLatency").await;
    let inc = s
        .one_incident("escalated on timeout", |i| i["phase"] == "escalated")
        .await;
    assert_eq!(s.stable_weight().await, 75, "nothing automatic after the escalation");
    let who = rollback_responder::approval::Person::slack("U1", vec![]);
    let (id, _) = s
        .app
        .responder
        .start_manual("shop", &who, "latency is hurting checkout")
        .await
        .unwrap();
    assert_eq!(
        id.0,
        inc["id"].as_str().unwrap(),
        "the open incident is the one rolled back"
    );
    let inc = s
        .app
        .wait_incident(&id.0, "rolled back by hand", |i| i["phase"] == "verified")
        .await;
    assert_eq!(s.stable_weight().await, 100, "moto saw the rollback");
    let lines = summaries(&inc);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("human_rollback: rolled back by hand: <@U1>")
                || l.starts_with("human_rollback: rolled back by hand:")),
        "{lines:#?}"
    );
}

/// Fairness (item 9): a flood of one Alertmanager group that only joins an open incident does
/// not hold up another group's automatic alert: it is decided while the flood's backlog is
/// still pending (without the fair order it waits for the whole backlog).
#[tokio::test]
async fn another_services_alert_is_decided_ahead_of_a_flood_that_only_joins() {
    let fx = AlbFixture::start().await;
    let app = spawn_app(Options {
        policies: vec![
            ("checkout.yaml", CHECKOUT_POLICY.to_string()),
            ("portal.yaml", alb_policy(&fx, "portal")),
        ],
        executors: Some(Executors {
            alb: Some(fx.executor()),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    let grouped = |key: &str, alerts: Vec<Value>| {
        let mut p = payload("firing", alerts);
        p["groupKey"] = json!(key);
        p
    };
    // The flood's first alert opens a pending request; all the others only join it.
    let starts = ago(60);
    let first = alert("HighLatency", "checkout", "f100000000000000", &starts, None);
    app.post_webhook(&grouped("{}:{service=\"checkout\"}", vec![first]))
        .await;
    app.wait_incidents("the flood's incident", |l| l.len() == 1).await;
    const FLOOD: usize = 20_000;
    for chunk in 0..FLOOD / 500 {
        let alerts = (0..500)
            .map(|i| {
                let mut a = alert(
                    "HighLatency",
                    "checkout",
                    &format!("{:016x}", chunk * 500 + i + 1),
                    &starts,
                    None,
                );
                a["labels"]["instance"] = json!(format!("i-{chunk}-{i}"));
                a
            })
            .collect();
        let r = app.post_webhook(&grouped("{}:{service=\"checkout\"}", alerts)).await;
        assert!(r.status().is_success(), "{}", r.status());
    }
    let good = alert("HighErrorRate", "portal", "600d600d600d0002", &ago(60), None);
    let posted = std::time::Instant::now();
    app.post_webhook(&grouped("{}:{service=\"portal\"}", vec![good])).await;
    let stored = posted.elapsed();
    let t = std::time::Instant::now();
    app.wait_incidents("the portal incident", |l| l.iter().any(|i| i["service"] == "portal"))
        .await;
    let took = t.elapsed();
    let left = app.responder.store.pending_alert_ids(100_000).await.unwrap().len();
    eprintln!(
        "portal alert stored in {stored:?}, decided {took:?} after its 2xx, with {left} flood alerts still pending"
    );
    assert!(left > 0, "decided only after the whole flood ({took:?})");
    app.wait_incidents("the portal rollback verified", |l| {
        l.iter().any(|i| i["service"] == "portal" && i["phase"] == "verified")
    })
    .await;
    assert_eq!(
        weights(&fx.listener_actions().await),
        vec![(fx.stable_tg.clone(), 100), (fx.canary_tg.clone(), 0)],
        "moto saw the rollback"
    );
}

mod switches;
