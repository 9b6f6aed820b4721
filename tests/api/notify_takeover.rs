//! What people are told once a person takes over a rollback that failed or escalated: the
//! retry updates the one status page incident the failure opened, and the escalation page is
//! resolved once, when the person takes over; a person who closes a failed incident instead
//! is not made to say it recovered. Statuspage and PagerDuty are wiremock fakes
//! that answer from what earlier requests created.

use rollback_responder::action::alb::AlbExecutor;
use rollback_responder::action::Executors;
use rollback_responder::approval::Person;
use serde_json::Value;

use crate::helpers::*;
use crate::notify::{policy_with_notify, received, Peers};
use crate::support::alb_fixture::{elb_client, fast_settings, weights, AlbFixture};
use crate::support::fault_proxy::{Fault, FaultProxy};

/// A service whose first rollback of `portal-api` fails: ELBv2 refuses the write once
/// (AccessDenied, not retried), so the incident is `failed` while its alert still fires.
struct FailedOnce {
    fx: AlbFixture,
    _proxy: FaultProxy,
    peers: Peers,
    app: TestApp,
    id: String,
    starts: String,
}

impl FailedOnce {
    async fn start(fingerprint: &str) -> FailedOnce {
        let fx = AlbFixture::start().await;
        let proxy = FaultProxy::start(&fx.moto.endpoint).await;
        proxy.inject(Fault::aws("ModifyListener", 1, 400, "AccessDenied"));
        let peers = Peers::start().await;
        let mut vars = peers.env();
        vars.extend(env(&[("ROLLBACK_RESPONDER__API__BEARER_TOKEN", "operator-token")]));
        let app = spawn_app(Options {
            policies: vec![("portal-api.yaml", policy_with_notify(&fx, "auto"))],
            env: vars,
            executors: Some(Executors {
                alb: Some(AlbExecutor::new(elb_client(&proxy.url), &fast_settings())),
                ..Default::default()
            }),
            ..Options::default()
        })
        .await;
        let starts = ago(60);
        app.post_webhook(&payload(
            "firing",
            vec![alert("HighErrorRate", "portal-api", fingerprint, &starts, None)],
        ))
        .await;
        let list = app
            .wait_incidents("the rollback failed", |l| l.len() == 1 && l[0]["phase"] == "failed")
            .await;
        assert_eq!(list[0]["open"], true, "its alert still fires");
        assert_eq!(weights(&fx.listener_actions().await)[0].1, 75, "nothing was written");
        let id = list[0]["id"].as_str().unwrap().to_string();
        FailedOnce {
            fx,
            _proxy: proxy,
            peers,
            app,
            id,
            starts,
        }
    }

    /// An approver's `/rollback now`, which this time goes through, verified.
    async fn retried_by_hand(&self) {
        let who = Person::slack("U0APPROVER", vec![]);
        let (id, _) = self
            .app
            .responder
            .start_manual("portal-api", &who, "retrying after the refused write")
            .await
            .unwrap();
        assert_eq!(id.0, self.id, "the failed incident is the one rolled back");
        self.app
            .wait_incident(&self.id, "the retry verified", |i| i["phase"] == "verified")
            .await;
        assert_eq!(
            weights(&self.fx.listener_actions().await)[0].1,
            100,
            "moto saw the rollback"
        );
    }

    /// The alert resolves; the incident closes by itself.
    async fn resolved(&self, fingerprint: &str) {
        self.app
            .post_webhook(&payload(
                "resolved",
                vec![alert(
                    "HighErrorRate",
                    "portal-api",
                    fingerprint,
                    &self.starts,
                    Some(&ago(0)),
                )],
            ))
            .await;
        self.app.wait_incident(&self.id, "closed", |i| i["open"] == false).await;
        self.app.wait_outbox_drained().await;
    }
}

/// Every event PagerDuty received, in order: `trigger main`, `resolve escalation`, `change`.
async fn pagerduty_events(peers: &Peers, id: &str) -> Vec<String> {
    let main = format!("rollback-responder/{id}");
    let escalation = format!("{main}/escalation");
    received(&peers.pagerduty)
        .await
        .into_iter()
        .map(|(_, p, b, _)| {
            if p == "/v2/change/enqueue" {
                return "change".to_string();
            }
            let key = match b["dedup_key"].as_str() {
                Some(k) if k == main => "main",
                Some(k) if k == escalation => "escalation",
                other => panic!("an event for another dedup key: {other:?}"),
            };
            format!("{} {key}", b["event_action"].as_str().unwrap_or("?"))
        })
        .collect()
}

/// (method, path, incident body) of every request Statuspage received.
async fn statuspage_requests(peers: &Peers) -> Vec<(String, String, Value)> {
    received(&peers.statuspage)
        .await
        .into_iter()
        .map(|(m, p, b, _)| (m, p, b["incident"].clone()))
        .collect()
}

