//! What each of our CUDA kernels is launched with, decided without a GPU: the
//! module and entry point, the grid and block, and the scalar arguments, after
//! every buffer length is checked against the shape (the checks the CPU
//! references use).
//!
//! Two launchers share these decisions: the CUDA launch wrappers
//! (`cuda::launch`, feature `cuda`), and `arqon-kernels-emu`, which runs the
//! very `.cu` sources on the host in `tests/backends.rs`. So what the GPU is
//! asked to run is what the emulator checked against the references: the same
//! entries, grids, blocks and parameters.

use crate::plan::{
    ArgmaxVariant, DenseGemvVariant, PagedAttentionVariant, QuantGemvVariant, RmsNormVariant, RopeKvVariant,
    SiluMulVariant, TopKVariant,
};
use crate::reference::dense::DENSE_ROW_TILE;
use crate::reference::fused::{check_silu_mul, RopeKvLens, RopeKvShape};
use crate::reference::ggml::{GemvShape, QuantFormat};
use crate::reference::paged::{PagedAttentionLens, PagedAttentionShape};
use crate::reference::sampling::MAX_TOP_K;
use crate::{DType, KernelError, KernelId};

/// The closed set of CUDA modules (one per `.cu` file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CudaModule {
    /// `rms_norm.cu`.
    RmsNorm,
    /// `rope_kv.cu`.
    RopeKv,
    /// `paged_attention.cu`.
    PagedAttention,
    /// `quant_gemv.cu`.
    QuantGemv,
    /// `sampling.cu`.
    Sampling,
    /// `silu_mul.cu`.
    SiluMul,
    /// `dense_gemv.cu`.
    DenseGemv,
}

impl CudaModule {
    /// Every module.
    pub const ALL: [CudaModule; 7] = [
        CudaModule::RmsNorm,
        CudaModule::RopeKv,
        CudaModule::PagedAttention,
        CudaModule::QuantGemv,
        CudaModule::Sampling,
        CudaModule::SiluMul,
        CudaModule::DenseGemv,
    ];

    /// The source file's stem.
    pub fn name(self) -> &'static str {
        match self {
            CudaModule::RmsNorm => "rms_norm",
            CudaModule::RopeKv => "rope_kv",
            CudaModule::PagedAttention => "paged_attention",
            CudaModule::QuantGemv => "quant_gemv",
            CudaModule::Sampling => "sampling",
            CudaModule::SiluMul => "silu_mul",
            CudaModule::DenseGemv => "dense_gemv",
        }
    }
}

/// One kernel launch: the entry point of a module, a grid of blocks of
/// `block` threads (x only), no dynamic shared memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// The module holding the entry.
    pub module: CudaModule,
    /// The entry point's name (built from typed variants, never taken from outside).
    pub entry: String,
    /// Blocks in x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads per block.
    pub block: u32,
}

impl Launch {
    fn new(module: CudaModule, entry: String, grid: (u32, u32, u32), block: u32) -> Launch {
        Launch { module, entry, grid, block }
    }
}

/// `RopeKvParams` of `cuda/rope_kv.cu`, by value.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct RopeKvParams {
    pub tokens: i32,
    pub q_heads: i32,
    pub kv_heads: i32,
    pub head_dim: i32,
    pub block_size: i32,
    pub num_blocks: i32,
    pub max_pos: i32,
    pub pairs: i32,
}

/// `PagedParams` of `cuda/paged_attention.cu`, by value.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
#[allow(missing_docs)]
pub struct PagedParams {
    pub num_seqs: i32,
    pub q_heads: i32,
    pub kv_heads: i32,
    pub head_dim: i32,
    pub block_size: i32,
    pub num_blocks: i32,
    pub max_blocks_per_seq: i32,
    pub partition_size: i32,
    pub max_partitions: i32,
    pub scale: f32,
}

/// `TopKParams` of `cuda/sampling.cu`, by value.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct TopKParams {
    pub rows: i32,
    pub vocab: i32,
}

fn int(kernel: KernelId, what: &str, v: usize) -> Result<i32, KernelError> {
    i32::try_from(v).map_err(|_| KernelError::Shape { kernel, message: format!("{what} = {v} does not fit an i32") })
}

fn grid_yz(kernel: KernelId, what: &str, v: usize) -> Result<u32, KernelError> {
    if v > 65_535 {
        return Err(KernelError::Shape { kernel, message: format!("{what} = {v} exceeds the grid's 65535") });
    }
    Ok(v as u32)
}

