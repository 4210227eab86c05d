use super::*;

const MINIMAL: &str = r#"
region = "eu-west"
[mesh]
plaintext = true
[redis]
url = "redis://127.0.0.1:6379/"
[postgres]
url = "postgres://meridian@127.0.0.1:5432/meridian"
"#;

fn err(text: &str) -> String {
    Config::from_toml(text, "regional.toml")
        .unwrap_err()
        .to_string()
}

#[test]
fn minimal_config_gets_defaults() {
    let c = Config::from_toml(MINIMAL, "t").unwrap();
    assert_eq!(c.region, "eu-west");
    assert_eq!(c.listen.port(), 7100);
    assert_eq!(c.models.len(), 1);
    assert_eq!(c.models[0].id, "sim-small");
}

#[test]
fn unknown_key_is_named_with_its_line() {
    let e = err(&format!(
        "{MINIMAL}\n[server]\nlisten_addr = \"127.0.0.1:1\"\n"
    ));
    assert!(e.contains("listen_addr"), "{e}");
    assert!(e.contains("regional.toml line 10"), "{e}");
}

#[test]
fn missing_field_is_named() {
    let e = err("region = \"x\"\n[redis]\nurl = \"redis://a/\"\n");
    assert!(e.contains("missing field `postgres`"), "{e}");
}

#[test]
fn bad_values_name_their_key() {
    let e = err(&MINIMAL.replace("eu-west", "EU West"));
    assert!(e.contains("`region`"), "{e}");
    let e = err(&MINIMAL.replace("redis://", "http://"));
    assert!(e.contains("`redis.url`"), "{e}");
    let e = err(&format!(
        "{MINIMAL}\n[[models]]\nid = \"a\"\nbackend = {{ kind = \"sim\", max_concurrency = 0 }}\n"
    ));
    assert!(e.contains("`models[0].backend.max_concurrency`"), "{e}");
    let e = err(&format!(
        "{MINIMAL}\n[[models]]\nid = \"a\"\nbackend = {{ kind = \"gpu\" }}\n"
    ));
    assert!(e.contains("unknown variant `gpu`"), "{e}");
    let e = err(&format!("{MINIMAL}\n[tracing]\nsample_ratio = 2.0\n"));
    assert!(e.contains("`tracing.sample_ratio`"), "{e}");
    let e = err(&format!(
        "{MINIMAL}\n[tracing]\notlp_endpoint = \"collector:4317\"\n"
    ));
    assert!(e.contains("`tracing.otlp_endpoint`"), "{e}");
}

#[test]
fn errors_are_one_line() {
    let e = err(&format!("{MINIMAL}\nbogus = 1\n"));
    assert_eq!(e.lines().count(), 1, "{e}");
}

/// The documented example stays a valid config: a renamed or removed key
/// breaks this test, not an operator's deployment.
#[test]
fn the_example_config_is_valid() {
    let dir = tempfile_dir("regional");
    let text = with_local_files(
        include_str!("../../../infra/config/regional.example.toml"),
        &dir,
    );
    let c = Config::from_toml(&text, "regional.example.toml").unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(c.region, "eu-west");
    assert!(c.models.len() >= 2 && !c.aliases.is_empty());
    assert!(c.embeddings.is_some());
    assert_eq!(c.tracing.sample_ratio, 0.1);
    assert!(c.tracing.otlp_endpoint.is_some());
    assert_eq!(c.replication.peers.len(), 2);
    assert_eq!(c.cache.threshold("strict-tenant"), 1.01);
    assert!(c.cache.semantic_on(c.embeddings.is_some()));
}

