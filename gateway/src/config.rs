//! Gateway configuration: a serde shape read from TOML, then validated.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

pub use crate::auth::AuthConfig;
use crate::error::Error;
use crate::geo::LatLon;
pub use crate::ratelimit::RateLimitConfig;
pub use meridian_mesh::DiscoveryConfig;

/// A validated gateway configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Client-facing address.
    pub listen: SocketAddr,
    /// Worker threads of the proxy.
    pub threads: usize,
    /// The regions, in config order.
    pub regions: Vec<RegionConfig>,
    /// Index into `regions` of the region used when nothing else decides.
    pub default_region: usize,
    /// Time allowed to connect to a region.
    pub connect_timeout: Duration,
    /// Longest wait for a region's response to start, and between reads.
    pub read_timeout: Duration,
    /// Time in-flight requests get to finish at shutdown.
    pub shutdown_grace: Duration,
    /// Address of the admin endpoints (`/healthz`, `/readyz`, `/metrics`,
    /// `/routing`); none when absent.
    pub admin_listen: Option<SocketAddr>,
    /// A TLS listener (HTTP/1.1 and HTTP/2 by ALPN) beside the cleartext one.
    pub tls: Option<TlsConfig>,
    /// Whether HTTP (non-gRPC) requests reach regions over pooled HTTP/1.1
    /// connections or multiplexed HTTP/2; gRPC always uses HTTP/2.
    pub http_upstream: UpstreamProtocol,
    /// Active health checking of regions.
    pub health: HealthConfig,
    /// Retrying failed requests in another region.
    pub failover: FailoverConfig,
    /// Locating clients.
    pub geo: GeoConfig,
    /// Kilometres of distance one millisecond of observed latency (EWMA) is
    /// worth when ranking regions.
    pub latency_km_per_ms: f64,
    /// Kilometres of distance a fully loaded region is penalised by, in
    /// proportion to its reported in-flight over capacity.
    pub load_penalty_km: f64,
    /// API keys and tenants (`[auth]`); when absent every request is the
    /// `default` tenant and no key is asked for.
    pub auth: Option<AuthConfig>,
    /// Per-tenant rate limits (`[rate_limit]`).
    pub rate_limit: RateLimitConfig,
    /// Mutual TLS to regions (`[mesh]`); required in TOML unless
    /// `plaintext = true`. [`Config::new`] starts in plain text.
    pub mesh: crate::mesh::MeshConfig,
    /// Traces exported to an OTLP collector (`[tracing]`); off by default.
    pub tracing: meridian_mesh::TraceConfig,
    /// How regions given by `srv` are resolved (`[discovery]`).
    pub discovery: DiscoveryConfig,
}

/// How the gateway talks HTTP to regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// Pooled HTTP/1.1 keep-alive connections: the cheapest per request in
    /// Pingora for small JSON requests (see `make bench`).
    H1,
    /// HTTP/2 with prior knowledge, multiplexed: fewer connections.
    H2,
}

/// The client-facing TLS listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Address of the TLS listener, e.g. `0.0.0.0:443`.
    pub listen: SocketAddr,
    /// PEM certificate chain.
    pub cert_path: std::path::PathBuf,
    /// PEM private key.
    pub key_path: std::path::PathBuf,
}

/// How regions are health-checked (`grpc.health.v1` plus `Admin.RegionStatus`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Time between checks of one region, in milliseconds.
    pub interval_ms: u64,
    /// Time one check may take, in milliseconds.
    pub timeout_ms: u64,
    /// Consecutive failures (active checks, or connect errors, timeouts and
    /// 5xx seen by requests) that eject a healthy region.
    pub failures_to_eject: u32,
    /// Consecutive successful active checks that bring an ejected region back.
    pub successes_to_recover: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval_ms: 250,
            timeout_ms: 200,
            failures_to_eject: 2,
            successes_to_recover: 2,
        }
    }
}

/// Retries in the next region, for requests that failed before any byte of
/// the answer reached the client.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    /// Most regions one request is tried in.
    pub max_attempts: u32,
    /// Retries allowed as a fraction of recent requests, so a total outage
    /// does not multiply the load (0.2 = one retry per five requests).
    pub retry_budget_ratio: f64,
    /// Retries per second always allowed, so a quiet gateway can still fail over.
    pub retry_budget_min_per_second: u32,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            retry_budget_ratio: 0.2,
            retry_budget_min_per_second: 10,
        }
    }
}