/// A grid's x dimension: at most 2^31 - 1 blocks on every GPU we build for.
fn grid_x(kernel: KernelId, v: usize) -> Result<u32, KernelError> {
    match i32::try_from(v) {
        Ok(_) => Ok(v as u32),
        Err(_) => Err(shape_err(kernel, format!("a grid of {v} blocks exceeds 2^31 - 1"))),
    }
}

fn shape_err(kernel: KernelId, message: String) -> KernelError {
    KernelError::Shape { kernel, message }
}

/// The length of a fresh output a launch wrapper allocates (`*_new`): a
/// device allocates no zero-byte buffer (the driver answers an invalid
/// value), so an output with no elements is a shape error named for the
/// kernel instead.
pub fn fresh_len(kernel: KernelId, len: usize) -> Result<usize, KernelError> {
    if len == 0 {
        return Err(shape_err(kernel, "no elements to write: a fresh output needs at least one".into()));
    }
    Ok(len)
}

/// Fused residual add + RMSNorm over buffer lengths `(x, residual, weight,
/// out)`, with `outputs` results per input element: 1 in place
/// (`rms_norm_residual_*`), 2 packed (`add_rms_norm_packed_*`). Gives the
/// launch and its `rows` and `dim` arguments, or `None` when there are no rows.
pub fn rms_norm(
    variant: RmsNormVariant,
    dtype: DType,
    (n, residual, dim, out): (usize, usize, usize, usize),
    outputs: usize,
) -> Result<Option<(Launch, i32, i32)>, KernelError> {
    let k = KernelId::RmsNorm;
    if dim == 0 || !n.is_multiple_of(dim) || residual != n || out != outputs * n {
        return Err(shape_err(k, format!("x {n} / residual {residual} / out {out} not {outputs} x rows of {dim}")));
    }
    let rows = n / dim;
    if rows == 0 {
        return Ok(None);
    }
    let (rows_i, dim_i) = (int(k, "rows", rows)?, int(k, "dim", dim)?);
    let (name, grid, block) = match variant {
        RmsNormVariant::WarpPerRow => ("warp", grid_x(k, rows.div_ceil(4))?, 128),
        RmsNormVariant::BlockPerRow => ("block", grid_x(k, rows)?, 256),
    };
    let form = if outputs == 1 { "rms_norm_residual" } else { "add_rms_norm_packed" };
    let entry = format!("{form}_{name}_{}", dtype.suffix());
    Ok(Some((Launch::new(CudaModule::RmsNorm, entry, (grid, 1, 1), block), rows_i, dim_i)))
}

/// `silu(gate) * up` from the stacked product (lengths `gate_up`, `out`):
/// the launch and its `rows` and `inter` arguments, or `None` for no rows.
pub fn silu_mul(
    variant: SiluMulVariant,
    dtype: DType,
    gate_up: usize,
    inter: usize,
    out: usize,
) -> Result<Option<(Launch, i64, i32)>, KernelError> {
    let k = KernelId::SiluMul;
    check_silu_mul(gate_up, inter, out)?;
    let rows = out / inter;
    if rows == 0 {
        return Ok(None);
    }
    let (rows_i, inter_i) = (rows as i64, int(k, "inter", inter)?);
    let (name, blocks) = match variant {
        SiluMulVariant::ElementPerThread => ("element", out.div_ceil(256)),
        SiluMulVariant::BlockPerRow => ("row", rows),
    };
    let entry = format!("silu_mul_{name}_{}", dtype.suffix());
    Ok(Some((Launch::new(CudaModule::SiluMul, entry, (grid_x(k, blocks)?, 1, 1), 256), rows_i, inter_i)))
}

