//! Kernel variants and the per-SKU [`KernelPlan`] that picks one per kernel.
//!
//! Each CUDA kernel ships in at least two variants with identical semantics
//! (same output up to float reassociation); which is fastest depends on the
//! GPU and the shape, so a per-SKU catalog stores a plan and the benchmarks
//! name runs `{sku}/{kernel}/{variant}/{shape}`. The stable string form is
//! `kernel=variant` pairs joined by `;` (e.g.
//! `rms_norm=warp_per_row;paged_attention=split_k:512`); keys may come in any
//! order and a missing key means that kernel's default. One key,
//! `quant_matmul`, is the CPU's: which SIMD path runs the quantized matmuls
//! (`auto`, the widest this CPU has, unless a benchmark found another faster). This crate has no
//! serde dependency: the catalog stores the string and parses it with
//! [`FromStr`].

use std::fmt;
use std::str::FromStr;

use crate::quant::Path;
use crate::{KernelError, KernelId};

/// Declares a closed variant enum with stable names, `ALL`, `name()` and `FromStr`.
macro_rules! variant_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $v:ident => $s:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub enum $name {
            $($(#[$vdoc])* $v),+
        }
        impl $name {
            /// Every variant, the default first.
            pub const ALL: &'static [$name] = &[$($name::$v),+];
            /// The variant's stable name.
            pub fn name(self) -> &'static str {
                match self { $($name::$v => $s),+ }
            }
        }
        impl FromStr for $name {
            type Err = KernelError;
            fn from_str(s: &str) -> Result<Self, KernelError> {
                match s {
                    $($s => Ok($name::$v),)+
                    _ => Err(KernelError::Plan(format!(concat!("unknown ", stringify!($name), " `{}`"), s))),
                }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

variant_enum!(
    /// Fused residual add + RMSNorm.
    RmsNormVariant {
        /// One warp per row, four rows per block: small dims, many rows.
        #[default]
        WarpPerRow => "warp_per_row",
        /// One 256-thread block per row: large dims.
        BlockPerRow => "block_per_row",
    }
);

variant_enum!(
    /// RoPE fused with the paged KV-cache write.
    RopeKvVariant {
        /// One warp per (token, head).
        #[default]
        WarpPerHead => "warp_per_head",
        /// One 128-thread block per token, looping over all heads.
        BlockPerToken => "block_per_token",
    }
);

variant_enum!(
    /// SiLU of the gate times the up projection.
    SiluMulVariant {
        /// One thread per output element, over the whole batch.
        #[default]
        ElementPerThread => "element_per_thread",
        /// One 256-thread block per row, striding over it.
        BlockPerRow => "block_per_row",
    }
);

variant_enum!(
    /// Weight-only quantized GEMV for 1-8 rows.
    QuantGemvVariant {
        /// One warp per output row, activations read through the cache.
        #[default]
        WarpPerRow => "warp_per_row",
        /// Eight output rows per block, activations staged in shared memory.
        MultiRowSmem => "multi_row_smem",
    }
);

variant_enum!(
    /// Dense GEMV for 1-32 rows (a bf16 matrix on a GPU times a decode
    /// step's rows): cuBLAS, as candle calls it, or our kernel.
    DenseGemvVariant {
        /// candle's matmul (cuBLAS on a GPU), with the activations converted
        /// to the matrix's type and the product back around it.
        #[default]
        Cublas => "cublas",
        /// Our kernel: one warp per output row, one 16-byte chunk per lane at a
        /// time, activations and output in f32 or the matrix's type (no
        /// conversions around it).
        WarpPerRow => "warp_per_row",
        /// The same with four chunks per lane in flight: long rows.
        WarpPerRowX4 => "warp_per_row_x4",
    }
);

impl DenseGemvVariant {
    /// Whether this is one of our kernels (not cuBLAS).
    pub fn is_ours(self) -> bool {
        self != DenseGemvVariant::Cublas
    }
}

variant_enum!(
    /// Greedy argmax over the vocabulary.
    ArgmaxVariant {
        /// One 512-thread block per row.
        #[default]
        BlockPerRow => "block_per_row",
        /// Chunks of 4096 logits in parallel, then a per-row reduce: few rows, big vocabularies.
        SplitRow => "split_row",
    }
);

variant_enum!(
    /// Top-k / top-p filtering and sampling.
    TopKVariant {
        /// 256 threads per row.
        #[default]
        Threads256 => "threads_256",
        /// 1024 threads per row.
        Threads1024 => "threads_1024",
    }
);

variant_enum!(
    /// The CPU's quantized matmul (`Q4_1`/`Q8_0` weights × `Q8_1` activations):
    /// which SIMD path of [`crate::quant`] runs it. Every path gives the same bits.
    CpuMatmulVariant {
        /// The widest path this CPU supports ([`Path::detect`]).
        #[default]
        Auto => "auto",
        /// [`Path::Scalar`].
        Scalar => "scalar",
        /// [`Path::Avx2`].
        Avx2 => "avx2",
        /// [`Path::Avx2Vnni`].
        Avx2Vnni => "avx2_vnni",
        /// [`Path::Avx512Vnni`].
        Avx512Vnni => "avx512_vnni",
    }
);

impl CpuMatmulVariant {
    /// The path this variant names, `None` for [`CpuMatmulVariant::Auto`].
    pub fn path(self) -> Option<Path> {
        Some(match self {
            CpuMatmulVariant::Auto => return None,
            CpuMatmulVariant::Scalar => Path::Scalar,
            CpuMatmulVariant::Avx2 => Path::Avx2,
            CpuMatmulVariant::Avx2Vnni => Path::Avx2Vnni,
            CpuMatmulVariant::Avx512Vnni => Path::Avx512Vnni,
        })
    }

    /// The variant naming `path`.
    pub fn of(path: Path) -> Self {
        match path {
            Path::Scalar => CpuMatmulVariant::Scalar,
            Path::Avx2 => CpuMatmulVariant::Avx2,
            Path::Avx2Vnni => CpuMatmulVariant::Avx2Vnni,
            Path::Avx512Vnni => CpuMatmulVariant::Avx512Vnni,
        }
    }
}

variant_enum!(
    /// Which code runs decode attention in a model: not one kernel's variant
    /// but whether our `paged_attention` kernel (in its plan variant) runs at
    /// all. `arqon bench kernels` decides it on whole decode steps.
    AttentionVariant {
        /// The device's default path: candle's matmul attention on a GPU, the
        /// in-place decode kernel on the CPU.
        #[default]
        Native => "native",
        /// Our paged-attention op (its CPU reference on the CPU).
        Paged => "paged",
    }
);

variant_enum!(
    /// Who multiplies a GGUF model's quantized matrices (`Q8_0`, `Q4_0`,
    /// `Q4_1`) by a step's rows on a GPU: not one kernel's variant but
    /// whether our `quant_gemv` kernel (in its plan variant) serves at all,
    /// for products of 1 to 8 rows. With it, decode steps of up to 8 rows
    /// launch none of candle's quantized kernels, whose scratch buffer keeps
    /// them from being captured as CUDA graphs. Larger products, and every
    /// other format, stay on candle's kernels.
    QuantizedVariant {
        /// candle's kernels (llama.cpp's MMVQ and MMQ) for every product.
        #[default]
        Candle => "candle",
        /// Our `quant_gemv` for 1 to 8 rows (its CPU reference on the CPU).
        Ours => "ours",
    }
);

variant_enum!(
    /// Where a step's greedy and top-k rows are picked on a GPU: not one
    /// kernel's variant but whether our `argmax` and `top_k_top_p` kernels
    /// (in their plan variants) run in serving at all, so that only ids and
    /// candidates cross to the host. `arqon bench kernels` chooses `device`
    /// where both kernels agreed with their references. The CPU always picks
    /// them where its logits are (the host).
    SamplingVariant {
        /// Every row's logits cross to the host, which samples.
        #[default]
        Host => "host",
        /// Our sampling kernels pick greedy ids and top-k candidates.
        Device => "device",
    }
);

variant_enum!(
    /// How a model's decode steps run: not one kernel's variant but whether
    /// qualifying steps (one token per sequence, no adapter, full depth,
    /// paged attention) run on fixed buffers and, on a GPU, as CUDA graphs
    /// captured per batch bucket and replayed. `arqon bench kernels` chooses
    /// `graph` where replayed steps agreed with eager ones and were faster.
    DecodeVariant {
        /// Every step launches its kernels one by one.
        #[default]
        Eager => "eager",
        /// Fixed-buffer steps, replayed as CUDA graphs on a GPU (run
        /// eagerly on the CPU, where there is nothing to capture).
        Graph => "graph",
    }
);

/// Tokens per split-K partition of decode attention: a power of two in
/// `[Self::MIN, Self::MAX]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PartitionTokens(u32);

impl PartitionTokens {
    /// Smallest partition (one partition is at least one block of one warp's work).
    pub const MIN: u32 = 64;
    /// Largest partition.
    pub const MAX: u32 = 8192;

    /// Checks the bounds.
    pub fn new(tokens: u32) -> Result<Self, KernelError> {
        if (Self::MIN..=Self::MAX).contains(&tokens) && tokens.is_power_of_two() {
            Ok(PartitionTokens(tokens))
        } else {
            Err(KernelError::Plan(format!(
                "partition of {tokens} tokens: want a power of two in [{}, {}]",
                Self::MIN,
                Self::MAX
            )))
        }
    }

    /// The partition size in tokens.
    pub fn get(self) -> u32 {
        self.0
    }
}

/// Decode attention over the paged KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PagedAttentionVariant {
    /// One block per (sequence, head) over the whole context.
    #[default]
    Plain,
    /// Flash-decoding: partitions of the context in parallel, then a reduce.
    SplitK(PartitionTokens),
}

impl fmt::Display for PagedAttentionVariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PagedAttentionVariant::Plain => f.write_str("plain"),
            PagedAttentionVariant::SplitK(p) => write!(f, "split_k:{}", p.get()),
        }
    }
}

