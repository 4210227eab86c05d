//! `meridian regional`: one regional node, run from its config file.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::up::node::{PARENT_PID_ENV, READY_PREFIX};

pub(crate) fn run(config: &Path, pid_file: Option<PathBuf>) -> anyhow::Result<()> {
    follow_parent()?;
    let config = meridian_regional::Config::from_file(config)?;
    let _pid_file = pid_file.map(PidFile::write).transpose()?;
    crate::runtime()?.block_on(async {
        // Before the ready line: a SIGTERM right after it must find the
        // handler in place.
        let stop = crate::shutdown_signal()?;
        let node = meridian_regional::RegionalNode::start(config).await?;
        // One line on stdout once serving: `meridian up` waits for it, and
        // a person who restarted the node by hand sees where it listens.
        println!(
            "{READY_PREFIX} region={} addr={} time_series={} pid={}",
            node.region(),
            node.local_addr(),
            node.time_series_mode(),
            std::process::id()
        );
        node.run_until(stop).await?;
        Ok(())
    })
}

/// A node started by `meridian up` stops (gracefully, through SIGTERM) when
/// `meridian up` dies, even by SIGKILL, rather than serving on without its
/// stores' keeper. Set by the node itself: the workspace has no `unsafe`
/// for a `pre_exec` in the parent.
fn follow_parent() -> anyhow::Result<()> {
    let Some(parent) = std::env::var(PARENT_PID_ENV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return Ok(());
    };
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))
        .context("cannot ask to be stopped with the parent process")?;
    // The parent may have died before the request took effect.
    if rustix::process::getppid().map(|p| p.as_raw_pid()) != Some(parent) {
        anyhow::bail!("the meridian up that started this node (pid {parent}) is gone");
    }
    Ok(())
}

/// This process's id in a file, removed on a clean exit unless another
/// process has written its own since.
struct PidFile(PathBuf);

impl PidFile {
    fn write(path: PathBuf) -> anyhow::Result<Self> {
        std::fs::write(&path, format!("{}\n", std::process::id()))
            .with_context(|| format!("cannot write pid file {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let ours = std::fs::read_to_string(&self.0)
            .is_ok_and(|text| text.trim() == std::process::id().to_string());
        if ours {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
