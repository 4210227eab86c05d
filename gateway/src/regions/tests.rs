use std::net::SocketAddr;

use super::*;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn srv(port: u16, priority: u16, weight: u16) -> SrvNode {
    SrvNode {
        priority,
        weight,
        addr: addr(port),
    }
}

fn region(nodes: Vec<Node>) -> Region {
    Region::new("r".into(), None, None, nodes)
}

fn eject(node: &Node, h: &HealthConfig) {
    for _ in 0..h.failures_to_eject {
        node.failure(h);
    }
}

#[test]
fn ejection_and_recovery_follow_thresholds() {
    let h = HealthConfig {
        failures_to_eject: 2,
        successes_to_recover: 3,
        ..HealthConfig::default()
    };
    let r = region(vec![Node::new(addr(1), 0, 1, true)]);
    let node = r.nodes()[0].clone();
    assert_eq!(node.failure(&h), Transition::None);
    assert!(node.is_healthy());
    assert_eq!(node.failure(&h), Transition::Ejected);
    assert_eq!(r.refresh(), Transition::Ejected, "its only node went");
    assert!(!r.is_healthy());
    assert_eq!(node.failure(&h), Transition::None);
    assert_eq!(node.success(&h), Transition::None);
    assert_eq!(node.success(&h), Transition::None);
    // A failure in between restarts the count.
    assert_eq!(node.failure(&h), Transition::None);
    for _ in 0..2 {
        assert_eq!(node.success(&h), Transition::None);
    }
    assert_eq!(node.success(&h), Transition::Recovered);
    assert_eq!(r.refresh(), Transition::Recovered);
    assert!(r.is_healthy());
}

#[test]
fn a_region_is_healthy_while_any_node_is_and_draining_while_all_are() {
    let h = HealthConfig::default();
    let r = region(vec![
        Node::new(addr(1), 0, 1, true),
        Node::new(addr(2), 0, 1, true),
    ]);
    let nodes = r.nodes().clone();
    eject(&nodes[0], &h);
    assert_eq!(r.refresh(), Transition::None);
    assert!(r.is_available());
    for _ in 0..20 {
        assert_eq!(
            r.pick().unwrap().address,
            addr(2),
            "ejected nodes are skipped"
        );
    }
    nodes[1].report(true, 50, 100, Stores::NONE);
    r.refresh();
    assert!(r.is_healthy() && r.is_draining() && !r.is_available());
    nodes[1].report(false, 50, 100, Stores::NONE);
    r.refresh();
    assert!((r.load() - 0.5).abs() < 1e-9);
    r.observe_latency(8_000);
    assert_eq!(r.ewma_ms(), 8.0);
    r.observe_latency(16_000);
    assert_eq!(r.ewma_ms(), 9.0);
}

#[test]
fn picks_spread_over_idle_nodes_and_prefer_the_less_busy() {
    let r = region(vec![
        Node::new(addr(1), 0, 1, true),
        Node::new(addr(2), 0, 1, true),
    ]);
    let mut counts = [0; 2];
    for _ in 0..400 {
        let lease = r.pick().unwrap();
        counts[usize::from(lease.address.port() - 1)] += 1;
    }
    assert!(counts.iter().all(|&c| c > 100), "{counts:?}");
    // Leases count as outstanding: with node 1 busy, two draws that land on
    // both pick node 2 every time.
    let busy: Vec<Lease> = (0..50).map(|_| Lease::new(r.nodes()[0].clone())).collect();
    assert_eq!(r.nodes()[0].outstanding(), 50);
    let to_two = (0..400)
        .filter(|_| r.pick().unwrap().address == addr(2))
        .count();
    assert!(to_two > 250, "{to_two} of 400 to the idle node");
    drop(busy);
    assert_eq!(r.nodes()[0].outstanding(), 0);
}

#[test]
fn lower_srv_priority_wins_while_it_has_an_available_node() {
    let h = HealthConfig::default();
    let r = region(Vec::new());
    assert!(r.pick().is_none(), "no nodes, nothing to pick");
    r.set_nodes(&[srv(1, 10, 1), srv(2, 20, 100)], &h);
    for _ in 0..20 {
        assert_eq!(r.pick().unwrap().address, addr(1));
    }
    eject(&r.nodes()[0], &h);
    r.refresh();
    for _ in 0..20 {
        assert_eq!(r.pick().unwrap().address, addr(2));
    }
}

#[test]
fn dns_changes_keep_known_nodes_and_hold_back_new_ones() {
    let h = HealthConfig::default();
    let r = region(Vec::new());
    assert!(!r.is_healthy(), "no nodes yet");
    // The first answer's nodes serve at once.
    assert_eq!(r.set_nodes(&[srv(1, 0, 1)], &h), Transition::Recovered);
    r.refreshed(Instant::now());
    let first = r.nodes()[0].clone();
    let lease = r.pick().unwrap();
    // A node added later waits for its checks.
    r.set_nodes(&[srv(1, 0, 1), srv(2, 0, 1)], &h);
    assert!(
        Arc::ptr_eq(&r.nodes()[0], &first),
        "a known node keeps its state"
    );
    let added = r.nodes()[1].clone();
    assert!(!added.is_healthy());
    for _ in 0..20 {
        assert_eq!(r.pick().unwrap().address, addr(1));
    }
    for _ in 0..h.successes_to_recover {
        added.success(&h);
    }
    r.refresh();
    assert!((0..50).any(|_| r.pick().unwrap().address == addr(2)));
    // Removing node 1 leaves its in-flight request alone.
    r.set_nodes(&[srv(2, 0, 1)], &h);
    assert_eq!(first.outstanding(), 1);
    for _ in 0..20 {
        assert_eq!(r.pick().unwrap().address, addr(2));
    }
    drop(lease);
    assert_eq!(first.outstanding(), 0);
    // An authoritative empty answer empties the region.
    assert_eq!(r.set_nodes(&[], &h), Transition::Ejected);
    assert!(r.pick().is_none());
    assert!(r.refresh_age().is_some());
}
