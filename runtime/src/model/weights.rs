//! The decoder's weights, independent of the file format they came from.
//!
//! Loaders ([`super::gguf`], [`super::safetensors`]) fill a [`Weights`] through
//! the [`TensorSource`] trait, which checks every shape against the
//! [`ModelConfig`] so a mismatched file fails at load, naming the tensor.
//!
//! Sources read on the CPU; [`load_weights`] places every tensor on the
//! model's device as it goes. On the CPU, `Q4_1` and `Q8_0` matrices run on our SIMD
//! kernel and dense matrices are f32. On a CUDA device every quantized matrix
//! stays a GGML `QTensor` for candle's CUDA kernels (products of 1 to 8 rows
//! in `Q8_0`/`Q4_0`/`Q4_1` go to our `quant_gemv` instead under
//! `quantized=ours`, [`super::quant_op`]),
//! dense matrices and dense embedding tables are bf16
//! ([`crate::device::dense_dtype`]), and norms stay f32; activations are f32
//! everywhere, so a bf16 matrix converts its input and output ([`Linear::forward`];
//! matrices applied to the same input, as q/k/v and gate/up, share one
//! conversion of it, [`Linear::forward_many`]). Dense q/k/v and gate/up are
//! stacked at load into one matrix each ([`Linear::stack`]), each a row range
//! of it, so a step multiplies them in one product ([`Linear::forward_stacked`]):
//! on a GPU, with the conversions folded into the copies that follow (see
//! `Llama::layer`), 11 launches fewer per layer.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arqon_kernels::plan::DenseGemvVariant;
use arqon_kernels::quant::{Q4_1Matrix, Q8_0Matrix};
use arqon_kernels::KernelPlan;
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::config::ModelConfig;
use super::gemv_op::{DenseGemv, DenseGemvNorm};
use super::lora::LoraTarget;
use super::plan::kernel_plan;
use super::quant_op::{QuantBlocks, QuantGemv};
use crate::device::dense_dtype;
use crate::error::{Error, Result};

/// A matrix applied as `x @ W^T`, stored quantized or dense.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: LinearImpl,
    /// A block-format matrix on candle's kernels: a copy of its blocks for
    /// our quantized GEMV under `quantized=ours` (made at load on a GPU, on
    /// the first product on the CPU).
    blocks: QuantBlocks,
    format: GgmlDType,
    /// Where this matrix's rows lie in a matrix it was stacked into with
    /// others applied to the same input ([`Linear::stack`]).
    stacked: Option<Stacked>,
}

/// The stack a dense matrix is a row range of.
#[derive(Debug, Clone)]
struct Stacked {
    /// Every stacked matrix, rows one after another.
    whole: Tensor,
    /// This matrix's first row in it.
    first_row: usize,
    /// And its number of rows.
    rows: usize,
}

/// Who computes the product.
#[derive(Debug, Clone)]
enum LinearImpl {
    /// candle's kernels (dense, and every GGML format but the ones below).
    Candle(QMatMul),
    /// Our SIMD `Q4_1` kernel (candle's is scalar).
    Q4_1(Arc<Q4_1Matrix>),
    /// Our tiled SIMD `Q8_0` kernel (candle's one-row AVX2 loop is
    /// latency-bound).
    Q8_0(Arc<Q8_0Matrix>),
}

impl Linear {
    /// A matrix run by `inner`, stored as `format`, stacked with none, no blocks copied.
    fn new(inner: LinearImpl, format: GgmlDType) -> Self {
        Linear { inner, blocks: QuantBlocks::default(), format, stacked: None }
    }

    /// Wraps a (possibly quantized) tensor of shape `[out, in]`, on its own device.
    pub fn from_qtensor(t: Arc<QTensor>) -> Result<Self> {
        let device = t.device();
        Self::from_qtensor_on(t, &device)
    }

    /// Wraps a (possibly quantized) tensor of shape `[out, in]` to run on
    /// `device` (moving it there if it is elsewhere; see the module docs for
    /// which kernel runs which format on which device).
    pub fn from_qtensor_on(t: Arc<QTensor>, device: &Device) -> Result<Self> {
        let format = t.dtype();
        if matches!(format, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            // What QMatMul::from_arc does for dense formats, in the device's dtype.
            let w = t.dequantize(&t.device())?.to_dtype(dense_dtype(device))?.to_device(device)?;
            return Ok(Linear::new(LinearImpl::Candle(QMatMul::Tensor(w)), format));
        }
        if matches!(format, GgmlDType::Q4_1 | GgmlDType::Q8_0) && device.is_cpu() {
            let t = qtensor_on(t, device)?;
            let (rows, cols) = t.shape().dims2()?;
            let bytes = t.data()?;
            let err = |e: arqon_kernels::KernelError| Error::InvalidRequest(format!("{format:?} weights: {e}"));
            let inner = if format == GgmlDType::Q4_1 {
                LinearImpl::Q4_1(Arc::new(Q4_1Matrix::from_ggml_bytes(rows, cols, &bytes).map_err(err)?))
            } else {
                LinearImpl::Q8_0(Arc::new(Q8_0Matrix::from_ggml_bytes(rows, cols, &bytes).map_err(err)?))
            };
            return Ok(Linear::new(inner, format));
        }
        // Under `quantized=ours` on a GPU the op's copy of the blocks is made now, from the file's
        // bytes, before the KV cache takes the device's free memory (and counted in resident_bytes).
        let linear = Linear::new(LinearImpl::Candle(QMatMul::from_arc(qtensor_on(t.clone(), device)?)?), format);
        if !device.is_cpu() && super::quant_op::serves_format(kernel_plan(), device, format) {
            linear.blocks.make(&t, device)?;
        }
        Ok(linear)
    }

