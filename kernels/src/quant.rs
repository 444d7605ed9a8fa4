//! Weight-only quantized matrix products on the CPU: GGML's `Q4_1` (and
//! `Q8_0`) weights times activations quantized on the fly to `Q8_1`, the
//! scheme llama.cpp uses, so our numbers track llama.cpp's on the same file.
//!
//! candle-core's `Q4_1` dot product is scalar; this module has AVX2,
//! AVX-VNNI and AVX-512 VNNI paths (detected at run time) and spreads output
//! rows over threads with rayon. Weights are re-laid out at load in tiles of
//! sixteen rows, one row per 32-bit SIMD lane, so the kernels need no
//! horizontal sums. Each block's integer dot product is exact and the f32
//! steps after it are the same on every path, so every path gives the
//! scalar reference's bits.
//!
//! Block layouts are GGML's, byte for byte:
//! - `Q4_1`: `d: f16, m: f16, qs: [u8; 16]` — 32 weights `d * q + m`, weight
//!   `j < 16` in the low nibble of `qs[j]`, weight `j + 16` in its high nibble.
//! - `Q8_1`: `d: f16, s: f16, qs: [i8; 32]` — 32 values `d * q`, `s = d * Σq`.

use std::sync::atomic::{AtomicU8, Ordering};

use half::f16;
use rayon::prelude::*;

use crate::{KernelError, KernelId};

/// Values per block in both formats.
pub const QK: usize = 32;

/// One GGML `Q4_1` block (20 bytes).
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct BlockQ4_1 {
    /// Scale.
    pub d: f16,
    /// Minimum.
    pub m: f16,
    /// 32 4-bit values, two per byte.
    pub qs: [u8; QK / 2],
}

/// One GGML `Q8_1` block (36 bytes).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ8_1 {
    /// Scale.
    pub d: f16,
    /// `d * Σ qs`.
    pub s: f16,
    /// 32 signed 8-bit values.
    pub qs: [i8; QK],
}

impl Default for BlockQ8_1 {
    fn default() -> Self {
        BlockQ8_1 { d: f16::ZERO, s: f16::ZERO, qs: [0; QK] }
    }
}

/// Weight rows per tile: the SIMD kernels keep one row per 32-bit lane
/// (sixteen in an AVX-512 register, two halves of eight in AVX2), so a
/// block's integer dot products for all sixteen rows come out of eight
/// byte-dot instructions on broadcast activations, with no horizontal sums,
/// and a block's scales multiply as one vector.
pub const TILE_ROWS: usize = 16;

/// Activation rows one kernel call computes against a tile, sharing the
/// unpacked weights (prefill and batched decode).
const ACT_ROWS: usize = 4;

/// One block column of a tile of [`TILE_ROWS`] `Q4_1` rows (the same 320
/// bytes as sixteen GGML blocks): scales and minimums side by side, and the
/// packed nibbles interleaved by four bytes, `qs[j][4k + i]` = row `k`'s
/// GGML byte `4j + i`, so one 64-byte load holds four bytes of every row.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct TileQ4_1 {
    d: [f16; TILE_ROWS],
    m: [f16; TILE_ROWS],
    qs: [[u8; 4 * TILE_ROWS]; QK / 8],
}

/// One block column of a tile of [`TILE_ROWS`] GGML `Q8_0` rows (`d: f16,
/// qs: [i8; 32]`, value `d * q`), interleaved as [`TileQ4_1`]: `qs[j][4k +
/// i]` = row `k`'s weight `4j + i`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct TileQ8_0 {
    d: [f16; TILE_ROWS],
    qs: [[i8; 4 * TILE_ROWS]; QK / 4],
}

/// A GGML `Q8_0` block: scale and 32 signed weights.
type BlockQ8_0 = (f16, [i8; QK]);

/// A tile block column and the GGML blocks it interleaves.
trait Tile<B>: Sized {
    fn pack(rows: [B; TILE_ROWS]) -> Self;
    /// Row `k`'s block.
    fn row(&self, k: usize) -> B;
}

impl Tile<BlockQ4_1> for TileQ4_1 {
    fn pack(b: [BlockQ4_1; TILE_ROWS]) -> Self {
        TileQ4_1 {
            d: b.map(|b| b.d),
            m: b.map(|b| b.m),
            qs: std::array::from_fn(|j| std::array::from_fn(|n| b[n / 4].qs[4 * j + n % 4])),
        }
    }

    fn row(&self, k: usize) -> BlockQ4_1 {
        BlockQ4_1 { d: self.d[k], m: self.m[k], qs: std::array::from_fn(|i| self.qs[i / 4][4 * k + i % 4]) }
    }
}

impl Tile<BlockQ8_0> for TileQ8_0 {
    fn pack(b: [BlockQ8_0; TILE_ROWS]) -> Self {
        TileQ8_0 { d: b.map(|b| b.0), qs: std::array::from_fn(|j| std::array::from_fn(|n| b[n / 4].1[4 * j + n % 4])) }
    }

    fn row(&self, k: usize) -> BlockQ8_0 {
        (self.d[k], std::array::from_fn(|i| self.qs[i / 4][4 * k + i % 4]))
    }
}

/// A `[rows, cols]` matrix of GGML blocks `B` laid out for the tiled
/// kernels: rows in tiles `T` of [`TILE_ROWS`] (block column by block
/// column), the last `rows % 16` rows, if any, as plain row-major blocks.
#[derive(Debug, Clone)]
struct Tiled<T, B> {
    rows: usize,
    cols: usize,
    tiles: Vec<T>,
    tail: Vec<B>,
}

impl<T: Tile<B>, B: Copy> Tiled<T, B> {
    /// Reads GGML's raw bytes (`rows * cols / 32` blocks of `block_bytes`),
    /// decoding each block with `block`.
    fn from_ggml(
        (rows, cols, bytes): (usize, usize, &[u8]),
        (format, block_bytes): (&str, usize),
        block: impl Fn(&[u8]) -> B,
    ) -> Result<Self, KernelError> {
        if !cols.is_multiple_of(QK) {
            return Err(shape_err(format!("{cols} columns is not a multiple of {QK}")));
        }
        let nb = cols / QK;
        if bytes.len() != rows * nb * block_bytes {
            return Err(shape_err(format!("{} bytes for {} {format} blocks of {block_bytes}", bytes.len(), rows * nb)));
        }
        let at = |r: usize, b: usize| block(&bytes[(r * nb + b) * block_bytes..][..block_bytes]);
        let full = rows / TILE_ROWS;
        let tiles = (0..full)
            .flat_map(|t| (0..nb).map(move |b| (t, b)))
            .map(|(t, b)| T::pack(std::array::from_fn(|k| at(t * TILE_ROWS + k, b))))
            .collect();
        let tail = (full * TILE_ROWS..rows).flat_map(|r| (0..nb).map(move |b| (r, b))).map(|(r, b)| at(r, b)).collect();
        Ok(Tiled { rows, cols, tiles, tail })
    }

