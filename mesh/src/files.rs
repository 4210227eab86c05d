//! Certificate files on disk, and reloading them when they change: a thread
//! polls their modification times and swaps what was built from them, so a
//! rotation needs no restart and readers never wait (an `ArcSwap` load).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::identity::Identity;

/// Where a service's mesh certificate, key and trusted CA are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM bundle of the CA certificates peers' certificates must chain to.
    pub ca_path: PathBuf,
    /// PEM chain, leaf first.
    pub cert_path: PathBuf,
    /// PEM private key of the leaf.
    pub key_path: PathBuf,
}

/// The parsed contents of [`CertFiles`], checked to belong together.
#[derive(Debug)]
pub struct Loaded {
    /// The trusted CAs.
    pub roots: Arc<RootCertStore>,
    /// The same CAs in DER, for APIs that take raw certificates.
    pub ca_ders: Vec<CertificateDer<'static>>,
    /// This service's chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// This service's private key.
    pub key: PrivateKeyDer<'static>,
    /// The identity the leaf names.
    pub identity: Identity,
    /// The leaf's serial number (for logs).
    pub serial: String,
}

impl Loaded {
    /// Parses PEM texts (the files' contents, or certificates a test made).
    pub fn from_pem(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, String> {
        let ca_ders = CertificateDer::pem_slice_iter(ca_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("CA: {e}"))?;
        if ca_ders.is_empty() {
            return Err("CA: no certificate in the file".into());
        }
        let mut roots = RootCertStore::empty();
        for der in &ca_ders {
            roots.add(der.clone()).map_err(|e| format!("CA: {e}"))?;
        }
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("certificate: {e}"))?;
        let leaf = chain
            .first()
            .ok_or("certificate: no certificate in the file")?;
        let identity = Identity::from_cert_der(leaf).map_err(|e| format!("certificate: {e}"))?;
        let serial = crate::identity::serial_of(leaf).unwrap_or_default();
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("key: {e}"))?;
        // Catches a half-done rotation (new certificate, old key).
        rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &crate::provider())
            .map_err(|e| format!("certificate and key do not belong together: {e}"))?;
        Ok(Self {
            roots: Arc::new(roots),
            ca_ders,
            chain,
            key,
            identity,
            serial,
        })
    }

    /// Reads and checks the files.
    pub fn read(files: &CertFiles) -> Result<Self, String> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        Self::from_pem(
            &read(&files.ca_path)?,
            &read(&files.cert_path)?,
            &read(&files.key_path)?,
        )
    }
}

impl CertFiles {
    /// Reads and checks the files as a service does at start, for config
    /// validation: the error names the key (`{section}.ca_path`,
    /// `{section}.cert_path`, `{section}.key_path`) of the file at fault.
    pub fn check(&self, section: &str) -> Result<Loaded, String> {
        let read = |key: &str, p: &Path| {
            std::fs::read(p).map_err(|e| format!("`{section}.{key}` {}: {e}", p.display()))
        };
        let ca = read("ca_path", &self.ca_path)?;
        let cert = read("cert_path", &self.cert_path)?;
        let key = read("key_path", &self.key_path)?;
        Loaded::from_pem(&ca, &cert, &key).map_err(|e| {
            let (key, path) = if e.starts_with("CA") {
                ("ca_path", &self.ca_path)
            } else if e.starts_with("certificate:") {
                ("cert_path", &self.cert_path)
            } else {
                ("key_path", &self.key_path)
            };
            format!("`{section}.{key}` {}: {e}", path.display())
        })
    }
}

type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(files: &CertFiles) -> Stamp {
    [&files.ca_path, &files.cert_path, &files.key_path]
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// Loads `files`, builds `T` from them, and keeps rebuilding it whenever a
/// file changes (checked every `interval`). Fails when the first load
/// fails; later failures (a half-written rotation, a bad file) keep the
/// last good `T` and are logged once per change.
///
/// The watcher is a plain thread, so it needs no runtime and never blocks
/// one; it ends within `interval` of the returned handle's last clone
/// being dropped.
pub fn watch<T, F>(
    files: CertFiles,
    interval: Duration,
    build: F,
) -> Result<Arc<ArcSwap<T>>, String>
where
    T: Send + Sync + 'static,
    F: Fn(&Loaded) -> Result<T, String> + Send + 'static,
{
    let mut last = stamp(&files);
    let loaded = Loaded::read(&files)?;
    let current = Arc::new(ArcSwap::from_pointee(build(&loaded)?));
    tracing::info!(identity = %loaded.identity, serial = %loaded.serial, "mesh certificate loaded");
    let weak: Weak<ArcSwap<T>> = Arc::downgrade(&current);
    std::thread::Builder::new()
        .name("mesh-cert-watch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(interval);
                let Some(current) = weak.upgrade() else { return };
                let now = stamp(&files);
                if now == last {
                    continue;
                }
                last = now;
                match Loaded::read(&files).and_then(|l| Ok((build(&l)?, l))) {
                    Ok((built, l)) => {
                        current.store(Arc::new(built));
                        tracing::info!(identity = %l.identity, serial = %l.serial, "mesh certificate reloaded");
                    }
                    Err(e) => tracing::warn!(
                        cert = %files.cert_path.display(),
                        error = %e,
                        "mesh certificate files changed but cannot be used; keeping the previous ones"
                    ),
                }
            }
        })
        .map_err(|e| format!("cannot start the certificate watcher: {e}"))?;
    Ok(current)
}
