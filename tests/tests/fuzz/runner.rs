//! The budgeted, seeded driver every target runs under.
//!
//! Without `FUZZ_SECONDS` a target is a smoke test: a fixed seed (from its
//! name, or `FUZZ_SEED`) and its few hundred smoke cases, the same on every
//! run. With it (`make fuzz`), each target gets `FUZZ_SECONDS / TARGETS`
//! seconds of rounds under a random seed, printed first so a run can be
//! replayed. A failing case is shrunk by proptest, written to the findings
//! directory and fails the test.

use std::fmt::Debug;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};

/// How many targets `make fuzz` shares its budget between.
pub(crate) const TARGETS: u64 = 7;

/// A check's verdict on one input: `Err` names what went wrong.
pub(crate) type Verdict = Result<(), String>;

/// Runs `check` on inputs drawn from `strategy` under the budget above.
/// `smoke_cases` is the case count outside `make fuzz`, and the size of one
/// round inside it.
pub(crate) fn run<S>(name: &str, smoke_cases: u32, strategy: S, check: impl Fn(S::Value) -> Verdict)
where
    S: Strategy,
    S::Value: Debug,
{
    let budget = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(|total| Duration::from_secs((total / TARGETS).max(1)));
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| match budget {
            Some(_) => rand::random(),
            None => fnv(name),
        });
    eprintln!("fuzz target={name} seed={seed} budget={budget:?}");
    let started = Instant::now();
    let mut cases = 0u64;
    for round in 0u64.. {
        let mut runner = TestRunner::new_with_rng(
            Config {
                cases: smoke_cases,
                failure_persistence: None,
                max_shrink_iters: 512,
                ..Config::default()
            },
            TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes(seed, round)),
        );
        // Kept before shrinking: against a live node a later case can fail
        // for what an earlier one did, and the shrunk input alone would not
        // show the first.
        let first = std::sync::Mutex::new(None::<String>);
        let outcome = runner.run(&strategy, |input| {
            let shown = format!("{input:#?}");
            check(input).map_err(|e| {
                first.lock().expect("not poisoned").get_or_insert(shown);
                TestCaseError::fail(e)
            })
        });
        match outcome {
            Ok(()) => cases += u64::from(smoke_cases),
            Err(TestError::Fail(reason, input)) => {
                let first = first
                    .into_inner()
                    .expect("not poisoned")
                    .unwrap_or_default();
                let path = save_finding(name, seed, round, &reason.to_string(), &input, &first);
                panic!(
                    "fuzz target={name} seed={seed} round={round}: {reason}\n\
                     shrunk input (saved in {}): {input:#?}",
                    path.display()
                );
            }
            Err(TestError::Abort(reason)) => {
                panic!("fuzz target={name} seed={seed} round={round}: aborted: {reason}")
            }
        }
        if budget.is_none_or(|b| started.elapsed() >= b) {
            break;
        }
    }
    eprintln!(
        "fuzz target={name} seed={seed} cases={cases} seconds={:.1} findings=0",
        started.elapsed().as_secs_f64()
    );
}

/// Where findings go: `FUZZ_FINDINGS`, else `.meridian/fuzz-findings` in the
/// workspace (ignored by git, like the rest of the local state).
fn findings_dir() -> PathBuf {
    std::env::var_os("FUZZ_FINDINGS").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.meridian/fuzz-findings"),
        PathBuf::from,
    )
}

fn save_finding(
    name: &str,
    seed: u64,
    round: u64,
    reason: &str,
    input: &impl Debug,
    first: &str,
) -> PathBuf {
    let dir = findings_dir();
    let path = dir.join(format!("{name}-{seed}-{round}.txt"));
    let text = format!(
        "target: {name}\nseed: {seed}\nround: {round}\nreason: {reason}\n\n\
         shrunk input:\n{input:#?}\n\nfirst failing input:\n{first}\n"
    );
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, text)) {
        eprintln!("fuzz: cannot save the finding in {}: {e}", path.display());
    }
    path
}

/// One round's ChaCha seed: the run's seed and the round number.
fn seed_bytes(seed: u64, round: u64) -> [u8; 32] {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..16].copy_from_slice(&round.to_le_bytes());
    bytes[16..24].copy_from_slice(b"meridian");
    bytes
}

/// A stable seed per target name for smoke runs.
fn fnv(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
