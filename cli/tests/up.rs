//! `meridian up` as a person runs drills against it: real stores, nodes as
//! child processes, the gateway; one region's node killed and restarted by
//! hand; `meridian up` itself killed and started again on the same state.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

/// initdb for two regions, on a loaded machine.
const START_TIMEOUT: Duration = Duration::from_secs(120);
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);
const REGIONS: &str = "us-east,eu-west";

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A state directory the postgres user can traverse (the launcher runs
/// postgres unprivileged when the tests run as root), and everything a
/// `meridian up` started in it, killed on drop even when a test fails.
struct State {
    dir: tempfile::TempDir,
}

impl State {
    fn new() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Self { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().canonicalize().unwrap()
    }

    /// The pids in the state's pid files: each region's node, redis and
    /// postmaster.
    fn pids(&self) -> Vec<u32> {
        REGIONS
            .split(',')
            .flat_map(|region| {
                let dir = self.path().join(region);
                [
                    dir.join("node.pid"),
                    dir.join("redis/redis.pid"),
                    dir.join("postgres/data/postmaster.pid"),
                ]
            })
            .filter_map(|file| pid_in(&file))
            .collect()
    }
}

impl Drop for State {
    fn drop(&mut self) {
        let state = self.path();
        for pid in self.pids() {
            // Only what still works in this state dir: a pid may be reused.
            if mentions(pid, &state) {
                signal(pid, Signal::KILL);
            }
        }
    }
}

fn pid_in(file: &Path) -> Option<u32> {
    std::fs::read_to_string(file)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Whether process `pid` works in or was started with a path under `dir`.
fn mentions(pid: u32, dir: &Path) -> bool {
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    // The temp dir's random name, as a node given relative paths shows it.
    let name = dir.file_name().unwrap().to_string_lossy();
    cwd.is_ok_and(|c| c.starts_with(dir)) || String::from_utf8_lossy(&cmdline).contains(&*name)
}

fn signal(pid: u32, signal: Signal) {
    let pid = Pid::from_raw(pid as i32).unwrap();
    let _ = rustix::process::kill_process(pid, signal);
}

/// Whether `pid` has exited (gone, or a zombie).
fn dead(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat[stat.rfind(')').unwrap() + 2..].starts_with('Z')
    })
}

/// One `meridian up`, its stdout read line by line; killed on drop.
struct Up {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    port: u16,
}

impl Up {
    fn start(state: &State, extra: &[&str]) -> Self {
        let (port, admin, region) = (free_port(), free_port(), free_port());
        let mut child = Command::new(env!("CARGO_BIN_EXE_meridian"))
            .arg("up")
            .arg("--state-dir")
            .arg(state.path())
            .args(["--port", &port.to_string()])
            .args(["--admin-port", &admin.to_string()])
            // The regions take this port and the next.
            .args(["--region-port", &region.to_string()])
            .args(["--regions", REGIONS])
            .args(extra)
            .env("MERIDIAN_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (send, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let mut up = Self {
            child,
            lines,
            seen: Vec::new(),
            port,
        };
        up.line_with("Ctrl-C stops everything", START_TIMEOUT);
        up
    }

