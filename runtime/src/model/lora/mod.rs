//! LoRA adapters in the PEFT format (`adapter_config.json` +
//! `adapter_model.safetensors`), applied two ways:
//!
//! - **merged** ([`LoraAdapter::merge`]): new [`Weights`] with
//!   `W + scale * B @ A` for every targeted matrix, a variant of its own.
//!   Targeted matrices become dense f32 (quantized ones are dequantized
//!   first: re-quantizing would throw the small update away); untargeted
//!   ones are shared with the base unchanged.
//! - **at run time, per sequence** ([`SeqChunk::adapter`]): every projection
//!   computes the base product for the whole batch, then, for each group of
//!   rows that share an adapter, adds `(x_rows @ A^T) @ (scale * B)^T`.
//!   Several adapters (and plain sequences) share one batch; a batch without
//!   adapters runs exactly the base code path, so its logits are bitwise
//!   those of the base model.
//!
//! Invariants: a [`LoraAdapter`] has been checked against one base
//! [`ModelConfig`] at load (layer indices, module names, `A: [r, in]`,
//! `B: [out, r]`); [`LoraAdapter::check`] re-checks that cheaply before a
//! step, so an adapter for another base is a typed error, never a shape
//! panic. Its tensors are laid out for the base's weights: for a GGUF base
//! (interleaved RoPE) the rows of `B` for `q_proj`/`k_proj` are permuted as
//! llama.cpp's converter permutes the base's Q and K, so PEFT adapters
//! trained on the Hugging Face checkpoint apply to its GGUF conversion.
//!
//! Hot loading lives in [`AdapterRegistry`]; [`synth`] writes deterministic
//! adapters for tests and demos.

mod load;
mod registry;
mod synth;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{Device, Tensor};
use serde::Serialize;

pub use load::LoraConfig;
pub use registry::{check_adapter_name, AdapterRegistry};
pub use synth::{synth, SynthSpec};

use super::config::{ModelConfig, RopeStyle};
use super::llama::SeqChunk;
use super::weights::{Linear, Weights};
use crate::error::{Error, Result};

/// One of the seven projections of a decoder layer that an adapter can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraTarget {
    /// `self_attn.q_proj`.
    Q,
    /// `self_attn.k_proj`.
    K,
    /// `self_attn.v_proj`.
    V,
    /// `self_attn.o_proj`.
    O,
    /// `mlp.gate_proj`.
    Gate,
    /// `mlp.up_proj`.
    Up,
    /// `mlp.down_proj`.
    Down,
}

impl LoraTarget {
    /// Every target, in layer order.
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::Q,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::O,
        LoraTarget::Gate,
        LoraTarget::Up,
        LoraTarget::Down,
    ];

    /// The module's name in PEFT's `target_modules` and tensor keys (`q_proj`).
    pub fn peft_name(self) -> &'static str {
        match self {
            LoraTarget::Q => "q_proj",
            LoraTarget::K => "k_proj",
            LoraTarget::V => "v_proj",
            LoraTarget::O => "o_proj",
            LoraTarget::Gate => "gate_proj",
            LoraTarget::Up => "up_proj",
            LoraTarget::Down => "down_proj",
        }
    }

    /// The block it lives in within a Hugging Face layer (`self_attn` or `mlp`).
    pub fn block(self) -> &'static str {
        match self {
            LoraTarget::Q | LoraTarget::K | LoraTarget::V | LoraTarget::O => "self_attn",
            LoraTarget::Gate | LoraTarget::Up | LoraTarget::Down => "mlp",
        }
    }

    /// `(out, in)` of the base matrix for `cfg`.
    pub fn shape(self, cfg: &ModelConfig) -> (usize, usize) {
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let (q, kv) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        match self {
            LoraTarget::Q => (q, h),
            LoraTarget::K | LoraTarget::V => (kv, h),
            LoraTarget::O => (h, q),
            LoraTarget::Gate | LoraTarget::Up => (inter, h),
            LoraTarget::Down => (h, inter),
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for LoraTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.peft_name())
    }
}

impl FromStr for LoraTarget {
    type Err = Error;

