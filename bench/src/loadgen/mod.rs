//! The load generator behind `src/bin/loadgen.rs`: streaming OpenAI-compatible requests
//! against one loopback server, closed or open loop, measured per request and summarised
//! per level.
//!
//! Layout: [`config`] parses the command line once into a validated `Config`; [`client`]
//! sends one request and measures its stream; [`sse`] splits and parses the stream;
//! [`driver`] runs a level (closed or open loop, bounded in count and time); [`report`]
//! turns records into the table and JSON.
//!
//! These modules live outside the `arqon-bench` library on purpose: they pull in tokio and
//! hyper, which the engine benchmark binaries have no use for.

pub mod client;
pub mod config;
pub mod driver;
pub mod report;
pub mod sse;
