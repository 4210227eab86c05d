//! `[mesh]` of the regional config: the node's certificate, the CA its
//! peers must chain to, and who may call what.

use std::path::PathBuf;
use std::time::Duration;

use meridian_mesh::CertFiles;
use meridian_proto::config::Problems;
use serde::Deserialize;

/// Mutual TLS on the node's port and the authorisation table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeshConfig {
    /// PEM bundle of the CA certificates that callers' certificates must
    /// chain to (the mesh CA; `meridian certs` writes `ca.pem`).
    pub ca_path: Option<PathBuf>,
    /// PEM chain of this node, leaf first; its URI SAN must be
    /// `spiffe://meridian/region/<region>/regional`.
    pub cert_path: Option<PathBuf>,
    /// PEM private key of `cert_path`.
    pub key_path: Option<PathBuf>,
    /// Serve plain HTTP/h2c without identities, policy or tenant checks:
    /// for local debugging only, and logged as a warning at start.
    pub plaintext: bool,
    /// How often the three files are checked for change, in milliseconds;
    /// changed files are loaded for new connections without a restart.
    pub reload_interval_ms: u64,
    /// Who may call which service.
    pub policy: PolicyConfig,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            ca_path: None,
            cert_path: None,
            key_path: None,
            plaintext: false,
            reload_interval_ms: 1_000,
            policy: PolicyConfig::default(),
        }
    }
}

/// `[mesh.policy]`: calls are denied unless a rule allows them. Health
/// checks (`grpc.health.v1.Health`) and reflection are open to every
/// authenticated peer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// The rules; giving `allow` replaces the defaults entirely.
    pub allow: Vec<AllowRule>,
    /// Identities (or prefixes ending in `/*`) that may only read, whatever
    /// `allow` lets them call: HTTP `GET` and `HEAD`, and the gRPC methods
    /// that change nothing (`Admin/RegionStatus`, `GetTenant`,
    /// `ListTenants`, `ListApiKeys`, `ListAudit`, `ListRoutes`,
    /// `ListRegionControls`, `ListPrices`, `GetUsage`). For operators who watch
    /// but do not change, e.g. `spiffe://meridian/operator/viewer`.
    pub read_only: Vec<String>,
}

/// One row of the authorisation table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowRule {
    /// An identity, or a prefix of identities ending in `/*`, e.g.
    /// `spiffe://meridian/gateway/*`.
    pub identity: String,
    /// gRPC services (`meridian.v1.Inference`), single methods
    /// (`meridian.v1.Admin/RegionStatus`), or `http` for every HTTP route.
    pub services: Vec<String>,
}

fn rule(identity: &str, services: &[&str]) -> AllowRule {
    AllowRule {
        identity: identity.into(),
        services: services.iter().map(|s| s.to_string()).collect(),
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            read_only: Vec::new(),
            allow: vec![
                // Gateways carry client traffic, and health-check with
                // RegionStatus; draining a region is an operator's call.
                rule(
                    "spiffe://meridian/gateway/*",
                    &[
                        "meridian.v1.Inference",
                        "meridian.v1.Jobs",
                        "meridian.v1.Telemetry",
                        "meridian.v1.Admin/RegionStatus",
                        "http",
                    ],
                ),
                rule("spiffe://meridian/region/*", &["meridian.v1.Replication"]),
                rule("spiffe://meridian/operator/*", &["meridian.v1.Admin"]),
            ],
        }
    }
}

/// What the node serves with, once validated.
#[derive(Debug, Clone)]
pub enum Mesh {
    /// Plain text: no identities (`plaintext = true`).
    Plaintext,
    /// Mutual TLS with the files, reload interval and policy.
    Tls {
        /// The certificate files.
        files: CertFiles,
        /// Poll interval of the files.
        reload_interval: Duration,
        /// The authorisation table.
        policy: PolicyConfig,
    },
}