    fn nb(&self) -> usize {
        self.cols / QK
    }

    /// Tile `t`'s block columns (rows `16t..16t + 16`).
    fn tile(&self, t: usize) -> &[T] {
        &self.tiles[t * self.nb()..(t + 1) * self.nb()]
    }

    /// Row `rows / 16 * 16 + r`'s blocks.
    fn tail_row(&self, r: usize) -> &[B] {
        &self.tail[r * self.nb()..(r + 1) * self.nb()]
    }

    /// Row `r`'s blocks, in order.
    fn row(&self, r: usize) -> impl Iterator<Item = B> + '_ {
        let full = self.rows / TILE_ROWS * TILE_ROWS;
        let (tiled, tail) =
            if r < full { (self.tile(r / TILE_ROWS), &[][..]) } else { (&[][..], self.tail_row(r - full)) };
        tiled.iter().map(move |t| t.row(r % TILE_ROWS)).chain(tail.iter().copied())
    }

    /// Bytes of weight data, at `block_bytes` a GGML block.
    fn size_in_bytes(&self, block_bytes: usize) -> usize {
        (self.tiles.len() * TILE_ROWS + self.tail.len()) * block_bytes
    }

    /// Checks `x` (`m` rows of `cols`) and `out` (`m` rows of `rows`).
    fn check_matmul(&self, x: &[f32], m: usize, out: &[f32]) -> Result<(), KernelError> {
        if x.len() != m * self.cols || out.len() != m * self.rows {
            return Err(shape_err(format!(
                "x {} / out {} for m={m} and a [{}, {}] matrix",
                x.len(),
                out.len(),
                self.rows,
                self.cols
            )));
        }
        Ok(())
    }
}

/// A `[rows, cols]` matrix of `Q4_1` blocks, tiled for the kernels.
#[derive(Debug, Clone)]
pub struct Q4_1Matrix(Tiled<TileQ4_1, BlockQ4_1>);

/// Activations quantized to `Q8_1`, structure of arrays: scales and sums
/// widened to f32 once (from their f16 values, so the arithmetic is GGML's),
/// and each block's exact quant sum (for the `Q8_0` kernels' unsigned
/// offset).
struct ActQ8_1 {
    nb: usize,
    d: Vec<f32>,
    s: Vec<f32>,
    sum: Vec<i32>,
    qs: Vec<[i8; QK]>,
}

/// One activation row of [`ActQ8_1`].
#[derive(Clone, Copy)]
struct ActRow<'a> {
    d: &'a [f32],
    s: &'a [f32],
    sum: &'a [i32],
    qs: &'a [[i8; QK]],
}

impl ActQ8_1 {
    fn new(x: &[f32], m: usize, cols: usize, path: Path) -> Self {
        let nb = cols / QK;
        let mut blocks = vec![BlockQ8_1::default(); m * nb];
        for (row, q) in x.chunks_exact(cols).zip(blocks.chunks_exact_mut(nb)) {
            quantize_q8_1_with(row, q, path);
        }
        ActQ8_1 {
            nb,
            d: blocks.iter().map(|b| b.d.to_f32()).collect(),
            s: blocks.iter().map(|b| b.s.to_f32()).collect(),
            sum: blocks.iter().map(|b| b.qs.iter().map(|q| *q as i32).sum()).collect(),
            qs: blocks.iter().map(|b| b.qs).collect(),
        }
    }

    /// Row `i`.
    fn row(&self, i: usize) -> ActRow<'_> {
        let r = i * self.nb..(i + 1) * self.nb;
        ActRow { d: &self.d[r.clone()], s: &self.s[r.clone()], sum: &self.sum[r.clone()], qs: &self.qs[r] }
    }

    /// Rows `i0..i0 + R`.
    fn rows<const R: usize>(&self, i0: usize) -> [ActRow<'_>; R] {
        std::array::from_fn(|j| self.row(i0 + j))
    }
}

fn shape_err(message: String) -> KernelError {
    KernelError::Shape { kernel: KernelId::QuantMatmul, message }
}

impl Q4_1Matrix {
    /// Reads GGML's raw bytes (`rows * cols / 32` blocks of 20 bytes).
    pub fn from_ggml_bytes(rows: usize, cols: usize, bytes: &[u8]) -> Result<Self, KernelError> {
        let block = |raw: &[u8]| {
            let mut qs = [0u8; 16];
            qs.copy_from_slice(&raw[4..20]);
            BlockQ4_1 { d: f16::from_le_bytes([raw[0], raw[1]]), m: f16::from_le_bytes([raw[2], raw[3]]), qs }
        };
        Ok(Q4_1Matrix(Tiled::from_ggml((rows, cols, bytes), ("Q4_1", 20), block)?))
    }

    /// Rows (outputs).
    pub fn rows(&self) -> usize {
        self.0.rows
    }

    /// Columns (inputs).
    pub fn cols(&self) -> usize {
        self.0.cols
    }

    /// Bytes of weight data.
    pub fn size_in_bytes(&self) -> usize {
        self.0.size_in_bytes(20)
    }

