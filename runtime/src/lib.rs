//! Arqon Serve's runtime: model loading (GGUF and Hugging Face safetensors),
//! tokenization and chat templates, the batch-first Llama decoder with an
//! engine-owned KV cache, sampling, fetching the default model, the
//! OpenAI-compatible HTTP server with continuous batching ([`server`]),
//! variant artifacts, loading and figures ([`variants`]), and the `arqon`
//! binary's commands.
//!
//! ```no_run
//! use arqon_runtime::{engine, GenerateRequest};
//! let loaded = engine::load(std::path::Path::new("model.gguf"))?;
//! let mut e = engine::Engine::new(loaded);
//! let ids = e.encode_prompt("The capital of France is")?;
//! let g = e.generate(GenerateRequest::greedy(ids, 16), &mut |t| print!("{t}"))?;
//! # Ok::<(), arqon_runtime::Error>(())
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod chat;
pub mod config;
pub mod control;
pub mod device;
pub mod engine;
pub mod error;
mod faults;
pub mod fetch;
pub mod model;
pub mod sampling;
pub mod server;
pub mod speculative;
pub mod tokenizer;
pub mod variants;

pub use engine::{DepthStats, Engine, FinishReason, GenerateRequest, Generation, LoadedModel};
pub use error::{Error, ErrorKind, Result};
pub use sampling::SamplingParams;
pub use speculative::{SpecInput, SpecResult};
