//! Loading a Llama-family model from a GGUF file (llama.cpp's format).
//!
//! candle-core's reader parses the header (with bounds checks against the file
//! size, so a corrupt header is an error rather than a huge allocation); this
//! module turns its string-keyed metadata into a typed [`ModelConfig`] and a
//! [`GgufVocab`] once, at the edge.
//!
//! The file is read through a read-only memory map ([`ReadOnlyMap`]): tensors
//! are copied straight out of the page cache, with no `read` call per tensor
//! and no buffered second copy, so loading a variant artifact that is already
//! cached costs only those copies.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arqon_kernels::mmap::ReadOnlyMap;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

use super::config::{ModelConfig, RopeScaling, RopeStyle};
use super::weights::{load_weights, TensorSource, Weights, GGUF_NAMES};
use crate::error::{Error, Result};

/// The tokenizer as a GGUF file describes it (`tokenizer.ggml.*`).
#[derive(Debug, Clone)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE) or `llama` (SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer llama.cpp applies.
    pub pre: Option<String>,
    /// The vocabulary, by id.
    pub tokens: Vec<String>,
    /// BPE merges, `"a b"`.
    pub merges: Vec<String>,
    /// Token scores by id (`tokenizer.ggml.scores`; empty when the file has
    /// none). SentencePiece merges the adjacent pair whose piece scores highest.
    pub scores: Vec<f32>,
    /// Token types (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).
    pub token_types: Vec<i32>,
    /// Beginning-of-sequence id.
    pub bos: Option<u32>,
    /// End-of-sequence id.
    pub eos: Option<u32>,
    /// Unknown-token id (`tokenizer.ggml.unknown_token_id`).
    pub unk: Option<u32>,
    /// Whether to prepend BOS when encoding a prompt.
    pub add_bos: bool,
    /// Whether SentencePiece prepends a space to the text (and so to the text
    /// after each special token) before encoding (`tokenizer.ggml.add_space_prefix`;
    /// llama.cpp's default is true for `llama` vocabularies, false otherwise).
    pub add_space_prefix: bool,
    /// The chat template (Jinja), if the file carries one.
    pub chat_template: Option<String>,
}

/// A parsed GGUF file: its typed config, its vocabulary, and a reader for tensors.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: Cursor<ReadOnlyMap>,
}

