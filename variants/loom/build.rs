//! Compiles this crate (only) with `--cfg loom`, so `src/slot.rs` of
//! arqon-variants builds on loom's `Arc`, `Mutex` and channel here while the
//! real crate builds on std and arc-swap. A workspace-wide `--cfg loom` would
//! also switch tokio and others into their own loom modes.
fn main() {
    println!("cargo:rustc-cfg=loom");
    println!("cargo:rerun-if-changed=build.rs");
}
