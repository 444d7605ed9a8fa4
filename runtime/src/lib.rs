//! Arqon Serve's runtime.
#![forbid(unsafe_code)]
