//! Times every variant of our CUDA kernels on one device at one model's
//! shapes (see [`crate::tune`]). Inputs are random and uploaded once per
//! variant and shape; a variant runs once from fresh inputs and its output is
//! compared with the default variant's under the storage type's tolerance
//! before it is timed. Storage types are those serving gives each kernel:
//! f32 for the attention pools and the logits, bf16 for the rest.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use half::bf16;

use super::launch::{
    cu, DenseGemvBuffers, DenseGemvNormBuffers, DeviceElem, GemvBuffers, PackedRmsNormBuffers, PagedAttentionBuffers,
    RmsNormBuffers, RopeKvBuffers, SamplingOutputs, SamplingParams,
};
use super::CudaKernels;
use crate::dtype::{from_f32_slice, to_f32_vec};
use crate::plan::{
    ArgmaxVariant, DenseGemvVariant, PagedAttentionVariant, PartitionTokens, QuantGemvVariant, RmsNormVariant,
    RopeKvVariant, SiluMulVariant, TopKVariant,
};
use crate::reference::dense::DENSE_MAX_ROWS;
use crate::reference::fused::{cos_sin_cache, RopeKvShape};
use crate::reference::ggml::{quantize_row, GemvShape, QuantFormat, MAX_ROWS};
use crate::reference::paged::{PagedAttentionShape, PagedKvShape};
use crate::reference::rng::TestRng;
use crate::reference::sampling::MAX_TOP_K;
use crate::reference::RopePairs;
use crate::tune::{seconds_per_call, Measurement, ModelShape, TuneOptions};
use crate::{DType, KernelError, KernelId};

type Outputs = Vec<Vec<f32>>;
type Stream = Arc<CudaStream>;

/// Measures every CUDA kernel's variants on `k`'s device.
pub fn measure(
    k: &CudaKernels,
    shape: &ModelShape,
    opts: &TuneOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Measurement>, KernelError> {
    let mut t =
        Timer { k, s: k.stream().clone(), rng: TestRng::new(0x6b65726e656c73), opts, out: Vec::new(), progress };
    let s = *shape;
    for &b in &opts.batches {
        t.rms_norm(b, s.hidden)?;
        t.rope_kv(b, &s)?;
        t.silu_mul(b, s.intermediate)?;
        t.argmax(b, s.vocab)?;
        t.top_k_top_p(b, s.vocab)?;
        for &ctx in &opts.contexts {
            t.paged_attention(b, ctx, &s)?;
        }
    }
    for m in rows_up_to(&opts.batches, MAX_ROWS) {
        for (label, n, kk) in [("gate_up", 2 * s.intermediate, s.hidden), ("down", s.hidden, s.intermediate)] {
            for f in [QuantFormat::Q4_1, QuantFormat::Q8_0] {
                if kk.is_multiple_of(32) {
                    t.quant_gemv(m, label, n, kk, f)?;
                }
            }
        }
    }
    for m in rows_up_to(&opts.batches, DENSE_MAX_ROWS) {
        // Every dense matrix of a decode step, the LM head where its host copy stays small.
        let attn = s.q_heads * s.head_dim;
        // (rows f32, product f32) as a step over f32 rows has them: stacks give bf16 products; the
        // down product takes the stacked gate/up product's bf16 rows with the activation fused in
        // (against the silu_mul kernel, then cuBLAS).
        let mut dense = vec![
            ("qkv", attn + 2 * s.kv_heads * s.head_dim, s.hidden, (true, false)),
            ("o", s.hidden, attn, (true, true)),
            ("gate_up", 2 * s.intermediate, s.hidden, (true, false)),
            ("silu_down", s.hidden, s.intermediate, (false, true)),
        ];
        if s.vocab * s.hidden <= 1 << 26 {
            dense.push(("lm_head", s.vocab, s.hidden, (true, true)));
        }
        // Only the products serving gives our kernels (the plan's pick weighs what serving runs): not the
        // LM head past 8 rows.
        dense.retain(|(_, n, kk, _)| GemvShape { m, n: *n, k: *kk }.suits_dense_kernel());
        for (label, n, kk, types) in dense {
            let act = label == "silu_down";
            // As a step over f32 rows runs it, and as a step in bf16 throughout (a bf16 cache's graphs).
            t.dense_gemv(m, label, (n, kk), types, act)?;
            if types != (false, false) {
                t.dense_gemv(m, label, (n, kk), (false, false), act)?;
            }
        }
        // The residual add and RMSNorm fused into the stacks after them (bf16 throughout), against the
        // packed norm, then cuBLAS.
        for (label, n) in [("norm_qkv", attn + 2 * s.kv_heads * s.head_dim), ("norm_gate_up", 2 * s.intermediate)] {
            t.dense_gemv_norm(m, label, (n, s.hidden))?;
        }
    }
    Ok(t.out)
}

/// The batches' row counts a GEMV takes, each capped at `max`, once each.
fn rows_up_to(batches: &[usize], max: usize) -> Vec<usize> {
    let mut rows: Vec<usize> = batches.iter().map(|b| (*b).min(max)).collect();
    rows.sort_unstable();
    rows.dedup();
    rows
}

struct Timer<'a> {
    k: &'a CudaKernels,
    s: Stream,
    rng: TestRng,
    opts: &'a TuneOptions,
    out: Vec<Measurement>,
    progress: &'a mut dyn FnMut(&str),
}

