//! One Prometheus naming scheme across the gateway and the regions, held to
//! the sources, the Grafana dashboards and `docs/metrics.md` (the scheme is
//! written there). No server is started: the test reads the metric names
//! passed as literals to the `prometheus` constructors in `gateway/src` and
//! `regional/src`, checks each against the scheme, then checks that every
//! metric a dashboard queries is defined and that the document's table lists
//! every defined metric with its type, and nothing else. Renaming a metric
//! without updating the dashboards and the document fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The subsystems a name may start with, after `meridian_`.
const SUBSYSTEMS: &[&str] = &[
    "gateway",
    "upstream",
    "sim",
    "cache",
    "jobs",
    "embedding",
    "replication",
    "store",
];

/// Where metrics are defined, from the workspace root.
const SOURCE_DIRS: &[&str] = &["gateway/src", "regional/src"];

/// The dashboards, from the workspace root.
const DASHBOARDS: &[&str] = &[
    "infra/grafana/gateway.json",
    "infra/grafana/region.json",
    "infra/grafana/replication.json",
];

/// The document of the scheme and of every metric.
const DOC: &str = "docs/metrics.md";

/// Metric names that break the scheme and are kept anyway, each with why.
/// Empty: every metric follows it. An entry that names no defined metric
/// fails the test, so the list cannot go stale.
const NAMING_EXCEPTIONS: &[(&str, &str)] = &[];

/// `"meridian_…"` literals in the sources that are not metric names: (file
/// from the workspace root, literal, what it is).
const NOT_METRICS: &[(&str, &str, &str)] = &[
    (
        "regional/src/replication/log.rs",
        "meridian_replication",
        "the PostgreSQL NOTIFY channel of the replication outbox trigger",
    ),
    (
        "regional/src/queue/watch.rs",
        "meridian_job_changes",
        "the PostgreSQL NOTIFY channel of the job state trigger",
    ),
];

/// Name components that are not base units (seconds, bytes).
const NON_BASE_UNITS: &[&str] = &[
    "ms",
    "millis",
    "milliseconds",
    "us",
    "micros",
    "microseconds",
    "ns",
    "nanos",
    "nanoseconds",
    "minutes",
    "hours",
    "days",
    "kb",
    "kib",
    "kilobytes",
    "mb",
    "mib",
    "megabytes",
    "gb",
    "gib",
    "gigabytes",
    "bits",
    "percent",
];

/// Series Prometheus adds to a histogram.
const HISTOGRAM_SERIES: &[&str] = &["_bucket", "_sum", "_count"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        })
    }
}

