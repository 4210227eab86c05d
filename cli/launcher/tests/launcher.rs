//! Starts real redis-server and postgres processes; no mocks.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use meridian_launcher::{
    Error, PostgresOptions, PostgresServer, RedisOptions, RedisServer, free_port,
};

// ---------------------------------------------------------------- helpers

fn connect(port: u16) -> io::Result<TcpStream> {
    let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(stream)
}

/// Sends one inline redis command and returns the reply's first line, plus
/// the payload line for a bulk string.
fn redis_cmd(port: u16, command: &str) -> io::Result<String> {
    let mut stream = connect(port)?;
    stream.write_all(format!("{command}\r\n").as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut reply = String::new();
    reader.read_line(&mut reply)?;
    if reply.starts_with('$') && !reply.starts_with("$-1") {
        reader.read_line(&mut reply)?;
    }
    Ok(reply.trim_end().replace("\r\n", "|"))
}

/// Whether `pid` is gone entirely: dead and reaped, not even a zombie.
fn gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

fn children(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                let ppid = stat[stat.rfind(')').unwrap() + 2..]
                    .split(' ')
                    .nth(1)
                    .unwrap();
                ppid == parent.to_string()
            })
        })
        .collect()
}

fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap() // effective uid
}

/// A minimal PostgreSQL wire-protocol client: startup with trust auth and
/// simple queries, enough to prove the database exists and keeps data.
struct Pg {
    stream: TcpStream,
}

impl Pg {
    fn connect(port: u16, user: &str, database: &str) -> Result<Pg, String> {
        let mut stream = connect(port).map_err(|e| e.to_string())?;
        let mut body = 196_608_i32.to_be_bytes().to_vec(); // protocol 3.0
        for part in ["user", user, "database", database, ""] {
            body.extend_from_slice(part.as_bytes());
            body.push(0);
        }
        let mut msg = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        msg.extend(body);
        stream.write_all(&msg).map_err(|e| e.to_string())?;
        let mut pg = Pg { stream };
        pg.until_ready()?;
        Ok(pg)
    }

    /// Runs `sql`; returns the rows as text (NULL as "NULL").
    fn query(&mut self, sql: &str) -> Result<Vec<Vec<String>>, String> {
        let mut msg = vec![b'Q'];
        msg.extend(((sql.len() + 5) as i32).to_be_bytes());
        msg.extend(sql.as_bytes());
        msg.push(0);
        self.stream.write_all(&msg).map_err(|e| e.to_string())?;
        self.until_ready()
    }

    /// Reads messages up to ReadyForQuery, collecting DataRows and errors.
    fn until_ready(&mut self) -> Result<Vec<Vec<String>>, String> {
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let mut header = [0u8; 5];
            self.stream
                .read_exact(&mut header)
                .map_err(|e| e.to_string())?;
            let len = i32::from_be_bytes(header[1..5].try_into().unwrap()) as usize - 4;
            let mut body = vec![0u8; len];
            self.stream
                .read_exact(&mut body)
                .map_err(|e| e.to_string())?;
            match header[0] {
                b'R' if body[..4] != [0, 0, 0, 0] => {
                    return Err("server asked for a password".into());
                }
                b'E' => error = Some(String::from_utf8_lossy(&body).replace('\0', " ")),
                b'D' => rows.push(data_row(&body)),
                b'Z' => return error.map_or(Ok(rows), Err),
                _ => {}
            }
        }
    }
}

fn data_row(body: &[u8]) -> Vec<String> {
    let columns = u16::from_be_bytes([body[0], body[1]]);
    let mut at = 2;
    (0..columns)
        .map(|_| {
            let len = i32::from_be_bytes(body[at..at + 4].try_into().unwrap());
            at += 4;
            if len < 0 {
                return "NULL".to_string();
            }
            let value = String::from_utf8_lossy(&body[at..at + len as usize]).into_owned();
            at += len as usize;
            value
        })
        .collect()
}

fn as_root() -> bool {
    uid_of(std::process::id()) == 0
}

// ------------------------------------------------------------------ redis

#[tokio::test]
async fn redis_answers_ping_and_restarts_on_the_same_port_after_kill() {
    let started = Instant::now();
    let mut redis = RedisServer::start(RedisOptions {
        appendonly: true,
        ..Default::default()
    })
    .await
    .expect("start redis");
    eprintln!("redis start took {:?}", started.elapsed());
    let port = redis.port();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}/"));
    assert!(redis.is_running());
    assert_eq!(redis_cmd(port, "PING").unwrap(), "+PONG");
    assert_eq!(redis_cmd(port, "SET greeting hello").unwrap(), "+OK");

    let pid = redis.pid().unwrap();
    redis.kill();
    assert!(!redis.is_running());
    assert_eq!(redis.pid(), None);
    assert!(gone(pid), "killed redis {pid} left behind");
    let refused = connect(port).expect_err("nothing should listen after kill");
    assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);

    let started = Instant::now();
    redis.restart().await.expect("restart redis");
    eprintln!("redis restart took {:?}", started.elapsed());
    assert_eq!(redis.port(), port);
    assert!(redis.is_running());
    assert_ne!(redis.pid(), Some(pid));
    assert_eq!(redis_cmd(port, "PING").unwrap(), "+PONG");
    // Same dir: the AOF written before the kill was replayed.
    assert_eq!(redis_cmd(port, "GET greeting").unwrap(), "$5|hello");
}

