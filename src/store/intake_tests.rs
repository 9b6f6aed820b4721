use super::*;

const A: &str = "a1b2c3d4e5f60718";

#[test]
fn known_alerts_cover_only_copies_that_could_change_nothing() {
    let k = Known::new(16);
    assert!(!k.covers(A, 1, AlertStatus::Firing), "unknown: ask the store");
    k.remember(A, 1, AlertStatus::Firing);
    assert!(k.covers(A, 1, AlertStatus::Firing));
    assert!(
        !k.covers(A, 1, AlertStatus::Resolved),
        "firing -> resolved must be stored"
    );
    assert!(
        !k.covers(A, 2, AlertStatus::Firing),
        "another episode (startsAt) is new"
    );
    assert!(!k.covers("a1b2c3d4e5f60719", 1, AlertStatus::Firing));
    k.remember(A, 1, AlertStatus::Resolved);
    assert!(k.covers(A, 1, AlertStatus::Resolved));
    assert!(
        k.covers(A, 1, AlertStatus::Firing),
        "a late firing copy changes nothing"
    );
    k.remember(A, 1, AlertStatus::Firing);
    assert!(k.covers(A, 1, AlertStatus::Resolved), "never downgraded");
}

#[test]
fn fingerprints_that_are_not_16_hex_digits_always_go_to_the_store() {
    let k = Known::new(16);
    for fp in [
        "a1b2",
        "a1b2c3d4e5f6071",
        "a1b2c3d4e5f60718a",
        "zzb2c3d4e5f60718",
        "+1b2c3d4e5f60718",
    ] {
        k.remember(fp, 1, AlertStatus::Resolved);
        assert!(!k.covers(fp, 1, AlertStatus::Firing), "{fp}");
    }
    // Another sender's upper-case copy is another alert to the store: not covered by the
    // lower-case one, nor cached itself.
    k.remember("a1b2c3d4e5f60718", 1, AlertStatus::Resolved);
    assert!(k.covers("a1b2c3d4e5f60718", 1, AlertStatus::Firing));
    assert!(!k.covers("A1B2C3D4E5F60718", 1, AlertStatus::Firing));
    k.remember("A1B2C3D4E5F60719", 1, AlertStatus::Resolved);
    assert!(!k.covers("A1B2C3D4E5F60719", 1, AlertStatus::Firing));
}

#[test]
fn upsert_sql_places_twelve_parameters_per_row_in_either_dialect() {
    let pg = UpsertSql::new(Backend::Postgres).get(2).to_string();
    assert!(
        pg.contains("($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 1), ($13,"),
        "{pg}"
    );
    assert!(pg.contains("$24, 1) ON CONFLICT"), "{pg}");
    let lite = UpsertSql::new(Backend::Sqlite).get(2).to_string();
    assert_eq!(lite.matches('?').count(), 24, "{lite}");
    assert!(!lite.contains('$'), "{lite}");
}

/// A firing delivery of HighErrorRate alerts with these fingerprints.
pub(in crate::store) fn delivery(fingerprints: &[&str]) -> Notification {
    let alerts: Vec<String> = fingerprints
        .iter()
        .map(|fp| {
            format!(
                r#"{{"status":"firing","labels":{{"alertname":"HighErrorRate","service":"checkout"}},"annotations":{{}},"startsAt":"2026-11-30T10:00:00Z","endsAt":"0001-01-01T00:00:00Z","generatorURL":"","fingerprint":"{fp}"}}"#
            )
        })
        .collect();
    let body = format!(
        r#"{{"version":"4","groupKey":"{{}}:{{alertname=\"HighErrorRate\"}}","truncatedAlerts":0,"status":"firing","receiver":"rr","groupLabels":{{}},"commonLabels":{{}},"commonAnnotations":{{}},"externalURL":"http://am","alerts":[{}]}}"#,
        alerts.join(",")
    );
    Notification::parse(body.as_bytes()).expect("test payload parses")
}

/// A store on a fresh SQLite file (kept while the directory lives).
pub(in crate::store) async fn sqlite_store() -> (tempfile::TempDir, crate::store::Store) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("s.db").display());
    let store = crate::store::Store::connect(&url, 1).await.unwrap();
    (dir, store)
}

