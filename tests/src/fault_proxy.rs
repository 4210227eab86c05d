//! A TCP fault proxy: one loopback listener that forwards every connection
//! to a target, with faults a test turns on and off while connections live.
//!
//! The two directions of a link are named after who connects: `A` is the
//! client (the side that connects to the proxy), `B` the target. Controls:
//!
//! - [`FaultProxy::delay`]: every chunk read in that direction is written
//!   that much later (pipelined, so it adds latency, not a throughput cap).
//! - [`FaultProxy::drop_rate`]: TCP cannot lose bytes without corrupting the
//!   stream it carries, so a "drop" here is a lost connection: each new
//!   connection, and each chunk read on a live one, resets the connection
//!   (RST both ways, `SO_LINGER` 0) with this probability. What is in flight
//!   is lost and the client reconnects, which is what a real loss costs a
//!   stream protocol once its retransmits give up.
//! - [`FaultProxy::cut`]: one direction stops: nothing more is read from or
//!   written to that side, so the sender's socket buffers fill and live
//!   connections stall (a one-way black hole); the other direction flows.
//!   Nothing is lost: on heal, what waited is delivered in order, as TCP's
//!   retransmits would deliver it.
//! - [`FaultProxy::cut_all`]: live connections are reset and new ones are
//!   reset as soon as they are accepted (the client sees its connection
//!   refused or reset), until heal.
//! - [`FaultProxy::heal`]: every fault off at once; stalled data flows on.
//!
//! Randomness comes from one `StdRng` per proxy, seeded by the caller: each
//! accepted connection takes a seed from it, and each direction of a
//! connection a generator from that. A seed therefore replays the same
//! decisions for the same sequence of connections and chunks; how the OS
//! splits a stream into chunks and which connection comes first is timing,
//! which no seed fixes.
//!
//! The proxy runs on the runtime that started it and stops, closing its
//! connections, when dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// One direction of a proxied link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client (the side that connects) to the target.
    AtoB,
    /// From the target back to the client.
    BtoA,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Self::AtoB => 0,
            Self::BtoA => 1,
        }
    }
}

/// The faults in force; every connection watches them.
#[derive(Debug, Clone, Default)]
struct Faults {
    delay: [Duration; 2],
    drop_rate: f64,
    cut: [bool; 2],
    cut_all: bool,
    /// Bumped by `cut_all`: connections accepted before are reset.
    epoch: u64,
}

/// What a proxy did, for tests to check that a fault really happened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted and forwarded.
    pub connections: u64,
    /// Connections reset on accept because everything was cut.
    pub refused: u64,
    /// Connections reset by the drop rate (on accept or mid-stream).
    pub dropped: u64,
    /// Connections reset by `cut_all`.
    pub cut: u64,
    /// Bytes delivered from A to B.
    pub bytes_a_to_b: u64,
    /// Bytes delivered from B to A.
    pub bytes_b_to_a: u64,
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    refused: AtomicU64,
    dropped: AtomicU64,
    cut: AtomicU64,
    bytes: [AtomicU64; 2],
}

