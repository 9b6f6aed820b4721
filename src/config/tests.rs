use std::io::Write;

use super::secrets::SecretKey;
use super::*;
use crate::policy::RateLimit;

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

#[test]
fn no_file_means_loopback_sqlite_and_dry_run() {
    let r = load_from(None, None, vec![]).unwrap();
    assert_eq!(r.listen.to_string(), "127.0.0.1:9095");
    assert_eq!(r.store_url.expose_secret(), "sqlite://rollback-responder.db");
    assert!(r.settings.safety.dry_run);
    assert!(!r.webhook_auth_configured());
}

#[test]
fn decisions_default_to_two_millisecond_batches_and_can_be_turned_off_or_stretched() {
    let r = load_from(None, None, vec![]).unwrap();
    assert_eq!(r.settings.workers.decision_batch_budget, Duration::from_millis(2));
    assert!(r.settings.workers.decide);
    let env = vec![
        ("ROLLBACK_RESPONDER__WORKERS__DECIDE".into(), "false".into()),
        ("ROLLBACK_RESPONDER__WORKERS__DECISION_BATCH_BUDGET".into(), "1s".into()),
    ];
    let r = load_from(None, None, env).unwrap();
    assert!(!r.settings.workers.decide);
    assert_eq!(r.settings.workers.decision_batch_budget, Duration::from_secs(1));
    let env = vec![(
        "ROLLBACK_RESPONDER__WORKERS__DECISION_BATCH_BUDGET".into(),
        "soon".into(),
    )];
    let e = load_from(None, None, env).unwrap_err().to_string();
    assert!(e.contains("decision_batch_budget"), "{e}");
    let env = vec![("ROLLBACK_RESPONDER__WORKERS__DECIDE".into(), "maybe".into())];
    let e = load_from(None, None, env).unwrap_err().to_string();
    assert!(e.contains("decide"), "{e}");
}

#[test]
fn typo_in_the_file_names_file_and_line() {
    let f = file("server:\n  listen: 127.0.0.1:9000\n  lisen: 1\n");
    let e = load_from(Some(f.path()), None, vec![]).unwrap_err().to_string();
    assert!(e.contains(":3: server: unknown field `lisen`"), "{e}");
}

#[test]
fn environment_overrides_the_file_and_credentials_open_the_listener() {
    let f = file("store:\n  url: sqlite://a.db\n");
    let env = vec![
        ("ROLLBACK_RESPONDER__STORE__URL".into(), "postgres://db/rr".into()),
        ("ROLLBACK_RESPONDER__WEBHOOK__BEARER_TOKEN".into(), "s3cr3t".into()),
    ];
    let r = load_from(Some(f.path()), None, env).unwrap();
    assert_eq!(r.store_url.expose_secret(), "postgres://db/rr");
    assert_eq!(r.listen.to_string(), "0.0.0.0:9095");
    assert!(!format!("{r:?}").contains("s3cr3t"), "secrets must not be printable");
}

#[test]
fn one_field_of_the_global_rate_limit_from_the_environment_keeps_the_other() {
    let env = vec![("ROLLBACK_RESPONDER__SAFETY__MAX_ROLLBACKS__COUNT".into(), "3".into())];
    let r = load_from(None, None, env).unwrap();
    assert_eq!(
        r.settings.safety.max_rollbacks,
        Some(RateLimit {
            count: 3,
            per: Duration::from_secs(3600)
        })
    );
    let f = file("safety:\n  max_rollbacks: {count: 2, per: 10m}\n");
    let env = vec![("ROLLBACK_RESPONDER__SAFETY__MAX_ROLLBACKS__PER".into(), "30m".into())];
    let r = load_from(Some(f.path()), None, env).unwrap();
    assert_eq!(
        r.settings.safety.max_rollbacks,
        Some(RateLimit {
            count: 2,
            per: Duration::from_secs(1800)
        })
    );
}

