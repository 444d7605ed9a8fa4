//! The runtime's one error type.
//!
//! Every variant is structured so callers (the CLI, and the HTTP layer later)
//! can map it exhaustively: [`Error::kind`] names the class of failure.

use std::path::PathBuf;

/// Errors from loading, tokenizing, generating and fetching.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A checkpoint file or folder could not be read or is malformed.
    #[error("{path}: {message}")]
    Load {
        /// The file or folder at fault.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The checkpoint is not a Llama-family model.
    #[error("{path}: unsupported architecture {arch:?}: Arqon serves Llama-family decoders (llama, mistral-style GQA, SmolLM, Llama 3)")]
    UnsupportedArchitecture {
        /// The file or folder at fault.
        path: PathBuf,
        /// The architecture it declares.
        arch: String,
    },
    /// A tensor the architecture needs is not in the checkpoint.
    #[error("{path}: missing tensor {name:?}")]
    MissingTensor {
        /// The file or folder at fault.
        path: PathBuf,
        /// The tensor's name in the checkpoint's own naming.
        name: String,
    },
    /// A tensor has the wrong shape for the declared configuration.
    #[error("{path}: tensor {name:?} has shape {got:?}, expected {expected:?}")]
    TensorShape {
        /// The file or folder at fault.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// Its shape in the file.
        got: Vec<usize>,
        /// The shape the configuration implies.
        expected: Vec<usize>,
    },
    /// A LoRA adapter folder could not be read, is malformed, or uses a
    /// feature Arqon does not apply.
    #[error("adapter {dir}: {message}")]
    Adapter {
        /// The adapter folder.
        dir: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A LoRA adapter does not fit the base model (made for another base).
    #[error("adapter {dir}: tensor {tensor:?} does not fit the base model: {message}")]
    AdapterMismatch {
        /// The adapter folder.
        dir: PathBuf,
        /// The tensor at fault (`*` for the adapter as a whole).
        tensor: String,
        /// How it differs.
        message: String,
    },
    /// No adapter of this name is loaded.
    #[error("no adapter named {0:?} is loaded")]
    UnknownAdapter(String),
    /// Tokenizer construction or use failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be rendered.
    #[error("chat template: {0}")]
    Template(String),
    /// A request is invalid (empty prompt, bad sampling parameter, ...).
    #[error("{0}")]
    InvalidRequest(String),
    /// Prompt plus requested tokens do not fit the model's context.
    #[error(
        "prompt of {prompt_tokens} tokens plus max_tokens {max_tokens} exceeds the context length of {context} tokens"
    )]
    ContextOverflow {
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// Tokens requested.
        max_tokens: usize,
        /// The model's context length.
        context: usize,
    },
    /// A fixed KV-cache pool has fewer free blocks than a step needs.
    #[error("the KV cache is full: the step needs {needed} more blocks, {free} are free")]
    KvCacheFull {
        /// Blocks the step needed.
        needed: usize,
        /// Blocks that were free.
        free: usize,
    },
    /// The engine was asked about a sequence it does not hold.
    #[error("unknown sequence {0}")]
    UnknownSequence(u64),
    /// Fetching the default model failed.
    #[error("fetch: {0}")]
    Fetch(String),
    /// The HTTP server could not start or run (bind, runtime, threads).
    #[error("server: {0}")]
    Server(String),
    /// A variant cannot be served: unknown, refused, over the memory budget,
    /// or built for another base.
    #[error("variant {id:?}: {message}")]
    Variant {
        /// The variant's id.
        id: String,
        /// What is wrong.
        message: String,
    },
    /// The variant catalog or one of its artifacts is wrong (unknown id,
    /// bad hash, truncated file, invalid catalog).
    #[error("catalog: {0}")]
    Catalog(#[from] arqon_variants::CatalogError),
    /// A catalog entry exists but may not be loaded here (not approved, or
    /// measured on another SKU).
    #[error("variant {id:?} refused: {reason}")]
    VariantRefused {
        /// The entry's id.
        id: String,
        /// Why.
        reason: String,
    },
    /// An artifact is not a variant of the catalog's base model.
    #[error("{path}: wrong base model: {message}")]
    WrongBase {
        /// The artifact.
        path: PathBuf,
        /// What differs.
        message: String,
    },
    /// Writing a variant artifact or report failed.
    #[error("{path}: {message}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The compute device asked for cannot be used (CUDA in a build without
    /// the `cuda` feature, no driver, no such device).
    #[error("device {device}: {reason}")]
    Device {
        /// The device as asked for (`cuda:0`).
        device: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// A tensor operation failed.
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The class of an [`Error`], for exit codes, metric labels and HTTP mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The checkpoint is wrong or unsupported.
    Model,
    /// The request is wrong.
    InvalidRequest,
    /// Fetching failed.
    Fetch,
    /// Something failed inside the engine.
    Internal,
}

impl Error {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Load { .. }
            | Error::UnsupportedArchitecture { .. }
            | Error::MissingTensor { .. }
            | Error::TensorShape { .. }
            | Error::Variant { .. }
            | Error::Adapter { .. }
            | Error::AdapterMismatch { .. }
            | Error::Catalog(_)
            | Error::VariantRefused { .. }
            | Error::WrongBase { .. } => ErrorKind::Model,
            Error::UnknownAdapter(_)
            | Error::Tokenizer(_)
            | Error::Template(_)
            | Error::InvalidRequest(_)
            | Error::ContextOverflow { .. } => ErrorKind::InvalidRequest,
            Error::Fetch(_) => ErrorKind::Fetch,
            Error::UnknownSequence(_)
            | Error::KvCacheFull { .. }
            | Error::Server(_)
            | Error::Write { .. }
            | Error::Device { .. }
            | Error::Candle(_) => ErrorKind::Internal,
        }
    }

    pub(crate) fn variant(id: &str, message: impl std::fmt::Display) -> Self {
        Error::Variant { id: id.to_string(), message: message.to_string() }
    }

    pub(crate) fn load(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Error::Load { path: path.into(), message: message.to_string() }
    }
}

/// The runtime's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