impl MeshConfig {
    /// Checks the section and loads the files as the node does at start
    /// (the certificate must name this `region`); every problem names its
    /// key. `None` only with a problem recorded.
    pub(crate) fn validate(self, region: &str, problems: &mut Problems) -> Option<Mesh> {
        for (i, r) in self.policy.allow.iter().enumerate() {
            problems.check(
                meridian_mesh::validate_pattern(&r.identity)
                    .map_err(|e| format!("`mesh.policy.allow[{i}].identity`: {e}")),
            );
            if r.services.is_empty() {
                problems.push(format!(
                    "`mesh.policy.allow[{i}].services` must not be empty"
                ));
            }
            for s in &r.services {
                if !valid_service(s) {
                    problems.push(format!(
                        "`mesh.policy.allow[{i}].services`: {s:?} is not `http`, a gRPC service \
                         (`package.Service`) or a method (`package.Service/Method`)"
                    ));
                }
            }
        }
        for (i, pattern) in self.policy.read_only.iter().enumerate() {
            problems.check(
                meridian_mesh::validate_pattern(pattern)
                    .map_err(|e| format!("`mesh.policy.read_only[{i}]`: {e}")),
            );
        }
        if self.plaintext {
            return Some(Mesh::Plaintext);
        }
        if self.reload_interval_ms == 0 {
            problems.push("`mesh.reload_interval_ms` must be at least 1");
        }
        let mut paths = Vec::new();
        for (key, path) in [
            ("ca_path", self.ca_path),
            ("cert_path", self.cert_path),
            ("key_path", self.key_path),
        ] {
            match path {
                None => problems.push(format!(
                    "`mesh.{key}` is required: internal traffic uses mutual TLS (make development \
                     certificates with `meridian certs`, or set `mesh.plaintext = true` for local \
                     debugging only)"
                )),
                Some(path) if !path.is_file() => problems.push(format!(
                    "`mesh.{key}` {} is not a readable file",
                    path.display()
                )),
                Some(path) => paths.push(path),
            }
        }
        let [ca_path, cert_path, key_path] = <[PathBuf; 3]>::try_from(paths).ok()?;
        let files = CertFiles {
            ca_path,
            cert_path,
            key_path,
        };
        problems.check(check_files(&files, region));
        Some(Mesh::Tls {
            files,
            reload_interval: Duration::from_millis(self.reload_interval_ms),
            policy: self.policy,
        })
    }
}

/// What `server_tls` loads at start: the files parse, belong together, make
/// a server config, and the certificate names this region.
fn check_files(files: &CertFiles, region: &str) -> Result<(), String> {
    let loaded = files.check("mesh")?;
    let cert = files.cert_path.display();
    // An invalid region name is reported under `region`.
    if let Ok(expected) = meridian_mesh::Identity::region(region)
        && loaded.identity != expected
    {
        return Err(format!(
            "`mesh.cert_path` {cert} names {}, not {expected}",
            loaded.identity
        ));
    }
    meridian_mesh::server_config(&loaded)
        .map(drop)
        .map_err(|e| format!("`mesh.cert_path` {cert}: {e}"))
}

fn valid_service(s: &str) -> bool {
    let name = |n: &str| {
        !n.is_empty()
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_'))
    };
    match s.split_once('/') {
        _ if s == "http" => true,
        Some((service, method)) => service.contains('.') && name(service) && name(method),
        None => s.contains('.') && name(s),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const BASE: &str = "region = \"eu-west\"\n[redis]\nurl = \"redis://127.0.0.1:6379/\"\n\
                        [postgres]\nurl = \"postgres://m@127.0.0.1:5432/m\"\n";

    fn err(mesh: &str) -> String {
        Config::from_toml(&format!("{BASE}{mesh}"), "r")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn mtls_unless_plaintext_and_errors_name_the_key() {
        assert!(err("").contains("`mesh.ca_path` is required"));
        let e = err("[mesh]\nca_path = \"/nope\"\ncert_path = \"/nope\"\nkey_path = \"/nope\"\n");
        assert!(
            e.contains("`mesh.ca_path` /nope is not a readable file"),
            "{e}"
        );
        let e = err("[mesh]\nplaintext = true\n[mesh.policy]\n\
             allow = [{ identity = \"spiffe://meridian/gate*\", services = [\"http\"] }]\n");
        assert!(e.contains("`mesh.policy.allow[0].identity`"), "{e}");
        let e = err("[mesh]\nplaintext = true\n[mesh.policy]\n\
             allow = [{ identity = \"spiffe://meridian/gateway/*\", services = [\"Inference\"] }]\n");
        assert!(e.contains("`mesh.policy.allow[0].services`"), "{e}");
        let c = Config::from_toml(&format!("{BASE}[mesh]\nplaintext = true\n"), "r").unwrap();
        assert!(matches!(c.mesh, crate::mesh::Mesh::Plaintext));
    }
}
