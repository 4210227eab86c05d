//! `meridian tenants ...` and `meridian audit`: clients of a region's
//! management API
//! (`meridian.v1.Admin`), over mutual TLS with an operator certificate from
//! `meridian certs`, or in plain text to a region whose mesh is plaintext.
//! Tables for people, `--json` for scripts.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use meridian_mesh::{Identity, MeshConnector};
use meridian_proto::v1 as pb;
use meridian_proto::v1::admin_client::AdminClient;
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint};

/// Where the management API is and who calls it.
#[derive(clap::Args, Clone)]
pub(crate) struct ApiArgs {
    /// A region's address: `https://host:port` (mutual TLS, with
    /// `--certs`), or `http://host:port` for a region whose mesh is
    /// plaintext.
    #[arg(long, env = "MERIDIAN_REGION")]
    region: String,
    /// The region's name, whose certificate the region must present
    /// (`<name>.region.meridian`); required with `https://`.
    #[arg(long, env = "MERIDIAN_REGION_NAME")]
    region_name: Option<String>,
    /// The directory `meridian certs` wrote: its `ca.pem` and the
    /// operator's certificate and key.
    #[arg(long, env = "MERIDIAN_CERTS")]
    certs: Option<PathBuf>,
    /// The operator whose certificate to present.
    #[arg(long, env = "MERIDIAN_OPERATOR", default_value = "admin")]
    operator: String,
    /// Answer only once another region has applied the write (it then
    /// survives the loss of this region); fails if none does in time.
    #[arg(long)]
    sync: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(clap::Subcommand)]