    /// Row `r` as f32.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        for (blk, o) in self.0.row(r).zip(out.chunks_exact_mut(QK)) {
            let (d, m) = (blk.d.to_f32(), blk.m.to_f32());
            for j in 0..QK / 2 {
                o[j] = (blk.qs[j] & 0x0F) as f32 * d + m;
                o[j + QK / 2] = (blk.qs[j] >> 4) as f32 * d + m;
            }
        }
    }

    /// `out[i][r] = Σ_c x[i][c] * W[r][c]` for `x` of `m` rows of `cols`
    /// values; `out` has `m` rows of `self.rows()` values. Activations are
    /// quantized to `Q8_1` first, as llama.cpp does.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<(), KernelError> {
        self.matmul_with(x, m, out, Path::serving())
    }

    /// [`Q4_1Matrix::matmul`] on a chosen code path (for tests and benchmarks).
    pub fn matmul_with(&self, x: &[f32], m: usize, out: &mut [f32], path: Path) -> Result<(), KernelError> {
        Q4_1Matrix::matmul_many_with(&[self], x, m, &mut [out], path)
    }

    /// Several matrices of the same width applied to the same `x` (a
    /// layer's Q, K and V projections, or its gate and up): one activation
    /// quantization and one parallel pass for all. `outs[j]` has `m` rows of
    /// `ws[j].rows()` values; each equals [`Q4_1Matrix::matmul`]'s result.
    pub fn matmul_many(ws: &[&Q4_1Matrix], x: &[f32], m: usize, outs: &mut [&mut [f32]]) -> Result<(), KernelError> {
        Q4_1Matrix::matmul_many_with(ws, x, m, outs, Path::serving())
    }

    /// [`Q4_1Matrix::matmul_many`] on a chosen code path.
    pub fn matmul_many_with(
        ws: &[&Q4_1Matrix],
        x: &[f32],
        m: usize,
        outs: &mut [&mut [f32]],
        path: Path,
    ) -> Result<(), KernelError> {
        let Some(first) = ws.first() else { return Ok(()) };
        let cols = first.cols();
        if ws.len() != outs.len()
            || ws.iter().zip(outs.iter()).any(|(w, o)| w.cols() != cols || o.len() != m * w.rows())
        {
            return Err(shape_err(format!(
                "{} matrices of {cols} columns and {} outputs for m={m}",
                ws.len(),
                outs.len()
            )));
        }
        if x.len() != m * cols {
            return Err(shape_err(format!("x {} for m={m} and {cols} columns", x.len())));
        }
        let act = &ActQ8_1::new(x, m, cols, path);
        let tiles: Vec<_> = ws
            .iter()
            .map(|w| {
                move |t: usize, i0: usize, n: usize, out: &mut Sums| tile_kernel(w.0.tile(t), act, i0, n, path, out)
            })
            .collect();
        let tails: Vec<_> = ws
            .iter()
            .map(|w| move |r: usize, i: usize| q4_1_row(w.0.tail_row(r).iter().copied(), act.row(i)))
            .collect();
        let parts: Vec<Part<'_>> = ws
            .iter()
            .zip(tiles.iter().zip(&tails))
            .map(|(w, (tile, tail))| Part { rows: w.rows(), tile, tail })
            .collect();
        tiled_matmul(&parts, m, outs);
        Ok(())
    }
}

/// A kernel call's results: `[activation row][tile row]`.
type Sums = [[f32; TILE_ROWS]; ACT_ROWS];

/// One matrix of a [`tiled_matmul`] call: its rows, `tile(t, i0, n, sums)`
/// (rows `16t..16t + 16` against activation rows `i0..i0 + n`, `n <= 4`,
/// into `sums[..n]`) and `tail(r, i)` (row `rows / 16 * 16 + r`).
struct Part<'a> {
    rows: usize,
    tile: &'a (dyn Fn(usize, usize, usize, &mut Sums) + Sync),
    tail: &'a (dyn Fn(usize, usize) -> f32 + Sync),
}

/// The shared driver of the tiled kernels: `outs[p][i][r]` for `m`
/// activation rows and every part `p`, all parts in one parallel pass (one
/// hand-off to the worker threads per call, not per matrix). Each task owns a
/// run of one part's weight tiles and computes them for every activation row,
/// up to four rows per kernel call, so each weight byte is read from memory
/// once per call; results are built by weight row (`[rows][m]`) and
/// transposed.
fn tiled_matmul(parts: &[Part<'_>], m: usize, outs: &mut [&mut [f32]]) {
    const TILES_PER_TASK: usize = 2;
    let mut out_ts: Vec<Vec<f32>> = parts.iter().map(|p| vec![0f32; p.rows * m]).collect();
    let mut tasks = Vec::new();
    let mut tails = Vec::new();
    for (pi, (p, out_t)) in parts.iter().zip(out_ts.iter_mut()).enumerate() {
        let (tiled, tail_out) = out_t.split_at_mut(p.rows / TILE_ROWS * TILE_ROWS * m);
        tasks.extend(tiled.chunks_mut(TILES_PER_TASK * TILE_ROWS * m).enumerate().map(|(t, c)| (pi, t, c)));
        tails.push(tail_out);
    }
    tasks.into_par_iter().for_each(|(pi, task, chunk)| {
        let mut sums = [[0f32; TILE_ROWS]; ACT_ROWS];
        for (k, o) in chunk.chunks_exact_mut(TILE_ROWS * m).enumerate() {
            for i0 in (0..m).step_by(ACT_ROWS) {
                let n = ACT_ROWS.min(m - i0);
                (parts[pi].tile)(task * TILES_PER_TASK + k, i0, n, &mut sums);
                for (j, s) in sums.iter().enumerate().take(n) {
                    for (r, v) in s.iter().enumerate() {
                        o[r * m + i0 + j] = *v;
                    }
                }
            }
        }
    });
    for (p, tail_out) in parts.iter().zip(tails) {
        for (r, o) in tail_out.chunks_exact_mut(m).enumerate() {
            for (i, v) in o.iter_mut().enumerate() {
                *v = (p.tail)(r, i);
            }
        }
    }
    for ((p, out_t), out) in parts.iter().zip(&out_ts).zip(outs.iter_mut()) {
        if m == 1 {
            out.copy_from_slice(out_t);
        } else {
            for (r, col) in out_t.chunks_exact(m).enumerate() {
                for (i, v) in col.iter().enumerate() {
                    out[i * p.rows + r] = *v;
                }
            }
        }
    }
}

/// A `[rows, cols]` matrix of GGML `Q8_0` blocks, tiled as [`Q4_1Matrix`]
/// (the default model's tied LM head is `Q8_0`). Activations are quantized
/// to 8 bits per block (`Q8_0`, whose quants and scale equal `Q8_1`'s) as
/// llama.cpp does.
#[derive(Debug, Clone)]
pub struct Q8_0Matrix(Tiled<TileQ8_0, BlockQ8_0>);

impl Q8_0Matrix {
    /// Reads GGML's raw bytes (`rows * cols / 32` blocks of 34 bytes).
    pub fn from_ggml_bytes(rows: usize, cols: usize, bytes: &[u8]) -> Result<Self, KernelError> {
        let block = |raw: &[u8]| (f16::from_le_bytes([raw[0], raw[1]]), std::array::from_fn(|j| raw[2 + j] as i8));
        Ok(Q8_0Matrix(Tiled::from_ggml((rows, cols, bytes), ("Q8_0", 34), block)?))
    }

    /// Rows (outputs).
    pub fn rows(&self) -> usize {
        self.0.rows
    }

    /// Columns (inputs).
    pub fn cols(&self) -> usize {
        self.0.cols
    }

    /// Bytes of weight data.
    pub fn size_in_bytes(&self) -> usize {
        self.0.size_in_bytes(34)
    }

    /// Row `r` as f32.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        for ((d, qs), o) in self.0.row(r).zip(out.chunks_exact_mut(QK)) {
            for (v, q) in o.iter_mut().zip(qs) {
                *v = q as f32 * d.to_f32();
            }
        }
    }

    /// `out[i][r] = Σ_c x[i][c] * W[r][c]`, as [`Q4_1Matrix::matmul`].
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<(), KernelError> {
        self.matmul_with(x, m, out, Path::serving())
    }

    /// [`Q8_0Matrix::matmul`] on a chosen code path (for tests and benchmarks).
    pub fn matmul_with(&self, x: &[f32], m: usize, out: &mut [f32], path: Path) -> Result<(), KernelError> {
        self.0.check_matmul(x, m, out)?;
        let act = &ActQ8_1::new(x, m, self.cols(), path);
        let tile = |t: usize, i0: usize, n: usize, out: &mut Sums| tile_kernel(self.0.tile(t), act, i0, n, path, out);
        let tail = |r: usize, i: usize| q8_0_row(self.0.tail_row(r).iter().copied(), act.row(i));
        tiled_matmul(&[Part { rows: self.rows(), tile: &tile, tail: &tail }], m, &mut [out]);
        Ok(())
    }
}

