//! Who a certificate speaks for: one `spiffe://meridian/...` URI SAN per
//! certificate. This is the only place identities are formatted, parsed and
//! matched, so the CA, the regions' policy and the gateway agree on them.

use std::fmt;

/// The trust domain every Meridian identity lives in.
pub const TRUST_DOMAIN: &str = "meridian";

const PREFIX: &str = "spiffe://meridian/";

/// A validated service identity, e.g. `spiffe://meridian/gateway/edge-1`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity(String);

/// What kind of service an identity names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `spiffe://meridian/region/<name>/regional`: a regional node.
    Region,
    /// `spiffe://meridian/gateway/<name>`: an edge gateway.
    Gateway,
    /// `spiffe://meridian/operator/<name>`: a person or tool administering regions.
    Operator,
}

impl Identity {
    /// The identity of the regional nodes of `region`.
    pub fn region(region: &str) -> Result<Self, String> {
        Self::parse(&format!("{PREFIX}region/{region}/regional"))
    }

    /// The identity of gateway `name`.
    pub fn gateway(name: &str) -> Result<Self, String> {
        Self::parse(&format!("{PREFIX}gateway/{name}"))
    }

    /// The identity of operator `name`.
    pub fn operator(name: &str) -> Result<Self, String> {
        Self::parse(&format!("{PREFIX}operator/{name}"))
    }

    /// Parses and validates one of the three shapes above. Names are
    /// lowercase letters, digits, `-`, `_` and `.`, so an identity can be
    /// put in a DNS name and a file name unchanged.
    pub fn parse(uri: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "{uri:?} is not a Meridian identity (spiffe://meridian/region/<name>/regional, spiffe://meridian/gateway/<name> or spiffe://meridian/operator/<name>)"
            )
        };
        let rest = uri.strip_prefix(PREFIX).ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let name = match parts.as_slice() {
            ["region", name, "regional"] | ["gateway", name] | ["operator", name] => *name,
            _ => return Err(bad()),
        };
        if !valid_name(name) {
            return Err(bad());
        }
        Ok(Self(uri.to_string()))
    }

    /// The URI.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// What kind of service this is.
    pub fn role(&self) -> Role {
        match self.0[PREFIX.len()..].split('/').next() {
            Some("region") => Role::Region,
            Some("gateway") => Role::Gateway,
            _ => Role::Operator,
        }
    }

    /// The region, gateway or operator name.
    pub fn name(&self) -> &str {
        self.0[PREFIX.len()..]
            .split('/')
            .nth(1)
            .expect("validated identities have a name")
    }

    /// Whether `pattern` (an identity, or a prefix ending in `/*`) covers
    /// this identity.
    pub fn matches(&self, pattern: &str) -> bool {
        match pattern.strip_suffix('*') {
            Some(prefix) => self.0.len() > prefix.len() && self.0.starts_with(prefix),
            None => self.0 == pattern,
        }
    }

    /// The identity in a DER certificate's URI SANs. Exactly one
    /// `spiffe://` URI is accepted: two would make "who is this" ambiguous.
    pub fn from_cert_der(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("unreadable certificate: {e}"))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| format!("unreadable subject alternative names: {e}"))?;
        let mut uris = san
            .iter()
            .flat_map(|s| &s.value.general_names)
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => {
                    Some(*u)
                }
                _ => None,
            });
        match (uris.next(), uris.next()) {
            (Some(uri), None) => Self::parse(uri),
            (None, _) => Err("the certificate carries no spiffe:// identity".into()),
            (Some(_), Some(_)) => {
                Err("the certificate carries more than one spiffe:// identity".into())
            }
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks an authorisation pattern: an identity, or a prefix of one ending
/// in `/*` (`spiffe://meridian/gateway/*`).
pub fn validate_pattern(pattern: &str) -> Result<(), String> {
    match pattern.strip_suffix("/*") {
        Some(prefix) if format!("{prefix}/").starts_with(PREFIX) && !prefix.contains('*') => Ok(()),
        Some(_) => Err(format!("{pattern:?} must start with {PREFIX}")),
        None if pattern.contains('*') => Err(format!(
            "{pattern:?}: `*` is allowed only as the last path segment"
        )),
        None => Identity::parse(pattern).map(|_| ()),
    }
}

/// The DNS name a region's certificate carries besides its identity URI.
/// Pingora (like most TLS clients) verifies a server by DNS name only, so
/// the gateway connects to `<region>.region.meridian` as SNI and checks
/// that; the CA issues the DNS name and the URI together.
pub fn region_server_name(region: &str) -> String {
    format!("{region}.region.{TRUST_DOMAIN}")
}

/// The serial number of a DER certificate, as colon-separated hex.
pub fn serial_of(der: &[u8]) -> Option<String> {
    x509_parser::parse_x509_certificate(der)
        .ok()
        .map(|(_, c)| c.raw_serial_as_string())
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_roles_and_patterns() {
        let r = Identity::region("eu-west").unwrap();
        assert_eq!(r.as_str(), "spiffe://meridian/region/eu-west/regional");
        assert_eq!((r.role(), r.name()), (Role::Region, "eu-west"));
        let g = Identity::gateway("edge-1").unwrap();
        assert_eq!((g.role(), g.name()), (Role::Gateway, "edge-1"));
        assert!(g.matches("spiffe://meridian/gateway/*"));
        assert!(!g.matches("spiffe://meridian/region/*"));
        assert!(r.matches("spiffe://meridian/region/*"));
        assert!(r.matches(r.as_str()));
        assert!(!Identity::gateway("edge-10").unwrap().matches(g.as_str()));
        for bad in [
            "spiffe://other/gateway/x",
            "spiffe://meridian/gateway/X",
            "spiffe://meridian/region/x",
            "spiffe://meridian/gateway/a/b",
            "spiffe://meridian/gateway/",
        ] {
            assert!(Identity::parse(bad).is_err(), "{bad}");
        }
        assert!(validate_pattern("spiffe://meridian/gateway/*").is_ok());
        assert!(validate_pattern("spiffe://meridian/*").is_ok());
        assert!(validate_pattern("spiffe://meridian/gate*").is_err());
        assert!(validate_pattern("https://meridian/*").is_err());
    }
}
