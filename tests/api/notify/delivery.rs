//! Delivery under faults: outages, restarts, storms, two incidents at once.

use super::*;

#[tokio::test]
async fn a_slack_outage_never_delays_the_rollback_and_messages_arrive_once_after() {
    let fx = AlbFixture::start().await;
    let peers = Peers::start().await;
    // Slack fails: 500s, then 429 with Retry-After, then recovers (the mounted 200s).
    let outage = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500).set_body_string("oops"))
        .up_to_n_times(4)
        .with_priority(1)
        .mount(&outage)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "1"))
        .up_to_n_times(2)
        .with_priority(2)
        .mount(&outage)
        .await;
    let recovered = SlackFake::default();
    recovered.mount(&outage, 3).await;
    let mut vars = peers.env();
    vars.retain(|(k, _)| k != "ROLLBACK_RESPONDER__SLACK__API_URL");
    vars.push(("ROLLBACK_RESPONDER__SLACK__API_URL".into(), outage.uri()));
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", policy_with_notify(&fx, "auto"))],
        env: vars,
        executors: Some(Executors {
            alb: Some(fx.executor()),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    let sent = Instant::now();
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "cc01", &ago(60), None)],
    ))
    .await;
    app.wait_incidents("verified despite slack", |l| {
        l.len() == 1 && l[0]["phase"] == "verified"
    })
    .await;
    let rollback_took = sent.elapsed();
    assert_eq!(weights(&fx.listener_actions().await)[0].1, 100);
    let slack_ok_so_far = received(&outage)
        .await
        .iter()
        .filter(|r| r.3.url.path() == "/chat.postMessage")
        .count();
    assert!(
        rollback_took < Duration::from_secs(5),
        "rollback took {rollback_took:?} during the outage"
    );

    // Eventually every message gets through, each exactly once after the failures.
    let deadline = Instant::now() + Duration::from_secs(30);
    let id = app.incidents().await[0]["id"].as_str().unwrap().to_string();
    loop {
        let msgs = app
            .responder
            .store
            .messages(&rollback_responder::incident::IncidentId(id.clone()))
            .await
            .unwrap();
        let slack: Vec<&Value> = msgs.iter().filter(|m| m["channel"] == "slack").collect();
        if slack.iter().all(|m| m["state"] == "delivered") {
            assert_eq!(slack.len(), 8, "{slack:#?}");
            assert!(
                slack[0]["attempts"].as_i64().unwrap() >= 3,
                "the first message lived through the outage: {slack:#?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "slack messages never delivered: {msgs:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Posts only: a retried first post looks for an earlier one first (GETs, answered 404 here).
    let reqs: Vec<_> = received(&outage).await.into_iter().filter(|r| r.0 == "POST").collect();
    let roots = reqs
        .iter()
        .filter(|r| r.1 == "/chat.postMessage" && r.2.get("thread_ts").is_none() && r.2.get("blocks").is_some())
        .count();
    let failed_attempts = 6;
    assert_eq!(
        reqs.len(),
        8 + failed_attempts,
        "8 messages plus the failed attempts; slack ok before recovery: {slack_ok_so_far}"
    );
    // Every failed attempt was the root message: nothing overtook it, and it succeeded once.
    assert_eq!(roots, 1 + failed_attempts, "{:#?}", slack_texts(&reqs));
    // After the outage the replies still hang off the root Slack finally accepted.
    let posted = recovered.messages();
    assert_eq!(posted[0].thread_ts, None);
    assert!(
        posted[1..].iter().all(|m| m.thread_ts.as_ref() == Some(&posted[0].ts)),
        "{posted:#?}"
    );
}

#[tokio::test]
async fn notifications_pending_at_shutdown_are_delivered_after_restart_none_twice() {
    let fx = AlbFixture::start().await;
    let peers = Peers::start().await;
    // Slack is down while the first process runs.
    let down = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&down)
        .await;
    let policy = policy_with_notify(&fx, "auto");
    let mut vars = peers.env();
    vars.retain(|(k, _)| k != "ROLLBACK_RESPONDER__SLACK__API_URL");
    let mut first_env = vars.clone();
    first_env.push(("ROLLBACK_RESPONDER__SLACK__API_URL".into(), down.uri()));
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", policy.clone())],
        env: first_env,
        executors: Some(Executors {
            alb: Some(fx.executor()),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "cd01", &ago(60), None)],
    ))
    .await;
    app.wait_incidents("verified", |l| l.len() == 1 && l[0]["phase"] == "verified")
        .await;
    let id = app.incidents().await[0]["id"].as_str().unwrap().to_string();
    let pending = app
        .responder
        .store
        .messages(&rollback_responder::incident::IncidentId(id.clone()))
        .await
        .unwrap();
    assert!(pending
        .iter()
        .any(|m| m["channel"] == "slack" && m["state"] == "pending"));
    // PagerDuty got its events once already: every PagerDuty message is delivered.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let msgs = app
            .responder
            .store
            .messages(&rollback_responder::incident::IncidentId(id.clone()))
            .await
            .unwrap();
        let pd: Vec<&Value> = msgs.iter().filter(|m| m["channel"] == "pagerduty").collect();
        if !pd.is_empty() && pd.iter().all(|m| m["state"] == "delivered") {
            break;
        }
        assert!(Instant::now() < deadline, "PagerDuty messages not delivered: {msgs:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pd_before = received(&peers.pagerduty).await.len();
    assert_eq!(pd_before, 3, "trigger, acknowledge, change");

    let mut second_env = vars;
    second_env.push(("ROLLBACK_RESPONDER__SLACK__API_URL".into(), peers.slack.uri()));
    let app = app
        .restart(Options {
            policies: vec![("portal-api.yaml", policy)],
            env: second_env,
            executors: Some(Executors {
                alb: Some(fx.executor()),
                ..Default::default()
            }),
            ..Options::default()
        })
        .await;
    // The first post failed before the restart, so it looks for an earlier one first (a GET
    // of the channel's history); then the 8 posts.
    wait_requests(&peers.slack, 9, "slack after restart").await;
    app.wait_outbox_drained().await;
    let slack: Vec<_> = received(&peers.slack)
        .await
        .into_iter()
        .filter(|r| r.0 == "POST")
        .collect();
    assert_eq!(slack.len(), 8, "{:#?}", slack_texts(&slack));
    assert_eq!(
        slack
            .iter()
            .filter(|r| r.2.get("blocks").is_some() && r.1 == "/chat.postMessage")
            .count(),
        1
    );
    assert_eq!(
        received(&peers.pagerduty).await.len(),
        pd_before,
        "nothing re-sent to PagerDuty"
    );
    let msgs = app
        .responder
        .store
        .messages(&rollback_responder::incident::IncidentId(id))
        .await
        .unwrap();
    assert!(msgs.iter().all(|m| m["state"] == "delivered"), "{msgs:#?}");
}

#[tokio::test]
async fn a_storm_of_one_alert_joins_quietly_and_each_new_kind_of_alert_is_announced_once() {
    let fx = AlbFixture::start().await;
    let peers = Peers::start().await;
    let policy = policy_with_notify(&fx, "manual").replace(
        "approval:",
        "  - name: health\n    matchers: ['alertname=\"HealthCheckFailing\"']\n    mode: manual\napproval:",
    );
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", policy)],
        env: peers.env(),
        ..Options::default()
    })
    .await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "cb00", &ago(60), None)],
    ))
    .await;
    let list = app
        .wait_incidents("awaiting approval", |l| {
            l.len() == 1 && l[0]["phase"] == "awaiting_approval"
        })
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    // Twenty more instances of the same alert, then two of another kind, in one delivery.
    let mut storm: Vec<Value> = (1..=20)
        .map(|i| alert("HighErrorRate", "portal-api", &format!("cb{i:02}"), &ago(50), None))
        .collect();
    let mut health = alert("HealthCheckFailing", "portal-api", "cc01", &ago(40), None);
    health["annotations"]["description"] = json!("GET /v1/health answered 503 <!channel>");
    storm.push(health.clone());
    // The second instance says the same (whichever of the two is announced).
    health["fingerprint"] = json!("cc02");
    storm.push(health);
    app.post_webhook(&payload("firing", storm)).await;
    app.wait_incident(&id, "every alert joined", |i| {
        i["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "alert_joined")
            .count()
            == 22
    })
    .await;
    app.wait_outbox_drained().await;
    let texts = slack_texts(&received(&peers.slack).await);
    let joined: Vec<&String> = texts.iter().filter(|t| t.contains("joined the incident")).collect();
    assert_eq!(
        joined.len(),
        1,
        "one reply for the new kind, none per instance: {texts:#?}"
    );
    assert!(joined[0].contains("HealthCheckFailing"), "{}", joined[0]);
    // What the new kind of alert measured, escaped like every alert text.
    assert!(
        joined[0].ends_with("\n*Measured:* GET /v1/health answered 503 &lt;!channel&gt;"),
        "{}",
        joined[0]
    );
}