#[tokio::test]
async fn redis_stop_is_graceful() {
    let mut redis = RedisServer::start(RedisOptions::default())
        .await
        .expect("start redis");
    let pid = redis.pid().unwrap();
    redis.stop().await.expect("stop redis");
    assert!(!redis.is_running());
    assert!(gone(pid));
    // SIGTERM, not SIGKILL: redis had time to log its orderly exit.
    let log = std::fs::read_to_string(redis.log_path()).unwrap();
    assert!(
        log.contains("ready to exit"),
        "no clean shutdown in log:\n{log}"
    );

    // A stopped server restarts too.
    redis.restart().await.expect("restart after stop");
    assert_eq!(redis_cmd(redis.port(), "PING").unwrap(), "+PONG");
}

#[tokio::test]
async fn redis_drop_kills_it_and_removes_its_temp_dir() {
    let redis = RedisServer::start(RedisOptions::default())
        .await
        .expect("start redis");
    let (pid, dir, port) = (
        redis.pid().unwrap(),
        redis.dir().to_path_buf(),
        redis.port(),
    );
    assert!(dir.join("redis.log").is_file(), "log goes to the state dir");
    drop(redis);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "redis {pid} left behind"
    );
    assert!(!dir.exists(), "temp dir {} left behind", dir.display());
    assert!(connect(port).is_err());
}

#[tokio::test]
async fn redis_is_cleaned_up_when_the_owner_panics() {
    let (tx, rx) = std::sync::mpsc::channel();
    let task = tokio::spawn(async move {
        let redis = RedisServer::start(RedisOptions::default())
            .await
            .expect("start redis");
        tx.send((redis.pid().unwrap(), redis.dir().to_path_buf()))
            .unwrap();
        panic!("test failure while redis runs");
    });
    assert!(task.await.unwrap_err().is_panic());
    let (pid, dir) = rx.recv().unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "redis {pid} left behind"
    );
    assert!(!dir.exists(), "temp dir {} left behind", dir.display());
}

#[test]
fn redis_drop_works_without_a_runtime() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let redis = runtime
        .block_on(RedisServer::start(RedisOptions::default()))
        .expect("start redis");
    drop(runtime);
    let (pid, dir) = (redis.pid().unwrap(), redis.dir().to_path_buf());
    drop(redis);
    assert!(gone(pid), "redis {pid} left behind");
    assert!(!dir.exists());
}

#[tokio::test]
async fn redis_keeps_a_given_dir() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("redis-state");
    let redis = RedisServer::start(RedisOptions {
        dir: Some(dir.clone()),
        ..Default::default()
    })
    .await
    .expect("start redis");
    assert_eq!(redis.dir(), dir);
    drop(redis);
    assert!(
        dir.join("redis.log").is_file(),
        "given dir must survive drop"
    );
}

#[tokio::test]
async fn redis_reports_a_taken_port() {
    let holder = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = holder.local_addr().unwrap().port();
    let err = RedisServer::start(RedisOptions {
        port: Some(port),
        ..Default::default()
    })
    .await
    .err()
    .expect("port is taken");
    assert!(
        matches!(err, Error::PortInUse { port: p } if p == port),
        "{err}"
    );
    assert_eq!(err.to_string(), format!("port {port} is already in use"));
}

#[tokio::test]
async fn redis_does_not_mistake_another_redis_for_itself() {
    let first = RedisServer::start(RedisOptions::default())
        .await
        .expect("start redis");
    // The second server fails to bind, but the first answers PING on that
    // port: only the pid check tells them apart.
    let err = RedisServer::start(RedisOptions {
        port: Some(first.port()),
        ..Default::default()
    })
    .await
    .err()
    .expect("port is taken by the first redis");
    assert!(matches!(err, Error::PortInUse { .. }), "{err}");
}

// --------------------------------------------------------------- postgres