#[test]
fn secrets_come_from_files_and_not_both() {
    let tok = file("from-file\n");
    let f = file(&format!("webhook:\n  bearer_token_file: {}\n", tok.path().display()));
    let r = load_from(Some(f.path()), None, vec![]).unwrap();
    assert_eq!(r.webhook_bearer.unwrap().expose_secret(), "from-file");
    let f = file(&format!(
        "webhook:\n  bearer_token: x\n  bearer_token_file: {}\n",
        tok.path().display()
    ));
    let e = load_from(Some(f.path()), None, vec![]).unwrap_err().to_string();
    assert!(
        e.contains("set either webhook.bearer_token or webhook.bearer_token_file"),
        "{e}"
    );
}

#[test]
fn open_listener_without_credentials_is_refused_with_the_fix() {
    let e = load_from(None, Some("0.0.0.0:9095".parse().unwrap()), vec![])
        .unwrap_err()
        .to_string();
    assert!(e.contains("set webhook.bearer_token"), "{e}");
}

#[test]
fn a_field_missing_from_the_file_may_come_from_the_environment() {
    let f = file("statuspage:\n  api_key: sp-key\n");
    let env = vec![("ROLLBACK_RESPONDER__STATUSPAGE__PAGE_ID".into(), "PAGE1".into())];
    let r = load_from(Some(f.path()), None, env).unwrap();
    assert_eq!(r.settings.statuspage.as_ref().unwrap().page_id, "PAGE1");
    // Missing from both: still refused.
    let e = load_from(Some(f.path()), None, vec![]).unwrap_err().to_string();
    assert!(e.contains("page_id"), "{e}");
}

#[test]
fn a_notification_timeout_must_end_well_inside_the_delivery_lease() {
    for value in ["0s", "51s", "2m"] {
        let env = vec![("ROLLBACK_RESPONDER__NOTIFICATIONS__TIMEOUT".into(), value.into())];
        let e = load_from(None, None, env).unwrap_err().to_string();
        assert!(
            e.contains("notifications.timeout") && e.contains("use 1s to 50s"),
            "{value}: {e}"
        );
    }
    let env = vec![("ROLLBACK_RESPONDER__NOTIFICATIONS__TIMEOUT".into(), "50s".into())];
    assert!(load_from(None, None, env).is_ok());
}

#[test]
fn empty_pagerduty_webhook_secrets_are_refused() {
    for value in ["", " ", "old,new,", "old,,new", ",new"] {
        let env = vec![("ROLLBACK_RESPONDER__PAGERDUTY__WEBHOOK_SECRETS".into(), value.into())];
        let e = load_from(None, None, env).unwrap_err().to_string();
        assert!(
            e.contains("pagerduty.webhook_secrets: entry") && e.contains("remove it or give it a value"),
            "{value:?}: {e}"
        );
    }
    let f = file("pagerduty:\n  webhook_secrets: [old, '  ']\n");
    let e = load_from(Some(f.path()), None, vec![]).unwrap_err().to_string();
    assert!(e.contains("pagerduty.webhook_secrets: entry 2 of 2 is empty"), "{e}");
    let env = vec![(
        "ROLLBACK_RESPONDER__PAGERDUTY__WEBHOOK_SECRETS".into(),
        "old,new".into(),
    )];
    let r = load_from(None, None, env).unwrap();
    let secrets = &r.settings.pagerduty.as_ref().unwrap().webhook_secrets;
    let secrets: Vec<&str> = secrets.iter().map(|s| s.expose_secret()).collect();
    assert_eq!(secrets, ["old", "new"]);
}

#[test]
fn a_misspelt_log_level_is_refused_with_the_choices() {
    for value in ["warning", "information", "info,rollback_responder=verbose", ""] {
        let env = vec![("ROLLBACK_RESPONDER__LOG__LEVEL".into(), value.into())];
        let e = load_from(None, None, env).unwrap_err().to_string();
        assert!(
            e.starts_with("log.level: ") && e.contains("use trace, debug, info, warn, error or off"),
            "{value:?}: {e}"
        );
    }
    let env = vec![("ROLLBACK_RESPONDER__LOG__LEVEL".into(), "warning".into())];
    let e = load_from(None, None, env).unwrap_err().to_string();
    assert!(e.contains("\"warning\" is not a level"), "{e}");
    let f = file("log:\n  level: warning\n");
    let e = load_from(Some(f.path()), None, vec![]).unwrap_err().to_string();
    assert!(e.contains("log.level: \"warning\""), "{e}");
    for value in ["warn", "info", "debug", "info,rollback_responder=debug"] {
        let env = vec![("ROLLBACK_RESPONDER__LOG__LEVEL".into(), value.into())];
        let r = load_from(None, None, env).unwrap();
        assert_eq!(r.settings.log.level, value);
    }
    let f = file("log:\n  level: info,rollback_responder=debug\n");
    assert!(load_from(Some(f.path()), None, vec![]).is_ok());
}