#[test]
fn replication_peers_are_checked() {
    let peers = |p: &str| err(&format!("{MINIMAL}\n[replication]\npeers = [{p}]\n"));
    let e = peers(r#"{ region = "eu-west", address = "a:1" }"#);
    assert!(
        e.contains("`replication.peers[0].region` is this region"),
        "{e}"
    );
    let e = peers(
        r#"{ region = "us-east", address = "a:1" }, { region = "us-east", address = "b:1" }"#,
    );
    assert!(e.contains("`replication.peers[1].region` repeats"), "{e}");
    let e = peers(r#"{ region = "us-east", address = "no-port" }"#);
    assert!(e.contains("`replication.peers[0].address`"), "{e}");
    let ok = format!(
        "{MINIMAL}\n[replication]\npeers = [{{ region = \"us-east\", address = \"us-east.region.meridian:7100\" }}]\n"
    );
    let c = Config::from_toml(&ok, "t").unwrap();
    assert_eq!(c.replication.peers[0].region, "us-east");
    assert!(c.replication.telemetry_peers.is_empty());
}

#[test]
fn telemetry_peers_must_be_peers() {
    let config = |t: &str| {
        format!(
            "{MINIMAL}\n[replication]\npeers = [{{ region = \"us-east\", address = \"a:1\" }}]\ntelemetry_peers = [{t}]\n"
        )
    };
    let e = err(&config(r#""us-east", "ap-south""#));
    assert!(
        e.contains("`replication.telemetry_peers[1]` names \"ap-south\", which is not one of `replication.peers`"),
        "{e}"
    );
    let c = Config::from_toml(&config(r#""us-east""#), "t").unwrap();
    assert_eq!(c.replication.telemetry_peers, ["us-east"]);
    assert!(c.replication.sends_readings_to("us-east"));
    assert!(!c.replication.sends_readings_to("ap-south"));
}

#[test]
fn relaying_starts_before_adoption() {
    let with = |keys: &str| format!("{MINIMAL}\n[replication]\n{keys}\n");
    let e = err(&with("adopt_after_ms = 2000\nrelay_after_ms = 2000"));
    assert!(
        e.contains("`replication.relay_after_ms` (2000) must be below `adopt_after_ms` (2000)"),
        "{e}"
    );
    let relay = |keys: &str| {
        Config::from_toml(&with(keys), "t")
            .unwrap()
            .replication
            .relay_after()
    };
    let ms = |n| Some(std::time::Duration::from_millis(n));
    assert_eq!(relay(""), ms(5_000));
    assert_eq!(
        relay("adopt_after_ms = 1500\nheartbeat_interval_ms = 200"),
        ms(750)
    );
    assert_eq!(relay("adopt_after_ms = 0"), ms(5_000));
    assert_eq!(relay("relay_after_ms = 0"), None);
    assert_eq!(
        relay("adopt_after_ms = 0\nrelay_after_ms = 60000"),
        ms(60_000)
    );
}

#[test]
fn the_job_fence_comes_before_adoption_and_after_a_heartbeat_gap() {
    let replication = |keys: &str| format!("{MINIMAL}\n[replication]\n{keys}\n");
    let c = Config::from_toml(&replication("adopt_after_ms = 4000"), "t").unwrap();
    assert_eq!(
        c.replication.fence_after(),
        Some(std::time::Duration::from_millis(2000))
    );
    let c = Config::from_toml(&replication("adopt_after_ms = 0"), "t").unwrap();
    assert_eq!(c.replication.fence_after(), None);
    let e = err(&replication("adopt_after_ms = 4000\nfence_after_ms = 4000"));
    assert!(
        e.contains("must be less than `adopt_after_ms` (4000)"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
    // Within adopt_after_ms, but not a heartbeat before it.
    let e = err(&replication("adopt_after_ms = 4000\nfence_after_ms = 3500"));
    assert!(e.contains("plus `heartbeat_interval_ms` (1000)"), "{e}");
    let e = err(&replication(
        "adopt_after_ms = 10000\nheartbeat_interval_ms = 3000",
    ));
    assert!(
        e.contains("at least twice `heartbeat_interval_ms` (3000)"),
        "{e}"
    );
    let c = Config::from_toml(
        &replication("adopt_after_ms = 10000\nfence_after_ms = 4000"),
        "t",
    )
    .unwrap();
    assert_eq!(
        c.replication.fence_after(),
        Some(std::time::Duration::from_millis(4000))
    );
}

/// Points the example's `/etc/meridian/...` files at files in a fresh
/// temporary directory: validation loads the certificate, so the stand-ins
/// are real ones for eu-west from a throwaway CA.
fn with_local_files(text: &str, dir: &std::path::Path) -> String {
    let ca = meridian_mesh::Ca::generate("example").unwrap();
    let issued = ca
        .issue(
            &meridian_mesh::Identity::region("eu-west").unwrap(),
            meridian_mesh::DEV_VALIDITY,
        )
        .unwrap();
    for path in text.split('"').filter(|s| s.starts_with("/etc/meridian/")) {
        let local = dir.join(path.trim_start_matches("/etc/meridian/"));
        std::fs::create_dir_all(local.parent().unwrap()).unwrap();
        let pem = if path.ends_with("/ca.pem") {
            ca.cert_pem()
        } else if path.ends_with(".key") {
            &issued.key_pem
        } else {
            &issued.cert_pem
        };
        std::fs::write(local, pem).unwrap();
    }
    text.replace("/etc/meridian", &dir.display().to_string())
}

fn tempfile_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("meridian-example-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// An alias naming an unknown model, a threshold out of range and a mesh
/// certificate that cannot be read: one load names all three, by key.
#[test]
fn every_mistake_is_named_at_once() {
    let dir = tempfile_dir("three-mistakes");
    let unreadable = dir.join("missing.pem");
    let path = dir.join("regional.toml");
    std::fs::write(
        &path,
        format!(
            r#"
region = "eu-west"
[redis]
url = "redis://127.0.0.1:6379/"
[postgres]
url = "postgres://meridian@127.0.0.1:5432/meridian"
[mesh]
ca_path = "{ca}"
cert_path = "{missing}"
key_path = "{ca}"
[[models]]
id = "chat"
backend = {{ kind = "sim" }}
[[aliases]]
id = "auto"
weights = {{ chat = 1, nowhere = 1 }}
[cache.semantic]
threshold = 1.5
"#,
            ca = path.display(),
            missing = unreadable.display(),
        ),
    )
    .unwrap();
    let e = Config::from_file(&path).unwrap_err().to_string();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(e.contains(&path.display().to_string()), "{e}");
    assert!(e.contains("3 problems"), "{e}");
    for key in [
        "`aliases[0].weights` names \"nowhere\"",
        "`cache.semantic.threshold` must be above 0 and at most 1",
        &format!(
            "`mesh.cert_path` {} is not a readable file",
            unreadable.display()
        ),
    ] {
        assert!(e.contains(key), "{key}: {e}");
    }
    assert_eq!(e.lines().count(), 4, "one line per problem: {e}");
}

/// A certificate file that exists but is not a certificate, or names
/// another region, is refused by validation, not at start.
#[test]
fn the_mesh_certificate_is_loaded_while_validating() {
    let dir = tempfile_dir("mesh-files");
    let text = with_local_files(
        include_str!("../../../infra/config/regional.example.toml"),
        &dir,
    );
    let e = err(&text.replace("region = \"eu-west\"", "region = \"us-east\""));
    assert!(
        e.contains("`mesh.cert_path`") && e.contains("not spiffe://meridian/region/us-east"),
        "{e}"
    );
    std::fs::write(dir.join("certs/region-eu-west.pem"), "not a certificate").unwrap();
    let e = err(&text);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(e.contains("`mesh.cert_path`"), "{e}");
}

#[test]
fn store_probes_have_defaults_and_checked_bounds() {
    let c = Config::from_toml(MINIMAL, "t").unwrap();
    assert_eq!(c.stores.probe_interval(), Duration::from_millis(100));
    assert_eq!(c.stores.probe_timeout(), Duration::from_millis(250));
    assert_eq!(c.stores.failures_to_trip, 2);
    assert_eq!(c.stores.acquire_timeout(), Duration::from_millis(500));
    let e = err(&format!(
        "{MINIMAL}\n[stores]\nprobe_interval_ms = 1\nfailures_to_trip = 0\nacquire_timeout_ms = 0\n"
    ));
    assert!(e.contains("`stores.probe_interval_ms`"), "{e}");
    assert!(e.contains("`stores.failures_to_trip`"), "{e}");
    assert!(e.contains("`stores.acquire_timeout_ms`"), "{e}");
}

#[test]
fn latency_outlier_factor_is_off_or_above_one() {
    let pool = |factor: &str| {
        format!(
            "{MINIMAL}\n[[models]]\nid = \"p\"\nbackend = {{ kind = \"openai\", \
             upstreams = [{{ base_url = \"http://127.0.0.1:1/v1\" }}], \
             outlier_latency_factor = {factor} }}\n"
        )
    };
    assert!(Config::from_toml(&pool("0.0"), "t").is_ok());
    assert!(Config::from_toml(&pool("3.0"), "t").is_ok());
    let e = err(&pool("0.5"));
    assert!(
        e.contains("`models[0].backend.outlier_latency_factor`"),
        "{e}"
    );
}

#[test]
fn spend_prices_and_interval_are_checked() {
    let e = err(&format!(
        "{MINIMAL}\n[spend]\nflush_interval_ms = 5\n[spend.prices.\"m\"]\ninput_per_million = -1\noutput_per_million = 1\n"
    ));
    assert!(
        e.contains("`spend.flush_interval_ms` must be from 10 to 60000"),
        "{e}"
    );
    assert!(
        e.contains("`spend.prices.\"m\"`: `input_per_million` must be a number of dollars"),
        "{e}"
    );
    let e = err(&format!(
        "{MINIMAL}\n[spend.prices.\"m\"]\ninput_per_million = 1\n"
    ));
    assert!(e.contains("output_per_million"), "{e}");
}
