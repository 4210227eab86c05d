//! A regional node in a process of its own (the `region-process` binary of
//! this crate), so that what `/proc` says of it is the node's alone.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::RegionSandbox;

/// The node's process; killed when dropped.
pub struct RegionProcess {
    child: Child,
    addr: SocketAddr,
    /// What it logged, when started with [`RegionProcess::start_with_env`].
    logs: Arc<Mutex<String>>,
}

impl RegionProcess {
    /// Stops `region`'s in-process node and runs the region's node in its
    /// own process instead, from `exe` (`env!("CARGO_BIN_EXE_region-process")`
    /// in an integration test), on a free port.
    pub async fn start(exe: impl AsRef<Path>, region: &mut RegionSandbox) -> Self {
        Self::spawn(exe.as_ref(), region, &[], false).await
    }

    /// Like [`RegionProcess::start`], with `env` added to the process's
    /// environment (as an operator hands a node its secrets) and its log
    /// output (stderr) kept for [`RegionProcess::logs`].
    pub async fn start_with_env(
        exe: impl AsRef<Path>,
        region: &mut RegionSandbox,
        env: &[(&str, &str)],
    ) -> Self {
        Self::spawn(exe.as_ref(), region, env, true).await
    }

    /// Everything the process logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    async fn spawn(
        exe: &Path,
        region: &mut RegionSandbox,
        env: &[(&str, &str)],
        keep_logs: bool,
    ) -> Self {
        region.stop_node().await;
        let path = region.postgres.dir().join("regional-process.toml");
        let listen = SocketAddr::from(([127, 0, 0, 1], 0));
        std::fs::write(&path, region.config_toml(listen)).expect("the node's config is written");
        let mut child = Command::new(exe)
            .arg(&path)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(if keep_logs {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .kill_on_drop(true)
            .spawn()
            .expect("the region process starts");
        let logs = Arc::new(Mutex::new(String::new()));
        if let Some(stderr) = child.stderr.take() {
            let logs = logs.clone();
            // Drained as it comes, or a chatty node would block on a full pipe.
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut logs = logs.lock().unwrap();
                    logs.push_str(&line);
                    logs.push('\n');
                }
            });
        }
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            let line = lines
                .next_line()
                .await
                .expect("the region process's stdout")
                .expect("the region process prints its address before it exits");
            if let Some(addr) = line.strip_prefix("listening ") {
                break addr.parse().expect("an address");
            }
        };
        Self { child, addr, logs }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the process runs")
    }

    /// Sends it `signal` (`"STOP"`, `"CONT"`, ...) with kill(1): how an
    /// operator freezes and thaws a process.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill(1) runs");
        assert!(status.success(), "kill -{signal} {}", self.pid());
    }

    /// Its resident memory (`VmRSS`), in KiB.
    pub fn rss_kib(&self) -> u64 {
        let pid = self.child.id().expect("the process runs");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .expect("/proc/<pid>/status of the region process");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("a VmRSS line")
    }
}