    /// Wraps a dense `[out, in]` tensor, held in its device's dense dtype
    /// (f32 on the CPU, bf16 on a GPU).
    pub fn from_dense(t: Tensor) -> Result<Self> {
        let format = match t.dtype() {
            DType::F16 => GgmlDType::F16,
            DType::BF16 => GgmlDType::BF16,
            _ => GgmlDType::F32,
        };
        let w = t.to_dtype(dense_dtype(t.device()))?;
        Ok(Linear::new(LinearImpl::Candle(QMatMul::Tensor(w)), format))
    }

    /// `x @ W^T` for `x` of shape `[tokens, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, kernel_plan())
    }

    /// [`Linear::forward`] with the product in `dtype`: our dense GEMV, where
    /// it runs ([`DenseGemv::route`]), writes it so (f32 or the matrix's
    /// type) in its one launch; otherwise the product is converted.
    pub fn forward_as(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        self.forward_as_with(x, dtype, kernel_plan())
    }

    /// [`Linear::forward_as`] under `plan`.
    fn forward_as_with(&self, x: &Tensor, dtype: DType, plan: Option<KernelPlan>) -> Result<Tensor> {
        if let Some((v, w)) = self.dense_gemv(x, plan) {
            if dtype == DType::F32 || dtype == w.dtype() {
                return DenseGemv::new(v, dtype).forward(x, w);
            }
        }
        Ok(self.forward_with(x, plan)?.to_dtype(dtype)?)
    }

    /// The down product of the MLP's activation of stacked gate/up rows
    /// (`[tokens, 2 × in]`), `silu(gate) * up @ W^T` in `dtype`, as one launch
    /// of our dense GEMV where it runs; `None` where it does not (the caller
    /// takes the activation, then [`Linear::forward`]). The numbers are the
    /// activation op's, then the GEMV's.
    pub fn forward_silu_as(&self, gate_up: &Tensor, dtype: DType) -> Result<Option<Tensor>> {
        self.forward_silu_as_with(gate_up, dtype, kernel_plan())
    }

    /// [`Linear::forward_silu_as`] under `plan`.
    fn forward_silu_as_with(&self, gate_up: &Tensor, dtype: DType, plan: Option<KernelPlan>) -> Result<Option<Tensor>> {
        let LinearImpl::Candle(QMatMul::Tensor(w)) = &self.inner else { return Ok(None) };
        match DenseGemv::route_silu(plan, gate_up, w) {
            Some(v) if dtype == DType::F32 || dtype == w.dtype() => {
                Ok(Some(DenseGemv::with_silu(v, dtype).forward(gate_up, w)?))
            }
            _ => Ok(None),
        }
    }

    /// The variant of our dense GEMV that takes this matrix's product with
    /// `x` under `plan`, and the matrix; `None` for candle's path.
    fn dense_gemv(&self, x: &Tensor, plan: Option<KernelPlan>) -> Option<(DenseGemvVariant, &Tensor)> {
        match &self.inner {
            LinearImpl::Candle(QMatMul::Tensor(w)) => DenseGemv::route(plan, x, w).map(|v| (v, w)),
            _ => None,
        }
    }

    /// [`Linear::forward`] under `plan` (the process's in serving).
    fn forward_with(&self, x: &Tensor, plan: Option<KernelPlan>) -> Result<Tensor> {
        // A dense matrix and few rows (1-32, a small product) under a plan that names our GEMV: one op,
        // in `x`'s dtype.
        if let Some((v, w)) = self.dense_gemv(x, plan) {
            return DenseGemv::new(v, x.dtype()).forward(x, w);
        }
        if let LinearImpl::Candle(QMatMul::QTensor(q)) = &self.inner {
            // A GGUF block format and 1-8 rows under `quantized=ours`: our quantized GEMV. Rows it takes by
            // their count but cannot (not f32 `[rows, k]`) would run candle's kernels in a step judged
            // capturable by that count (Llama::not_capturable): refused instead.
            if x.rank() == 2 && super::quant_op::takes(plan, x.device(), x.dim(0)?, q) {
                let op = QuantGemv::route(plan, x, q).ok_or_else(|| {
                    Error::InvalidRequest(format!(
                        "quantized GEMV: rows {:?} {:?} for a {:?} matrix: it takes f32 [rows, {}]",
                        x.dims(),
                        x.dtype(),
                        q.shape().dims(),
                        q.shape().dims().get(1).copied().unwrap_or(0)
                    ))
                })?;
                return op.forward(x, &self.blocks.of(q)?);
            }
        }
        match &self.inner {
            // A bf16 matrix (GPU) with f32 activations: multiply in bf16, hand back f32.
            LinearImpl::Candle(q @ QMatMul::Tensor(w)) if w.dtype() != x.dtype() => {
                Ok(q.forward(&x.to_dtype(w.dtype())?)?.to_dtype(x.dtype())?)
            }
            LinearImpl::Candle(q) => Ok(q.forward(x)?),
            LinearImpl::Q4_1(w) => Ok(cpu_matmul(x, &[w.rows()], |xs, m, o| w.matmul(xs, m, o[0]))?.remove(0)),
            LinearImpl::Q8_0(w) => Ok(cpu_matmul(x, &[w.rows()], |xs, m, o| w.matmul(xs, m, o[0]))?.remove(0)),
        }
    }

    /// `x @ W_j^T` for several matrices of the same width: one activation
    /// quantization and one parallel pass when all run on our CPU `Q4_1`
    /// kernel (each result equals [`Linear::forward`]'s), else one by one.
    pub fn forward_many(ls: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let q4: Option<Vec<&Q4_1Matrix>> = ls
            .iter()
            .map(|l| match &l.inner {
                LinearImpl::Q4_1(w) => Some(w.as_ref()),
                _ => None,
            })
            .collect();
        let Some(ws) = q4.filter(|ws| ws.len() > 1) else {
            return Self::forward_dense_many(ls, x);
        };
        let rows: Vec<usize> = ws.iter().map(|w| w.rows()).collect();
        cpu_matmul(x, &rows, |xs, m, outs| Q4_1Matrix::matmul_many(&ws, xs, m, outs))
    }

    /// [`Linear::forward`] of each of `ls`; when they are all dense matrices
    /// of one dtype other than `x`'s (bf16 on a GPU), `x` is converted to it
    /// once for all of them, not once each (two kernel launches fewer per
    /// extra matrix; the same values: one conversion of the same `x`).
    fn forward_dense_many(ls: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let dtype = ls.first().and_then(|l| l.dense_dtype()).filter(|d| *d != x.dtype());
        match dtype {
            Some(d) if ls.len() > 1 && ls.iter().all(|l| l.dense_dtype() == Some(d)) => {
                let xd = x.to_dtype(d)?;
                ls.iter().map(|l| Ok(l.forward(&xd)?.to_dtype(x.dtype())?)).collect()
            }
            _ => ls.iter().map(|l| l.forward(x)).collect(),
        }
    }

    /// Dense matrices of one dtype and width (all of `ls`, else they come
    /// back as they are), stacked into one `[sum of rows, in]` matrix that
    /// each becomes a row range of: the same numbers in the same memory,
    /// which [`Linear::forward_stacked`] multiplies in one product.
    pub fn stack<const N: usize>(ls: [Linear; N]) -> Result<[Linear; N]> {
        let dense: Option<Vec<&Tensor>> = ls
            .iter()
            .map(|l| match &l.inner {
                LinearImpl::Candle(QMatMul::Tensor(w)) if l.stacked.is_none() => Some(w),
                _ => None,
            })
            .collect();
        let Some(ws) = dense.filter(|ws| {
            ws.len() > 1
                && ws.iter().all(|w| w.dtype() == ws[0].dtype() && w.rank() == 2 && w.dim(1).ok() == ws[0].dim(1).ok())
        }) else {
            return Ok(ls);
        };
        let whole = Tensor::cat(&ws, 0)?;
        let rows: Vec<usize> = ws.iter().map(|w| w.dim(0)).collect::<candle_core::Result<_>>()?;
        let mut first_row = 0;
        let mut out = Vec::with_capacity(N);
        for (l, rows) in ls.into_iter().zip(rows) {
            let view = whole.narrow(0, first_row, rows)?;
            out.push(Linear {
                stacked: Some(Stacked { whole: whole.clone(), first_row, rows }),
                ..Linear::new(LinearImpl::Candle(QMatMul::Tensor(view)), l.format)
            });
            first_row += rows;
        }
        Ok(out.try_into().unwrap_or_else(|v: Vec<Linear>| unreachable!("{} matrices stacked for {N}", v.len())))
    }

    /// `x @ [W_1; W_2; …]^T`, `[tokens, sum of outs]` in the stack's dtype
    /// (`x` converted to it: bf16 on a GPU, so the caller converts the
    /// product where it copies it anyway), in one product, when `ls` are in
    /// order every matrix of one stack ([`Linear::stack`]); `None` otherwise.
    /// Column range `j` is [`Linear::forward`] of `ls[j]` but for the
    /// products' summation order and the output's dtype.
    pub fn forward_stacked(ls: &[&Linear], x: &Tensor) -> Result<Option<Tensor>> {
        Self::forward_stacked_with(ls, x, kernel_plan())
    }

    /// [`Linear::forward_stacked`] under `plan`.
    fn forward_stacked_with(ls: &[&Linear], x: &Tensor, plan: Option<KernelPlan>) -> Result<Option<Tensor>> {
        let Some(whole) = Self::stack_of(ls)? else { return Ok(None) };
        if let Some(v) = DenseGemv::route(plan, x, whole) {
            // Our GEMV takes `x` as it is: no conversion first.
            return Ok(Some(DenseGemv::new(v, whole.dtype()).forward(x, whole)?));
        }
        Ok(Some(x.to_dtype(whole.dtype())?.matmul(&whole.t()?)?))
    }

    /// The stacked matrix `ls` are, in order, every part of, if they are.
    fn stack_of<'a>(ls: &[&'a Linear]) -> Result<Option<&'a Tensor>> {
        let Some(Stacked { whole, .. }) = ls.first().and_then(|l| l.stacked.as_ref()) else { return Ok(None) };
        let mut next = 0;
        for l in ls {
            match &l.stacked {
                Some(s) if s.whole.id() == whole.id() && s.first_row == next => next += s.rows,
                _ => return Ok(None),
            }
        }
        Ok((next == whole.dim(0)?).then_some(whole))
    }

    /// The residual add and RMSNorm (weight `g`) fused into
    /// [`Linear::forward_stacked`]'s product: `(x + d, rmsnorm(x + d) * g @
    /// stackᵀ)`, both in `x`'s dtype, in one launch, when `ls` are a whole
    /// stack and our dense GEMV takes the product (the plan names one of
    /// ours, as [`DenseGemv::route`] says for the rows, `x`, `d` and `g` of one dtype, f32 or the stack's);
    /// `None` otherwise, for the caller to norm and multiply apart.
    pub fn forward_stacked_norm(
        ls: &[&Linear],
        (x, d): (&Tensor, &Tensor),
        g: &Tensor,
        eps: f32,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let Some(whole) = Self::stack_of(ls)? else { return Ok(None) };
        match DenseGemvNorm::route(kernel_plan(), (x, d, g), whole) {
            Some(v) => Ok(Some(DenseGemvNorm::new(v, g, eps)?.forward(x, d, whole)?)),
            None => Ok(None),
        }
    }

    /// The dtype of a dense matrix (`None` for a quantized one).
    pub fn dense_dtype(&self) -> Option<DType> {
        match &self.inner {
            LinearImpl::Candle(QMatMul::Tensor(w)) => Some(w.dtype()),
            _ => None,
        }
    }

    /// Whether products run on candle's quantized kernels (`QMatMul` over a
    /// quantized tensor: GGUF formats on a GPU, and on the CPU those we have
    /// no kernel of our own for).
    pub fn is_candle_quantized(&self) -> bool {
        matches!(&self.inner, LinearImpl::Candle(QMatMul::QTensor(_)))
    }

    /// Whether our quantized GEMV, not candle, multiplies this matrix by
    /// `rows` f32 rows on `device` under `plan` ([`QuantGemv::route`]).
    pub(crate) fn quantized_by_ours(&self, rows: usize, plan: Option<KernelPlan>, device: &Device) -> bool {
        match &self.inner {
            LinearImpl::Candle(QMatMul::QTensor(q)) => super::quant_op::takes(plan, device, rows, q),
            _ => false,
        }
    }

    /// The storage format of the weights, as in the file.
    pub fn format(&self) -> GgmlDType {
        self.format
    }

    /// The matrix as a dense f32 `[out, in]` tensor (quantized formats dequantized).
    pub fn to_dense(&self) -> Result<Tensor> {
        Ok(match &self.inner {
            LinearImpl::Candle(QMatMul::QTensor(q)) => q.dequantize(&q.device())?,
            LinearImpl::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.to_dtype(DType::F32)?,
            LinearImpl::Q4_1(m) => dense(m.rows(), m.cols(), |r, row| m.dequantize_row(r, row))?,
            LinearImpl::Q8_0(m) => dense(m.rows(), m.cols(), |r, row| m.dequantize_row(r, row))?,
        })
    }

    /// Bytes the matrix occupies in memory as it is run (dense f16/bf16
    /// files are widened to f32 on the CPU path, so they count 4 bytes a
    /// weight there; on a GPU dense matrices are bf16, 2 bytes).
    pub fn resident_bytes(&self) -> u64 {
        match &self.inner {
            LinearImpl::Candle(QMatMul::QTensor(t)) => t.storage_size_in_bytes() as u64 + self.blocks.bytes(),
            LinearImpl::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => tensor_bytes(t),
            LinearImpl::Q4_1(w) => w.size_in_bytes() as u64,
            LinearImpl::Q8_0(w) => w.size_in_bytes() as u64,
        }
    }
}