pub(crate) enum Tenants {
    /// Create a tenant, or replace its name and limits (a limit left out is
    /// the gateway's default).
    Put {
        /// Tenant id: 1 to 64 letters, digits, '-', '_' or '.'.
        id: String,
        /// A name for people (default: kept, or the id for a new tenant).
        #[arg(long)]
        name: Option<String>,
        /// Requests per second.
        #[arg(long)]
        rps: Option<u32>,
        /// Tokens per minute.
        #[arg(long)]
        tpm: Option<u64>,
        /// A region the tenant's requests may be served in (repeat for
        /// several); none: any region.
        #[arg(long = "allow-region")]
        allowed_regions: Vec<String>,
        /// Budget in tokens (prompt and completion) per period, summed
        /// over every region.
        #[arg(long)]
        budget_tokens: Option<u64>,
        /// Budget in US dollars per period, at the model prices.
        #[arg(long)]
        budget_usd: Option<f64>,
        /// The budget's period: `day` or `month` (UTC; default `month`).
        #[arg(long)]
        budget_period: Option<String>,
        /// A model (or route) its keys may use (repeat for several); none:
        /// any.
        #[arg(long = "allow-model")]
        allowed_models: Vec<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show one tenant.
    Get {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List tenants in id order.
    List {
        /// Tenants to show, 1 to 100.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Start after this id (the last of the previous page).
        #[arg(long, default_value = "")]
        after: String,
        /// Deleted tenants too.
        #[arg(long)]
        include_deleted: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete a tenant: its keys stop at once, its stored data is erased in
    /// every region after the retention; `put` restores it until then.
    Delete {
        id: String,
        /// Days its data is kept before it is erased.
        #[arg(long, default_value_t = 30)]
        retention_days: u64,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Make a key for a tenant; prints it, shown only this once.
    CreateKey {
        /// Tenant id.
        tenant: String,
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Make a new key like an old one; the old one keeps working for the
    /// grace period, so clients can move without a failed call.
    RotateKey {
        /// Key id (from `create-key` or `keys`).
        id: String,
        /// Seconds the old key keeps working (default 3600; 0: none).
        #[arg(long)]
        grace: Option<u64>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List a tenant's keys (ids and prefixes, never the keys).
    Keys {
        /// Tenant id.
        tenant: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Revoke a key by its id; gateways stop accepting it at their next
    /// reload.
    RevokeKey {
        /// Key id (from `create-key` or `keys`).
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// What a new key is.
#[derive(clap::Args)]
pub(crate) struct KeyArgs {
    /// A name for people.
    #[arg(long)]
    name: Option<String>,
    /// A label, `KEY=VALUE` (repeat for several).
    #[arg(long = "label", value_parser = label)]
    labels: Vec<(String, String)>,
    /// When it stops working, RFC 3339 (e.g. 2027-01-31T00:00:00Z).
    #[arg(long)]
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// A model (or route) it may use (repeat for several); none: any its
    /// tenant may.
    #[arg(long = "allow-model")]
    allowed_models: Vec<String>,
}

fn label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

/// The audit log's page.
#[derive(clap::Args)]
pub(crate) struct AuditArgs {
    /// Records to show, 1 to 100, newest first.
    #[arg(long, default_value_t = 20)]
    limit: u32,
    /// Start after this record id (the last of the previous page).
    #[arg(long, default_value = "")]
    after: String,
    #[command(flatten)]
    api: ApiArgs,
}

impl ApiArgs {
    pub(crate) async fn client(&self) -> anyhow::Result<AdminClient<Channel>> {
        let endpoint = Endpoint::from_shared(self.region.clone())
            .with_context(|| format!("`--region {}` is not a URL", self.region))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30));
        let channel = if let Some(address) = self.region.strip_prefix("https://") {
            let dir = self.certs.as_ref().context(
                "`--certs DIR` is required with https:// (the directory `meridian certs` wrote)",
            )?;
            let name = self
                .region_name
                .as_deref()
                .context("`--region-name` is required with https:// (the region's name)")?;
            let identity = Identity::operator(&self.operator).map_err(anyhow::Error::msg)?;
            let loaded = crate::certs::files(dir, &identity)
                .check("certs")
                .map_err(anyhow::Error::msg)?;
            let tls = Arc::new(meridian_mesh::client_config(&loaded).map_err(anyhow::Error::msg)?);
            let expect = Identity::region(name).map_err(anyhow::Error::msg)?;
            let connector = MeshConnector::new(
                Arc::new(move || tls.clone()),
                &meridian_mesh::region_server_name(name),
                Some(expect),
            )
            .map_err(anyhow::Error::msg)?;
            // The connector dials the address itself, over TLS.
            Endpoint::from_shared(format!("http://{address}"))?
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(30))
                .connect_with_connector(connector)
                .await
        } else {
            endpoint.connect().await
        }
        .with_context(|| format!("cannot reach {}", self.region))?;
        Ok(AdminClient::new(channel))
    }

    pub(crate) fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if self.sync {
            request
                .metadata_mut()
                .insert("x-meridian-durability", "sync".parse().expect("ASCII"));
        }
        request
    }
}

/// A refusal as one line: the status's message, which names the problem.
pub(crate) fn refused(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", status.message(), status.code())
}

pub(crate) async fn tenants(command: Tenants) -> anyhow::Result<()> {
    match command {
        Tenants::Put {
            id,
            name,
            rps,
            tpm,
            allowed_regions,
            budget_tokens,
            budget_usd,
            budget_period,
            allowed_models,
            api,
        } => {
            let budget = (budget_tokens.is_some()
                || budget_usd.is_some()
                || budget_period.is_some())
            .then(|| pb::Budget {
                tokens: budget_tokens,
                usd: budget_usd,
                period: budget_period.unwrap_or_default(),
            });
            let request = api.request(pb::PutTenantRequest {
                id,
                display_name: name,
                requests_per_second: rps,
                tokens_per_minute: tpm,
                allowed_regions,
                budget,
                allowed_models,
            });
            let put = api
                .client()
                .await?
                .put_tenant(request)
                .await
                .map_err(refused)?
                .into_inner();
            let tenant = put.tenant.unwrap_or_default();
            if api.json {
                println!(
                    "{}",
                    json!({ "created": put.created, "tenant": tenant_json(&tenant) })
                );
            } else {
                eprintln!("{}", if put.created { "created" } else { "updated" });
                print_tenants(&[tenant]);
            }
        }
        Tenants::Get { id, api } => {
            let tenant = api
                .client()
                .await?
                .get_tenant(pb::GetTenantRequest { id })
                .await
                .map_err(refused)?
                .into_inner();
            if api.json {
                println!("{}", tenant_json(&tenant));
            } else {
                print_tenants(&[tenant]);
            }
        }
        Tenants::Delete {
            id,
            retention_days,
            api,
        } => {
            let tenant = api
                .client()
                .await?
                .delete_tenant(api.request(pb::DeleteTenantRequest {
                    id,
                    retention_seconds: Some(retention_days.saturating_mul(86_400)),
                }))
                .await
                .map_err(refused)?
                .into_inner();
            if api.json {
                println!("{}", tenant_json(&tenant));
            } else {
                print_tenants(std::slice::from_ref(&tenant));
                eprintln!(
                    "deleted; its data is erased at {} unless `tenants put {}` restores it",
                    time(tenant.purge_at.as_ref()),
                    tenant.id
                );
            }
        }
        Tenants::List {
            limit,
            after,
            include_deleted,
            api,
        } => {
            let page = api
                .client()
                .await?
                .list_tenants(pb::ListTenantsRequest {
                    limit,
                    after,
                    include_deleted,
                })
                .await
                .map_err(refused)?
                .into_inner();
            if api.json {
                let data: Vec<Value> = page.tenants.iter().map(tenant_json).collect();
                println!("{}", json!({ "data": data, "has_more": page.has_more }));
            } else {
                print_tenants(&page.tenants);
                if page.has_more {
                    let last = page.tenants.last().map_or("", |t| t.id.as_str());
                    eprintln!("more: --after {last}");
                }
            }
        }
        Tenants::CreateKey { tenant, key, api } => create_key(tenant, key, api).await?,
        Tenants::RotateKey { id, grace, api } => rotate_key(id, grace, api).await?,
        Tenants::Keys { tenant, api } => list_keys(tenant, api).await?,
        Tenants::RevokeKey { id, api } => revoke_key(id, api).await?,
    }
    Ok(())
}

/// A new key, printed once.
async fn create_key(tenant: String, spec: KeyArgs, api: ApiArgs) -> anyhow::Result<()> {
    let request = pb::CreateApiKeyRequest {
        tenant,
        name: spec.name,
        labels: spec.labels.into_iter().collect(),
        expires_at: spec
            .expires_at
            .map(|t| std::time::SystemTime::from(t).into()),
        allowed_models: spec.allowed_models,
    };
    let made = api
        .client()
        .await?
        .create_api_key(api.request(request))
        .await
        .map_err(refused)?
        .into_inner();
    print_secret(made.key.unwrap_or_default(), made.secret, &api);
    Ok(())
}

/// A rotated key: the new one printed once.
async fn rotate_key(id: String, grace: Option<u64>, api: ApiArgs) -> anyhow::Result<()> {
    let rotated = api
        .client()
        .await?
        .rotate_api_key(api.request(pb::RotateApiKeyRequest {
            id,
            grace_seconds: grace,
        }))
        .await
        .map_err(refused)?
        .into_inner();
    let old = rotated.rotated.unwrap_or_default();
    if !api.json {
        eprintln!(
            "key {} works until {}",
            old.id,
            time(old.expires_at.as_ref())
        );
    }
    print_secret(rotated.key.unwrap_or_default(), rotated.secret, &api);
    Ok(())
}

/// A new key and its secret: JSON, or the secret alone on stdout.
fn print_secret(key: pb::ApiKey, secret: String, api: &ApiArgs) {
    if api.json {
        let mut out = key_json(&key);
        out["key"] = Value::String(secret);
        println!("{out}");
    } else {
        // The key alone on stdout, as `meridian keys create` prints it:
        // scripts read it.
        println!("{secret}");
        eprintln!("key id {} (for `meridian tenants revoke-key`)", key.id);
    }
}

async fn list_keys(tenant: String, api: ApiArgs) -> anyhow::Result<()> {
    let keys = api
        .client()
        .await?
        .list_api_keys(pb::ListApiKeysRequest { tenant })
        .await
        .map_err(refused)?
        .into_inner()
        .keys;
    if api.json {
        let data: Vec<Value> = keys.iter().map(key_json).collect();
        println!("{}", json!({ "data": data }));
    } else {
        let rows = keys.iter().map(|k| {
            vec![
                k.id.clone(),
                k.prefix.clone(),
                k.name.clone(),
                time(k.created_at.as_ref()),
                time(k.expires_at.as_ref()),
                time(k.revoked_at.as_ref()),
                k.allowed_models.join(" "),
            ]
        });
        table(
            &[
                "ID", "PREFIX", "NAME", "CREATED", "EXPIRES", "REVOKED", "MODELS",
            ],
            rows,
        );
    }
    Ok(())
}

async fn revoke_key(id: String, api: ApiArgs) -> anyhow::Result<()> {
    let key = api
        .client()
        .await?
        .revoke_api_key(api.request(pb::RevokeApiKeyRequest { id }))
        .await
        .map_err(refused)?
        .into_inner();
    if api.json {
        println!("{}", key_json(&key));
    } else {
        eprintln!("revoked at {}", time(key.revoked_at.as_ref()));
    }
    Ok(())
}

pub(crate) async fn audit(args: AuditArgs) -> anyhow::Result<()> {
    let page = args
        .api
        .client()
        .await?
        .list_audit(pb::ListAuditRequest {
            limit: args.limit,
            after: args.after,
        })
        .await
        .map_err(refused)?
        .into_inner();
    if args.api.json {
        let data: Vec<Value> = page
            .records
            .iter()
            .map(|r| {
                json!({ "id": r.id, "at": time(r.at.as_ref()), "actor": r.actor,
                    "action": r.action, "resource": r.resource, "source": r.source,
                    "region": r.region,
                    "detail": serde_json::from_str::<Value>(&r.detail_json).unwrap_or(Value::Null) })
            })
            .collect();
        println!("{}", json!({ "data": data, "has_more": page.has_more }));
    } else {
        let rows = page.records.iter().map(|r| {
            vec![
                time(r.at.as_ref()),
                r.actor.clone(),
                r.action.clone(),
                r.resource.clone(),
                r.region.clone(),
                r.source.clone(),
            ]
        });
        table(
            &["AT", "ACTOR", "ACTION", "RESOURCE", "REGION", "FROM"],
            rows,
        );
        if page.has_more {
            let last = page.records.last().map_or("", |r| r.id.as_str());
            eprintln!("more: --after {last}");
        }
    }
    Ok(())
}

fn tenant_json(t: &pb::Tenant) -> Value {
    json!({ "id": t.id, "display_name": t.display_name,
        "requests_per_second": t.requests_per_second, "tokens_per_minute": t.tokens_per_minute,
        "allowed_regions": t.allowed_regions, "allowed_models": t.allowed_models,
        "live_keys": t.live_keys,
        "budget": t.budget.as_ref().map(|b| json!({ "tokens": b.tokens, "usd": b.usd,
            "period": b.period })),
        "created_at": time(t.created_at.as_ref()),
        "updated_at": time(t.updated_at.as_ref()),
        "deleted_at": t.deleted_at.as_ref().map(|t| time(Some(t))),
        "purge_at": t.purge_at.as_ref().map(|t| time(Some(t))) })
}

fn key_json(k: &pb::ApiKey) -> Value {
    json!({ "id": k.id, "tenant": k.tenant, "prefix": k.prefix,
        "name": Some(&k.name).filter(|n| !n.is_empty()),
        "labels": k.labels.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "created_at": time(k.created_at.as_ref()),
        "expires_at": k.expires_at.as_ref().map(|t| time(Some(t))),
        "revoked_at": k.revoked_at.as_ref().map(|t| time(Some(t))),
        "allowed_models": k.allowed_models })
}

fn print_tenants(tenants: &[pb::Tenant]) {
    let limit = |l: Option<String>| l.unwrap_or_else(|| "default".into());
    let rows = tenants.iter().map(|t| {
        vec![
            t.id.clone(),
            t.display_name.clone(),
            limit(t.requests_per_second.map(|r| r.to_string())),
            limit(t.tokens_per_minute.map(|r| r.to_string())),
            budget_text(t.budget.as_ref()),
            t.live_keys.to_string(),
        ]
    });
    table(&["ID", "NAME", "RPS", "TPM", "BUDGET", "KEYS"], rows);
}

/// `1000000 tokens + $50 / month`, or `none`.
fn budget_text(budget: Option<&pb::Budget>) -> String {
    let Some(b) = budget else {
        return "none".into();
    };
    let mut parts = Vec::new();
    if let Some(tokens) = b.tokens {
        parts.push(format!("{tokens} tokens"));
    }
    if let Some(usd) = b.usd {
        parts.push(format!("${usd}"));
    }
    format!("{} / {}", parts.join(" + "), b.period)
}

/// RFC 3339, or empty for none.
pub(crate) fn time(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// Columns padded to their widest cell.
pub(crate) fn table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = std::iter::once(header.iter().map(|h| h.to_string()).collect())
        .chain(rows)
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}
