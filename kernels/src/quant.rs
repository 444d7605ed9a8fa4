//! Weight-only quantized matrix products on the CPU: GGML's `Q4_1` weights
//! times activations quantized on the fly to `Q8_1`, the scheme llama.cpp uses,
//! so our numbers track llama.cpp's on the same file.
//!
//! candle-core's `Q4_1` dot product is scalar; this module adds an AVX2+FMA
//! path (detected at run time) and spreads output rows over threads with
//! rayon. The scalar path is the reference the SIMD path is tested against.
//!
//! Block layouts are GGML's, byte for byte:
//! - `Q4_1`: `d: f16, m: f16, qs: [u8; 16]` — 32 weights `d * q + m`, weight
//!   `j < 16` in the low nibble of `qs[j]`, weight `j + 16` in its high nibble.
//! - `Q8_1`: `d: f16, s: f16, qs: [i8; 32]` — 32 values `d * q`, `s = d * Σq`.

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

/// Weight rows interleaved per tile: the dot-product kernels compute this
/// many output rows at once against one activation block, so the activation
/// is loaded once per tile and the rows' sums form independent dependency
/// chains (one row at a time was latency-bound: ~18 cycles a block). Each
/// row's sum is still accumulated in exactly the order of llama.cpp's AVX2
/// dot products (per block, per lane, then GGML's horizontal sum), so the
/// two engines' results on the same file agree to the bit where their
/// inputs do.
pub const TILE_ROWS: usize = 4;

/// One block column of a tile of [`TILE_ROWS`] `Q4_1` rows: the same 80
/// bytes as four GGML blocks, with the scales side by side so one
/// instruction converts the four of them.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
struct TileQ4_1 {
    d: [f16; TILE_ROWS],
    m: [f16; TILE_ROWS],
    qs: [[u8; QK / 2]; TILE_ROWS],
}

/// A `[rows, cols]` matrix of GGML blocks `B` laid out for the tiled
/// kernels: rows in tiles `T` of [`TILE_ROWS`] (block column by block
/// column), the last `rows % 4` rows, if any, as plain row-major blocks.
#[derive(Debug, Clone)]
struct Tiled<T, B> {
    rows: usize,
    cols: usize,
    tiles: Vec<T>,
    tail: Vec<B>,
}

impl<T, B> Tiled<T, B> {
    /// Reads GGML's raw bytes (`rows * cols / 32` blocks of `block_bytes`),
    /// decoding each block with `block` and packing four rows' blocks of one
    /// column into a tile with `pack`.
    fn from_ggml(
        (rows, cols, bytes): (usize, usize, &[u8]),
        (format, block_bytes): (&str, usize),
        block: impl Fn(&[u8]) -> B,
        pack: impl Fn([B; TILE_ROWS]) -> T,
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
            .map(|(t, b)| pack(std::array::from_fn(|k| at(t * TILE_ROWS + k, b))))
            .collect();
        let tail = (full * TILE_ROWS..rows).flat_map(|r| (0..nb).map(move |b| (r, b))).map(|(r, b)| at(r, b)).collect();
        Ok(Tiled { rows, cols, tiles, tail })
    }

    fn nb(&self) -> usize {
        self.cols / QK
    }

    /// Tile `t`'s block columns (rows `4t..4t + 4`).
    fn tile(&self, t: usize) -> &[T] {
        &self.tiles[t * self.nb()..(t + 1) * self.nb()]
    }

    /// Row `rows / 4 * 4 + r`'s blocks.
    fn tail_row(&self, r: usize) -> &[B] {
        &self.tail[r * self.nb()..(r + 1) * self.nb()]
    }

