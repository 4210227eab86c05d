//! A development CA and the certificates it issues (`meridian certs`,
//! `meridian up`, tests). In production the same files come from the
//! operator's CA; nothing else in Meridian depends on who issued them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::identity::{Identity, Role, region_server_name};

/// How long issued development certificates are valid.
pub const DEV_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);

/// A certificate authority able to issue service certificates.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ca { .. }")
    }
}

/// A certificate and its private key, PEM-encoded.
#[derive(Clone)]
pub struct Issued {
    /// The leaf certificate.
    pub cert_pem: String,
    /// Its PKCS#8 private key.
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Issued { .. }")
    }
}

fn err(e: rcgen::Error) -> String {
    e.to_string()
}

impl Ca {
    /// A new self-signed CA named `common_name`.
    pub fn generate(common_name: &str) -> Result<Self, String> {
        let key = KeyPair::generate().map_err(err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "Meridian");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time_now();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key).map_err(err)?;
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA from its certificate and key, as written by [`Ca::write`] or
    /// handed over by an operator's PKI.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, String> {
        let key = KeyPair::from_pem(key_pem).map_err(err)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(err)?;
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            issuer,
        })
    }

    /// Reads `ca.pem` and `ca.key` from `dir`, or makes and writes a new CA
    /// when neither exists. Keeping the CA lets more certificates be issued
    /// later (a new region, a rotation) that the running services trust.
    pub fn load_or_create(dir: &Path) -> Result<Self, String> {
        let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
        if cert.exists() || key.exists() {
            let read =
                |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
            return Self::from_pem(&read(&cert)?, &read(&key)?)
                .map_err(|e| format!("{}: {e}", cert.display()));
        }
        let ca = Self::generate("Meridian development CA")?;
        write_private(&cert, &ca.cert_pem)?;
        write_private(&key, &ca.key_pem)?;
        Ok(ca)
    }

    /// The CA certificate, for services' `ca_path`.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate for `identity`, valid for `validity` from now.
    /// Besides the URI it names `localhost` and `127.0.0.1`, so loopback
    /// works, and regions also get `<region>.region.meridian`, the name the
    /// gateway verifies. Both client and server use are allowed: every
    /// service is a client of some other.
    pub fn issue(&self, identity: &Identity, validity: Duration) -> Result<Issued, String> {
        let key = KeyPair::generate().map_err(err)?;
        let mut names = Vec::new();
        if identity.role() == Role::Region {
            names.push(region_server_name(identity.name()));
        }
        names.extend(["localhost".to_string(), "127.0.0.1".to_string()]);
        let mut params = CertificateParams::new(names).map_err(err)?;
        params
            .subject_alt_names
            .push(SanType::URI(identity.as_str().try_into().map_err(err)?));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.as_str());
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = time_now();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::seconds(validity.as_secs() as i64);
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl Issued {
    /// Writes `<stem>.pem` and `<stem>.key` into `dir`, each replaced by a
    /// rename so a reloading service never reads half a file. The key goes
    /// first: a watcher that sees the new certificate with the old key
    /// rejects the pair and retries on its next poll.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf), String> {
        let (cert, key) = (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}.key")),
        );
        write_private(&key, &self.key_pem)?;
        write_private(&cert, &self.cert_pem)?;
        Ok((cert, key))
    }
}

/// The file stem `meridian certs` uses for an identity: `region-eu-west`,
/// `gateway-edge-1`, `operator-admin`.
pub fn file_stem(identity: &Identity) -> String {
    let role = match identity.role() {
        Role::Region => "region",
        Role::Gateway => "gateway",
        Role::Operator => "operator",
    };
    format!("{role}-{}", identity.name())
}

/// Writes `text` to `path` readable by its owner only (0600), whatever the
/// umask and whatever file (or leftover temporary file) was there before:
/// the mode is set on the open file, not left to its creation. The rename
/// makes the write atomic.
pub fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        private(&f)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Makes an existing file at `path` readable by its owner only, for a
/// secret kept from an earlier run that may have been written with another
/// mode.
pub fn keep_private(path: &Path) -> Result<(), String> {
    std::fs::File::open(path)
        .and_then(|f| private(&f))
        .map_err(|e| format!("cannot restrict {} to its owner: {e}", path.display()))
}

#[cfg(unix)]
fn private(f: &std::fs::File) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
}

#[cfg(not(unix))]
fn private(_: &std::fs::File) -> std::io::Result<()> {
    Ok(())
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn secrets_are_owner_only_whatever_was_there_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("region-a.key");
        // A world-readable file and a leftover temporary file from an
        // interrupted write, both made under a lax umask.
        for stale in [path.clone(), path.with_extension("tmp")] {
            std::fs::write(&stale, "old").unwrap();
            std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o666)).unwrap();
        }
        write_private(&path, "secret").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "secret");
        assert_eq!(mode(&path), 0o600);

        let kept = dir.path().join("api-key");
        std::fs::write(&kept, "key").unwrap();
        std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o644)).unwrap();
        keep_private(&kept).unwrap();
        assert_eq!(mode(&kept), 0o600);
        assert!(keep_private(&dir.path().join("missing")).is_err());
    }
}
