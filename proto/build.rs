//! Compiles `meridian/v1/*.proto` into Rust (messages, clients and servers)
//! and writes the file descriptor set used for gRPC server reflection.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, exit},
};

/// Every proto file of the `meridian.v1` package, relative to the crate root.
const PROTOS: &[&str] = &[
    "meridian/v1/common.proto",
    "meridian/v1/inference.proto",
    "meridian/v1/jobs.proto",
    "meridian/v1/telemetry.proto",
    "meridian/v1/admin.proto",
    "meridian/v1/replication.proto",
];

/// Where Debian's `libprotobuf-dev` puts the well-known types
/// (`google/protobuf/*.proto`); its `protobuf-compiler` ships `protoc`
/// without them.
const WELL_KNOWN_INCLUDE: &str = "/usr/include";

/// The well-known types the `meridian.v1` protos import. protoc only parses
/// them: the generated Rust uses `prost_types::{Timestamp, Duration}`.
const WELL_KNOWN: &[&str] = &[
    "google/protobuf/timestamp.proto",
    "google/protobuf/duration.proto",
];

fn main() {
    println!("cargo:rerun-if-changed=meridian");
    println!("cargo:rerun-if-env-changed=PROTOC");
    for proto in WELL_KNOWN {
        println!("cargo:rerun-if-changed={WELL_KNOWN_INCLUDE}/{proto}");
    }

    check_protoc();
    check_well_known();

    let out_dir = PathBuf::from(
        env::var_os("OUT_DIR").unwrap_or_else(|| fail("OUT_DIR is not set; run through cargo")),
    );
    let result = tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .file_descriptor_set_path(out_dir.join("meridian_v1_descriptor.bin"))
        .compile_protos(PROTOS, &[".", WELL_KNOWN_INCLUDE]);
    if let Err(err) = result {
        fail(&format!("compiling the meridian.v1 protos failed: {err}"));
    }
}

/// Fails the build with a helpful message when `protoc` cannot be run.
/// prost-build runs `$PROTOC` if set, else `protoc` from `PATH`.
fn check_protoc() {
    let protoc = env::var_os("PROTOC").unwrap_or_else(|| "protoc".into());
    match Command::new(&protoc).arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => fail(&format!(
            "`{} --version` failed ({}): {}. Run `infra/scripts/setup.sh` to install protoc (Debian package protobuf-compiler), or point PROTOC at a working protoc.",
            Path::new(&protoc).display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
        )),
        Err(err) => fail(&format!(
            "cannot run protoc (`{}`: {err}). The meridian-proto crate needs the protobuf compiler: run `infra/scripts/setup.sh` (installs the Debian package protobuf-compiler), or set PROTOC to the path of a protoc binary.",
            Path::new(&protoc).display(),
        )),
    }
}

/// Fails the build with a message naming the package when the well-known
/// types are missing, instead of protoc's "file not found" on an import.
fn check_well_known() {
    let missing: Vec<&str> = WELL_KNOWN
        .iter()
        .copied()
        .filter(|proto| !Path::new(WELL_KNOWN_INCLUDE).join(proto).is_file())
        .collect();
    if !missing.is_empty() {
        fail(&format!(
            "the protobuf well-known types are missing from {WELL_KNOWN_INCLUDE} ({}). The meridian-proto crate imports them: run `infra/scripts/setup.sh` (installs the Debian package libprotobuf-dev, which ships them).",
            missing.join(", "),
        ));
    }
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    println!("cargo:warning={message}");
    exit(1);
}
