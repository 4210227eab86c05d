//! A local PostgreSQL cluster: initdb on first use, then `postgres`.

mod setup;

use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rustix::process::Signal;
use tokio::net::TcpStream;

use crate::Error;
use crate::files::{LogFile, StateDir};
use crate::leftover::{self, Kind, Leftover, ProcInfo};
use crate::process::{ServerProcess, with_port_retry};
use setup::{BinDir, ROLE, RunAs};

const SERVER: &str = "postgres";
/// Fast shutdown still writes a checkpoint; generous for slow CI disks.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// sun_path is 108 bytes on Linux, including the trailing NUL.
const MAX_SOCKET_PATH: usize = 107;

/// How to start a [`PostgresServer`].
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// State directory holding `data/` (the cluster), `sock/` and
    /// `postgres.log`; `None` makes a temp dir removed on drop. An existing
    /// cluster in `data/` is reused, so data survives across runs. When
    /// running as root, the postgres user must be able to traverse it and
    /// its parents (temp dirs are opened up automatically, given ones are not).
    pub dir: Option<PathBuf>,
    /// Port to listen on; `None` picks a free one (and retries if raced).
    pub port: Option<u16>,
    /// Whether to fsync. Off by default, which also turns off
    /// `full_page_writes`: committed data survives a killed server but not a
    /// crashed machine, which is fine for dev and tests.
    ///
    /// `synchronous_commit` stays on either way: off, a commit is
    /// acknowledged while its WAL is still in shared memory, so `kill` would
    /// lose it, and with fsync off it only costs a write(2) per commit.
    pub fsync: bool,
    /// How long `start` and `restart` wait for connections to be accepted.
    pub ready_timeout: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            dir: None,
            port: None,
            fsync: false,
            ready_timeout: Duration::from_secs(30),
        }
    }
}

/// One PostgreSQL cluster served by a `postgres` process on 127.0.0.1.
///
/// The superuser role `meridian` owns database `meridian` and trust
/// authentication is on, so no password is needed; the server only listens
/// on loopback. When the launcher runs as root, the server runs as the
/// `postgres` user (or `nobody`), because PostgreSQL refuses to run as root.
///
/// Dropping it kills the server (SIGKILL) and removes its temp dir.
pub struct PostgresServer {
    process: ServerProcess,
    bin: BinDir,
    run_as: Option<RunAs>,
    port: u16,
    fsync: bool,
    ready_timeout: Duration,
    data: PathBuf,
    socket_dir: Option<PathBuf>,
    log: LogFile,
    // Declared last so it is removed after the process is gone.
    dir: StateDir,
}

/// Whether the PostgreSQL server that [`PostgresServer::start`] runs has
/// extension `name` installed: its control file, and its library when it
/// has one (`library`, without `.so`). Checked on disk, without a server.
pub fn extension_installed(name: &str, library: Option<&str>) -> bool {
    let Ok(bin) = BinDir::find() else {
        return false;
    };
    let lib_ok = library.is_none_or(|lib| bin.path(&format!("../lib/{lib}.so")).exists());
    lib_ok
        && bin.share_dirs().iter().any(|share| {
            share
                .join("extension")
                .join(format!("{name}.control"))
                .exists()
        })
}

impl PostgresServer {
    /// Initializes the cluster if needed, starts postgres and waits until it
    /// accepts connections.
    pub async fn start(opts: PostgresOptions) -> Result<PostgresServer, Error> {
        let started = Instant::now();
        let bin = BinDir::find()?;
        let run_as = RunAs::for_current_process()?;
        let dir = StateDir::new(opts.dir, "meridian-postgres-")?;
        if run_as.is_some() {
            dir.open_temp_to_others()?;
        }
        let data = setup::ensure_cluster(&bin, dir.path(), run_as).await?;
        let socket_dir = socket_dir(dir.path(), run_as)?;
        let log = LogFile::new(dir.path().join("postgres.log"));
        let launcher = Launcher {
            bin: &bin,
            run_as,
            dir: dir.path(),
            data: &data,
            socket_dir: socket_dir.as_deref(),
            fsync: opts.fsync,
            ready_timeout: opts.ready_timeout,
            log: &log,
        };
        let (port, process) =
            with_port_retry(SERVER, opts.port, |port| launcher.launch(port)).await?;
        tracing::info!(
            port,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "postgres ready"
        );
        Ok(PostgresServer {
            process,
            bin,
            run_as,
            port,
            fsync: opts.fsync,
            ready_timeout: opts.ready_timeout,
            data,
            socket_dir,
            log,
            dir,
        })
    }

    /// The connection URL, `postgres://meridian@127.0.0.1:PORT/meridian`.
    pub fn url(&self) -> String {
        format!("postgres://{ROLE}@127.0.0.1:{}/{ROLE}", self.port)
    }

    /// The TCP port, kept across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The postmaster's process id, or `None` after `stop` or `kill`.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The cluster's data directory, `<dir>/data`.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The Unix socket directory, or `None` when the state dir's path is too
    /// long for a socket and only TCP is served.
    pub fn socket_dir(&self) -> Option<&Path> {
        self.socket_dir.as_deref()
    }

    /// The server's log file (its stderr), appended to by every (re)start.
    pub fn log_path(&self) -> &Path {
        self.log.path()
    }