    /// Block `b` of row `r`: `in_tile(tile, k)` for a tiled row (`k` its
    /// place in the tile), `in_tail(block)` for the others.
    fn block<'a, X>(
        &'a self,
        r: usize,
        b: usize,
        in_tile: impl Fn(&'a T, usize) -> X,
        in_tail: impl Fn(&'a B) -> X,
    ) -> X {
        let full = self.rows / TILE_ROWS * TILE_ROWS;
        if r < full {
            in_tile(&self.tile(r / TILE_ROWS)[b], r % TILE_ROWS)
        } else {
            in_tail(&self.tail_row(r - full)[b])
        }
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
/// widened to f32 once (from their f16 values, so the arithmetic is GGML's).
struct ActQ8_1 {
    nb: usize,
    d: Vec<f32>,
    s: Vec<f32>,
    qs: Vec<[i8; QK]>,
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
            qs: blocks.iter().map(|b| b.qs).collect(),
        }
    }

    /// Row `i`'s scales, sums and quants.
    fn row(&self, i: usize) -> (&[f32], &[f32], &[[i8; QK]]) {
        let r = i * self.nb..(i + 1) * self.nb;
        (&self.d[r.clone()], &self.s[r.clone()], &self.qs[r])
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
        let pack = |b: [BlockQ4_1; TILE_ROWS]| TileQ4_1 { d: b.map(|b| b.d), m: b.map(|b| b.m), qs: b.map(|b| b.qs) };
        Ok(Q4_1Matrix(Tiled::from_ggml((rows, cols, bytes), ("Q4_1", 20), block, pack)?))
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
        for (b, o) in out.chunks_exact_mut(QK).enumerate().take(self.0.nb()) {
            let (d, m, qs) = self.0.block(r, b, |t, k| (t.d[k], t.m[k], &t.qs[k]), |blk| (blk.d, blk.m, &blk.qs));
            let (d, m) = (d.to_f32(), m.to_f32());
            for j in 0..QK / 2 {
                o[j] = (qs[j] & 0x0F) as f32 * d + m;
                o[j + QK / 2] = (qs[j] >> 4) as f32 * d + m;
            }
        }
    }

    /// `out[i][r] = Σ_c x[i][c] * W[r][c]` for `x` of `m` rows of `cols`
    /// values; `out` has `m` rows of `self.rows()` values. Activations are
    /// quantized to `Q8_1` first, as llama.cpp does.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<(), KernelError> {
        self.matmul_with(x, m, out, Path::detect())
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
        Q4_1Matrix::matmul_many_with(ws, x, m, outs, Path::detect())
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
                move |t: usize, i: usize, sums: &mut [f32; TILE_ROWS]| dot_tile(w.0.tile(t), act.row(i), path, sums)
            })
            .collect();
        let tails: Vec<_> = ws.iter().map(|w| move |r: usize, i: usize| dot_row(w.0.tail_row(r), act.row(i))).collect();
        let parts: Vec<Part<'_>> = ws
            .iter()
            .zip(tiles.iter().zip(&tails))
            .map(|(w, (tile, tail))| Part { rows: w.rows(), tile, tail })
            .collect();
        tiled_matmul(&parts, m, outs);
        Ok(())
    }
}

/// One matrix of a [`tiled_matmul`] call: its rows, `tile(t, i, sums)` (rows
/// `4t..4t + 4` against activation row `i`) and `tail(r, i)` (row
/// `rows / 4 * 4 + r`).
struct Part<'a> {
    rows: usize,
    tile: &'a (dyn Fn(usize, usize, &mut [f32; TILE_ROWS]) + Sync),
    tail: &'a (dyn Fn(usize, usize) -> f32 + Sync),
}

