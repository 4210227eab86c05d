//! Servers a killed launcher left running are found through their pid files
//! and stopped; a pid file naming any other process never gets it signalled.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use meridian_launcher::{
    PostgresOptions, PostgresServer, RedisOptions, RedisServer, stop_leftover_node,
};

/// Whether `pid` has exited (gone, or a zombie nobody reaped yet).
fn dead(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        let state = stat[stat.rfind(')').unwrap() + 2..].chars().next();
        state == Some('Z')
    })
}

/// A process that is not a server, working in `dir`, killed on drop.
struct Bystander(Child);

impl Bystander {
    fn start(dir: &Path) -> Self {
        Self(
            Command::new("sleep")
                .arg("60")
                .current_dir(dir)
                .spawn()
                .unwrap(),
        )
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_redis_left_running_is_stopped_and_the_next_start_works() {
    let dir = tempfile::tempdir().unwrap();
    let redis_dir = dir.path().join("redis");
    let opts = RedisOptions {
        dir: Some(redis_dir.clone()),
        appendonly: true,
        ..RedisOptions::default()
    };
    let redis = RedisServer::start(opts.clone()).await.unwrap();
    let pid = redis.pid().unwrap();
    // As if its launcher had been killed: nothing stops it.
    std::mem::forget(redis);

    let found = RedisServer::stop_leftover(&redis_dir).await.unwrap();
    let found = found.expect("the redis left running is found");
    assert_eq!(
        (found.program, found.pid, found.killed),
        ("redis", pid, false)
    );
    assert!(dead(pid), "redis {pid} still runs");
    assert!(!redis_dir.join("redis.pid").exists());
    assert_eq!(RedisServer::stop_leftover(&redis_dir).await.unwrap(), None);

    let mut again = RedisServer::start(opts).await.unwrap();
    again.stop().await.unwrap();
}

#[tokio::test]
async fn a_postgres_left_running_is_stopped_and_the_next_start_works() {
    let dir = tempfile::tempdir().unwrap();
    let pg_dir = dir.path().join("postgres");
    let opts = PostgresOptions {
        dir: Some(pg_dir.clone()),
        ..PostgresOptions::default()
    };
    let postgres = PostgresServer::start(opts.clone()).await.unwrap();
    let pid = postgres.pid().unwrap();
    std::mem::forget(postgres);

    let found = PostgresServer::stop_leftover(&pg_dir).await.unwrap();
    let found = found.expect("the postgres left running is found");
    assert_eq!(
        (found.program, found.pid, found.killed),
        ("postgres", pid, false)
    );
    assert!(dead(pid), "postgres {pid} still runs");
    assert_eq!(
        found.to_string(),
        format!(
            "stopped the postgres (pid {pid}) a previous run left in {}",
            pg_dir.display()
        )
    );
    // Without the stop this start fails: the cluster's lock file names a
    // live postmaster.
    let mut again = PostgresServer::start(opts).await.unwrap();
    again.stop().await.unwrap();
}

#[tokio::test]
async fn a_pid_file_naming_another_program_is_removed_and_that_process_spared() {
    let dir = tempfile::tempdir().unwrap();
    let redis_dir = dir.path().join("redis");
    std::fs::create_dir_all(&redis_dir).unwrap();
    // In the very directory, so only the program tells it apart.
    let mut bystander = Bystander::start(&redis_dir);
    let pid = bystander.0.id();
    std::fs::write(redis_dir.join("redis.pid"), format!("{pid}\n")).unwrap();
    assert_eq!(RedisServer::stop_leftover(&redis_dir).await.unwrap(), None);
    assert!(
        !redis_dir.join("redis.pid").exists(),
        "a stale pid file stays"
    );

    let node_pid = dir.path().join("node.pid");
    std::fs::write(&node_pid, format!("{pid}\n")).unwrap();
    let config = dir.path().join("regional.toml");
    let found = stop_leftover_node(&node_pid, &config, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(found, None);

    let deadline = Instant::now() + Duration::from_millis(200);
    while Instant::now() < deadline {
        assert_eq!(
            bystander.0.try_wait().unwrap(),
            None,
            "the bystander was signalled"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn a_pid_file_naming_no_process_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let node_pid = dir.path().join("node.pid");
    // Beyond pid_max (at most 2^22), so no process can have it.
    std::fs::write(&node_pid, "99999999\n").unwrap();
    let config = dir.path().join("regional.toml");
    let found = stop_leftover_node(&node_pid, &config, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(found, None);
    assert!(!node_pid.exists());
}