/// Starts a delivery while `tx` holds SQLite's only connection and waits until it queues.
pub(in crate::store) async fn queued_behind(
    store: &crate::store::Store,
    fingerprints: &'static [&'static str],
) -> tokio::task::JoinHandle<Result<IngestStats>> {
    let s = store.clone();
    let h = tokio::spawn(async move { s.ingest(&delivery(fingerprints), Utc::now()).await });
    for _ in 0..500 {
        if store.intake_waiting() {
            return h;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    panic!("the delivery never queued");
}

/// Makes the store refuse fingerprint `badbadbadbadbad0` on `tx`'s connection (SQLite's
/// only one, from now on).
async fn refuse_bad_fingerprint(tx: &mut crate::store::StoreTx) {
    sqlx::query(
        "CREATE TEMP TRIGGER refuse BEFORE INSERT ON alerts WHEN NEW.fingerprint = 'badbadbadbadbad0'
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
    )
    .execute(&mut *tx.tx)
    .await
    .unwrap();
}

/// [`refuse_bad_fingerprint`], then a good delivery and a refused one queued behind `tx`.
pub(in crate::store) async fn good_and_refused_queued_behind(
    store: &crate::store::Store,
    tx: &mut crate::store::StoreTx,
) -> (
    tokio::task::JoinHandle<Result<IngestStats>>,
    tokio::task::JoinHandle<Result<IngestStats>>,
) {
    refuse_bad_fingerprint(tx).await;
    let good = queued_behind(store, &["a1b2c3d4e5f60718"]).await;
    let bad = queued_behind(store, &["badbadbadbadbad0"]).await;
    for _ in 0..500 {
        if store.intake.queue_len() == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    assert_eq!(store.intake.queue_len(), 2);
    (good, bad)
}

#[tokio::test]
async fn a_delivery_waiting_for_the_connection_is_committed_with_the_transaction_holding_it() {
    let (_dir, store) = sqlite_store().await;
    let tx = store.begin().await.unwrap();
    let h = queued_behind(&store, &["a1b2c3d4e5f60718", "a1b2c3d4e5f60719"]).await;
    assert!(!h.is_finished(), "answered before anything committed");
    tx.commit().await.unwrap();
    // Before anything else runs: the writer cannot have had the connection yet, so only
    // this commit can have stored (and remembered) the alerts.
    let starts_at = ms("2026-11-30T10:00:00Z".parse().unwrap());
    assert!(
        store
            .intake
            .known
            .covers("a1b2c3d4e5f60719", starts_at, AlertStatus::Firing),
        "carried by the commit"
    );
    let stats = tokio::time::timeout(std::time::Duration::from_secs(5), h)
        .await
        .expect("answered after the commit")
        .unwrap()
        .unwrap();
    assert_eq!((stats.stored, stats.duplicates), (2, 0));
    assert_eq!(store.alert_count().await.unwrap(), 2);
    assert!(!store.intake_waiting());
}

#[tokio::test]
async fn deliveries_carried_by_a_transaction_that_does_not_commit_go_back_to_the_writer() {
    let (_dir, store) = sqlite_store().await;
    let mut tx = store.begin().await.unwrap();
    let h = queued_behind(&store, &["a1b2c3d4e5f60718"]).await;
    let carried = store
        .intake
        .absorb(&mut tx.tx)
        .await
        .expect("the waiting delivery is carried");
    assert!(!store.intake_waiting(), "taken from the queue");
    drop(tx); // rolled back: the carried rows with it
    carried.give_back();
    let stats = tokio::time::timeout(std::time::Duration::from_secs(5), h)
        .await
        .expect("the writer took it over")
        .unwrap()
        .unwrap();
    assert_eq!(stats.stored, 1);
    assert_eq!(store.alert_count().await.unwrap(), 1, "written once, by the writer");
}

/// A delivery that finds the writer idle is one statement with no transaction around it:
/// it must still be all or nothing.
#[tokio::test]
async fn a_lone_delivery_that_fails_half_way_stores_none_of_its_alerts() {
    let (_dir, store) = sqlite_store().await;
    let mut tx = store.begin().await.unwrap();
    refuse_bad_fingerprint(&mut tx).await;
    tx.commit().await.unwrap();
    let e = store
        .ingest(&delivery(&["a1b2c3d4e5f60718", "badbadbadbadbad0"]), Utc::now())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("refused by the test"), "{e}");
    assert_eq!(
        store.alert_count().await.unwrap(),
        0,
        "the first row went with the second"
    );
    let starts_at = ms("2026-11-30T10:00:00Z".parse().unwrap());
    assert!(!store
        .intake
        .known
        .covers("a1b2c3d4e5f60718", starts_at, AlertStatus::Firing));
    let stats = store
        .ingest(&delivery(&["a1b2c3d4e5f60718"]), Utc::now())
        .await
        .unwrap();
    assert_eq!((stats.stored, stats.duplicates), (1, 0));
    let again = store
        .ingest(&delivery(&["a1b2c3d4e5f60718"]), Utc::now())
        .await
        .unwrap();
    assert_eq!((again.stored, again.duplicates), (0, 1));
    assert_eq!(store.alert_count().await.unwrap(), 1);
}

#[tokio::test]
async fn a_carry_that_fails_leaves_nothing_behind_and_the_writer_answers_each_delivery() {
    let (_dir, store) = sqlite_store().await;
    let mut tx = store.begin().await.unwrap();
    let (good, bad) = good_and_refused_queued_behind(&store, &mut tx).await;
    // The carry fails on the second delivery; the savepoint takes the first one's rows back
    // out, so this commit stores neither and the writer does both, each on its own.
    tx.commit().await.unwrap();
    let wait = |h| tokio::time::timeout(std::time::Duration::from_secs(5), h);
    let good = wait(good).await.unwrap().unwrap().unwrap();
    assert_eq!(good.stored, 1, "stored by the writer, not half-carried by the commit");
    let bad = wait(bad).await.unwrap().unwrap();
    assert!(bad.unwrap_err().to_string().contains("refused by the test"));
    assert_eq!(store.alert_count().await.unwrap(), 1);
}
