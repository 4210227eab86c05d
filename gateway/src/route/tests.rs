use super::*;
use crate::config::{HealthConfig, RegionConfig};
use crate::regions::Stores;

const US: usize = 0;
const EU: usize = 1;
const AP: usize = 2;

fn setup() -> (Router, Regions) {
    let regions = vec![
        RegionConfig::new("us-east", ([127, 0, 0, 1], 7001).into()).at(39.0, -77.5),
        RegionConfig::new("eu-west", ([127, 0, 0, 1], 7002).into()).at(53.3, -6.3),
        RegionConfig::new("ap-south", ([127, 0, 0, 1], 7003).into()).at(19.1, 72.9),
    ];
    let config = Config::new(([127, 0, 0, 1], 0).into(), regions).unwrap();
    (Router::new(&config), Regions::new(&config))
}

fn eject(regions: &Regions, i: usize) {
    let h = HealthConfig::default();
    for node in regions.list[i].nodes().iter() {
        for _ in 0..h.failures_to_eject {
            node.failure(&h);
        }
    }
    regions.list[i].refresh();
}

/// What a region's only node reports in `Admin.RegionStatus`.
fn report(regions: &Regions, i: usize, draining: bool, in_flight: u32, capacity: u32) {
    regions.list[i].nodes()[0].report(draining, in_flight, capacity, Stores::NONE);
    regions.list[i].refresh();
}

const PARIS: LatLon = LatLon {
    lat: 48.85,
    lon: 2.35,
};
const TOKYO: LatLon = LatLon {
    lat: 35.68,
    lon: 139.69,
};

#[test]
fn pin_is_exclusive_and_case_insensitive() {
    let (router, regions) = setup();
    let plan = router
        .plan(
            &regions,
            RequestFacts {
                pin: Some("EU-west"),
                location: Some(TOKYO),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(
        plan,
        Plan {
            order: vec![EU],
            reason: Reason::Pin
        }
    );
    assert_eq!(
        router.plan(
            &regions,
            RequestFacts {
                pin: Some("mars"),
                ..Default::default()
            }
        ),
        Err(UnknownRegion("mars".into()))
    );
}

#[test]
fn nearest_ranks_by_distance() {
    let (router, regions) = setup();
    let plan = router
        .plan(
            &regions,
            RequestFacts {
                location: Some(PARIS),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(
        plan,
        Plan {
            order: vec![EU, US, AP],
            reason: Reason::Nearest
        }
    );
    let plan = router
        .plan(
            &regions,
            RequestFacts {
                location: Some(TOKYO),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(plan.order[0], AP);
}

#[test]
fn unavailable_regions_go_last() {
    let (router, regions) = setup();
    eject(&regions, EU);
    let plan = router
        .plan(
            &regions,
            RequestFacts {
                location: Some(PARIS),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(plan.order, vec![US, AP, EU]);
    report(&regions, US, true, 0, 10);
    let plan = router
        .plan(
            &regions,
            RequestFacts {
                location: Some(PARIS),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(plan.order[0], AP);
}

#[test]
fn load_and_latency_shift_the_ranking() {
    let (router, regions) = setup();
    // Paris → eu-west 870 km, → us-east 6,200 km: a full eu-west (3,000 km)
    // plus 60 ms of latency (3,000 km) tips it.
    report(&regions, EU, false, 100, 100);
    regions.list[EU].observe_latency(60_000);
    let plan = router
        .plan(
            &regions,
            RequestFacts {
                location: Some(PARIS),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(plan.order[0], US);
}

#[test]
fn affinity_is_stable_and_moves_only_the_lost_regions_sessions() {
    let (router, regions) = setup();
    let homes: Vec<usize> = (0..300)
        .map(|i| {
            router
                .plan(
                    &regions,
                    RequestFacts {
                        session: Some(&format!("s-{i}")),
                        location: Some(PARIS),
                        ..Default::default()
                    },
                )
                .unwrap()
                .order[0]
        })
        .collect();
    // Spread over all three regions.
    for r in [US, EU, AP] {
        let n = homes.iter().filter(|&&h| h == r).count();
        assert!(n > 60, "region {r} got {n} of 300 sessions");
    }
    eject(&regions, AP);
    for (i, &before) in homes.iter().enumerate() {
        let plan = router
            .plan(
                &regions,
                RequestFacts {
                    session: Some(&format!("s-{i}")),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(plan.reason, Reason::Affinity);
        if before != AP {
            assert_eq!(
                plan.order[0], before,
                "session s-{i} moved although its home is healthy"
            );
        } else {
            assert_ne!(plan.order[0], AP);
        }
    }
}

#[test]
fn default_region_unless_it_is_down() {
    let (router, regions) = setup();
    let plan = router.plan(&regions, RequestFacts::default()).unwrap();
    assert_eq!(plan.reason, Reason::Default);
    assert_eq!(plan.order[0], US);
    eject(&regions, US);
    let plan = router.plan(&regions, RequestFacts::default()).unwrap();
    assert_ne!(plan.order[0], US);
    assert_eq!(plan.order.len(), 3);
}

#[test]
fn operator_weights_and_drains_move_traffic_but_never_pins() {
    let (router, regions) = setup();
    // Weight 30: draws 0 to 29 keep eu-west first, the rest pass it on.
    regions.list[EU].control(false, 30);
    assert_eq!(weighed(&regions, vec![EU, US, AP], 29), [EU, US, AP]);
    assert_eq!(weighed(&regions, vec![EU, US, AP], 30), [US, EU, AP]);
    // With no other region available, it keeps its place.
    eject(&regions, US);
    eject(&regions, AP);
    assert_eq!(weighed(&regions, vec![EU, US, AP], 99), [EU, US, AP]);
    let (router_b, regions_b) = setup();
    // Drained by an operator: last in line, though nearest.
    regions_b.list[EU].control(true, 100);
    assert!(!regions_b.list[EU].is_available());
    let plan = router_b
        .plan(
            &regions_b,
            RequestFacts {
                location: Some(PARIS),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(plan.order.last(), Some(&EU), "{plan:?}");
    // A pin is an instruction: the drained region is still the only one.
    let pinned = router
        .plan(
            &regions,
            RequestFacts {
                pin: Some("eu-west"),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(pinned.order, [EU]);
    // Undrained, it is first again.
    assert!(regions_b.list[EU].control(false, 100));
    assert!(!regions_b.list[EU].control(false, 100), "no change");
}
