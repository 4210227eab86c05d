//! What one process (with its children: PostgreSQL's backends) holds now:
//! private resident memory, open descriptors and established TCP
//! connections, read from /proc.
//!
//! Memory is `RssAnon`, the anonymous pages a process owns, not `VmRSS`:
//! `VmRSS` also counts the shared memory a process has touched, and every
//! PostgreSQL backend touches more of the shared buffers as it serves,
//! which looks like growth summed over the backends although nothing
//! leaks. A leak is private memory that grows. And it is judged per
//! process of the tree: PostgreSQL runs a backend per connection, each with
//! its own few MiB, and the number of connections follows the clients'
//! pools (a region's node killed and started again opens new ones), so the
//! tree's sum moves with the connection count while no process grows.

use std::collections::{HashMap, HashSet};

/// One reading of one process tree.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Sample {
    /// `RssAnon`, kB, summed over the tree.
    pub private_kb: u64,
    /// Processes in the tree.
    pub procs: u64,
    pub fds: u64,
    pub tcp: u64,
}

/// Inodes of the established TCP sockets of this network namespace.
pub(crate) fn established() -> HashSet<u64> {
    let mut inodes = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // `st` 01 is ESTABLISHED; column 9 is the socket's inode.
            if cols.len() > 9
                && cols[3] == "01"
                && let Ok(inode) = cols[9].parse()
            {
                inodes.insert(inode);
            }
        }
    }
    inodes
}

/// Children by parent, for every process now.
pub(crate) fn children() -> HashMap<u32, Vec<u32>> {
    let mut map: HashMap<u32, Vec<u32>> = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return map;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // The parent is the field after the parenthesised command name.
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            && let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r)
            && let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok())
        {
            map.entry(ppid).or_default().push(pid);
        }
    }
    map
}

/// `pid` and its descendants, summed; `None` when `pid` is gone.
pub(crate) fn tree(
    pid: u32,
    children: &HashMap<u32, Vec<u32>>,
    tcp: &HashSet<u64>,
) -> Option<Sample> {
    let mut total = one(pid, tcp)?;
    let mut stack: Vec<u32> = children.get(&pid).cloned().unwrap_or_default();
    while let Some(p) = stack.pop() {
        if let Some(s) = one(p, tcp) {
            total.private_kb += s.private_kb;
            total.procs += 1;
            total.fds += s.fds;
            total.tcp += s.tcp;
        }
        stack.extend(children.get(&p).into_iter().flatten());
    }
    Some(total)
}

fn one(pid: u32, tcp: &HashSet<u64>) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let private_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut sample = Sample {
        private_kb,
        procs: 1,
        ..Sample::default()
    };
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        sample.fds += 1;
        if let Ok(target) = std::fs::read_link(fd.path())
            && let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            && tcp.contains(&inode)
        {
            sample.tcp += 1;
        }
    }
    Some(sample)
}

/// The verdict on one process's series since it last started: after the
/// first third (warm-up), the median of the last third may exceed the
/// median of the second third by at most `max(20%, slack)`, for memory and
/// for descriptors alike, each per process of the tree. `None` when the series is too short to judge.
pub(crate) fn flat(series: &[Sample]) -> Option<Result<(), String>> {
    if series.len() < 6 {
        return None;
    }
    let third = series.len() / 3;
    let (mid, last) = (&series[third..2 * third], &series[2 * third..]);
    let check = |what: &str, f: fn(&Sample) -> u64, slack: u64| {
        let (a, b) = (median(mid, f), median(last, f));
        let allowed = a + (a / 5).max(slack);
        if b > allowed {
            Err(format!(
                "{what} grew from a median of {a} to {b} (allowed {allowed})"
            ))
        } else {
            Ok(())
        }
    };
    Some(
        check(
            "private memory per process (kB)",
            |s| s.private_kb / s.procs.max(1),
            16 * 1024,
        )
        .and_then(|()| {
            check(
                "open descriptors per process",
                |s| s.fds / s.procs.max(1),
                16,
            )
        }),
    )
}

fn median(series: &[Sample], f: fn(&Sample) -> u64) -> u64 {
    let mut v: Vec<u64> = series.iter().map(f).collect();
    v.sort_unstable();
    v[v.len() / 2]
}
