//! What the messages say: measured values, next steps, follow-ups, hostile text.

use super::*;

/// `policy_with_notify` with follow-ups, and without `links`, so where to look comes from the
/// alert's `runbook_url` and `dashboard` annotations.
fn policy_with_follow_ups(fx: &AlbFixture) -> String {
    let p = policy_with_notify(fx, "auto");
    let links = p.find("links:").expect("links");
    format!(
        "{}follow_ups:\n  - Restore the database from the pre-release snapshot if migrations ran\n  - Purge the CDN cache\n",
        &p[..links]
    )
}

/// An alert as Prometheus rules write it: the measured value in `description`, where to look in
/// `runbook_url` and `dashboard`.
fn measured_alert(fingerprint: &str, starts: &str, description: &str) -> Value {
    let mut a = alert("HighErrorRate", "portal-api", fingerprint, starts, None);
    a["annotations"]["description"] = json!(description);
    a["annotations"]["runbook_url"] = json!("https://runbooks.example.com/portal-api/HighErrorRate");
    a["annotations"]["dashboard"] = json!("https://grafana.example.com/d/portal-api-slo/slo-tracking");
    a
}

#[tokio::test]
async fn the_root_shows_the_measured_value_the_rollback_and_next_steps_and_the_thread_lists_the_follow_ups() {
    let fx = AlbFixture::start().await;
    let peers = Peers::start().await;
    let mut env = peers.env();
    env.push((
        "ROLLBACK_RESPONDER__SERVER__PUBLIC_URL".into(),
        "https://rr.example.com".into(),
    ));
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", policy_with_follow_ups(&fx))],
        env,
        executors: Some(Executors {
            alb: Some(fx.executor()),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    app.post_webhook(&payload(
        "firing",
        vec![measured_alert("cd01", &ago(60), "5xx at 6 % over the last 5 minutes")],
    ))
    .await;
    let list = app
        .wait_incidents("verified", |l| l.len() == 1 && l[0]["phase"] == "verified")
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    app.wait_outbox_drained().await;
    let inc = app.incident(&id).await;
    let result = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["phase_from"] == "executing" && e["phase_to"] == "verifying")
        .unwrap_or_else(|| panic!("no end of the action: {inc:#}"))["summary"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(result.contains("forward changed from ["), "{result}");

    let slack = received(&peers.slack).await;
    let page = format!("https://rr.example.com/incidents/{id}");
    let look = format!(
        "Where to look: <https://runbooks.example.com/portal-api/HighErrorRate|Runbook> · \
         <https://grafana.example.com/d/portal-api-slo/slo-tracking|Dashboard> · <{page}|Incident page>"
    );
    // The first post: what was measured, and where to look.
    let root = &slack[0].2;
    let body = root["blocks"][1]["text"]["text"].as_str().unwrap();
    assert!(
        body.contains("\n*Measured:* 5xx at 6 % over the last 5 minutes (alert `HighErrorRate`)"),
        "{body}"
    );
    assert_eq!(
        root["blocks"][2],
        json!({"type": "section", "text": {"type": "mrkdwn", "text": format!("*Next steps*\n{look}")}})
    );
    // Every update after the action: what the rollback did, then the follow-ups and the
    // post-mortem; the updates after it (verified, closed) keep saying what it did.
    let updates: Vec<&Value> = slack
        .iter()
        .filter(|(_, p, _, _)| p == "/chat.update")
        .map(|(_, _, b, _)| b)
        .collect();
    assert_eq!(updates.len(), 2, "verifying, verified: {slack:#?}");
    let done_steps = format!(
        "*Next steps*\nLeft to people (the responder does not do these):\n\
         • Restore the database from the pre-release snapshot if migrations ran\n• Purge the CDN cache\n\
         • Post-mortem: write it up from the timeline on the <{page}|incident page>\n{look}"
    );
    for u in &updates {
        assert_eq!(
            u["blocks"][2],
            json!({"type": "section", "block_id": "rollback_state", "text": {"type": "mrkdwn", "text": format!("*Rollback:* {result}")}}),
            "{u:#}"
        );
        assert_eq!(u["blocks"][3]["text"]["text"], done_steps.as_str(), "{u:#}");
    }
    // The thread: the follow-ups right after the action's result, once.
    let texts = slack_texts(&slack);
    let at = texts
        .iter()
        .position(|t| t.contains("`executing` → `verifying`"))
        .unwrap();
    let follow_ups = &slack[at + 1].2;
    assert_eq!(
        follow_ups,
        &json!({
            "channel": slack_channel_id("#portal-alerts"), "thread_ts": slack_ts(0), "unfurl_links": false,
            "text": "*Left to people* now that the rollback has run (the responder does not do these):\n\
                     • Restore the database from the pre-release snapshot if migrations ran\n• Purge the CDN cache",
        })
    );
    assert_eq!(
        texts.iter().filter(|t| t.contains("*Left to people*")).count(),
        1,
        "{texts:#?}"
    );

    // PagerDuty: the measured value and the follow-ups in the trigger and the change event.
    let pd = received(&peers.pagerduty).await;
    let details: Vec<&Value> = pd
        .iter()
        .filter(|(_, _, b, _)| b["payload"]["custom_details"].is_object())
        .map(|(_, _, b, _)| &b["payload"]["custom_details"])
        .collect();
    assert_eq!(details.len(), 2, "trigger and change event: {pd:#?}");
    for d in details {
        assert_eq!(
            d["follow_ups"],
            json!([
                "Restore the database from the pre-release snapshot if migrations ran",
                "Purge the CDN cache"
            ])
        );
        assert_eq!(
            d["measured"],
            json!({"alert": "HighErrorRate", "value": "5xx at 6 % over the last 5 minutes"})
        );
    }
}

#[tokio::test]
async fn a_hostile_description_reaches_slack_clipped_and_escaped() {
    let fx = AlbFixture::start().await;
    let peers = Peers::start().await;
    let app = spawn_app(Options {
        policies: vec![("portal-api.yaml", policy_with_notify(&fx, "manual"))],
        env: peers.env(),
        ..Options::default()
    })
    .await;
    let hostile = format!(
        "<!channel> 5xx at 6 % <http://evil.example/login|click to keep your job> & {}",
        "A".repeat(3000)
    );
    let mut a = measured_alert("ce01", &ago(60), &hostile);
    a["annotations"]["runbook_url"] = json!("javascript:alert(1)");
    a["annotations"]["summary"] = json!("<!here> look");
    app.post_webhook(&payload("firing", vec![a])).await;
    app.wait_incidents("awaiting approval", |l| {
        l.len() == 1 && l[0]["phase"] == "awaiting_approval"
    })
    .await;
    app.wait_outbox_drained().await;
    let slack = received(&peers.slack).await;
    let root = &slack[0].2;
    let body = root["blocks"][1]["text"]["text"].as_str().unwrap();
    let measured = body
        .lines()
        .find(|l| l.starts_with("*Measured:*"))
        .unwrap_or_else(|| panic!("{body}"));
    let kept: String = hostile.chars().take(499).collect();
    let escaped = kept.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    assert_eq!(measured, format!("*Measured:* {escaped}… (alert `HighErrorRate`)"));
    assert!(body.contains("*Alert:* &lt;!here&gt; look"), "{body}");
    for (_, _, b, _) in &slack {
        let all = b.to_string();
        assert!(
            !all.contains("<!channel>") && !all.contains("<!here>") && !all.contains("<http://evil"),
            "{all}"
        );
        assert!(!all.contains("javascript:"), "a non-http runbook is no link: {all}");
    }
    // The policy's own runbook wins over the annotation anyway: the link is the policy's.
    assert!(
        root.to_string().contains("<https://runbooks.example/portal|Runbook>"),
        "{root}"
    );
}
