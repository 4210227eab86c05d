//! One SRV resolution with hickory-resolver: the SRV records, then each
//! target's addresses, reduced to nodes and the TTL they may be kept for.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::{ResolveError, TokioResolver};

use super::{Answer, DiscoveryConfig, DiscoveryError, SrvNode};

/// A DNS resolver for SRV names, shared by every [`super::SrvWatch`] that
/// uses the same name servers. Its cache honours TTLs, so targets shared by
/// several names are asked for once per TTL.
#[derive(Debug)]
pub struct SrvResolver {
    resolver: TokioResolver,
    config: DiscoveryConfig,
}

impl SrvResolver {
    /// A resolver for `config`; reads `/etc/resolv.conf` when no name
    /// servers are given. Needs no runtime until the first query.
    pub fn new(config: DiscoveryConfig) -> Result<Self, DiscoveryError> {
        let (resolver_config, mut options) = if config.nameservers.is_empty() {
            hickory_resolver::system_conf::read_system_conf()
                .map_err(|e| DiscoveryError(format!("system resolver config: {e}")))?
        } else {
            let mut c = ResolverConfig::new();
            for ns in &config.nameservers {
                // UDP first; TCP when an answer is truncated (many nodes).
                c.add_name_server(NameServerConfig::new(*ns, Protocol::Udp));
                c.add_name_server(NameServerConfig::new(*ns, Protocol::Tcp));
            }
            (c, Default::default())
        };
        options.timeout = config.timeout;
        let resolver =
            TokioResolver::builder_with_config(resolver_config, TokioConnectionProvider::default())
                .with_options(options)
                .build();
        Ok(Self { resolver, config })
    }

    /// The configuration this resolver was made with.
    pub fn config(&self) -> &DiscoveryConfig {
        &self.config
    }

    /// Resolves `name` (fully qualified) to its nodes.
    pub async fn resolve(&self, name: &str) -> Result<Answer, DiscoveryError> {
        let srv = match self.resolver.srv_lookup(name).await {
            Ok(srv) => srv,
            Err(e) => {
                return match authoritative_absence(&e) {
                    Some(ttl) => Ok(Answer {
                        nodes: Vec::new(),
                        ttl,
                    }),
                    None => Err(DiscoveryError(format!("srv {name}: {e}"))),
                };
            }
        };
        let now = Instant::now();
        let mut ttl = srv.as_lookup().valid_until().saturating_duration_since(now);
        let mut nodes = Vec::new();
        for record in srv.iter() {
            let target = record.target();
            let ips = match self.resolver.lookup_ip(target.clone()).await {
                Ok(ips) => ips,
                Err(e) => match authoritative_absence(&e) {
                    // A record pointing at a name that does not exist is an
                    // operator's mistake, not a DNS outage: that target
                    // contributes no node, the others stand.
                    Some(negative) => {
                        tracing::warn!(name, target = %target, "srv target has no address");
                        ttl = ttl.min(negative);
                        continue;
                    }
                    None => return Err(DiscoveryError(format!("address of {target}: {e}"))),
                },
            };
            ttl = ttl.min(ips.valid_until().saturating_duration_since(now));
            for ip in ips.iter() {
                nodes.push(SrvNode {
                    priority: record.priority(),
                    weight: record.weight(),
                    addr: SocketAddr::new(ip, record.port()),
                });
            }
        }
        nodes.sort();
        nodes.dedup_by_key(|n| n.addr);
        Ok(Answer { nodes, ttl })
    }
}

/// The negative TTL when `e` says the name has no such records and the answer
/// carries the zone's SOA (RFC 2308): what an authoritative server, or a
/// resolver relaying one, says when the records are really gone. Anything
/// else (timeouts, SERVFAIL, REFUSED, a bare empty answer) is a failure.
fn authoritative_absence(e: &ResolveError) -> Option<Duration> {
    match e.proto()?.kind() {
        ProtoErrorKind::NoRecordsFound {
            soa: Some(_),
            negative_ttl,
            response_code: ResponseCode::NXDomain | ResponseCode::NoError,
            ..
        } => Some(Duration::from_secs(u64::from(negative_ttl.unwrap_or(0)))),
        _ => None,
    }
}