    /// Fast shutdown (SIGINT: abort sessions, checkpoint, exit) and wait;
    /// kills the server if it does not exit within 30 s.
    pub async fn stop(&mut self) -> Result<(), Error> {
        self.process.stop(Signal::INT, STOP_TIMEOUT).await
    }

    /// Kills the server and its backends now (SIGKILL), as a crash would;
    /// the next start runs crash recovery.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts again on the same port and data dir and waits until ready; a
    /// running server is stopped first.
    ///
    /// Fails with [`Error::PortInUse`] if another process took the port
    /// meanwhile: moving would break clients that hold the URL.
    pub async fn restart(&mut self) -> Result<(), Error> {
        if self.process.is_running() {
            self.stop().await?;
        }
        self.process = ServerProcess::none(SERVER);
        let launcher = Launcher {
            bin: &self.bin,
            run_as: self.run_as,
            dir: self.dir.path(),
            data: &self.data,
            socket_dir: self.socket_dir.as_deref(),
            fsync: self.fsync,
            ready_timeout: self.ready_timeout,
            log: &self.log,
        };
        let process = launcher.launch(self.port).await?;
        self.process = process;
        Ok(())
    }

    /// Whether the postmaster is alive.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Stops the postgres a previous run left serving the cluster in state
    /// directory `dir` (its launcher was killed): fast shutdown, then kill
    /// after 30 s. Returns what it found; `None` when nothing runs there.
    ///
    /// A postmaster.pid whose process is gone is left to postgres, which
    /// checks the shared memory it names before it starts again.
    pub async fn stop_leftover(dir: &Path) -> Result<Option<Leftover>, Error> {
        let data = dir.join("data");
        let is_it = |info: &ProcInfo| Some(info.exe_named(SERVER)? && info.works_in(&data)?);
        leftover::stop(
            &data.join("postmaster.pid"),
            Kind {
                program: SERVER,
                dir,
                is_it: &is_it,
                signal: Signal::INT,
                timeout: STOP_TIMEOUT,
                remove_stale: false,
            },
        )
        .await
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        // Explicit, so the server is dead before `dir` is removed.
        self.process.kill();
    }
}

/// Creates `<dir>/sock` for the server's Unix socket, or returns `None` if
/// the socket path would be too long (postgres would refuse to start).
fn socket_dir(dir: &Path, run_as: Option<RunAs>) -> Result<Option<PathBuf>, Error> {
    let sock = dir.join("sock");
    if sock.join(".s.PGSQL.65535.lock").as_os_str().len() > MAX_SOCKET_PATH {
        return Ok(None);
    }
    std::fs::create_dir_all(&sock).map_err(Error::io(format!("create {}", sock.display())))?;
    if let Some(user) = run_as {
        user.chown(&sock)?;
    }
    Ok(Some(sock))
}

/// Everything one postgres launch needs, borrowed from the server.
struct Launcher<'a> {
    bin: &'a BinDir,
    run_as: Option<RunAs>,
    dir: &'a Path,
    data: &'a Path,
    socket_dir: Option<&'a Path>,
    fsync: bool,
    ready_timeout: Duration,
    log: &'a LogFile,
}

impl Launcher<'_> {
    async fn launch(&self, port: u16) -> Result<ServerProcess, Error> {
        let durable = if self.fsync { "on" } else { "off" };
        let mut cmd = Command::new(self.bin.path("postgres"));
        cmd.arg("-D")
            .arg(self.data)
            .arg("-p")
            .arg(port.to_string())
            .args(["-c", "listen_addresses=127.0.0.1"]);
        match self.socket_dir {
            Some(sock) => cmd.arg("-k").arg(sock),
            None => cmd.args(["-c", "unix_socket_directories="]),
        };
        for setting in [
            format!("fsync={durable}"),
            format!("full_page_writes={durable}"),
            "max_connections=200".into(),
            "shared_buffers=32MB".into(),
        ] {
            cmd.arg("-c").arg(setting);
        }
        // TimescaleDB only loads when preloaded; where it is installed, the
        // regions' time series use it (see regional/src/telemetry/schema.rs).
        // Its telemetry would report each cluster to Timescale and fetch
        // version news at every start: regions keep to themselves.
        if self.bin.path("../lib/timescaledb.so").exists() {
            cmd.args(["-c", "shared_preload_libraries=timescaledb"])
                .args(["-c", "timescaledb.telemetry_level=off"]);
        }
        cmd.current_dir(self.dir);
        if let Some(user) = self.run_as {
            cmd.uid(user.uid).gid(user.gid);
        }
        let offset = self.log.len();
        let mut process = ServerProcess::spawn(SERVER, cmd, self.log)?;
        let data = self.data;
        process
            .wait_ready(self.log, offset, port, self.ready_timeout, |pid| {
                is_ready(data, port, pid)
            })
            .await?;
        Ok(process)
    }
}

/// Whether postmaster `pid` says it is ready and its port takes connections.
///
/// postmaster.pid names the pid and its state ("ready" once connections are
/// accepted), which tells our server from another one that won a port race.
async fn is_ready(data: &Path, port: u16, pid: u32) -> bool {
    let Ok(lock) = tokio::fs::read_to_string(data.join("postmaster.pid")).await else {
        return false;
    };
    let lines: Vec<&str> = lock.lines().map(str::trim).collect();
    if lines.first() != Some(&pid.to_string().as_str()) || lines.get(7) != Some(&"ready") {
        return false;
    }
    TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .is_ok()
}
