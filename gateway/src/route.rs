//! Picking the region for a request.

use crate::config::Config;

/// Why a region was chosen; sent in `x-meridian-route` and the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    /// The request named the region.
    Pin,
    /// Nothing else decided: the configured default region.
    Default,
}

impl Reason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Pin => "pin",
            Self::Default => "default",
        }
    }
}

/// The region table a gateway routes over.
#[derive(Debug)]
pub(crate) struct Router {
    names: Vec<String>,
    default_region: usize,
}

/// A request pinned a region that does not exist.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct UnknownRegion(pub String);

impl Router {
    pub(crate) fn new(config: &Config) -> Self {
        Self {
            names: config.regions.iter().map(|r| r.name.clone()).collect(),
            default_region: config.default_region,
        }
    }

    /// Chooses a region index from the pin header's value, if any.
    pub(crate) fn choose(&self, pin: Option<&str>) -> Result<(usize, Reason), UnknownRegion> {
        match pin.map(str::trim).filter(|p| !p.is_empty()) {
            Some(name) => self
                .names
                .iter()
                .position(|n| n.eq_ignore_ascii_case(name))
                .map(|i| (i, Reason::Pin))
                .ok_or_else(|| UnknownRegion(name.to_string())),
            None => Ok((self.default_region, Reason::Default)),
        }
    }

    pub(crate) fn names(&self) -> &[String] {
        &self.names
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RegionConfig;

    fn router() -> Router {
        let regions = ["us-east", "eu-west"]
            .iter()
            .enumerate()
            .map(|(i, n)| RegionConfig {
                name: (*n).into(),
                address: ([127, 0, 0, 1], 7000 + i as u16).into(),
            })
            .collect();
        Router::new(&Config::new(([127, 0, 0, 1], 0).into(), regions).unwrap())
    }

    #[test]
    fn pin_wins_and_is_case_insensitive() {
        assert_eq!(router().choose(Some("EU-west")), Ok((1, Reason::Pin)));
    }

    #[test]
    fn no_pin_means_default() {
        assert_eq!(router().choose(None), Ok((0, Reason::Default)));
        assert_eq!(router().choose(Some(" ")), Ok((0, Reason::Default)));
    }

    #[test]
    fn unknown_pin_is_an_error() {
        assert_eq!(
            router().choose(Some("mars")),
            Err(UnknownRegion("mars".into()))
        );
    }
}
