//! `meridian routes|regions|prices|usage`: clients of a region's
//! management API for model routes, region controls, prices and spend,
//! with the same connection options and output as `meridian tenants`.

use std::collections::BTreeMap;

use anyhow::Context;
use meridian_proto::v1 as pb;
use serde_json::{Value, json};

use crate::manage::{ApiArgs, refused, table, time};

#[derive(clap::Subcommand)]
pub(crate) enum Routes {
    /// Set a route for every region: a name that routes to models by
    /// weight (`--weight`) or by size (`--small` and `--large`).
    Put {
        /// The name clients send, e.g. `assistant`.
        id: String,
        /// `MODEL=WEIGHT`, repeat to split traffic.
        #[arg(long = "weight", value_parser = weight)]
        weights: Vec<(String, u32)>,
        /// Model for simple requests (with `--large`).
        #[arg(long)]
        small: Option<String>,
        /// Model for long prompts and tools (with `--small`).
        #[arg(long)]
        large: Option<String>,
        /// Prompts of more tokens than this go to `--large` (default 512).
        #[arg(long)]
        large_above: Option<u32>,
        /// A model to try when the chosen one fails (repeat, in order).
        #[arg(long = "fallback")]
        fallbacks: Vec<String>,
        /// A model to try when the request does not fit the chosen one's
        /// context window (repeat, in order).
        #[arg(long = "context-fallback")]
        context_fallbacks: Vec<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The region's routes, their source (api, config) and whether it
    /// serves each.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Remove a route set through the API, in every region.
    Delete {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

fn weight(text: &str) -> Result<(String, u32), String> {
    let (model, weight) = text
        .rsplit_once('=')
        .ok_or_else(|| format!("{text:?} is not MODEL=WEIGHT"))?;
    let weight = weight
        .parse()
        .map_err(|_| format!("{weight:?} is not a whole number"))?;
    Ok((model.to_string(), weight))
}

#[derive(clap::Subcommand)]
pub(crate) enum Regions {
    /// Stop every gateway sending the region new work while another region
    /// can take it.
    Drain {
        #[arg(value_name = "REGION")]
        name: String,
        /// Why, for the next operator.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Let gateways send the region work again.
    Undrain {
        #[arg(value_name = "REGION")]
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The share of traffic, 0 to 100, the region takes of the requests it
    /// would come first for.
    Weight {
        #[arg(value_name = "REGION")]
        name: String,
        weight: u32,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The regions with an operator's control.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(clap::Subcommand)]
pub(crate) enum Prices {
    /// Set a model's price for every region, in US dollars per million
    /// tokens.
    Put {
        model: String,
        #[arg(long)]
        input: f64,
        #[arg(long)]
        output: f64,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The prices the region charges and their source (api, config).
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// Spend by day, tenant, region, model and key, summed over every region.
#[derive(clap::Args)]
pub(crate) struct UsageArgs {
    /// One tenant (default: all).
    #[arg(long)]
    tenant: Option<String>,
    /// First day, YYYY-MM-DD (default: the first of this month).
    #[arg(long)]
    start: Option<String>,
    /// Last day, YYYY-MM-DD (default: today).
    #[arg(long)]
    end: Option<String>,
    #[command(flatten)]
    api: ApiArgs,
}

fn route_json(s: &pb::RouteStatus) -> Value {
    let r = s.route.clone().unwrap_or_default();
    json!({ "id": r.id, "source": s.source, "applied": s.applied,
        "problem": Some(&s.problem).filter(|p| !p.is_empty()),
        "small": r.small, "large": r.large,
        "large_above_prompt_tokens": r.large_above_prompt_tokens,
        "weights": r.weights.iter().collect::<BTreeMap<_, _>>(),
        "fallbacks": r.fallbacks, "context_fallbacks": r.context_fallbacks })
}

fn print_routes(routes: &[pb::RouteStatus]) {
    let rows = routes.iter().map(|s| {
        let r = s.route.clone().unwrap_or_default();
        let to = match (&r.small, &r.large) {
            (Some(small), Some(large)) => {
                format!("{small} | {large} above {}", r.large_above_prompt_tokens)
            }
            _ => r
                .weights
                .iter()
                .collect::<BTreeMap<_, _>>()
                .iter()
                .map(|(m, w)| format!("{m}={w}"))
                .collect::<Vec<_>>()
                .join(" "),
        };
        let served = if s.applied {
            "yes".to_string()
        } else {
            format!("no: {}", s.problem)
        };
        vec![r.id, s.source.clone(), to, r.fallbacks.join(" "), served]
    });
    table(&["ID", "SOURCE", "TO", "FALLBACKS", "SERVED HERE"], rows);
}

pub(crate) async fn routes(command: Routes) -> anyhow::Result<()> {
    match command {
        Routes::Put {
            id,
            weights,
            small,
            large,
            large_above,
            fallbacks,
            context_fallbacks,
            api,
        } => {
            let request = api.request(pb::PutRouteRequest {
                route: Some(pb::Route {
                    id,
                    small,
                    large,
                    large_above_prompt_tokens: large_above.unwrap_or(0),
                    weights: weights.into_iter().collect(),
                    fallbacks,
                    context_fallbacks,
                }),
            });
            let put = api
                .client()
                .await?
                .put_route(request)
                .await
                .map_err(refused)?
                .into_inner();
            let route = put.route.unwrap_or_default();
            if api.json {
                println!(
                    "{}",
                    json!({ "created": put.created, "route": route_json(&route) })
                );
            } else {
                eprintln!("{}", if put.created { "created" } else { "updated" });
                print_routes(&[route]);
            }
        }
        Routes::List { api } => {
            let list = api
                .client()
                .await?
                .list_routes(pb::ListRoutesRequest {})
                .await
                .map_err(refused)?
                .into_inner();
            if api.json {
                let data: Vec<Value> = list.routes.iter().map(route_json).collect();
                println!("{}", json!({ "data": data }));
            } else {
                print_routes(&list.routes);
            }
        }
        Routes::Delete { id, api } => {
            let request = api.request(pb::DeleteRouteRequest { id: id.clone() });
            api.client()
                .await?
                .delete_route(request)
                .await
                .map_err(refused)?;
            if api.json {
                println!("{}", json!({ "id": id, "deleted": true }));
            } else {
                eprintln!("deleted {id}");
            }
        }
    }
    Ok(())
}

fn control_json(c: &pb::RegionControl) -> Value {
    json!({ "region": c.region, "drained": c.drained, "weight": c.weight,
        "reason": c.reason, "updated_at": time(c.updated_at.as_ref()) })
}

fn print_controls(controls: &[pb::RegionControl]) {
    let rows = controls.iter().map(|c| {
        vec![
            c.region.clone(),
            if c.drained { "drained" } else { "serving" }.to_string(),
            c.weight.to_string(),
            c.reason.clone(),
            time(c.updated_at.as_ref()),
        ]
    });
    table(&["REGION", "STATE", "WEIGHT", "REASON", "SINCE"], rows);
}

pub(crate) async fn regions(command: Regions) -> anyhow::Result<()> {
    let (api, request) = match command {
        Regions::List { api } => {
            let list = api
                .client()
                .await?
                .list_region_controls(pb::ListRegionControlsRequest {})
                .await
                .map_err(refused)?
                .into_inner();
            if api.json {
                let data: Vec<Value> = list.controls.iter().map(control_json).collect();
                println!("{}", json!({ "data": data }));
            } else {
                print_controls(&list.controls);
            }
            return Ok(());
        }
        Regions::Drain { name, reason, api } => (
            api,
            pb::ControlRegionRequest {
                region: name,
                drained: Some(true),
                weight: None,
                reason,
            },
        ),
        Regions::Undrain { name, api } => (
            api,
            pb::ControlRegionRequest {
                region: name,
                drained: Some(false),
                weight: None,
                reason: Some(String::new()),
            },
        ),
        Regions::Weight { name, weight, api } => (
            api,
            pb::ControlRegionRequest {
                region: name,
                drained: None,
                weight: Some(weight),
                reason: None,
            },
        ),
    };
    let control = api
        .client()
        .await?
        .control_region(api.request(request))
        .await
        .map_err(refused)?
        .into_inner();
    if api.json {
        println!("{}", control_json(&control));
    } else {
        print_controls(&[control]);
    }
    Ok(())
}

pub(crate) async fn prices(command: Prices) -> anyhow::Result<()> {
    let (api, prices) = match command {
        Prices::Put {
            model,
            input,
            output,
            api,
        } => {
            let request = api.request(pb::PutPriceRequest {
                model,
                input_per_million: input,
                output_per_million: output,
            });
            let price = api
                .client()
                .await?
                .put_price(request)
                .await
                .map_err(refused)?
                .into_inner();
            (api, vec![price])
        }
        Prices::List { api } => {
            let list = api
                .client()
                .await?
                .list_prices(pb::ListPricesRequest {})
                .await
                .map_err(refused)?
                .into_inner();
            (api, list.prices)
        }
    };
    if api.json {
        let data: Vec<Value> = prices
            .iter()
            .map(|p| {
                json!({ "model": p.model, "input_per_million": p.input_per_million,
                    "output_per_million": p.output_per_million, "source": p.source })
            })
            .collect();
        println!("{}", json!({ "data": data }));
    } else {
        let rows = prices.iter().map(|p| {
            vec![
                p.model.clone(),
                format!("{}", p.input_per_million),
                format!("{}", p.output_per_million),
                p.source.clone(),
            ]
        });
        table(&["MODEL", "INPUT $/M", "OUTPUT $/M", "SOURCE"], rows);
    }
    Ok(())
}

pub(crate) async fn usage(args: UsageArgs) -> anyhow::Result<()> {
    let report = args
        .api
        .client()
        .await
        .context("connecting to the region")?
        .get_usage(pb::GetUsageRequest {
            tenant: args.tenant.unwrap_or_default(),
            start: args.start.unwrap_or_default(),
            end: args.end.unwrap_or_default(),
        })
        .await
        .map_err(refused)?
        .into_inner();
    if args.api.json {
        let data: Vec<Value> = report
            .lines
            .iter()
            .map(|l| {
                json!({ "tenant": l.tenant, "day": l.day, "region": l.region,
                    "model": l.model, "requests": l.requests, "input_tokens": l.input_tokens,
                    "output_tokens": l.output_tokens, "cost_usd": l.cost_usd,
                    "key_id": Some(&l.key_id).filter(|k| !k.is_empty()) })
            })
            .collect();
        println!("{}", json!({ "data": data, "truncated": report.truncated }));
        return Ok(());
    }
    let rows = report.lines.iter().map(|l| {
        vec![
            l.day.clone(),
            l.tenant.clone(),
            l.region.clone(),
            l.model.clone(),
            l.requests.to_string(),
            l.input_tokens.to_string(),
            l.output_tokens.to_string(),
            format!("{:.6}", l.cost_usd),
            if l.key_id.is_empty() {
                "-".to_string()
            } else {
                l.key_id.clone()
            },
        ]
    });
    table(
        &[
            "DAY", "TENANT", "REGION", "MODEL", "REQUESTS", "INPUT", "OUTPUT", "USD", "KEY",
        ],
        rows,
    );
    if report.truncated {
        eprintln!("(the first 10000 lines: narrow --start/--end or --tenant)");
    }
    Ok(())
}

#[derive(clap::Subcommand)]
pub(crate) enum OperatorTokens {
    /// Make a bearer token for the management API; prints it, shown only
    /// this once.
    Create {
        /// Who or what holds it (the audit log names it).
        name: String,
        /// `admin` or `read-only`.
        #[arg(long, default_value = "read-only")]
        role: String,
        /// When it stops working, RFC 3339 (default: never).
        #[arg(long)]
        expires_at: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Every token (ids and prefixes, never the tokens).
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Revoke a token in every region.
    Revoke {
        /// Token id (from `create` or `list`).
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

fn token_json(t: &pb::OperatorToken) -> Value {
    json!({ "id": t.id, "name": t.name, "role": t.role, "prefix": t.prefix,
        "created_at": time(t.created_at.as_ref()), "expires_at": time(t.expires_at.as_ref()),
        "revoked_at": time(t.revoked_at.as_ref()) })
}

fn print_tokens(tokens: &[pb::OperatorToken]) {
    let rows = tokens.iter().map(|t| {
        vec![
            t.id.clone(),
            t.name.clone(),
            t.role.clone(),
            t.prefix.clone(),
            time(t.expires_at.as_ref()),
            time(t.revoked_at.as_ref()),
        ]
    });
    table(
        &["ID", "NAME", "ROLE", "PREFIX", "EXPIRES", "REVOKED"],
        rows,
    );
}

pub(crate) async fn operator_tokens(command: OperatorTokens) -> anyhow::Result<()> {
    match command {
        OperatorTokens::Create {
            name,
            role,
            expires_at,
            api,
        } => {
            let expires_at = expires_at
                .map(|at| {
                    chrono::DateTime::parse_from_rfc3339(&at)
                        .with_context(|| format!("--expires-at {at:?} is not RFC 3339"))
                        .map(|t| prost_types::Timestamp {
                            seconds: t.timestamp(),
                            nanos: 0,
                        })
                })
                .transpose()?;
            let made = api
                .client()
                .await?
                .create_operator_token(api.request(pb::CreateOperatorTokenRequest {
                    name,
                    role,
                    expires_at,
                }))
                .await
                .map_err(refused)?
                .into_inner();
            let token = made.token.unwrap_or_default();
            if api.json {
                let mut out = token_json(&token);
                out["token"] = Value::String(made.secret);
                println!("{out}");
            } else {
                println!("{}", made.secret);
                eprintln!(
                    "token {} ({}, {}): shown only this once; send it as \
                     `Authorization: Bearer <token>`",
                    token.id, token.name, token.role
                );
            }
        }
        OperatorTokens::List { api } => {
            let list = api
                .client()
                .await?
                .list_operator_tokens(pb::ListOperatorTokensRequest {})
                .await
                .map_err(refused)?
                .into_inner();
            if api.json {
                let data: Vec<Value> = list.tokens.iter().map(token_json).collect();
                println!("{}", json!({ "data": data }));
            } else {
                print_tokens(&list.tokens);
            }
        }
        OperatorTokens::Revoke { id, api } => {
            let token = api
                .client()
                .await?
                .revoke_operator_token(api.request(pb::RevokeOperatorTokenRequest { id }))
                .await
                .map_err(refused)?
                .into_inner();
            if api.json {
                println!("{}", token_json(&token));
            } else {
                print_tokens(&[token]);
            }
        }
    }
    Ok(())
}
