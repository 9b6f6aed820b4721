//! Policy reloads operators can see: a refused set is named in `/readyz` with file and line
//! and counted by result in `/metrics`; a `policies_dir` that is a symlink switched to another
//! directory is followed.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::*;

fn write_policy(dir: &Path, service: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join(format!("{service}.yaml")),
        CHECKOUT_POLICY
            .replace("name: checkout", &format!("name: {service}"))
            .replace("service: checkout", &format!("service: {service}")),
    )
    .unwrap();
}

/// `ln -sfn target link`, atomically (a new link renamed over the old one).
fn switch(link: &Path, target: &Path) {
    let tmp = link.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

async fn wait_ready(app: &TestApp, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v: Value = app
            .http
            .get(app.url("/readyz"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn reloads(app: &TestApp, result: &str) -> u64 {
    series(
        app,
        &format!("rollback_responder_policy_reloads_total{{result=\"{result}\"}}"),
    )
    .await
}

async fn series(app: &TestApp, name: &str) -> u64 {
    let text = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let prefix = format!("{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_switched_symlink_is_followed_and_a_refused_set_is_named_in_readyz_and_counted() {
    let root = tempfile::tempdir().unwrap();
    let (v1, v2, v3) = (root.path().join("v1"), root.path().join("v2"), root.path().join("v3"));
    write_policy(&v1, "checkout");
    write_policy(&v2, "search");
    let current = root.path().join("current");
    std::os::unix::fs::symlink(&v1, &current).unwrap();
    let app = spawn_app(Options {
        env: env(&[("ROLLBACK_RESPONDER__POLICIES_DIR", current.to_str().unwrap())]),
        ..Options::default()
    })
    .await;
    let first = wait_ready(&app, "v1 in force", |v| v["policies"]["count"] == 1).await;
    assert_eq!(first["policies"]["refused"], Value::Null);
    // Counters exist at zero before the first reload.
    assert_eq!(reloads(&app, "refused").await, 0);
    assert_eq!(reloads(&app, "applied").await, 0);
    assert_eq!(series(&app, "rollback_responder_policy_files_refused").await, 0);
    let names = |app: &TestApp| {
        let app = app.url("/api/v1/policies");
        async move {
            let v: Value = reqwest::get(app).await.unwrap().json().await.unwrap();
            v["policies"][0]["name"].as_str().unwrap_or("").to_string()
        }
    };
    assert_eq!(names(&app).await, "checkout");

    // The link moves to v2: the new set is in force without a signal.
    switch(&current, &v2);
    let deadline = Instant::now() + Duration::from_secs(20);
    while names(&app).await != "search" {
        assert!(Instant::now() < deadline, "the switched link was not followed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloads(&app, "applied").await >= 1);
    let in_force = wait_ready(&app, "v2", |v| v["policies"]["count"] == 1).await["policies"]["hash"].clone();

    // The link moves to a broken set: refused, named with file and line, counted; v2 stays.
    std::fs::create_dir_all(&v3).unwrap();
    std::fs::write(v3.join("broken.yaml"), "name: broken\nservice: b\nfro: 1\n").unwrap();
    switch(&current, &v3);
    let ready = wait_ready(&app, "the refusal", |v| v["policies"]["refused"].is_object()).await;
    let refused = &ready["policies"]["refused"];
    let errors: Vec<&str> = refused["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("broken.yaml:") && e.contains("unknown field `fro`")),
        "{errors:?}"
    );
    assert_eq!(refused["trigger"], "file change");
    assert_eq!(ready["ready"], true, "the set in force still serves");
    assert_eq!(ready["policies"]["hash"], in_force);
    assert_eq!(names(&app).await, "search");
    assert_eq!(reloads(&app, "refused").await, 1);
    assert_eq!(series(&app, "rollback_responder_policy_files_refused").await, 1);

    // Fixed in place (the watch moved to v3 with the link): applied, the refusal is gone.
    std::fs::remove_file(v3.join("broken.yaml")).unwrap();
    write_policy(&v3, "payments");
    wait_ready(&app, "the fix", |v| v["policies"]["refused"].is_null()).await;
    assert_eq!(series(&app, "rollback_responder_policy_files_refused").await, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while names(&app).await != "payments" {
        assert!(Instant::now() < deadline, "the fix in the new target was not seen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_set_this_responder_cannot_carry_out_is_refused_outside_dry_run() {
    // An ALB executor, no Kubernetes one, dry run off (the test hands in executors).
    let app = spawn_app(Options {
        executors: Some(rollback_responder::action::Executors {
            alb: Some(alb_never_called()),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    let first = wait_ready(&app, "checkout in force", |v| v["policies"]["count"] == 1).await;
    assert_eq!(first["dry_run"], false);
    let in_force = first["policies"]["hash"].clone();

    // A Kubernetes policy arrives: its rollbacks could only be recorded here.
    let file = app.dir.path().join("policies").join("api.yaml");
    std::fs::write(
        &file,
        r#"
name: api
service: api
matchers: ['service="api"']
target:
  kubernetes:
    namespace: portal
    steps:
      - rollout_undo: {deployment: api}
triggers:
  - {name: errors, matchers: ['alertname="HighErrorRate"'], mode: auto}
"#,
    )
    .unwrap();
    let ready = wait_ready(&app, "the refusal", |v| v["policies"]["refused"].is_object()).await;
    let errors = ready["policies"]["refused"]["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    let e = errors[0].as_str().unwrap();
    assert!(
        e.contains(&format!(
            "{}: policy \"api\" reverts a Kubernetes target",
            file.display()
        )) && e.contains("add `kubernetes:` settings"),
        "{e}"
    );
    assert_eq!(ready["policies"]["hash"], in_force, "the set in force stays");
    assert_eq!(reloads(&app, "refused").await, 1);
    let names: Vec<String> = app.get_json("/api/v1/policies").await["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(names, ["checkout"]);

    // The same policy in dry run can be loaded: nothing is announced that cannot happen.
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, format!("{text}guards: {{dry_run: true}}\n")).unwrap();
    let ready = wait_ready(&app, "the dry-run policy loaded", |v| v["policies"]["count"] == 2).await;
    assert!(ready["policies"]["refused"].is_null(), "{ready}");
    assert_eq!(reloads(&app, "applied").await, 1);
}
