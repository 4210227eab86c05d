//! `meridian`: start a local multi-region deployment (`meridian up`), or run
//! one regional node or gateway from its config file.

mod certs;
mod manage;
mod operate;
mod regional;
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
    /// Run one regional node; prints `ready addr=… time_series=…` on
    /// stdout once it serves.
    Regional {
        /// The node's TOML config.
        #[arg(long, short)]
        config: PathBuf,
        /// Write the node's process id to this file (removed on a clean exit).
        #[arg(long)]
        pid_file: Option<PathBuf>,
    },
    /// Run the gateway.
    Gateway {
        /// The gateway's TOML config.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Make a development CA and certificates for regions, gateways and
    /// operators (mutual TLS between Meridian's services).
    Certs(certs::Args),
    /// Manage tenants and their API keys through a region's management API
    /// (operators; every region, replicated everywhere, audited).
    #[command(subcommand)]
    Tenants(manage::Tenants),
    /// The management API's audit log: who changed which tenant, key,
    /// route, region control or price, when and from where.
    Audit(manage::AuditArgs),
    /// Model routes (aliases by weight or size, with fallbacks) for every
    /// region, through a region's management API.
    #[command(subcommand)]
    Routes(operate::Routes),
    /// Drain, undrain or weigh regions for every gateway.
    #[command(subcommand)]
    Regions(operate::Regions),
    /// Model prices, in US dollars per million tokens, for budgets.
    #[command(subcommand)]
    Prices(operate::Prices),
    /// Spend by day, tenant, region, model and key, summed over every region.
    Usage(operate::UsageArgs),
    /// Bearer tokens for the management API (for Terraform, CI and calls
    /// through a gateway), made and revoked through a region.
    #[command(subcommand)]
    OperatorTokens(operate::OperatorTokens),
    /// Manage tenants' API keys directly in a region's PostgreSQL, without
    /// the API (bootstrap and recovery; replication carries them to every
    /// region, but nothing is audited).
    #[command(subcommand)]
    Keys(Keys),
    /// Serve the simulated LLM as an OpenAI-compatible server
    /// (`/v1/chat/completions`, `/v1/models`, `/metrics`): an upstream for
    /// `kind = "openai"` models without a GPU.
    Sim(SimArgs),
}

#[derive(clap::Args)]
struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: std::net::SocketAddr,
    /// Fixed time before the first output token, in milliseconds.
    #[arg(long)]
    ttft_ms: Option<u64>,
    /// Time per output token after the first, in milliseconds.
    #[arg(long)]
    per_token_ms: Option<u64>,
    /// Prefill time per uncached prompt token, in microseconds.
    #[arg(long)]
    prefill_us_per_token: Option<u64>,
    /// Requests generated at once; more wait in a queue.
    #[arg(long)]
    max_concurrency: Option<u32>,
    /// Prompt-prefix blocks the prefix cache holds (0: off).
    #[arg(long)]
    prefix_cache_blocks: Option<u32>,
    /// OTLP/gRPC collector for spans of requests that arrive with a
    /// `traceparent` (from a region's upstream pool), e.g. http://127.0.0.1:4317.
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// The API it serves: OpenAI's chat completions, or Anthropic's
    /// Messages (`POST /v1/messages`).
    #[arg(long, value_enum, default_value = "openai")]
    protocol: SimProtocolArg,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SimProtocolArg {
    #[value(name = "openai")]
    OpenAi,
    Anthropic,
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
        #[command(flatten)]
        sync: SyncArgs,
    },
    /// Revoke a key; gateways stop accepting it at their next reload.
    Revoke {
        /// The database the gateway reads keys from.
        #[arg(long, env = "MERIDIAN_POSTGRES_URL")]
        postgres_url: String,
        /// The key (`mk-...`).
        key: String,
        #[command(flatten)]
        sync: SyncArgs,
    },
}

#[derive(clap::Args)]
struct SyncArgs {
    /// Return only once another region has applied the change (it then
    /// survives the loss of this region); fails if none does in time.
    #[arg(long)]
    sync: bool,
    /// How long `--sync` waits for a peer region, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    sync_timeout_ms: u64,
}

