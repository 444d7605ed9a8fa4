//! The flags of `arqon variants …` and `arqon bench variants`, and what they
//! run. The binary only dispatches here.

use std::path::{Path, PathBuf};

use arqon_kernels::tune::TuneOptions;
use arqon_variants::{Catalog, Quantization, Sku};

use super::bench::{bench_variants, render_table, BenchOptions};
use super::build::{build_variants, BuildOptions};
use super::kernels::{bench_kernels, default_out, model_shape, AttentionBench, KernelBenchOptions};
use super::load::{load_variant_with, LoadPolicy};
use super::quality::{DEFAULT_TARGET_TOKENS, QUALITY_FLOOR};
use crate::config::{self, DeviceArgs};
use crate::error::{Error, Result};
use crate::fetch;

/// `arqon variants …`.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum VariantsCommand {
    /// Build quantization variants of a base model into GGUF artifacts and a catalog.
    Build(BuildArgs),
    /// List a catalog's entries.
    List(ListArgs),
    /// Load one entry as serving would (id, status, SKU, artifact hash, base
    /// model checks) and print what was loaded as JSON.
    Check(CheckArgs),
}

/// Flags of `arqon variants check`.
#[derive(clap::Args, Debug, Clone)]
pub struct CheckArgs {
    /// The catalog's folder (or its `catalog.json`).
    #[arg(long)]
    pub catalog: PathBuf,
    /// The entry's id.
    #[arg(long)]
    pub id: String,
    /// Also load candidate and retired entries, and entries of other SKUs
    /// (as `variants build` and offline tools do).
    #[arg(long)]
    pub offline: bool,
    /// `--device`: where the entry is loaded (serving checks its SKU).
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Flags of `arqon variants build`.
#[derive(clap::Args, Debug, Clone)]
pub struct BuildArgs {
    /// The base: a GGUF file or a known name.
    #[arg(long, env = "ARQON_MODEL", default_value = fetch::DEFAULT_MODEL)]
    pub model: String,
    /// Output folder (default `$ARQON_HOME/variants/<model>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Formats to build, comma-separated (the base's own format is the shipped file).
    #[arg(long, value_delimiter = ',', default_value = "f32,f16,bf16,q8_0,q4_0")]
    pub formats: Vec<Quantization>,
    /// Tokens the reference generates per quality prompt.
    #[arg(long, default_value_t = DEFAULT_TARGET_TOKENS)]
    pub target_tokens: usize,
    /// Top-1 agreement an entry needs to be approved.
    #[arg(long, default_value_t = QUALITY_FLOOR)]
    pub floor: f64,
    /// Arqon's home (default ~/.cache/arqon).
    #[arg(long, env = "ARQON_HOME")]
    pub home: Option<PathBuf>,
}

/// Flags of `arqon variants list`.
#[derive(clap::Args, Debug, Clone)]
pub struct ListArgs {
    /// The catalog's folder (or its `catalog.json`).
    #[arg(long)]
    pub catalog: PathBuf,
    /// Print the catalog as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `arqon bench …`.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum BenchCommand {
    /// Measure every approved variant of this machine's SKU and write the figures into the catalog.
    Variants(BenchVariantsArgs),
    /// Time every kernel variant on this device at a model's shapes, pick this SKU's kernel plan,
    /// and write it into a catalog and a report folder.
    Kernels(BenchKernelsArgs),
}

/// Flags of `arqon bench kernels`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchKernelsArgs {
    /// The model whose shapes are measured: a GGUF file, a Hugging Face folder, or a known name.
    #[arg(long, env = "ARQON_MODEL", default_value = fetch::DEFAULT_MODEL)]
    pub model: String,
    /// A catalog (folder or `catalog.json`) to store the plan in, for this SKU.
    #[arg(long)]
    pub catalog: Option<PathBuf>,
    /// Rows per call (sequences of a decode step, tokens of a prefill chunk), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64,128")]
    pub batches: Vec<usize>,
    /// Context lengths for the attention kernels, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "128,512,2048")]
    pub contexts: Vec<usize>,
    /// Milliseconds each measurement runs for, at least.
    #[arg(long, default_value_t = 20.0)]
    pub min_ms: f64,
    /// Batches of the greedy decode steps that choose the plan's `attention` (native or our
    /// paged op), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub attention_batches: Vec<usize>,
    /// Prompt tokens per sequence of those steps.
    #[arg(long, default_value_t = 128)]
    pub attention_prompt: usize,
    /// Greedy tokens per sequence of those steps.
    #[arg(long, default_value_t = 32)]
    pub attention_new_tokens: usize,
    /// Leave `attention` as the catalog's plan has it (no decode steps).
    #[arg(long)]
    pub no_attention: bool,
    /// The report's folder (default `bench/runs/<date>-<sku>-kernels`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Arqon's home (default ~/.cache/arqon).
    #[arg(long, env = "ARQON_HOME")]
    pub home: Option<PathBuf>,
    /// `--device`: where the kernels run (the plan is its SKU's).
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Flags of `arqon bench variants`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchVariantsArgs {
    /// The catalog's folder (default `$ARQON_HOME/variants/<default model>`).
    #[arg(long)]
    pub catalog: Option<PathBuf>,
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batches: Vec<u32>,
    /// The report folder: `variants.csv`, `variants.svg`, `summary.md` (default
    /// `bench/runs/<date>-<sku>-variants`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Prompt lengths (tokens per sequence), comma-separated; each is timed at every batch size.
    #[arg(long, value_delimiter = ',', default_value = "128")]
    pub prompt_tokens: Vec<usize>,
    /// New tokens per sequence.
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    /// Arqon's home (default ~/.cache/arqon).
    #[arg(long, env = "ARQON_HOME")]
    pub home: Option<PathBuf>,
    /// `--device`: where the variants run (its SKU's entries are measured).
    #[command(flatten)]
    pub device: DeviceArgs,
}

fn default_dir(home: Option<PathBuf>, model: &str) -> PathBuf {
    let name = Path::new(model).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| model.into());
    home.unwrap_or_else(config::default_home).join("variants").join(name)
}

