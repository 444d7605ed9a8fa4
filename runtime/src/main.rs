//! The `arqon` binary: parses the command line and wires the runtime's
//! libraries together. Everything of substance lives in the library.
#![forbid(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use arqon_runtime::chat::Message;
use arqon_runtime::model::lora::{self, LoraTarget, SynthSpec};
use arqon_runtime::{config, engine, fetch, variants, GenerateRequest, SamplingParams};
use clap::{Args, Parser, Subcommand};

/// Arqon Serve: a self-tuning LLM inference server for Llama-family models.
#[derive(Parser, Debug)]
#[command(name = "arqon", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text from a prompt, streaming it to stdout (timings on stderr).
    Generate(GenerateArgs),
    /// Fetch the default model (or another known one) into the cache and print its path.
    Fetch(FetchArgs),
    /// Print a model's configuration and tokenizer facts as JSON.
    Inspect(InspectArgs),
    /// Serve the model over an OpenAI-compatible HTTP API with continuous batching.
    Serve(Box<arqon_runtime::server::ServeArgs>),
    /// Build, list and inspect variants of a base model (quantizations) and their catalog.
    #[command(subcommand)]
    Variants(variants::cli::VariantsCommand),
    /// Benchmarks: `arqon bench variants` measures a catalog's approved variants.
    #[command(subcommand)]
    Bench(variants::cli::BenchCommand),
    /// LoRA adapter tools.
    #[command(subcommand)]
    Adapters(AdaptersCommand),
}

#[derive(Subcommand, Debug)]
enum AdaptersCommand {
    /// Write a deterministic PEFT-format LoRA adapter for a model (tests, demos).
    Synth(SynthArgs),
}

#[derive(Args, Debug)]
struct SynthArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The rank r.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// lora_alpha (the update is scaled by alpha / r).
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// Comma-separated modules: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj.
    #[arg(long, value_delimiter = ',', default_value = "q_proj,v_proj")]
    targets: Vec<String>,
    /// Random seed (same seed, same files).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The folder to write.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct ModelArgs {
    /// A GGUF file, a Hugging Face folder, or a known name.
    #[arg(long, env = "ARQON_MODEL", default_value = fetch::DEFAULT_MODEL)]
    model: String,
    /// Where models are cached (`$ARQON_HOME/models`); default ~/.cache/arqon.
    #[arg(long, env = "ARQON_HOME")]
    home: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct InspectArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    device: config::DeviceArgs,
}

#[derive(Args, Debug)]
struct FetchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Re-hash the cached file against the pinned SHA-256.
    #[arg(long)]
    verify: bool,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Treat the prompt as a user message and apply the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Drop tokens below this fraction of the top token's probability.
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Penalty on tokens already seen (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// OpenAI-style frequency penalty.
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// OpenAI-style presence penalty.
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    /// Seed for sampling (same seed, same output).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past end-of-generation tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Generate at least this many tokens before any stop.
    #[arg(long, default_value_t = 0)]
    min_tokens: usize,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Apply this PEFT LoRA adapter folder (at run time, unless --merge).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Merge the adapter into the weights before generating.
    #[arg(long, requires = "adapter")]
    merge: bool,
    /// Depth profile: `full`, `exit:K` (static exit after K layers),
    /// `calm:K:THRESHOLD` (dynamic exit after at least K layers once the
    /// hidden-state cosine reaches THRESHOLD), or `spec:K:D` (lossless
    /// self-speculative decoding, D tokens drafted with K layers; greedy only).
    #[arg(long, default_value = "full")]
    depth: arqon_variants::DepthProfile,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    device: config::DeviceArgs,
}

