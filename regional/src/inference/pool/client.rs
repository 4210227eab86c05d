//! What a pool reads from outside its config (CA and client certificate
//! files, each upstream's key from the environment or a file) and the HTTP
//! client made from it: rustls with the ring provider, the public roots of
//! `webpki-roots` plus the pool's own CA, HTTP/2 when the upstream offers
//! it by ALPN.

use std::sync::Arc;
use std::time::Duration;

use meridian_mesh::rustls::pki_types::pem::PemObject;
use meridian_mesh::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use meridian_mesh::rustls::{ClientConfig, RootCertStore};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::Protocol;
use crate::config::{ApiKey, OpenAiConfig, UpstreamConfig};
use crate::error::Error;

/// A pool's outside inputs, read. Compared at a reload: a pool whose config
/// is unchanged is kept only if its files and variables still say the same,
/// so a rotated key or certificate takes effect at the next reload.
#[derive(PartialEq, Eq)]
pub(crate) struct Material {
    ca: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    /// Per upstream, in config order.
    keys: Vec<Option<ApiKey>>,
}

impl Material {
    /// Reads the files and variables the pool of `models[i]` names; an
    /// error names the key and the file or variable, never a key's value.
    pub(crate) fn read(i: usize, config: &OpenAiConfig) -> Result<Self, String> {
        let file = |name: &str, path: &Option<String>| {
            path.as_deref()
                .map(|p| {
                    std::fs::read(p)
                        .map_err(|e| format!("`models[{i}].backend.{name}`: cannot read {p}: {e}"))
                })
                .transpose()
        };
        let ca = file("ca_file", &config.ca_file)?;
        let cert = file("client_cert_file", &config.client_cert_file)?;
        let key = file("client_key_file", &config.client_key_file)?;
        let keys = config
            .upstreams
            .iter()
            .enumerate()
            .map(|(j, u)| {
                api_key(u).map_err(|e| format!("`models[{i}].backend.upstreams[{j}].{e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            ca,
            identity: cert.zip(key),
            keys,
        })
    }

    /// The key of upstream `j`, if it has one.
    pub(super) fn key(&self, j: usize) -> Option<&ApiKey> {
        self.keys.get(j).and_then(Option::as_ref)
    }

    /// The pool's HTTP client; an error names the key of `models[i]` at
    /// fault.
    pub(super) fn client(
        &self,
        i: usize,
        config: &OpenAiConfig,
    ) -> Result<reqwest::Client, String> {
        let tls = self.tls(i)?;
        reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .pool_idle_timeout(Duration::from_millis(config.pool_idle_timeout_ms))
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .build()
            .map_err(|e| format!("`models[{i}].backend`: cannot build the HTTP client: {e}"))
    }

    fn tls(&self, i: usize) -> Result<ClientConfig, String> {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(pem) = &self.ca {
            let certs =
                certificates(pem).map_err(|e| format!("`models[{i}].backend.ca_file`: {e}"))?;
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("`models[{i}].backend.ca_file`: {e}"))?;
            }
        }
        let builder = ClientConfig::builder_with_provider(Arc::new(meridian_mesh::provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("`models[{i}].backend`: {e}"))?
            .with_root_certificates(roots);
        let mut tls = match &self.identity {
            Some((cert, key)) => {
                let chain = certificates(cert)
                    .map_err(|e| format!("`models[{i}].backend.client_cert_file`: {e}"))?;
                let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| {
                    format!("`models[{i}].backend.client_key_file`: no PEM private key ({e})")
                })?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    format!("`models[{i}].backend.client_cert_file` and `client_key_file`: {e}")
                })?
            }
            None => builder.with_no_client_auth(),
        };
        // HTTP/2 when the upstream offers it: one connection multiplexes the
        // pool's streams. reqwest leaves ALPN to a preconfigured config.
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(tls)
    }
}

/// The PEM certificates of a file, at least one.
fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("unreadable PEM ({e})"))?;
    if certs.is_empty() {
        return Err("no PEM certificate in the file".into());
    }
    Ok(certs)
}

/// An upstream's key from wherever its config says; an error starts with
/// the name of the key that points there.
fn api_key(u: &UpstreamConfig) -> Result<Option<ApiKey>, String> {
    let key = if let Some(var) = &u.api_key_env {
        match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => ApiKey::new(v.trim()),
            Ok(_) => {
                return Err(format!(
                    "api_key_env`: the environment variable {var} is empty"
                ));
            }
            Err(std::env::VarError::NotPresent) => {
                return Err(format!(
                    "api_key_env`: the environment variable {var} is not set"
                ));
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(format!(
                    "api_key_env`: the environment variable {var} is not UTF-8"
                ));
            }
        }
    } else if let Some(path) = &u.api_key_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("api_key_file`: cannot read {path}: {e}"))?;
        if text.trim().is_empty() {
            return Err(format!("api_key_file`: {path} is empty"));
        }
        ApiKey::new(text.trim())
    } else if let Some(key) = &u.api_key {
        key.clone()
    } else {
        return Ok(None);
    };
    if HeaderValue::from_str(&format!("Bearer {}", key.expose())).is_err() {
        return Err("api_key`: the key holds characters a header cannot carry".into());
    }
    Ok(Some(key))
}

