//! `arqon serve`'s flags (each also read from an `ARQON_*` variable through
//! clap's `env`) and the one validated [`ServeConfig`] built from them.
//!
//! Parse, don't validate: [`ServeArgs::into_config`] range-checks every knob
//! once; the rest of the server only ever sees typed, bounded values.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use super::tuning::{TuningArgs, TuningConfig};
use crate::config::{DeviceArgs, DeviceChoice};
use crate::error::{Error, Result};
use crate::fetch;

/// Flags of `arqon serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// A GGUF file, a Hugging Face folder, or a known name.
    #[arg(long, env = "ARQON_MODEL", default_value = fetch::DEFAULT_MODEL)]
    pub model: String,
    /// Where models are cached (`$ARQON_HOME/models`); default ~/.cache/arqon.
    #[arg(long, env = "ARQON_HOME")]
    pub home: Option<PathBuf>,
    /// `--device`: where the model runs.
    #[command(flatten)]
    pub device: DeviceArgs,
    /// The model id clients send and `/v1/models` lists (default: `--model` as given).
    #[arg(long, env = "ARQON_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Address to listen on.
    #[arg(long, env = "ARQON_HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on; 0 picks a free one (the bound address is printed on stderr).
    #[arg(long, env = "ARQON_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1 routes.
    #[arg(long, env = "ARQON_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Most sequences decoded together in one step (the running batch).
    #[arg(long, env = "ARQON_MAX_BATCH", default_value_t = 32)]
    pub max_batch: u32,
    /// Most requests waiting for a place in the batch; beyond it, 429.
    #[arg(long, env = "ARQON_MAX_QUEUE", default_value_t = 256)]
    pub max_queue: u32,
    /// Cap on prompt plus generated tokens (default: the model's context length).
    #[arg(long, env = "ARQON_MAX_CONTEXT")]
    pub max_context: Option<u32>,
    /// Tokens one engine step may run (decode tokens first, prefill chunks in the rest).
    #[arg(long, env = "ARQON_STEP_TOKENS", default_value_t = 512)]
    pub step_tokens: u32,
    /// Size of the paged KV cache in MiB (default: --kv-cache-memory-fraction
    /// of the free memory); when the running sequences outgrow it, the
    /// latest admitted is preempted and computed again later.
    #[arg(long, env = "ARQON_KV_CACHE_MB")]
    pub kv_cache_mb: Option<u64>,
    /// Share of the memory free after loading the model that the paged KV
    /// cache takes, when --kv-cache-mb is not given (default 0.8 on a GPU,
    /// 0.2 on the CPU); never more than --max-batch full contexts.
    #[arg(long, env = "ARQON_KV_CACHE_MEMORY_FRACTION")]
    pub kv_cache_memory_fraction: Option<f64>,
    /// What the KV cache holds (vLLM's --kv-cache-dtype): `auto` is the
    /// model's dense dtype on a GPU (bf16 for a bf16 variant: half the
    /// memory of f32, so twice the tokens) and f32 on the CPU; `bf16` and
    /// `f16` need tensor pools (a GPU, or `--kernel-plan attention=paged`).
    #[arg(long, env = "ARQON_KV_CACHE_DTYPE", value_enum, default_value_t = KvCacheDtype::Auto)]
    pub kv_cache_dtype: KvCacheDtype,
    /// Reuse the KV blocks of prompt prefixes already computed (system
    /// prompts, conversation history), as vLLM's automatic prefix caching.
    #[arg(long, env = "ARQON_ENABLE_PREFIX_CACHING")]
    pub enable_prefix_caching: bool,
    /// Which variant of each kernel runs, as `kernel=variant` pairs joined by
    /// `;` (e.g. `quant_matmul=avx2;paged_attention=split_k:512`; missing
    /// kernels take their defaults). Default: the plan `arqon bench kernels`
    /// stored in the catalog for this SKU, else the built-in choices.
    #[arg(long, env = "ARQON_KERNEL_PLAN")]
    pub kernel_plan: Option<String>,
    /// `max_tokens` of a chat request that gives none (capped by the context left).
    #[arg(long, env = "ARQON_DEFAULT_MAX_TOKENS", default_value_t = 2048)]
    pub default_max_tokens: u32,
    /// Largest request body in bytes; beyond it, 413.
    #[arg(long, env = "ARQON_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: u64,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    #[arg(long, env = "ARQON_SHUTDOWN_TIMEOUT_S", default_value_t = 30)]
    pub shutdown_timeout_s: u64,
    /// Variants, the admin API and the guardrail executor.
    #[command(flatten)]
    pub tuning: TuningArgs,
    /// Preload a PEFT LoRA adapter as NAME=DIR (repeatable); requests select it
    /// with `"model": "<served model>:NAME"`.
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    pub adapters: Vec<String>,
}