#[test]
fn unknown_environment_key_is_refused() {
    let e = load_from(None, None, vec![("ROLLBACK_RESPONDER__STORE__URLL".into(), "x".into())])
        .unwrap_err()
        .to_string();
    assert!(e.contains("urll"), "{e}");
}

#[test]
fn durations_too_long_for_a_clock_are_refused_by_name_not_a_panic() {
    for (key, var) in [
        ("workers.tick", "ROLLBACK_RESPONDER__WORKERS__TICK"),
        ("workers.lease", "ROLLBACK_RESPONDER__WORKERS__LEASE"),
        (
            "workers.decision_batch_budget",
            "ROLLBACK_RESPONDER__WORKERS__DECISION_BATCH_BUDGET",
        ),
        ("server.shutdown_grace", "ROLLBACK_RESPONDER__SERVER__SHUTDOWN_GRACE"),
        (
            "notifications.max_backoff",
            "ROLLBACK_RESPONDER__NOTIFICATIONS__MAX_BACKOFF",
        ),
        (
            "safety.max_rollbacks.per",
            "ROLLBACK_RESPONDER__SAFETY__MAX_ROLLBACKS__PER",
        ),
    ] {
        // Three ticks of this overflow a Duration; a lease of it overflows the calendar.
        let env = vec![(var.to_string(), "500000000000years".to_string())];
        let e = load_from(None, None, env).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{key}: ")) && e.contains("too long"),
            "{key}: {e}"
        );
    }
    let env = vec![("ROLLBACK_RESPONDER__WORKERS__LEASE".to_string(), "300days".to_string())];
    assert!(load_from(None, None, env).is_ok());
}

#[test]
fn errors_about_secret_keys_name_the_key_and_shape_never_the_value() {
    const SECRET: &str = "s3cr3t-VALUE-42";
    let files = [
        format!("pagerduty:\n  webhook_secrets: {SECRET}\n"),
        format!("pagerduty:\n  routing_keys: {SECRET}\n"),
        format!("pagerduty:\n  routing_keys: {{team: [{SECRET}]}}\n"),
        format!("slack:\n  signing_secret: {{a: {SECRET}}}\n  bot_token: {SECRET}\n"),
    ];
    for text in &files {
        let f = file(text);
        let e = load_from(Some(f.path()), None, vec![]).unwrap_err().to_string();
        assert!(!e.contains(SECRET) && !e.contains("VALUE"), "{text}: {e}");
        assert!(e.contains("pagerduty.") || e.contains("slack."), "names the key: {e}");
        assert!(e.contains("expected"), "says the shape: {e}");
    }
    for (var, value) in [
        ("ROLLBACK_RESPONDER__PAGERDUTY__ROUTING_KEYS", SECRET),
        ("ROLLBACK_RESPONDER__WEBHOOK__BASIC_AUTH", SECRET),
        ("ROLLBACK_RESPONDER__WORKERS__TICK", SECRET),
        ("ROLLBACK_RESPONDER__SERVER__BODY_LIMIT_BYTES", SECRET),
    ] {
        let e = load_from(None, None, vec![(var.into(), value.into())])
            .unwrap_err()
            .to_string();
        assert!(!e.contains(value), "{var}: {e}");
        assert!(e.contains("for key `"), "names the key: {e}");
    }
}

