//! Reading a PEFT LoRA folder: `adapter_config.json` (what PEFT's
//! `save_pretrained` writes) and `adapter_model.safetensors`, with every
//! tensor checked against the base model before anything is kept.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use serde_json::Value;

use super::{BaseShape, LoraAdapter, LoraPair, LoraTarget};
use crate::error::{Error, Result};
use crate::model::config::{ModelConfig, RopeStyle};

/// The fields of `adapter_config.json` Arqon reads (others are ignored:
/// `lora_dropout` only matters in training, `task_type` and friends are labels).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoraConfig {
    /// The rank `r`.
    pub r: usize,
    /// `lora_alpha`.
    pub lora_alpha: f64,
    /// The targeted modules; `"all-linear"` means all seven projections.
    /// (A regular-expression string is accepted: the tensors decide then.)
    pub target_modules: Vec<LoraTarget>,
    /// rsLoRA: scale by `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// PEFT's flag for GPT-2-style `Conv1D` bases. LoRA's A and B are stored
    /// the same either way and Llama's projections are `nn.Linear` (PEFT
    /// itself resets the flag to false for them), so it changes nothing here.
    pub fan_in_fan_out: bool,
    /// The base model the adapter was made for, as recorded (not enforced:
    /// shapes are what is checked).
    pub base_model_name_or_path: Option<String>,
}

