//! Shared helpers for Arqon Serve's benchmark binaries (see `src/bin/`).
#![forbid(unsafe_code)]