/// One variant's launch on buffers of its own.
trait Case {
    /// Enqueues the kernel once.
    fn run(&mut self) -> Result<(), KernelError>;
    /// Its outputs, as f32.
    fn read(&self, s: &Stream) -> Result<Outputs, KernelError>;
}

type Setup<'k, V> = dyn FnMut(V) -> Result<Box<dyn Case + 'k>, KernelError> + 'k;

fn up<T: DeviceRepr>(s: &Stream, v: &[T]) -> Result<CudaSlice<T>, KernelError> {
    s.clone_htod(v).map_err(cu)
}

fn down<T: DeviceElem>(s: &Stream, v: &CudaSlice<T>) -> Result<Vec<f32>, KernelError> {
    Ok(to_f32_vec(&s.clone_dtoh(v).map_err(cu)?))
}

/// Token ids and counts, as f32 for the comparison (exact below 2^24).
fn down_ids(s: &Stream, v: &CudaSlice<i32>) -> Result<Vec<f32>, KernelError> {
    Ok(s.clone_dtoh(v).map_err(cu)?.into_iter().map(|i| i as f32).collect())
}

fn zeros<T: DeviceRepr + ValidAsZeroBits>(s: &Stream, n: usize) -> Result<CudaSlice<T>, KernelError> {
    s.alloc_zeros::<T>(n).map_err(cu)
}

fn bf(s: &Stream, v: &[f32]) -> Result<CudaSlice<bf16>, KernelError> {
    up(s, &from_f32_slice::<bf16>(v))
}

/// `|got - want| <= tol * (1 + |want|)` everywhere, else where not.
fn agree(got: &[f32], want: &[f32], dtype: DType) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{} values, the default gave {}", got.len(), want.len()));
    }
    let tol = match dtype {
        DType::F32 => 1e-4,
        DType::Bf16 => 4.0 * DType::Bf16.epsilon(),
        DType::F16 => 8.0 * DType::F16.epsilon(),
    };
    // Written so that a NaN on either side disagrees.
    let close = |g: f32, w: f32| (g - w).abs() <= tol * (1.0 + w.abs());
    match got.iter().zip(want).position(|(g, w)| !close(*g, *w)) {
        Some(i) => Err(format!("differs from the default at [{i}]: {} vs {}", got[i], want[i])),
        None => Ok(()),
    }
}

impl<'a> Timer<'a> {
    /// `n` random values in [-1, 1): a random block of at most 1 Mi values,
    /// repeated (what a kernel costs does not depend on its values).
    fn random(&mut self, n: usize) -> Vec<f32> {
        let block = self.rng.vec(n.min(1 << 20), -1.0, 1.0);
        block.iter().copied().cycle().take(n).collect()
    }