#[tokio::test]
async fn a_persons_retry_after_a_failed_rollback_updates_the_one_status_page_incident() {
    let s = FailedOnce::start("to01").await;
    s.retried_by_hand().await;
    s.resolved("to01").await;

    let sp = statuspage_requests(&s.peers).await;
    let calls: Vec<(&str, &str)> = sp.iter().map(|(m, p, _)| (m.as_str(), p.as_str())).collect();
    assert_eq!(
        calls,
        [
            ("POST", "/pages/PAGE1/incidents"),
            ("PATCH", "/pages/PAGE1/incidents/sp-inc-1"),
            ("PATCH", "/pages/PAGE1/incidents/sp-inc-1"),
            ("PATCH", "/pages/PAGE1/incidents/sp-inc-1"),
        ],
        "{sp:#?}"
    );
    assert_eq!(
        s.peers.statuspage_fake.created(),
        [("sp-inc-1".to_string(), "portal-api: degraded service".to_string())],
        "one public incident"
    );
    // The failure said only "investigating"; the retry says what it did, on the same incident.
    assert_eq!(sp[0].2["status"], "investigating");
    assert_eq!(sp[1].2["status"], "identified");
    assert_eq!(sp[1].2["name"], "portal-api: degraded service, release rolled back");
    assert_eq!(
        sp[1].2["body"],
        "We identified a problem with the latest release of portal-api and rolled it back. We are checking that \
         the service has recovered."
    );
    assert_eq!(sp[2].2["status"], "monitoring");
    assert_eq!(sp[3].2["status"], "resolved");
    assert_eq!(sp[3].2["components"]["cmp-portal"], "operational");
    let msgs = s
        .app
        .responder
        .store
        .messages(&rollback_responder::incident::IncidentId(s.id.clone()))
        .await
        .unwrap();
    assert!(
        msgs.iter()
            .filter(|m| m["channel"] == "statuspage")
            .all(|m| m["state"] == "delivered"),
        "{msgs:#?}"
    );
}

#[tokio::test]
async fn a_persons_retry_after_a_failed_rollback_resolves_the_escalation_page_once() {
    let s = FailedOnce::start("to02").await;
    s.app.wait_outbox_drained().await;
    assert_eq!(
        pagerduty_events(&s.peers, &s.id).await,
        ["trigger main", "acknowledge main", "trigger escalation"],
        "the failure paged for a human"
    );
    s.retried_by_hand().await;
    s.resolved("to02").await;
    assert_eq!(
        pagerduty_events(&s.peers, &s.id).await,
        [
            "trigger main",
            "acknowledge main",
            "trigger escalation",
            // The person took it over: the page asking for one resolves.
            "resolve escalation",
            "acknowledge main",
            "change",
            "resolve main",
        ]
    );
}

#[tokio::test]
async fn an_escalation_taken_over_by_hand_resolves_its_page_once() {
    let fx = AlbFixture::start().await;
    let peers = Peers::start().await;
    // Nobody answers the approval request within a second: it escalates.
    let policy = policy_with_notify(&fx, "manual").replace("  timeout: 1h\n", "  timeout: 1s\n");
    assert!(policy.contains("timeout: 1s"), "{policy}");
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", policy)],
        env: peers.env(),
        executors: Some(Executors {
            alb: Some(fx.executor()),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    let starts = ago(60);
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "to03", &starts, None)],
    ))
    .await;
    let list = app
        .wait_incidents("escalated on timeout", |l| l.len() == 1 && l[0]["phase"] == "escalated")
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    let who = Person::slack("U0APPROVER", vec![]);
    app.responder
        .start_manual("portal-api", &who, "nobody approved in time")
        .await
        .unwrap();
    app.wait_incident(&id, "rolled back by hand", |i| i["phase"] == "verified")
        .await;
    assert_eq!(weights(&fx.listener_actions().await)[0].1, 100, "moto saw the rollback");
    app.post_webhook(&payload(
        "resolved",
        vec![alert("HighErrorRate", "portal-api", "to03", &starts, Some(&ago(0)))],
    ))
    .await;
    app.wait_incident(&id, "closed", |i| i["open"] == false).await;
    app.wait_outbox_drained().await;
    assert_eq!(
        pagerduty_events(&peers, &id).await,
        [
            "trigger main",
            "trigger escalation",
            "resolve escalation",
            "acknowledge main",
            "change",
            "resolve main",
        ]
    );
}

#[tokio::test]
async fn a_person_closing_a_failed_incident_while_it_fires_never_tells_the_public_it_recovered() {
    let s = FailedOnce::start("to04").await;
    let r = s
        .app
        .http
        .post(s.app.url(&format!("/api/v1/incidents/{}/close", s.id)))
        .bearer_auth("operator-token")
        .json(&serde_json::json!({"note": "rolling forward with a fix instead", "by": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let inc = s
        .app
        .wait_incident(&s.id, "closed by a person", |i| i["open"] == false)
        .await;
    assert_eq!(inc["phase"], "failed");
    s.app.wait_outbox_drained().await;

    let sp = statuspage_requests(&s.peers).await;
    let calls: Vec<(&str, &str)> = sp.iter().map(|(m, p, _)| (m.as_str(), p.as_str())).collect();
    assert_eq!(
        calls,
        [
            ("POST", "/pages/PAGE1/incidents"),
            ("PATCH", "/pages/PAGE1/incidents/sp-inc-1"),
        ],
        "{sp:#?}"
    );
    assert_eq!(sp[1].2["status"], "resolved");
    assert_eq!(
        sp[1].2["body"],
        "Our engineers have closed this incident about portal-api."
    );
    for (_, _, b) in &sp {
        let text = b.to_string();
        assert!(!text.contains("recovered") && !text.contains("rolled"), "{text}");
    }
    // The page and the escalation page both resolve with the close, once each.
    assert_eq!(
        pagerduty_events(&s.peers, &s.id).await,
        [
            "trigger main",
            "acknowledge main",
            "trigger escalation",
            "resolve main",
            "resolve escalation"
        ]
    );
}