/// One metric definition found in the sources.
#[derive(Debug, Clone)]
struct Metric {
    name: String,
    kind: Kind,
    /// `file:line`, from the workspace root.
    at: String,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read dir {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The callee of the call whose argument list opens just before `end`
/// (`Opts::new`, `counter`, `register_int_counter!`), and where it starts.
/// None when `text[..end]` does not end in `callee(`.
fn callee_before(text: &str, end: usize) -> Option<(&str, usize)> {
    let before = text[..end].trim_end();
    let before = before.strip_suffix('(')?.trim_end();
    let start = before
        .bytes()
        .rposition(|b| !(is_ident_byte(b) || b == b':' || b == b'!'))
        .map_or(0, |i| i + 1);
    let callee = &before[start..];
    (!callee.is_empty()).then_some((callee, start))
}

/// The kind a `prometheus` type or registration macro makes.
fn kind_of_type(ty: &str) -> Option<Kind> {
    let ty = ty
        .strip_suffix("::new")
        .or_else(|| ty.strip_suffix("::with_opts"))
        .unwrap_or(ty);
    let ty = ty.rsplit("::").next().unwrap_or(ty);
    match ty {
        "IntCounter" | "Counter" | "IntCounterVec" | "CounterVec" => Some(Kind::Counter),
        "IntGauge" | "Gauge" | "IntGaugeVec" | "GaugeVec" => Some(Kind::Gauge),
        "Histogram" | "HistogramVec" => Some(Kind::Histogram),
        _ if ty.starts_with("register_") && ty.ends_with('!') => {
            if ty.contains("counter") {
                Some(Kind::Counter)
            } else if ty.contains("gauge") {
                Some(Kind::Gauge)
            } else if ty.contains("histogram") {
                Some(Kind::Histogram)
            } else {
                None
            }
        }
        _ => None,
    }
}

/// The kind a local helper closure (`let counter = |name, help| …`) makes,
/// read from the `prometheus` type its body constructs.
fn kind_of_helper(text: &str, helper: &str) -> Result<Kind, String> {
    let expected = match helper {
        "counter" => (Kind::Counter, "Counter"),
        "gauge" => (Kind::Gauge, "Gauge"),
        "histogram" => (Kind::Histogram, "Histogram"),
        _ => return Err(format!("`{helper}(…)` is not a known metric helper")),
    };
    let def = format!("let {helper} =");
    let start = text
        .find(&def)
        .ok_or_else(|| format!("no `{def}` in the file"))?;
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let indent = |line: &str| line.len() - line.trim_start().len();
    let mut lines = text[line_start..].lines();
    let first = lines.next().unwrap_or_default();
    let mut body = first.to_string();
    for line in lines {
        if !line.trim().is_empty() && indent(line) <= indent(first) {
            break;
        }
        body.push_str(line);
    }
    if body.contains(expected.1) {
        Ok(expected.0)
    } else {
        Err(format!(
            "the `{helper}` helper does not construct a {} type",
            expected.1
        ))
    }
}

/// The kind of the metric whose name is the literal opening at `quote`.
fn kind_at(text: &str, quote: usize) -> Result<Kind, String> {
    let (callee, start) = callee_before(text, quote).ok_or("not the first argument of a call")?;
    if callee.ends_with("HistogramOpts::new") || callee == "histogram_opts!" {
        return Ok(Kind::Histogram);
    }
    if callee.ends_with("Opts::new") || callee == "opts!" {
        let (outer, _) =
            callee_before(text, start).ok_or("`Opts` not passed straight to a constructor")?;
        return kind_of_type(outer).ok_or_else(|| format!("`{outer}` is not a metric type"));
    }
    if let Some(kind) = kind_of_type(callee) {
        return Ok(kind);
    }
    if callee.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
        return kind_of_helper(text, callee);
    }
    Err(format!("`{callee}(…)` is not a metric constructor"))
}

/// Every metric defined in the sources. Panics listing the `"meridian_…"`
/// literals that could not be told to be a metric or not.
fn defined_metrics() -> Vec<Metric> {
    let root = root();
    let mut files = Vec::new();
    for dir in SOURCE_DIRS {
        rust_files(&root.join(dir), &mut files);
    }
    files.sort();
    assert!(
        !files.is_empty(),
        "no Rust sources found under {SOURCE_DIRS:?}"
    );
    let mut metrics = Vec::new();
    let mut unknown = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).expect("source is UTF-8");
        let rel = path
            .strip_prefix(&root)
            .expect("under the root")
            .to_string_lossy()
            .replace('\\', "/");
        for (quote, _) in text.match_indices("\"meridian_") {
            let line_start = text[..quote].rfind('\n').map_or(0, |i| i + 1);
            if text[line_start..quote].trim_start().starts_with("//") {
                continue;
            }
            let Some(len) = text[quote + 1..].find('"') else {
                continue;
            };
            let literal = &text[quote + 1..quote + 1 + len];
            let at = format!("{rel}:{}", text[..quote].matches('\n').count() + 1);
            if !literal.bytes().all(is_ident_byte) {
                // Text that merely starts like a name (a log target, a test's
                // expected exposition), unless a name is being built.
                if callee_before(&text, quote).is_some_and(|(c, _)| c == "format!") {
                    unknown.push(format!(
                        "{at}: \"{literal}\" builds a metric name with format!: \
                         names must be whole literals so they can be checked"
                    ));
                }
                continue;
            }
            if NOT_METRICS
                .iter()
                .any(|(file, name, _)| *file == rel && *name == literal)
            {
                continue;
            }
            match kind_at(&text, quote) {
                Ok(kind) => metrics.push(Metric {
                    name: literal.to_string(),
                    kind,
                    at,
                }),
                Err(why) => unknown.push(format!(
                    "{at}: \"{literal}\": {why} (a metric made another way needs this \
                     test taught how; a literal that is not a metric goes in NOT_METRICS)"
                )),
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "literals not recognised:\n{}",
        unknown.join("\n")
    );
    metrics
}

/// Defined metrics by name; panics if a name is defined twice.
fn metrics_by_name() -> BTreeMap<String, Metric> {
    let mut by_name = BTreeMap::new();
    let mut twice = Vec::new();
    for m in defined_metrics() {
        if let Some(first) = by_name.get(&m.name) {
            let first: &Metric = first;
            twice.push(format!(
                "{} defined at {} and at {}",
                m.name, first.at, m.at
            ));
        } else {
            by_name.insert(m.name.clone(), m);
        }
    }
    assert!(twice.is_empty(), "{}", twice.join("\n"));
    by_name
}

/// What is wrong with a name, by the scheme.
fn scheme_problems(m: &Metric) -> Vec<String> {
    let name = m.name.as_str();
    let mut problems = Vec::new();
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        problems.push("uses characters outside [a-z0-9_]".to_string());
    }
    if name.contains("__") || name.ends_with('_') {
        problems.push("has an empty component".to_string());
    }
    let subsystem = SUBSYSTEMS.iter().find(|s| {
        name.strip_prefix("meridian_")
            .and_then(|rest| rest.strip_prefix(**s))
            .and_then(|rest| rest.strip_prefix('_'))
            .is_some_and(|rest| !rest.is_empty())
    });
    if subsystem.is_none() {
        problems.push(format!(
            "does not start with meridian_<subsystem>_ for a subsystem of {SUBSYSTEMS:?}"
        ));
    }
    let counter_named = name.ends_with("_total");
    match (m.kind, counter_named) {
        (Kind::Counter, false) => problems.push("is a counter not ending in _total".to_string()),
        (Kind::Gauge | Kind::Histogram, true) => {
            problems.push(format!("is a {} ending in _total", m.kind));
        }
        _ => {}
    }
    let parts: Vec<&str> = name.split('_').collect();
    for unit in NON_BASE_UNITS {
        if parts.contains(unit) {
            problems.push(format!("uses `{unit}`: use base units (seconds, bytes)"));
        }
    }
    let bare = name.strip_suffix("_total").unwrap_or(name);
    for unit in ["seconds", "bytes"] {
        if parts.contains(&unit) && !bare.ends_with(&format!("_{unit}")) {
            problems.push(format!(
                "mentions {unit} but does not end in _{unit} (or _{unit}_total)"
            ));
        }
    }
    for suffix in HISTOGRAM_SERIES.iter().chain(&["_created"]) {
        if name.ends_with(suffix) {
            problems.push(format!(
                "ends in {suffix}, which Prometheus reserves for series it adds"
            ));
        }
    }
    problems
}