/// A `[rows, cols]` f32 tensor from a row dequantizer.
fn dense(rows: usize, cols: usize, row: impl Fn(usize, &mut [f32])) -> Result<Tensor> {
    let mut v = vec![0f32; rows * cols];
    for (r, out) in v.chunks_exact_mut(cols).enumerate() {
        row(r, out);
    }
    Ok(Tensor::from_vec(v, (rows, cols), &Device::Cpu)?)
}

/// `x @ W_j^T` through one of our CPU kernels (`[tokens, in]` f32 in, one
/// `[tokens, rows[j]]` f32 tensor out per matrix).
fn cpu_matmul(
    x: &Tensor,
    rows: &[usize],
    kernel: impl FnOnce(&[f32], usize, &mut [&mut [f32]]) -> std::result::Result<(), arqon_kernels::KernelError>,
) -> Result<Vec<Tensor>> {
    let (m, _) = x.dims2()?;
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let mut outs: Vec<Vec<f32>> = rows.iter().map(|r| vec![0f32; m * r]).collect();
    let mut refs: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
    kernel(&xs, m, &mut refs).map_err(|e| Error::InvalidRequest(e.to_string()))?;
    outs.into_iter().zip(rows).map(|(o, r)| Ok(Tensor::from_vec(o, (m, *r), x.device())?)).collect()
}

fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

/// `t` on `device`: itself if it is there already, else its GGML bytes
/// uploaded (candle has no `QTensor::to_device`).
fn qtensor_on(t: Arc<QTensor>, device: &Device) -> Result<Arc<QTensor>> {
    if t.device().same_device(device) {
        return Ok(t);
    }
    let storage = QStorage::from_data(t.data()?, device, t.dtype())?;
    Ok(Arc::new(QTensor::new(storage, t.shape().clone())?))
}

/// The token embedding table, kept in its file format (quantized tables are
/// dequantized row by row at lookup).
#[derive(Debug, Clone)]
pub enum Embedding {
    /// A quantized table.
    Quantized(Arc<QTensor>),
    /// A dense table (f32 on the CPU, bf16 on a GPU).
    Dense(Tensor),
}

impl Embedding {
    /// Looks up rows for `ids` (a 1-D u32 tensor): `[n, hidden]`, f32.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_as(ids, DType::F32)
    }

    /// [`Embedding::forward`] in `dtype` (one conversion, none for a dense
    /// table already in it).
    pub fn forward_as(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        Ok(match self {
            Embedding::Quantized(q) => q.embedding(ids)?.to_dtype(dtype)?,
            Embedding::Dense(t) => t.index_select(ids, 0)?.to_dtype(dtype)?,
        })
    }
}

impl Embedding {
    /// Bytes the table occupies in memory.
    pub fn resident_bytes(&self) -> u64 {
        match self {
            Embedding::Quantized(q) => q.storage_size_in_bytes() as u64,
            Embedding::Dense(t) => tensor_bytes(t),
        }
    }
}

/// One decoder layer's weights.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// RMSNorm before attention.
    pub attn_norm: Tensor,
    /// Query projection `[heads*hd, hidden]`.
    pub wq: Linear,
    /// Key projection `[kv_heads*hd, hidden]`.
    pub wk: Linear,
    /// Value projection `[kv_heads*hd, hidden]`.
    pub wv: Linear,
    /// Output projection `[hidden, heads*hd]`.
    pub wo: Linear,
    /// RMSNorm before the MLP.
    pub ffn_norm: Tensor,
    /// SwiGLU gate `[inter, hidden]`.
    pub w_gate: Linear,
    /// SwiGLU up `[inter, hidden]`.
    pub w_up: Linear,
    /// MLP down `[hidden, inter]`.
    pub w_down: Linear,
}

