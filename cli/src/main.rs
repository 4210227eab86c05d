//! `meridian`: start a local multi-region deployment (`meridian up`), or run
//! one regional node or gateway from its config file.

mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "meridian", version, about = "A global edge for AI inference")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start three local regions (each with its own Redis and PostgreSQL) and
    /// the gateway; Ctrl-C stops everything.
    Up(up::Args),
    /// Run one regional node.
    Regional {
        /// The node's TOML config.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the gateway.
    Gateway {
        /// The gateway's TOML config.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Manage tenants' API keys (in a region's PostgreSQL).
    #[command(subcommand)]
    Keys(Keys),
}

#[derive(Subcommand)]
enum Keys {
    /// Create a key for a tenant (creating the tenant, or updating the limits
    /// given); prints the key, which is shown only this once.
    Create {
        /// The database the gateway reads keys from.
        #[arg(long, env = "MERIDIAN_POSTGRES_URL")]
        postgres_url: String,
        /// Tenant id: 1 to 64 letters, digits, '-', '_' or '.'.
        #[arg(long)]
        tenant: String,
        /// Requests per second (default: the gateway's `[rate_limit]`).
        #[arg(long)]
        rps: Option<u32>,
        /// Tokens per minute (default: the gateway's `[rate_limit]`).
        #[arg(long)]
        tpm: Option<u64>,
    },
    /// Revoke a key; gateways stop accepting it at their next reload.
    Revoke {
        /// The database the gateway reads keys from.
        #[arg(long, env = "MERIDIAN_POSTGRES_URL")]
        postgres_url: String,
        /// The key (`mk-...`).
        key: String,
    },
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line naming the cause, for people and for scripts.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MERIDIAN_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,pingora_core=warn,pingora_proxy=warn,sqlx=warn")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up(args) => runtime()?.block_on(up::run(args)),
        Command::Regional { config } => {
            let config = meridian_regional::Config::from_file(&config)?;
            runtime()?.block_on(async {
                let node = meridian_regional::RegionalNode::start(config).await?;
                node.run_until(shutdown_signal()).await?;
                Ok(())
            })
        }
        Command::Keys(keys) => runtime()?.block_on(manage_keys(keys)),
        Command::Gateway { config } => {
            let config = meridian_gateway::Config::from_file(&config)?;
            let gateway = meridian_gateway::Gateway::start(config)?;
            runtime()?.block_on(shutdown_signal());
            gateway.shutdown();
            Ok(())
        }
    }
}

async fn manage_keys(keys: Keys) -> anyhow::Result<()> {
    use meridian_gateway::auth;
    match keys {
        Keys::Create {
            postgres_url,
            tenant,
            rps,
            tpm,
        } => {
            let pool = auth::connect(&postgres_url).await?;
            let limits = meridian_gateway::TenantLimits {
                requests_per_second: rps,
                tokens_per_minute: tpm,
            };
            auth::create_tenant(&pool, &tenant, limits).await?;
            println!("{}", auth::create_api_key(&pool, &tenant).await?);
        }
        Keys::Revoke { postgres_url, key } => {
            let pool = auth::connect(&postgres_url).await?;
            if !auth::revoke_api_key(&pool, &key).await? {
                anyhow::bail!("no live key matches (unknown, or revoked already)");
            }
            eprintln!("revoked");
        }
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Resolves on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutdown requested");
}
