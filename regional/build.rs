// `sqlx::migrate!` embeds regional/migrations at compile time but cannot tell
// cargo to rebuild when a file is added there; this does.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
