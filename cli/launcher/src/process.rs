//! Spawning, probing and tearing down one server process.
//!
//! The server is a [`std::process::Child`] rather than a tokio one so that
//! [`Drop`] can kill and reap it synchronously, with or without a runtime
//! (a panicking `#[tokio::test]` drops it while its runtime is shutting down).

pub(crate) mod tree;

use std::future::Future;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::process::Signal;

use crate::Error;
use crate::files::LogFile;
use tree::{adopt_orphans, await_gone, descendants, kill_all, send};

/// How often readiness and exit are polled: small next to server start times.
const POLL: Duration = Duration::from_millis(20);
/// A single readiness probe that hangs (a stranger on the port that never
/// answers) must not eat the whole readiness budget.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Starts tried with fresh ports when another process races us to one.
const PORT_ATTEMPTS: u32 = 5;
/// What both servers log when bind(2) fails with EADDRINUSE.
const ADDR_IN_USE: &str = "Address already in use";

/// Returns a port that was free on 127.0.0.1 a moment ago.
///
/// The port is only reserved while this function runs, so another process
/// may take it before the caller binds; the servers' `start` retries with a
/// new port when that happens.
pub fn free_port() -> std::io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// Calls `launch` with `fixed`, or with fresh free ports until one is not
/// raced away; returns the port that worked and what `launch` returned.
pub(crate) async fn with_port_retry<T, F, Fut>(
    server: &'static str,
    fixed: Option<u16>,
    mut launch: F,
) -> Result<(u16, T), Error>
where
    F: FnMut(u16) -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    if let Some(port) = fixed {
        return Ok((port, launch(port).await?));
    }
    let mut attempt = 1;
    loop {
        let port = free_port().map_err(Error::io("pick a free port"))?;
        match launch(port).await {
            Err(Error::PortInUse { port }) if attempt < PORT_ATTEMPTS => {
                tracing::debug!(
                    server,
                    port,
                    attempt,
                    "port taken by another process, retrying"
                );
                attempt += 1;
            }
            result => return Ok((port, result?)),
        }
    }
}

/// One running (or exited) server process, killed when dropped.
pub(crate) struct ServerProcess {
    server: &'static str,
    child: Option<Child>,
}

impl ServerProcess {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub(crate) fn spawn(
        server: &'static str,
        mut cmd: Command,
        log: &LogFile,
    ) -> Result<Self, Error> {
        adopt_orphans();
        let stdout = log.open_append()?;
        let stderr = stdout.try_clone().map_err(Error::io(format!(
            "duplicate {} handle",
            log.path().display()
        )))?;
        cmd.stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            // Own process group: Ctrl-C in the terminal of `meridian up` then
            // reaches only the launcher, which stops the servers in order.
            .process_group(0);
        let child = cmd.spawn().map_err(Error::io(format!(
            "spawn {}",
            cmd.get_program().to_string_lossy()
        )))?;
        tracing::debug!(server, pid = child.id(), "spawned");
        Ok(Self {
            server,
            child: Some(child),
        })
    }