/// A token count with a range, checked once in its constructor (a knob the tuner may move).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TokenBudget(u32);

impl TokenBudget {
    /// Smallest allowed budget.
    pub const MIN: u32 = 1;
    /// Largest allowed budget.
    pub const MAX: u32 = 1 << 20;

    /// A budget of `n` tokens, if `MIN <= n <= MAX`.
    pub fn new(n: u32) -> Result<Self> {
        if (Self::MIN..=Self::MAX).contains(&n) {
            Ok(TokenBudget(n))
        } else {
            Err(Error::InvalidRequest(format!("token budget {n} is outside {}..={}", Self::MIN, Self::MAX)))
        }
    }

    /// The number of tokens.
    pub fn get(self) -> usize {
        self.0 as usize
    }
}

/// A memory size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bytes(pub u64);

/// How big the paged KV cache is made at start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvSizing {
    /// Exactly this many bytes (`--kv-cache-mb`).
    Fixed(Bytes),
    /// This share of the memory free once the model is loaded, capped at
    /// `max_batch` full contexts (more could never be held); `None` is
    /// the device's default share.
    FreeShare(Option<f64>),
}

impl KvSizing {
    /// The default share of free memory: a GPU's memory is the serving
    /// process's own (vLLM takes 0.9 of all of it, weights included); 0.8
    /// of what the weights leave keeps the whole process under the
    /// guardrail's default memory SLO (950 ‰) with room for activations. A
    /// CPU's memory is shared with the rest of the machine.
    pub fn default_share(on_gpu: bool) -> f64 {
        if on_gpu {
            0.8
        } else {
            0.2
        }
    }
}

/// `--kv-cache-dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KvCacheDtype {
    /// The model's dense dtype on a GPU, f32 on the CPU.
    Auto,
    /// 32-bit floats.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

impl KvCacheDtype {
    /// The dtype of a KV cache for `model`: `auto` is its dense dtype on a
    /// GPU (bf16 for a bf16 variant), f32 on the CPU. A 16-bit cache needs
    /// tensor pools (a GPU's, or the CPU's for the paged attention op):
    /// refused otherwise.
    pub fn resolve(self, model: &crate::model::Llama) -> Result<candle_core::DType> {
        use candle_core::DType;
        let cpu = model.device().is_cpu();
        let dtype = match self {
            KvCacheDtype::Auto if cpu => DType::F32,
            KvCacheDtype::Auto => model.dense_dtype().unwrap_or(DType::F32),
            KvCacheDtype::F32 => DType::F32,
            KvCacheDtype::Bf16 => DType::BF16,
            KvCacheDtype::F16 => DType::F16,
        };
        if dtype != DType::F32 && !model.kv_in_tensors() {
            return Err(Error::InvalidRequest(format!(
                "--kv-cache-dtype {}: the CPU's KV cache is f32 host memory; a 16-bit one needs a GPU \
                 (--device cuda) or the paged attention op (--kernel-plan attention=paged)",
                dtype.as_str()
            )));
        }
        Ok(dtype)
    }
}

/// Scheduler and admission limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most running sequences.
    pub max_batch: usize,
    /// Most queued requests.
    pub max_queue: usize,
    /// Cap on prompt + generated tokens (further capped by the model's context).
    pub max_context: Option<usize>,
    /// Tokens per engine step.
    pub step_tokens: TokenBudget,
    /// How big the paged KV cache is.
    pub kv_cache: KvSizing,
    /// What it holds.
    pub kv_cache_dtype: KvCacheDtype,
    /// Automatic prefix caching.
    pub prefix_caching: bool,
    /// Default `max_tokens` for chat requests.
    pub default_max_tokens: usize,
    /// Largest body.
    pub max_body_bytes: usize,
}