/// RoPE fused with the paged KV-cache write: the launch and its parameters,
/// or `None` for no tokens.
pub fn rope_kv(
    variant: RopeKvVariant,
    dtype: DType,
    shape: &RopeKvShape,
    lens: &RopeKvLens,
) -> Result<Option<(Launch, RopeKvParams)>, KernelError> {
    let k = KernelId::RopeKvWrite;
    shape.check_lens(lens)?;
    if shape.tokens == 0 {
        return Ok(None);
    }
    let c = &shape.cache;
    // Slots are i32 in the kernels; elements are addressed in 64 bits (a GPU's pool can pass 2^31).
    int(k, "cache slots", c.num_blocks * c.block_size)?;
    let p = RopeKvParams {
        tokens: int(k, "tokens", shape.tokens)?,
        q_heads: int(k, "q_heads", shape.q_heads)?,
        kv_heads: int(k, "kv_heads", c.kv_heads)?,
        head_dim: int(k, "head_dim", c.head_dim)?,
        block_size: int(k, "block_size", c.block_size)?,
        num_blocks: int(k, "num_blocks", c.num_blocks)?,
        max_pos: int(k, "max_pos", shape.max_pos)?,
        pairs: shape.pairs as i32,
    };
    let heads = shape.q_heads + c.kv_heads;
    let tokens = grid_x(k, shape.tokens)?;
    let (name, grid) = match variant {
        RopeKvVariant::BlockPerToken => ("token", (tokens, 1, 1)),
        RopeKvVariant::WarpPerHead => ("head", (tokens, grid_yz(k, "heads / 4", heads.div_ceil(4))?, 1)),
    };
    let entry = format!("rope_kv_write_{name}_{}", dtype.suffix());
    Ok(Some((Launch::new(CudaModule::RopeKv, entry, grid, 128), p)))
}

/// The launches of decode attention over the paged KV cache.
#[derive(Debug, Clone, PartialEq)]
pub enum PagedLaunch {
    /// One launch: `paged_attention_decode_*(q, kc, vc, tables, lens, out, params)`.
    Plain(Launch),
    /// `split(q, kc, vc, tables, lens, ml, acc, params)` into f32 scratch of
    /// `2 * slots` (`ml`) and `slots * head_dim` (`acc`) elements, which
    /// `split` writes in full, then `reduce(ml, acc, out, params)`.
    Split {
        /// The partitions' launch.
        split: Launch,
        /// The merge's launch.
        reduce: Launch,
        /// (sequence, head, partition) slots of scratch.
        slots: usize,
    },
}

/// Decode attention: its launches and parameters, or `None` for no sequences.
pub fn paged_attention(
    variant: PagedAttentionVariant,
    dtype: DType,
    shape: &PagedAttentionShape,
    lens: &PagedAttentionLens,
    scale: f32,
) -> Result<Option<(PagedLaunch, PagedParams)>, KernelError> {
    let k = KernelId::PagedAttention;
    shape.check_lens(lens)?;
    if shape.num_seqs == 0 {
        return Ok(None);
    }
    let c = &shape.cache;
    // Block ids are i32 in the kernels (num_blocks below); elements are addressed in 64 bits.
    let max_ctx = shape.max_blocks_per_seq * c.block_size;
    let seqs = grid_yz(k, "num_seqs", shape.num_seqs)?;
    let mut p = PagedParams {
        num_seqs: int(k, "num_seqs", shape.num_seqs)?,
        q_heads: int(k, "q_heads", shape.q_heads)?,
        kv_heads: int(k, "kv_heads", c.kv_heads)?,
        head_dim: int(k, "head_dim", c.head_dim)?,
        block_size: int(k, "block_size", c.block_size)?,
        num_blocks: int(k, "num_blocks", c.num_blocks)?,
        max_blocks_per_seq: int(k, "max_blocks_per_seq", shape.max_blocks_per_seq)?,
        partition_size: 0,
        max_partitions: 0,
        scale,
    };
    int(k, "max context", max_ctx)?;
    let dt = dtype.suffix();
    let heads = grid_x(k, shape.q_heads)?;
    let m = CudaModule::PagedAttention;
    let launch = match variant {
        PagedAttentionVariant::Plain => {
            PagedLaunch::Plain(Launch::new(m, format!("paged_attention_decode_{dt}"), (heads, seqs, 1), 128))
        }
        PagedAttentionVariant::SplitK(tokens) => {
            let part = tokens.get() as usize;
            let parts = max_ctx.div_ceil(part).max(1);
            p.partition_size = int(k, "partition", part)?;
            p.max_partitions = int(k, "partitions", parts)?;
            let grid = (heads, seqs, grid_yz(k, "partitions", parts)?);
            PagedLaunch::Split {
                split: Launch::new(m, format!("paged_attention_split_{dt}"), grid, 128),
                reduce: Launch::new(m, format!("paged_attention_reduce_{dt}"), (heads, seqs, 1), 128),
                slots: shape.num_seqs * shape.q_heads * parts,
            }
        }
    };
    Ok(Some((launch, p)))
}