/// A TCP proxy on `127.0.0.1` with faults the test controls; see the
/// module's documentation.
pub struct FaultProxy {
    addr: SocketAddr,
    target: SocketAddr,
    faults: watch::Sender<Faults>,
    counters: Arc<Counters>,
    accept: JoinHandle<()>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("target", &self.target)
            .field("faults", &*self.faults.borrow())
            .finish()
    }
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `target`, with no
    /// faults until the test sets some; `seed` drives the drop decisions.
    pub async fn start(target: SocketAddr, seed: u64) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (faults, watching) = watch::channel(Faults::default());
        let counters = Arc::new(Counters::default());
        let accept = tokio::spawn(accept_loop(
            listener,
            target,
            watching,
            StdRng::seed_from_u64(seed),
            counters.clone(),
        ));
        Ok(Self {
            addr,
            target,
            faults,
            counters,
            accept,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where connections are forwarded.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Delays every chunk in `direction` by `delay` (zero: none).
    pub fn delay(&self, direction: Direction, delay: Duration) {
        self.faults
            .send_modify(|f| f.delay[direction.index()] = delay);
    }

    /// Resets each new connection, and a live one at each chunk it carries,
    /// with probability `rate` (0 to 1).
    pub fn drop_rate(&self, rate: f64) {
        assert!((0.0..=1.0).contains(&rate), "a drop rate is 0 to 1");
        self.faults.send_modify(|f| f.drop_rate = rate);
    }

    /// Stops forwarding in `direction`: live connections stall that way.
    pub fn cut(&self, direction: Direction) {
        self.faults.send_modify(|f| f.cut[direction.index()] = true);
    }

    /// Resets every live connection and every new one until [`heal`].
    ///
    /// [`heal`]: FaultProxy::heal
    pub fn cut_all(&self) {
        self.faults.send_modify(|f| {
            f.cut_all = true;
            f.epoch += 1;
        });
    }

    /// Turns every fault off; what stalled flows on.
    pub fn heal(&self) {
        self.faults.send_modify(|f| {
            *f = Faults {
                epoch: f.epoch,
                ..Faults::default()
            };
        });
    }

    /// What the proxy did so far.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.counters;
        ProxyStats {
            connections: c.connections.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            cut: c.cut.load(Ordering::Relaxed),
            bytes_a_to_b: c.bytes[0].load(Ordering::Relaxed),
            bytes_b_to_a: c.bytes[1].load(Ordering::Relaxed),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Connections end when the faults' sender goes (see `serve`).
        self.accept.abort();
    }
}

/// Closes with RST rather than FIN: the peer sees a reset connection.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    faults: watch::Receiver<Faults>,
    mut rng: StdRng,
    counters: Arc<Counters>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors and the like: try again shortly.
                tracing::warn!(error = %e, "fault proxy cannot accept");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let now = faults.borrow().clone();
        // Drawn for every connection, so the sequence of seeds does not
        // depend on which faults were on.
        let mut conn_rng = StdRng::seed_from_u64(rng.random());
        if now.cut_all {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            reset(stream);
            continue;
        }
        if now.drop_rate > 0.0 && conn_rng.random_bool(now.drop_rate) {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            reset(stream);
            continue;
        }
        counters.connections.fetch_add(1, Ordering::Relaxed);
        let rngs = [
            StdRng::seed_from_u64(conn_rng.random()),
            StdRng::seed_from_u64(conn_rng.random()),
        ];
        tokio::spawn(serve(
            stream,
            target,
            faults.clone(),
            rngs,
            counters.clone(),
            now.epoch,
        ));
    }
}

/// Why a connection ended.
enum End {
    /// Both directions finished (EOF forwarded both ways).
    Done,
    /// A side failed, or the drop rate or `cut_all` hit: reset both sides.
    Reset,
}

/// A chunk on its way through one direction.
enum Chunk {
    /// Bytes, and when they may be written.
    Data(Instant, Vec<u8>),
    /// The sender finished: shut the other side's write half.
    Eof,
}

const CHUNK: usize = 16 * 1024;
/// Chunks in flight per direction: bounds memory and keeps backpressure.
const QUEUE: usize = 64;

async fn serve(
    mut a: TcpStream,
    target: SocketAddr,
    faults: watch::Receiver<Faults>,
    [rng_ab, rng_ba]: [StdRng; 2],
    counters: Arc<Counters>,
    epoch: u64,
) {
    let b = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(target)).await;
    let Ok(Ok(mut b)) = b else {
        tracing::debug!(%target, "fault proxy cannot reach its target");
        reset(a);
        return;
    };
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    let end = {
        let (ar, aw) = a.split();
        let (br, bw) = b.split();
        let (tx_ab, rx_ab) = mpsc::channel(QUEUE);
        let (tx_ba, rx_ba) = mpsc::channel(QUEUE);
        let both = async {
            tokio::try_join!(
                read_side(
                    Direction::AtoB,
                    ar,
                    tx_ab,
                    faults.clone(),
                    epoch,
                    rng_ab,
                    &counters
                ),
                write_side(Direction::AtoB, bw, rx_ab, faults.clone(), epoch, &counters),
                read_side(
                    Direction::BtoA,
                    br,
                    tx_ba,
                    faults.clone(),
                    epoch,
                    rng_ba,
                    &counters
                ),
                write_side(Direction::BtoA, aw, rx_ba, faults.clone(), epoch, &counters),
            )
        };
        let mut watching = faults.clone();
        // Also ends when the proxy is dropped (the sender goes).
        let cut = watching.wait_for(|f| f.epoch != epoch);
        tokio::select! {
            r = both => match r {
                Ok(_) => End::Done,
                Err(()) => End::Reset,
            },
            r = cut => {
                if r.is_ok() {
                    counters.cut.fetch_add(1, Ordering::Relaxed);
                }
                End::Reset
            }
        }
    };
    if matches!(end, End::Reset) {
        reset(a);
        reset(b);
    }
}