/// Which implementation of the block dot product to use. Every path gives
/// the same bits: each computes a block's integer dot product exactly and
/// then performs the same f32 operations in the same order (see
/// [`q4_1_row`], [`q8_0_row`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Portable scalar code (the reference).
    Scalar,
    /// AVX2 + FMA + F16C (x86-64), rows in two halves of eight lanes.
    Avx2,
    /// [`Path::Avx2`] with AVX-VNNI's byte dot product (`vpdpbusd`), which
    /// replaces a multiply-add pair.
    Avx2Vnni,
    /// AVX-512 (F, BW) with VNNI: sixteen rows per instruction.
    Avx512Vnni,
}

/// The path [`Path::prefer`] set: 0 for none, else 1 + its index in [`Path::ALL`].
static PREFERRED: AtomicU8 = AtomicU8::new(0);

impl Path {
    /// Every path, the reference first.
    pub const ALL: [Path; 4] = [Path::Scalar, Path::Avx2, Path::Avx2Vnni, Path::Avx512Vnni];

    /// The path the matmuls without an explicit one run (`matmul`,
    /// `matmul_many`): the one [`Path::prefer`] set, else [`Path::detect`].
    pub fn serving() -> Path {
        match PREFERRED.load(Ordering::Relaxed) {
            0 => Path::detect(),
            i => Path::ALL[usize::from(i - 1)],
        }
    }

    /// Makes `path` the process's serving path (`None`: back to
    /// [`Path::detect`]); a per-SKU kernel plan sets it at start. A path this
    /// CPU cannot run is refused.
    pub fn prefer(path: Option<Path>) -> Result<(), KernelError> {
        let code = match path {
            None => 0,
            Some(p) if p.supported() => 1 + Path::ALL.iter().position(|q| *q == p).expect("ALL lists every path") as u8,
            Some(p) => {
                return Err(KernelError::Plan(format!("this CPU cannot run the {} matmul path", p.name())));
            }
        };
        PREFERRED.store(code, Ordering::Relaxed);
        Ok(())
    }

    /// The path's stable name, as kernel plans write it.
    pub fn name(self) -> &'static str {
        match self {
            Path::Scalar => "scalar",
            Path::Avx2 => "avx2",
            Path::Avx2Vnni => "avx2_vnni",
            Path::Avx512Vnni => "avx512_vnni",
        }
    }

    /// The fastest path this CPU supports.
    pub fn detect() -> Path {
        *[Path::Avx512Vnni, Path::Avx2Vnni, Path::Avx2].iter().find(|p| p.supported()).unwrap_or(&Path::Scalar)
    }

    /// Every path this CPU can run, the reference first (for tests).
    pub fn available() -> Vec<Path> {
        Path::ALL.into_iter().filter(|p| p.supported()).collect()
    }

    /// Whether this CPU has the features the path uses.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            match self {
                Path::Scalar => true,
                Path::Avx2 => avx2,
                Path::Avx2Vnni => avx2 && has!("avxvnni"),
                Path::Avx512Vnni => avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vnni"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Path::Scalar
        }
    }
}

/// Quantizes 32-value blocks of `x` to `Q8_1`: the inverse scale is
/// `127 / amax`, as GGML's x86 `quantize_row_q8_1` computes it (not `1 / d`),
/// and rounding is half away from zero, as GGML's scalar `roundf`. (GGML's
/// SIMD path rounds ties to even; against the llama.cpp fixture that choice
/// made our greedy tokens part earlier, so which one a given llama.cpp build
/// runs is not something a fixture pins down.) The reference for
/// [`quantize_q8_1_with`].
pub fn quantize_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
    for (xs, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in b.qs.iter_mut().zip(xs) {
            *q = (v * id).round() as i8;
            sum += *q as i32;
        }
        b.d = f16::from_f32(d);
        b.s = f16::from_f32(d * sum as f32);
    }
}

/// [`quantize_q8_1`] on a chosen code path; every path gives the same bits.
pub fn quantize_q8_1_with(x: &[f32], out: &mut [BlockQ8_1], path: Path) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: every path but `Scalar` checked AVX2, FMA and F16C at run
        // time (`Path::supported`); callers only pass supported paths.
        Path::Avx2 | Path::Avx2Vnni | Path::Avx512Vnni if path.supported() => unsafe { avx2::quantize_q8_1(x, out) },
        _ => quantize_q8_1(x, out),
    }
}

