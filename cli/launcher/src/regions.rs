//! The regions a local deployment (`meridian up`, the test sandbox) names,
//! and where each pretends to be, so geo routing has something to rank.

/// A local region's name and location.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalRegion {
    /// The region's name, e.g. `eu-west`.
    pub name: &'static str,
    /// Latitude in degrees.
    pub lat: f64,
    /// Longitude in degrees.
    pub lon: f64,
}

/// Every region name local deployments use: Virginia, Oregon, Dublin,
/// Frankfurt, Mumbai, Tokyo.
pub const LOCAL_REGIONS: &[LocalRegion] = &[
    LocalRegion {
        name: "us-east",
        lat: 39.0,
        lon: -77.5,
    },
    LocalRegion {
        name: "us-west",
        lat: 45.6,
        lon: -121.2,
    },
    LocalRegion {
        name: "eu-west",
        lat: 53.3,
        lon: -6.3,
    },
    LocalRegion {
        name: "eu-central",
        lat: 50.1,
        lon: 8.7,
    },
    LocalRegion {
        name: "ap-south",
        lat: 19.1,
        lon: 72.9,
    },
    LocalRegion {
        name: "ap-northeast",
        lat: 35.7,
        lon: 139.7,
    },
];

/// Where the local region `name` is, as (latitude, longitude); `None` for
/// a name outside [`LOCAL_REGIONS`].
pub fn local_location(name: &str) -> Option<(f64, f64)> {
    LOCAL_REGIONS
        .iter()
        .find(|r| r.name == name)
        .map(|r| (r.lat, r.lon))
}