impl LayerWeights {
    /// The projection a LoRA target names.
    pub fn linear(&self, t: LoraTarget) -> &Linear {
        match t {
            LoraTarget::Q => &self.wq,
            LoraTarget::K => &self.wk,
            LoraTarget::V => &self.wv,
            LoraTarget::O => &self.wo,
            LoraTarget::Gate => &self.w_gate,
            LoraTarget::Up => &self.w_up,
            LoraTarget::Down => &self.w_down,
        }
    }

    /// The projection a LoRA target names, to replace it.
    pub fn linear_mut(&mut self, t: LoraTarget) -> &mut Linear {
        match t {
            LoraTarget::Q => &mut self.wq,
            LoraTarget::K => &mut self.wk,
            LoraTarget::V => &mut self.wv,
            LoraTarget::O => &mut self.wo,
            LoraTarget::Gate => &mut self.w_gate,
            LoraTarget::Up => &mut self.w_up,
            LoraTarget::Down => &mut self.w_down,
        }
    }
}

/// All of a decoder's weights.
#[derive(Debug, Clone)]
pub struct Weights {
    /// Token embedding.
    pub embed: Embedding,
    /// Decoder layers, first to last.
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm.
    pub norm: Tensor,
    /// LM head `[vocab, hidden]` (the embedding itself when tied).
    pub lm_head: Linear,
}

impl Weights {
    /// Every matrix: each layer's projections, then the LM head.
    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().flat_map(|l| LoraTarget::ALL.map(|t| l.linear(t))).chain(std::iter::once(&self.lm_head))
    }

    /// Bytes all weights occupy in memory as they are run. A tied LM head is
    /// counted once when it shares the embedding's tensor, twice when it is
    /// held in its own run format (dense f32, or our Q4_1 layout).
    pub fn resident_bytes(&self) -> u64 {
        let layers: u64 = self
            .layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]
                    .iter()
                    .map(|m| m.resident_bytes())
                    .sum::<u64>()
                    + tensor_bytes(&l.attn_norm)
                    + tensor_bytes(&l.ffn_norm)
            })
            .sum();
        let shared = match (&self.embed, &self.lm_head.inner) {
            (Embedding::Quantized(e), LinearImpl::Candle(QMatMul::QTensor(h))) => Arc::ptr_eq(e, h),
            _ => false,
        };
        let head = if shared { 0 } else { self.lm_head.resident_bytes() };
        layers + self.embed.resident_bytes() + head + tensor_bytes(&self.norm)
    }
}

impl Weights {
    /// These weights with every dense layer matrix held in `dtype` and
    /// stacked again as at load (what a GPU holds: bf16; for CPU tests of the
    /// GPU's dtype paths). Quantized matrices stay as they are.
    pub fn dense_layers_as(&self, dtype: DType) -> Result<Weights> {
        let mut w = self.clone();
        let as_dtype = |l: &Linear| -> Result<Linear> {
            Ok(match &l.inner {
                LinearImpl::Candle(QMatMul::Tensor(t)) => {
                    Linear::new(LinearImpl::Candle(QMatMul::Tensor(t.to_dtype(dtype)?)), l.format)
                }
                _ => Linear { stacked: None, ..l.clone() },
            })
        };
        for layer in &mut w.layers {
            [layer.wq, layer.wk, layer.wv] =
                Linear::stack([as_dtype(&layer.wq)?, as_dtype(&layer.wk)?, as_dtype(&layer.wv)?])?;
            [layer.w_gate, layer.w_up] = Linear::stack([as_dtype(&layer.w_gate)?, as_dtype(&layer.w_up)?])?;
            layer.wo = as_dtype(&layer.wo)?;
            layer.w_down = as_dtype(&layer.w_down)?;
        }
        Ok(w)
    }
}

#[cfg(test)]
impl Weights {
    /// These weights with no matrix stacked: every projection its own product.
    pub(crate) fn unstacked(&self) -> Weights {
        let mut w = self.clone();
        for layer in &mut w.layers {
            for l in [&mut layer.wq, &mut layer.wk, &mut layer.wv, &mut layer.w_gate, &mut layer.w_up] {
                l.stacked = None;
            }
        }
        w
    }
}

/// What a loader reads tensors from.
pub(crate) trait TensorSource {
    /// The file or folder, for error messages.
    fn path(&self) -> &Path;
    /// Whether a tensor exists.
    fn contains(&self, name: &str) -> bool;
    /// Reads a tensor as a (possibly quantized) tensor.
    fn qtensor(&mut self, name: &str) -> Result<Arc<QTensor>>;
    /// Reads a tensor densely, as f32.
    fn dense(&mut self, name: &str) -> Result<Tensor>;
    /// Reads a weight matrix as a [`Linear`] that runs on `device`, with its
    /// shape in the file.
    fn matrix(&mut self, name: &str, device: &Device) -> Result<(Vec<usize>, Linear)> {
        let t = self.qtensor(name)?;
        Ok((t.shape().dims().to_vec(), Linear::from_qtensor_on(t, device)?))
    }
}