    /// Measures `variants` of `kernel` at `case`; `setup(variant)` uploads
    /// fresh inputs.
    fn case<V: Copy + ToString>(
        &mut self,
        kernel: KernelId,
        case: String,
        batch: usize,
        dtype: DType,
        variants: &[V],
        setup: &mut Setup<'a, V>,
    ) {
        let mut want: Option<Outputs> = None;
        for &v in variants {
            let seconds = self.one(setup(v), dtype, &mut want);
            let name = v.to_string();
            match &seconds {
                Ok(s) => (self.progress)(&format!("{} {name} {case}: {:.1} µs", kernel.name(), s * 1e6)),
                Err(e) => (self.progress)(&format!("{} {name} {case}: {e}", kernel.name())),
            }
            self.out.push(Measurement { kernel, variant: name, case: case.clone(), batch, seconds });
        }
    }

    fn one(
        &self,
        c: Result<Box<dyn Case + 'a>, KernelError>,
        dtype: DType,
        want: &mut Option<Outputs>,
    ) -> Result<f64, String> {
        let mut c = c.map_err(|e| e.to_string())?;
        c.run().map_err(|e| e.to_string())?;
        let got = c.read(&self.s).map_err(|e| e.to_string())?;
        match want {
            None => *want = Some(got),
            Some(w) => {
                for (g, w) in got.iter().zip(w.iter()) {
                    agree(g, w, dtype)?;
                }
            }
        }
        let s = self.s.clone();
        seconds_per_call(self.opts.min_seconds, &mut || c.run(), &mut || s.synchronize().map_err(cu))
            .map_err(|e| e.to_string())
    }

