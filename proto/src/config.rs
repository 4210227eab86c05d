//! The one TOML loader of the gateway and the regional node: read the file,
//! parse it into the component's serde shape (unknown keys and wrong types
//! are refused by `toml`, naming the key and the line), then validate it
//! into the type the component runs with. Validation reports every problem
//! it finds, each naming its key, so an operator fixes a file in one pass.

use std::fmt;
use std::path::Path;

use serde::de::DeserializeOwned;

/// A config that could not be read, parsed or validated: where it came from
/// and every problem found, one per line in `Display`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or the name given to TOML text), with the line for a parse error.
    pub origin: String,
    /// Each problem, naming its key: "`cache.semantic.threshold` must be ...".
    pub problems: Vec<String>,
}

impl ConfigError {
    /// The problems as one message: the only one, or a count and one per line.
    pub fn message(&self) -> String {
        match self.problems.as_slice() {
            [one] => one.clone(),
            many => {
                let mut message = format!("{} problems:", many.len());
                for problem in many {
                    message.push_str("\n  ");
                    message.push_str(problem);
                }
                message
            }
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid config {}: {}", self.origin, self.message())
    }
}

impl std::error::Error for ConfigError {}

/// The problems a validation found so far; checks push to it and go on, so
/// one run names them all (Vector's `config::validation` shape).
#[derive(Debug, Default)]
pub struct Problems(Vec<String>);

impl Problems {
    /// No problem yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a problem; its text starts with the key, in backticks.
    pub fn push(&mut self, problem: impl Into<String>) {
        self.0.push(problem.into());
    }

    /// Records the error of a check written as a `Result`.
    pub fn check(&mut self, result: Result<(), String>) {
        if let Err(problem) = result {
            self.push(problem);
        }
    }

    /// Whether nothing was found.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `value` when nothing was found, else every problem.
    pub fn finish<T>(self, value: impl FnOnce() -> T) -> Result<T, Vec<String>> {
        if self.0.is_empty() {
            Ok(value())
        } else {
            Err(self.0)
        }
    }

    /// Runs `checks` alone and joins what they found, one per line: for
    /// unit tests of one section.
    pub fn of(checks: impl FnOnce(&mut Self)) -> Result<(), String> {
        let mut problems = Self::new();
        checks(&mut problems);
        problems.finish(|| ()).map_err(|all| all.join("\n"))
    }
}

/// Reads `path`, parses it as `R` and validates it into `C`; errors name the file.
pub fn load<R, C>(
    path: &Path,
    validate: impl FnOnce(R) -> Result<C, Vec<String>>,
) -> Result<C, ConfigError>
where
    R: DeserializeOwned,
{
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        origin: origin.clone(),
        problems: vec![format!("cannot read: {e}")],
    })?;
    parse(&text, &origin, validate)
}

/// Parses TOML `text` as `R` and validates it into `C`; `origin` names the
/// text in errors, with the line of a parse error.
pub fn parse<R, C>(
    text: &str,
    origin: &str,
    validate: impl FnOnce(R) -> Result<C, Vec<String>>,
) -> Result<C, ConfigError>
where
    R: DeserializeOwned,
{
    let raw: R = toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
        ConfigError {
            origin: match line {
                Some(l) => format!("{origin} line {l}"),
                None => origin.to_string(),
            },
            problems: vec![e.message().trim().to_string()],
        }
    })?;
    validate(raw).map_err(|problems| ConfigError {
        origin: origin.to_string(),
        problems,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        a: u32,
        b: u32,
    }

    fn validate(raw: Raw) -> Result<u32, Vec<String>> {
        let mut problems = Problems::new();
        if raw.a == 0 {
            problems.push("`a` must be at least 1");
        }
        if raw.b == 0 {
            problems.push("`b` must be at least 1");
        }
        problems.finish(|| raw.a + raw.b)
    }

    #[test]
    fn every_problem_is_named_one_per_line() {
        assert_eq!(parse("a = 1\nb = 2\n", "t", validate), Ok(3));
        let e = parse("a = 0\nb = 0\n", "t.toml", validate).unwrap_err();
        assert_eq!(e.problems.len(), 2);
        assert_eq!(
            e.to_string(),
            "invalid config t.toml: 2 problems:\n  `a` must be at least 1\n  `b` must be at least 1"
        );
        let e = parse("a = 0\nb = 1\n", "t.toml", validate).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid config t.toml: `a` must be at least 1"
        );
        let e = parse("a = 1\nb = 1\nc = 1\n", "t.toml", validate).unwrap_err();
        assert!(e.to_string().contains("t.toml line "), "{e}");
        assert!(e.to_string().contains("unknown field `c`"), "{e}");
        let e = load(Path::new("/nonexistent/meridian.toml"), validate).unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
    }
}
