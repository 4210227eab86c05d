//! Servers a previous run left running (its launcher was killed before it
//! could stop them): found through their pid files, checked to really be
//! that program serving that directory, and stopped.
//!
//! A pid in a file may have been recycled by now, so nothing is signalled
//! unless `/proc` shows the expected program working in the expected
//! directory, and the signal goes through a pidfd opened before that check,
//! so it cannot reach a process that took the pid meanwhile.

use std::fmt;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::process::{Pid, PidfdFlags, Signal};

use crate::Error;
use crate::process::tree::{Proc, descendants, kill_all};

/// How often a stopping leftover is looked at.
const POLL: Duration = Duration::from_millis(20);

/// A server process a previous run left running, and what was done to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    /// What it was: `"postgres"`, `"redis"` or `"node"`.
    pub program: &'static str,
    /// Its process id.
    pub pid: u32,
    /// The directory (or config file) it served.
    pub dir: PathBuf,
    /// Whether it had to be killed because it did not stop in time.
    pub killed: bool,
}

impl fmt::Display for Leftover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.killed { "killed" } else { "stopped" };
        write!(
            f,
            "{verb} the {} (pid {}) a previous run left in {}",
            self.program,
            self.pid,
            self.dir.display()
        )
    }
}

/// What `/proc` says about a process; `None` where it cannot be read.
pub(crate) struct ProcInfo {
    /// The executable, without the ` (deleted)` a rebuilt binary gets.
    pub(crate) exe: Option<PathBuf>,
    pub(crate) cwd: Option<PathBuf>,
    pub(crate) cmdline: Vec<String>,
}

