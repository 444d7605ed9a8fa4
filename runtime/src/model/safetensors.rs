//! Loading a Llama-family model from a Hugging Face folder: `config.json` plus
//! `model.safetensors` or a sharded `model.safetensors.index.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::config::{ModelConfig, RopeScaling, RopeStyle};
use super::weights::{load_weights, Linear, TensorSource, Weights, HF_NAMES};
use crate::error::{Error, Result};

/// The fields of `config.json` Arqon reads. Unknown fields are ignored.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    pub bos_token_id: Option<serde_json::Value>,
    pub eos_token_id: Option<serde_json::Value>,
}

/// Token ids `config.json` names (an id or a list of ids).
#[derive(Debug, Clone, Default)]
pub struct HfSpecialIds {
    /// BOS id.
    pub bos: Option<u32>,
    /// EOS ids.
    pub eos: Vec<u32>,
}

fn ids(v: &Option<serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
        _ => Vec::new(),
    }
}

const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral"];

/// Reads and checks `dir/config.json`.
pub fn read_config(dir: &Path) -> Result<(ModelConfig, HfSpecialIds)> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::load(&path, e))?;
    let raw: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::load(&path, format!("invalid JSON: {e}")))?;
    let model_type = raw.get("model_type").and_then(|v| v.as_str()).unwrap_or("<none>").to_string();
    if !SUPPORTED_MODEL_TYPES.contains(&model_type.as_str()) {
        let arch = raw
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .map(|a| format!("{model_type} ({a})"))
            .unwrap_or(model_type);
        return Err(Error::UnsupportedArchitecture { path, arch });
    }
    // transformers 5 writes RoPE settings as `rope_parameters`; older files
    // use `rope_theta` and `rope_scaling`. Read either.
    let rope_parameters = raw.get("rope_parameters").cloned();
    let mut hf: HfConfig = serde_json::from_value(raw).map_err(|e| Error::load(&path, e))?;
    if let Some(rp) = rope_parameters.filter(|v| v.is_object()) {
        if hf.rope_theta.is_none() {
            hf.rope_theta = rp.get("rope_theta").and_then(|t| t.as_f64());
        }
        if hf.rope_scaling.as_ref().is_none_or(|v| v.is_null()) {
            hf.rope_scaling = Some(rp);
        }
    }
    let rope_scaling = match &hf.rope_scaling {
        None | Some(serde_json::Value::Null) => RopeScaling::None,
        Some(v) => {
            let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
            let num = |k: &str| v.get(k).and_then(|x| x.as_f64());
            let need = |k: &str| num(k).ok_or_else(|| Error::load(&path, format!("rope_scaling.{k} missing")));
            match kind {
                "default" => RopeScaling::None,
                "linear" => RopeScaling::Linear { factor: need("factor")? },
                "llama3" => RopeScaling::Llama3 {
                    factor: need("factor")?,
                    low_freq_factor: need("low_freq_factor")?,
                    high_freq_factor: need("high_freq_factor")?,
                    original_max_position_embeddings: need("original_max_position_embeddings")?,
                },
                other => return Err(Error::load(&path, format!("unsupported rope_scaling type {other:?}"))),
            }
        }
    };
    let heads = hf.num_attention_heads;
    let cfg = ModelConfig {
        architecture: hf
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .unwrap_or_else(|| hf.model_type.clone().unwrap_or_default()),
        vocab_size: hf.vocab_size,
        hidden_size: hf.hidden_size,
        intermediate_size: hf.intermediate_size,
        num_layers: hf.num_hidden_layers,
        num_heads: heads,
        num_kv_heads: hf.num_key_value_heads.unwrap_or(heads),
        head_dim: hf.head_dim.unwrap_or(hf.hidden_size.checked_div(heads).unwrap_or(0)),
        rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
        rope_theta: hf.rope_theta.unwrap_or(10000.0),
        rope_style: RopeStyle::HalfSplit,
        rope_scaling,
        max_position_embeddings: hf.max_position_embeddings.unwrap_or(2048),
        tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
    };
    cfg.validate().map_err(|m| Error::load(&path, m))?;
    let special = HfSpecialIds { bos: ids(&hf.bos_token_id).first().copied(), eos: ids(&hf.eos_token_id) };
    Ok((cfg, special))
}

/// The tensors of a safetensors checkpoint, read into memory as f32.
pub struct SafetensorsFolder {
    dir: PathBuf,
    tensors: HashMap<String, Tensor>,
}

impl SafetensorsFolder {
    /// Reads `model.safetensors`, or every shard listed by `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::load(&index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::load(&index, format!("invalid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::load(&index, "no weight_map object"))?;
            let mut shards: Vec<String> = map.values().filter_map(|s| s.as_str().map(String::from)).collect();
            shards.sort();
            shards.dedup();
            shards.iter().map(|s| dir.join(s)).collect()
        } else {
            return Err(Error::load(dir, "no model.safetensors or model.safetensors.index.json"));
        };
        let mut tensors = HashMap::new();
        for file in files {
            // Read, not mmap: this crate forbids `unsafe`, and mmap of a file
            // another process may truncate is exactly that. The bytes are
            // dropped once the tensors are converted.
            let bytes = std::fs::read(&file).map_err(|e| Error::load(&file, e))?;
            let st = safetensors_views(&file, &bytes)?;
            tensors.extend(st);
        }
        Ok(SafetensorsFolder { dir: dir.to_path_buf(), tensors })
    }

    /// Reads every weight of the model onto `device`.
    pub fn weights(&mut self, cfg: &ModelConfig, device: &Device) -> Result<Weights> {
        load_weights(self, cfg, &HF_NAMES, device)
    }
}

fn safetensors_views(file: &Path, bytes: &[u8]) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
        .map_err(|e| Error::load(file, format!("not a valid safetensors file: {e}")))
}

impl TensorSource for SafetensorsFolder {
    fn path(&self) -> &Path {
        &self.dir
    }
    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    fn qtensor(&mut self, name: &str) -> Result<Arc<QTensor>> {
        let t = self.dense(name)?;
        Ok(Arc::new(QTensor::quantize(&t, candle_core::quantized::GgmlDType::F32)?))
    }
    /// Dense weights go straight to a dense [`Linear`] (no round trip
    /// through a GGML-typed `QTensor`).
    fn matrix(&mut self, name: &str, device: &Device) -> Result<(Vec<usize>, Linear)> {
        let t = self.dense(name)?;
        Ok((t.dims().to_vec(), Linear::from_dense(t.to_device(device)?)?))
    }
    fn dense(&mut self, name: &str) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::MissingTensor { path: self.dir.clone(), name: name.to_string() })?;
        Ok(t.to_dtype(DType::F32)?)
    }
}