/// Where clients are located from.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeoConfig {
    /// Peers whose `x-meridian-client-country` / `x-meridian-client-geo`
    /// headers are believed (a CDN or load balancer in front of the gateway).
    pub trusted_proxies: Vec<IpNet>,
    /// Networks with known locations; the most specific match wins.
    pub cidr: Vec<CidrLocation>,
    /// A MaxMind GeoIP2/GeoLite2 City database, consulted before `cidr`.
    pub geoip_database: Option<std::path::PathBuf>,
    /// Location of clients found by nothing else; none means "use the
    /// default region".
    #[serde(deserialize_with = "latlon_opt", default)]
    pub default_location: Option<LatLon>,
}

/// A network and where its clients are.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CidrLocation {
    /// For example `203.0.113.0/24`.
    pub cidr: IpNet,
    /// Latitude in degrees.
    pub lat: f64,
    /// Longitude in degrees.
    pub lon: f64,
}

fn latlon_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<LatLon>, D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        lat: f64,
        lon: f64,
    }
    let raw = Option::<Raw>::deserialize(d)?;
    Ok(raw.map(|r| LatLon {
        lat: r.lat,
        lon: r.lon,
    }))
}

/// One region the gateway can send requests to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    /// Region name, as clients pin it in `x-meridian-region`.
    pub name: String,
    /// `host:port` of the region's API (HTTP and gRPC on one port), for a
    /// region of one node at a fixed address. Exactly one of `address` and
    /// `srv` is given.
    #[serde(default)]
    pub address: Option<SocketAddr>,
    /// DNS SRV name of the region's nodes, e.g.
    /// `_meridian._tcp.us-east.meridian.internal.`: each record's target
    /// (A/AAAA) and port is a node, re-resolved when the TTL runs out (see
    /// `[discovery]`).
    #[serde(default)]
    pub srv: Option<String>,
    /// Latitude of the region in degrees; regions without coordinates rank
    /// after those with, for located clients.
    #[serde(default)]
    pub lat: Option<f64>,
    /// Longitude of the region in degrees.
    #[serde(default)]
    pub lon: Option<f64>,
}

impl RegionConfig {
    /// A region of one node at `address`, without coordinates.
    pub fn new(name: impl Into<String>, address: SocketAddr) -> Self {
        Self {
            name: name.into(),
            address: Some(address),
            srv: None,
            lat: None,
            lon: None,
        }
    }

    /// A region whose nodes DNS SRV records under `srv` name, without
    /// coordinates.
    pub fn srv(name: impl Into<String>, srv: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            address: None,
            srv: Some(srv.into()),
            lat: None,
            lon: None,
        }
    }

    /// The same region placed at `lat`, `lon`.
    pub fn at(mut self, lat: f64, lon: f64) -> Self {
        self.lat = Some(lat);
        self.lon = Some(lon);
        self
    }

    pub(crate) fn location(&self) -> Option<LatLon> {
        Some(LatLon {
            lat: self.lat?,
            lon: self.lon?,
        })
    }
}

/// `[discovery]`: resolving the regions given by `srv`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDiscovery {
    /// Name servers (`ip:port`) asked for SRV, A and AAAA records; empty
    /// means the system's, from `/etc/resolv.conf`.
    nameservers: Vec<SocketAddr>,
    /// Shortest time between two resolutions of one name, whatever the TTL
    /// says; also the retry interval after a failed resolution.
    min_refresh_ms: u64,
    /// Longest time an answer is used before asking again, whatever the TTL.
    max_refresh_ms: u64,
    /// Time one query may take before the next name server is asked.
    timeout_ms: u64,
}