/// The checkpoint's names for the decoder's tensors.
pub(crate) struct Naming {
    pub embed: &'static str,
    pub norm: &'static str,
    pub lm_head: &'static str,
    /// Layer tensor names, `{}` standing for the layer index, in the order
    /// attn_norm, q, k, v, o, ffn_norm, gate, up, down.
    pub layer: [&'static str; 9],
}

pub(crate) const GGUF_NAMES: Naming = Naming {
    embed: "token_embd.weight",
    norm: "output_norm.weight",
    lm_head: "output.weight",
    layer: [
        "blk.{}.attn_norm.weight",
        "blk.{}.attn_q.weight",
        "blk.{}.attn_k.weight",
        "blk.{}.attn_v.weight",
        "blk.{}.attn_output.weight",
        "blk.{}.ffn_norm.weight",
        "blk.{}.ffn_gate.weight",
        "blk.{}.ffn_up.weight",
        "blk.{}.ffn_down.weight",
    ],
};

pub(crate) const HF_NAMES: Naming = Naming {
    embed: "model.embed_tokens.weight",
    norm: "model.norm.weight",
    lm_head: "lm_head.weight",
    layer: [
        "model.layers.{}.input_layernorm.weight",
        "model.layers.{}.self_attn.q_proj.weight",
        "model.layers.{}.self_attn.k_proj.weight",
        "model.layers.{}.self_attn.v_proj.weight",
        "model.layers.{}.self_attn.o_proj.weight",
        "model.layers.{}.post_attention_layernorm.weight",
        "model.layers.{}.mlp.gate_proj.weight",
        "model.layers.{}.mlp.up_proj.weight",
        "model.layers.{}.mlp.down_proj.weight",
    ],
};

fn check_shape(path: &Path, name: &str, got: &[usize], expected: &[usize]) -> Result<()> {
    if got != expected {
        return Err(Error::TensorShape {
            path: path.to_path_buf(),
            name: name.to_string(),
            got: got.to_vec(),
            expected: expected.to_vec(),
        });
    }
    Ok(())
}

fn require(src: &dyn TensorSource, name: &str) -> Result<()> {
    if !src.contains(name) {
        return Err(Error::MissingTensor { path: src.path().to_path_buf(), name: name.to_string() });
    }
    Ok(())
}

fn linear(src: &mut dyn TensorSource, name: &str, shape: [usize; 2], device: &Device) -> Result<Linear> {
    require(src, name)?;
    let (dims, l) = src.matrix(name, device)?;
    check_shape(&PathBuf::from(src.path()), name, &dims, &shape)?;
    Ok(l)
}

fn vector(src: &mut dyn TensorSource, name: &str, len: usize, device: &Device) -> Result<Tensor> {
    require(src, name)?;
    let t = src.dense(name)?;
    check_shape(&PathBuf::from(src.path()), name, t.dims(), &[len])?;
    Ok(t.to_device(device)?)
}

/// Reads every weight the configuration calls for from `src`, placing each
/// on `device` (see the module docs for the formats each device runs).
pub(crate) fn load_weights(
    src: &mut dyn TensorSource,
    cfg: &ModelConfig,
    names: &Naming,
    device: &Device,
) -> Result<Weights> {
    let (h, hd, inter) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);

    require(src, names.embed)?;
    let embed_q = src.qtensor(names.embed)?;
    let path = src.path().to_path_buf();
    check_shape(&path, names.embed, embed_q.shape().dims(), &[cfg.vocab_size, h])?;
    // A quantized table is looked up as it is (and a tied LM head shares it,
    // so it is uploaded once); dense tables, and quantized ones whose rows
    // are not whole blocks, are dequantized.
    let quantized = !matches!(embed_q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
        && embed_q.shape().dims()[1] % embed_q.dtype().block_size() == 0;
    let embed_q = if quantized { qtensor_on(embed_q, device)? } else { embed_q };
    let lm_head = if src.contains(names.lm_head) && !cfg.tie_word_embeddings {
        linear(src, names.lm_head, [cfg.vocab_size, h], device)?
    } else {
        Linear::from_qtensor_on(embed_q.clone(), device)?
    };
    let embed = if quantized {
        Embedding::Quantized(embed_q)
    } else {
        let t = embed_q.dequantize(&embed_q.device())?;
        Embedding::Dense(t.to_dtype(dense_dtype(device))?.to_device(device)?)
    };

    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let n: Vec<String> = names.layer.iter().map(|p| p.replace("{}", &i.to_string())).collect();
        let _span = tracing::debug_span!("load_layer", layer = i).entered();
        // Dense q/k/v and gate/up are stacked: one product each per step.
        let [wq, wk, wv] = Linear::stack([
            linear(src, &n[1], [q_out, h], device)?,
            linear(src, &n[2], [kv_out, h], device)?,
            linear(src, &n[3], [kv_out, h], device)?,
        ])?;
        let [w_gate, w_up] =
            Linear::stack([linear(src, &n[6], [inter, h], device)?, linear(src, &n[7], [inter, h], device)?])?;
        layers.push(LayerWeights {
            attn_norm: vector(src, &n[0], h, device)?,
            wq,
            wk,
            wv,
            wo: linear(src, &n[4], [h, q_out], device)?,
            ffn_norm: vector(src, &n[5], h, device)?,
            w_gate,
            w_up,
            w_down: linear(src, &n[8], [h, inter], device)?,
        });
    }
    let norm = vector(src, names.norm, h, device)?;
    Ok(Weights { embed, layers, norm, lm_head })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_matrices_on_candles_quantized_kernels_say_so() {
        let dev = Device::Cpu;
        let t = Tensor::from_vec((0..4 * 256).map(|i| (i as f32 * 0.01).sin()).collect::<Vec<_>>(), (4, 256), &dev)
            .unwrap();
        let q = |f| Linear::from_qtensor_on(Arc::new(QTensor::quantize(&t, f).unwrap()), &dev).unwrap();
        // Formats with no kernel of ours run on candle's; Q4_1 and Q8_0 run on ours on the CPU.
        assert!(q(GgmlDType::Q4K).is_candle_quantized());
        assert!(q(GgmlDType::Q4_0).is_candle_quantized());
        assert!(!q(GgmlDType::Q4_1).is_candle_quantized());
        assert!(!q(GgmlDType::Q8_0).is_candle_quantized());
        assert!(!q(GgmlDType::F16).is_candle_quantized());
        assert!(!Linear::from_dense(t.clone()).unwrap().is_candle_quantized());
    }