impl FromStr for PagedAttentionVariant {
    type Err = KernelError;
    fn from_str(s: &str) -> Result<Self, KernelError> {
        if s == "plain" {
            return Ok(PagedAttentionVariant::Plain);
        }
        let tokens = s
            .strip_prefix("split_k:")
            .and_then(|n| n.parse::<u32>().ok())
            .ok_or_else(|| KernelError::Plan(format!("unknown PagedAttentionVariant `{s}`")))?;
        Ok(PagedAttentionVariant::SplitK(PartitionTokens::new(tokens)?))
    }
}

/// The chosen variant of every kernel that has several, as a per-SKU catalog
/// stores it: the CUDA kernels', and the CPU's quantized matmul path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct KernelPlan {
    /// [`KernelId::RmsNorm`].
    pub rms_norm: RmsNormVariant,
    /// [`KernelId::RopeKvWrite`].
    pub rope_kv_write: RopeKvVariant,
    /// [`KernelId::SiluMul`].
    pub silu_mul: SiluMulVariant,
    /// [`KernelId::PagedAttention`].
    pub paged_attention: PagedAttentionVariant,
    /// [`KernelId::QuantGemv`].
    pub quant_gemv: QuantGemvVariant,
    /// [`KernelId::DenseGemv`].
    pub dense_gemv: DenseGemvVariant,
    /// [`KernelId::Argmax`].
    pub argmax: ArgmaxVariant,
    /// [`KernelId::TopKTopP`].
    pub top_k_top_p: TopKVariant,
    /// [`KernelId::QuantMatmul`] (the CPU's).
    pub quant_matmul: CpuMatmulVariant,
    /// Decode attention in the model (key `attention`, after the kernels).
    pub attention: AttentionVariant,
    /// A GGUF model's quantized products on a GPU (key `quantized`).
    pub quantized: QuantizedVariant,
    /// Sampling on a GPU (key `sampling`).
    pub sampling: SamplingVariant,
    /// Decode steps as graphs (key `decode`, last).
    pub decode: DecodeVariant,
}

