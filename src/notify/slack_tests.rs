use super::*;

#[test]
fn long_texts_are_clipped_to_slacks_limits() {
    assert_eq!(clip("short", 10), "short");
    let long = "é".repeat(5000);
    let c = clip(&long, SECTION_MAX);
    assert_eq!(c.chars().count(), SECTION_MAX);
    assert!(c.ends_with('…'));
}

#[test]
fn the_root_message_links_to_the_incident_page_when_a_public_url_is_configured() {
    let inc = Incident::sample(Phase::Executing, chrono::Utc::now());
    let context_line = |ctx: &Context| -> String {
        let (_, blocks) = root(&inc, ctx);
        let last = blocks.as_array().unwrap().last().unwrap().clone();
        last["elements"][0]["text"].as_str().unwrap().to_string()
    };
    assert_eq!(context_line(&Context::default()), format!("Incident `{}`", inc.id));
    let ctx = Context {
        pages_url: Some("https://rr.example.com".into()),
        ..Context::default()
    };
    assert_eq!(
        context_line(&ctx),
        format!(
            "Incident `{}` · <https://rr.example.com/incidents/{}|Incident page>",
            inc.id, inc.id
        )
    );
}

fn hostile_context() -> Context {
    let hostile = format!(
        "5xx at 6 % <!channel> <http://evil.example|see here> {}",
        "x".repeat(3200)
    );
    let mut annotations = crate::alert::LabelSet::new();
    annotations.insert("description".into(), hostile);
    Context {
        summary: Some("HighErrorRate on portal-api <!here>".into()),
        measured: crate::notify::Measured::from_annotations("HighErrorRate", &annotations),
        runbook: Some("https://runbooks.example/portal".into()),
        follow_ups: vec!["Restore the <database> & purge the CDN".into()],
        ..Context::default()
    }
}

fn section_text(blocks: &Value, i: usize) -> String {
    blocks[i]["text"]["text"].as_str().unwrap_or_default().to_string()
}

#[test]
fn a_hostile_description_is_clipped_and_escaped_in_the_root() {
    let inc = Incident::sample(Phase::Executing, chrono::Utc::now());
    let (text, blocks) = root(&inc, &hostile_context());
    let body = section_text(&blocks, 1);
    let measured = body.lines().find(|l| l.starts_with("*Measured:*")).expect(&body);
    assert!(
        measured.starts_with("*Measured:* 5xx at 6 % &lt;!channel&gt; &lt;http://evil.example|see here&gt; xxx"),
        "{measured}"
    );
    assert!(measured.ends_with("x… (alert `HighErrorRate`)"), "{measured}");
    // Clipped when stored (500 characters of the description), escaped when shown.
    let stored = hostile_context().measured.unwrap();
    assert_eq!(stored.text.chars().count(), crate::notify::Measured::MAX_CHARS);
    assert_eq!(
        measured,
        format!("*Measured:* {} (alert `HighErrorRate`)", escape(&stored.text))
    );
    assert!(
        body.contains("*Alert:* HighErrorRate on portal-api &lt;!here&gt;"),
        "{body}"
    );
    let all = blocks.to_string();
    assert!(
        !all.contains("<!channel>") && !all.contains("<!here>") && !all.contains("<http://evil"),
        "{all}"
    );
    assert!(!text.contains('<'), "{text}");
}

#[test]
fn next_steps_list_follow_ups_and_the_post_mortem_once_the_rollback_ran() {
    let ctx = hostile_context();
    let before = Incident::sample(Phase::Executing, chrono::Utc::now());
    let (_, blocks) = root(&before, &ctx);
    // Before the action: where to look only.
    assert_eq!(
        section_text(&blocks, 2),
        "*Next steps*\nWhere to look: <https://runbooks.example/portal|Runbook>"
    );
    let after = Incident::sample(Phase::Verified, chrono::Utc::now());
    let (_, blocks) = root(&after, &ctx);
    assert_eq!(
        section_text(&blocks, 2),
        format!(
            "*Next steps*\nLeft to people (the responder does not do these):\n• Restore the &lt;database&gt; &amp; \
             purge the CDN\n• Post-mortem: write it up from the incident's timeline (`incident {}`)\nWhere to \
             look: <https://runbooks.example/portal|Runbook>",
            after.id
        )
    );
}

#[test]
fn the_change_that_ends_the_action_carries_its_result_and_the_follow_ups_reply() {
    let ctx = Context {
        routes: crate::notify::Routes::default(),
        ..hostile_context()
    };
    let inc = Incident::sample(Phase::Verifying, chrono::Utc::now());
    let detail = Value::Null;
    let change = Change::Phase {
        from: Phase::Executing,
        to: Phase::Verifying,
        summary: "listener: forward changed from [prod 50, canary 50] to [prod 100], read back OK",
        actor: "r1",
        detail: &detail,
    };
    let sent = plan(&inc, &ctx, &change, "#c");
    let Message::SlackRoot { state, blocks, .. } = &sent[0] else {
        panic!("{sent:?}")
    };
    assert_eq!(
        state.as_deref(),
        Some("*Rollback:* listener: forward changed from [prod 50, canary 50] to [prod 100], read back OK")
    );
    // Delivery puts it under the main section, and later updates take it from the handles.
    let with = with_state(blocks, state.as_deref());
    assert_eq!(with[2]["block_id"], STATE_BLOCK);
    assert_eq!(with[2]["text"]["text"], state.as_deref().unwrap());
    let texts: Vec<&str> = sent
        .iter()
        .filter_map(|m| match m {
            Message::SlackReply { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(texts.len(), 2, "{texts:?}");
    assert_eq!(
        texts[1],
        "*Left to people* now that the rollback has run (the responder does not do these):\n• Restore the \
         &lt;database&gt; &amp; purge the CDN"
    );
    // A later change neither repeats the follow-ups nor knows the result.
    let later = Change::Phase {
        from: Phase::Verifying,
        to: Phase::Verified,
        summary: "verified",
        actor: "r1",
        detail: &detail,
    };
    let sent = plan(&inc, &ctx, &later, "#c");
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert!(matches!(&sent[0], Message::SlackRoot { state: None, .. }));
    // A new attempt (a person's rollback after a failed one) clears the last result.
    let again = Change::Phase {
        from: Phase::Failed,
        to: Phase::Executing,
        summary: "approved by <@U1>",
        actor: "<@U1>",
        detail: &detail,
    };
    let sent = plan(&inc, &ctx, &again, "#c");
    let Message::SlackRoot { state, blocks, .. } = &sent[0] else {
        panic!("{sent:?}")
    };
    assert_eq!(state.as_deref(), Some(""));
    assert_eq!(&with_state(blocks, Some("")), blocks);
    assert_eq!(kept_state(&sent[0]), Some((STATE_BLOCK.to_string(), String::new())));
}

#[test]
fn retryable_slack_errors() {
    assert!(retryable_error("ratelimited"));
    assert!(retryable_error("internal_error"));
    assert!(!retryable_error("channel_not_found"));
    assert!(!retryable_error("invalid_auth"));
    assert!(!retryable_error("not_in_channel"));
}