/// Weight-only quantized GEMV over lengths `(w bytes, x, y)`: the launch and
/// its `(m, n, k)` arguments, or `None` when `n` is 0.
pub fn quant_gemv(
    variant: QuantGemvVariant,
    format: QuantFormat,
    dtype: DType,
    shape: GemvShape,
    (w, x, y): (usize, usize, usize),
) -> Result<Option<(Launch, [i32; 3])>, KernelError> {
    let k = KernelId::QuantGemv;
    shape.check(format, w, x, y)?;
    if shape.n == 0 {
        return Ok(None);
    }
    let dims = [int(k, "m", shape.m)?, int(k, "n", shape.n)?, int(k, "k", shape.k)?];
    int(k, "m * k", shape.m * shape.k)?;
    let (name, grid, block) = match variant {
        QuantGemvVariant::WarpPerRow => ("warp", shape.n.div_ceil(4), 128),
        QuantGemvVariant::MultiRowSmem => ("smem", shape.n.div_ceil(8), 256),
    };
    let entry = format!("quant_gemv_{name}_{}_{}", format.name(), dtype.suffix());
    Ok(Some((Launch::new(CudaModule::QuantGemv, entry, (grid_x(k, grid)?, 1, 1), block), dims)))
}

/// How a dense GEMV runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenseLaunch {
    /// Our kernel: `(w, x, y, m, n, k)`.
    Kernel(Launch),
    /// cuBLAS's `gemmEx` (no activation fused in; `x` in `w`'s type).
    Cublas,
}

/// Dense GEMV, `y[m, n] = x[m, k] · w[n, k]ᵀ`, over lengths `(w, x, y)` and
/// element types `(w, x, y)`; with `silu`, `x` is the stacked gate/up product
/// `[m, 2k]` and the rows multiplied are `silu(gate) * up`. Gives how it runs
/// and its `(m, n, k)` arguments, or `None` when `n` is 0.
pub fn dense_gemv(
    variant: DenseGemvVariant,
    silu: bool,
    types: (DType, DType, DType),
    shape: GemvShape,
    (w, x, y): (usize, usize, usize),
) -> Result<Option<(DenseLaunch, [i32; 3])>, KernelError> {
    let k = KernelId::DenseGemv;
    let rows_len = if silu { shape.gate_up_rows(x)? } else { x };
    shape.check_dense(types, w, rows_len, y)?;
    if shape.n == 0 {
        return Ok(None);
    }
    let dims = [int(k, "m", shape.m)?, int(k, "n", shape.n)?, int(k, "k", shape.k)?];
    int(k, "2k", 2 * shape.k)?;
    let name = match (variant, silu) {
        (DenseGemvVariant::Cublas, false) => {
            if types.1 != types.0 {
                return Err(shape_err(
                    k,
                    format!("cuBLAS takes the activations in the matrix's type ({:?}), not {:?}", types.0, types.1),
                ));
            }
            return Ok(Some((DenseLaunch::Cublas, dims)));
        }
        (DenseGemvVariant::Cublas, true) => {
            return Err(KernelError::Plan("the activation fused into the GEMV is ours only, not cuBLAS's".into()))
        }
        (DenseGemvVariant::WarpPerRow, _) => "warp",
        (DenseGemvVariant::WarpPerRowX4, _) => "warp_x4",
    };
    let (wt, xt, yt) = (types.0.suffix(), types.1.suffix(), types.2.suffix());
    let form = if silu { "dense_gemv_silu" } else { "dense_gemv" };
    let entry = format!("{form}_{name}_{wt}_{xt}_{yt}");
    Ok(Some((DenseLaunch::Kernel(Launch::new(CudaModule::DenseGemv, entry, dense_grid(shape)?, 128)), dims)))
}