#[tokio::test]
async fn postgres_serves_meridian_and_keeps_data_across_kill_and_restart() {
    let started = Instant::now();
    let mut pg = PostgresServer::start(PostgresOptions::default())
        .await
        .expect("start postgres");
    eprintln!(
        "postgres start (initdb + start) took {:?}",
        started.elapsed()
    );
    let port = pg.port();
    assert_eq!(
        pg.url(),
        format!("postgres://meridian@127.0.0.1:{port}/meridian")
    );
    let pid = pg.pid().unwrap();
    if as_root() {
        assert_ne!(uid_of(pid), 0, "postgres must not run as root");
    }

    let mut db = Pg::connect(port, "meridian", "meridian").expect("connect to meridian");
    // No CHECKPOINT: a committed transaction must survive SIGKILL as is.
    db.query("CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)")
        .expect("write");
    let superuser = db
        .query("SELECT rolsuper FROM pg_roles WHERE rolname = 'meridian'")
        .unwrap();
    assert_eq!(superuser, [["t"]]);
    drop(db);

    let backends = children(pid);
    pg.kill();
    assert!(!pg.is_running());
    assert!(gone(pid), "killed postmaster {pid} left behind");
    let survivors: Vec<u32> = backends.into_iter().filter(|&p| !gone(p)).collect();
    assert!(survivors.is_empty(), "backends left behind: {survivors:?}");
    assert_eq!(
        connect(port).unwrap_err().kind(),
        io::ErrorKind::ConnectionRefused
    );
    assert!(pg.data_dir().join("PG_VERSION").is_file());

    let started = Instant::now();
    pg.restart().await.expect("restart postgres");
    eprintln!("postgres restart after kill took {:?}", started.elapsed());
    assert_eq!(pg.port(), port);
    assert!(pg.is_running());
    assert!(pg.data_dir().join("PG_VERSION").is_file());
    let mut db = Pg::connect(port, "meridian", "meridian").expect("reconnect");
    assert_eq!(db.query("SELECT x FROM kept").unwrap(), [["42"]]);
}

#[tokio::test]
async fn two_postgres_servers_run_side_by_side() {
    let (a, b) = tokio::join!(
        PostgresServer::start(PostgresOptions::default()),
        PostgresServer::start(PostgresOptions::default())
    );
    let (a, b) = (a.expect("start first"), b.expect("start second"));
    assert_ne!(a.port(), b.port());
    assert_ne!(a.data_dir(), b.data_dir());
    for server in [&a, &b] {
        let mut db = Pg::connect(server.port(), "meridian", "meridian").expect("connect");
        let port = db.query("SHOW port").unwrap();
        assert_eq!(port, [[server.port().to_string()]]);
    }
}

#[tokio::test]
async fn postgres_drop_kills_every_backend_and_removes_its_temp_dir() {
    let pg = PostgresServer::start(PostgresOptions::default())
        .await
        .expect("start postgres");
    let db = Pg::connect(pg.port(), "meridian", "meridian").expect("connect");
    let pid = pg.pid().unwrap();
    let backends = children(pid);
    // checkpointer, background writer, walwriter, ... and our session.
    assert!(
        backends.len() >= 3,
        "expected postgres children, got {backends:?}"
    );
    let dir = pg.dir().to_path_buf();

    drop(pg);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "postmaster {pid} left behind"
    );
    // Reaped, not merely dead: no zombies left for init to collect.
    let survivors: Vec<u32> = backends.into_iter().filter(|&p| !gone(p)).collect();
    assert!(survivors.is_empty(), "backends left behind: {survivors:?}");
    assert!(!dir.exists(), "temp dir {} left behind", dir.display());
    drop(db);
}

#[tokio::test]
async fn postgres_stop_is_a_clean_shutdown_and_restart_reuses_the_cluster() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("pg");
    let mut pg = PostgresServer::start(PostgresOptions {
        dir: Some(dir.clone()),
        ..Default::default()
    })
    .await
    .expect("start postgres");
    let pid = pg.pid().unwrap();
    pg.stop().await.expect("stop postgres");
    assert!(!pg.is_running());
    assert!(gone(pid));
    // Only a clean shutdown removes the lock file.
    assert!(!pg.data_dir().join("postmaster.pid").exists());
    let log = std::fs::read_to_string(pg.log_path()).unwrap();
    assert!(
        log.contains("fast shutdown request"),
        "not a fast shutdown:\n{log}"
    );

    pg.restart().await.expect("restart after stop");
    Pg::connect(pg.port(), "meridian", "meridian").expect("connect after restart");
    drop(pg);

    // A given dir survives drop, and a new server adopts the cluster in it.
    assert!(dir.join("data/PG_VERSION").is_file());
    let pg = PostgresServer::start(PostgresOptions {
        dir: Some(dir.clone()),
        ..Default::default()
    })
    .await
    .expect("start on existing cluster");
    Pg::connect(pg.port(), "meridian", "meridian").expect("connect to adopted cluster");
}

#[tokio::test]
async fn postgres_reports_a_taken_port() {
    let holder = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = holder.local_addr().unwrap().port();
    let err = PostgresServer::start(PostgresOptions {
        port: Some(port),
        ..Default::default()
    })
    .await
    .err()
    .expect("port is taken");
    assert!(
        matches!(err, Error::PortInUse { port: p } if p == port),
        "{err}"
    );
}

#[test]
fn free_port_can_be_bound() {
    let port = free_port().unwrap();
    assert_ne!(port, 0);
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("port is free");
}