    fn rms_norm(&mut self, rows: usize, dim: usize) -> Result<(), KernelError> {
        struct C<'k> {
            k: &'k CudaKernels,
            v: RmsNormVariant,
            x: CudaSlice<bf16>,
            w: CudaSlice<bf16>,
            r: CudaSlice<bf16>,
            o: CudaSlice<bf16>,
        }
        impl Case for C<'_> {
            fn run(&mut self) -> Result<(), KernelError> {
                let b = RmsNormBuffers { x: &self.x, residual: &mut self.r, weight: &self.w, out: &mut self.o };
                self.k.rms_norm(self.v, b, 1e-5)
            }
            fn read(&self, s: &Stream) -> Result<Outputs, KernelError> {
                Ok(vec![down(s, &self.o)?, down(s, &self.r)?])
            }
        }
        let (x, res, w) = (self.random(rows * dim), self.random(rows * dim), self.random(dim));
        let (k, s) = (self.k, self.s.clone());
        let mut setup = move |v| -> Result<Box<dyn Case + 'a>, KernelError> {
            Ok(Box::new(C { k, v, x: bf(&s, &x)?, w: bf(&s, &w)?, r: bf(&s, &res)?, o: zeros(&s, rows * dim)? }))
        };
        self.case(
            KernelId::RmsNorm,
            format!("rows{rows} dim{dim} bf16"),
            rows,
            DType::Bf16,
            RmsNormVariant::ALL,
            &mut setup,
        );
        Ok(())
    }

    fn silu_mul(&mut self, rows: usize, inter: usize) -> Result<(), KernelError> {
        struct C<'k> {
            k: &'k CudaKernels,
            v: SiluMulVariant,
            inter: usize,
            gate_up: CudaSlice<bf16>,
            o: CudaSlice<bf16>,
        }
        impl Case for C<'_> {
            fn run(&mut self) -> Result<(), KernelError> {
                self.k.silu_mul(self.v, self.gate_up.as_view(), self.inter, &mut self.o)
            }
            fn read(&self, s: &Stream) -> Result<Outputs, KernelError> {
                Ok(vec![down(s, &self.o)?])
            }
        }
        let gate_up = self.random(rows * 2 * inter);
        let (k, s) = (self.k, self.s.clone());
        let mut setup = move |v| -> Result<Box<dyn Case + 'a>, KernelError> {
            Ok(Box::new(C { k, v, inter, gate_up: bf(&s, &gate_up)?, o: zeros(&s, rows * inter)? }))
        };
        let case = format!("rows{rows} inter{inter} bf16");
        self.case(KernelId::SiluMul, case, rows, DType::Bf16, SiluMulVariant::ALL, &mut setup);
        Ok(())
    }

    fn rope_kv(&mut self, tokens: usize, m: &ModelShape) -> Result<(), KernelError> {
        struct C<'k> {
            k: &'k CudaKernels,
            v: RopeKvVariant,
            shape: RopeKvShape,
            src: CudaSlice<bf16>,
            q: CudaSlice<bf16>,
            cs: CudaSlice<f32>,
            pos: CudaSlice<i32>,
            slots: CudaSlice<i32>,
            kc: CudaSlice<bf16>,
            vc: CudaSlice<bf16>,
        }
        impl Case for C<'_> {
            fn run(&mut self) -> Result<(), KernelError> {
                let b = RopeKvBuffers {
                    src: self.src.as_view(),
                    q_out: self.q.as_view_mut(),
                    cos_sin: self.cs.as_view(),
                    positions: self.pos.as_view(),
                    slots: self.slots.as_view(),
                    k_cache: self.kc.as_view_mut(),
                    v_cache: self.vc.as_view_mut(),
                };
                self.k.rope_kv_write(self.v, &self.shape, b)
            }
            fn read(&self, s: &Stream) -> Result<Outputs, KernelError> {
                Ok(vec![down(s, &self.q)?, down(s, &self.kc)?, down(s, &self.vc)?])
            }
        }
        let d = m.head_dim;
        let cache =
            PagedKvShape { num_blocks: tokens.div_ceil(16) + 1, kv_heads: m.kv_heads, block_size: 16, head_dim: d };
        let shape = RopeKvShape { tokens, q_heads: m.q_heads, cache, max_pos: 4096, pairs: RopePairs::Interleaved };
        let inv: Vec<f32> = (0..d / 2).map(|i| 10000f32.powf(-(2.0 * i as f32) / d as f32)).collect();
        let cos_sin = cos_sin_cache(&inv, shape.max_pos);
        let (src, q) = (self.random(tokens * shape.src_width()), self.random(tokens * m.q_heads * d));
        let positions: Vec<i32> = (0..tokens).map(|t| (t % shape.max_pos) as i32).collect();
        let slots: Vec<i32> = (0..tokens as i32).collect();
        let (kc, vc) = (self.random(cache.len()), self.random(cache.len()));
        let (k, s) = (self.k, self.s.clone());
        let mut setup = move |v| -> Result<Box<dyn Case + 'a>, KernelError> {
            Ok(Box::new(C {
                k,
                v,
                shape,
                src: bf(&s, &src)?,
                q: bf(&s, &q)?,
                cs: up(&s, &cos_sin)?,
                pos: up(&s, &positions)?,
                slots: up(&s, &slots)?,
                kc: bf(&s, &kc)?,
                vc: bf(&s, &vc)?,
            }))
        };
        let case = format!("tokens{tokens} heads{}/{} d{d} bf16", m.q_heads, m.kv_heads);
        self.case(KernelId::RopeKvWrite, case, tokens, DType::Bf16, RopeKvVariant::ALL, &mut setup);
        Ok(())
    }

    fn paged_attention(&mut self, seqs: usize, ctx: usize, m: &ModelShape) -> Result<(), KernelError> {
        struct C<'k> {
            k: &'k CudaKernels,
            v: PagedAttentionVariant,
            shape: PagedAttentionShape,
            q: std::rc::Rc<CudaSlice<f32>>,
            kc: std::rc::Rc<CudaSlice<f32>>,
            vc: std::rc::Rc<CudaSlice<f32>>,
            tables: std::rc::Rc<CudaSlice<i32>>,
            lens: std::rc::Rc<CudaSlice<i32>>,
            out: CudaSlice<f32>,
            scale: f32,
        }
        impl Case for C<'_> {
            fn run(&mut self) -> Result<(), KernelError> {
                let b = PagedAttentionBuffers {
                    q: self.q.as_view(),
                    k_cache: self.kc.as_view(),
                    v_cache: self.vc.as_view(),
                    block_tables: &self.tables,
                    context_lens: &self.lens,
                    out: &mut self.out,
                };
                self.k.paged_attention(self.v, &self.shape, b, self.scale)
            }
            fn read(&self, s: &Stream) -> Result<Outputs, KernelError> {
                Ok(vec![down(s, &self.out)?])
            }
        }
        let per_seq = ctx.div_ceil(16);
        let cache =
            PagedKvShape { num_blocks: seqs * per_seq, kv_heads: m.kv_heads, block_size: 16, head_dim: m.head_dim };
        let shape = PagedAttentionShape { num_seqs: seqs, q_heads: m.q_heads, cache, max_blocks_per_seq: per_seq };
        // Every sequence at the full context, its blocks spread over the pool.
        let tables: Vec<i32> = (0..seqs * per_seq).map(|i| ((i % seqs) * per_seq + i / seqs) as i32).collect();
        let lens = vec![ctx as i32; seqs];
        // The inputs are read only: one upload serves every variant.
        let q = self.random(seqs * m.q_heads * m.head_dim);
        let (kc, vc) = (self.random(cache.len()), self.random(cache.len()));
        let s = self.s.clone();
        use std::rc::Rc;
        let shared = (
            Rc::new(up(&s, &q)?),
            Rc::new(up(&s, &kc)?),
            Rc::new(up(&s, &vc)?),
            Rc::new(up(&s, &tables)?),
            Rc::new(up(&s, &lens)?),
        );
        drop((kc, vc));
        let k = self.k;
        let scale = 1.0 / (m.head_dim as f32).sqrt();
        let out_len = q.len();
        let mut setup = move |v| -> Result<Box<dyn Case + 'a>, KernelError> {
            let (q, kc, vc, tables, lens) = shared.clone();
            Ok(Box::new(C { k, v, shape, q, kc, vc, tables, lens, out: zeros(&s, out_len)?, scale }))
        };
        let mut variants = vec![PagedAttentionVariant::Plain];
        for p in [256u32, 512, 1024] {
            if (p as usize) < ctx {
                variants.push(PagedAttentionVariant::SplitK(PartitionTokens::new(p)?));
            }
        }
        let case = format!("seqs{seqs} ctx{ctx} heads{}/{} d{} f32", m.q_heads, m.kv_heads, m.head_dim);
        self.case(KernelId::PagedAttention, case, seqs, DType::F32, &variants, &mut setup);
        Ok(())
    }

    fn quant_gemv(&mut self, rows: usize, label: &str, n: usize, kk: usize, f: QuantFormat) -> Result<(), KernelError> {
        struct C<'k> {
            k: &'k CudaKernels,
            v: QuantGemvVariant,
            f: QuantFormat,
            shape: GemvShape,
            w: std::rc::Rc<CudaSlice<u8>>,
            x: CudaSlice<bf16>,
            y: CudaSlice<bf16>,
        }
        impl Case for C<'_> {
            fn run(&mut self) -> Result<(), KernelError> {
                self.k.quant_gemv(
                    self.v,
                    self.f,
                    self.shape,
                    GemvBuffers { w: self.w.as_view(), x: self.x.as_view(), y: &mut self.y },
                )
            }
            fn read(&self, s: &Stream) -> Result<Outputs, KernelError> {
                Ok(vec![down(s, &self.y)?])
            }
        }
        let shape = GemvShape { m: rows, n, k: kk };
        let row = self.random(kk);
        let mut bytes = Vec::with_capacity(n * kk / 32 * f.block_bytes());
        for r in 0..n {
            // Distinct rows cost nothing to make: rotate one random row.
            let mut x = row.clone();
            x.rotate_left(r % kk);
            bytes.extend(quantize_row(f, &x));
        }
        let x = self.random(rows * kk);
        let s = self.s.clone();
        let w = std::rc::Rc::new(up(&s, &bytes)?);
        drop(bytes);
        let k = self.k;
        let mut setup = move |v| -> Result<Box<dyn Case + 'a>, KernelError> {
            Ok(Box::new(C { k, v, f, shape, w: w.clone(), x: bf(&s, &x)?, y: zeros(&s, rows * n)? }))
        };
        let case = format!("m{rows} {label} {n}x{kk} {} bf16", f.name());
        self.case(KernelId::QuantGemv, case, rows, DType::Bf16, QuantGemvVariant::ALL, &mut setup);
        Ok(())
    }

    /// A bf16 matrix times rows into a product, each f32 (`x32`, `y32`) or
    /// bf16, as serving runs it: our kernels in one launch; cuBLAS, the
    /// default and the output the others must agree with, with candle's
    /// conversions around it where rows or product are f32. With `act` the
    /// rows are bf16 gate/up rows (`[rows, 2 kk]`) and the activation comes
    /// first: fused into ours, the `silu_mul` kernel before cuBLAS.
    fn dense_gemv(
        &mut self,
        rows: usize,
        label: &str,
        (n, kk): (usize, usize),
        (rows32, prod32): (bool, bool),
        act: bool,
    ) -> Result<(), KernelError> {
        use std::rc::Rc;
        struct C<'k> {
            k: &'k CudaKernels,
            v: DenseGemvVariant,
            shape: GemvShape,
            w: Rc<CudaSlice<bf16>>,
            /// The rows in f32, or else in bf16 (`x16`).
            x32: Option<Rc<CudaSlice<f32>>>,
            /// The rows in bf16: cuBLAS's input (converted from `x32`, or the activation of
            /// `gate_up`, when given).
            x16: CudaSlice<bf16>,
            /// Gate/up rows whose activation is the rows.
            gate_up: Option<Rc<CudaSlice<bf16>>>,
            /// The product in bf16 (cuBLAS's output), and in f32 when asked.
            y16: CudaSlice<bf16>,
            y32: Option<CudaSlice<f32>>,
        }
        impl Case for C<'_> {
            fn run(&mut self) -> Result<(), KernelError> {
                let (k, v, sh, w) = (self.k, self.v, self.shape, self.w.as_view());
                if let Some(gu) = &self.gate_up {
                    if v.is_ours() {
                        let x = gu.as_view();
                        return match &mut self.y32 {
                            Some(y) => k.dense_gemv_silu(v, sh, DenseGemvBuffers { w, x, y }),
                            None => k.dense_gemv_silu(v, sh, DenseGemvBuffers { w, x, y: &mut self.y16 }),
                        };
                    }
                    k.silu_mul(SiluMulVariant::default(), gu.as_view(), sh.k, &mut self.x16)?;
                }
                if v.is_ours() {
                    return match (&self.x32, &mut self.y32) {
                        (Some(x), Some(y)) => k.dense_gemv(v, sh, DenseGemvBuffers { w, x: x.as_view(), y }),
                        (Some(x), None) => {
                            k.dense_gemv(v, sh, DenseGemvBuffers { w, x: x.as_view(), y: &mut self.y16 })
                        }
                        (None, Some(y)) => k.dense_gemv(v, sh, DenseGemvBuffers { w, x: self.x16.as_view(), y }),
                        (None, None) => {
                            k.dense_gemv(v, sh, DenseGemvBuffers { w, x: self.x16.as_view(), y: &mut self.y16 })
                        }
                    };
                }
                if let Some(x) = &self.x32 {
                    k.convert(x.as_view(), &mut self.x16)?;
                }
                k.dense_gemv(v, sh, DenseGemvBuffers { w, x: self.x16.as_view(), y: &mut self.y16 })?;
                match &mut self.y32 {
                    Some(y) => k.convert(self.y16.as_view(), y),
                    None => Ok(()),
                }
            }
            fn read(&self, s: &Stream) -> Result<Outputs, KernelError> {
                Ok(vec![match &self.y32 {
                    Some(y) => down(s, y)?,
                    None => down(s, &self.y16)?,
                }])
            }
        }
        let shape = GemvShape { m: rows, n, k: kk };
        let s = self.s.clone();
        let w = self.random(n * kk);
        let w = Rc::new(bf(&s, &w)?);
        // Values bf16 holds exactly: cuBLAS's arm rounds f32 rows to bf16 first (as serving runs it) and ours
        // reads them as they are, so any other values would set the rounding of the inputs (about sqrt(k) *
        // 2^-9, past the tolerance at outputs near zero) against our kernels, not their sums.
        let x: Vec<f32> = self.random(rows * kk).into_iter().map(|v| bf16::from_f32(v).to_f32()).collect();
        let x16 = bf(&s, &x)?;
        let x32 = if rows32 { Some(Rc::new(up(&s, &x)?)) } else { None };
        // Gate/up values in [-4, 4), where the activation is neither flat nor linear.
        let gate_up = if act { Some(Rc::new(bf(&s, &self.rng.vec(rows * 2 * kk, -4.0, 4.0))?)) } else { None };
        let k = self.k;
        let mut setup = move |v| -> Result<Box<dyn Case + 'a>, KernelError> {
            Ok(Box::new(C {
                k,
                v,
                shape,
                w: w.clone(),
                x32: x32.clone(),
                x16: s.clone_dtod(&x16).map_err(cu)?,
                gate_up: gate_up.clone(),
                y16: zeros(&s, rows * n)?,
                y32: if prod32 { Some(zeros(&s, rows * n)?) } else { None },
            }))
        };
        let ty = |f32: bool| if f32 { "f32" } else { "bf16" };
        let case = format!("m{rows} {label} {n}x{kk} bf16 {}→{}", ty(rows32), ty(prod32));
        self.case(KernelId::DenseGemv, case, rows, DType::Bf16, DenseGemvVariant::ALL, &mut setup);
        Ok(())
    }

    fn dense_gemv_norm(&mut self, rows: usize, label: &str, (n, kk): (usize, usize)) -> Result<(), KernelError> {
        use std::rc::Rc;
        struct C<'k> {
            k: &'k CudaKernels,
            v: DenseGemvVariant,
            shape: GemvShape,
            w: Rc<CudaSlice<bf16>>,
            x: Rc<CudaSlice<bf16>>,
            d: Rc<CudaSlice<bf16>>,
            g: Rc<CudaSlice<bf16>>,
            /// Ours: `[sums, product]`; cuBLAS's: the packed norm's `[sums, normed rows]`, then `y`.
            out: CudaSlice<bf16>,
            y: CudaSlice<bf16>,
        }
        impl Case for C<'_> {
            fn run(&mut self) -> Result<(), KernelError> {
                let (k, v, sh) = (self.k, self.v, self.shape);
                let mk = sh.m * sh.k;
                if v.is_ours() {
                    let (sum, y) = self.out.split_at_mut(mk);
                    let (w, x, d, g) = (self.w.as_view(), self.x.as_view(), self.d.as_view(), self.g.as_view());
                    return k.dense_gemv_norm(v, sh, DenseGemvNormBuffers { w, x, d, g, y, sum }, 1e-5);
                }
                let b = PackedRmsNormBuffers {
                    x: self.d.as_view(),
                    residual: self.x.as_view(),
                    weight: self.g.as_view(),
                    out: &mut self.out,
                };
                k.add_rms_norm_packed(RmsNormVariant::default(), b, 1e-5)?;
                let (w, x) = (self.w.as_view(), self.out.slice(mk..));
                k.dense_gemv(v, sh, DenseGemvBuffers { w, x, y: &mut self.y })
            }
            fn read(&self, s: &Stream) -> Result<Outputs, KernelError> {
                let mk = self.shape.m * self.shape.k;
                let all = down(s, &self.out)?;
                let y = if self.v.is_ours() { all[mk..].to_vec() } else { down(s, &self.y)? };
                Ok(vec![all[..mk].to_vec(), y])
            }
        }
        let shape = GemvShape { m: rows, n, k: kk };
        let s = self.s.clone();
        let w = Rc::new(bf(&s, &self.random(n * kk))?);
        let (x, d) = (Rc::new(bf(&s, &self.random(rows * kk))?), Rc::new(bf(&s, &self.random(rows * kk))?));
        let g = Rc::new(bf(&s, &self.rng.vec(kk, 0.5, 1.5))?);
        let k = self.k;
        let mut setup = move |v: DenseGemvVariant| -> Result<Box<dyn Case + 'a>, KernelError> {
            // Ours writes sums and product into one buffer; the packed norm sums and normed rows.
            let out = if v.is_ours() { rows * (kk + n) } else { 2 * rows * kk };
            Ok(Box::new(C {
                k,
                v,
                shape,
                w: w.clone(),
                x: x.clone(),
                d: d.clone(),
                g: g.clone(),
                out: zeros(&s, out)?,
                y: zeros(&s, rows * n)?,
            }))
        };
        let case = format!("m{rows} {label} {n}x{kk} bf16 (add + RMSNorm fused)");
        self.case(KernelId::DenseGemv, case, rows, DType::Bf16, DenseGemvVariant::ALL, &mut setup);
        Ok(())
    }

    fn argmax(&mut self, rows: usize, vocab: usize) -> Result<(), KernelError> {
        struct C<'k> {
            k: &'k CudaKernels,
            v: ArgmaxVariant,
            vocab: usize,
            logits: std::rc::Rc<CudaSlice<f32>>,
            tokens: CudaSlice<i32>,
        }
        impl Case for C<'_> {
            fn run(&mut self) -> Result<(), KernelError> {
                self.k.argmax(self.v, &self.logits, self.vocab, &mut self.tokens)
            }
            fn read(&self, s: &Stream) -> Result<Outputs, KernelError> {
                Ok(vec![down_ids(s, &self.tokens)?])
            }
        }
        // Distinct values per row: no ties, so every variant must agree exactly.
        let logits: Vec<f32> = self.rng.vec(rows * vocab, -8.0, 8.0);
        let s = self.s.clone();
        let l = std::rc::Rc::new(up(&s, &logits)?);
        let k = self.k;
        let mut setup = move |v| -> Result<Box<dyn Case + 'a>, KernelError> {
            Ok(Box::new(C { k, v, vocab, logits: l.clone(), tokens: zeros(&s, rows)? }))
        };
        self.case(
            KernelId::Argmax,
            format!("rows{rows} vocab{vocab} f32"),
            rows,
            DType::F32,
            ArgmaxVariant::ALL,
            &mut setup,
        );
        Ok(())
    }

    fn top_k_top_p(&mut self, rows: usize, vocab: usize) -> Result<(), KernelError> {
        struct C<'k> {
            k: &'k CudaKernels,
            v: TopKVariant,
            vocab: usize,
            logits: std::rc::Rc<CudaSlice<f32>>,
            params: std::rc::Rc<[CudaSlice<i32>; 1]>,
            fparams: std::rc::Rc<[CudaSlice<f32>; 3]>,
            ids: CudaSlice<i32>,
            probs: CudaSlice<f32>,
            count: CudaSlice<i32>,
            token: CudaSlice<i32>,
        }
        impl Case for C<'_> {
            fn run(&mut self) -> Result<(), KernelError> {
                let [tk] = &*self.params;
                let [tp, it, u] = &*self.fparams;
                let params = SamplingParams { top_k: tk, top_p: tp, inv_temp: it, uniform: u };
                let out = SamplingOutputs {
                    ids: &mut self.ids,
                    probs: &mut self.probs,
                    count: &mut self.count,
                    token: &mut self.token,
                };
                self.k.top_k_top_p(self.v, &self.logits, self.vocab, params, out)
            }
            fn read(&self, s: &Stream) -> Result<Outputs, KernelError> {
                Ok(vec![down_ids(s, &self.count)?, down_ids(s, &self.token)?])
            }
        }
        let logits: Vec<f32> = self.rng.vec(rows * vocab, -8.0, 8.0);
        let uniform: Vec<f32> = (0..rows).map(|_| self.rng.uniform(0.05, 0.95)).collect();
        let s = self.s.clone();
        let l = std::rc::Rc::new(up(&s, &logits)?);
        let params = std::rc::Rc::new([up(&s, &vec![40i32; rows])?]);
        let fparams =
            std::rc::Rc::new([up(&s, &vec![0.95f32; rows])?, up(&s, &vec![1.25f32; rows])?, up(&s, &uniform)?]);
        let k = self.k;
        let mut setup = move |v| -> Result<Box<dyn Case + 'a>, KernelError> {
            Ok(Box::new(C {
                k,
                v,
                vocab,
                logits: l.clone(),
                params: params.clone(),
                fparams: fparams.clone(),
                ids: zeros(&s, rows * MAX_TOP_K)?,
                probs: zeros(&s, rows * MAX_TOP_K)?,
                count: zeros(&s, rows)?,
                token: zeros(&s, rows)?,
            }))
        };
        let case = format!("rows{rows} vocab{vocab} top_k40 top_p0.95 f32");
        self.case(KernelId::TopKTopP, case, rows, DType::F32, TopKVariant::ALL, &mut setup);
        Ok(())
    }
}