impl LoraConfig {
    /// The factor on `B @ A`: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Parses and checks `dir/adapter_config.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("adapter_config.json");
        let bad = |m: String| Error::Adapter { dir: dir.to_path_buf(), message: m };
        let text = std::fs::read_to_string(&path).map_err(|e| bad(format!("cannot read adapter_config.json: {e}")))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("adapter_config.json is not valid JSON: {e}")))?;
        let str_of = |k: &str| v.get(k).and_then(Value::as_str);
        match str_of("peft_type") {
            Some("LORA") => {}
            other => return Err(bad(format!("peft_type is {other:?}, expected \"LORA\": only LoRA adapters load"))),
        }
        match str_of("bias") {
            None | Some("none") => {}
            Some(b) => return Err(bad(format!("bias {b:?} is not supported: only \"none\" (no trained biases)"))),
        }
        if v.get("use_dora").and_then(Value::as_bool).unwrap_or(false) {
            return Err(bad("use_dora is not supported".into()));
        }
        for k in ["rank_pattern", "alpha_pattern"] {
            if v.get(k).and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
                return Err(bad(format!("{k} is not supported: one rank and alpha for every module")));
            }
        }
        if v.get("modules_to_save").and_then(Value::as_array).is_some_and(|m| !m.is_empty()) {
            return Err(bad("modules_to_save is not supported: the adapter may only add LoRA updates".into()));
        }
        let r = v
            .get("r")
            .and_then(Value::as_u64)
            .filter(|r| *r > 0)
            .ok_or_else(|| bad("r must be a positive integer".into()))? as usize;
        let lora_alpha = v
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .filter(|a| a.is_finite())
            .ok_or_else(|| bad("lora_alpha must be a number".into()))?;
        let target_modules = match v.get("target_modules") {
            Some(Value::String(s)) if s == "all-linear" => LoraTarget::ALL.to_vec(),
            Some(Value::String(_)) | None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|m| {
                    let s = m.as_str().ok_or_else(|| bad("target_modules must hold strings".into()))?;
                    // PEFT matches a listed name against the module path's last part.
                    let last = s.rsplit('.').next().unwrap_or(s);
                    LoraTarget::ALL.into_iter().find(|t| t.peft_name() == last).ok_or_else(|| {
                        bad(format!("target module {s:?} is not supported: Arqon applies LoRA to the seven linear projections of each layer"))
                    })
                })
                .collect::<Result<_>>()?,
            Some(_) => return Err(bad("target_modules must be a list of names or \"all-linear\"".into())),
        };
        Ok(LoraConfig {
            r,
            lora_alpha,
            target_modules,
            use_rslora: v.get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
            fan_in_fan_out: v.get("fan_in_fan_out").and_then(Value::as_bool).unwrap_or(false),
            base_model_name_or_path: str_of("base_model_name_or_path").map(String::from),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Half {
    A,
    B,
}

/// `(layer, target, A|B)` of a PEFT key such as
/// `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` (with or
/// without the `.default` adapter-name infix).
fn parse_key(key: &str) -> Option<(usize, LoraTarget, Half)> {
    let k = key.strip_prefix("base_model.model.").unwrap_or(key);
    let rest = k.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (block, rest) = rest.split_once('.')?;
    let (module, rest) = rest.split_once('.')?;
    let t = LoraTarget::ALL.into_iter().find(|t| t.peft_name() == module && t.block() == block)?;
    let half = match rest {
        "lora_A.weight" | "lora_A.default.weight" => Half::A,
        "lora_B.weight" | "lora_B.default.weight" => Half::B,
        _ => return None,
    };
    Some((layer.parse().ok()?, t, half))
}

/// Row order of a GGUF Q or K matrix in terms of the Hugging Face one:
/// llama.cpp's converter permutes each head's rows `(half, i) -> (i, half)`
/// so RoPE can rotate adjacent pairs. `perm[gguf_row] = hf_row`.
pub(super) fn gguf_rope_permutation(heads: usize, head_dim: usize) -> Vec<u32> {
    let half = head_dim / 2;
    let mut perm = Vec::with_capacity(heads * head_dim);
    for h in 0..heads {
        for i in 0..half {
            for side in 0..2 {
                perm.push((h * head_dim + side * half + i) as u32);
            }
        }
    }
    perm
}

/// A projection's `lora_A` and `lora_B` as read (name and tensor), by [`Half`].
type Halves = [Option<(String, Tensor)>; 2];

/// Reads and checks an adapter folder against `cfg`, its tensors put on `device`.
pub(super) fn load(dir: &Path, cfg: &ModelConfig, device: &Device) -> Result<LoraAdapter> {
    let _span = tracing::debug_span!("load_adapter", dir = %dir.display()).entered();
    let config = LoraConfig::read(dir)?;
    let file = dir.join("adapter_model.safetensors");
    let bad = |m: String| Error::Adapter { dir: dir.to_path_buf(), message: m };
    let mismatch = |tensor: &str, m: String| Error::AdapterMismatch {
        dir: dir.to_path_buf(),
        tensor: tensor.to_string(),
        message: m,
    };
    let bytes = std::fs::read(&file).map_err(|e| bad(format!("cannot read adapter_model.safetensors: {e}")))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| bad(format!("adapter_model.safetensors is not a valid safetensors file: {e}")))?;
    drop(bytes);

    let mut halves: HashMap<(usize, LoraTarget), Halves> = HashMap::new();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let (layer, t, half) = parse_key(name).ok_or_else(|| {
            bad(format!(
                "tensor {name:?} is not a LoRA A/B matrix of a layer's q/k/v/o/gate/up/down projection \
                 (embedding, lm_head and DoRA tensors are not supported)"
            ))
        })?;
        if layer >= cfg.num_layers {
            return Err(mismatch(name, format!("layer {layer}, but the base model has {} layers", cfg.num_layers)));
        }
        let (out, inp) = t.shape(cfg);
        let expected = match half {
            Half::A => [config.r, inp],
            Half::B => [out, config.r],
        };
        let dims = tensors[name].dims();
        if dims != expected {
            return Err(mismatch(
                name,
                format!(
                    "shape {dims:?}, but rank {} on this base model's {t} ({out}x{inp}) needs {expected:?}",
                    config.r
                ),
            ));
        }
        let slot = &mut halves.entry((layer, t)).or_default()[half as usize];
        if slot.is_some() {
            return Err(bad(format!("tensor {name:?} appears twice (with and without the .default infix)")));
        }
        *slot = Some((name.clone(), tensors[name].to_dtype(DType::F32)?));
    }
    if halves.is_empty() {
        return Err(bad("adapter_model.safetensors holds no LoRA tensors".into()));
    }

    let scale = config.scale();
    let mut layers: Vec<[Option<LoraPair>; 7]> = (0..cfg.num_layers).map(|_| Default::default()).collect();
    for ((layer, t), [a, b]) in halves {
        let (a, b) = match (a, b) {
            (Some((_, a)), Some((_, b))) => (a, b),
            (Some((n, _)), None) | (None, Some((n, _))) => {
                return Err(bad(format!("tensor {n:?} has no lora_A/lora_B partner")))
            }
            (None, None) => continue,
        };
        // For a GGUF base, lay B's rows out as the base's permuted Q/K rows are.
        let b = match (cfg.rope_style, t) {
            (RopeStyle::Interleaved, LoraTarget::Q | LoraTarget::K) => {
                let heads = if t == LoraTarget::Q { cfg.num_heads } else { cfg.num_kv_heads };
                let perm = gguf_rope_permutation(heads, cfg.head_dim);
                let n = perm.len();
                b.index_select(&Tensor::from_vec(perm, n, &Device::Cpu)?, 0)?
            }
            _ => b,
        };
        let (a_t, b_t) = (a.t()?.contiguous()?, b.affine(scale, 0.0)?.t()?.contiguous()?);
        layers[layer][t.index()] = Some(LoraPair { a_t: a_t.to_device(device)?, b_t: b_t.to_device(device)? });
    }
    Ok(LoraAdapter { dir: dir.to_path_buf(), config, base: BaseShape::of(cfg), device: device.clone(), layers })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_keys_parse_with_and_without_the_adapter_name() {
        assert_eq!(
            parse_key("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"),
            Some((3, LoraTarget::Q, Half::A))
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.12.mlp.down_proj.lora_B.default.weight"),
            Some((12, LoraTarget::Down, Half::B))
        );
        assert_eq!(parse_key("model.layers.0.mlp.up_proj.lora_B.weight"), Some((0, LoraTarget::Up, Half::B)));
        // Wrong block for the module, embeddings, the head, DoRA magnitudes.
        for k in [
            "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",
            "base_model.model.model.embed_tokens.lora_embedding_A",
            "base_model.model.lm_head.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
            "base_model.model.model.layers.x.self_attn.q_proj.lora_A.weight",
        ] {
            assert_eq!(parse_key(k), None, "{k}");
        }
    }

    #[test]
    fn gguf_permutation_pairs_adjacent_rows() {
        // One head of 4: HF pairs (0, 2) and (1, 3) become GGUF rows (0, 1) and (2, 3).
        assert_eq!(gguf_rope_permutation(1, 4), vec![0, 2, 1, 3]);
        let p = gguf_rope_permutation(2, 4);
        assert_eq!(p, vec![0, 2, 1, 3, 4, 6, 5, 7]);
        let mut sorted = gguf_rope_permutation(3, 16);
        sorted.sort();
        assert_eq!(sorted, (0..48).collect::<Vec<u32>>(), "a permutation");
    }

    #[test]
    fn scale_is_alpha_over_r_or_its_root() {
        let mut c = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            target_modules: vec![],
            use_rslora: false,
            fan_in_fan_out: false,
            base_model_name_or_path: None,
        };
        assert_eq!(c.scale(), 2.0);
        c.use_rslora = true;
        assert_eq!(c.scale(), 4.0);
    }
}