/// Waits until `direction` is not cut; `Err` when the proxy is gone. After
/// a `cut_all` (a new epoch) it never returns: nothing more crosses, and
/// `serve` resets the connection.
async fn open(
    faults: &mut watch::Receiver<Faults>,
    direction: Direction,
    epoch: u64,
) -> Result<(), ()> {
    faults
        .wait_for(|f| !f.cut[direction.index()] && f.epoch == epoch)
        .await
        .map(|_| ())
        .map_err(|_| ())
}

async fn read_side(
    direction: Direction,
    mut from: ReadHalf<'_>,
    to: mpsc::Sender<Chunk>,
    mut faults: watch::Receiver<Faults>,
    epoch: u64,
    mut rng: StdRng,
    counters: &Counters,
) -> Result<(), ()> {
    let mut buf = vec![0; CHUNK];
    loop {
        open(&mut faults, direction, epoch).await?;
        let n = from.read(&mut buf).await.map_err(|_| ())?;
        if n == 0 {
            return to.send(Chunk::Eof).await.map_err(|_| ());
        }
        let (delay, rate) = {
            let f = faults.borrow();
            (f.delay[direction.index()], f.drop_rate)
        };
        if rate > 0.0 && rng.random_bool(rate) {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(?direction, "fault proxy drops a connection");
            return Err(());
        }
        to.send(Chunk::Data(Instant::now() + delay, buf[..n].to_vec()))
            .await
            .map_err(|_| ())?;
    }
}

async fn write_side(
    direction: Direction,
    mut to: WriteHalf<'_>,
    mut from: mpsc::Receiver<Chunk>,
    mut faults: watch::Receiver<Faults>,
    epoch: u64,
    counters: &Counters,
) -> Result<(), ()> {
    while let Some(chunk) = from.recv().await {
        match chunk {
            Chunk::Data(at, bytes) => {
                tokio::time::sleep_until(at).await;
                // A cut that came while the chunk waited holds it too.
                open(&mut faults, direction, epoch).await?;
                to.write_all(&bytes).await.map_err(|_| ())?;
                counters.bytes[direction.index()].fetch_add(bytes.len() as u64, Ordering::Relaxed);
            }
            Chunk::Eof => {
                open(&mut faults, direction, epoch).await?;
                let _ = to.shutdown().await;
            }
        }
    }
    Ok(())
}

/// One directed replication link: `follower`'s node pulls `peer`'s log
/// through `proxy` (A is the follower, B the peer).
#[derive(Debug)]
pub struct Link {
    /// The region whose follower connects.
    pub follower: String,
    /// The region it pulls from.
    pub peer: String,
    /// The proxy in between.
    pub proxy: FaultProxy,
}

/// The proxied links of a cluster, one per directed pair of regions (see
/// `ClusterSandbox::start_replicated_with_proxies`); empty when the regions
/// talk directly.
#[derive(Debug, Default)]
pub struct Links(pub(crate) Vec<Link>);

impl Links {
    /// Every link.
    pub fn iter(&self) -> impl Iterator<Item = &Link> {
        self.0.iter()
    }

    /// The proxy `follower` pulls `peer`'s log through.
    pub fn get(&self, follower: &str, peer: &str) -> &FaultProxy {
        self.find(follower, peer)
            .unwrap_or_else(|| panic!("no link from {follower} to {peer}"))
    }

    pub(crate) fn find(&self, follower: &str, peer: &str) -> Option<&FaultProxy> {
        self.0
            .iter()
            .find(|l| l.follower == follower && l.peer == peer)
            .map(|l| &l.proxy)
    }

    /// Isolates `region`: every link to or from it is cut (live
    /// connections reset, new ones refused).
    pub fn partition(&self, region: &str) {
        for l in self
            .0
            .iter()
            .filter(|l| l.follower == region || l.peer == region)
        {
            l.proxy.cut_all();
        }
    }

    /// Stops every byte from region `from` to region `to`, both on the link
    /// `to` pulls `from` through (the answers) and on the one `from` pulls
    /// `to` through (the requests); bytes from `to` to `from` still flow.
    pub fn cut_one_way(&self, from: &str, to: &str) {
        self.get(to, from).cut(Direction::BtoA);
        self.get(from, to).cut(Direction::AtoB);
    }

