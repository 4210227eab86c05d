//! The Python scripts in `tests/data/` that drive Meridian with official
//! SDKs (OpenAI's, Anthropic's): run one, read the JSON it prints.

use std::process::Command;

use serde_json::Value;

/// Runs `tests/data/{script}` under `python3` with `env` added, and returns
/// the JSON object it printed; fails the test when the script fails.
pub async fn run_data_script(script: &str, env: Vec<(&'static str, String)>) -> Value {
    let script = format!("{}/data/{script}", env!("CARGO_MANIFEST_DIR"));
    let shown = script.clone();
    let out =
        tokio::task::spawn_blocking(move || Command::new("python3").arg(script).envs(env).output())
            .await
            .unwrap()
            .expect("python3 runs (infra/scripts/setup.sh installs it and the SDKs)");
    assert!(
        out.status.success(),
        "{shown} failed (are the SDKs installed? run infra/scripts/setup.sh):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).expect("the script prints JSON");
    eprintln!("{seen}");
    seen
}
