//! What `meridian up` prints once everything serves: where each region
//! is, how to call the gateway, and how to run drills on one region.

use std::path::Path;

use meridian_gateway::Gateway;

use super::Region;

pub(super) fn print(gateway: &Gateway, regions: &[Region], state_dir: &Path, api_key: &str) {
    let addr = gateway.local_addr();
    println!();
    println!(
        "Meridian is up: {} regions behind http://{addr}",
        regions.len()
    );
    println!();
    for r in regions {
        let api = r
            .node
            .as_ref()
            .map(|n| n.addr.to_string())
            .unwrap_or_default();
        let pid = r.node.as_ref().map(|n| n.pid).unwrap_or_default();
        let time_series = r.node.as_ref().map_or("-", |n| n.time_series.as_str());
        println!(
            "  {:<10} api {api:<16} pid {pid:<8} redis {:<28} postgres {}  time series {time_series}",
            r.name,
            r.redis.url(),
            r.postgres.url()
        );
    }
    if regions
        .iter()
        .any(|r| r.node.as_ref().map(|n| n.time_series.as_str()) == Some("pg_partman"))
    {
        println!();
        println!(
            "Time series on pg_partman: TimescaleDB is not installed in this PostgreSQL \
             (infra/scripts/setup.sh installs it; see the README)."
        );
    }
    let body =
        r#"{"model":"sim-small","messages":[{"role":"user","content":"Hello from the edge"}]}"#;
    let auth = format!("-H 'authorization: Bearer {api_key}'");
    let json = "-H 'content-type: application/json'";
    let url = format!("http://{addr}/v1/chat/completions");
    let last = regions.last().map(|r| r.name.as_str()).unwrap_or("us-east");
    println!();
    println!(
        "API key of the `local` tenant (kept in {}); for OpenAI SDKs:",
        state_dir.join("api-key").display()
    );
    println!("  export OPENAI_API_KEY={api_key} OPENAI_BASE_URL=http://{addr}/v1");
    println!("Chat completion (OpenAI-compatible):");
    println!("  curl -s {url} {auth} {json} -d '{body}'");
    println!("Pin a region and see which one served it:");
    let pin = meridian_gateway::REGION_HEADER;
    println!("  curl -si {url} {auth} -H '{pin}: {last}' {json} -d '{body}'");
    println!("Pretend to be in Paris (loopback is a trusted proxy here):");
    let country = meridian_gateway::COUNTRY_HEADER;
    println!("  curl -si {url} {auth} -H '{country}: FR' {json} -d '{body}'");
    println!("gRPC through the gateway:");
    println!(
        "  grpcurl -plaintext -H 'authorization: Bearer {api_key}' -d '{body}' {addr} meridian.v1.Inference/Generate"
    );
    if let Some(admin) = gateway.admin_addr() {
        println!("Gateway admin: http://{admin}/routing  /metrics  /readyz");
    }
    println!();
    print_mesh(regions, &state_dir.join("certs"));
    print_drills(regions);
    println!("Ctrl-C stops everything.");
}

fn print_mesh(regions: &[Region], certs: &Path) {
    let Some(node) = regions.first().and_then(|r| r.node.as_ref()) else {
        return;
    };
    let c = certs.display();
    println!("Regions accept mutual TLS only (certificates in {c}); as an operator:");
    println!(
        "  grpcurl -cacert {c}/ca.pem -cert {c}/operator-admin.pem -key {c}/operator-admin.key {} meridian.v1.Admin/RegionStatus",
        node.addr
    );
    println!();
}

/// Each node is its own process and nothing restarts it, so a person can
/// take one region down and bring it back while the others serve.
fn print_drills(regions: &[Region]) {
    let Some(first) = regions.first().and_then(|r| r.node.as_ref()) else {
        return;
    };
    let pid_file = first.pid_file.display();
    println!("Drills: each region's node is its own process, never restarted for you.");
    println!(
        "  kill -STOP $(cat {pid_file})   # freeze {} (-CONT resumes, -9 kills)",
        first.region
    );
    println!("Restart a region's node by hand (it writes its pid file again):");
    for node in regions.iter().filter_map(|r| r.node.as_ref()) {
        println!("  {}: {}", node.region, node.restart);
    }
    println!();
}
