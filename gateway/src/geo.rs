//! Locating a client and measuring how far it is from a region.

mod countries;

use std::net::IpAddr;

use ipnet::IpNet;

/// A point on the globe, in degrees.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatLon {
    /// Latitude, -90 to 90.
    pub lat: f64,
    /// Longitude, -180 to 180.
    pub lon: f64,
}

impl LatLon {
    /// Great-circle distance in kilometres (haversine).
    pub fn distance_km(self, other: LatLon) -> f64 {
        const EARTH_RADIUS_KM: f64 = 6371.0;
        let (p1, p2) = (self.lat.to_radians(), other.lat.to_radians());
        let dp = p2 - p1;
        let dl = (other.lon - self.lon).to_radians();
        let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
        2.0 * EARTH_RADIUS_KM * a.sqrt().asin()
    }

    /// Parses `"lat,lon"`, refusing values off the globe.
    pub(crate) fn parse(s: &str) -> Option<Self> {
        let (lat, lon) = s.split_once(',')?;
        let lat: f64 = lat.trim().parse().ok()?;
        let lon: f64 = lon.trim().parse().ok()?;
        ((-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon))
            .then_some(Self { lat, lon })
    }
}

/// Header a trusted proxy sets to the client's ISO 3166 country code.
pub use meridian_proto::header::CLIENT_COUNTRY as COUNTRY_HEADER;
/// Header a trusted proxy sets to the client's `lat,lon`.
pub use meridian_proto::header::CLIENT_GEO as LATLON_HEADER;

/// Where a client's location came from; logged with the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Header,
    GeoIp,
    Cidr,
    Default,
}

/// Locates clients: trusted headers first, then GeoIP, then the CIDR table,
/// then the configured default.
pub(crate) struct Locator {
    trusted_proxies: Vec<IpNet>,
    cidrs: Vec<(IpNet, LatLon)>,
    geoip: Option<maxminddb::Reader<Vec<u8>>>,
    default: Option<LatLon>,
}

impl Locator {
    /// A locator believing headers from `trusted_proxies`, with networks
    /// of known location (`cidrs`), an optional GeoIP database and a
    /// default location. The caller hands over the `[geo]` config's parts,
    /// so that locating depends on no config type.
    pub(crate) fn new(
        trusted_proxies: Vec<IpNet>,
        cidrs: Vec<(IpNet, LatLon)>,
        geoip_database: Option<&std::path::Path>,
        default: Option<LatLon>,
    ) -> Result<Self, String> {
        let geoip = match geoip_database {
            None => None,
            Some(path) => Some(
                maxminddb::Reader::open_readfile(path)
                    .map_err(|e| format!("`geo.geoip_database` {}: {e}", path.display()))?,
            ),
        };
        Ok(Self {
            trusted_proxies,
            cidrs,
            geoip,
            default,
        })
    }

    /// Locates a client connecting from `peer` with the given header values.
    pub(crate) fn locate(
        &self,
        peer: Option<IpAddr>,
        latlon: Option<&str>,
        country: Option<&str>,
    ) -> Option<(LatLon, Source)> {
        let trusted = peer.is_some_and(|ip| self.trusted_proxies.iter().any(|n| n.contains(&ip)));
        if trusted {
            if let Some(p) = latlon.and_then(LatLon::parse) {
                return Some((p, Source::Header));
            }
            if let Some(p) = country.and_then(countries::centroid) {
                return Some((p, Source::Header));
            }
        }
        if let Some(ip) = peer {
            if let Some(p) = self.geoip_lookup(ip) {
                return Some((p, Source::GeoIp));
            }
            // The most specific matching network wins.
            if let Some((_, p)) = self
                .cidrs
                .iter()
                .filter(|(net, _)| net.contains(&ip))
                .max_by_key(|(net, _)| net.prefix_len())
            {
                return Some((*p, Source::Cidr));
            }
        }
        self.default.map(|p| (p, Source::Default))
    }

    fn geoip_lookup(&self, ip: IpAddr) -> Option<LatLon> {
        let reader = self.geoip.as_ref()?;
        let city: maxminddb::geoip2::City = reader.lookup(ip).ok()??;
        let loc = city.location?;
        Some(LatLon {
            lat: loc.latitude?,
            lon: loc.longitude?,
        })
    }
}

#[cfg(test)]
mod tests;