/// Two incidents at once, each with its own Slack channel and status page components: every
/// message stays in its own incident's channel and thread, and each has its own status page
/// incident and PagerDuty dedup key.
#[tokio::test]
async fn two_incidents_keep_their_own_thread_channel_and_status_page_incident() {
    let fx = AlbFixture::start().await;
    let peers = Peers::start().await;
    let portal = policy_with_notify(&fx, "auto");
    let search = portal
        .replace("portal-api", "search-api")
        .replace("#portal-alerts", "#search-alerts")
        .replace("cmp-portal", "cmp-search")
        .replace(
            &format!("    listener_arn: {}\n", fx.listener_arn),
            &format!("    listener_arn: {}\n    rule_arn: {}\n", fx.listener_arn, fx.rule_arn),
        );
    assert!(search.contains("rule_arn:"), "{search}");
    let aws = AwsProxy::start(&fx.moto.endpoint, 1).await;
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", portal), ("search-api.yaml", search)],
        env: peers.env(),
        executors: Some(Executors {
            alb: Some(AlbExecutor::new(elb_client(aws.endpoint(0)), &fast_settings())),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    let starts = ago(60);
    let firing = |service: &str, fp: &str, ends: Option<&str>| alert("HighErrorRate", service, fp, &starts, ends);
    for (service, fp) in [("portal-api", "cf01"), ("search-api", "cf02")] {
        app.post_webhook(&payload("firing", vec![firing(service, fp, None)]))
            .await;
    }
    let list = app
        .wait_incidents("both verified", |l| {
            l.len() == 2 && l.iter().all(|i| i["phase"] == "verified")
        })
        .await;
    assert_eq!(weights(&fx.listener_actions().await)[0].1, 100);
    assert_eq!(weights(&fx.rule_actions().await)[0].1, 100);
    assert_eq!((aws.count("ModifyListener"), aws.count("ModifyRule")), (1, 1));
    let now = ago(0);
    for (service, fp) in [("portal-api", "cf01"), ("search-api", "cf02")] {
        app.post_webhook(&payload("resolved", vec![firing(service, fp, Some(&now))]))
            .await;
    }
    app.wait_incidents("both closed", |l| l.iter().all(|i| i["open"] == false))
        .await;
    app.wait_outbox_drained().await;
    let id_of = |service: &str| {
        list.iter()
            .find(|i| i["service"] == service || i["policy"] == service)
            .and_then(|i| i["id"].as_str())
            .unwrap_or_else(|| panic!("no incident for {service}: {list:#?}"))
            .to_string()
    };

    // Slack: one root per channel, every reply in its root's channel and thread.
    let slack = wait_requests(&peers.slack, 24, "slack for two incidents").await;
    assert_eq!(slack.len(), 24, "12 requests per incident: {:#?}", slack_texts(&slack));
    let posted = peers.slack_fake.messages();
    for (service, channel, write) in [
        (
            "portal-api",
            "#portal-alerts",
            "ModifyListener written: 100% to stable (attempt 1)",
        ),
        (
            "search-api",
            "#search-alerts",
            "ModifyRule written: 100% to stable (attempt 1)",
        ),
    ] {
        let channel = slack_channel_id(channel);
        let mine: Vec<_> = posted.iter().filter(|m| m.channel == channel).collect();
        let roots: Vec<_> = mine.iter().filter(|m| m.thread_ts.is_none()).collect();
        assert_eq!(roots.len(), 1, "one root in {channel}: {posted:#?}");
        assert!(
            roots[0].text.contains(&format!("Rollback executing: {service}")),
            "{channel} root is about {service}: {:?}",
            roots[0].text
        );
        assert_eq!(mine.len(), 9, "the root and 8 replies in {channel}: {posted:#?}");
        // Each incident's own write, and its own incident's story, in its own channel.
        let texts: Vec<&str> = mine.iter().map(|m| m.text.as_str()).collect();
        let expected_prefixes = [
            ":rewind: Rollback executing: ",
            "*Decision:* `auto`",
            "rolling back: forward 100 %",
            write,
            ":mag: `executing` → `verifying`:",
            ":white_check_mark: `verifying` → `verified`",
            "HighErrorRate service=",
            "every alert of the incident has resolved",
            "Incident closed in phase `verified`.",
        ];
        for (t, e) in texts.iter().zip(expected_prefixes) {
            assert!(
                t.starts_with(e),
                "{t:?} should start with {e:?}\nall in {channel}: {texts:#?}"
            );
        }
        assert!(
            texts[6].starts_with(&format!("HighErrorRate service={service} ")),
            "{channel}: {texts:#?}"
        );
        for m in &mine {
            assert!(
                m.thread_ts.is_none() || m.thread_ts.as_ref() == Some(&roots[0].ts),
                "a reply in {channel} threaded on something else than its root: {m:?}\n{posted:#?}"
            );
        }
    }
    for (_, p, b, _) in received(&peers.slack).await.iter().filter(|r| r.1 == "/chat.update") {
        let root = posted
            .iter()
            .find(|m| m.thread_ts.is_none() && Some(m.ts.as_str()) == b["ts"].as_str())
            .unwrap_or_else(|| panic!("{p} of a message that is no root: {b}"));
        assert_eq!(b["channel"].as_str(), Some(root.channel.as_str()), "{b}");
    }

    // Statuspage: one incident per rollback, each updated under its own id.
    let sp = wait_requests(&peers.statuspage, 6, "statuspage for two incidents").await;
    let created = peers.statuspage_fake.created();
    assert_eq!(created.len(), 2, "{created:?}");
    for service in ["portal-api", "search-api"] {
        let (sp_id, _) = created
            .iter()
            .find(|(_, name)| name.starts_with(&format!("{service}:")))
            .unwrap_or_else(|| panic!("no status page incident for {service}: {created:?}"));
        let own = format!("/pages/PAGE1/incidents/{sp_id}");
        let patches: Vec<&str> = sp
            .iter()
            .filter(|r| r.0 == "PATCH" && r.2["incident"]["body"].as_str().unwrap_or("").contains(service))
            .map(|r| r.1.as_str())
            .collect();
        assert_eq!(
            patches,
            [own.as_str(); 2],
            "{service}'s updates go to its own status page incident"
        );
    }

    // PagerDuty: each incident triggers and resolves under its own dedup key.
    let pd = wait_requests(&peers.pagerduty, 8, "pagerduty for two incidents").await;
    for service in ["portal-api", "search-api"] {
        let key = format!("rollback-responder/{}", id_of(service));
        let actions: Vec<&str> = pd
            .iter()
            .filter(|r| r.2["dedup_key"] == key.as_str())
            .map(|r| r.2["event_action"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(actions, ["trigger", "acknowledge", "resolve"], "{service}");
    }
}

/// Statuspage is down (503) for the create and the look-up that its retry makes first: the
/// outbox retries until the create goes through, and the rollback gets exactly one status page
/// incident, updated and resolved under its id.
#[tokio::test]
async fn a_statuspage_outage_at_create_still_gives_one_status_page_incident() {
    let fx = AlbFixture::start().await;
    let peers = Peers::start().await;
    peers.statuspage_fake.fail_next(2, 503);
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", policy_with_notify(&fx, "auto"))],
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
        vec![alert("HighErrorRate", "portal-api", "cg01", &starts, None)],
    ))
    .await;
    app.wait_incidents("verified", |l| l.len() == 1 && l[0]["phase"] == "verified")
        .await;
    app.post_webhook(&payload(
        "resolved",
        vec![alert("HighErrorRate", "portal-api", "cg01", &starts, Some(&ago(0)))],
    ))
    .await;
    app.wait_incidents("closed", |l| l[0]["open"] == false).await;
    app.wait_outbox_drained().await;
    let sp = received(&peers.statuspage).await;
    let calls: Vec<(&str, &str)> = sp.iter().map(|r| (r.0.as_str(), r.1.as_str())).collect();
    assert_eq!(
        calls,
        [
            ("POST", "/pages/PAGE1/incidents"),
            ("GET", "/pages/PAGE1/incidents/unresolved"),
            ("GET", "/pages/PAGE1/incidents/unresolved"),
            ("POST", "/pages/PAGE1/incidents"),
            ("PATCH", "/pages/PAGE1/incidents/sp-inc-1"),
            ("PATCH", "/pages/PAGE1/incidents/sp-inc-1"),
        ],
        "a failed create; its retry looks for an incident the create may have made (503, then \
         none of ours), then creates; the two updates go to the one incident"
    );
    for (_, _, _, r) in &sp {
        assert_eq!(
            r.headers.get("authorization").unwrap().to_str().unwrap(),
            format!("OAuth {SP_KEY}")
        );
    }
    // The create sent again is the same create, carrying our incident id to be found by.
    assert_eq!(sp[3].2, sp[0].2);
    let id = app.incidents().await[0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        sp[0].2["incident"]["metadata"],
        json!({"rollback_responder": {"incident_id": id}})
    );
    assert_eq!(
        peers.statuspage_fake.created(),
        [(
            "sp-inc-1".to_string(),
            "portal-api: degraded service, release rolled back".to_string()
        )]
    );
    let statuses: Vec<&str> = sp[4..]
        .iter()
        .map(|r| r.2["incident"]["status"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(statuses, ["monitoring", "resolved"]);
}
