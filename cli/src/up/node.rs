//! Each region's node as a child process of `meridian up`: started from the
//! region's config file, watched, and stopped; never restarted here, so an
//! operator can freeze, kill and restart one by hand.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context;
use rustix::process::{Pid, Signal};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Asks a node started by `meridian up` to follow its parent: the node
/// exits when the process with this pid dies (see `crate::regional`).
pub(crate) const PARENT_PID_ENV: &str = "MERIDIAN_PARENT_PID";
/// The line a node prints on stdout once it serves; `meridian up` waits for
/// it rather than probing a port that speaks mutual TLS only.
pub(crate) const READY_PREFIX: &str = "ready";

/// A region's node, running as a child process.
pub(super) struct Node {
    pub(super) region: String,
    pub(super) pid: u32,
    pub(super) addr: SocketAddr,
    pub(super) time_series: String,
    pub(super) pid_file: PathBuf,
    pub(super) restart: String,
    stop: oneshot::Sender<()>,
    supervisor: JoinHandle<Option<ExitStatus>>,
}

/// Starts `meridian regional` for `region` and waits for its ready line.
pub(super) async fn start(
    region: &str,
    config: &Path,
    pid_file: &Path,
    timeout: Duration,
    stop_timeout: Duration,
) -> anyhow::Result<Node> {
    let exe = std::env::current_exe().context("cannot find the meridian binary")?;
    let mut child = Command::new(&exe)
        .arg("regional")
        .arg("--config")
        .arg(config)
        .arg("--pid-file")
        .arg(pid_file)
        .env(PARENT_PID_ENV, std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // Its logs go where ours go, as when the nodes ran in-process.
        .stderr(Stdio::inherit())
        // Own process group: Ctrl-C reaches only `meridian up`, which stops
        // the nodes before the stores they need.
        .process_group(0)
        // On an early error return; a stop in order waits for the exit first.
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("region {region}: cannot start {}", exe.display()))?;
    let pid = child.id().context("node exited at once")?;
    let stdout = child.stdout.take().context("node stdout is piped")?;
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(timeout, ready_line(&mut lines)).await;
    let (addr, time_series) = match ready {
        Ok(Some(ready)) => ready,
        Ok(None) => {
            let status = child.wait().await?;
            anyhow::bail!(
                "region {region}: node (pid {pid}) exited during startup ({status}); its error is on stderr above"
            );
        }
        Err(_) => {
            anyhow::bail!(
                "region {region}: node (pid {pid}) not ready within {} s (--node-start-timeout-secs)",
                timeout.as_secs()
            );
        }
    };
    let restart = format!(
        "{} regional --config {} --pid-file {}",
        exe.display(),
        config.display(),
        pid_file.display()
    );
    let (stop, stopped) = oneshot::channel();
    let supervisor = tokio::spawn(supervise(
        region.to_string(),
        child,
        lines,
        stopped,
        stop_timeout,
        restart.clone(),
    ));
    Ok(Node {
        region: region.to_string(),
        pid,
        addr,
        time_series,
        pid_file: pid_file.to_path_buf(),
        restart,
        stop,
        supervisor,
    })
}

/// Reads until `ready addr=… time_series=…`; `None` if stdout closes first.
async fn ready_line(lines: &mut Lines<BufReader<ChildStdout>>) -> Option<(SocketAddr, String)> {
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(ready) = parse_ready(&line) {
            return Some(ready);
        }
    }
    None
}

fn parse_ready(line: &str) -> Option<(SocketAddr, String)> {
    let mut words = line.split_whitespace();
    if words.next() != Some(READY_PREFIX) {
        return None;
    }
    let (mut addr, mut mode) = (None, None);
    for word in words {
        match word.split_once('=') {
            Some(("addr", a)) => addr = a.parse().ok(),
            Some(("time_series", m)) => mode = Some(m.to_string()),
            _ => {}
        }
    }
    Some((addr?, mode.unwrap_or_else(|| "-".into())))
}

/// Waits for the node to exit (said in one line, nothing restarted) or for
/// a stop; returns how it exited when it did so on its own.
async fn supervise(
    region: String,
    mut child: Child,
    mut lines: Lines<BufReader<ChildStdout>>,
    mut stop: oneshot::Receiver<()>,
    stop_timeout: Duration,
    restart: String,
) -> Option<ExitStatus> {
    let pid = child.id().unwrap_or_default();
    let mut draining = true;
    loop {
        tokio::select! {
            status = child.wait() => {
                let status = status.ok()?;
                println!(
                    "{region}: node (pid {pid}) exited ({status}); the other regions keep running; to restart it: {restart}"
                );
                return Some(status);
            }
            // Read so that a node writing to stdout never blocks on the pipe.
            line = lines.next_line(), if draining => {
                draining = matches!(line, Ok(Some(_)));
            }
            _ = &mut stop => break,
        }
    }
    // Not reaped yet (only `wait` reaps), so the pid is still this child's.
    if let Some(pid) = child.id().and_then(|p| Pid::from_raw(p as i32)) {
        let _ = rustix::process::kill_process(pid, Signal::TERM);
        // A frozen node (a drill's SIGSTOP) could not act on the TERM.
        let _ = rustix::process::kill_process(pid, Signal::CONT);
    }
    if tokio::time::timeout(stop_timeout, child.wait())
        .await
        .is_err()
    {
        tracing::warn!(region = %region, pid, timeout_s = stop_timeout.as_secs(), "node did not stop in time, killing it");
        let _ = child.kill().await;
    }
    None
}

impl Node {
    /// SIGTERM, a bounded wait, then SIGKILL. A node that had exited and was
    /// restarted by hand (found through its pid file) is stopped as well,
    /// since its stores are about to go.
    pub(super) async fn stop(self, stop_timeout: Duration) {
        let _ = self.stop.send(());
        let exited = self.supervisor.await.ok().flatten();
        if exited.is_some() {
            let config = self.pid_file.with_file_name(super::REGION_CONFIG_FILE);
            match meridian_launcher::stop_leftover_node(&self.pid_file, &config, stop_timeout).await
            {
                Ok(Some(node)) => println!(
                    "{}: stopped the node (pid {}) restarted by hand",
                    self.region, node.pid
                ),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(region = %self.region, error = %e, "node restarted by hand")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_line_names_the_address_and_the_time_series_mode() {
        assert_eq!(
            parse_ready("ready region=us-east addr=127.0.0.1:7101 time_series=timescaledb pid=7"),
            Some(("127.0.0.1:7101".parse().unwrap(), "timescaledb".to_string()))
        );
        assert_eq!(parse_ready("ready region=us-east"), None);
        assert_eq!(parse_ready("readyish addr=127.0.0.1:1"), None);
    }
}