impl SyncArgs {
    async fn wait(&self, pool: &sqlx::PgPool) -> anyhow::Result<()> {
        if self.sync {
            let timeout = std::time::Duration::from_millis(self.sync_timeout_ms);
            meridian_regional::tenancy::wait_replicated(pool, timeout).await?;
        }
        Ok(())
    }
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

/// Logs to stderr, filtered by `MERIDIAN_LOG`; one JSON object per line
/// when `MERIDIAN_LOG_FORMAT=json`, each listing its spans' fields, so a
/// line written while serving a traced request carries its `trace_id`.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MERIDIAN_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,pingora_core=warn,pingora_proxy=warn,sqlx=warn")
    });
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("MERIDIAN_LOG_FORMAT").is_ok_and(|f| f == "json") {
        logs.json().init();
    } else {
        logs.init();
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up(args) => runtime()?.block_on(up::run(args)),
        Command::Regional { config, pid_file } => regional::run(&config, pid_file),
        Command::Keys(keys) => runtime()?.block_on(manage_keys(keys)),
        Command::Tenants(command) => runtime()?.block_on(manage::tenants(command)),
        Command::Audit(args) => runtime()?.block_on(manage::audit(args)),
        Command::Routes(command) => runtime()?.block_on(operate::routes(command)),
        Command::Regions(command) => runtime()?.block_on(operate::regions(command)),
        Command::Prices(command) => runtime()?.block_on(operate::prices(command)),
        Command::Usage(args) => runtime()?.block_on(operate::usage(args)),
        Command::OperatorTokens(command) => runtime()?.block_on(operate::operator_tokens(command)),
        Command::Certs(args) => certs::run(args),
        Command::Sim(args) => runtime()?.block_on(sim(args)),
        Command::Gateway { config } => {
            let config = meridian_gateway::Config::from_file(&config)?;
            let runtime = runtime()?;
            let stop = {
                let _context = runtime.enter();
                shutdown_signal()?
            };
            let gateway = meridian_gateway::Gateway::start(config)?;
            runtime.block_on(stop);
            gateway.shutdown();
            Ok(())
        }
    }
}

async fn sim(args: SimArgs) -> anyhow::Result<()> {
    let mut config = meridian_regional::SimConfig::default();
    let set = |field: &mut u64, value: Option<u64>| *field = value.unwrap_or(*field);
    set(&mut config.ttft_ms, args.ttft_ms);
    set(&mut config.per_token_ms, args.per_token_ms);
    set(&mut config.prefill_us_per_token, args.prefill_us_per_token);
    config.max_concurrency = args
        .max_concurrency
        .unwrap_or(config.max_concurrency)
        .max(1);
    config.prefix_cache_blocks = args
        .prefix_cache_blocks
        .unwrap_or(config.prefix_cache_blocks);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let tracing = meridian_mesh::TraceConfig {
        otlp_endpoint: args.otlp_endpoint,
        ..Default::default()
    };
    let tracer = meridian_mesh::Tracer::start(&tracing, "meridian-sim", vec![])
        .map_err(anyhow::Error::msg)?;
    let stop = shutdown_signal()?;
    eprintln!("simulated LLM on http://{}/v1", listener.local_addr()?);
    let protocol = match args.protocol {
        SimProtocolArg::OpenAi => meridian_regional::SimProtocol::OpenAi,
        SimProtocolArg::Anthropic => meridian_regional::SimProtocol::Anthropic,
    };
    meridian_regional::serve_sim_as(protocol, config, listener, stop, tracer.clone(), Vec::new())
        .await?;
    tokio::task::spawn_blocking(move || tracer.shutdown()).await?;
    Ok(())
}

async fn manage_keys(keys: Keys) -> anyhow::Result<()> {
    use meridian_regional::tenancy;
    match keys {
        Keys::Create {
            postgres_url,
            tenant,
            rps,
            tpm,
            sync,
        } => {
            let pool = tenancy::connect(&postgres_url).await?;
            let limits = tenancy::TenantLimits {
                requests_per_second: rps,
                tokens_per_minute: tpm,
            };
            tenancy::create_tenant(&pool, &tenant, limits).await?;
            // Printed before the wait: the key exists whatever the wait
            // says, and is shown only this once.
            println!("{}", tenancy::create_api_key(&pool, &tenant).await?);
            sync.wait(&pool).await?;
        }
        Keys::Revoke {
            postgres_url,
            key,
            sync,
        } => {
            let pool = tenancy::connect(&postgres_url).await?;
            if !tenancy::revoke_api_key(&pool, &key).await? {
                anyhow::bail!("no live key matches (unknown, or revoked already)");
            }
            sync.wait(&pool).await?;
            eprintln!("revoked");
        }
    }
    Ok(())
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Takes over SIGINT (Ctrl-C) and SIGTERM at once and resolves on the first
/// of them. Call it before saying the process is ready: until a handler is
/// in place, a SIGTERM kills the process on the spot, so one sent right
/// after the ready line (by `meridian up`, systemd, Kubernetes) would skip
/// the graceful stop. Needs a runtime context, as tokio's signals do.
pub(crate) fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutdown requested");
    })
}

#[cfg(test)]
mod tests {
    /// clap checks a command's arguments only when it is parsed: this
    /// checks every subcommand's at once (a positional named like a flag
    /// of `--region`'s group, a repeated short).
    #[test]
    fn every_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