impl KernelPlan {
    /// The kernels a plan covers (those with variants), in string order.
    pub const KERNELS: [KernelId; 9] = [
        KernelId::RmsNorm,
        KernelId::RopeKvWrite,
        KernelId::SiluMul,
        KernelId::PagedAttention,
        KernelId::QuantGemv,
        KernelId::DenseGemv,
        KernelId::Argmax,
        KernelId::TopKTopP,
        KernelId::QuantMatmul,
    ];

    /// The kernels of [`Self::KERNELS`] that run on a CUDA device.
    pub fn is_cuda(kernel: KernelId) -> bool {
        kernel != KernelId::QuantMatmul && Self::KERNELS.contains(&kernel)
    }

    /// Sets `kernel`'s variant from its stable name.
    pub fn set(&mut self, kernel: KernelId, variant: &str) -> Result<(), KernelError> {
        let v = variant.trim();
        match kernel {
            KernelId::RmsNorm => self.rms_norm = v.parse()?,
            KernelId::RopeKvWrite => self.rope_kv_write = v.parse()?,
            KernelId::SiluMul => self.silu_mul = v.parse()?,
            KernelId::PagedAttention => self.paged_attention = v.parse()?,
            KernelId::QuantGemv => self.quant_gemv = v.parse()?,
            KernelId::DenseGemv => self.dense_gemv = v.parse()?,
            KernelId::Argmax => self.argmax = v.parse()?,
            KernelId::TopKTopP => self.top_k_top_p = v.parse()?,
            KernelId::QuantMatmul => self.quant_matmul = v.parse()?,
            KernelId::Rope | KernelId::Softmax => {
                return Err(KernelError::Plan(format!("no kernel plan for `{}`", kernel.name())))
            }
        }
        Ok(())
    }

