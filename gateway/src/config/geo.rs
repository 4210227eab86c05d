//! `[geo]`: where clients are located from.

use ipnet::IpNet;
use meridian_proto::config::Problems;
use serde::Deserialize;

use crate::geo::LatLon;

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

impl GeoConfig {
    /// The GeoIP database is opened here as the locator opens it at start,
    /// so a missing or corrupt file is a config error.
    pub(super) fn check(&self, problems: &mut Problems) {
        if let Some(path) = &self.geoip_database
            && let Err(e) = maxminddb::Reader::open_readfile(path)
        {
            problems.push(format!("`geo.geoip_database` {}: {e}", path.display()));
        }
    }
}