/// Runs `arqon variants …`, reporting progress on stderr.
pub fn run_variants(cmd: VariantsCommand) -> Result<()> {
    match cmd {
        VariantsCommand::Build(a) => {
            if !(0.0..=1.0).contains(&a.floor) {
                return Err(Error::InvalidRequest(format!("--floor {} is not in [0, 1]", a.floor)));
            }
            if a.target_tokens == 0 {
                return Err(Error::InvalidRequest("--target-tokens must be at least 1".into()));
            }
            let base = fetch::resolve(&a.model, &config::fetch_options(a.home.clone(), true))?;
            if base.is_dir() {
                return Err(Error::InvalidRequest(format!(
                    "{}: variants are built from a GGUF file, not a Hugging Face folder",
                    base.display()
                )));
            }
            let model_name = match fetch::known(&a.model) {
                Some(m) => m.name.to_string(),
                None => base.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
            };
            let out = a.out.unwrap_or_else(|| default_dir(a.home, &model_name));
            let opts = BuildOptions {
                base,
                model_name,
                out: out.clone(),
                formats: a.formats,
                target_tokens: a.target_tokens,
                floor: a.floor,
            };
            let c = build_variants(&opts, &mut |m| eprintln!("arqon: {m}"))?;
            print_list(&c);
            eprintln!("arqon: catalog written to {}", out.join(arqon_variants::catalog::CATALOG_FILE).display());
            Ok(())
        }
        VariantsCommand::Check(a) => {
            let c = Catalog::load(&a.catalog)?;
            let dir = if a.catalog.is_dir() {
                a.catalog.clone()
            } else {
                a.catalog.parent().map(Path::to_path_buf).unwrap_or_default()
            };
            let device = crate::device::open(a.device.device)?;
            let policy =
                if a.offline { LoadPolicy { device, ..LoadPolicy::offline() } } else { LoadPolicy::serving_on(device) };
            let v = load_variant_with(&c, &dir, &a.id, &policy)?;
            let out = serde_json::json!({
                "id": v.entry.id,
                "status": v.entry.status,
                "quantization": v.entry.quantization,
                "artifact": dir.join(&v.entry.artifact.path),
                "weight_bytes": v.weight_bytes,
                "num_layers": v.loaded.model.config().num_layers,
                "attn_q_format": format!("{:?}", v.loaded.model.weights().layers[0].wq.format()),
            });
            println!("{out}");
            Ok(())
        }
        VariantsCommand::List(a) => {
            let c = Catalog::load(&a.catalog)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&c).map_err(|e| Error::InvalidRequest(e.to_string()))?);
            } else {
                print_list(&c);
            }
            Ok(())
        }
    }
}

