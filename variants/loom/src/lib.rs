//! `arqon_variants::slot`, compiled against loom (see `build.rs`) so
//! `tests/slot.rs` can model-check every interleaving of the protocol.
//! `cargo test --workspace` runs it.
#![forbid(unsafe_code)]

#[path = "../../src/slot.rs"]
pub mod slot;