/// One `Q4_1` row's dot product with one activation row: per block, the
/// exact integer `Σ q_w q_x`, then `acc = fma(Σ, d_w * d_x, acc)` and
/// `acc_m = fma(m_w, s_x, acc_m)`; the result is `acc + acc_m`. This is the
/// arithmetic of every path, lane by lane.
fn q4_1_row(w: impl Iterator<Item = BlockQ4_1>, x: ActRow<'_>) -> f32 {
    let (mut acc, mut acc_m) = (0f32, 0f32);
    for (b, blk) in w.enumerate() {
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            sumi +=
                (blk.qs[j] & 0x0F) as i32 * x.qs[b][j] as i32 + (blk.qs[j] >> 4) as i32 * x.qs[b][j + QK / 2] as i32;
        }
        acc = (sumi as f32).mul_add(blk.d.to_f32() * x.d[b], acc);
        acc_m = blk.m.to_f32().mul_add(x.s[b], acc_m);
    }
    acc + acc_m
}

/// One `Q8_0` row's dot product: per block the exact `Σ q_w q_x`, then
/// `acc = fma(Σ, d_w * d_x, acc)`.
fn q8_0_row(w: impl Iterator<Item = BlockQ8_0>, x: ActRow<'_>) -> f32 {
    let mut acc = 0f32;
    for (b, (d, qs)) in w.enumerate() {
        let sumi: i32 = qs.iter().zip(&x.qs[b]).map(|(a, b)| *a as i32 * *b as i32).sum();
        acc = (sumi as f32).mul_add(d.to_f32() * x.d[b], acc);
    }
    acc
}

/// Calls `f::<R>(args)` for `R = n` (1 to [`ACT_ROWS`]).
macro_rules! by_rows {
    ($n:expr, $($f:ident)::+ ($($arg:expr),*)) => {
        match $n {
            1 => $($f)::+::<1>($($arg),*),
            2 => $($f)::+::<2>($($arg),*),
            3 => $($f)::+::<3>($($arg),*),
            _ => $($f)::+::<4>($($arg),*),
        }
    };
}

