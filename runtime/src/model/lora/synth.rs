//! `arqon adapters synth`: a deterministic LoRA adapter in the PEFT format,
//! for tests and demos without a training run.
//!
//! Values come from a ChaCha8 stream seeded by [`SynthSpec::seed`], so the
//! same spec writes byte-identical files. Each update's size is set from the
//! base matrix it changes: `A ~ U(-1, 1) / sqrt(in)` and `B` scaled so that
//! `scale * B @ A` has an RMS of [`SynthSpec::STRENGTH`] times the base
//! matrix's RMS. Large enough that greedy output changes, small enough that
//! the text stays the model's own (a random update the size of `W` would
//! turn it into noise).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::{LoraConfig, LoraTarget};
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::weights::Weights;

/// What to synthesize.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthSpec {
    /// The rank `r` (at least 1).
    pub rank: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// The modules to update, in every layer.
    pub targets: Vec<LoraTarget>,
    /// The random seed.
    pub seed: u64,
    /// Recorded as `base_model_name_or_path`.
    pub base_model: String,
}

impl SynthSpec {
    /// The RMS of each update relative to its base matrix's.
    pub const STRENGTH: f64 = 0.15;
}

/// Writes `out/adapter_config.json` and `out/adapter_model.safetensors` for
/// the base model `cfg` with weights `w` (read only for their scale).
pub fn synth(cfg: &ModelConfig, w: &Weights, spec: &SynthSpec, out: &Path) -> Result<()> {
    let bad = |m: String| Error::Adapter { dir: out.to_path_buf(), message: m };
    if spec.rank == 0 || spec.rank > 1024 {
        return Err(bad(format!("rank must be between 1 and 1024, got {}", spec.rank)));
    }
    if !(spec.alpha.is_finite() && spec.alpha > 0.0) {
        return Err(bad(format!("alpha must be a positive number, got {}", spec.alpha)));
    }
    if spec.targets.is_empty() {
        return Err(bad("give at least one target module".into()));
    }
    let mut targets = spec.targets.clone();
    targets.sort();
    targets.dedup();
    let scale = spec.alpha / spec.rank as f64;
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (l, layer) in w.layers.iter().enumerate() {
        for &t in &targets {
            let (rows, cols) = t.shape(cfg);
            let base_rms = rms(&layer.linear(t).to_dense()?)?;
            // RMS(scale B A) = scale * rms(B) * rms(A) * sqrt(r) with rms(U(-1,1)) = 1/sqrt(3).
            let a_amp = 1.0 / (cols as f64).sqrt();
            let b_amp = SynthSpec::STRENGTH * base_rms * 3.0 * (cols as f64).sqrt() / (scale * spec.rank as f64);
            let mut uniform = |n: usize, amp: f64| -> Vec<f32> {
                (0..n).map(|_| (rng.gen_range(-1.0f64..1.0) * amp) as f32).collect()
            };
            let a = uniform(spec.rank * cols, a_amp);
            let b = uniform(rows * spec.rank, b_amp);
            let key = |ab: &str| format!("base_model.model.model.layers.{l}.{}.{t}.lora_{ab}.weight", t.block());
            tensors.insert(key("A"), Tensor::from_vec(a, (spec.rank, cols), &Device::Cpu)?);
            tensors.insert(key("B"), Tensor::from_vec(b, (rows, spec.rank), &Device::Cpu)?);
        }
    }
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": spec.base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": targets.iter().map(|t| t.peft_name()).collect::<Vec<_>>(),
        "bias": "none",
        "use_rslora": false,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "arqon_synth": {"seed": spec.seed, "strength": SynthSpec::STRENGTH},
    });
    std::fs::create_dir_all(out).map_err(|e| bad(format!("cannot create the folder: {e}")))?;
    let text = serde_json::to_string_pretty(&config).map_err(|e| bad(e.to_string()))? + "\n";
    std::fs::write(out.join("adapter_config.json"), text).map_err(|e| bad(format!("cannot write: {e}")))?;
    candle_core::safetensors::save(&tensors, out.join("adapter_model.safetensors"))?;
    // What was written must read back as a valid adapter config.
    LoraConfig::read(out)?;
    Ok(())
}

fn rms(t: &Tensor) -> Result<f64> {
    let n = t.elem_count().max(1) as f64;
    Ok((t.sqr()?.sum_all()?.to_scalar::<f32>()? as f64 / n).sqrt())
}
