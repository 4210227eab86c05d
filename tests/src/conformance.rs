//! The OpenAI conformance harness: schemathesis, driven by OpenAI's own API
//! description, run against a deployment's OpenAI base URL with the hooks in
//! `tests/conformance/` (operation list, model-id pinning, API key, refusal
//! counts). `infra/scripts/setup.sh` installs schemathesis.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The seed used unless `CONFORMANCE_SEED` names another: a fixed one, so a
/// failure seen once is seen again.
pub const DEFAULT_SEED: u64 = 31_415;

/// The checks every run applies to every response: schemathesis' own, and
/// `error_object_conformance` from `tests/conformance/hooks.py` (every error
/// answer is OpenAI's error object).
pub const CHECKS: &str = "not_a_server_error,response_schema_conformance,content_type_conformance,\
                          error_object_conformance";

/// OpenAI's API description, kept outside the repository and never edited:
/// the hooks narrow and pin it in memory.
pub fn description_path() -> PathBuf {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/openai-openapi/openapi.yaml");
    assert!(
        path.is_file(),
        "OpenAI's API description is missing at {} (spec 2.3.0 of the openai/openai-openapi repository, \
         expected at ../shared/openai-openapi/openapi.yaml from the repository root)",
        path.display()
    );
    path
}

/// `tests/conformance/`: the operation list and the schemathesis hooks.
pub fn harness_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance")
}

/// What one schemathesis run covers.
#[derive(Clone, Debug)]
pub struct Run {
    /// Hypothesis seed, printed so a run can be repeated.
    pub seed: u64,
    /// Upper bound on generated cases per operation and phase.
    pub max_examples: u32,
    /// `positive`, `negative` or `all`.
    pub mode: &'static str,
    /// Comma-separated schemathesis phases.
    pub phases: &'static str,
    /// An operation list other than `tests/conformance/operations.txt`.
    pub operations: Option<PathBuf>,
}

impl Run {
    /// Every served operation, valid and invalid data, under
    /// `CONFORMANCE_SEED` and `CONFORMANCE_EXAMPLES` when set.
    pub fn from_env(default_examples: u32) -> Self {
        let number = |name: &str| {
            std::env::var(name).ok().map(|v| {
                v.parse::<u64>()
                    .unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}"))
            })
        };
        Self {
            seed: number("CONFORMANCE_SEED").unwrap_or(DEFAULT_SEED),
            max_examples: number("CONFORMANCE_EXAMPLES")
                .map(|n| u32::try_from(n).expect("CONFORMANCE_EXAMPLES fits in 32 bits"))
                .unwrap_or(default_examples),
            mode: "all",
            phases: "examples,coverage,fuzzing",
            operations: None,
        }
    }
}

/// What schemathesis reported.
pub struct Outcome {
    /// Whether schemathesis exited successfully (no failure, no error).
    pub success: bool,
    /// Its terminal output, hooks' counts included.
    pub output: String,
    /// Its JSON run report (`--report json`).
    pub report: Value,
    /// The hooks' per-operation counts: must_accept, cases, passed,
    /// refused_valid, top_refusals, failures.
    pub summary: Value,
}

impl Outcome {
    /// Cases schemathesis generated over the whole run, by its own count.
    pub fn generated(&self) -> u64 {
        self.report["test_cases"]["generated"].as_u64().unwrap_or(0)
    }

    /// The failure groups of the report, one line each.
    pub fn failures(&self) -> Vec<String> {
        self.report["failures"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|f| {
                format!(
                    "{} ({}) x{} in {}",
                    f["title"], f["code"], f["count"], f["operations"]
                )
            })
            .collect()
    }

    /// Valid cases refused by operations marked `accepts-all-valid` in the
    /// operation list, one line per operation with its top reasons.
    pub fn refused_where_all_must_be_served(&self) -> Vec<String> {
        self.summary
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, s)| s["must_accept"] == true && s["refused_valid"] != 0)
            .map(|(op, s)| format!("{op}: {} x {}", s["refused_valid"], s["top_refusals"]))
            .collect()
    }
}

/// Runs schemathesis against the OpenAI base URL `base_url` (ending in `/v1`),
/// sending `api_key` as a bearer token when given.
pub async fn run(run: Run, base_url: String, api_key: Option<String>) -> Outcome {
    let description = description_path();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let report = dir.path().join("report.json");
    let summary = dir.path().join("summary.json");
    eprintln!(
        "conformance: seed {} (CONFORMANCE_SEED), {} examples per operation and phase (CONFORMANCE_EXAMPLES)",
        run.seed, run.max_examples
    );
    // Through the interpreter, not the `schemathesis` script: pip may put
    // the script in a directory that is not on PATH (or behind a pyenv shim
    // not yet rehashed), while `python3` is what setup.sh installed it for.
    let mut command = Command::new("python3");
    command
        .args(["-m", "schemathesis.cli", "run"])
        .arg(&description)
        .args(["--url", &base_url])
        .args(["--checks", CHECKS])
        .args(["--mode", run.mode, "--phases", run.phases])
        .args(["--seed", &run.seed.to_string()])
        .args(["--max-examples", &run.max_examples.to_string()])
        // The deployment shares two cores with the run: more workers only queue.
        .args(["--workers", "2"])
        // Every failing class of every operation is reported, not the first.
        .arg("--continue-on-failure")
        // Nothing from earlier runs is replayed: the seed alone decides.
        .args(["--generation-database", "none"])
        .args(["--request-timeout", "60", "--no-color"])
        .args(["--report", "json", "--report-json-path"])
        .arg(&report)
        .env("SCHEMATHESIS_HOOKS", harness_dir().join("hooks.py"))
        .env("CONFORMANCE_BASE_URL", &base_url)
        .env("CONFORMANCE_SUMMARY", &summary)
        .current_dir(dir.path());
    if let Some(key) = api_key {
        command.env("CONFORMANCE_API_KEY", key);
    }
    if let Some(operations) = &run.operations {
        command.env("CONFORMANCE_OPERATIONS", operations);
    }
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("schemathesis runs to its end")
        .expect("schemathesis starts (infra/scripts/setup.sh installs it from PyPI)");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |path: &Path| -> Value {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
            panic!(
                "schemathesis wrote no {} ({e}); its output:\n{output}",
                path.display()
            )
        });
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
    };
    Outcome {
        success: out.status.success(),
        report: read(&report),
        summary: read(&summary),
        output,
    }
}