    /// Under `quantized=ours` a block-format matrix on candle's kernels takes
    /// 1 to 8 rows through our quantized GEMV (its reference on the CPU), and
    /// more rows, or the default plan, through candle's.
    #[test]
    fn quantized_matrices_take_few_rows_through_our_gemv_under_the_plan() {
        use arqon_kernels::plan::QuantizedVariant;
        let dev = Device::Cpu;
        let t = Tensor::from_vec((0..16 * 256).map(|i| (i as f32 * 0.013).sin()).collect::<Vec<_>>(), (16, 256), &dev)
            .unwrap();
        let qt = Arc::new(QTensor::quantize(&t, GgmlDType::Q4_0).unwrap());
        let l = Linear::from_qtensor_on(qt.clone(), &dev).unwrap();
        let ours = Some(KernelPlan { quantized: QuantizedVariant::Ours, ..KernelPlan::default() });
        let rows = |m: usize| {
            Tensor::from_vec((0..m * 256).map(|i| (i as f32 * 0.07).cos()).collect::<Vec<_>>(), (m, 256), &dev).unwrap()
        };
        let v = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let before = l.resident_bytes();
        for m in [1, 8] {
            let x = rows(m);
            assert!(l.quantized_by_ours(m, ours, &dev));
            let blocks = QuantBlocks::default().of(&qt).unwrap();
            let op = QuantGemv::route(ours, &x, &qt).unwrap().forward(&x, &blocks).unwrap();
            assert_eq!(v(l.forward_with(&x, ours).unwrap()), v(op), "{m} rows: our GEMV");
            let candle = QMatMul::from_arc(qt.clone()).unwrap().forward(&x).unwrap();
            assert_eq!(v(l.forward_with(&x, None).unwrap()), v(candle), "{m} rows, no plan: candle's");
        }
        // The op's copy of the blocks (made on the first product on the CPU, at load on a GPU) is counted.
        assert_eq!(l.resident_bytes(), before + qt.storage_size_in_bytes() as u64);
        // Rows the op takes by count but not by type are refused, not sent to candle's kernels.
        let err = l.forward_with(&rows(2).to_dtype(DType::BF16).unwrap(), ours).unwrap_err().to_string();
        assert!(err.contains("it takes f32 [rows, 256]"), "{err}");
        let x = rows(9);
        assert!(!l.quantized_by_ours(9, ours, &dev));
        let candle = QMatMul::from_arc(qt.clone()).unwrap().forward(&x).unwrap();
        assert_eq!(v(l.forward_with(&x, ours).unwrap()), v(candle), "9 rows: candle's");
        assert!(!l.quantized_by_ours(1, Some(KernelPlan::default()), &dev));
        // Our CPU Q4_1 kernel's matrices are not candle's: the plan does not touch them.
        let q41 = Linear::from_qtensor_on(Arc::new(QTensor::quantize(&t, GgmlDType::Q4_1).unwrap()), &dev).unwrap();
        assert!(!q41.quantized_by_ours(1, ours, &dev));
    }

    #[test]
    fn dense_matrices_of_another_dtype_share_one_conversion_of_their_input() {
        // bf16 matrices with f32 activations, as on a GPU (here on the CPU).
        let dev = Device::Cpu;
        let w = |seed: f32, rows: usize| {
            let v: Vec<f32> = (0..rows * 64).map(|i| (i as f32 * seed).sin() * 0.5).collect();
            let t = Tensor::from_vec(v, (rows, 64), &dev).unwrap().to_dtype(DType::BF16).unwrap();
            Linear::new(LinearImpl::Candle(QMatMul::Tensor(t)), GgmlDType::BF16)
        };
        let (a, b, c) = (w(0.37, 64), w(1.13, 16), w(2.71, 16));
        let x =
            Tensor::from_vec((0..3 * 64).map(|i| (i as f32 * 0.11).cos()).collect::<Vec<_>>(), (3, 64), &dev).unwrap();
        let many = Linear::forward_many(&[&a, &b, &c], &x).unwrap();
        for (got, l) in many.iter().zip([&a, &b, &c]) {
            assert_eq!(got.dtype(), DType::F32);
            let want = l.forward(&x).unwrap();
            assert_eq!(got.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
        }
        // Mixed with an f32 matrix: each converts its own way, the same results.
        let f = Linear::from_dense(Tensor::ones((8, 64), DType::F32, &dev).unwrap()).unwrap();
        let mixed = Linear::forward_many(&[&a, &f], &x).unwrap();
        assert_eq!(mixed[0].to_vec2::<f32>().unwrap(), many[0].to_vec2::<f32>().unwrap());
        assert_eq!(mixed[1].to_vec2::<f32>().unwrap(), f.forward(&x).unwrap().to_vec2::<f32>().unwrap());
    }

    #[test]
    fn stacked_matrices_are_one_product_of_their_rows() {
        let dev = Device::Cpu;
        let x =
            Tensor::from_vec((0..3 * 64).map(|i| (i as f32 * 0.11).cos()).collect::<Vec<_>>(), (3, 64), &dev).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let w = |seed: f32, rows: usize| {
                let v: Vec<f32> = (0..rows * 64).map(|i| (i as f32 * seed).sin() * 0.5).collect();
                let t = Tensor::from_vec(v, (rows, 64), &dev).unwrap().to_dtype(dtype).unwrap();
                Linear::new(LinearImpl::Candle(QMatMul::Tensor(t)), GgmlDType::F32)
            };
            let alone = [w(0.37, 48), w(1.13, 16), w(2.71, 16)];
            let want: Vec<Vec<Vec<f32>>> = alone.iter().map(|l| l.forward(&x).unwrap().to_vec2().unwrap()).collect();
            let [a, b, c] = Linear::stack(alone).unwrap();
            let y = Linear::forward_stacked(&[&a, &b, &c], &x).unwrap().expect("one stack");
            assert_eq!((y.dims(), y.dtype()), (&[3, 80][..], dtype), "in the stack's dtype");
            let y = y.to_dtype(DType::F32).unwrap();
            for (j, (l, off)) in [(&a, 0), (&b, 48), (&c, 64)].into_iter().enumerate() {
                // Each stacked matrix alone is still itself.
                let (got, part): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (
                    l.forward(&x).unwrap().to_vec2().unwrap(),
                    y.narrow(1, off, want[j][0].len()).unwrap().to_vec2().unwrap(),
                );
                for ((g, p), w) in got.iter().flatten().zip(part.iter().flatten()).zip(want[j].iter().flatten()) {
                    assert!((g - w).abs() < 1e-5 && (p - w).abs() < 2e-2, "{dtype:?}: {g} {p} {w}");
                }
            }
            // Not the whole stack, out of order, or a matrix replaced (a merged
            // adapter): no stacked product.
            assert!(Linear::forward_stacked(&[&a, &b], &x).unwrap().is_none());
            assert!(Linear::forward_stacked(&[&b, &a, &c], &x).unwrap().is_none());
            let replaced = Linear::from_dense(a.to_dense().unwrap()).unwrap();
            assert!(Linear::forward_stacked(&[&replaced, &b, &c], &x).unwrap().is_none());
        }
        // Matrices of different widths or formats are not stacked.
        let q = Linear::from_dense(Tensor::ones((8, 64), DType::F32, &dev).unwrap()).unwrap();
        let r = Linear::from_dense(Tensor::ones((8, 32), DType::F32, &dev).unwrap()).unwrap();
        let [q, r] = Linear::stack([q, r]).unwrap();
        assert!(q.stacked.is_none() && r.stacked.is_none());
    }