    /// The chosen variant's name for `kernel` (for benchmark ids), or `None`
    /// for a kernel with no GPU variants.
    pub fn variant_name(&self, kernel: KernelId) -> Option<String> {
        Some(match kernel {
            KernelId::RmsNorm => self.rms_norm.to_string(),
            KernelId::RopeKvWrite => self.rope_kv_write.to_string(),
            KernelId::SiluMul => self.silu_mul.to_string(),
            KernelId::PagedAttention => self.paged_attention.to_string(),
            KernelId::QuantGemv => self.quant_gemv.to_string(),
            KernelId::DenseGemv => self.dense_gemv.to_string(),
            KernelId::Argmax => self.argmax.to_string(),
            KernelId::TopKTopP => self.top_k_top_p.to_string(),
            KernelId::QuantMatmul => self.quant_matmul.to_string(),
            KernelId::Rope | KernelId::Softmax => return None,
        })
    }
}

impl KernelPlan {
    /// The key of [`KernelPlan::attention`], a key that is not a kernel's.
    pub const ATTENTION: &'static str = "attention";
    /// The key of [`KernelPlan::quantized`], another.
    pub const QUANTIZED: &'static str = "quantized";
    /// The key of [`KernelPlan::sampling`], another.
    pub const SAMPLING: &'static str = "sampling";
    /// The key of [`KernelPlan::decode`], the last.
    pub const DECODE: &'static str = "decode";
    /// The keys that are not kernels', in string order.
    pub const KEYS: [&'static str; 4] = [Self::ATTENTION, Self::QUANTIZED, Self::SAMPLING, Self::DECODE];
}

impl fmt::Display for KernelPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, k) in Self::KERNELS.iter().enumerate() {
            let sep = if i == 0 { "" } else { ";" };
            let v = self.variant_name(*k).expect("plan kernels have variants");
            write!(f, "{sep}{}={v}", k.name())?;
        }
        write!(
            f,
            ";{}={};{}={};{}={};{}={}",
            Self::ATTENTION,
            self.attention,
            Self::QUANTIZED,
            self.quantized,
            Self::SAMPLING,
            self.sampling,
            Self::DECODE,
            self.decode
        )
    }
}

impl FromStr for KernelPlan {
    type Err = KernelError;
    fn from_str(s: &str) -> Result<Self, KernelError> {
        let mut plan = KernelPlan::default();
        let mut seen = Vec::new();
        let mut seen_keys: Vec<&str> = Vec::new();
        for pair in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) =
                pair.split_once('=').ok_or_else(|| KernelError::Plan(format!("`{pair}` is not kernel=variant")))?;
            let key = key.trim();
            if Self::KEYS.contains(&key) {
                if seen_keys.contains(&key) {
                    return Err(KernelError::Plan(format!("`{key}` given twice")));
                }
                seen_keys.push(key);
                match key {
                    Self::ATTENTION => plan.attention = value.trim().parse()?,
                    Self::QUANTIZED => plan.quantized = value.trim().parse()?,
                    Self::SAMPLING => plan.sampling = value.trim().parse()?,
                    _ => plan.decode = value.trim().parse()?,
                }
                continue;
            }
            let kernel = Self::KERNELS
                .into_iter()
                .find(|k| k.name() == key.trim())
                .ok_or_else(|| KernelError::Plan(format!("no kernel plan for `{key}`")))?;
            if seen.contains(&kernel) {
                return Err(KernelError::Plan(format!("`{key}` given twice")));
            }
            seen.push(kernel);
            plan.set(kernel, value)?;
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_plan_round_trips_and_names_every_kernel() {
        let plan = KernelPlan::default();
        let s = plan.to_string();
        assert_eq!(
            s,
            "rms_norm=warp_per_row;rope_kv_write=warp_per_head;silu_mul=element_per_thread;paged_attention=plain;\
             quant_gemv=warp_per_row;dense_gemv=cublas;argmax=block_per_row;top_k_top_p=threads_256;quant_matmul=auto;\
             attention=native;quantized=candle;sampling=host;decode=eager"
        );
        assert_eq!(s.parse::<KernelPlan>().unwrap(), plan);
    }