/// `meridian_…` metric tokens in `text`, each with the byte just after it.
fn metric_tokens(text: &str) -> Vec<(&str, usize)> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    for (start, _) in text.match_indices("meridian_") {
        if start > 0 && is_ident_byte(bytes[start - 1]) {
            continue;
        }
        let len = bytes[start..]
            .iter()
            .position(|b| !(b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_'))
            .unwrap_or(bytes.len() - start);
        out.push((&text[start..start + len], start + len));
    }
    out
}

/// Whether the selector ending at `end` (a metric name) has a range, as in
/// `name{…}[5m]`.
fn has_range(text: &str, end: usize) -> bool {
    let mut rest = text[end..].trim_start();
    if let Some(matchers) = rest.strip_prefix('{') {
        let mut quoted = false;
        let mut escaped = false;
        let mut close = None;
        for (i, c) in matchers.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => quoted = !quoted,
                '}' if !quoted => {
                    close = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let Some(close) = close else {
            return false;
        };
        rest = matchers[close + 1..].trim_start();
    }
    rest.starts_with('[')
}

/// The defined metric a queried series belongs to, and whether the series is
/// a histogram's `_bucket`/`_sum`/`_count`.
fn resolve<'a>(metrics: &'a BTreeMap<String, Metric>, series: &str) -> Option<(&'a Metric, bool)> {
    if let Some(m) = metrics.get(series) {
        return Some((m, false));
    }
    HISTOGRAM_SERIES.iter().find_map(|suffix| {
        let m = metrics.get(series.strip_suffix(suffix)?)?;
        (m.kind == Kind::Histogram).then_some((m, true))
    })
}

/// Every string in a JSON value, with the key it sits under.
fn strings<'a>(value: &'a Value, key: &'a str, out: &mut Vec<(&'a str, &'a str)>) {
    match value {
        Value::String(s) => out.push((key, s)),
        Value::Array(items) => items.iter().for_each(|v| strings(v, key, out)),
        Value::Object(map) => map.iter().for_each(|(k, v)| strings(v, k, out)),
        _ => {}
    }
}