    /// Parses a PEFT module name (`q_proj`; `q` works too).
    fn from_str(s: &str) -> Result<Self> {
        LoraTarget::ALL
            .into_iter()
            .find(|t| t.peft_name() == s || t.peft_name().strip_suffix("_proj") == Some(s))
            .ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "unknown LoRA target {s:?}: expected one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
                ))
            })
    }
}

/// The facts of a base model an adapter's tensors were checked against.
#[derive(Debug, Clone, PartialEq)]
struct BaseShape {
    shapes: [(usize, usize); 7],
    num_layers: usize,
    num_heads: usize,
    num_kv_heads: usize,
    rope_style: RopeStyle,
}

impl BaseShape {
    fn of(cfg: &ModelConfig) -> Self {
        BaseShape {
            shapes: LoraTarget::ALL.map(|t| t.shape(cfg)),
            num_layers: cfg.num_layers,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            rope_style: cfg.rope_style,
        }
    }
}

/// One targeted matrix's low-rank update, laid out for `x @ A^T @ (s B)^T`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `A^T`, `[in, r]`, contiguous.
    a_t: Tensor,
    /// `(scale * B)^T`, `[r, out]`, contiguous (the scale is folded in once at load).
    b_t: Tensor,
}

impl LoraPair {
    /// The update for rows `x` (`[rows, in]`): `[rows, out]`.
    fn delta(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.a_t)?.matmul(&self.b_t)?)
    }

    /// `scale * B @ A`, `[out, in]`.
    fn dense(&self) -> Result<Tensor> {
        Ok(self.b_t.t()?.contiguous()?.matmul(&self.a_t.t()?.contiguous()?)?)
    }
}

/// A loaded LoRA adapter, checked against (and laid out for) one base model.
#[derive(Debug)]
pub struct LoraAdapter {
    dir: PathBuf,
    config: LoraConfig,
    base: BaseShape,
    /// Where its tensors are: the device of the model it serves.
    device: Device,
    /// Per layer, per [`LoraTarget`] (by index), the update if targeted.
    layers: Vec<[Option<LoraPair>; 7]>,
}

impl LoraAdapter {
    /// Reads a PEFT adapter folder, checks every tensor against `cfg` and
    /// puts them on `device`, the device of the model it is for.
    pub fn load(dir: &Path, cfg: &ModelConfig, device: &Device) -> Result<Self> {
        let adapter = load::load(dir, cfg, device)?;
        // Loaded off the engine thread (an admin request), used on it.
        crate::device::settle(device)?;
        Ok(adapter)
    }

    /// The folder it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its `adapter_config.json`.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The modules it updates (in at least one layer), in layer order.
    pub fn targets(&self) -> Vec<LoraTarget> {
        LoraTarget::ALL.into_iter().filter(|t| self.layers.iter().any(|l| l[t.index()].is_some())).collect()
    }

    /// Errors unless this adapter was loaded for a model shaped like `cfg`.
    pub fn check(&self, cfg: &ModelConfig) -> Result<()> {
        if self.base == BaseShape::of(cfg) {
            return Ok(());
        }
        Err(Error::AdapterMismatch {
            dir: self.dir.clone(),
            tensor: "*".into(),
            message: format!(
                "it was loaded for a {}-layer model with projections {:?}, this one has {} layers and {:?}",
                self.base.num_layers,
                self.base.shapes,
                cfg.num_layers,
                BaseShape::of(cfg).shapes
            ),
        })
    }

    fn pair(&self, layer: usize, t: LoraTarget) -> Option<&LoraPair> {
        self.layers.get(layer).and_then(|l| l[t.index()].as_ref())
    }

    /// The base weights with this adapter merged in: `W + scale * B @ A` for
    /// each targeted matrix (dense f32), every other tensor shared unchanged.
    /// `cfg` must describe `w`.
    pub fn merge(&self, w: &Weights, cfg: &ModelConfig) -> Result<Weights> {
        self.check(cfg)?;
        let mut out = w.clone();
        for (l, layer) in out.layers.iter_mut().enumerate() {
            for t in LoraTarget::ALL {
                if let Some(p) = self.pair(l, t) {
                    let lin = layer.linear_mut(t);
                    let merged = (lin.to_dense()? + p.dense()?)?;
                    *lin = Linear::from_dense(merged)?;
                }
            }
        }
        Ok(out)
    }
}