fn print_list(c: &Catalog) {
    let here = Sku::detect_cpu();
    println!(
        "base {} ({}), catalog SKU {}, this machine {here}",
        c.base.name,
        &c.base.sha256[..c.base.sha256.len().min(12)],
        c.sku
    );
    println!("{:<12} {:<6} {:<10} {:>10} {:>8} {:>8}  sku", "id", "format", "status", "MiB", "agree", "ppl");
    for v in &c.variants {
        let q = v.figures.as_ref().and_then(|f| f.quality.as_ref());
        let mark = if c.default_variant.as_deref() == Some(v.id.as_str()) { " (default)" } else { "" };
        println!(
            "{:<12} {:<6} {:<10} {:>10.1} {:>8} {:>8}  {}{mark}",
            v.id,
            v.quantization.as_str(),
            v.status.as_str(),
            v.memory_bytes as f64 / (1 << 20) as f64,
            q.map(|q| format!("{:.3}", q.top1_agreement)).unwrap_or_else(|| "-".into()),
            q.map(|q| format!("{:.2}", q.perplexity)).unwrap_or_else(|| "-".into()),
            v.sku
        );
    }
}

/// Runs `arqon bench …`: prints the table on stdout, progress on stderr.
pub fn run_bench(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Variants(a) => {
            let device = crate::device::open(a.device.device)?;
            let dir = a.catalog.unwrap_or_else(|| default_dir(a.home, fetch::DEFAULT_MODEL));
            let opts = BenchOptions {
                device: device.clone(),
                out: a.out.unwrap_or_else(|| super::kernels::default_out_for(&crate::device::sku(&device), "variants")),
                catalog_dir: dir,
                batches: a.batches,
                prompt_tokens: a.prompt_tokens,
                new_tokens: a.new_tokens,
                target_tokens: DEFAULT_TARGET_TOKENS,
            };
            let rows = bench_variants(&opts, &mut |m| eprintln!("arqon: {m}"))?;
            print!("{}", render_table(&rows));
            eprintln!(
                "arqon: wrote {} and {}",
                opts.out.join("variants.csv").display(),
                opts.out.join("variants.svg").display()
            );
            eprintln!("arqon: and {}", opts.out.join("summary.md").display());
            Ok(())
        }
        BenchCommand::Kernels(a) => {
            if !(a.min_ms.is_finite() && a.min_ms >= 0.0 && a.min_ms <= 60_000.0) {
                return Err(Error::InvalidRequest(format!("--min-ms must be in [0, 60000], got {}", a.min_ms)));
            }
            let device = crate::device::open(a.device.device)?;
            let path = fetch::resolve(&a.model, &config::fetch_options(a.home.clone(), true))?;
            let config = if path.is_dir() {
                crate::model::safetensors::read_config(&path)?.0
            } else {
                crate::model::gguf::GgufFile::open(&path)?.config()?
            };
            let out = a.out.unwrap_or_else(|| default_out(&crate::device::sku(&device)));
            let opts = KernelBenchOptions {
                device,
                model: a.model,
                shape: model_shape(&config),
                tune: TuneOptions { batches: a.batches, contexts: a.contexts, min_seconds: a.min_ms / 1e3 },
                out,
                catalog: a.catalog,
                model_path: (!a.no_attention).then_some(path),
                attention: AttentionBench {
                    batches: a.attention_batches,
                    prompt_tokens: a.attention_prompt,
                    new_tokens: a.attention_new_tokens,
                },
            };
            let r = bench_kernels(&opts, &mut |m| eprintln!("arqon: {m}"))?;
            for c in &r.choices {
                let rejected =
                    if c.rejected.is_empty() { String::new() } else { format!(", rejected {}", c.rejected.join(" ")) };
                eprintln!(
                    "arqon: {}: {} ({:.3}x the default {} over {} shapes{rejected})",
                    c.kernel.name(),
                    c.variant,
                    c.speedup_over_default,
                    c.default,
                    c.cases
                );
            }
            if !r.attention.is_empty() {
                eprintln!("arqon: attention: {} (see attention.csv)", r.plan.attention);
            }
            if let Some(c) = &opts.catalog {
                eprintln!("arqon: plan stored in {} for {}", c.display(), r.sku);
            }
            eprintln!("arqon: wrote {}", opts.out.display());
            println!("{}", r.plan);
            Ok(())
        }
    }
}