/// A weight format's tile kernels on every path.
trait Kernels: Tile<Self::Block> + Sized {
    /// The GGML block a tile interleaves.
    type Block;
    /// One row's dot product, the scalar reference.
    fn dot_row(w: impl Iterator<Item = Self::Block>, x: ActRow<'_>) -> f32;
    /// # Safety
    /// The CPU must support [`Path::Avx512Vnni`].
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx512<const R: usize>(w: &[Self], act: &ActQ8_1, i0: usize, out: &mut Sums);
    /// # Safety
    /// The CPU must support [`Path::Avx2Vnni`].
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2_vnni<const R: usize>(w: &[Self], act: &ActQ8_1, i0: usize, out: &mut Sums);
    /// # Safety
    /// The CPU must support [`Path::Avx2`].
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2<const R: usize>(w: &[Self], act: &ActQ8_1, i0: usize, out: &mut Sums);
}

/// Implements [`Kernels`] for a tile type from its functions.
macro_rules! kernels {
    ($tile:ty, $block:ty, $row:ident, $avx512:path, $avx2_vnni:path, $avx2:path) => {
        impl Kernels for $tile {
            type Block = $block;
            fn dot_row(w: impl Iterator<Item = $block>, x: ActRow<'_>) -> f32 {
                $row(w, x)
            }
            #[cfg(target_arch = "x86_64")]
            unsafe fn avx512<const R: usize>(w: &[Self], act: &ActQ8_1, i0: usize, out: &mut Sums) {
                // SAFETY: the caller's contract is the kernel's.
                unsafe { $avx512(w, act, i0, out) }
            }
            #[cfg(target_arch = "x86_64")]
            unsafe fn avx2_vnni<const R: usize>(w: &[Self], act: &ActQ8_1, i0: usize, out: &mut Sums) {
                // SAFETY: as above.
                unsafe { $avx2_vnni(w, act, i0, out) }
            }
            #[cfg(target_arch = "x86_64")]
            unsafe fn avx2<const R: usize>(w: &[Self], act: &ActQ8_1, i0: usize, out: &mut Sums) {
                // SAFETY: as above.
                unsafe { $avx2(w, act, i0, out) }
            }
        }
    };
}
kernels!(TileQ4_1, BlockQ4_1, q4_1_row, avx512::q4_1::<R>, avx2::q4_1_vnni::<R>, avx2::q4_1::<R>);
kernels!(TileQ8_0, BlockQ8_0, q8_0_row, avx512::q8_0::<R>, avx2::q8_0_vnni::<R>, avx2::q8_0::<R>);

/// A tile against activation rows `i0..i0 + n` on `path` (the scalar
/// reference for a path this CPU lacks).
fn tile_kernel<T: Kernels>(w: &[T], act: &ActQ8_1, i0: usize, n: usize, path: Path, out: &mut Sums) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Path::supported` checked the features at run time.
        Path::Avx512Vnni if path.supported() => unsafe { by_rows!(n, T::avx512(w, act, i0, out)) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Path::Avx2Vnni if path.supported() => unsafe { by_rows!(n, T::avx2_vnni(w, act, i0, out)) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Path::Avx2 if path.supported() => unsafe { by_rows!(n, T::avx2(w, act, i0, out)) },
        _ => {
            for (j, o) in out.iter_mut().enumerate().take(n) {
                for (k, o) in o.iter_mut().enumerate() {
                    *o = T::dot_row(w.iter().map(|t| t.row(k)), act.row(i0 + j));
                }
            }
        }
    }
}

/// The activation quants of block `b` as eight little-endian 32-bit words:
/// word `j` holds quants `4j..4j + 4`, the four bytes each row lane's byte
/// dot product takes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn words(q: &[i8; QK]) -> [i32; QK / 4] {
    std::array::from_fn(|j| {
        i32::from_le_bytes([q[4 * j] as u8, q[4 * j + 1] as u8, q[4 * j + 2] as u8, q[4 * j + 3] as u8])
    })
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{words, ActQ8_1, Sums, TileQ4_1, TileQ8_0, TILE_ROWS};
    use std::arch::x86_64::*;

    /// Sixteen `Q4_1` rows (one per lane) against `R` activation rows.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F, BW and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn q4_1<const R: usize>(w: &[TileQ4_1], act: &ActQ8_1, i0: usize, out: &mut Sums) {
        let x = act.rows::<R>(i0);
        // SAFETY: the features are enabled; each load reads exactly a
        // tile's 64-byte row of nibbles or its 16 f16 scales, each store
        // writes one `[f32; 16]` of `out`.
        unsafe {
            let low = _mm512_set1_epi8(0x0F);
            let mut acc = [_mm512_setzero_ps(); R];
            let mut acc_m = [_mm512_setzero_ps(); R];
            for (b, t) in w.iter().enumerate() {
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(t.d.as_ptr() as *const __m256i));
                let m = _mm512_cvtph_ps(_mm256_loadu_si256(t.m.as_ptr() as *const __m256i));
                let p: [__m512i; 4] = std::array::from_fn(|j| _mm512_loadu_si512(t.qs[j].as_ptr() as *const _));
                let lo = p.map(|p| _mm512_and_si512(p, low));
                let hi = p.map(|p| _mm512_and_si512(_mm512_srli_epi16(p, 4), low));
                for r in 0..R {
                    let q = words(&x[r].qs[b]);
                    let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                    for j in 0..4 {
                        s0 = _mm512_dpbusd_epi32(s0, lo[j], _mm512_set1_epi32(q[j]));
                        s1 = _mm512_dpbusd_epi32(s1, hi[j], _mm512_set1_epi32(q[4 + j]));
                    }
                    let sumi = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
                    acc[r] = _mm512_fmadd_ps(sumi, _mm512_mul_ps(d, _mm512_set1_ps(x[r].d[b])), acc[r]);
                    acc_m[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(x[r].s[b]), acc_m[r]);
                }
            }
            for r in 0..R {
                _mm512_storeu_ps(out[r].as_mut_ptr(), _mm512_add_ps(acc[r], acc_m[r]));
            }
        }
        const _: () = assert!(TILE_ROWS == 16);
    }

    /// Sixteen `Q8_0` rows against `R` activation rows. The byte dot
    /// product is unsigned × signed, so the weights are offset to
    /// `w + 128` (a sign-bit flip) and `128 Σ q_x` subtracted: exact.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F, BW and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn q8_0<const R: usize>(w: &[TileQ8_0], act: &ActQ8_1, i0: usize, out: &mut Sums) {
        let x = act.rows::<R>(i0);
        // SAFETY: as in `q4_1`.
        unsafe {
            let flip = _mm512_set1_epi8(-128);
            let mut acc = [_mm512_setzero_ps(); R];
            for (b, t) in w.iter().enumerate() {
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(t.d.as_ptr() as *const __m256i));
                let u: [__m512i; 8] =
                    std::array::from_fn(|j| _mm512_xor_si512(_mm512_loadu_si512(t.qs[j].as_ptr() as *const _), flip));
                for r in 0..R {
                    let q = words(&x[r].qs[b]);
                    let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                    for j in 0..4 {
                        s0 = _mm512_dpbusd_epi32(s0, u[2 * j], _mm512_set1_epi32(q[2 * j]));
                        s1 = _mm512_dpbusd_epi32(s1, u[2 * j + 1], _mm512_set1_epi32(q[2 * j + 1]));
                    }
                    let offset = _mm512_set1_epi32(128 * x[r].sum[b]);
                    let sumi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_add_epi32(s0, s1), offset));
                    acc[r] = _mm512_fmadd_ps(sumi, _mm512_mul_ps(d, _mm512_set1_ps(x[r].d[b])), acc[r]);
                }
            }
            for r in 0..R {
                _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{words, ActQ8_1, BlockQ8_1, Sums, TileQ4_1, TileQ8_0, QK};
    use half::f16;
    use std::arch::x86_64::*;

    /// [`super::quantize_q8_1`], eight values at a time, bit for bit.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
        let sign = _mm256_set1_ps(-0.0);
        let half = _mm256_set1_ps(0.5);
        for (xs, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
            // SAFETY: `xs` holds 32 f32, read as four unaligned vectors;
            // `b.qs` holds 32 bytes, written as one.
            unsafe {
                let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(xs.as_ptr().add(8 * i)));
                let abs = |v: __m256| _mm256_andnot_ps(sign, v);
                let m8 = _mm256_max_ps(_mm256_max_ps(abs(v[0]), abs(v[1])), _mm256_max_ps(abs(v[2]), abs(v[3])));
                let m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
                let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
                let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
                let d = amax / 127.0;
                let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
                // Half away from zero, exactly: truncate, then step away
                // from zero where the (exact) fraction is at least a half.
                let q: [__m256i; 4] = std::array::from_fn(|i| {
                    let y = _mm256_mul_ps(v[i], id);
                    let t = _mm256_round_ps(y, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
                    let frac = _mm256_sub_ps(y, t);
                    let up = _mm256_cmp_ps(abs(frac), half, _CMP_GE_OQ);
                    let step = _mm256_or_ps(_mm256_and_ps(y, sign), _mm256_set1_ps(1.0));
                    _mm256_cvtps_epi32(_mm256_add_ps(t, _mm256_and_ps(up, step)))
                });
                // i32 -> i8 (values are within ±127): pack, then undo the
                // lane interleaving of the two packs.
                let p16a = _mm256_packs_epi32(q[0], q[1]);
                let p16b = _mm256_packs_epi32(q[2], q[3]);
                let p8 = _mm256_packs_epi16(p16a, p16b);
                let p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                _mm256_storeu_si256(b.qs.as_mut_ptr() as *mut __m256i, p8);
                let s8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
                let s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
                let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
                let sum = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b10_11_00_01)));
                b.d = f16::from_f32(d);
                b.s = f16::from_f32(d * sum as f32);
            }
        }
    }

    /// `acc + Σ u8 × i8` over groups of four bytes, per i32 lane.
    #[inline(always)]
    unsafe fn dot4<const VNNI: bool>(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        if VNNI {
            // SAFETY: only reached from the `*_vnni` wrappers (AVX-VNNI checked).
            unsafe { _mm256_dpbusd_avx_epi32(acc, u, s) }
        } else {
            // Pairs of u8 × i8 fit in i16 for our operands (Q4_1: 15 × 127 × 2;
            // Q8_0: 128 × 127 × 2 = 32512): no saturation.
            // SAFETY: only reached from the AVX2 wrappers.
            unsafe { _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))) }
        }
    }

    /// Rows `8h..8h + 8` of a `Q4_1` tile (one per lane) against `R`
    /// activation rows.
    #[inline(always)]
    unsafe fn q4_1_half<const R: usize, const VNNI: bool>(
        w: &[TileQ4_1],
        act: &ActQ8_1,
        i0: usize,
        h: usize,
        out: &mut Sums,
    ) {
        let x = act.rows::<R>(i0);
        // SAFETY: the wrappers enable the features these intrinsics need;
        // each load reads 32 bytes of a tile's 64-byte row or 8 of its 16
        // scales, each store writes 8 f32 of one `out` row.
        unsafe {
            let low = _mm256_set1_epi8(0x0F);
            let mut acc = [_mm256_setzero_ps(); R];
            let mut acc_m = [_mm256_setzero_ps(); R];
            for (b, t) in w.iter().enumerate() {
                let d = _mm256_cvtph_ps(_mm_loadu_si128(t.d.as_ptr().add(8 * h) as *const __m128i));
                let m = _mm256_cvtph_ps(_mm_loadu_si128(t.m.as_ptr().add(8 * h) as *const __m128i));
                let p: [__m256i; 4] =
                    std::array::from_fn(|j| _mm256_loadu_si256(t.qs[j].as_ptr().add(32 * h) as *const __m256i));
                let lo = p.map(|p| _mm256_and_si256(p, low));
                let hi = p.map(|p| _mm256_and_si256(_mm256_srli_epi16(p, 4), low));
                for r in 0..R {
                    let q = words(&x[r].qs[b]);
                    let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                    for j in 0..4 {
                        s0 = dot4::<VNNI>(s0, lo[j], _mm256_set1_epi32(q[j]));
                        s1 = dot4::<VNNI>(s1, hi[j], _mm256_set1_epi32(q[4 + j]));
                    }
                    let sumi = _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));
                    acc[r] = _mm256_fmadd_ps(sumi, _mm256_mul_ps(d, _mm256_set1_ps(x[r].d[b])), acc[r]);
                    acc_m[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(x[r].s[b]), acc_m[r]);
                }
            }
            for r in 0..R {
                _mm256_storeu_ps(out[r].as_mut_ptr().add(8 * h), _mm256_add_ps(acc[r], acc_m[r]));
            }
        }
    }

    /// Rows `8h..8h + 8` of a `Q8_0` tile against `R` activation rows, with
    /// GGML's sign trick: `|w| × (x · sign w)` is the unsigned × signed
    /// product the byte dot instructions take.
    #[inline(always)]
    unsafe fn q8_0_half<const R: usize, const VNNI: bool>(
        w: &[TileQ8_0],
        act: &ActQ8_1,
        i0: usize,
        h: usize,
        out: &mut Sums,
    ) {
        let x = act.rows::<R>(i0);
        // SAFETY: as in `q4_1_half`.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); R];
            for (b, t) in w.iter().enumerate() {
                let d = _mm256_cvtph_ps(_mm_loadu_si128(t.d.as_ptr().add(8 * h) as *const __m128i));
                for r in 0..R {
                    let q = words(&x[r].qs[b]);
                    let mut s = [_mm256_setzero_si256(); 2];
                    for j in 0..QK / 4 {
                        let wj = _mm256_loadu_si256(t.qs[j].as_ptr().add(32 * h) as *const __m256i);
                        let xj = _mm256_sign_epi8(_mm256_set1_epi32(q[j]), wj);
                        s[j % 2] = dot4::<VNNI>(s[j % 2], _mm256_sign_epi8(wj, wj), xj);
                    }
                    let sumi = _mm256_cvtepi32_ps(_mm256_add_epi32(s[0], s[1]));
                    acc[r] = _mm256_fmadd_ps(sumi, _mm256_mul_ps(d, _mm256_set1_ps(x[r].d[b])), acc[r]);
                }
            }
            for r in 0..R {
                _mm256_storeu_ps(out[r].as_mut_ptr().add(8 * h), acc[r]);
            }
        }
    }

    /// Generates a kernel wrapper compiled with `$features` that runs both
    /// halves of a tile.
    macro_rules! wrapper {
        ($name:ident, $half:ident, $tile:ty, $vnni:literal, $features:literal) => {
            /// # Safety
            #[doc = concat!("The CPU must support ", $features, ".")]
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<const R: usize>(w: &[$tile], act: &ActQ8_1, i0: usize, out: &mut Sums) {
                // SAFETY: the caller checked the features `$half` uses.
                unsafe {
                    $half::<R, $vnni>(w, act, i0, 0, out);
                    $half::<R, $vnni>(w, act, i0, 1, out);
                }
            }
        };
    }
    wrapper!(q4_1, q4_1_half, TileQ4_1, false, "avx2,fma,f16c");
    wrapper!(q4_1_vnni, q4_1_half, TileQ4_1, true, "avx2,fma,f16c,avxvnni");
    wrapper!(q8_0, q8_0_half, TileQ8_0, false, "avx2,fma,f16c");
    wrapper!(q8_0_vnni, q8_0_half, TileQ8_0, true, "avx2,fma,f16c,avxvnni");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn random_q4_1(rows: usize, cols: usize, seed: &mut u64) -> Q4_1Matrix {
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / QK {
            bytes.extend(f16::from_f32(0.01 + lcg(seed).abs() * 0.05).to_le_bytes());
            bytes.extend(f16::from_f32(lcg(seed) * 0.4).to_le_bytes());
            for _ in 0..16 {
                bytes.push((lcg(seed).abs() * 255.0) as u8);
            }
        }
        Q4_1Matrix::from_ggml_bytes(rows, cols, &bytes).unwrap()
    }

    #[test]
    fn simd_equals_scalar_and_both_track_f32() {
        let mut seed = 7;
        for (rows, cols, m) in [(40, 64, 1), (33, 576, 3), (130, 1536, 5), (16, 96, 8)] {
            let w = random_q4_1(rows, cols, &mut seed);
            let x: Vec<f32> = (0..m * cols).map(|_| lcg(&mut seed) * 3.0).collect();
            let mut scalar = vec![0f32; m * rows];
            w.matmul_with(&x, m, &mut scalar, Path::Scalar).unwrap();
            for path in Path::available() {
                let mut fast = vec![0f32; m * rows];
                w.matmul_with(&x, m, &mut fast, path).unwrap();
                let mut row = vec![0f32; cols];
                for r in 0..rows {
                    w.dequantize_row(r, &mut row);
                    for i in 0..m {
                        let exact: f32 = row.iter().zip(&x[i * cols..(i + 1) * cols]).map(|(a, b)| a * b).sum();
                        let (s, f) = (scalar[i * rows + r], fast[i * rows + r]);
                        assert_eq!(s.to_bits(), f.to_bits(), "{path:?}: {f} vs scalar {s}");
                        // 8-bit activations: error well under 1% of the row's magnitude.
                        let mag: f32 = row.iter().zip(&x[i * cols..]).map(|(a, b)| (a * b).abs()).sum();
                        assert!((s - exact).abs() <= 0.01 * mag, "quantized {s} vs exact {exact} (|.| {mag})");
                    }
                }
            }
        }
    }

    #[test]
    fn q8_0_simd_equals_scalar_and_tracks_f32() {
        let mut seed = 11;
        for (rows, cols, m) in [(8, 32, 1), (37, 576, 2), (130, 64, 4), (48, 96, 7)] {
            let mut bytes = Vec::new();
            for _ in 0..rows * cols / QK {
                bytes.extend(f16::from_f32(0.002 + lcg(&mut seed).abs() * 0.01).to_le_bytes());
                // The whole i8 range, -128 included (GGML never writes it; the
                // sign trick must still hold).
                bytes.extend((0..QK).map(|_| (lcg(&mut seed) * 128.0).floor() as i8 as u8));
            }
            let w = Q8_0Matrix::from_ggml_bytes(rows, cols, &bytes).unwrap();
            let x: Vec<f32> = (0..m * cols).map(|_| lcg(&mut seed) * 2.0).collect();
            let mut scalar = vec![0f32; m * rows];
            w.matmul_with(&x, m, &mut scalar, Path::Scalar).unwrap();
            let mut row = vec![0f32; cols];
            for path in Path::available() {
                let mut fast = vec![0f32; m * rows];
                w.matmul_with(&x, m, &mut fast, path).unwrap();
                for r in 0..rows {
                    w.dequantize_row(r, &mut row);
                    for i in 0..m {
                        let xi = &x[i * cols..(i + 1) * cols];
                        let exact: f32 = row.iter().zip(xi).map(|(a, b)| a * b).sum();
                        let mag: f32 = row.iter().zip(xi).map(|(a, b)| (a * b).abs()).sum();
                        let (s, f) = (scalar[i * rows + r], fast[i * rows + r]);
                        assert_eq!(s.to_bits(), f.to_bits(), "{path:?}: {f} vs scalar {s}");
                        assert!((s - exact).abs() <= 0.01 * mag, "quantized {s} vs exact {exact} (|.| {mag})");
                    }
                }
            }
        }
        assert!(Q8_0Matrix::from_ggml_bytes(2, 32, &[0; 67]).is_err());
    }

    #[test]
    fn simd_quantization_is_bit_identical_to_the_reference() {
        let mut seed = 5;
        let mut x: Vec<f32> = (0..32 * 64).map(|_| lcg(&mut seed) * 4.0).collect();
        // Exact halves after scaling (amax 127 makes the scale 1), zeros,
        // an all-zero block and a one-hot block.
        for (i, v) in x[..32].iter_mut().enumerate() {
            *v = if i == 0 { 127.0 } else { i as f32 - 15.5 };
        }
        x[32..64].fill(0.0);
        x[64..96].fill(0.0);
        x[70] = -3.0;
        let mut want = vec![BlockQ8_1::default(); 64];
        quantize_q8_1(&x, &mut want);
        for path in Path::available() {
            let mut got = vec![BlockQ8_1::default(); 64];
            quantize_q8_1_with(&x, &mut got, path);
            for (g, w) in got.iter().zip(&want) {
                assert_eq!((g.qs, g.d.to_bits(), g.s.to_bits()), (w.qs, w.d.to_bits(), w.s.to_bits()), "{path:?}");
            }
        }
        // Half away from zero: -14.5 -> -15, -0.5 -> -1, 0.5 -> 1 (ties to
        // even would give -14, 0, 0).
        assert_eq!(want[0].qs[31], 16);
        assert_eq!(want[0].qs[1], -15);
        assert_eq!(want[0].qs[15], -1);
        assert_eq!(want[0].qs[16], 1);
    }

    #[test]
    fn many_matrices_at_once_equal_each_alone() {
        let mut seed = 9;
        let ws: Vec<_> = [40, 13, 96].iter().map(|r| random_q4_1(*r, 96, &mut seed)).collect();
        for m in [1, 3] {
            let x: Vec<f32> = (0..m * 96).map(|_| lcg(&mut seed)).collect();
            let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; m * w.rows()]).collect();
            let mut refs: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
            Q4_1Matrix::matmul_many(&ws.iter().collect::<Vec<_>>(), &x, m, &mut refs).unwrap();
            for (w, got) in ws.iter().zip(&outs) {
                let mut alone = vec![0f32; m * w.rows()];
                w.matmul(&x, m, &mut alone).unwrap();
                assert_eq!(got, &alone);
            }
        }
        let w = &ws[0];
        let mut short = vec![0f32; 3];
        assert!(Q4_1Matrix::matmul_many(&[w], &[0.0; 96], 1, &mut [&mut short]).is_err());
    }

    #[test]
    fn bad_shapes_are_typed_errors() {
        assert!(Q4_1Matrix::from_ggml_bytes(2, 30, &[0; 40]).is_err());
        assert!(Q4_1Matrix::from_ggml_bytes(2, 32, &[0; 39]).is_err());
        let w = Q4_1Matrix::from_ggml_bytes(2, 32, &[0; 40]).unwrap();
        assert!(w.matmul(&[0.0; 31], 1, &mut [0.0; 2]).is_err());
    }

    #[test]
    fn q8_1_sum_is_scale_times_quant_sum() {
        let x: Vec<f32> = (0..64).map(|i| i as f32 - 20.0).collect();
        let mut q = vec![BlockQ8_1::default(); 2];
        quantize_q8_1(&x, &mut q);
        for b in &q {
            let s: i32 = b.qs.iter().map(|v| *v as i32).sum();
            assert!((b.s.to_f32() - s as f32 * b.d.to_f32()).abs() < 0.05 * b.s.to_f32().abs().max(1.0));
            assert_eq!(b.qs.iter().map(|v| v.unsigned_abs()).max(), Some(127));
        }
    }
}