/// The headers of every request to an upstream: its static headers and its
/// key, all marked sensitive so no HTTP layer prints them.
pub(super) fn headers(
    u: &UpstreamConfig,
    key: Option<&ApiKey>,
    protocol: &Protocol,
) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::new();
    for (name, value) in &u.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("invalid header name {name:?}"))?;
        let mut value = HeaderValue::from_str(value)
            .map_err(|_| format!("invalid value for header {name:?}"))?;
        value.set_sensitive(true);
        map.insert(name, value);
    }
    for (name, value) in protocol.auth_headers(key)? {
        map.insert(name, value);
    }
    Ok(map)
}

/// `text` with every trace of `key` replaced: the key itself, and any word
/// that starts like it (OpenAI's 401 echoes `sk-abc1****wxyz`). Short keys
/// are only replaced whole, or every word would look like one.
pub(super) fn scrub(text: &str, key: &ApiKey) -> String {
    const REDACTED: &str = "<redacted>";
    let key = key.expose();
    let text = text.replace(key, REDACTED);
    let Some(prefix) = key.get(..6).filter(|_| key.len() >= 12) else {
        return text;
    };
    text.split_inclusive(char::is_whitespace)
        .map(|word| match word.find(prefix) {
            Some(at) => {
                let end = word.trim_end().len();
                format!("{}{REDACTED}{}", &word[..at], &word[end..])
            }
            None => word.to_string(),
        })
        .collect()
}

/// `e` with `key` scrubbed from its message, for errors that quote what an
/// upstream said.
pub(super) fn scrub_error(e: Error, key: Option<&ApiKey>) -> Error {
    let Some(key) = key else {
        return e;
    };
    match e {
        Error::Unavailable(m) => Error::Unavailable(scrub(&m, key)),
        Error::InvalidRequest { message, param } => Error::InvalidRequest {
            message: scrub(&message, key),
            param,
        },
        Error::UpstreamRefused {
            upstream,
            status,
            said,
        } => Error::UpstreamRefused {
            upstream,
            status,
            said: scrub(&said, key),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_removes_the_key_whole_and_masked() {
        let key = ApiKey::new("sk-proj-abcdef0123456789");
        let said = "Incorrect API key provided: sk-proj-**********6789. Your key sk-proj-abcdef0123456789 is wrong";
        let out = scrub(said, &key);
        assert!(!out.contains("abcdef0123456789"), "{out}");
        assert!(!out.contains("sk-pro"), "{out}");
        assert!(
            out.starts_with("Incorrect API key provided: <redacted>"),
            "{out}"
        );
        assert!(out.ends_with("is wrong"), "{out}");
        assert_eq!(scrub("nothing here", &key), "nothing here");
        assert_eq!(scrub("a k1 b", &ApiKey::new("k1")), "a <redacted> b");
        assert!(format!("{key:?}").contains("<redacted>"));
        assert!(!format!("{key:?}").contains("sk-"));
    }
}

#[cfg(test)]
mod read_tests {
    use super::*;

    fn pool(extra: &str) -> OpenAiConfig {
        let text = format!("upstreams = [{{ base_url = \"https://x/v1\"{extra} }}]\n");
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn missing_files_and_variables_are_named_and_values_never_shown() {
        let mut config = pool("");
        config.ca_file = Some("/nonexistent/ca.pem".into());
        let e = Material::read(2, &config).err().unwrap();
        assert!(
            e.starts_with(
                "`models[2].backend.ca_file`: cannot read /nonexistent/ca.pem: No such file"
            ),
            "{e}"
        );
        let e = Material::read(0, &pool(", api_key_env = \"MERIDIAN_TEST_UNSET_KEY\""))
            .err()
            .unwrap();
        assert!(
            e.contains("`models[0].backend.upstreams[0].api_key_env`: the environment variable MERIDIAN_TEST_UNSET_KEY is not set"),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("meridian-key-{}", std::process::id()));
        std::fs::write(&dir, "  sk-from-file-123\n").unwrap();
        let m = Material::read(
            0,
            &pool(&format!(", api_key_file = {:?}", dir.display().to_string())),
        )
        .unwrap();
        assert_eq!(m.key(0).map(ApiKey::expose), Some("sk-from-file-123"));
        std::fs::write(&dir, "not a pem").unwrap();
        let mut config = pool("");
        config.ca_file = Some(dir.display().to_string());
        let e = Material::read(0, &config)
            .unwrap()
            .client(0, &config)
            .err()
            .unwrap();
        assert!(
            e.starts_with("`models[0].backend.ca_file`: no PEM certificate"),
            "{e}"
        );
        std::fs::remove_file(&dir).unwrap();
    }
}
