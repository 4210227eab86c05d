//! The process tree under a server: signalling, finding and reaping it.

use std::collections::HashMap;
use std::sync::Once;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, WaitOptions};

/// How long killed descendants get to disappear before we give up waiting.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);

/// Makes this process the child subreaper of everything it spawns.
///
/// Killing a postmaster orphans its backends; without this they would be
/// reparented to init and stay zombies until init gets round to them (or
/// forever, in a container whose init does not reap). As subreaper we
/// adopt them and reap them ourselves in [`await_gone`].
pub(crate) fn adopt_orphans() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
            tracing::warn!(error = %e, "cannot become child subreaper; killed servers' children go to init");
        }
    });
}

/// A process found under a server, identified by pid and start time so that
/// a recycled pid is never mistaken for it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Proc {
    pid: u32,
    start: u64,
}

impl Proc {
    /// The process `pid` names now, if any.
    pub(crate) fn of(pid: u32) -> Option<Proc> {
        stat(pid).map(|s| Proc {
            pid,
            start: s.start,
        })
    }

    pub(crate) fn pid(self) -> u32 {
        self.pid
    }

    /// Its parent's pid, while it exists.
    pub(crate) fn parent(self) -> Option<u32> {
        self.exists().map(|s| s.ppid)
    }

    /// Whether it has exited: gone, a zombie, or reaped here.
    pub(crate) fn is_dead(self) -> bool {
        reap_or_dead(self)
    }

    /// Whether `pid` still names this process (it may be a zombie).
    fn exists(self) -> Option<Stat> {
        stat(self.pid).filter(|s| s.start == self.start)
    }
}

/// Sends `signal` to `pid`, which the caller knows is its unreaped child.
pub(crate) fn send(pid: u32, signal: Signal) {
    let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return;
    };
    // ESRCH (already gone) is the only expected failure and means success.
    let _ = rustix::process::kill_process(pid, signal);
}

/// SIGKILLs each process that still exists.
pub(crate) fn kill_all(procs: &[Proc]) {
    for proc in procs {
        if proc.exists().is_some() {
            send(proc.pid, Signal::KILL);
        }
    }
}

/// Blocks until every process is reaped or dead, or `REAP_TIMEOUT` passes.
pub(crate) fn await_gone(procs: &[Proc]) {
    let deadline = Instant::now() + REAP_TIMEOUT;
    let mut alive: Vec<Proc> = procs.to_vec();
    while !alive.is_empty() && Instant::now() < deadline {
        alive.retain(|&proc| !reap_or_dead(proc));
        if !alive.is_empty() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    if !alive.is_empty() {
        tracing::warn!(?alive, "killed server processes are still alive");
    }
}

/// Reaps `proc` if it is an adopted orphan that has exited; otherwise says
/// whether it is dead (a zombie of someone else holds nothing any more).
fn reap_or_dead(proc: Proc) -> bool {
    let Some(stat) = proc.exists() else {
        return true;
    };
    if let Some(pid) = i32::try_from(proc.pid).ok().and_then(Pid::from_raw) {
        match rustix::process::waitpid(Some(pid), WaitOptions::NOHANG) {
            Ok(Some(_)) => return true,
            Ok(None) => return false,
            // ECHILD: not our child (no subreaper), so init reaps it.
            Err(_) => {}
        }
    }
    // Alive means running or stopped: a zombie holds no resources any more.
    matches!(stat.state, 'Z' | 'X' | 'x')
}

struct Stat {
    state: char,
    ppid: u32,
    start: u64,
}

/// Fields of /proc/PID/stat, or None if the process does not exist.
fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses; fields resume
    // after the last ')', starting with field 3 (state).
    let fields: Vec<&str> = text
        .get(text.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    Some(Stat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?, // field 22, starttime
    })
}

/// All descendants of `root`, found by walking /proc.
pub(crate) fn descendants(root: u32) -> Vec<Proc> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut children: HashMap<u32, Vec<Proc>> = HashMap::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(stat) = stat(pid) {
            let proc = Proc {
                pid,
                start: stat.start,
            };
            children.entry(stat.ppid).or_default().push(proc);
        }
    }
    let mut found = Vec::new();
    let mut queue = vec![root];
    while let Some(pid) = queue.pop() {
        for &child in children.get(&pid).into_iter().flatten() {
            found.push(child);
            queue.push(child.pid);
        }
    }
    found
}