impl ProcInfo {
    fn read(pid: u32) -> Self {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        let exe = std::fs::read_link(proc.join("exe")).ok().map(|p| {
            let text = p.to_string_lossy();
            PathBuf::from(text.strip_suffix(" (deleted)").unwrap_or(&text))
        });
        let cmdline = std::fs::read(proc.join("cmdline"))
            .map(|bytes| {
                bytes
                    .split(|&b| b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        Self {
            exe,
            cwd: std::fs::read_link(proc.join("cwd")).ok(),
            cmdline,
        }
    }

    /// Whether the executable's file name is `name`; `None` if unreadable.
    pub(crate) fn exe_named(&self, name: &str) -> Option<bool> {
        let exe = self.exe.as_ref()?;
        Some(exe.file_name().is_some_and(|n| n == name))
    }

    /// Whether it works in `dir`; `None` if unreadable.
    pub(crate) fn works_in(&self, dir: &Path) -> Option<bool> {
        let cwd = self.cwd.as_ref()?;
        Some(cwd == dir || dir.canonicalize().is_ok_and(|d| &d == cwd))
    }
}

/// How to recognise and stop one kind of leftover.
pub(crate) struct Kind<'a> {
    pub(crate) program: &'static str,
    /// Shown in the report: the directory or file it served.
    pub(crate) dir: &'a Path,
    /// Some(true): it is ours to stop; Some(false): the pid now names
    /// another process; None: cannot tell (left alone).
    pub(crate) is_it: &'a dyn Fn(&ProcInfo) -> Option<bool>,
    pub(crate) signal: Signal,
    pub(crate) timeout: Duration,
    /// Whether a pid file naming no such process is removed here (the
    /// server would otherwise trip over it) or left to the server.
    pub(crate) remove_stale: bool,
}

/// Stops the process `pid_file` names if it is a leftover of `kind`.
pub(crate) async fn stop(pid_file: &Path, kind: Kind<'_>) -> Result<Option<Leftover>, Error> {
    let Ok(text) = std::fs::read_to_string(pid_file) else {
        return Ok(None);
    };
    let remove_stale = || {
        if kind.remove_stale {
            // Gone already is fine: that is what we wanted.
            let _ = std::fs::remove_file(pid_file);
        }
    };
    let Some(pid) = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<u32>().ok())
    else {
        remove_stale();
        return Ok(None);
    };
    // Opened first: whatever the checks below see is the process the
    // signal reaches, even if it exits and its pid is reused meanwhile.
    let Some(pidfd) = open_pidfd(pid) else {
        remove_stale();
        return Ok(None);
    };
    let Some(proc) = Proc::of(pid).filter(|p| !p.is_dead()) else {
        remove_stale();
        return Ok(None);
    };
    match (kind.is_it)(&ProcInfo::read(pid)) {
        Some(true) => {}
        Some(false) => {
            remove_stale();
            return Ok(None);
        }
        None => {
            tracing::warn!(pid, file = %pid_file.display(), program = kind.program, "cannot tell whether this pid is a leftover; left alone");
            return Ok(None);
        }
    }
    if let Some(owner) = live_launcher(proc) {
        return Err(Error::OwnedByLiveLauncher {
            program: kind.program,
            pid,
            dir: kind.dir.to_path_buf(),
            owner,
        });
    }
    let _ = rustix::process::pidfd_send_signal(&pidfd, kind.signal);
    let deadline = Instant::now() + kind.timeout;
    let mut killed = false;
    while !proc.is_dead() {
        if Instant::now() >= deadline && !killed {
            // Frozen, it cannot fork between the snapshot and the kill.
            let _ = rustix::process::pidfd_send_signal(&pidfd, Signal::STOP);
            let children = descendants(pid);
            let _ = rustix::process::pidfd_send_signal(&pidfd, Signal::KILL);
            kill_all(&children);
            killed = true;
        }
        tokio::time::sleep(POLL).await;
    }
    if kind.remove_stale {
        let _ = std::fs::remove_file(pid_file);
    }
    Ok(Some(Leftover {
        program: kind.program,
        pid: proc.pid(),
        dir: kind.dir.to_path_buf(),
        killed,
    }))
}

/// The pid of the `meridian` that started `proc` and still runs, if any.
///
/// A leftover's launcher is gone, so it has been reparented (to init or a
/// subreaper). One whose parent is another live `meridian` is not left
/// over. This process itself may stop what it started (tests do).
fn live_launcher(proc: Proc) -> Option<u32> {
    let parent = proc.parent()?;
    if parent == std::process::id() {
        return None;
    }
    let exe = ProcInfo::read(parent).exe?;
    exe.file_name()?
        .to_string_lossy()
        .starts_with("meridian")
        .then_some(parent)
}

fn open_pidfd(pid: u32) -> Option<OwnedFd> {
    let pid = Pid::from_raw(i32::try_from(pid).ok()?)?;
    rustix::process::pidfd_open(pid, PidfdFlags::empty()).ok()
}

/// Stops the `meridian regional --config <config>` node that `pid_file`
/// names, if a previous run left it running: SIGTERM, then SIGKILL after
/// `timeout`. A pid file naming no such node is removed.
pub async fn stop_leftover_node(
    pid_file: &Path,
    config: &Path,
    timeout: Duration,
) -> Result<Option<Leftover>, Error> {
    let config = config
        .canonicalize()
        .unwrap_or_else(|_| config.to_path_buf());
    let is_it = |info: &ProcInfo| -> Option<bool> {
        let exe = info.exe.as_ref()?;
        let cwd = info.cwd.as_ref()?;
        // Started by hand, its config may be a path relative to its cwd.
        let names_config = |arg: &String| {
            let path = cwd.join(arg);
            path == config || path.canonicalize().is_ok_and(|p| p == config)
        };
        let meridian = exe
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("meridian"));
        Some(
            meridian
                && info.cmdline.iter().any(|a| a == "regional")
                && info.cmdline.iter().any(names_config),
        )
    };
    stop(
        pid_file,
        Kind {
            program: "node",
            dir: pid_file.parent().unwrap_or(pid_file),
            is_it: &is_it,
            signal: Signal::TERM,
            timeout,
            remove_stale: true,
        },
    )
    .await
}