/// The adapters of one step's batch, grouped: for each distinct adapter, the
/// indices of its rows in the flattened `[tokens, hidden]` matrix.
#[derive(Debug, Default)]
pub(crate) struct BatchAdapters<'a> {
    groups: Vec<Group<'a>>,
}

#[derive(Debug)]
struct Group<'a> {
    adapter: &'a LoraAdapter,
    /// Row indices (u32), or `None` when the group is every row of the batch.
    rows: Option<Tensor>,
}

impl<'a> BatchAdapters<'a> {
    /// Groups `batch`'s rows by adapter (the same adapter is the same object).
    pub(crate) fn new(batch: &[SeqChunk<'a>], device: &Device) -> Result<Self> {
        let mut groups: Vec<(&'a LoraAdapter, Vec<u32>)> = Vec::new();
        let mut off = 0u32;
        for c in batch {
            let n = c.tokens.len() as u32;
            if let Some(a) = c.adapter {
                let rows = off..off + n;
                match groups.iter_mut().find(|(g, _)| std::ptr::eq(*g, a)) {
                    Some((_, r)) => r.extend(rows),
                    None => groups.push((a, rows.collect())),
                }
            }
            off += n;
        }
        let total = off as usize;
        let groups = groups
            .into_iter()
            .map(|(adapter, rows)| {
                let rows =
                    if rows.len() == total { None } else { Some(Tensor::from_vec(rows.clone(), rows.len(), device)?) };
                Ok(Group { adapter, rows })
            })
            .collect::<Result<_>>()?;
        Ok(BatchAdapters { groups })
    }

    /// Checks every adapter against the model about to run, on `device`.
    pub(crate) fn check(&self, cfg: &ModelConfig, device: &Device) -> Result<()> {
        self.groups.iter().try_for_each(|g| {
            g.adapter.check(cfg)?;
            if g.adapter.device.same_device(device) {
                return Ok(());
            }
            Err(Error::AdapterMismatch {
                dir: g.adapter.dir.clone(),
                tensor: "*".into(),
                message: format!(
                    "it was loaded onto {:?}, the model runs on {:?}",
                    g.adapter.device.location(),
                    device.location()
                ),
            })
        })
    }

    /// Whether any adapter of the batch updates one of `targets` at `layer`.
    pub(crate) fn touches(&self, layer: usize, targets: &[LoraTarget]) -> bool {
        self.groups.iter().any(|g| targets.iter().any(|t| g.adapter.pair(layer, *t).is_some()))
    }

    /// `x @ W^T` for layer `layer`'s projection `t`, plus each group's update
    /// on its own rows. Rows without an adapter are the base product, bitwise.
    pub(crate) fn project(&self, layer: usize, t: LoraTarget, w: &Linear, x: &Tensor) -> Result<Tensor> {
        self.add_updates(layer, t, x, w.forward(x)?)
    }

    /// [`BatchAdapters::project`] for several targets that read the same `x`
    /// (Q, K and V; gate and up), their base products in one pass
    /// ([`Linear::forward_many`]).
    pub(crate) fn project_many(
        &self,
        layer: usize,
        targets: &[LoraTarget],
        ws: &[&Linear],
        x: &Tensor,
    ) -> Result<Vec<Tensor>> {
        let base = Linear::forward_many(ws, x)?;
        base.into_iter().zip(targets).map(|(out, t)| self.add_updates(layer, *t, x, out)).collect()
    }

    /// Adds each adapter's update for target `t` to its rows of `out`.
    fn add_updates(&self, layer: usize, t: LoraTarget, x: &Tensor, mut out: Tensor) -> Result<Tensor> {
        for g in &self.groups {
            let Some(p) = g.adapter.pair(layer, t) else { continue };
            out = match &g.rows {
                None => (out + p.delta(x)?)?,
                Some(rows) => out.index_add(rows, &p.delta(&x.index_select(rows, 0)?)?, 0)?,
            };
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
