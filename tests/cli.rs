//! The command line: `policy check` exit codes and messages, `simulate` output.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_rollback-responder");

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn policy_check_passes_on_the_shipped_policies() {
    let out = Command::new(BIN)
        .args(["policy", "check"])
        .arg(root().join("policies"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 policies, 10 triggers"));
}

#[test]
fn policy_check_prints_file_line_message_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(root().join("policies/portal-api.yaml")).unwrap();
    std::fs::write(
        dir.path().join("a.yaml"),
        good.replace("    for: 2m\n", "    for: 2m\n    fro: 1m\n"),
    )
    .unwrap();
    std::fs::write(dir.path().join("b.yaml"), "name: b\nservice: b\n").unwrap();
    let out = Command::new(BIN)
        .args(["policy", "check"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("a.yaml:") && lines[0].contains("unknown field `fro`"),
        "{text}"
    );
    assert!(lines[1].contains("b.yaml:1: missing field `target`"), "{text}");
}

#[test]
fn simulate_json_prints_one_decision_per_alert() {
    let out = Command::new(BIN)
        .args([
            "simulate",
            "--format",
            "json",
            "--at",
            "2026-11-22T02:10:00Z",
            "--policies",
        ])
        .arg(root().join("policies"))
        .arg(root().join("tests/fixtures/high-error-rate.json"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["alertname"], "HighErrorRate");
    assert_eq!(lines[0]["fingerprint"], "8c1d3e5f7a9b0c2d");
    assert_eq!(lines[0]["decision"], "auto");
    assert_eq!(lines[0]["policy"], "portal-api");
    assert_eq!(lines[1]["decision"], "suppressed");
    assert!(lines[1]["reason"].as_str().unwrap().starts_with("too young"));
}

#[test]
fn serve_refuses_to_start_on_a_broken_policy_and_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("x.yaml"),
        "name: x\nservice: x\ntarget: {alb: {listener_arn: arn:x, stable_target_group_arn: arn:y}}\ntriggers: []\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("ROLLBACK_RESPONDER__POLICIES_DIR", dir.path())
        .env(
            "ROLLBACK_RESPONDER__STORE__URL",
            format!("sqlite://{}", dir.path().join("db").display()),
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to start") && err.contains("x.yaml:4: triggers: list at least one trigger"),
        "{err}"
    );
}
