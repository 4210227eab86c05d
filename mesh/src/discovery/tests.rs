use std::time::Duration;

use super::*;

fn config() -> DiscoveryConfig {
    DiscoveryConfig {
        min_refresh: Duration::from_millis(500),
        max_refresh: Duration::from_secs(60),
        ..DiscoveryConfig::default()
    }
}

#[test]
fn refresh_follows_the_ttl_within_bounds() {
    let c = config();
    assert_eq!(refresh_after(Duration::ZERO, &c), c.min_refresh);
    assert_eq!(
        refresh_after(Duration::from_secs(2), &c),
        Duration::from_millis(2_010)
    );
    assert_eq!(refresh_after(Duration::from_secs(3_600), &c), c.max_refresh);
}

fn node(port: u16) -> SrvNode {
    SrvNode {
        priority: 0,
        weight: 1,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    }
}

fn watch() -> SrvWatch {
    let resolver = SrvResolver::new(DiscoveryConfig {
        nameservers: vec![SocketAddr::from(([127, 0, 0, 1], 1))],
        ..config()
    })
    .unwrap();
    SrvWatch::new("_meridian._tcp.r.meridian.test", Arc::new(resolver))
}

#[test]
fn a_failure_keeps_the_last_good_nodes() {
    let w = watch();
    assert_eq!(w.name(), "_meridian._tcp.r.meridian.test.");
    let mut rx = w.subscribe();
    let c = config();
    let wait = w.apply(
        Ok(Answer {
            nodes: vec![node(1), node(2)],
            ttl: Duration::from_secs(5),
        }),
        &c,
    );
    assert_eq!(wait, Duration::from_millis(5_010));
    assert!(rx.has_changed().unwrap());
    assert_eq!(rx.borrow_and_update().nodes.len(), 2);

    let wait = w.apply(Err(DiscoveryError("timed out".into())), &c);
    assert_eq!(wait, c.min_refresh, "a failure is retried soon");
    let state = rx.borrow_and_update().clone();
    assert_eq!(*state.nodes, [node(1), node(2)]);
    assert_eq!(state.failures, 1);
    assert_eq!(state.last_error.as_deref(), Some("timed out"));

    // The same set again clears the error; an authoritative empty answer
    // removes every node.
    w.apply(
        Ok(Answer {
            nodes: vec![node(1), node(2)],
            ttl: Duration::from_secs(5),
        }),
        &c,
    );
    assert!(rx.borrow_and_update().last_error.is_none());
    w.apply(
        Ok(Answer {
            nodes: Vec::new(),
            ttl: Duration::from_secs(1),
        }),
        &c,
    );
    assert!(rx.borrow_and_update().nodes.is_empty());
}

#[test]
fn a_routine_refresh_is_published_with_its_time() {
    let w = watch();
    let mut rx = w.subscribe();
    let answer = Answer {
        nodes: vec![node(1)],
        ttl: Duration::from_secs(1),
    };
    w.apply(Ok(answer.clone()), &config());
    let first = rx.borrow_and_update().refreshed.expect("a first refresh");
    std::thread::sleep(Duration::from_millis(5));
    w.apply(Ok(answer), &config());
    // The follower must see it, or the refresh age it exports would grow
    // while the answers keep arriving.
    assert!(rx.has_changed().unwrap());
    let state = rx.borrow_and_update();
    assert!(state.refreshed.expect("a refresh") > first);
    assert_eq!(*state.nodes, [node(1)]);
}