    /// Heals every link.
    pub fn heal(&self) {
        for l in &self.0 {
            l.proxy.heal();
        }
    }

    /// Every link's counters added up.
    pub fn stats(&self) -> ProxyStats {
        self.0.iter().fold(ProxyStats::default(), |t, l| {
            let s = l.proxy.stats();
            ProxyStats {
                connections: t.connections + s.connections,
                refused: t.refused + s.refused,
                dropped: t.dropped + s.dropped,
                cut: t.cut + s.cut,
                bytes_a_to_b: t.bytes_a_to_b + s.bytes_a_to_b,
                bytes_b_to_a: t.bytes_b_to_a + s.bytes_b_to_a,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server: every byte read is written back.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut back = vec![0; msg.len()];
        s.read_exact(&mut back).await?;
        Ok(back)
    }

    /// Whether the stream was closed (EOF or reset) within a second.
    async fn closed(s: &mut TcpStream) -> bool {
        let mut buf = [0; 16];
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => true,
            Ok(Ok(_)) | Err(_) => false,
        }
    }

    #[tokio::test]
    async fn bytes_pass_both_ways() {
        let proxy = FaultProxy::start(echo().await, 1).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(round_trip(&mut s, &big).await.unwrap(), big);
        assert_eq!(round_trip(&mut s, b"hello").await.unwrap(), b"hello");
        let stats = proxy.stats();
        assert_eq!(stats.connections, 1);
        assert_eq!(stats.bytes_a_to_b, 200_005);
        assert_eq!(stats.bytes_b_to_a, 200_005);
    }

    #[tokio::test]
    async fn delay_applies_per_direction_on_a_live_connection() {
        let proxy = FaultProxy::start(echo().await, 1).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        round_trip(&mut s, b"warm").await.unwrap();
        proxy.delay(Direction::AtoB, Duration::from_millis(120));
        proxy.delay(Direction::BtoA, Duration::from_millis(80));
        let started = std::time::Instant::now();
        round_trip(&mut s, b"slow").await.unwrap();
        let slow = started.elapsed();
        assert!(slow >= Duration::from_millis(200), "{slow:?}");
        proxy.heal();
        let started = std::time::Instant::now();
        round_trip(&mut s, b"fast").await.unwrap();
        assert!(started.elapsed() < Duration::from_millis(100));
    }

    #[tokio::test]
    async fn a_cut_direction_stalls_and_heal_delivers_what_waited() {
        let proxy = FaultProxy::start(echo().await, 1).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        round_trip(&mut s, b"warm").await.unwrap();
        proxy.cut(Direction::BtoA);
        s.write_all(b"held").await.unwrap();
        let mut back = [0; 4];
        let stalled =
            tokio::time::timeout(Duration::from_millis(300), s.read_exact(&mut back)).await;
        assert!(stalled.is_err(), "nothing comes back while B to A is cut");
        // A to B still flows: the echo server got it (and its answer waits).
        assert_eq!(proxy.stats().bytes_a_to_b, 8);
        proxy.heal();
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"held");
    }

    #[tokio::test]
    async fn cut_all_closes_live_connections_and_refuses_new_ones_until_heal() {
        let proxy = FaultProxy::start(echo().await, 1).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        round_trip(&mut s, b"warm").await.unwrap();
        proxy.cut_all();
        assert!(closed(&mut s).await, "the live connection is closed");
        let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(closed(&mut again).await, "a new connection is refused");
        proxy.heal();
        let mut healed = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut healed, b"back").await.unwrap(), b"back");
        let stats = proxy.stats();
        assert_eq!((stats.cut, stats.refused, stats.connections), (1, 1, 2));
    }

    /// Which of 40 one-chunk connections survive, at a drop rate of 0.3.
    async fn survivors(seed: u64) -> Vec<bool> {
        let proxy = FaultProxy::start(echo().await, seed).await.unwrap();
        proxy.drop_rate(0.3);
        let mut out = Vec::new();
        for _ in 0..40 {
            let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
            out.push(round_trip(&mut s, b"x").await.is_ok_and(|b| b == b"x"));
        }
        out
    }

    #[tokio::test]
    async fn drops_reset_connections_and_a_seed_replays_them() {
        let first = survivors(7).await;
        assert!(first.contains(&true) && first.contains(&false), "{first:?}");
        assert_eq!(survivors(7).await, first);
        assert_ne!(survivors(8).await, first);
    }
}
