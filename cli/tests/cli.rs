//! The `meridian` binary fails with one clear line and a non-zero exit on bad
//! config, naming the cause.

use std::io::Write;
use std::process::{Command, Output};

fn meridian(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(args)
        .env("MERIDIAN_LOG", "off")
        .output()
        .expect("meridian runs")
}

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

fn assert_fails_with(out: &Output, needles: &[&str]) {
    assert!(
        !out.status.success(),
        "expected failure, got {:?}",
        out.status
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one error line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} not in: {stderr}");
    }
}

const REGIONAL: &str = r#"
region = "eu-west"
[redis]
url = "redis://127.0.0.1:1/"
connect_timeout_ms = 500
[postgres]
url = "postgres://meridian@127.0.0.1:1/meridian"
[mesh]
plaintext = true
"#;

#[test]
fn regional_unknown_key() {
    let f = config_file(&format!("{REGIONAL}\n[server]\nport = 1\n"));
    let out = meridian(&["regional", "--config", f.path().to_str().unwrap()]);
    assert_fails_with(&out, &["unknown field `port`", "line"]);
}

#[test]
fn regional_missing_field() {
    let f = config_file("region = \"eu-west\"\n");
    let out = meridian(&["regional", "--config", f.path().to_str().unwrap()]);
    assert_fails_with(&out, &["missing field `redis`"]);
}

#[test]
fn regional_missing_file() {
    let out = meridian(&["regional", "--config", "/nonexistent/regional.toml"]);
    assert_fails_with(&out, &["/nonexistent/regional.toml", "cannot read"]);
}

#[test]
fn regional_port_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let f = config_file(&format!("{REGIONAL}\n[server]\nlisten = \"{addr}\"\n"));
    let out = meridian(&["regional", "--config", f.path().to_str().unwrap()]);
    assert_fails_with(&out, &["cannot listen on", &addr.to_string()]);
}

#[test]
fn regional_redis_unreachable() {
    let f = config_file(&format!("{REGIONAL}\n[server]\nlisten = \"127.0.0.1:0\"\n"));
    let out = meridian(&["regional", "--config", f.path().to_str().unwrap()]);
    assert_fails_with(&out, &["redis at redis://127.0.0.1:1/ is unreachable"]);
}

#[test]
fn gateway_port_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let f = config_file(&format!(
        "[server]\nlisten = \"{addr}\"\n[mesh]\nplaintext = true\n[[regions]]\nname = \"us-east\"\naddress = \"127.0.0.1:1\"\n"
    ));
    let out = meridian(&["gateway", "--config", f.path().to_str().unwrap()]);
    assert_fails_with(&out, &["cannot listen on", &addr.to_string()]);
}

#[test]
fn gateway_bad_region_list() {
    let f = config_file("[server]\nthreads = 1\n");
    let out = meridian(&["gateway", "--config", f.path().to_str().unwrap()]);
    assert_fails_with(&out, &["missing field `regions`"]);
}