impl GgufFile {
    /// Opens and parses the header of `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let map = ReadOnlyMap::open(path).map_err(|e| Error::load(path, e))?;
        let mut reader = Cursor::new(map);
        let content =
            Content::read(&mut reader).map_err(|e| Error::load(path, format!("not a valid GGUF file: {e}")))?;
        Ok(GgufFile { path: path.to_path_buf(), content, reader })
    }

    /// The parsed header: metadata and tensor descriptions (candle keeps both
    /// in hash maps, not in file order).
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// A string metadata value, if present and a string.
    pub fn meta_str(&self, key: &str) -> Option<&str> {
        match self.meta(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    /// Reads one tensor as stored.
    pub fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        self.read(name)
    }

    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn meta_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.meta(key) {
            None => Ok(None),
            Some(v) => value_to_u64(v)
                .map(|x| Some(x as usize))
                .ok_or_else(|| Error::load(&self.path, format!("metadata {key} is not an integer"))),
        }
    }

    fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => value_to_u64(v)
                .map(|x| Some(x as f64))
                .ok_or_else(|| Error::load(&self.path, format!("metadata {key} is not a number"))),
        }
    }

    fn req_usize(&self, key: &str) -> Result<usize> {
        self.meta_usize(key)?.ok_or_else(|| Error::load(&self.path, format!("missing metadata {key}")))
    }

    /// The architecture the file declares (`general.architecture`).
    pub fn architecture(&self) -> String {
        match self.meta("general.architecture") {
            Some(Value::String(s)) => s.clone(),
            _ => "<none>".to_string(),
        }
    }

    /// The typed model configuration.
    pub fn config(&mut self) -> Result<ModelConfig> {
        let arch = self.architecture();
        if arch != "llama" {
            return Err(Error::UnsupportedArchitecture { path: self.path.clone(), arch });
        }
        let p = |k: &str| format!("llama.{k}");
        let hidden = self.req_usize(&p("embedding_length"))?;
        let heads = self.req_usize(&p("attention.head_count"))?;
        let kv_heads = self.meta_usize(&p("attention.head_count_kv"))?.unwrap_or(heads);
        let head_dim = match self.meta_usize(&p("attention.key_length"))? {
            Some(d) => d,
            None if heads > 0 => hidden / heads,
            None => 0,
        };
        let vocab = match self.meta_usize(&p("vocab_size"))? {
            Some(v) => v,
            None => match self.content.tensor_infos.get("token_embd.weight") {
                Some(info) => info.shape.dims()[0],
                None => return Err(Error::MissingTensor { path: self.path.clone(), name: "token_embd.weight".into() }),
            },
        };
        let rope_scaling = if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            let t = self.read("rope_freqs.weight")?.dequantize(&Device::Cpu)?;
            RopeScaling::FreqFactors(t.flatten_all()?.to_vec1::<f32>()?)
        } else {
            match self.meta("llama.rope.scaling.type") {
                Some(Value::String(s)) if s == "linear" => {
                    RopeScaling::Linear { factor: self.meta_f64(&p("rope.scaling.factor"))?.unwrap_or(1.0) }
                }
                Some(Value::String(s)) if s != "none" => {
                    return Err(Error::load(&self.path, format!("unsupported RoPE scaling {s:?}")))
                }
                _ => RopeScaling::None,
            }
        };
        let tie = !self.content.tensor_infos.contains_key("output.weight");
        let cfg = ModelConfig {
            architecture: arch,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: self.req_usize(&p("feed_forward_length"))?,
            num_layers: self.req_usize(&p("block_count"))?,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            rms_norm_eps: self.meta_f64(&p("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
            rope_theta: self.meta_f64(&p("rope.freq_base"))?.unwrap_or(10000.0),
            rope_style: RopeStyle::Interleaved,
            rope_scaling,
            max_position_embeddings: self.meta_usize(&p("context_length"))?.unwrap_or(2048),
            tie_word_embeddings: tie,
        };
        cfg.validate().map_err(|m| Error::load(&self.path, m))?;
        Ok(cfg)
    }

    /// The tokenizer description embedded in the file.
    pub fn vocab(&self) -> Result<GgufVocab> {
        let strings = |key: &str| -> Result<Vec<String>> {
            match self.meta(key) {
                None => Ok(Vec::new()),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| match v {
                        Value::String(s) => Ok(s.clone()),
                        _ => Err(Error::load(&self.path, format!("{key} holds a non-string"))),
                    })
                    .collect(),
                Some(_) => Err(Error::load(&self.path, format!("{key} is not an array"))),
            }
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        if tokens.is_empty() {
            return Err(Error::load(&self.path, "no tokenizer.ggml.tokens: the file carries no tokenizer"));
        }
        let token_types = match self.meta("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a.iter().map(|v| value_to_u64(v).unwrap_or(1) as i32).collect(),
            _ => vec![1; tokens.len()],
        };
        let id = |k: &str| -> Result<Option<u32>> { Ok(self.meta_usize(k)?.map(|x| x as u32)) };
        let model = match self.meta("tokenizer.ggml.model") {
            Some(Value::String(s)) => s.clone(),
            _ => "gpt2".to_string(),
        };
        let add_bos = match self.meta("tokenizer.ggml.add_bos_token") {
            Some(Value::Bool(b)) => *b,
            _ => model == "llama",
        };
        let add_space_prefix = match self.meta("tokenizer.ggml.add_space_prefix") {
            Some(Value::Bool(b)) => *b,
            _ => model == "llama",
        };
        // llama.cpp accepts f32 or i32 scores and refuses a list shorter than the vocabulary.
        let scores: Vec<f32> = match self.meta("tokenizer.ggml.scores") {
            None => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::F32(x) => Ok(*x),
                    Value::F64(x) => Ok(*x as f32),
                    Value::I32(x) => Ok(*x as f32),
                    _ => Err(Error::load(&self.path, "tokenizer.ggml.scores holds a non-number")),
                })
                .collect::<Result<_>>()?,
            Some(_) => return Err(Error::load(&self.path, "tokenizer.ggml.scores is not an array")),
        };
        if !scores.is_empty() && scores.len() < tokens.len() {
            return Err(Error::load(
                &self.path,
                format!("tokenizer.ggml.scores has {} entries for {} tokens", scores.len(), tokens.len()),
            ));
        }
        Ok(GgufVocab {
            pre: match self.meta("tokenizer.ggml.pre") {
                Some(Value::String(s)) => Some(s.clone()),
                _ => None,
            },
            merges: strings("tokenizer.ggml.merges")?,
            scores,
            token_types,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            add_bos,
            add_space_prefix,
            chat_template: match self.meta("tokenizer.chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                _ => None,
            },
            model,
            tokens,
        })
    }

    fn read(&mut self, name: &str) -> Result<QTensor> {
        self.content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| Error::load(&self.path, format!("tensor {name:?}: {e}")))
    }

    /// Reads every weight of the model onto `device` (quantized matrices
    /// are uploaded as they are; see [`super::weights`]).
    pub fn weights(&mut self, cfg: &ModelConfig, device: &Device) -> Result<Weights> {
        load_weights(self, cfg, &GGUF_NAMES, device)
    }

    /// The storage format of each tensor, by name (for `arqon inspect`).
    pub fn tensor_formats(&self) -> HashMap<String, String> {
        self.content.tensor_infos.iter().map(|(k, v)| (k.clone(), format!("{:?}", v.ggml_dtype))).collect()
    }
}

impl TensorSource for GgufFile {
    fn path(&self) -> &Path {
        &self.path
    }
    fn contains(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }
    fn qtensor(&mut self, name: &str) -> Result<Arc<QTensor>> {
        Ok(Arc::new(self.read(name)?))
    }
    fn dense(&mut self, name: &str) -> Result<Tensor> {
        Ok(self.read(name)?.dequantize(&Device::Cpu)?)
    }
}

fn value_to_u64(v: &Value) -> Option<u64> {
    match v {
        Value::U8(x) => Some(*x as u64),
        Value::U16(x) => Some(*x as u64),
        Value::U32(x) => Some(*x as u64),
        Value::U64(x) => Some(*x),
        Value::I8(x) if *x >= 0 => Some(*x as u64),
        Value::I16(x) if *x >= 0 => Some(*x as u64),
        Value::I32(x) if *x >= 0 => Some(*x as u64),
        Value::I64(x) if *x >= 0 => Some(*x as u64),
        _ => None,
    }
}
