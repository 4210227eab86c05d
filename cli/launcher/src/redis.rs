//! A local `redis-server` process.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rustix::process::Signal;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::Error;
use crate::files::{LogFile, StateDir, find_in_path};
use crate::leftover::{self, Kind, Leftover, ProcInfo};
use crate::process::{ServerProcess, with_port_retry};

const SERVER: &str = "redis";
/// Redis exits promptly on SIGTERM even with an AOF to flush.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// In the state dir, so the next run finds a redis this one left behind.
const PID_FILE: &str = "redis.pid";

/// How to start a [`RedisServer`].
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// State directory for the log and AOF files; `None` makes a temp dir
    /// that is removed when the server is dropped.
    pub dir: Option<PathBuf>,
    /// Port to listen on; `None` picks a free one (and retries if raced).
    pub port: Option<u16>,
    /// Enables the append-only file, so data survives a kill and restart.
    pub appendonly: bool,
    /// How long `start` and `restart` wait for `PING` to answer.
    pub ready_timeout: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            dir: None,
            port: None,
            appendonly: false,
            ready_timeout: Duration::from_secs(10),
        }
    }
}

/// One `redis-server` process listening on 127.0.0.1.
///
/// Dropping it kills the process (SIGKILL) and removes its temp dir.
pub struct RedisServer {
    process: ServerProcess,
    binary: PathBuf,
    port: u16,
    appendonly: bool,
    ready_timeout: Duration,
    log: LogFile,
    // Declared last so it is removed after the process is gone.
    dir: StateDir,
}

impl RedisServer {
    /// Starts redis-server and waits until it answers `PING`.
    pub async fn start(opts: RedisOptions) -> Result<RedisServer, Error> {
        let binary = find_in_path("redis-server").ok_or(Error::BinaryNotFound {
            program: "redis-server",
            searched: "PATH".into(),
        })?;
        let dir = StateDir::new(opts.dir, "meridian-redis-")?;
        let log = LogFile::new(dir.path().join("redis.log"));
        let started = Instant::now();
        let (port, process) = with_port_retry(SERVER, opts.port, |port| {
            launch(
                &binary,
                dir.path(),
                &log,
                port,
                opts.appendonly,
                opts.ready_timeout,
            )
        })
        .await?;
        tracing::info!(
            port,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "redis ready"
        );
        Ok(RedisServer {
            process,
            binary,
            port,
            appendonly: opts.appendonly,
            ready_timeout: opts.ready_timeout,
            log,
            dir,
        })
    }

    /// The connection URL, `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The TCP port, kept across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id, or `None` after `stop` or `kill`.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// The state directory (working dir, AOF files, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log file, appended to by every (re)start.
    pub fn log_path(&self) -> &Path {
        self.log.path()
    }

    /// Stops gracefully (SIGTERM) and waits for the exit; kills the process
    /// if it does not exit within 30 s.
    pub async fn stop(&mut self) -> Result<(), Error> {
        self.process.stop(Signal::TERM, STOP_TIMEOUT).await
    }

    /// Kills the process now (SIGKILL) and reaps it, as a crash would.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts again on the same port and dir and waits until ready; a
    /// running server is stopped first.
    ///
    /// Fails with [`Error::PortInUse`] if another process took the port
    /// meanwhile: moving would break clients that hold the URL.
    pub async fn restart(&mut self) -> Result<(), Error> {
        if self.process.is_running() {
            self.stop().await?;
        }
        self.process = ServerProcess::none(SERVER);
        self.process = launch(
            &self.binary,
            self.dir.path(),
            &self.log,
            self.port,
            self.appendonly,
            self.ready_timeout,
        )
        .await?;
        Ok(())
    }

    /// Whether the process is alive.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Stops the redis a previous run left serving state directory `dir`
    /// (its launcher was killed): SIGTERM, then kill after 30 s. Returns what
    /// it found; `None` when nothing runs there. A stale pid file is removed.
    pub async fn stop_leftover(dir: &Path) -> Result<Option<Leftover>, Error> {
        // Debian's redis-server is a symlink to redis-check-rdb, which is
        // what /proc shows as the executable.
        let binary = find_in_path("redis-server").and_then(|b| b.canonicalize().ok());
        let is_it = |info: &ProcInfo| {
            let exe = info.exe.as_ref()?;
            let redis = binary.as_ref() == Some(exe) || info.exe_named("redis-server")?;
            Some(redis && info.works_in(dir)?)
        };
        leftover::stop(
            &dir.join(PID_FILE),
            Kind {
                program: SERVER,
                dir,
                is_it: &is_it,
                signal: Signal::TERM,
                timeout: STOP_TIMEOUT,
                remove_stale: true,
            },
        )
        .await
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // Explicit, so the process is dead before `dir` is removed.
        self.process.kill();
    }
}

async fn launch(
    binary: &Path,
    dir: &Path,
    log: &LogFile,
    port: u16,
    appendonly: bool,
    ready_timeout: Duration,
) -> Result<ServerProcess, Error> {
    let mut cmd = Command::new(binary);
    cmd.arg("--port")
        .arg(port.to_string())
        .args(["--bind", "127.0.0.1"])
        .arg("--dir")
        .arg(dir)
        .args(["--save", ""])
        .args(["--appendonly", if appendonly { "yes" } else { "no" }])
        .args(["--daemonize", "no", "--protected-mode", "no"])
        .arg("--logfile")
        .arg(log.path())
        .arg("--pidfile")
        .arg(dir.join(PID_FILE))
        .current_dir(dir);
    let offset = log.len();
    let mut process = ServerProcess::spawn(SERVER, cmd, log)?;
    process
        .wait_ready(log, offset, port, ready_timeout, |pid| is_ready(port, pid))
        .await?;
    Ok(process)
}

/// Whether the redis on `port` answers PING and is our process `pid`.
///
/// The pid check matters when a port race is lost: our server exits, but
/// the winner, another test's redis, would answer PING just the same.
async fn is_ready(port: u16, pid: u32) -> bool {
    probe(port).await.ok().flatten() == Some(pid)
}

/// PINGs, then reads `process_id` from `INFO server`.
async fn probe(port: u16) -> std::io::Result<Option<u32>> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
    let (reader, mut writer) = stream.split();
    let mut reader = BufReader::new(reader);
    let mut line = String::new();

    writer.write_all(b"PING\r\n").await?;
    reader.read_line(&mut line).await?;
    // While loading the AOF redis answers -LOADING: not ready yet.
    if line.trim_end() != "+PONG" {
        return Ok(None);
    }

    writer.write_all(b"INFO server\r\n").await?;
    line.clear();
    reader.read_line(&mut line).await?;
    let Some(len) = line
        .trim_end()
        .strip_prefix('$')
        .and_then(|n| n.parse::<usize>().ok())
    else {
        return Ok(None);
    };
    let mut body = vec![0; len];
    reader.read_exact(&mut body).await?;
    let body = String::from_utf8_lossy(&body);
    Ok(body
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok()))
}