/// Dense GEMV with the residual add and RMSNorm fused in front (our
/// variants only), element types `(w, x)`, the product and the sums in `x`'s
/// type, over lengths `(w, x, d, g, y, sum)`: the launch
/// `dense_gemv_norm_*(w, x, d, g, y, sum, m, n, k, eps)` and its `(m, n, k)`,
/// or `None` when `n` is 0.
pub fn dense_gemv_norm(
    variant: DenseGemvVariant,
    (wt, xt): (DType, DType),
    shape: GemvShape,
    (w, x, d, g, y, sum): (usize, usize, usize, usize, usize, usize),
) -> Result<Option<(Launch, [i32; 3])>, KernelError> {
    let k = KernelId::DenseGemv;
    shape.check_norm((wt, xt), w, x, d, g, y, sum)?;
    if shape.n == 0 {
        return Ok(None);
    }
    let dims = [int(k, "m", shape.m)?, int(k, "n", shape.n)?, int(k, "k", shape.k)?];
    int(k, "m * k", shape.m * shape.k)?;
    let name = match variant {
        DenseGemvVariant::Cublas => {
            return Err(KernelError::Plan("the norm fused into the GEMV is ours only, not cuBLAS's".into()))
        }
        DenseGemvVariant::WarpPerRow => "warp",
        DenseGemvVariant::WarpPerRowX4 => "warp_x4",
    };
    let entry = format!("dense_gemv_norm_{name}_{}_{}_{}", wt.suffix(), xt.suffix(), xt.suffix());
    Ok(Some((Launch::new(CudaModule::DenseGemv, entry, dense_grid(shape)?, 128), dims)))
}

/// The dense GEMV's grid: four output rows (warps) a block across, one tile
/// of up to [`DENSE_ROW_TILE`] rows of `x` a block down.
fn dense_grid(shape: GemvShape) -> Result<(u32, u32, u32), KernelError> {
    let k = KernelId::DenseGemv;
    Ok((grid_x(k, shape.n.div_ceil(4))?, grid_yz(k, "row tiles", shape.m.div_ceil(DENSE_ROW_TILE))?, 1))
}

/// Element-wise conversion of `x` elements of `a` into `y` of `b` (f32 and
/// a half type): the launch and its `n` argument, or `None` when empty.
pub fn convert(a: DType, b: DType, x: usize, y: usize) -> Result<Option<(Launch, i64)>, KernelError> {
    let k = KernelId::DenseGemv;
    if (a == DType::F32) == (b == DType::F32) || x != y {
        return Err(shape_err(k, format!("converting {x} {a:?} into {y} {b:?}: want f32 and a half type")));
    }
    if x == 0 {
        return Ok(None);
    }
    let entry = format!("convert_{}_{}", a.suffix(), b.suffix());
    Ok(Some((Launch::new(CudaModule::DenseGemv, entry, (grid_x(k, x.div_ceil(256))?, 1, 1), 256), x as i64)))
}

/// The launches of greedy argmax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgmaxLaunch {
    /// `argmax_block_*(logits, token, rows, vocab)`.
    Block(Launch),
    /// `split(logits, part_v, part_i, rows, vocab)` into `rows * chunks`
    /// partial results each, then `reduce(part_v, part_i, token, rows, chunks)`.
    Split {
        /// The chunks' launch.
        split: Launch,
        /// The merge's launch.
        reduce: Launch,
        /// Chunks per row.
        chunks: i32,
    },
}

/// Argmax per row over `logits` values in rows of `vocab` into `tokens`
/// entries: the launches and the `rows` and `vocab` arguments, or `None` for
/// no rows.
pub fn argmax(
    variant: ArgmaxVariant,
    dtype: DType,
    logits: usize,
    vocab: usize,
    tokens: usize,
) -> Result<Option<(ArgmaxLaunch, i32, i32)>, KernelError> {
    let k = KernelId::Argmax;
    if vocab == 0 || !logits.is_multiple_of(vocab) || tokens != logits / vocab {
        return Err(shape_err(k, format!("{logits} logits, vocab {vocab}, {tokens} tokens")));
    }
    let rows = tokens;
    if rows == 0 {
        return Ok(None);
    }
    let (rows_i, vocab_i) = (int(k, "rows", rows)?, int(k, "vocab", vocab)?);
    let dt = dtype.suffix();
    let m = CudaModule::Sampling;
    let launch = match variant {
        ArgmaxVariant::BlockPerRow => {
            ArgmaxLaunch::Block(Launch::new(m, format!("argmax_block_{dt}"), (grid_x(k, rows)?, 1, 1), 512))
        }
        ArgmaxVariant::SplitRow => {
            let chunks = vocab.div_ceil(4096);
            let grid = (grid_x(k, chunks)?, grid_yz(k, "rows", rows)?, 1);
            ArgmaxLaunch::Split {
                split: Launch::new(m, format!("argmax_split_{dt}"), grid, 256),
                reduce: Launch::new(m, "argmax_split_reduce".into(), (grid_x(k, rows)?, 1, 1), 256),
                chunks: int(k, "chunks", chunks)?,
            }
        }
    };
    Ok(Some((launch, rows_i, vocab_i)))
}