/// The validated configuration of `arqon serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// What to load (name or path).
    pub model: String,
    /// Arqon's home (model cache).
    pub home: Option<PathBuf>,
    /// Where the model runs.
    pub device: DeviceChoice,
    /// The id clients use.
    pub model_id: String,
    /// Where to listen.
    pub addr: SocketAddr,
    /// Required bearer token, if any.
    pub api_key: Option<String>,
    /// Admission and scheduling limits.
    pub limits: Limits,
    /// Drain deadline on shutdown.
    pub shutdown_timeout: Duration,
    /// Variants, admin API, executor.
    pub tuning: TuningConfig,
    /// LoRA adapters to preload: (name, folder).
    pub adapters: Vec<(String, PathBuf)>,
    /// `--kernel-plan`, parsed.
    pub kernel_plan: Option<arqon_kernels::KernelPlan>,
}

/// Largest `n` a request may ask for.
pub const MAX_N: usize = 16;

impl ServeArgs {
    /// Range-checks every flag and builds the configuration.
    pub fn into_config(self) -> Result<ServeConfig> {
        let bad = |m: String| Err(Error::InvalidRequest(m));
        if !(1..=4096).contains(&self.max_batch) {
            return bad(format!("--max-batch must be between 1 and 4096, got {}", self.max_batch));
        }
        if !(1..=1_000_000).contains(&self.max_queue) {
            return bad(format!("--max-queue must be between 1 and 1000000, got {}", self.max_queue));
        }
        let step_tokens = TokenBudget::new(self.step_tokens)?;
        if step_tokens.get() <= self.max_batch as usize {
            return bad(format!(
                "--step-tokens ({}) must exceed --max-batch ({}) so prefill always makes progress",
                self.step_tokens, self.max_batch
            ));
        }
        let kv_cache = match (self.kv_cache_mb, self.kv_cache_memory_fraction) {
            (Some(_), Some(_)) => return bad("give --kv-cache-mb or --kv-cache-memory-fraction, not both".into()),
            (Some(mb), None) if mb == 0 || mb > 1 << 24 => {
                return bad(format!("--kv-cache-mb must be between 1 and {}, got {mb}", 1u64 << 24))
            }
            (Some(mb), None) => KvSizing::Fixed(Bytes(mb << 20)),
            (None, Some(f)) if !(f > 0.0 && f <= 1.0) => {
                return bad(format!("--kv-cache-memory-fraction must be in (0, 1], got {f}"))
            }
            (None, f) => KvSizing::FreeShare(f),
        };
        if self.max_context == Some(0) || self.default_max_tokens == 0 {
            return bad("--max-context and --default-max-tokens must be at least 1".into());
        }
        if self.max_body_bytes < 1024 {
            return bad(format!("--max-body-bytes must be at least 1024, got {}", self.max_body_bytes));
        }
        if matches!(&self.api_key, Some(k) if k.is_empty()) {
            return bad("--api-key must not be empty".into());
        }
        let tuning = self.tuning.into_config()?;
        let kernel_plan = match &self.kernel_plan {
            None => None,
            Some(p) => Some(p.parse().map_err(|e| Error::InvalidRequest(format!("--kernel-plan {p:?}: {e}")))?),
        };
        let mut adapters: Vec<(String, PathBuf)> = Vec::with_capacity(self.adapters.len());
        for a in &self.adapters {
            let Some((name, dir)) = a.split_once('=').filter(|(_, d)| !d.is_empty()) else {
                return bad(format!("--adapter {a:?} must be NAME=DIR"));
            };
            crate::model::lora::check_adapter_name(name)
                .map_err(|e| Error::InvalidRequest(format!("--adapter {a:?}: {e}")))?;
            if adapters.iter().any(|(n, _)| n == name) {
                return bad(format!("--adapter {name} is given twice"));
            }
            adapters.push((name.to_string(), PathBuf::from(dir)));
        }
        Ok(ServeConfig {
            tuning,
            model_id: self.served_model_name.clone().unwrap_or_else(|| self.model.clone()),
            model: self.model,
            home: self.home,
            device: self.device.device,
            addr: SocketAddr::new(self.host, self.port),
            api_key: self.api_key,
            limits: Limits {
                max_batch: self.max_batch as usize,
                max_queue: self.max_queue as usize,
                max_context: self.max_context.map(|c| c as usize),
                step_tokens,
                kv_cache,
                kv_cache_dtype: self.kv_cache_dtype,
                prefix_caching: self.enable_prefix_caching,
                default_max_tokens: self.default_max_tokens as usize,
                max_body_bytes: self.max_body_bytes as usize,
            },
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout_s),
            adapters,
            kernel_plan,
        })
    }
}

