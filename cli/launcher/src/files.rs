//! State directories, log files and binary lookup shared by both servers.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use crate::Error;

/// How many log lines an error message carries.
const TAIL_LINES: usize = 20;
/// Only the end of a log is read for the tail, so a long-lived server's huge
/// log does not make a startup error expensive.
const TAIL_BYTES: u64 = 16 * 1024;

/// Where a server keeps its data, socket and log.
pub(crate) enum StateDir {
    /// Created for this server and removed when it is dropped.
    Temp(TempDir),
    /// Given by the caller and left in place.
    Kept(PathBuf),
}

impl StateDir {
    /// Uses `dir` (created if missing) or makes a fresh temp dir named `prefix*`.
    pub(crate) fn new(dir: Option<PathBuf>, prefix: &str) -> Result<Self, Error> {
        match dir {
            Some(dir) => {
                // Absolute, because servers run with the state dir as their
                // working directory and a relative path would resolve twice.
                let dir = std::path::absolute(&dir)
                    .map_err(Error::io(format!("resolve state dir {}", dir.display())))?;
                std::fs::create_dir_all(&dir)
                    .map_err(Error::io(format!("create state dir {}", dir.display())))?;
                Ok(Self::Kept(dir))
            }
            None => tempfile::Builder::new()
                .prefix(prefix)
                .tempdir()
                .map(Self::Temp)
                .map_err(Error::io("create temp state dir")),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        match self {
            Self::Temp(dir) => dir.path(),
            Self::Kept(dir) => dir,
        }
    }

    /// Opens a temp dir to other users; a caller's own dir is left alone.
    ///
    /// tempfile creates 0700 dirs, which an unprivileged server user could
    /// not even traverse to reach its data dir inside.
    pub(crate) fn open_temp_to_others(&self) -> Result<(), Error> {
        if let Self::Temp(dir) = self {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .map_err(Error::io(format!("chmod {}", dir.path().display())))?;
        }
        Ok(())
    }
}

/// A server's log file, appended to by every start.
pub(crate) struct LogFile {
    path: PathBuf,
}

impl LogFile {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self { path }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Opens for appending, so a restart keeps the previous run's lines.
    pub(crate) fn open_append(&self) -> Result<File, Error> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(Error::io(format!("open log {}", self.path.display())))
    }

    /// The current length, used to read only what one start wrote.
    pub(crate) fn len(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    /// Everything written after byte `offset` (lossy UTF-8, empty on error).
    pub(crate) fn read_since(&self, offset: u64) -> String {
        read_from(&self.path, offset).unwrap_or_default()
    }

    /// The last lines of the log, for error messages.
    pub(crate) fn tail(&self) -> String {
        let start = self.len().saturating_sub(TAIL_BYTES);
        match read_from(&self.path, start) {
            Ok(text) => last_lines(&text, TAIL_LINES),
            Err(e) => format!("(log unreadable: {e})"),
        }
    }
}

fn read_from(path: &Path, offset: u64) -> io::Result<String> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The last `n` lines of `text`, joined with newlines.
pub(crate) fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Finds an executable called `name` on `PATH`.
pub(crate) fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

pub(crate) fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_lines_keeps_the_end() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("a", 5), "a");
        assert_eq!(last_lines("", 5), "");
    }
}