/// Buffer lengths of a top-k/top-p launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct TopKLens {
    pub logits: usize,
    pub top_k: usize,
    pub top_p: usize,
    pub inv_temp: usize,
    pub uniform: usize,
    pub ids: usize,
    pub probs: usize,
    pub count: usize,
    pub token: usize,
}

/// Top-k/top-p filtering and the draw over rows of `vocab` (one row per
/// `top_k` entry): the launch and its parameters, or `None` for no rows.
pub fn top_k_top_p(
    variant: TopKVariant,
    dtype: DType,
    vocab: usize,
    l: &TopKLens,
) -> Result<Option<(Launch, TopKParams)>, KernelError> {
    let k = KernelId::TopKTopP;
    let rows = l.top_k;
    let ok = vocab > 0
        && l.logits == rows * vocab
        && [l.top_p, l.inv_temp, l.uniform, l.count, l.token].iter().all(|&n| n == rows)
        && l.ids == rows * MAX_TOP_K
        && l.probs == rows * MAX_TOP_K;
    if !ok {
        return Err(shape_err(k, format!("buffers do not fit {rows} rows of {vocab} (outputs {MAX_TOP_K} wide)")));
    }
    if rows == 0 {
        return Ok(None);
    }
    let p = TopKParams { rows: int(k, "rows", rows)?, vocab: int(k, "vocab", vocab)? };
    let threads = match variant {
        TopKVariant::Threads256 => 256,
        TopKVariant::Threads1024 => 1024,
    };
    let entry = format!("top_k_top_p_{threads}_{}", dtype.suffix());
    Ok(Some((Launch::new(CudaModule::Sampling, entry, (grid_x(k, rows)?, 1, 1), threads), p)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::ggml::QuantFormat;

    #[test]
    fn a_fresh_output_needs_an_element() {
        assert_eq!(fresh_len(KernelId::SiluMul, 7).unwrap(), 7);
        let e = fresh_len(KernelId::SiluMul, 0).unwrap_err().to_string();
        assert!(e.contains("SiluMul") && e.contains("no elements"), "{e}");
    }

    #[test]
    fn entries_grids_and_blocks() {
        let (l, rows, dim) =
            rms_norm(RmsNormVariant::WarpPerRow, DType::Bf16, (5 * 64, 5 * 64, 64, 10 * 64), 2).unwrap().unwrap();
        assert_eq!(
            (l.entry.as_str(), l.grid, l.block, rows, dim),
            ("add_rms_norm_packed_warp_bf16", (2, 1, 1), 128, 5, 64)
        );
        assert!(rms_norm(RmsNormVariant::BlockPerRow, DType::F32, (0, 0, 64, 0), 1).unwrap().is_none());
        assert!(rms_norm(RmsNormVariant::BlockPerRow, DType::F32, (64, 64, 64, 128), 1).is_err());

        let s = GemvShape { m: 3, n: 9, k: 64 };
        let (l, dims) = dense_gemv(
            DenseGemvVariant::WarpPerRowX4,
            true,
            (DType::Bf16, DType::F32, DType::F32),
            s,
            (9 * 64, 3 * 128, 27),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            l,
            DenseLaunch::Kernel(Launch::new(
                CudaModule::DenseGemv,
                "dense_gemv_silu_warp_x4_bf16_f32_f32".into(),
                (3, 1, 1),
                128
            ))
        );
        assert_eq!(dims, [3, 9, 64]);
        let mixed = dense_gemv(
            DenseGemvVariant::Cublas,
            false,
            (DType::Bf16, DType::F32, DType::Bf16),
            s,
            (9 * 64, 3 * 64, 27),
        );
        assert!(mixed.is_err(), "cuBLAS takes x in w's type");
        // 17 rows: three tiles down (8, 8, 1); 33 rows are past the kernels' range.
        let tall = GemvShape { m: 17, n: 9, k: 64 };
        let (l, _) = dense_gemv_norm(
            DenseGemvVariant::WarpPerRow,
            (DType::Bf16, DType::Bf16),
            tall,
            (9 * 64, 17 * 64, 17 * 64, 64, 17 * 9, 17 * 64),
        )
        .unwrap()
        .unwrap();
        assert_eq!((l.entry.as_str(), l.grid), ("dense_gemv_norm_warp_bf16_bf16_bf16", (3, 3, 1)));
        let over = GemvShape { m: 33, ..tall };
        let lens = (9 * 64, 33 * 64, 33 * 9);
        assert!(
            dense_gemv(DenseGemvVariant::WarpPerRow, false, (DType::F32, DType::F32, DType::F32), over, lens).is_err()
        );

        let (l, _) = quant_gemv(
            QuantGemvVariant::MultiRowSmem,
            QuantFormat::Q4_1,
            DType::F16,
            GemvShape { m: 1, n: 17, k: 64 },
            (17 * 2 * 20, 64, 17),
        )
        .unwrap()
        .unwrap();
        assert_eq!((l.entry.as_str(), l.grid, l.block), ("quant_gemv_smem_q4_1_f16", (3, 1, 1), 256));

        let (l, rows, vocab) = argmax(ArgmaxVariant::SplitRow, DType::F32, 2 * 9000, 9000, 2).unwrap().unwrap();
        match l {
            ArgmaxLaunch::Split { split, reduce, chunks } => {
                assert_eq!((split.grid, chunks, reduce.grid, rows, vocab), ((3, 2, 1), 3, (2, 1, 1), 2, 9000));
            }
            ArgmaxLaunch::Block(_) => panic!("split variant"),
        }
        assert!(convert(DType::F32, DType::F32, 4, 4).is_err());
        assert_eq!(convert(DType::Bf16, DType::F32, 300, 300).unwrap().unwrap().0.grid, (2, 1, 1));
    }

    #[test]
    fn a_cache_pool_may_pass_2_pow_31_elements() {
        use crate::reference::paged::PagedKvShape;
        use crate::reference::RopePairs;
        // An H200's pool of an 8-KV-head, 128-dim model: 3.3e9 elements per layer, 3.2e6 slots.
        let cache = PagedKvShape { num_blocks: 200_000, kv_heads: 8, block_size: 16, head_dim: 128 };
        assert!(cache.len() > i32::MAX as usize);
        let shape = RopeKvShape { tokens: 2, q_heads: 32, cache, max_pos: 4096, pairs: RopePairs::HalfSplit };
        let lens = RopeKvLens {
            src: 2 * shape.src_width(),
            q_out: 2 * 32 * 128,
            cos_sin: 4096 * 128,
            positions: 2,
            slots: 2,
            k_cache: cache.len(),
            v_cache: cache.len(),
        };
        let (_, p) = rope_kv(RopeKvVariant::BlockPerToken, DType::Bf16, &shape, &lens).unwrap().unwrap();
        assert_eq!(p.num_blocks, 200_000);
        let shape = PagedAttentionShape { num_seqs: 2, q_heads: 32, cache, max_blocks_per_seq: 8 };
        let q = 2 * 32 * 128;
        let lens = PagedAttentionLens {
            q,
            k_cache: cache.len(),
            v_cache: cache.len(),
            block_tables: 16,
            context_lens: 2,
            out: q,
        };
        let (_, p) = paged_attention(PagedAttentionVariant::Plain, DType::Bf16, &shape, &lens, 0.1).unwrap().unwrap();
        assert_eq!(p.num_blocks, 200_000);
        // Slots (and so block ids) still have to fit the kernels' i32.
        let big = PagedKvShape { num_blocks: (i32::MAX as usize) / 16 + 1, kv_heads: 1, block_size: 16, head_dim: 32 };
        let shape = RopeKvShape { tokens: 1, q_heads: 1, cache: big, max_pos: 1, pairs: RopePairs::HalfSplit };
        let lens = RopeKvLens {
            src: shape.src_width(),
            q_out: 32,
            cos_sin: 32,
            positions: 1,
            slots: 1,
            k_cache: big.len(),
            v_cache: big.len(),
        };
        let e = rope_kv(RopeKvVariant::BlockPerToken, DType::Bf16, &shape, &lens).unwrap_err().to_string();
        assert!(e.contains("cache slots"), "{e}");
    }

    #[test]
    fn a_grid_holds_at_most_2_pow_31_minus_1_blocks_in_x() {
        let max = i32::MAX as usize;
        assert_eq!(grid_x(KernelId::SiluMul, max).unwrap(), i32::MAX as u32);
        let e = grid_x(KernelId::SiluMul, max + 1).unwrap_err().to_string();
        assert!(e.contains("2147483648 blocks"), "{e}");
    }
}
