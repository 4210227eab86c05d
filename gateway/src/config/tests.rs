use super::*;

const TWO: &str = r#"
[mesh]
plaintext = true
[[regions]]
name = "us-east"
address = "127.0.0.1:7101"
[[regions]]
name = "eu-west"
address = "127.0.0.1:7102"
"#;

#[test]
fn defaults_pick_the_first_region() {
    let c = Config::from_toml(TWO, "g").unwrap();
    assert_eq!(c.default_region, 0);
    assert_eq!(c.listen.port(), 8080);
}

#[test]
fn errors_name_the_key() {
    let e = Config::from_toml(
        &format!("{TWO}\n[routing]\ndefault_region = \"mars\"\n"),
        "g",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("`routing.default_region`") && e.contains("mars"),
        "{e}"
    );
    let e = Config::from_toml(
        &format!("{TWO}\n[server]\nlisten = \"nowhere\"\n"),
        "g.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("g.toml line 12") && e.contains("invalid socket address"),
        "{e}"
    );
    let e = Config::from_toml("[server]\n", "g")
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing field `regions`"), "{e}");
    let e = Config::from_toml(&TWO.replace("eu-west", "us-east"), "g")
        .unwrap_err()
        .to_string();
    assert!(e.contains("`regions[1].name` repeats"), "{e}");
    let e = Config::from_toml(&format!("{TWO}\n[tracing]\nsample_ratio = -1\n"), "g")
        .unwrap_err()
        .to_string();
    assert!(e.contains("`tracing.sample_ratio`"), "{e}");
}

#[test]
fn a_region_has_an_address_or_an_srv_name() {
    let srv = TWO.replace(
        "address = \"127.0.0.1:7102\"",
        "srv = \"_meridian._tcp.eu-west.meridian.test.\"",
    );
    let c = Config::from_toml(
        &format!("{srv}\n[discovery]\nnameservers = [\"127.0.0.1:5353\"]\nmin_refresh_ms = 100\n"),
        "g",
    )
    .unwrap();
    assert_eq!(
        c.regions[1].srv.as_deref(),
        Some("_meridian._tcp.eu-west.meridian.test.")
    );
    assert_eq!(c.discovery.min_refresh, Duration::from_millis(100));
    assert_eq!(c.discovery.max_refresh, Duration::from_secs(300));
    for (text, key) in [
        (
            TWO.replace("address = \"127.0.0.1:7102\"", ""),
            "`regions[1]` needs exactly one of `address` and `srv`",
        ),
        (
            TWO.replace(
                "address = \"127.0.0.1:7102\"",
                "address = \"127.0.0.1:7102\"\nsrv = \"_m._tcp.x.\"",
            ),
            "`regions[1]` needs exactly one of `address` and `srv`",
        ),
        (
            TWO.replace("address = \"127.0.0.1:7102\"", "srv = \"not a name\""),
            "`regions[1].srv`",
        ),
        (
            format!("{TWO}\n[discovery]\nmin_refresh_ms = 500\nmax_refresh_ms = 100\n"),
            "`discovery.max_refresh_ms`",
        ),
    ] {
        let e = Config::from_toml(&text, "g").unwrap_err().to_string();
        assert!(e.contains(key), "{e}");
    }
}