/// The shared driver of the tiled kernels: `outs[p][i][r]` for `m`
/// activation rows and every part `p`, all parts in one parallel pass (one
/// hand-off to the worker threads per call, not per matrix). Each task owns a
/// run of one part's weight tiles and computes them for every activation row,
/// so each weight byte is read once per call; results are built by weight
/// row (`[rows][m]`) and transposed.
fn tiled_matmul(parts: &[Part<'_>], m: usize, outs: &mut [&mut [f32]]) {
    const TILES_PER_TASK: usize = 8;
    let mut out_ts: Vec<Vec<f32>> = parts.iter().map(|p| vec![0f32; p.rows * m]).collect();
    let mut tasks = Vec::new();
    let mut tails = Vec::new();
    for (pi, (p, out_t)) in parts.iter().zip(out_ts.iter_mut()).enumerate() {
        let (tiled, tail_out) = out_t.split_at_mut(p.rows / TILE_ROWS * TILE_ROWS * m);
        tasks.extend(tiled.chunks_mut(TILES_PER_TASK * TILE_ROWS * m).enumerate().map(|(t, c)| (pi, t, c)));
        tails.push(tail_out);
    }
    tasks.into_par_iter().for_each(|(pi, task, chunk)| {
        let mut sums = [0f32; TILE_ROWS];
        for (k, o) in chunk.chunks_exact_mut(TILE_ROWS * m).enumerate() {
            for i in 0..m {
                (parts[pi].tile)(task * TILES_PER_TASK + k, i, &mut sums);
                for (r, v) in sums.iter().enumerate() {
                    o[r * m + i] = *v;
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

/// One block column of a tile of [`TILE_ROWS`] GGML `Q8_0` rows (`d: f16,
/// qs: [i8; 32]`, value `d * q`), scales side by side.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct TileQ8_0 {
    d: [f16; TILE_ROWS],
    qs: [[i8; QK]; TILE_ROWS],
}

/// A `[rows, cols]` matrix of GGML `Q8_0` blocks, tiled as [`Q4_1Matrix`]
/// (the default model's tied LM head is `Q8_0`). Activations are quantized
/// to 8 bits per block (`Q8_0`, whose quants and scale equal `Q8_1`'s) as
/// llama.cpp does.
#[derive(Debug, Clone)]
pub struct Q8_0Matrix(Tiled<TileQ8_0, (f16, [i8; QK])>);

impl Q8_0Matrix {
    /// Reads GGML's raw bytes (`rows * cols / 32` blocks of 34 bytes).
    pub fn from_ggml_bytes(rows: usize, cols: usize, bytes: &[u8]) -> Result<Self, KernelError> {
        let block = |raw: &[u8]| (f16::from_le_bytes([raw[0], raw[1]]), std::array::from_fn(|j| raw[2 + j] as i8));
        let pack = |b: [(f16, [i8; QK]); TILE_ROWS]| TileQ8_0 { d: b.map(|b| b.0), qs: b.map(|b| b.1) };
        Ok(Q8_0Matrix(Tiled::from_ggml((rows, cols, bytes), ("Q8_0", 34), block, pack)?))
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
        for (b, o) in out.chunks_exact_mut(QK).enumerate().take(self.0.nb()) {
            let (d, qs) = self.0.block(r, b, |t, k| (t.d[k], &t.qs[k]), |(d, qs)| (*d, qs));
            for (v, q) in o.iter_mut().zip(qs) {
                *v = *q as f32 * d.to_f32();
            }
        }
    }

    /// `out[i][r] = Σ_c x[i][c] * W[r][c]`, as [`Q4_1Matrix::matmul`].
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<(), KernelError> {
        self.matmul_with(x, m, out, Path::detect())
    }

    /// [`Q8_0Matrix::matmul`] on a chosen code path (for tests and benchmarks).
    pub fn matmul_with(&self, x: &[f32], m: usize, out: &mut [f32], path: Path) -> Result<(), KernelError> {
        self.0.check_matmul(x, m, out)?;
        let act = ActQ8_1::new(x, m, self.cols(), path);
        let scalar = |d: f16, qs: &[i8; QK], xd: f32, xq: &[i8; QK]| {
            let sumi: i32 = qs.iter().zip(xq).map(|(a, b)| *a as i32 * *b as i32).sum();
            sumi as f32 * (d.to_f32() * xd)
        };
        let tile = |t: usize, i: usize, sums: &mut [f32; TILE_ROWS]| {
            let w = self.0.tile(t);
            let (xd, _, xq) = act.row(i);
            match path {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Path::Avx2*` come from `Path::detect`/`available`,
                // which checked the features at run time.
                Path::Avx2 => unsafe { avx2::dot_tile_q8_0(w, (xd, xq), sums) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above, with AVX-VNNI.
                Path::Avx2Vnni => unsafe { avx2::dot_tile_q8_0_vnni(w, (xd, xq), sums) },
                _ => {
                    for (k, o) in sums.iter_mut().enumerate() {
                        *o = w.iter().zip(xd.iter().zip(xq)).map(|(t, (d, q))| scalar(t.d[k], &t.qs[k], *d, q)).sum();
                    }
                }
            }
        };
        let tail = |r: usize, i: usize| {
            let (xd, _, xq) = act.row(i);
            self.0.tail_row(r).iter().zip(xd.iter().zip(xq)).map(|((d, qs), (xd, q))| scalar(*d, qs, *xd, q)).sum()
        };
        tiled_matmul(&[Part { rows: self.rows(), tile: &tile, tail: &tail }], m, &mut [out]);
        Ok(())
    }
}

/// Which implementation of the block dot product to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Portable scalar code (the reference).
    Scalar,
    /// AVX2 + FMA (x86-64).
    Avx2,
    /// AVX2 + FMA with the VNNI byte dot product (`vpdpbusd`, AVX-VNNI or
    /// AVX-512 VNNI/VL), which replaces a multiply-add pair.
    Avx2Vnni,
}

impl Path {
    /// The fastest path this CPU supports.
    pub fn detect() -> Path {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
            {
                if std::is_x86_feature_detected!("avxvnni") {
                    return Path::Avx2Vnni;
                }
                return Path::Avx2;
            }
        }
        Path::Scalar
    }

    /// Every path this CPU can run, the reference first (for tests).
    pub fn available() -> Vec<Path> {
        let best = Path::detect();
        [Path::Scalar, Path::Avx2, Path::Avx2Vnni].into_iter().filter(|p| *p as u8 <= best as u8).collect()
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
        // SAFETY: `Path::Avx2*` come from `Path::detect`/`available`, which
        // checked AVX2, FMA and F16C at run time.
        Path::Avx2 | Path::Avx2Vnni => unsafe { avx2::quantize_q8_1(x, out) },
        _ => quantize_q8_1(x, out),
    }
}

/// The [`TILE_ROWS`] dot products of one tile of weight rows with one
/// activation row, into `out`.
fn dot_tile(w: &[TileQ4_1], x: (&[f32], &[f32], &[[i8; QK]]), path: Path, out: &mut [f32; TILE_ROWS]) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Path::Avx2*` are only produced by `Path::detect` (and
        // `Path::available`) after checking the features at run time.
        Path::Avx2 => unsafe { avx2::dot_tile(w, x, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, with AVX-VNNI detected.
        Path::Avx2Vnni => unsafe { avx2::dot_tile_vnni(w, x, out) },
        _ => {
            for (k, o) in out.iter_mut().enumerate() {
                let mut sum = 0f32;
                for (t, ((xd, xs), xq)) in w.iter().zip(x.0.iter().zip(x.1).zip(x.2)) {
                    sum += dot_block(t.d[k], t.m[k], &t.qs[k], *xd, *xs, xq);
                }
                *o = sum;
            }
        }
    }
}

/// One row's dot product (the rows that do not fill a tile), scalar.
fn dot_row(w: &[BlockQ4_1], x: (&[f32], &[f32], &[[i8; QK]])) -> f32 {
    w.iter().zip(x.0.iter().zip(x.1).zip(x.2)).map(|(b, ((xd, xs), xq))| dot_block(b.d, b.m, &b.qs, *xd, *xs, xq)).sum()
}

/// GGML's `Q4_1 · Q8_1` block product: `d_w d_x Σ q_w q_x + m_w s_x`.
fn dot_block(d: f16, m: f16, qs: &[u8; QK / 2], xd: f32, xs: f32, xq: &[i8; QK]) -> f32 {
    let mut sumi = 0i32;
    for j in 0..QK / 2 {
        sumi += (qs[j] & 0x0F) as i32 * xq[j] as i32 + (qs[j] >> 4) as i32 * xq[j + QK / 2] as i32;
    }
    sumi as f32 * d.to_f32() * xd + m.to_f32() * xs
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BlockQ8_1, TileQ4_1, TileQ8_0, QK, TILE_ROWS};
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

    /// The sum of eight lanes, in GGML's order (`hsum_float_8`).
    #[inline(always)]
    unsafe fn hsum(x: __m256) -> f32 {
        // SAFETY: only reached from the AVX2 wrappers.
        unsafe {
            let r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
            let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
            _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)))
        }
    }

    /// `Σ u8 × i8` over groups of four bytes, into eight i32 lanes.
    #[inline(always)]
    unsafe fn dot_u8i8<const VNNI: bool>(u: __m256i, s: __m256i) -> __m256i {
        if VNNI {
            // SAFETY: only reached from `dot_tile_vnni` (AVX-VNNI checked).
            unsafe { _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s) }
        } else {
            // Pairs of u8 × i8 fit in i16 for our operands (Q4_1: 15 × 127 × 2;
            // Q8_0: 128 × 127 × 2 = 32512): no saturation.
            // SAFETY: only reached from the AVX2 wrappers.
            unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)) }
        }
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_tile(w: &[TileQ4_1], x: (&[f32], &[f32], &[[i8; QK]]), out: &mut [f32; TILE_ROWS]) {
        // SAFETY: the caller checked the features `tile::<false>` uses.
        unsafe { tile::<false>(w, x, out) }
    }

    /// # Safety
    /// The CPU must support AVX2, FMA, F16C and AVX-VNNI.
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    pub(super) unsafe fn dot_tile_vnni(w: &[TileQ4_1], x: (&[f32], &[f32], &[[i8; QK]]), out: &mut [f32; TILE_ROWS]) {
        // SAFETY: the caller checked the features `tile::<true>` uses.
        unsafe { tile::<true>(w, x, out) }
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_tile_q8_0(w: &[TileQ8_0], x: (&[f32], &[[i8; QK]]), out: &mut [f32; TILE_ROWS]) {
        // SAFETY: the caller checked the features `tile_q8_0::<false>` uses.
        unsafe { tile_q8_0::<false>(w, x, out) }
    }

    /// # Safety
    /// The CPU must support AVX2, FMA, F16C and AVX-VNNI.
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    pub(super) unsafe fn dot_tile_q8_0_vnni(w: &[TileQ8_0], x: (&[f32], &[[i8; QK]]), out: &mut [f32; TILE_ROWS]) {
        // SAFETY: the caller checked the features `tile_q8_0::<true>` uses.
        unsafe { tile_q8_0::<true>(w, x, out) }
    }

    /// `Q8_0` tiles: `i8 × i8` as `|w| × (x · sign w)`, the unsigned-by-signed
    /// product the byte dot instructions take (GGML's trick).
    #[inline(always)]
    unsafe fn tile_q8_0<const VNNI: bool>(w: &[TileQ8_0], (xd, xq): (&[f32], &[[i8; QK]]), out: &mut [f32; TILE_ROWS]) {
        // SAFETY: the wrappers enable the features these intrinsics need;
        // every load reads exactly its block (32 bytes of quants, 8 of
        // scales) and the store writes `out`'s four f32.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); TILE_ROWS];
            for (b, t) in w.iter().enumerate() {
                let y = _mm256_loadu_si256(xq[b].as_ptr() as *const __m256i);
                let mut scale = [0f32; TILE_ROWS];
                _mm_storeu_ps(
                    scale.as_mut_ptr(),
                    _mm_mul_ps(_mm_cvtph_ps(_mm_loadl_epi64(t.d.as_ptr() as *const __m128i)), _mm_set1_ps(xd[b])),
                );
                for (k, a) in acc.iter_mut().enumerate() {
                    let q = _mm256_loadu_si256(t.qs[k].as_ptr() as *const __m256i);
                    let p = _mm256_cvtepi32_ps(dot_u8i8::<VNNI>(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q)));
                    *a = _mm256_fmadd_ps(_mm256_set1_ps(scale[k]), p, *a);
                }
            }
            for k in 0..TILE_ROWS {
                out[k] = hsum(acc[k]);
            }
        }
    }

    /// The tile kernel, inlined into the wrappers above so it is compiled
    /// with their target features (and only uses VNNI when `VNNI`).
    #[inline(always)]
    unsafe fn tile<const VNNI: bool>(
        w: &[TileQ4_1],
        (xd, xs, xq): (&[f32], &[f32], &[[i8; QK]]),
        out: &mut [f32; TILE_ROWS],
    ) {
        // SAFETY: the wrappers enable the features these intrinsics need;
        // every load reads exactly its block (`xq[b]` 32 bytes, each `qs[k]`
        // 16, `d`/`m` 8) and the store writes `out`'s four f32.
        unsafe {
            let low = _mm256_set1_epi8(0x0F);
            let mut acc = [_mm256_setzero_ps(); TILE_ROWS];
            let mut acc_m = _mm_setzero_ps();
            for (b, t) in w.iter().enumerate() {
                let y = _mm256_loadu_si256(xq[b].as_ptr() as *const __m256i);
                let mut scale = [0f32; TILE_ROWS];
                _mm_storeu_ps(
                    scale.as_mut_ptr(),
                    _mm_mul_ps(_mm_cvtph_ps(_mm_loadl_epi64(t.d.as_ptr() as *const __m128i)), _mm_set1_ps(xd[b])),
                );
                for (k, a) in acc.iter_mut().enumerate() {
                    let packed = _mm_loadu_si128(t.qs[k].as_ptr() as *const __m128i);
                    let nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low);
                    let p = _mm256_cvtepi32_ps(dot_u8i8::<VNNI>(nib, y));
                    *a = _mm256_fmadd_ps(_mm256_set1_ps(scale[k]), p, *a);
                }
                // Not fused: GGML's scalar `summs += m * s`.
                let m = _mm_cvtph_ps(_mm_loadl_epi64(t.m.as_ptr() as *const __m128i));
                acc_m = _mm_add_ps(acc_m, _mm_mul_ps(m, _mm_set1_ps(xs[b])));
            }
            let mut summs = [0f32; TILE_ROWS];
            _mm_storeu_ps(summs.as_mut_ptr(), acc_m);
            for k in 0..TILE_ROWS {
                out[k] = hsum(acc[k]) + summs[k];
            }
        }
    }
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
        for (rows, cols, m) in [(40, 64, 1), (33, 576, 3), (130, 1536, 5)] {
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
                        assert!((s - f).abs() <= 1e-4 * (1.0 + s.abs()), "simd {f} vs scalar {s}");
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
        for (rows, cols, m) in [(8, 32, 1), (37, 576, 2), (130, 64, 4)] {
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
                        assert!((s - f).abs() <= 1e-5 * (1.0 + mag), "{path:?}: {f} vs scalar {s}");
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