#[cfg(test)]
impl ServeArgs {
    /// Limits for unit tests that need some.
    pub(crate) fn default_limits_for_tests() -> Limits {
        Limits {
            max_batch: 4,
            max_queue: 4,
            max_context: None,
            step_tokens: TokenBudget(64),
            kv_cache: KvSizing::Fixed(Bytes(1 << 20)),
            kv_cache_dtype: KvCacheDtype::Auto,
            prefix_caching: false,
            default_max_tokens: 16,
            max_body_bytes: 1 << 16,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn parse(args: &[&str]) -> Result<ServeConfig> {
        Cli::parse_from(std::iter::once("serve").chain(args.iter().copied())).args.into_config()
    }

    #[test]
    fn defaults_are_valid() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.addr.port(), 8080);
        assert_eq!(c.limits.step_tokens.get(), 512);
        assert_eq!(c.limits.kv_cache, KvSizing::FreeShare(None));
        assert_eq!(parse(&["--kv-cache-mb", "64"]).unwrap().limits.kv_cache, KvSizing::Fixed(Bytes(64 << 20)));
        let half = parse(&["--kv-cache-memory-fraction", "0.5"]).unwrap();
        assert_eq!(half.limits.kv_cache, KvSizing::FreeShare(Some(0.5)));
        assert_eq!(c.limits.kv_cache_dtype, KvCacheDtype::Auto);
        assert_eq!(parse(&["--kv-cache-dtype", "bf16"]).unwrap().limits.kv_cache_dtype, KvCacheDtype::Bf16);
        let bad = Cli::try_parse_from(["serve", "--kv-cache-dtype", "q8"]).err().unwrap().to_string();
        assert!(bad.contains("auto, f32, bf16, f16"), "{bad}");
        assert!(c.adapters.is_empty());
        assert_eq!(c.device, DeviceChoice::Auto);
        let c = parse(&["--adapter", "fr=/a/fr", "--adapter", "de.v2=/b"]).unwrap();
        assert_eq!(c.adapters, vec![("fr".into(), PathBuf::from("/a/fr")), ("de.v2".into(), PathBuf::from("/b"))]);
    }

    #[test]
    fn device_is_parsed_once_into_its_enum() {
        assert_eq!(parse(&["--device", "cpu"]).unwrap().device, DeviceChoice::Cpu);
        assert_eq!(parse(&["--device", "cuda:1"]).unwrap().device, DeviceChoice::Cuda(1));
        let e = Cli::try_parse_from(["serve", "--device", "gpu"]).err().expect("gpu is not a device");
        assert!(e.to_string().contains("expected auto, cpu, cuda or cuda:N"), "{e}");
    }

    #[test]
    fn token_budget_is_range_checked() {
        assert!(TokenBudget::new(0).is_err());
        assert!(TokenBudget::new(TokenBudget::MAX + 1).is_err());
        assert_eq!(TokenBudget::new(64).unwrap().get(), 64);
    }

    #[test]
    fn bad_flags_are_named() {
        for (args, name) in [
            (&["--max-batch", "0"][..], "--max-batch"),
            (&["--step-tokens", "8", "--max-batch", "8"][..], "--step-tokens"),
            (&["--kv-cache-mb", "0"][..], "--kv-cache-mb"),
            (&["--kv-cache-memory-fraction", "0"][..], "--kv-cache-memory-fraction"),
            (&["--kv-cache-memory-fraction", "1.5"][..], "--kv-cache-memory-fraction"),
            (&["--kv-cache-memory-fraction", "NaN"][..], "--kv-cache-memory-fraction"),
            (&["--kv-cache-mb", "8", "--kv-cache-memory-fraction", "0.5"][..], "not both"),
            (&["--max-body-bytes", "10"][..], "--max-body-bytes"),
            (&["--adapter", "fr"][..], "--adapter"),
            (&["--adapter", "a:b=/x"][..], "--adapter"),
            (&["--adapter", "a=/x", "--adapter", "a=/y"][..], "--adapter"),
        ] {
            let e = parse(args).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
    }
}
