//! Shared helpers for Arqon Serve's benchmark binaries (see `src/bin/`).
#![forbid(unsafe_code)]

pub mod graph_probe;