impl Default for RawDiscovery {
    fn default() -> Self {
        let d = DiscoveryConfig::default();
        Self {
            nameservers: d.nameservers,
            min_refresh_ms: d.min_refresh.as_millis() as u64,
            max_refresh_ms: d.max_refresh.as_millis() as u64,
            timeout_ms: d.timeout.as_millis() as u64,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    /// The regions; at least one.
    regions: Vec<RegionConfig>,
    #[serde(default)]
    routing: RawRouting,
    #[serde(default)]
    health: HealthConfig,
    #[serde(default)]
    failover: FailoverConfig,
    #[serde(default)]
    geo: GeoConfig,
    #[serde(default)]
    auth: Option<AuthConfig>,
    #[serde(default)]
    rate_limit: RateLimitConfig,
    #[serde(default)]
    mesh: crate::mesh::MeshConfig,
    /// OpenTelemetry traces; off unless `otlp_endpoint` is set.
    #[serde(default)]
    tracing: meridian_mesh::TraceConfig,
    #[serde(default)]
    discovery: RawDiscovery,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    /// Client-facing address.
    listen: SocketAddr,
    /// Proxy worker threads.
    threads: usize,
    /// Time allowed to connect to a region, in milliseconds.
    connect_timeout_ms: u64,
    /// Longest wait for a region to start answering, in milliseconds.
    read_timeout_ms: u64,
    /// Grace period for in-flight requests at shutdown, in milliseconds.
    shutdown_grace_ms: u64,
    /// Address of the admin endpoints; off when absent.
    admin_listen: Option<SocketAddr>,
    /// A TLS listener; off when absent.
    tls: Option<TlsConfig>,
    /// `h1` (default) or `h2` for HTTP requests to regions.
    http_upstream: UpstreamProtocol,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            threads: 2,
            connect_timeout_ms: 1_000,
            read_timeout_ms: 60_000,
            shutdown_grace_ms: 10_000,
            admin_listen: None,
            tls: None,
            http_upstream: UpstreamProtocol::H1,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRouting {
    /// Region used when nothing else decides; the first region when absent.
    default_region: Option<String>,
    /// Kilometres one millisecond of observed latency is worth in ranking.
    latency_km_per_ms: f64,
    /// Kilometres a fully loaded region is penalised by.
    load_penalty_km: f64,
}

impl Default for RawRouting {
    fn default() -> Self {
        Self {
            default_region: None,
            latency_km_per_ms: 50.0,
            load_penalty_km: 3_000.0,
        }
    }
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            origin: path.display().to_string(),
            message: format!("cannot read: {e}"),
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, Error> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            Error::Config {
                origin: match line {
                    Some(l) => format!("{origin} line {l}"),
                    None => origin.to_string(),
                },
                message: e.message().trim().to_string(),
            }
        })?;
        raw.validate().map_err(|message| Error::Config {
            origin: origin.to_string(),
            message,
        })
    }

    /// A configuration with defaults for everything but the address and regions.
    pub fn new(listen: SocketAddr, regions: Vec<RegionConfig>) -> Result<Self, Error> {
        RawConfig {
            server: RawServer {
                listen,
                ..RawServer::default()
            },
            regions,
            routing: RawRouting::default(),
            health: HealthConfig::default(),
            failover: FailoverConfig::default(),
            geo: GeoConfig::default(),
            auth: None,
            rate_limit: RateLimitConfig::default(),
            // Embedders (tests, `meridian up`) set `mesh` themselves;
            // Gateway::start warns while it is plain text.
            mesh: crate::mesh::MeshConfig::plaintext(),
            tracing: meridian_mesh::TraceConfig::default(),
            discovery: RawDiscovery::default(),
        }
        .validate()
        .map_err(|message| Error::Config {
            origin: "gateway config".into(),
            message,
        })
    }
}

