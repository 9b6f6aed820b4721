//! Episodes of one alert: Alertmanager keeps one alert per fingerprint, so an alert that
//! resolves and fires again between two notifications arrives as a new episode (a new
//! startsAt) with no resolve for the first one.

use crate::helpers::*;

/// The first episode's resolve never comes: the later episode's resolve ends it too, and the
/// incident closes. Before, the first episode's row fired for ever, so the incident stayed
/// open and every later alert on the target joined it instead of being decided.
#[tokio::test]
async fn a_later_episodes_resolve_ends_the_earlier_one_whose_resolve_never_came() {
    let app = spawn_app(Options::default()).await;
    let (first, second) = (ago(60), ago(5));
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "checkout", "ep01", &first, None)],
    ))
    .await;
    let list = app
        .wait_incidents("decided", |l| l.len() == 1 && l[0]["phase"] == "dry_run")
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    // It resolved and fired again before Alertmanager's next notification: only the new
    // episode is sent, then its resolve.
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "checkout", "ep01", &second, None)],
    ))
    .await;
    app.wait_incident(&id, "the second episode joined", |i| {
        i["alerts"].as_array().is_some_and(|a| a.len() == 2)
    })
    .await;
    app.post_webhook(&payload(
        "resolved",
        vec![alert("HighErrorRate", "checkout", "ep01", &second, Some(&ago(0)))],
    ))
    .await;
    let inc = app.wait_incident(&id, "closed", |i| i["open"] == false).await;
    let said = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["summary"].as_str())
        .find(|s| s.contains("earlier episode"))
        .unwrap_or_default()
        .to_string();
    assert!(said.contains("and with it 1 earlier episode(s)"), "{inc:#}");
    assert!(
        inc["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["status"] == "resolved"),
        "{inc:#}"
    );
}

/// Another alert of the incident still firing keeps it open: only older episodes of the same
/// fingerprint are ended.
#[tokio::test]
async fn only_the_same_alerts_older_episodes_are_ended() {
    let app = spawn_app(Options::default()).await;
    app.post_webhook(&payload(
        "firing",
        vec![
            alert("HighErrorRate", "checkout", "ep02", &ago(60), None),
            alert("HighErrorRate", "checkout", "ep03", &ago(60), None),
        ],
    ))
    .await;
    let list = app
        .wait_incidents("decided", |l| l.len() == 1 && l[0]["phase"] == "dry_run")
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    let second = ago(5);
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "checkout", "ep02", &second, None)],
    ))
    .await;
    app.post_webhook(&payload(
        "resolved",
        vec![alert("HighErrorRate", "checkout", "ep02", &second, Some(&ago(0)))],
    ))
    .await;
    // Whether the second episode was decided before its resolve came (it joined) or not (it
    // never joined), its resolve ends the first.
    let inc = app
        .wait_incident(&id, "the first episode ended", |i| {
            i["timeline"].as_array().is_some_and(|t| {
                t.iter()
                    .any(|e| e["summary"].as_str().is_some_and(|s| s.contains("earlier episode")))
            })
        })
        .await;
    let ep03: Vec<&serde_json::Value> = inc["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["fingerprint"] == "ep03")
        .collect();
    assert_eq!(ep03.len(), 1, "{inc:#}");
    assert_eq!(ep03[0]["status"], "firing", "{inc:#}");
    assert_eq!(inc["open"], true, "ep03 still fires: {inc:#}");
}
