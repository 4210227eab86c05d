//! `meridian certs`: a development CA and one certificate per service,
//! each naming its identity (`spiffe://meridian/...`) in a URI SAN. In
//! production the same files come from the operator's CA.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use meridian_mesh::{Ca, DEV_VALIDITY, Identity, file_stem};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Directory for `ca.pem`/`ca.key` and `<role>-<name>.pem`/`.key` per
    /// service. A CA already there is reused, so services that trust it keep
    /// trusting the new certificates (this is also how to rotate them).
    #[arg(long)]
    out: PathBuf,
    /// Regions to issue certificates for.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "us-east,eu-west,ap-south"
    )]
    regions: Vec<String>,
    /// Gateways to issue certificates for.
    #[arg(long, value_delimiter = ',', default_value = "edge-1")]
    gateways: Vec<String>,
    /// Operators (people, tools) to issue certificates for.
    #[arg(long, value_delimiter = ',', default_value = "admin")]
    operators: Vec<String>,
    /// How long the certificates are valid, in days.
    #[arg(long, default_value_t = 90)]
    days: u64,
}

/// The identities named by region, gateway and operator names.
pub(crate) fn identities(
    regions: &[String],
    gateways: &[String],
    operators: &[String],
) -> anyhow::Result<Vec<Identity>> {
    let mut out = Vec::new();
    for (names, make) in [
        (
            regions,
            Identity::region as fn(&str) -> Result<Identity, String>,
        ),
        (gateways, Identity::gateway),
        (operators, Identity::operator),
    ] {
        for n in names {
            out.push(make(n).map_err(anyhow::Error::msg)?);
        }
    }
    Ok(out)
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let ids = identities(&args.regions, &args.gateways, &args.operators)?;
    let written = issue(
        &args.out,
        &ids,
        Duration::from_secs(args.days * 24 * 3600),
        true,
    )?;
    println!("CA: {}", args.out.join("ca.pem").display());
    for (id, cert) in written {
        println!("{id}  {}", cert.display());
    }
    Ok(())
}

/// Issues certificates for `ids` into `dir` (creating the CA if needed);
/// with `replace` false, services whose files exist keep them. Returns what
/// was written.
pub(crate) fn issue(
    dir: &Path,
    ids: &[Identity],
    validity: Duration,
    replace: bool,
) -> anyhow::Result<Vec<(Identity, PathBuf)>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ca = Ca::load_or_create(dir).map_err(anyhow::Error::msg)?;
    let mut written = Vec::new();
    for id in ids {
        let stem = file_stem(id);
        if !replace && dir.join(format!("{stem}.pem")).exists() {
            continue;
        }
        let (cert, _) = ca
            .issue(id, validity)
            .and_then(|issued| issued.write(dir, &stem))
            .map_err(anyhow::Error::msg)?;
        written.push((id.clone(), cert));
    }
    Ok(written)
}

/// The local deployment's certificates in `dir`, issued on first use.
pub(crate) fn ensure_local(dir: &Path, ids: &[Identity]) -> anyhow::Result<()> {
    issue(dir, ids, DEV_VALIDITY, false).map(|_| ())
}

/// The files of `identity` in a directory written by [`issue`].
pub(crate) fn files(dir: &Path, identity: &Identity) -> meridian_mesh::CertFiles {
    let stem = file_stem(identity);
    meridian_mesh::CertFiles {
        ca_path: dir.join("ca.pem"),
        cert_path: dir.join(format!("{stem}.pem")),
        key_path: dir.join(format!("{stem}.key")),
    }
}