    /// A process that was never started; `is_running` is false.
    pub(crate) fn none(server: &'static str) -> Self {
        Self {
            server,
            child: None,
        }
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is alive; reaps it if it has exited.
    pub(crate) fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Polls `probe(pid)` until it returns true, the process exits, or
    /// `timeout` passes; on failure the process is gone when this returns.
    ///
    /// `log_offset` is the log length before the spawn: only this start's
    /// lines decide whether it failed because of the port.
    pub(crate) async fn wait_ready<F, Fut>(
        &mut self,
        log: &LogFile,
        log_offset: u64,
        port: u16,
        timeout: Duration,
        mut probe: F,
    ) -> Result<(), Error>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = bool>,
    {
        let started = Instant::now();
        loop {
            let Some(child) = self.child.as_mut() else {
                return Err(self.exited_error(None, log, log_offset, port));
            };
            let pid = child.id();
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(self.exited_error(Some(status), log, log_offset, port));
            }
            if tokio::time::timeout(PROBE_TIMEOUT, probe(pid)).await == Ok(true) {
                return Ok(());
            }
            if started.elapsed() >= timeout {
                self.kill();
                return Err(Error::NotReady {
                    server: self.server,
                    secs: timeout.as_secs(),
                    log: log.path().to_path_buf(),
                    tail: log.tail(),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn exited_error(
        &self,
        status: Option<ExitStatus>,
        log: &LogFile,
        offset: u64,
        port: u16,
    ) -> Error {
        if log.read_since(offset).contains(ADDR_IN_USE) {
            return Error::PortInUse { port };
        }
        Error::Exited {
            server: self.server,
            status: status.unwrap_or_default(),
            log: log.path().to_path_buf(),
            tail: log.tail(),
        }
    }

    /// Sends `signal` (the server's graceful shutdown signal) and waits up to
    /// `timeout` for the exit; kills the process if it takes longer.
    pub(crate) async fn stop(&mut self, signal: Signal, timeout: Duration) -> Result<(), Error> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        if !matches!(child.try_wait(), Ok(None)) {
            // Already exited and reaped: its pid may belong to someone else now.
            self.child = None;
            return Ok(());
        }
        let pid = child.id();
        // Taken before the signal: once the leader is gone its children are
        // reparented and can no longer be found through it.
        let descendants = descendants(pid);
        send(pid, signal);
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                // Err means someone else reaped it: gone all the same.
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    self.kill();
                    return Err(Error::StopTimeout {
                        server: self.server,
                        secs: timeout.as_secs(),
                    });
                }
                Ok(None) => tokio::time::sleep(POLL).await,
            }
        }
        self.child = None;
        // Servers reap their own children on a clean exit; this only catches
        // a straggler such as a save child that outlived redis.
        kill_all(&descendants);
        await_gone(&descendants);
        tracing::debug!(server = self.server, pid, "stopped");
        Ok(())
    }

    /// SIGKILLs the process and all its descendants and reaps the process.
    ///
    /// Descendants are killed one by one because PostgreSQL backends call
    /// setsid(), so a process-group kill would miss them; they would linger
    /// holding the shared memory that a restart needs.
    pub(crate) fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if !matches!(child.try_wait(), Ok(None)) {
            // Already exited and reaped: its pid may belong to someone else now.
            return;
        }
        // From here until `wait` the pid stays ours, at worst as a zombie.
        let pid = child.id();
        // Frozen, the leader cannot fork between the snapshot and the kill.
        send(pid, Signal::STOP);
        let descendants = descendants(pid);
        send(pid, Signal::KILL);
        kill_all(&descendants);
        if let Err(e) = child.wait() {
            tracing::warn!(server = self.server, pid, error = %e, "could not reap killed server");
        }
        // The killed descendants are orphans now, adopted by this process
        // (see `adopt_orphans`): reap them, and so make sure no port, lock
        // or shared memory is still held when `kill` returns.
        await_gone(&descendants);
        tracing::debug!(server = self.server, pid, "killed");
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_raced_port_is_retried_with_a_fresh_one() {
        let mut tried = Vec::new();
        let (port, value) = with_port_retry("test", None, |port| {
            tried.push(port);
            let raced = tried.len() < 3;
            async move {
                if raced {
                    Err(Error::PortInUse { port })
                } else {
                    Ok("up")
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(value, "up");
        assert_eq!(tried.len(), 3);
        assert_eq!(Some(&port), tried.last());
    }

    #[tokio::test]
    async fn retries_are_bounded() {
        let mut calls = 0;
        let result: Result<(u16, ()), Error> = with_port_retry("test", None, |port| {
            calls += 1;
            async move { Err(Error::PortInUse { port }) }
        })
        .await;
        assert!(matches!(result, Err(Error::PortInUse { .. })));
        assert_eq!(calls, PORT_ATTEMPTS);
    }

    #[tokio::test]
    async fn an_explicit_port_is_never_swapped() {
        let mut calls = 0;
        let result: Result<(u16, ()), Error> = with_port_retry("test", Some(7), |port| {
            calls += 1;
            async move { Err(Error::PortInUse { port }) }
        })
        .await;
        assert!(matches!(result, Err(Error::PortInUse { port: 7 })));
        assert_eq!(calls, 1);
    }
}
