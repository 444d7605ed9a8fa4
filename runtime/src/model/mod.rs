//! The model: typed configuration, weights, loaders, KV cache, the decoder,
//! LoRA adapters, and its early-exit depths.

pub mod config;
pub mod exit;
pub(crate) mod gemv_op;
pub mod gguf;
pub mod graph;
pub mod kv;
pub mod llama;
pub mod lora;
pub(crate) mod norm_op;
pub(crate) mod op_layout;
pub mod paged_op;
pub mod plan;
pub(crate) mod quant_op;
pub(crate) mod rope_op;
pub mod safetensors;
pub mod sample_op;
pub(crate) mod silu_op;
pub mod weights;

pub use config::{ModelConfig, RopeScaling, RopeStyle};
pub use exit::{Attention, Depth, StepOutput, StepPlan};
pub use graph::{CapturedShape, DecodeGraphs, DecodePath};
pub use kv::{KvCache, SeqId};
pub use llama::{argmax, rows, Llama, LogitsFor, SeqChunk};
pub use lora::{AdapterRegistry, LoraAdapter, LoraTarget};
