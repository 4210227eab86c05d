//! Synchronous durability across a restore of the region's database from
//! an older backup.

use meridian_proto::v1::AckRequest;
use meridian_proto::v1::replication_client::ReplicationClient;
use meridian_tests::replicated::{pool, until};
use meridian_tests::{ClusterSandbox, RegionSandbox, TEST_MODEL, init_logging};
use uuid::Uuid;

use super::{LIMIT, REGIONS, applied, log_end};

/// Copies `region`'s PostgreSQL data directory aside (`to`) or back over
/// it (`from`), with the server stopped, as a file-level backup or restore.
async fn copy_data(region: &mut RegionSandbox, backup: &std::path::Path, restore: bool) {
    region.stop_node().await;
    region.postgres.stop().await.expect("PostgreSQL stops");
    let data = region.postgres.data_dir().to_path_buf();
    let (from, to) = if restore {
        (backup, data.as_path())
    } else {
        (data.as_path(), backup)
    };
    if to.exists() {
        std::fs::remove_dir_all(to).expect("the old copy is removed");
    }
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp runs")
        .success();
    assert!(ok, "copied {} to {}", from.display(), to.display());
    region.postgres.restart().await.expect("PostgreSQL starts");
    region.start_node().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_write_after_a_restore_from_backup_is_confirmed_only_once_a_peer_has_it() {
    init_logging();
    let mut cluster =
        ClusterSandbox::start_replicated(&REGIONS, "sync_timeout_ms = 10000\n", |_, _| {}).await;
    let http = reqwest::Client::new();
    let submit = |url: String, content: String, sync: bool| {
        let http = http.clone();
        async move {
            let res = http
                .post(format!("{url}/v1/jobs"))
                .header("x-meridian-tenant", "acme")
                .header("x-meridian-durability", if sync { "sync" } else { "async" })
                .json(&serde_json::json!({
                    "model": TEST_MODEL,
                    "messages": [{ "role": "user", "content": content }],
                    "max_tokens": 4,
                }))
                .send()
                .await
                .expect("the region answers");
            assert_eq!(res.status(), 202);
            let job: serde_json::Value = res.json().await.unwrap();
            job["id"].as_str().unwrap().parse::<Uuid>().unwrap()
        }
    };
    let away = pool(&cluster.regions[1]).await;
    let caught_up = |end: i64| {
        let away = away.clone();
        async move {
            until(LIMIT, "the peer applies the whole log", || async {
                applied(&away, "us-east").await >= end
            })
            .await;
        }
    };
    for i in 0..2 {
        submit(cluster.regions[0].url(), format!("before {i}"), false).await;
    }
    let end = log_end(&pool(&cluster.regions[0]).await).await;
    caught_up(end).await;
    let backup = tempfile::tempdir().unwrap();
    let backup = backup.path().join("pgdata");
    copy_data(&mut cluster.regions[0], &backup, false).await;

    // Written after the backup and applied by the peer: the peer's
    // watermark now counts changes the restored log will not hold.
    for i in 0..4 {
        submit(cluster.regions[0].url(), format!("after {i}"), false).await;
    }
    let later = log_end(&pool(&cluster.regions[0]).await).await;
    caught_up(later).await;
    copy_data(&mut cluster.regions[0], &backup, true).await;
    let home = pool(&cluster.regions[0]).await;
    assert!(log_end(&home).await < later, "the log is the backup's");

    // The peer's watermark, as its follower acknowledges it on reconnecting
    // (sent here so it arrives before the write, not only perhaps).
    let channel = tonic::transport::Endpoint::from_shared(cluster.regions[0].url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let stale = ReplicationClient::new(channel)
        .ack(AckRequest {
            peer_region: "eu-west".into(),
            applied_sequence: applied(&away, "us-east").await.max(later) as u64,
        })
        .await;
    println!("the stale ack: {stale:?}");
    let acked: i64 = sqlx::query_scalar(
        "SELECT coalesce(max(acked_sequence), 0) FROM replication_peers WHERE peer = 'eu-west'",
    )
    .fetch_one(&home)
    .await
    .unwrap();
    let end = log_end(&home).await;
    assert!(
        acked <= end,
        "an ack of {acked} stored past the log's end {end}"
    );

    // Confirmed means on the peer: killed at once, the write is there.
    let id = submit(cluster.regions[0].url(), "synchronous".into(), true).await;
    cluster.regions[0].kill_node();
    let on_peer: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM jobs WHERE id = $1)")
        .bind(id)
        .fetch_one(&away)
        .await
        .unwrap();
    assert!(on_peer, "a confirmed synchronous write is not on the peer");
}
