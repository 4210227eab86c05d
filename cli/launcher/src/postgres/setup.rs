//! Finding the PostgreSQL binaries, the user to run them as, and initdb.

use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::Error;
use crate::files::{find_in_path, is_executable, last_lines};

/// Where Debian and Ubuntu install each major version side by side.
const DEBIAN_ROOT: &str = "/usr/lib/postgresql";
/// The bootstrap superuser and its database, as in the URL.
pub(crate) const ROLE: &str = "meridian";

/// The directory holding `postgres` and `initdb`.
#[derive(Debug, Clone)]
pub(crate) struct BinDir(PathBuf);

impl BinDir {
    /// The highest version under /usr/lib/postgresql/*/bin, else `PATH`.
    pub(crate) fn find() -> Result<Self, Error> {
        let newest = std::fs::read_dir(DEBIAN_ROOT)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let version = version_key(entry.file_name().to_str()?)?;
                let bin = entry.path().join("bin");
                Self::complete(&bin).then_some((version, bin))
            })
            .max();
        if let Some((_, bin)) = newest {
            return Ok(Self(bin));
        }
        find_in_path("postgres")
            .and_then(|postgres| postgres.parent().map(Path::to_path_buf))
            .filter(|bin| Self::complete(bin))
            .map(Self)
            .ok_or(Error::BinaryNotFound {
                program: "postgres and initdb",
                searched: format!("{DEBIAN_ROOT}/*/bin and PATH"),
            })
    }

    fn complete(bin: &Path) -> bool {
        is_executable(&bin.join("postgres")) && is_executable(&bin.join("initdb"))
    }

    pub(crate) fn path(&self, program: &str) -> PathBuf {
        self.0.join(program)
    }

    /// Where the server may look for extension control files: Debian's
    /// /usr/share/postgresql/<major> beside /usr/lib/postgresql/<major>,
    /// else a source install's <prefix>/share/postgresql.
    pub(crate) fn share_dirs(&self) -> Vec<PathBuf> {
        let version = self.0.parent().and_then(Path::file_name);
        let mut dirs: Vec<PathBuf> = version
            .map(|v| Path::new("/usr/share/postgresql").join(v))
            .into_iter()
            .collect();
        if let Some(prefix) = self.0.parent() {
            dirs.push(prefix.join("share/postgresql"));
        }
        dirs
    }
}

/// "15" → [15], "9.6" → [9, 6], so that 10 sorts above 9.6.
fn version_key(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

/// The unprivileged user PostgreSQL runs as when we are root.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunAs {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

impl RunAs {
    /// `None` unless root, because postgres refuses to run as root.
    pub(crate) fn for_current_process() -> Result<Option<Self>, Error> {
        if !rustix::process::geteuid().is_root() {
            return Ok(None);
        }
        let passwd =
            std::fs::read_to_string("/etc/passwd").map_err(Error::io("read /etc/passwd"))?;
        ["postgres", "nobody"]
            .into_iter()
            .find_map(|name| lookup(&passwd, name))
            .map(Some)
            .ok_or(Error::NoUnprivilegedUser)
    }

    /// Hands `path` to this user.
    pub(crate) fn chown(&self, path: &Path) -> Result<(), Error> {
        chown(path, Some(self.uid), Some(self.gid))
            .map_err(Error::io(format!("chown {}", path.display())))
    }
}

/// Finds `name:x:uid:gid:...` in passwd text.
fn lookup(passwd: &str, name: &str) -> Option<RunAs> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != name {
            return None;
        }
        let _password = fields.next()?;
        Some(RunAs {
            uid: fields.next()?.parse().ok()?,
            gid: fields.next()?.parse().ok()?,
        })
    })
}