    #[test]
    fn every_variant_round_trips() {
        let mut plan = KernelPlan {
            rms_norm: RmsNormVariant::BlockPerRow,
            rope_kv_write: RopeKvVariant::BlockPerToken,
            silu_mul: SiluMulVariant::BlockPerRow,
            paged_attention: PagedAttentionVariant::SplitK(PartitionTokens::new(512).unwrap()),
            quant_gemv: QuantGemvVariant::MultiRowSmem,
            dense_gemv: DenseGemvVariant::WarpPerRowX4,
            argmax: ArgmaxVariant::SplitRow,
            top_k_top_p: TopKVariant::Threads1024,
            quant_matmul: CpuMatmulVariant::Avx2Vnni,
            attention: AttentionVariant::Paged,
            quantized: QuantizedVariant::Ours,
            sampling: SamplingVariant::Device,
            decode: DecodeVariant::Graph,
        };
        assert_eq!(plan.to_string().parse::<KernelPlan>().unwrap(), plan);
        plan.paged_attention = PagedAttentionVariant::Plain;
        for v in RmsNormVariant::ALL {
            plan.rms_norm = *v;
            assert_eq!(plan.to_string().parse::<KernelPlan>().unwrap(), plan);
        }
        for v in DenseGemvVariant::ALL {
            plan.dense_gemv = *v;
            assert_eq!(plan.to_string().parse::<KernelPlan>().unwrap(), plan);
        }
        for v in CpuMatmulVariant::ALL {
            plan.quant_matmul = *v;
            assert_eq!(plan.to_string().parse::<KernelPlan>().unwrap(), plan);
            assert_eq!(v.path().map(CpuMatmulVariant::of).unwrap_or_default(), *v);
        }
    }

    #[test]
    fn partial_and_reordered_plans_fill_in_defaults() {
        let plan: KernelPlan =
            " argmax=split_row ; attention=paged; sampling = device; rms_norm=block_per_row ;decode=graph;quantized=ours"
                .parse()
                .unwrap();
        assert_eq!(plan.attention, AttentionVariant::Paged);
        assert_eq!(plan.decode, DecodeVariant::Graph);
        assert_eq!(plan.sampling, SamplingVariant::Device);
        assert_eq!(plan.quantized, QuantizedVariant::Ours);
        assert_eq!(plan.argmax, ArgmaxVariant::SplitRow);
        assert_eq!(plan.rms_norm, RmsNormVariant::BlockPerRow);
        assert_eq!(plan.quant_gemv, QuantGemvVariant::default());
        assert_eq!("".parse::<KernelPlan>().unwrap(), KernelPlan::default());
    }

    #[test]
    fn bad_plans_are_typed_errors() {
        for bad in [
            "rms_norm=fast",
            "softmax=plain",
            "rms_norm",
            "rms_norm=warp_per_row;rms_norm=block_per_row",
            "paged_attention=split_k:100",
            "paged_attention=split_k:32",
            "paged_attention=split_k:",
            "quant_matmul=avx1024",
            "dense_gemv=warp",
            "dense_gemv=cublas;dense_gemv=warp_per_row",
            "attention=flash",
            "attention=paged;attention=native",
            "sampling=gpu",
            "sampling=host;sampling=device",
            "decode=graphs",
            "decode=graph;decode=eager",
            "quantized=mine",
            "quantized=ours;quantized=candle",
        ] {
            assert!(matches!(bad.parse::<KernelPlan>(), Err(KernelError::Plan(_))), "{bad}");
        }
    }

    #[test]
    fn partition_tokens_bounds() {
        assert!(PartitionTokens::new(64).is_ok());
        assert!(PartitionTokens::new(8192).is_ok());
        assert!(PartitionTokens::new(16384).is_err());
        assert!(PartitionTokens::new(0).is_err());
        assert!(PartitionTokens::new(96).is_err());
    }
}
