//! A regional node refuses to start, with the cause, when its stores are
//! unreachable or belong to another region.

use meridian_regional::{Config, Error, RegionalNode};
use meridian_tests::{PostgresServer, RedisServer, init_logging};

fn config(region: &str, redis: &str, postgres: &str) -> Config {
    Config::from_toml(
        &format!(
            "region = \"{region}\"\n[server]\nlisten = \"127.0.0.1:0\"\n\
             [redis]\nurl = \"{redis}\"\nconnect_timeout_ms = 1000\n\
             [postgres]\nurl = \"{postgres}\"\n[mesh]\nplaintext = true\n"
        ),
        "test",
    )
    .unwrap()
}

#[tokio::test]
async fn unreachable_stores_and_foreign_databases_are_refused() {
    init_logging();
    let (redis, postgres) = tokio::join!(
        RedisServer::start(Default::default()),
        PostgresServer::start(Default::default())
    );
    let (mut redis, mut postgres) = (redis.unwrap(), postgres.unwrap());

    // Postgres down: named, with the URL.
    let dead_pg = format!("postgres://meridian@127.0.0.1:{}/meridian", postgres.port());
    postgres.stop().await.unwrap();
    let err = RegionalNode::start(config("eu-west", &redis.url(), &dead_pg))
        .await
        .err()
        .expect("postgres is down");
    assert!(matches!(err, Error::PostgresUnreachable { .. }), "{err}");
    assert!(err.to_string().contains(&dead_pg), "{err}");
    postgres.restart().await.unwrap();

    // The first node claims the database for its region; another region's
    // node is turned away, the same region's is welcome back.
    let node = RegionalNode::start(config("eu-west", &redis.url(), &postgres.url()))
        .await
        .unwrap();
    node.shutdown().await.unwrap();
    let err = RegionalNode::start(config("us-east", &redis.url(), &postgres.url()))
        .await
        .err()
        .expect("the database belongs to eu-west");
    assert!(
        err.to_string().contains("belongs to region \"eu-west\""),
        "{err}"
    );
    let node = RegionalNode::start(config("eu-west", &redis.url(), &postgres.url()))
        .await
        .unwrap();
    node.shutdown().await.unwrap();

    // Redis down.
    redis.kill();
    let err = RegionalNode::start(config("eu-west", &redis.url(), &postgres.url()))
        .await
        .err()
        .expect("redis is down");
    assert!(matches!(err, Error::RedisUnreachable { .. }), "{err}");
}
