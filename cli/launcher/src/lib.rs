//! Local Redis and PostgreSQL servers for `meridian up` and integration tests,
//! the names and locations of the local regions both start ([`LOCAL_REGIONS`]),
//! and the config file each such region is given ([`RegionConfigFile`]).
//!
//! [`RedisServer`] and [`PostgresServer`] each start one real server process
//! (`redis-server`, and `initdb` + `postgres`) on a free loopback port, wait
//! until it answers, and can stop, kill and restart it on the same port and
//! state directory to exercise failover. Dropping a server kills its process
//! tree and removes its temporary directory, also when a test panics. Ports
//! raced away by parallel test processes are retried with fresh ones.
//!
//! A launcher killed before it could stop its servers leaves them running;
//! `stop_leftover` on either server type (and [`stop_leftover_node`] for a
//! regional node) finds such a process through its pid file and stops it.
//!
//! Linux only: teardown walks `/proc` to find a server's descendants, and the
//! first server started makes this process the child subreaper
//! (`PR_SET_CHILD_SUBREAPER`) so that backends orphaned by a killed
//! postmaster are reaped here rather than left as zombies.
//!
//! The binaries come from the Debian packages `redis-server` and
//! `postgresql`; `infra/scripts/setup.sh` installs them.

#![warn(missing_docs)]

mod error;
mod files;
mod leftover;
mod postgres;
mod process;
mod redis;
mod region_config;
mod regions;

pub use error::Error;
pub use leftover::{Leftover, stop_leftover_node};
pub use postgres::{PostgresOptions, PostgresServer, extension_installed};
pub use process::free_port;
pub use redis::{RedisOptions, RedisServer};
pub use region_config::{MeshSection, RegionConfigFile, SimModel};
pub use regions::{LOCAL_REGIONS, LocalRegion, local_location};