#[test]
fn all_digit_secrets_from_the_environment_keep_their_leading_zeros() {
    let env: Vec<(String, String)> = [
        ("ROLLBACK_RESPONDER__WEBHOOK__BEARER_TOKEN", "00123"),
        ("ROLLBACK_RESPONDER__API__BEARER_TOKEN", "0000"),
        ("ROLLBACK_RESPONDER__API__READ_TOKEN", "0042"),
        ("ROLLBACK_RESPONDER__SLACK__BOT_TOKEN", "007"),
        ("ROLLBACK_RESPONDER__SLACK__SIGNING_SECRET", "0.50"),
        ("ROLLBACK_RESPONDER__PAGERDUTY__ROUTING_KEY", "0123456789"),
        ("ROLLBACK_RESPONDER__PAGERDUTY__ROUTING_KEYS__TEAM", "000042"),
        ("ROLLBACK_RESPONDER__PAGERDUTY__WEBHOOK_SECRETS", "0011,00true"),
        ("ROLLBACK_RESPONDER__PAGERDUTY__ACTION_TOKEN", "1e3"),
        ("ROLLBACK_RESPONDER__STATUSPAGE__API_KEY", "08"),
        ("ROLLBACK_RESPONDER__STATUSPAGE__PAGE_ID", "p1"),
        ("ROLLBACK_RESPONDER__SERVER__BODY_LIMIT_BYTES", "4096"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let r = load_from(None, None, env).unwrap();
    let show = |s: &Option<SecretString>| s.as_ref().map(|s| s.expose_secret().to_string());
    assert_eq!(show(&r.webhook_bearer).as_deref(), Some("00123"));
    assert_eq!(show(&r.api_token).as_deref(), Some("0000"));
    assert_eq!(show(&r.read_token).as_deref(), Some("0042"));
    assert_eq!(show(&r.slack_token).as_deref(), Some("007"));
    assert_eq!(show(&r.slack_signing_secret).as_deref(), Some("0.50"));
    assert_eq!(show(&r.pagerduty_key).as_deref(), Some("0123456789"));
    assert_eq!(show(&r.pagerduty_action_token).as_deref(), Some("1e3"));
    assert_eq!(show(&r.statuspage_key).as_deref(), Some("08"));
    let pd = r.settings.pagerduty.as_ref().unwrap();
    assert_eq!(pd.routing_keys["team"].expose_secret(), "000042");
    let secrets: Vec<&str> = pd.webhook_secrets.iter().map(|s| s.expose_secret()).collect();
    assert_eq!(secrets, ["0011", "00true"]);
    // Other numbers from the environment are still numbers.
    assert_eq!(r.settings.server.body_limit_bytes, 4096);
}

/// Each secret is read from its own value or its own file (a mix-up between two secrets'
/// fields would show here), never both, and from the environment exactly as given.
#[test]
fn every_secret_is_read_from_its_own_value_or_file_and_never_both() {
    let tok = file("sqlite://from-file\n");
    for k in SecretKey::ALL {
        let var = format!("{ENV_PREFIX}__{}", k.key().replace('.', "__").to_uppercase());
        // What the secret's section needs besides it.
        let section: Vec<(String, String)> = match k {
            SecretKey::WebhookBasicAuthPassword => vec![("WEBHOOK__BASIC_AUTH__USERNAME", "am")],
            SecretKey::SlackSigningSecret => vec![("SLACK__BOT_TOKEN", "xoxb-1")],
            SecretKey::StatuspageApiKey => vec![("STATUSPAGE__PAGE_ID", "p1")],
            _ => vec![],
        }
        .into_iter()
        .map(|(v, x)| (format!("{ENV_PREFIX}__{v}"), x.to_string()))
        .collect();
        let inline = if k == SecretKey::StoreUrl {
            "sqlite://0042.db"
        } else {
            "0042"
        };
        let with = |extra: &[(String, String)]| {
            let mut env = section.clone();
            env.extend_from_slice(extra);
            load_from(None, None, env)
        };
        let shown = |r: Resolved| k.read(&r.settings).unwrap().map(|s| s.expose_secret().to_string());

        let r = with(&[(var.clone(), inline.into())]).unwrap();
        assert_eq!(shown(r).as_deref(), Some(inline), "{}: inline, as given", k.key());
        let file_var = format!("{var}_FILE");
        let r = with(&[(file_var.clone(), tok.path().display().to_string())]).unwrap();
        assert_eq!(
            shown(r).as_deref(),
            Some("sqlite://from-file"),
            "{}: from its file",
            k.key()
        );
        let e = with(&[(var, inline.into()), (file_var, tok.path().display().to_string())])
            .unwrap_err()
            .to_string();
        let key = k.key();
        assert!(e.contains(&format!("set either {key} or {key}_file")), "{e}");
    }
}