fn main() -> ExitCode {
    config::init_cpu_threading();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("ARQON_LOG"))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes.
            let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("arqon: error: {}", msg.join(": "));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate(args),
        Command::Serve(args) => Ok(arqon_runtime::server::run(*args)?),
        Command::Adapters(AdaptersCommand::Synth(a)) => {
            let path = fetch::resolve(&a.model.model, &config::fetch_options(a.model.home, true))?;
            let loaded = engine::load(&path)?;
            let targets = a.targets.iter().map(|t| t.trim().parse()).collect::<Result<Vec<LoraTarget>, _>>()?;
            let spec = SynthSpec { rank: a.rank, alpha: a.alpha, targets, seed: a.seed, base_model: a.model.model };
            lora::synth(loaded.model.config(), loaded.model.weights(), &spec, &a.out)?;
            eprintln!("arqon: wrote a rank-{} adapter to {}", a.rank, a.out.display());
            Ok(())
        }
        Command::Variants(cmd) => Ok(variants::cli::run_variants(cmd)?),
        Command::Bench(cmd) => Ok(variants::cli::run_bench(cmd)?),
        Command::Fetch(args) => {
            let opts = config::fetch_options(args.model.home, true);
            let path = fetch::resolve(&args.model.model, &opts)?;
            if args.verify {
                let m = fetch::known(&args.model.model).context("--verify needs a known model name")?;
                let got = fetch::sha256_file(&path)?;
                anyhow::ensure!(got == m.sha256, "{}: SHA-256 {got} does not match {}", path.display(), m.sha256);
                eprintln!("arqon: {} verified", path.display());
            }
            println!("{}", path.display());
            Ok(())
        }
        Command::Inspect(InspectArgs { model: args, device }) => {
            let device = arqon_runtime::device::open(device.device)?;
            let path = fetch::resolve(&args.model, &config::fetch_options(args.home, true))?;
            let loaded = engine::load_on(&path, &device)?;
            let out = serde_json::json!({
                "source": loaded.source,
                "device": arqon_runtime::device::describe(&device),
                "config": loaded.model.config(),
                "vocab_size": loaded.tokenizer.vocab_size(),
                "bos": loaded.tokenizer.bos(),
                "stop_ids": loaded.tokenizer.stop_ids(),
                "lm_head_format": format!("{:?}", loaded.model.weights().lm_head.format()),
                "attn_q_format": format!("{:?}", loaded.model.weights().layers[0].wq.format()),
                "has_chat_template": loaded.tokenizer.chat_template().is_some(),
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
    }
}

fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        frequency_penalty: a.frequency_penalty,
        presence_penalty: a.presence_penalty,
        seed: a.seed,
        logit_bias: Vec::new(),
    };
    sampling.validate()?;
    if a.prompt.is_empty() {
        anyhow::bail!("the prompt is empty: pass --prompt with some text");
    }
    let device = arqon_runtime::device::open(a.device.device)?;
    let path = fetch::resolve(&a.model.model, &config::fetch_options(a.model.home, true))?;
    let t_load = std::time::Instant::now();
    let mut e = engine::Engine::new(engine::load_on(&path, &device)?);
    let adapter = a.adapter.as_deref().map(|dir| e.load_adapter(dir)).transpose()?;
    let adapter = match adapter {
        Some(ad) if a.merge => {
            e.merge_adapter(&ad)?;
            None
        }
        other => other,
    };
    e.set_depth(a.depth)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let prompt_ids =
        if a.chat { e.encode_chat(&[Message::new("user", &a.prompt)])? } else { e.encode_prompt(&a.prompt)? };
    let req = GenerateRequest {
        prompt_ids,
        max_tokens: a.max_tokens,
        sampling,
        stop: a.stop,
        stop_token_ids: Vec::new(),
        ignore_eos: a.ignore_eos,
        min_tokens: a.min_tokens,
        adapter,
    };
    let stream = !a.json;
    let mut stdout = std::io::stdout().lock();
    let g = e.generate(req, &mut |t| {
        if stream {
            let _ = stdout.write_all(t.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    if a.json {
        let mut v = serde_json::to_value(&g)?;
        v["timings"]["load_s"] = load_s.into();
        writeln!(stdout, "{}", serde_json::to_string(&v)?)?;
    } else {
        writeln!(stdout)?;
    }
    let t = g.timings;
    let d = &g.depth;
    let depth = match a.depth {
        arqon_variants::DepthProfile::Full => String::new(),
        arqon_variants::DepthProfile::SelfSpeculative { .. } => format!(
            "; depth {}: acceptance {:.3} ({} of {} drafts), {} verify steps, {:.1} layers per token",
            d.profile, d.acceptance_rate, d.accepted, d.drafted, d.verify_steps, d.mean_layers
        ),
        _ => format!("; depth {}: mean layers {:.2}", d.profile, d.mean_layers),
    };
    eprintln!(
        "arqon: prefill {} tokens at {:.1} tokens/s; decode {} tokens at {:.1} tokens/s; finish {:?}{depth}",
        g.prompt_token_ids.len(),
        t.prefill_tokens_per_s,
        g.token_ids.len(),
        t.decode_tokens_per_s,
        g.finish_reason
    );
    Ok(())
}