    /// Waits for a line containing `needle`; panics with what came instead.
    fn line_with(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no line with {needle:?} within {timeout:?}; got:\n{}",
                        self.seen.join("\n")
                    )
                }
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "meridian up exited ({:?}) before a line with {needle:?}; got:\n{}",
                    self.child.try_wait(),
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// POSTs a chat completion through the gateway; (status, served-by region).
    fn chat(&self, key: &str) -> (u16, String) {
        self.chat_with(key, "sim-small")
    }

    /// [`Up::chat`] to `model`.
    fn chat_with(&self, key: &str, model: &str) -> (u16, String) {
        let body =
            format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"drill"}}]}}"#);
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream.set_read_timeout(Some(EVENT_TIMEOUT)).unwrap();
        write!(
            stream,
            "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {key}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let region = response
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("x-meridian-region:")
                    .map(|r| r.trim().to_string())
            })
            .unwrap_or_default();
        (status, region)
    }

    /// Retries until a chat answers 200: the gateway takes a moment to
    /// notice a region that went away.
    fn chat_ok(&self, key: &str) -> String {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            let (status, region) = self.chat(key);
            if status == 200 {
                return region;
            }
            assert!(Instant::now() < deadline, "chat still answers {status}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A node started by hand, killed on drop if the test fails before it stops.
struct ByHand(Child);

impl Drop for ByHand {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn api_key(state: &State) -> String {
    std::fs::read_to_string(state.path().join("api-key"))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn a_hard_killed_up_leaves_nothing_that_stops_the_next_one() {
    let state = State::new();
    let mut first = Up::start(&state, &[]);
    let key_line = format!("(kept in {})", state.path().join("api-key").display());
    assert!(
        first.seen.iter().any(|l| l.contains(&key_line)),
        "the banner does not name {key_line}:\n{}",
        first.seen.join("\n")
    );
    let left = state.pids();
    assert_eq!(left.len(), 6, "a node, redis and postgres per region");

    signal(first.child.id(), Signal::KILL);
    first.child.wait().unwrap();

    // The second run also serves a model of the user's own.
    let models = state.path().join("models.toml");
    std::fs::write(
        &models,
        "[[models]]\nid = \"mine\"\nfallbacks = [\"sim-small\"]\nbackend = { kind = \"sim\" }\n",
    )
    .unwrap();
    let second = Up::start(&state, &["--models", models.to_str().unwrap()]);
    for region in REGIONS.split(',') {
        for program in ["postgres", "redis"] {
            let dir = state.path().join(region).join(program);
            let said = format!("{region}: stopped the {program} (pid ");
            let line = second.seen.iter().find(|l| l.starts_with(&said));
            let line =
                line.unwrap_or_else(|| panic!("no {said:?} line in:\n{}", second.seen.join("\n")));
            assert!(
                line.ends_with(&format!("a previous run left in {}", dir.display())),
                "{line}"
            );
        }
    }
    for pid in left {
        assert!(dead(pid), "pid {pid} of the first run still runs");
    }
    assert_eq!(second.chat(&api_key(&state)).0, 200);
    assert_eq!(second.chat_with(&api_key(&state), "mine").0, 200);
}

#[test]
fn a_killed_node_is_reported_restarted_by_hand_and_stopped_with_the_rest() {
    let state = State::new();
    // Far beyond the waits below: a frozen node must stop without it.
    let mut up = Up::start(&state, &["--node-stop-timeout-secs", "300"]);
    let key = api_key(&state);
    let pid_file = state.path().join("us-east/node.pid");
    let node = pid_in(&pid_file).unwrap();
    assert!(
        up.seen
            .iter()
            .any(|l| l.contains("us-east") && l.contains(&format!("pid {node}"))),
        "the banner does not show us-east's node pid {node}:\n{}",
        up.seen.join("\n")
    );
    let restart = up
        .seen
        .iter()
        .find_map(|l| l.trim().strip_prefix("us-east: "))
        .expect("a restart command for us-east")
        .to_string();

    // A second `meridian up` on the same state stops nothing of the first.
    let mut second = ByHand(
        Command::new(env!("CARGO_BIN_EXE_meridian"))
            .arg("up")
            .arg("--state-dir")
            .arg(state.path())
            .args(["--port", &free_port().to_string()])
            .args(["--admin-port", &free_port().to_string()])
            .args(["--region-port", &free_port().to_string()])
            .args(["--regions", REGIONS])
            .env("MERIDIAN_LOG", "off")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut pipe = second.0.stderr.take().unwrap();
    let (send, said) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut stderr = String::new();
        let _ = pipe.read_to_string(&mut stderr);
        let _ = send.send(stderr);
    });
    let stderr = said
        .recv_timeout(EVENT_TIMEOUT)
        .expect("a second meridian up on the same state exits");
    assert!(!second.0.wait().unwrap().success(), "{stderr}");
    let owner = format!(
        "belongs to meridian (pid {}), which still runs",
        up.child.id()
    );
    assert!(stderr.contains(&owner), "{stderr}");
    assert_eq!(up.chat(&key).0, 200);

    signal(node, Signal::KILL);
    let exited = up.line_with("node (pid", EVENT_TIMEOUT);
    assert!(
        exited.starts_with(&format!("us-east: node (pid {node}) exited")),
        "{exited}"
    );
    assert_eq!(up.child.try_wait().unwrap(), None, "meridian up stopped");
    assert_eq!(up.chat_ok(&key), "eu-west");

    // The printed command, as a person would type it from the state dir's
    // parent (relative paths).
    let parent = state.path().parent().unwrap().to_path_buf();
    let relative = restart.replace(&format!("{}/", parent.display()), "");
    let mut words = relative.split_whitespace();
    let mut by_hand = ByHand(
        Command::new(words.next().unwrap())
            .args(words)
            .current_dir(&parent)
            .env("MERIDIAN_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut ready = String::new();
    BufReader::new(by_hand.0.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert!(ready.starts_with("ready region=us-east"), "{ready:?}");
    let again = pid_in(&pid_file).unwrap();
    assert_eq!(again, by_hand.0.id());

    // A frozen node still stops: it is sent SIGCONT with the SIGTERM.
    signal(
        pid_in(&state.path().join("eu-west/node.pid")).unwrap(),
        Signal::STOP,
    );
    let running = state.pids();
    signal(up.child.id(), Signal::TERM);
    up.line_with(
        &format!("us-east: stopped the node (pid {again}) restarted by hand"),
        EVENT_TIMEOUT,
    );
    up.line_with("stopped", EVENT_TIMEOUT);
    assert!(up.child.wait().unwrap().success());
    let status = by_hand.0.wait().unwrap();
    assert!(status.success(), "the node stops gracefully: {status}");
    assert_eq!(running.len(), 6, "a node, redis and postgres per region");
    for pid in running {
        assert!(dead(pid), "pid {pid} outlived meridian up");
    }
}