impl RawConfig {
    fn validate(self) -> Result<Config, String> {
        if self.regions.is_empty() {
            return Err("`regions` must list at least one region".into());
        }
        for (i, r) in self.regions.iter().enumerate() {
            if r.name.is_empty() {
                return Err(format!("`regions[{i}].name` must not be empty"));
            }
            if self.regions[..i].iter().any(|o| o.name == r.name) {
                return Err(format!("`regions[{i}].name` repeats region {:?}", r.name));
            }
            match (&r.address, &r.srv) {
                (Some(_), None) => {}
                (None, Some(srv)) if valid_srv_name(srv) => {}
                (None, Some(srv)) => {
                    return Err(format!(
                        "`regions[{i}].srv` {srv:?} is not a DNS name (e.g. \"_meridian._tcp.{}.example.\")",
                        r.name
                    ));
                }
                _ => {
                    return Err(format!(
                        "`regions[{i}]` needs exactly one of `address` and `srv`"
                    ));
                }
            }
        }
        let default_region = match &self.routing.default_region {
            None => 0,
            Some(name) => self
                .regions
                .iter()
                .position(|r| &r.name == name)
                .ok_or_else(|| format!("`routing.default_region` names unknown region {name:?}"))?,
        };
        for (i, r) in self.regions.iter().enumerate() {
            match (r.lat, r.lon) {
                (None, None) => {}
                (Some(lat), Some(lon))
                    if (-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon) => {}
                (Some(_), Some(_)) => {
                    return Err(format!("`regions[{i}]` coordinates are off the globe"));
                }
                _ => {
                    return Err(format!(
                        "`regions[{i}]` needs both `lat` and `lon`, or neither"
                    ));
                }
            }
        }
        if self.health.interval_ms == 0 || self.health.timeout_ms == 0 {
            return Err("`health.interval_ms` and `health.timeout_ms` must be at least 1".into());
        }
        if self.health.failures_to_eject == 0 || self.health.successes_to_recover == 0 {
            return Err(
                "`health.failures_to_eject` and `health.successes_to_recover` must be at least 1"
                    .into(),
            );
        }
        if self.failover.max_attempts == 0 {
            return Err("`failover.max_attempts` must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.failover.retry_budget_ratio) {
            return Err("`failover.retry_budget_ratio` must be between 0 and 1".into());
        }
        if let Some(tls) = &self.server.tls {
            for (key, path) in [("cert_path", &tls.cert_path), ("key_path", &tls.key_path)] {
                if !path.is_file() {
                    return Err(format!(
                        "`server.tls.{key}` {} is not a readable file",
                        path.display()
                    ));
                }
            }
        }
        if let Some(auth) = &self.auth {
            auth.validate()?;
        }
        self.rate_limit.validate()?;
        self.mesh.files()?;
        self.tracing.validate()?;
        let d = &self.discovery;
        if d.min_refresh_ms == 0 || d.timeout_ms == 0 {
            return Err(
                "`discovery.min_refresh_ms` and `discovery.timeout_ms` must be at least 1".into(),
            );
        }
        if d.max_refresh_ms < d.min_refresh_ms {
            return Err(
                "`discovery.max_refresh_ms` must be at least `discovery.min_refresh_ms`".into(),
            );
        }
        if self.server.threads == 0 {
            return Err("`server.threads` must be at least 1".into());
        }
        Ok(Config {
            listen: self.server.listen,
            threads: self.server.threads,
            regions: self.regions,
            default_region,
            connect_timeout: Duration::from_millis(self.server.connect_timeout_ms),
            read_timeout: Duration::from_millis(self.server.read_timeout_ms),
            shutdown_grace: Duration::from_millis(self.server.shutdown_grace_ms),
            admin_listen: self.server.admin_listen,
            tls: self.server.tls,
            http_upstream: self.server.http_upstream,
            health: self.health,
            failover: self.failover,
            geo: self.geo,
            latency_km_per_ms: self.routing.latency_km_per_ms,
            load_penalty_km: self.routing.load_penalty_km,
            auth: self.auth,
            rate_limit: self.rate_limit,
            mesh: self.mesh,
            tracing: self.tracing,
            discovery: DiscoveryConfig {
                nameservers: self.discovery.nameservers,
                min_refresh: Duration::from_millis(self.discovery.min_refresh_ms),
                max_refresh: Duration::from_millis(self.discovery.max_refresh_ms),
                timeout: Duration::from_millis(self.discovery.timeout_ms),
            },
        })
    }
}

/// Labels of letters, digits, `-` and `_` (SRV names start with `_service`),
/// at most 63 bytes each, 253 in all, a final dot allowed.
fn valid_srv_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
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
            &format!(
                "{srv}\n[discovery]\nnameservers = [\"127.0.0.1:5353\"]\nmin_refresh_ms = 100\n"
            ),
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
        let text = include_str!("../../infra/config/gateway.example.toml");
        // Validation checks that certificate files exist: give the
        // example's `/etc/meridian/...` files empty stand-ins.
        for path in text.split('"').filter(|s| s.starts_with("/etc/meridian/")) {
            let local = dir.join(path.trim_start_matches("/etc/meridian/"));
            std::fs::create_dir_all(local.parent().unwrap()).unwrap();
            std::fs::write(local, "").unwrap();
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
}
