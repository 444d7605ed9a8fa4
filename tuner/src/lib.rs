//! Arqon Serve's tuner (being built: see issue 4).
#![forbid(unsafe_code)]