/// Ensures `<dir>/data` holds a cluster with role and database `meridian`,
/// and returns its path.
///
/// The cluster is built in `data.init` and renamed into place, so a `data`
/// with PG_VERSION is always complete: an interrupted init never leaves a
/// cluster without its database behind.
pub(crate) async fn ensure_cluster(
    bin: &BinDir,
    dir: &Path,
    run_as: Option<RunAs>,
) -> Result<PathBuf, Error> {
    let data = dir.join("data");
    if data.join("PG_VERSION").is_file() {
        return Ok(data);
    }
    if data.exists() {
        // Refuse to initdb over files we did not create; an empty dir is fine.
        let empty = std::fs::read_dir(&data)
            .map_err(Error::io(format!("read {}", data.display())))?
            .next()
            .is_none();
        if !empty {
            return Err(Error::ForeignDataDir(data));
        }
        std::fs::remove_dir(&data).map_err(Error::io(format!("remove {}", data.display())))?;
    }
    let staging = dir.join("data.init");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .map_err(Error::io(format!("remove {}", staging.display())))?;
    }
    // Created by us so that it is ours to chown: the unprivileged user
    // cannot create entries in a root-owned state dir.
    std::fs::create_dir(&staging).map_err(Error::io(format!("create {}", staging.display())))?;
    if let Some(user) = run_as {
        user.chown(&staging)?;
    }

    let mut initdb = command(bin, "initdb", dir, run_as);
    initdb
        .arg("-D")
        .arg(&staging)
        .args(["-U", ROLE, "--auth=trust", "-E", "UTF8", "--no-sync"])
        // C locale: fast, identical everywhere, and immune to a LANG naming
        // a locale that is not installed.
        .arg("--locale=C");
    run(initdb, None).await?;

    // Single-user mode needs no port or connection, so the database exists
    // before the server ever listens.
    let mut single = command(bin, "postgres", dir, run_as);
    single
        .args(["--single", "-D"])
        .arg(&staging)
        .args(["-c", "fsync=off", "template1"]);
    let output = run(single, Some(format!("CREATE DATABASE {ROLE};\n"))).await?;
    if output.contains("ERROR:") {
        return Err(Error::CommandFailed {
            command: "postgres --single (create database)".into(),
            status: Default::default(),
            output: last_lines(&output, 20),
        });
    }

    std::fs::rename(&staging, &data)
        .map_err(Error::io(format!("rename {} to data", staging.display())))?;
    Ok(data)
}

fn command(bin: &BinDir, program: &str, dir: &Path, run_as: Option<RunAs>) -> Command {
    let mut cmd = Command::new(bin.path(program));
    // The unprivileged user may not be able to read our cwd (e.g. /root).
    cmd.current_dir(dir).kill_on_drop(true);
    if let Some(user) = run_as {
        cmd.uid(user.uid).gid(user.gid);
    }
    cmd
}

/// Runs `cmd` to completion, feeding `stdin`; returns its stdout and stderr.
async fn run(mut cmd: Command, stdin: Option<String>) -> Result<String, Error> {
    let name = cmd.as_std().get_program().to_string_lossy().into_owned();
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(Error::io(format!("spawn {name}")))?;
    let mut written = Ok(());
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Dropping the pipe afterwards sends EOF, which ends single-user mode.
        written = pipe.write_all(input.as_bytes()).await;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(Error::io(format!("wait for {name}")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(Error::CommandFailed {
            command: name,
            status: out.status,
            output: last_lines(&text, 20),
        });
    }
    // A failed write with a clean exit would mean the input went unread.
    written.map_err(Error::io(format!("write to {name}")))?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_numerically() {
        assert!(version_key("10") > version_key("9.6"));
        assert!(version_key("15") > version_key("9"));
        assert_eq!(version_key("main"), None);
    }

    #[test]
    fn passwd_lookup_reads_uid_and_gid() {
        let passwd =
            "root:x:0:0::/root:/bin/sh\npostgres:x:101:104:PG,,,:/var/lib/postgresql:/bin/bash\n";
        let user = lookup(passwd, "postgres").unwrap();
        assert_eq!((user.uid, user.gid), (101, 104));
        assert!(lookup(passwd, "nobody").is_none());
    }
}
