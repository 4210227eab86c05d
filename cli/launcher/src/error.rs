//! The crate's error type.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;

/// Why a server could not be started, stopped or prepared.
///
/// Messages are lowercase and name the cause, so they read well after an
/// `anyhow` context or a test's `expect`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A server binary (redis-server, postgres, initdb) could not be found.
    #[error("{program} not found (looked in {searched}): run infra/scripts/setup.sh")]
    BinaryNotFound {
        /// The program that was looked for.
        program: &'static str,
        /// Where it was looked for, for the message.
        searched: String,
    },

    /// The server could not listen because another socket holds the port.
    #[error("port {port} is already in use")]
    PortInUse {
        /// The port that was taken.
        port: u16,
    },

    /// The server kept running but never answered its readiness probe.
    #[error(
        "{server} did not become ready within {secs} s; last lines of {}:\n{tail}",
        log.display()
    )]
    NotReady {
        /// `"redis"` or `"postgres"`.
        server: &'static str,
        /// The readiness timeout, in seconds.
        secs: u64,
        /// The server's log file.
        log: PathBuf,
        /// The last lines of the log file.
        tail: String,
    },

    /// The server exited before it became ready.
    #[error(
        "{server} exited during startup ({status}); last lines of {}:\n{tail}",
        log.display()
    )]
    Exited {
        /// `"redis"` or `"postgres"`.
        server: &'static str,
        /// How it exited.
        status: ExitStatus,
        /// The server's log file.
        log: PathBuf,
        /// The last lines of the log file.
        tail: String,
    },

    /// A helper command (initdb, single-user postgres) failed.
    #[error("{command} failed ({status}): {output}")]
    CommandFailed {
        /// The command, for the message.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// The tail of its combined output.
        output: String,
    },

    /// A graceful stop took too long; the process was killed instead.
    #[error("{server} did not stop within {secs} s and was killed")]
    StopTimeout {
        /// `"redis"` or `"postgres"`.
        server: &'static str,
        /// The stop timeout, in seconds.
        secs: u64,
    },

    /// A pid file names a server that a running `meridian` still owns: two
    /// launchers on one state directory would stop each other's servers.
    #[error(
        "the {program} (pid {pid}) in {} belongs to meridian (pid {owner}), which still runs: stop that one first",
        dir.display()
    )]
    OwnedByLiveLauncher {
        /// `"redis"`, `"postgres"` or `"node"`.
        program: &'static str,
        /// The server's pid.
        pid: u32,
        /// The directory it serves.
        dir: PathBuf,
        /// The pid of the launcher that started it.
        owner: u32,
    },

    /// Running as root, but there is no unprivileged user to run PostgreSQL as.
    #[error("running as root but neither a postgres nor a nobody user exists in /etc/passwd")]
    NoUnprivilegedUser,

    /// A PostgreSQL data directory exists but holds something other than a cluster.
    #[error("{} is not empty and holds no PG_VERSION: refusing to initdb over it", .0.display())]
    ForeignDataDir(PathBuf),

    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, e.g. "create state dir /tmp/x".
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// Wraps an I/O error with what was being attempted.
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}