/// The documented example stays a valid config; its certificate paths
/// point at files that exist only in production, so they are swapped for
/// temporary ones.
#[test]
fn the_example_config_is_valid() {
    let dir = std::env::temp_dir().join(format!("meridian-example-{}", std::process::id()));
    let text = include_str!("../../../infra/config/gateway.example.toml");
    // Validation loads the certificates: give the example's
    // `/etc/meridian/...` files real stand-ins from a throwaway CA.
    let ca = meridian_mesh::Ca::generate("example").unwrap();
    let issued = ca
        .issue(
            &meridian_mesh::Identity::gateway("edge-1").unwrap(),
            meridian_mesh::DEV_VALIDITY,
        )
        .unwrap();
    for path in text.split('"').filter(|s| s.starts_with("/etc/meridian/")) {
        let local = dir.join(path.trim_start_matches("/etc/meridian/"));
        std::fs::create_dir_all(local.parent().unwrap()).unwrap();
        let pem = if path.ends_with("/ca.pem") {
            ca.cert_pem()
        } else if path.ends_with(".key") || path.ends_with("privkey.pem") {
            &issued.key_pem
        } else {
            &issued.cert_pem
        };
        std::fs::write(local, pem).unwrap();
    }
    let text = text.replace("/etc/meridian", &dir.display().to_string());
    let c = Config::from_toml(&text, "gateway.example.toml").unwrap();
    assert_eq!(c.regions.len(), 2);
    assert!(
        c.regions[1].srv.is_some(),
        "the example shows an SRV region"
    );
    assert_eq!(c.discovery.nameservers.len(), 1);
    assert!(c.tls.is_some() && c.auth.is_some() && c.admin_listen.is_some());
    assert!(c.tracing.otlp_endpoint.is_some());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A region without an address, a retry budget out of range and a mesh
/// certificate that cannot be read: one load names all three, by key.
#[test]
fn every_mistake_is_named_at_once() {
    let dir = std::env::temp_dir().join(format!("meridian-three-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.toml");
    let missing = dir.join("missing.pem");
    std::fs::write(
        &path,
        format!(
            r#"
[[regions]]
name = "us-east"
address = "127.0.0.1:7101"
[[regions]]
name = "eu-west"
[failover]
retry_budget_ratio = 2.0
[mesh]
ca_path = "{file}"
cert_path = "{missing}"
key_path = "{file}"
"#,
            file = path.display(),
            missing = missing.display(),
        ),
    )
    .unwrap();
    let e = Config::from_file(&path).unwrap_err().to_string();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(e.contains(&path.display().to_string()), "{e}");
    assert!(e.contains("3 problems"), "{e}");
    for key in [
        "`regions[1]` needs exactly one of `address` and `srv`",
        "`failover.retry_budget_ratio` must be between 0 and 1",
        &format!(
            "`mesh.cert_path` {} is not a readable file",
            missing.display()
        ),
    ] {
        assert!(e.contains(key), "{key}: {e}");
    }
    assert_eq!(e.lines().count(), 4, "one line per problem: {e}");
}

/// Files the gateway loads at start are loaded while validating: a GeoIP
/// database or a TLS certificate that is not one is a config error.
#[test]
fn files_loaded_at_start_are_checked_while_validating() {
    let dir = std::env::temp_dir().join(format!("meridian-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk");
    std::fs::write(&junk, "not what it should be").unwrap();
    let junk = junk.display();
    let e = Config::from_toml(
        &format!(
            "{TWO}\n[geo]\ngeoip_database = \"{junk}\"\n[server.tls]\nlisten = \"127.0.0.1:8443\"\n\
             cert_path = \"{junk}\"\nkey_path = \"{junk}\"\n"
        ),
        "g",
    )
    .unwrap_err()
    .to_string();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(e.contains("`geo.geoip_database`"), "{e}");
    assert!(e.contains("`server.tls.cert_path`"), "{e}");
}

#[test]
fn an_admin_port_off_loopback_needs_a_token() {
    let with = |server: &str| Config::from_toml(&format!("[server]\n{server}\n{TWO}"), "g");
    let e = with("admin_listen = \"0.0.0.0:9080\"")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`server.admin_listen`") && e.contains("admin_token_file"),
        "{e}"
    );
    assert!(with("admin_listen = \"127.0.0.1:9080\"").is_ok());
    assert!(with("admin_listen = \"[::1]:9080\"").is_ok());

    let dir = std::env::temp_dir().join(format!("meridian-admin-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("admin-token");
    std::fs::write(&token, "short\n").unwrap();
    let server = format!(
        "admin_listen = \"0.0.0.0:9080\"\nadmin_token_file = {:?}",
        token.display().to_string()
    );
    let e = with(&server).unwrap_err().to_string();
    assert!(e.contains("at least 16 characters"), "{e}");
    std::fs::write(&token, "0123456789abcdef0123\n").unwrap();
    let c = with(&server).unwrap();
    assert_eq!(c.admin_token.as_deref(), Some("0123456789abcdef0123"));
    let missing = server.replace("admin-token", "nothing-here");
    let e = with(&missing).unwrap_err().to_string();
    assert!(e.contains("cannot be read"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
