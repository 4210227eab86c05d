//! A real DNS server in the test process: hickory-server answering for one
//! zone from memory, on a free loopback port over UDP and TCP, whose SRV
//! records a test changes while traffic flows.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use hickory_server::ServerFuture;
use hickory_server::authority::{AuthorityObject, Catalog, ZoneType};
use hickory_server::proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType, RrKey};
use hickory_server::store::in_memory::InMemoryAuthority;

/// One SRV record: a node's host name (in the zone), its address (the A or
/// AAAA record of that name) and the SRV priority and weight.
#[derive(Debug, Clone)]
pub struct SrvTarget {
    /// Fully qualified host name, e.g. `n1.us-east.meridian.test.`.
    pub host: String,
    /// The host's address and the SRV port.
    pub addr: SocketAddr,
    /// SRV priority (lower first).
    pub priority: u16,
    /// SRV weight.
    pub weight: u16,
}

impl SrvTarget {
    /// A target of priority 0 and weight 1.
    pub fn new(host: &str, addr: SocketAddr) -> Self {
        Self {
            host: host.to_string(),
            addr,
            priority: 0,
            weight: 1,
        }
    }
}

/// An authoritative DNS server for one zone.
pub struct TestDns {
    addr: SocketAddr,
    origin: Name,
    authority: Arc<InMemoryAuthority>,
    server: Option<ServerFuture<Catalog>>,
    serial: AtomicU32,
}

/// TTL of the records other than SRV, which tests choose.
const HOST_TTL: u32 = 60;

impl TestDns {
    /// Serves `zone` (e.g. `meridian.test.`), empty but for its SOA, on a
    /// free loopback port (the same one for UDP and TCP). Negative answers
    /// may be cached for `negative_ttl` seconds (the SOA minimum).
    pub async fn start(zone: &str, negative_ttl: u32) -> Self {
        let origin = Name::from_ascii(zone).expect("a valid zone name");
        let authority = Arc::new(InMemoryAuthority::empty(
            origin.clone(),
            ZoneType::Primary,
            false,
        ));
        let soa = SOA::new(
            Name::from_ascii(format!("ns.{zone}")).expect("a valid name"),
            Name::from_ascii(format!("hostmaster.{zone}")).expect("a valid name"),
            1,
            60,
            60,
            600,
            negative_ttl,
        );
        authority
            .upsert(
                Record::from_rdata(origin.clone(), negative_ttl, RData::SOA(soa)),
                1,
            )
            .await;
        let (server, addr) = serve(&origin, &authority, None).await;
        Self {
            addr,
            origin,
            authority,
            server: Some(server),
            serial: AtomicU32::new(1),
        }
    }

    /// Where the server listens (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the SRV records of `name` with `targets`, each with `ttl`
    /// seconds, and gives each target host its address record. An empty
    /// list removes the name: queries for it then get an authoritative
    /// negative answer.
    pub async fn set_srv(&self, name: &str, ttl: u32, targets: &[SrvTarget]) {
        let name = Name::from_ascii(name).expect("a valid SRV name");
        let serial = self.serial.fetch_add(1, Ordering::Relaxed) + 1;
        self.authority
            .records_mut()
            .await
            .remove(&RrKey::new(LowerName::new(&name), RecordType::SRV));
        for t in targets {
            let host = Name::from_ascii(&t.host).expect("a valid host name");
            assert!(self.origin.zone_of(&host), "{} is outside the zone", t.host);
            let address = match t.addr.ip() {
                IpAddr::V4(ip) => RData::A(A(ip)),
                IpAddr::V6(ip) => RData::AAAA(AAAA(ip)),
            };
            self.authority
                .upsert(Record::from_rdata(host.clone(), HOST_TTL, address), serial)
                .await;
            let srv = SRV::new(t.priority, t.weight, t.addr.port(), host);
            self.authority
                .upsert(
                    Record::from_rdata(name.clone(), ttl, RData::SRV(srv)),
                    serial,
                )
                .await;
        }
    }

    /// Stops answering (a DNS outage); [`TestDns::restart`] serves the same
    /// zone again on the same port.
    pub async fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.shutdown_gracefully().await;
        }
    }

    /// Serves again after [`TestDns::stop`].
    pub async fn restart(&mut self) {
        assert!(self.server.is_none(), "the DNS server runs");
        let (server, _) = serve(&self.origin, &self.authority, Some(self.addr)).await;
        self.server = Some(server);
    }
}

/// Binds UDP and TCP on one port (`at`, or a free one) and serves the zone.
async fn serve(
    origin: &Name,
    authority: &Arc<InMemoryAuthority>,
    at: Option<SocketAddr>,
) -> (ServerFuture<Catalog>, SocketAddr) {
    let mut catalog = Catalog::new();
    catalog.upsert(
        LowerName::new(origin),
        vec![authority.clone() as Arc<dyn AuthorityObject>],
    );
    let mut server = ServerFuture::new(catalog);
    // A free UDP port may be taken for TCP by another test: try a few.
    for _ in 0..20 {
        let udp = tokio::net::UdpSocket::bind(at.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))))
            .await
            .expect("a UDP socket on loopback");
        let addr = udp.local_addr().expect("a bound socket has an address");
        if let Ok(tcp) = tokio::net::TcpListener::bind(addr).await {
            server.register_socket(udp);
            server.register_listener(tcp, Duration::from_secs(5));
            return (server, addr);
        }
    }
    panic!("no loopback port free for both UDP and TCP");
}
