//! Gateway configuration: a serde shape read from TOML, then validated.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::error::Error;

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
}

/// One region the gateway can send requests to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    /// Region name, as clients pin it in `x-meridian-region`.
    pub name: String,
    /// `host:port` of the region's API (HTTP and gRPC on one port).
    pub address: SocketAddr,
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
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            threads: 2,
            connect_timeout_ms: 1_000,
            read_timeout_ms: 60_000,
            shutdown_grace_ms: 10_000,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRouting {
    /// Region used when a request names none; the first region when absent.
    default_region: Option<String>,
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
        }
        let default_region = match &self.routing.default_region {
            None => 0,
            Some(name) => self
                .regions
                .iter()
                .position(|r| &r.name == name)
                .ok_or_else(|| format!("`routing.default_region` names unknown region {name:?}"))?,
        };
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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = r#"
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
            e.contains("g.toml line 10") && e.contains("invalid socket address"),
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
    }
}
