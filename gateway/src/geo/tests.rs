use super::*;

fn locator() -> Locator {
    Locator::new(
        vec!["10.0.0.0/8".parse().unwrap()],
        vec![
            (
                "192.168.0.0/16".parse().unwrap(),
                LatLon { lat: 1.0, lon: 1.0 },
            ),
            (
                "192.168.7.0/24".parse().unwrap(),
                LatLon { lat: 2.0, lon: 2.0 },
            ),
        ],
        None,
        Some(LatLon { lat: 9.0, lon: 9.0 }),
    )
    .unwrap()
}

#[test]
fn distances_are_great_circle() {
    // London to New York is 5,570 km along the great circle.
    let london = LatLon {
        lat: 51.5074,
        lon: -0.1278,
    };
    let new_york = LatLon {
        lat: 40.7128,
        lon: -74.0060,
    };
    let d = london.distance_km(new_york);
    assert!((d - 5_570.0).abs() < 10.0, "{d}");
    assert_eq!(london.distance_km(london), 0.0);
    assert!((new_york.distance_km(london) - d).abs() < 1e-9);
}

#[test]
fn headers_count_only_from_trusted_proxies() {
    let l = locator();
    let trusted = Some("10.1.2.3".parse().unwrap());
    let stranger = Some("172.16.0.1".parse().unwrap());
    assert_eq!(
        l.locate(trusted, Some("48.85,2.35"), None),
        Some((
            LatLon {
                lat: 48.85,
                lon: 2.35
            },
            Source::Header
        ))
    );
    assert_eq!(
        l.locate(trusted, None, Some("jp")).map(|x| x.1),
        Some(Source::Header)
    );
    assert_eq!(
        l.locate(stranger, Some("48.85,2.35"), Some("JP")),
        Some((LatLon { lat: 9.0, lon: 9.0 }, Source::Default))
    );
}

#[test]
fn most_specific_cidr_wins() {
    let l = locator();
    let ip = |s: &str| Some(s.parse().unwrap());
    assert_eq!(l.locate(ip("192.168.7.9"), None, None).unwrap().0.lat, 2.0);
    assert_eq!(l.locate(ip("192.168.8.9"), None, None).unwrap().0.lat, 1.0);
}

#[test]
fn bad_coordinates_are_ignored() {
    assert_eq!(LatLon::parse("91,0"), None);
    assert_eq!(LatLon::parse("abc"), None);
    assert_eq!(
        LatLon::parse(" 1.5 , -2 "),
        Some(LatLon {
            lat: 1.5,
            lon: -2.0
        })
    );
}