    /// Under a plan naming our dense GEMV, a dense matrix's product of 1-32
    /// rows (a small one: `GemvShape::suits_dense_kernel`) is the op's (its
    /// reference on the CPU), in `x`'s dtype or the one asked for, alone and
    /// stacked, and close to candle's; more rows keep candle's path.
    #[test]
    fn a_plan_naming_our_gemv_routes_few_rows_of_dense_matrices_to_it() {
        let dev = Device::Cpu;
        let plan = Some(KernelPlan { dense_gemv: DenseGemvVariant::WarpPerRowX4, ..KernelPlan::default() });
        let rows = |n: usize| {
            Tensor::from_vec((0..n * 64).map(|i| (i as f32 * 0.11).cos()).collect::<Vec<_>>(), (n, 64), &dev).unwrap()
        };
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let w = |seed: f32, n: usize| {
                let v: Vec<f32> = (0..n * 64).map(|i| (i as f32 * seed).sin() * 0.5).collect();
                let t = Tensor::from_vec(v, (n, 64), &dev).unwrap().to_dtype(dtype).unwrap();
                Linear::new(LinearImpl::Candle(QMatMul::Tensor(t)), GgmlDType::F32)
            };
            let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
            for n in [1, 8, 9, 32] {
                let x = rows(n);
                let l = w(0.37, 48);
                let LinearImpl::Candle(QMatMul::Tensor(wt)) = &l.inner else { unreachable!() };
                let op = DenseGemv::new(DenseGemvVariant::WarpPerRowX4, DType::F32).forward(&x, wt).unwrap();
                let got = l.forward_with(&x, plan).unwrap();
                assert_eq!(got.dtype(), DType::F32);
                assert_eq!(f(&got), f(&op), "{dtype:?} {n} rows: the op's numbers");
                // Into the matrix's type: the op writes it so, one rounding of the same sums.
                let xd = x.to_dtype(dtype).unwrap();
                let as_f32 = l.forward_as_with(&xd, DType::F32, plan).unwrap();
                let op = DenseGemv::new(DenseGemvVariant::WarpPerRowX4, DType::F32).forward(&xd, wt).unwrap();
                assert_eq!((as_f32.dtype(), f(&as_f32)), (DType::F32, f(&op)), "{dtype:?} {n} rows, as f32");
                let plain = l.forward_as_with(&xd, DType::F32, None).unwrap();
                assert_eq!(f(&plain), f(&l.forward_with(&xd, None).unwrap().to_dtype(DType::F32).unwrap()));
                let candle = f(&l.forward_with(&x, None).unwrap());
                for (g, c) in f(&got).iter().zip(&candle) {
                    assert!((g - c).abs() <= tol * (1.0 + c.abs()), "{dtype:?} {n} rows: {g} vs candle's {c}");
                }
                if dtype == DType::BF16 {
                    // Candle rounds the rows to bf16 first, the op does not: it did run.
                    assert_ne!(f(&got), candle, "{n} rows: candle's numbers, not the op's");
                }
                let [a, b] = Linear::stack([w(0.37, 48), w(1.13, 16)]).unwrap();
                let whole = &a.stacked.as_ref().expect("stacked").whole;
                let y = Linear::forward_stacked_with(&[&a, &b], &x, plan).unwrap().unwrap();
                assert_eq!((y.dims(), y.dtype()), (&[n, 64][..], dtype), "in the stack's dtype");
                let op = DenseGemv::new(DenseGemvVariant::WarpPerRowX4, dtype).forward(&x, whole).unwrap();
                assert_eq!(f(&y), f(&op));
            }
            // 33 rows: candle's product, bit for bit.
            let (x, l) = (rows(33), w(0.37, 48));
            assert_eq!(f(&l.forward_with(&x, plan).unwrap()), f(&l.forward_with(&x, None).unwrap()));
            // The activation fused into a down product: the activation op's rows, then the GEMV's; none
            // without the plan, for 33 rows, or for rows not twice the matrix's width.
            let gu = rows(4).to_dtype(dtype).unwrap().reshape((2, 128)).unwrap();
            let fused = l.forward_silu_as_with(&gu, DType::F32, plan).unwrap().expect("our GEMV takes it");
            let act = super::super::silu_op::SiluMul::new(64).forward(&gu).unwrap();
            assert_eq!(f(&fused), f(&l.forward_as_with(&act, DType::F32, plan).unwrap()));
            assert!(l.forward_silu_as_with(&gu, DType::F32, None).unwrap().is_none());
            let tall = rows(66).reshape((33, 128)).unwrap();
            assert!(l.forward_silu_as_with(&tall, DType::F32, plan).unwrap().is_none());
            assert!(l.forward_silu_as_with(&rows(2), DType::F32, plan).unwrap().is_none());
        }
    }
}
