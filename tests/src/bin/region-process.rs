//! One regional node alone in its own process, from a config file: for the
//! tests that watch a node from outside (its resident memory and open
//! descriptors in `/proc`), which an in-process node would share with the
//! test itself. Prints `listening <addr>` once it serves, and shuts down
//! gracefully when its standard input closes. Logs go to stderr
//! (`RUST_LOG` selects them; default: warnings).

use tokio::io::AsyncReadExt;

#[tokio::main]
async fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let path = std::env::args()
        .nth(1)
        .expect("usage: region-process <config.toml>");
    let config = meridian_regional::Config::from_file(std::path::Path::new(&path))
        .unwrap_or_else(|e| panic!("{e}"));
    let node = meridian_regional::RegionalNode::start(config)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    println!("listening {}", node.local_addr());
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    node.shutdown().await.unwrap_or_else(|e| panic!("{e}"));
}