/// The uid of every Prometheus datasource reference in a JSON value.
fn prometheus_uids<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::Array(items) => items.iter().for_each(|v| prometheus_uids(v, out)),
        Value::Object(map) => {
            if map.get("type").and_then(Value::as_str) == Some("prometheus") {
                out.push(map.get("uid").and_then(Value::as_str).unwrap_or("(none)"));
            }
            map.values().for_each(|v| prometheus_uids(v, out));
        }
        _ => {}
    }
}

#[test]
fn metric_names_follow_the_scheme() {
    let metrics = metrics_by_name();
    let mut problems = Vec::new();
    for m in metrics.values() {
        if NAMING_EXCEPTIONS.iter().any(|(name, _)| *name == m.name) {
            continue;
        }
        for p in scheme_problems(m) {
            problems.push(format!("{} ({}, {}): {p}", m.name, m.kind, m.at));
        }
    }
    for (name, _) in NAMING_EXCEPTIONS {
        if !metrics.contains_key(*name) {
            problems.push(format!(
                "NAMING_EXCEPTIONS names {name}, which is not defined"
            ));
        }
    }
    for subsystem in SUBSYSTEMS {
        let prefix = format!("meridian_{subsystem}_");
        if !metrics.keys().any(|n| n.starts_with(&prefix)) {
            problems.push(format!("no metric of subsystem {subsystem} was found"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn dashboards_query_only_defined_metrics() {
    let metrics = metrics_by_name();
    let mut problems = Vec::new();
    for file in DASHBOARDS {
        let dashboard: Value =
            serde_json::from_str(&read(file)).unwrap_or_else(|e| panic!("{file} is not JSON: {e}"));
        if dashboard["schemaVersion"] != 39 {
            problems.push(format!("{file}: schemaVersion is not 39"));
        }
        let variables = dashboard["templating"]["list"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !variables
            .iter()
            .any(|v| v["name"] == "datasource" && v["type"] == "datasource")
        {
            problems.push(format!("{file}: no `datasource` variable"));
        }
        let mut uids = Vec::new();
        prometheus_uids(&dashboard, &mut uids);
        for uid in uids.into_iter().filter(|u| *u != "${datasource}") {
            problems.push(format!(
                "{file}: a Prometheus datasource has uid {uid}, not ${{datasource}}"
            ));
        }
        let mut all = Vec::new();
        strings(&dashboard, "", &mut all);
        let exprs = all.iter().filter(|(k, _)| *k == "expr").count();
        if exprs == 0 {
            problems.push(format!("{file}: no queries"));
        }
        for (key, text) in all {
            for (series, end) in metric_tokens(text) {
                let Some((m, histogram_series)) = resolve(&metrics, series) else {
                    problems.push(format!(
                        "{file}: {key} queries {series}, which is not defined"
                    ));
                    continue;
                };
                if key != "expr" {
                    continue;
                }
                if m.kind == Kind::Histogram && !histogram_series {
                    problems.push(format!(
                        "{file}: {series} is a histogram: query its _bucket, _sum or _count"
                    ));
                }
                if (m.kind == Kind::Counter || histogram_series) && !has_range(text, end) {
                    problems.push(format!(
                        "{file}: {series} is cumulative: query it with rate() or increase() over a range"
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_document_lists_every_metric() {
    let metrics = metrics_by_name();
    let doc = read(DOC);
    let mut problems = Vec::new();
    let mut rows = BTreeMap::new();
    for line in doc.lines().filter(|l| l.starts_with("| `meridian_")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let name = cells[1].trim_matches('`');
        let kind = cells.get(2).copied().unwrap_or_default();
        if rows.insert(name, kind).is_some() {
            problems.push(format!("{DOC}: {name} has two rows"));
        }
    }
    for m in metrics.values() {
        match rows.get(m.name.as_str()) {
            None => problems.push(format!("{DOC}: no row for {} ({})", m.name, m.at)),
            Some(kind) if *kind != m.kind.to_string() => problems.push(format!(
                "{DOC}: {} is listed as {kind}, but is a {} ({})",
                m.name, m.kind, m.at
            )),
            Some(_) => {}
        }
    }
    let mentioned: BTreeSet<&str> = metric_tokens(&doc).into_iter().map(|(t, _)| t).collect();
    for token in mentioned {
        // `meridian_sim_` and the like name a prefix, not a metric.
        if !token.ends_with('_') && resolve(&metrics, token).is_none() {
            problems.push(format!("{DOC}: mentions {token}, which is not defined"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The checks themselves, on made-up sources and names, so a scanner that
/// finds nothing or a rule that flags nothing cannot pass unnoticed.
#[test]
fn the_checks_catch_bad_names() {
    let source = r#"
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            c
        };
        let gauge = |name, help| reg(&registry, IntGauge::new(name, help).expect("valid"));
        let a = IntCounterVec::new(Opts::new("meridian_jobs_a_total", "help"), &["x"]);
        let b = HistogramVec::new(HistogramOpts::new("meridian_jobs_b_seconds", "h"), &["x"]);
        let c = Gauge::new("meridian_jobs_c", "help");
        let d = counter("meridian_jobs_d_total", "help");
        let e = gauge("meridian_jobs_e", "help");
        let f = notify("meridian_jobs_f");
    "#;
    let kind = |name: &str| kind_at(source, source.find(&format!("\"{name}\"")).expect(name));
    assert_eq!(kind("meridian_jobs_a_total"), Ok(Kind::Counter));
    assert_eq!(kind("meridian_jobs_b_seconds"), Ok(Kind::Histogram));
    assert_eq!(kind("meridian_jobs_c"), Ok(Kind::Gauge));
    assert_eq!(kind("meridian_jobs_d_total"), Ok(Kind::Counter));
    assert_eq!(kind("meridian_jobs_e"), Ok(Kind::Gauge));
    assert!(kind("meridian_jobs_f").is_err());

    let problems = |name: &str, kind: Kind| {
        scheme_problems(&Metric {
            name: name.to_string(),
            kind,
            at: "here".to_string(),
        })
    };
    assert_eq!(
        problems("meridian_jobs_a_total", Kind::Counter),
        Vec::<String>::new()
    );
    assert_eq!(
        problems("meridian_jobs_b_seconds", Kind::Histogram),
        Vec::<String>::new()
    );
    for (name, kind) in [
        ("meridian_jobs_submitted", Kind::Counter),
        ("meridian_jobs_depth_total", Kind::Gauge),
        ("meridian_gateway_latency_ms", Kind::Histogram),
        ("meridian_cache_size_bytes_max", Kind::Gauge),
        ("meridian_frontend_requests_total", Kind::Counter),
        ("meridian_Cache_entries", Kind::Gauge),
        ("meridian_jobs_wait_count", Kind::Gauge),
    ] {
        assert!(!problems(name, kind).is_empty(), "{name} passed the scheme");
    }

    let text = r#"sum(rate(aa{a="}"}[5m])) / bb{b="c"} + cc"#;
    let ends = |name: &str| text.find(name).expect(name) + name.len();
    assert!(has_range(text, ends("aa")));
    assert!(!has_range(text, ends("bb")));
    assert!(!has_range(text, ends("cc")));
}
