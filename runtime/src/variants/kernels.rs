//! `arqon bench kernels`: every variant of every kernel that has several,
//! timed on this machine's device at one model's shapes
//! ([`arqon_kernels::tune`]), the fastest picked into this SKU's
//! [`KernelPlan`], which is written into a catalog (when given) for serving
//! on this SKU to run, and a report folder: `kernels.csv` (every
//! measurement), `kernels.svg` (each variant's time over the best at each
//! shape), `summary.md` (setup, the plan and why) and `plan.txt`.
//!
//! On the CPU the kernels with variants are the quantized matmul's SIMD
//! paths; on a CUDA device, our CUDA kernels (their CPU path keeps its default).
//!
//! Then the plan's `attention` key is decided on whole decode steps of the
//! model itself: greedy batches with the device's native attention and with
//! our paged-attention op (in the variant just chosen). The op is chosen only
//! if every sequence's tokens are the same both ways at every batch and it is
//! faster (geometric mean over the batches); `attention.csv` has the figures.
//!
//! And its `sampling` key on logits of the model's vocabulary at the same
//! batches: each row's greedy id, top-40 candidates and weights (with one
//! chunk of its logits) picked where the logits are
//! ([`crate::model::sample_op`]) against every row copied to the host and
//! picked there. `device` only if every pick is the same both ways
//! and it is faster; `sampling.csv` has the figures.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use arqon_kernels::plan::{AttentionVariant, DecodeVariant, SamplingVariant};
use arqon_kernels::tune::{self, Choice, Measurement, ModelShape, TuneOptions};
use arqon_kernels::KernelPlan;
use arqon_variants::{Catalog, Sku};
use candle_core::Device;

use super::bench::{decode_tok_s, svg_open, xml_escape};
use crate::engine::{Engine, GenerateRequest};
use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::sampling::RowWeights;

/// What `arqon bench kernels` does.
#[derive(Debug, Clone)]
pub struct KernelBenchOptions {
    /// Where the kernels run; the plan is this device's SKU's.
    pub device: Device,
    /// The model whose shapes are measured (named in the report).
    pub model: String,
    /// Its sizes.
    pub shape: ModelShape,
    /// Batches, contexts and time per measurement.
    pub tune: TuneOptions,
    /// The report's folder.
    pub out: PathBuf,
    /// A catalog to store the plan in, for this SKU.
    pub catalog: Option<PathBuf>,
    /// The model's file or folder, loaded for the decode steps of the
    /// `attention` choice; `None` leaves `attention` as the base plan has it.
    pub model_path: Option<PathBuf>,
    /// Decode steps for the `attention` choice: batches, prompt tokens, new tokens.
    pub attention: AttentionBench,
}

impl AttentionRow {
    /// `yes`, or where the tokens part (the reports' column).
    pub fn same_tokens(&self) -> String {
        agreement(&self.agree)
    }
}

/// A report's agreement column: `yes`, or where the two ways part.
fn agreement(agree: &std::result::Result<(), String>) -> String {
    agree.as_ref().map_or_else(|e| e.clone(), |()| "yes".into())
}

/// The decode steps that decide the plan's `attention`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttentionBench {
    /// Batch sizes.
    pub batches: Vec<usize>,
    /// Prompt tokens per sequence.
    pub prompt_tokens: usize,
    /// Greedy tokens per sequence.
    pub new_tokens: usize,
}

/// One batch of the `attention` choice: decode tokens/s both ways, and
/// whether the op gave the same tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionRow {
    /// Sequences.
    pub batch: usize,
    /// Decode tokens/s (summed over the batch) with the native attention.
    pub native_tok_s: f64,
    /// The same with our paged-attention op.
    pub paged_tok_s: f64,
    /// `Err(where)` when a sequence's tokens differ.
    pub agree: std::result::Result<(), String>,
    /// The same with the paged op's decode steps on fixed buffers, replayed
    /// as CUDA graphs on a GPU (`decode=graph`).
    pub graph_tok_s: f64,
    /// `Err(where)` when a sequence's tokens differ from the paged op's
    /// eager steps'.
    pub graph_agree: std::result::Result<(), String>,
}

/// What was measured and chosen.
#[derive(Debug, Clone)]
pub struct KernelBenchReport {
    /// The SKU measured.
    pub sku: Sku,
    /// The plan chosen.
    pub plan: KernelPlan,
    /// Per kernel measured, why.
    pub choices: Vec<Choice>,
    /// Every measurement.
    pub measurements: Vec<Measurement>,
    /// The decode steps behind the plan's `attention` (empty when not run).
    pub attention: Vec<AttentionRow>,
    /// The picks behind the plan's `sampling` (empty when not run).
    pub sampling: Vec<SamplingRow>,
}

/// One batch of the `sampling` choice: the time to pick every row's greedy
/// id, top-k candidates and weights where the logits are and on the host,
/// and whether the picks agree.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingRow {
    /// Rows of logits.
    pub batch: usize,
    /// Seconds per step picking on the host (the rows copied there).
    pub host_s: f64,
    /// Seconds per step picking where the logits are.
    pub device_s: f64,
    /// `Err(where)` when a pick differs.
    pub agree: std::result::Result<(), String>,
}

/// Candidates per row in the `sampling` measurement (a common `top_k`).
pub const SAMPLING_TOP_K: usize = 40;

/// The shapes of a model configuration.
pub fn model_shape(c: &ModelConfig) -> ModelShape {
    ModelShape {
        hidden: c.hidden_size,
        q_heads: c.num_heads,
        kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        intermediate: c.intermediate_size,
        vocab: c.vocab_size,
    }
}

/// The default report folder: `bench/runs/<date>-<sku>-kernels`.
pub fn default_out(sku: &Sku) -> PathBuf {
    default_out_for(sku, "kernels")
}

/// `bench/runs/<date>-<sku>-<what>` (relative to the working directory).
pub fn default_out_for(sku: &Sku, what: &str) -> PathBuf {
    let date = &super::now_rfc3339()[..10];
    PathBuf::from("bench/runs").join(format!("{date}-{}-{what}", slug(sku.as_str())))
}

/// `NVIDIA H100 80GB HBM3` → `NVIDIA-H100-80GB-HBM3`.
fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

/// Measures, picks, stores and reports (see the module docs).
pub fn bench_kernels(opts: &KernelBenchOptions, progress: &mut dyn FnMut(&str)) -> Result<KernelBenchReport> {
    if opts.tune.batches.is_empty() || opts.tune.batches.contains(&0) {
        return Err(Error::InvalidRequest("--batches needs batch sizes of at least 1".into()));
    }
    if opts.tune.contexts.contains(&0) {
        return Err(Error::InvalidRequest("--contexts needs context lengths of at least 1".into()));
    }
    // Checked before minutes of kernel measurements, not after them.
    let a = &opts.attention;
    if a.batches.contains(&0) || a.prompt_tokens == 0 || a.new_tokens == 0 {
        return Err(Error::InvalidRequest(
            "the attention steps need batches, prompt and new tokens of at least 1".into(),
        ));
    }
    // The catalog is read first: a bad one fails before minutes of measuring.
    let mut catalog = opts.catalog.as_deref().map(Catalog::load).transpose()?;
    let sku = crate::device::sku(&opts.device);
    let base = catalog.as_ref().and_then(|c| c.kernel_plan_for(&sku)).unwrap_or_default();
    let measurements = measure(opts, progress)?;
    let (mut plan, choices) = tune::pick(&measurements, base).map_err(|e| Error::InvalidRequest(e.to_string()))?;
    if choices.is_empty() {
        return Err(Error::InvalidRequest(format!(
            "no kernel variant ran at every shape on {sku}; see the errors above"
        )));
    }
    if !opts.attention.batches.is_empty() {
        // The ops the decode steps and the picks run read their variants
        // from the process's plan: the kernels' choices just made.
        crate::model::plan::set_kernel_plan(KernelPlan {
            attention: AttentionVariant::Native,
            decode: DecodeVariant::Eager,
            ..plan
        })?;
    }
    let attention = match &opts.model_path {
        Some(path) if !opts.attention.batches.is_empty() => measure_attention(path, opts, progress)?,
        _ => Vec::new(),
    };
    if !attention.is_empty() {
        plan.attention = attention_choice(&attention);
        plan.decode = decode_choice(&attention, plan.attention);
        if plan.decode == DecodeVariant::Graph {
            // Graphed steps decode on the paged op.
            plan.attention = AttentionVariant::Paged;
        }
    }
    let sampling = if opts.attention.batches.is_empty() { Vec::new() } else { measure_sampling(opts, progress)? };
    if !sampling.is_empty() {
        plan.sampling = sampling_choice(&sampling);
    }
    if let (Some(c), Some(path)) = (catalog.as_mut(), opts.catalog.as_deref()) {
        c.kernel_plans.insert(sku.as_str().to_string(), plan.to_string());
        c.save(path)?;
    }
    let report = KernelBenchReport { sku, plan, choices, measurements, attention, sampling };
    let out = &opts.out;
    std::fs::create_dir_all(out).map_err(|e| Error::Write { path: out.clone(), message: e.to_string() })?;
    write(&out.join("kernels.csv"), &render_csv(&report))?;
    write(&out.join("kernels.svg"), &render_svg(&report))?;
    write(&out.join("summary.md"), &render_summary(&report, opts))?;
    write(&out.join("plan.txt"), &format!("{}\n", report.plan))?;
    if !report.attention.is_empty() {
        write(&out.join("attention.csv"), &render_attention_csv(&report))?;
    }
    if !report.sampling.is_empty() {
        write(&out.join("sampling.csv"), &render_sampling_csv(&report))?;
    }
    Ok(report)
}

/// `paged` when the op agreed at every batch and is faster over them
/// (geometric mean of the speed ratios above 1), else `native`.
pub fn attention_choice(rows: &[AttentionRow]) -> AttentionVariant {
    let ours = rows.iter().map(|r| (&r.agree, r.paged_tok_s / r.native_tok_s));
    if agreed_and_faster(ours) {
        AttentionVariant::Paged
    } else {
        AttentionVariant::Native
    }
}

/// `graph` when graphed decode steps gave the paged op's tokens and those
/// the native attention's at every batch, and are faster over them than the
/// eager steps of the `attention` chosen; else `eager`.
pub fn decode_choice(rows: &[AttentionRow], attention: AttentionVariant) -> DecodeVariant {
    let eager = |r: &AttentionRow| if attention == AttentionVariant::Paged { r.paged_tok_s } else { r.native_tok_s };
    let both = |r: &AttentionRow| r.agree.clone().and(r.graph_agree.clone());
    let rows: Vec<_> = rows.iter().map(|r| (both(r), r.graph_tok_s / eager(r))).collect();
    if agreed_and_faster(rows.iter().map(|(a, ratio)| (a, *ratio))) {
        DecodeVariant::Graph
    } else {
        DecodeVariant::Eager
    }
}

/// Whether every row agreed and the geometric mean of the speed ratios
/// (ours over theirs) is above 1; `false` for no rows.
fn agreed_and_faster<'a>(rows: impl Iterator<Item = (&'a std::result::Result<(), String>, f64)>) -> bool {
    let (mut n, mut logs) = (0, 0.0f64);
    for (agree, ratio) in rows {
        if agree.is_err() {
            return false;
        }
        n += 1;
        logs += ratio.ln();
    }
    n > 0 && (logs / n as f64).exp() > 1.0
}

/// `device` when every pick agreed at every batch and picking where the
/// logits are is faster over them (geometric mean of the time ratios), else
/// `host`.
pub fn sampling_choice(rows: &[SamplingRow]) -> SamplingVariant {
    if agreed_and_faster(rows.iter().map(|r| (&r.agree, r.host_s / r.device_s))) {
        SamplingVariant::Device
    } else {
        SamplingVariant::Host
    }
}

/// Per batch of `opts.attention.batches`: random logits of the model's
/// vocabulary on the device; every row's greedy id and best
/// [`SAMPLING_TOP_K`] candidates picked by [`sample_op`](crate::model::sample_op)
/// (our kernels on a GPU, in the process's plan's variants), and from the rows copied to
/// the host, as serving without it does. Same picks, and the time of each.
fn measure_sampling(opts: &KernelBenchOptions, progress: &mut dyn FnMut(&str)) -> Result<Vec<SamplingRow>> {
    use crate::model::{argmax, rows as host_rows, sample_op};
    use crate::sampling::{weigh, CHUNK};
    let vocab = opts.shape.vocab;
    let mut rng = arqon_kernels::reference::rng::TestRng::new(0x5a3b);
    let mut out = Vec::new();
    for &b in &opts.attention.batches {
        let mut data = rng.vec(b * vocab, -8.0, 8.0);
        // A tie on every row's maximum: the lower id must win both ways.
        for row in data.chunks_mut(vocab) {
            let (i, m) =
                row.iter().copied().enumerate().fold((0, f32::MIN), |a, (i, v)| if v > a.1 { (i, v) } else { a });
            row[(i + vocab / 2) % vocab] = m;
        }
        let logits = candle_core::Tensor::from_vec(data, (b, vocab), &opts.device)?;
        let ks = vec![SAMPLING_TOP_K.min(vocab); b];
        let temps = vec![(1.0f32, 0.0f32); b];
        let (mut scratch, mut w) = (Vec::new(), Vec::new());
        let mut host = || -> Result<Picks> {
            let rows = host_rows(&logits)?;
            let ids = rows.iter().map(|r| argmax(r)).collect();
            let cands = rows
                .iter()
                .map(|r| {
                    sample_op::best_of_row(r, ks[0], &mut scratch);
                    scratch.clone()
                })
                .collect();
            let weights = rows
                .iter()
                .map(|r| weigh(r, 1.0, 0.0, &mut w, false).map(|(parts, max)| RowWeights { max, parts }))
                .collect();
            Ok((ids, cands, weights))
        };
        let device = || -> Result<Picks> {
            let weights = sample_op::row_weights(&logits, &temps)?;
            // The one chunk a draw then reads, per row.
            for r in 0..b {
                logits.get(r)?.narrow(0, 0, CHUNK.min(vocab))?.to_vec1::<f32>()?;
            }
            Ok((sample_op::greedy_ids(&logits)?, sample_op::top_candidates(&logits, &ks)?, weights))
        };
        let (want, got) = (host()?, device()?);
        // Weights summed where the logits are may differ in their last bits.
        let close = |a: &Option<RowWeights>, b: &Option<RowWeights>| match (a, b) {
            (Some(a), Some(b)) => {
                a.max == b.max
                    && a.parts.len() == b.parts.len()
                    && a.parts.iter().zip(&b.parts).all(|(x, y)| (x.0 - y.0).abs() <= 1e-4 * x.0.max(1.0))
            }
            (a, b) => a.is_none() && b.is_none(),
        };
        let agree = if want.0 != got.0 {
            let r = want.0.iter().zip(&got.0).position(|(a, b)| a != b).unwrap_or(0);
            Err(format!("row {r}: greedy id {} on the host, {} on the device", want.0[r], got.0[r]))
        } else if let Some(r) = want.1.iter().zip(&got.1).position(|(a, b)| a != b) {
            Err(format!("row {r}: the top {} candidates differ", ks[0]))
        } else if let Some(r) = want.2.iter().zip(&got.2).position(|(a, b)| !close(a, b)) {
            Err(format!("row {r}: the weights differ"))
        } else {
            Ok(())
        };
        let host_s = time_calls(opts.tune.min_seconds, &mut || host().map(drop))?;
        let device_s = time_calls(opts.tune.min_seconds, &mut || device().map(drop))?;
        let row = SamplingRow { batch: b, host_s, device_s, agree };
        progress(&format!(
            "sampling batch {b}: host {:.1} µs, device {:.1} µs{}",
            host_s * 1e6,
            device_s * 1e6,
            row.agree.as_ref().err().map(|e| format!(", {e}")).unwrap_or_default()
        ));
        out.push(row);
    }
    Ok(out)
}

/// Every row's greedy id, top-k `(id, logit)` pairs and weights.
type Picks = (Vec<u32>, Vec<Vec<(u32, f32)>>, Vec<Option<RowWeights>>);

/// [`tune::seconds_per_call`] of a call that ends by reading its results
/// back (so it needs no other wait).
fn time_calls(min_seconds: f64, run: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    let mut failed = None;
    let mut call = || {
        run().map_err(|e| {
            let m = e.to_string();
            failed = Some(e);
            arqon_kernels::KernelError::Plan(m)
        })
    };
    let t = tune::seconds_per_call(min_seconds, &mut call, &mut || Ok(()));
    match (t, failed) {
        (_, Some(e)) => Err(e),
        (t, None) => t.map_err(|e| Error::InvalidRequest(e.to_string())),
    }
}

/// The picks behind `sampling`.
pub fn render_sampling_csv(r: &KernelBenchReport) -> String {
    let mut s = String::from("sku,batch,top_k,host_us,device_us,host_over_device,same_picks\n");
    for x in &r.sampling {
        let _ = writeln!(
            s,
            "\"{}\",{},{SAMPLING_TOP_K},{:.3},{:.3},{:.4},\"{}\"",
            r.sku.as_str().replace('"', "'"),
            x.batch,
            x.host_s * 1e6,
            x.device_s * 1e6,
            x.host_s / x.device_s,
            x.same_picks()
        );
    }
    s
}

impl SamplingRow {
    /// `yes`, or where the picks part (the reports' column).
    pub fn same_picks(&self) -> String {
        agreement(&self.agree)
    }
}

/// Greedy decode of the same prompts with the native attention and with our
/// paged-attention op, which runs the process's plan's kernel variant (set
/// for the measurement: nothing else runs in `arqon bench`).
fn measure_attention(
    path: &Path,
    opts: &KernelBenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<AttentionRow>> {
    let a = &opts.attention;
    let mut engines = Vec::with_capacity(3);
    // Native attention, the paged op, the paged op's steps as graphs.
    for (paged, graphs) in [(false, false), (true, false), (true, true)] {
        let mut loaded = crate::engine::load_on(path, &opts.device)?;
        if !crate::model::paged_op::supports(loaded.model.config().head_dim) {
            progress(&format!("attention: the paged op does not take head_dim {}", loaded.model.config().head_dim));
            return Ok(Vec::new());
        }
        loaded.model = loaded.model.with_paged_attention(paged)?;
        let mut e = Engine::new(loaded);
        e.set_decode_graphs(graphs);
        engines.push(e);
    }
    let vocab = engines[0].loaded().model.config().vocab_size as u32;
    let n = a.prompt_tokens.min(engines[0].context_len().saturating_sub(a.new_tokens)).max(1);
    let mut rows = Vec::new();
    for &b in &a.batches {
        // Distinct prompts per sequence (ids spread over the vocabulary).
        let reqs: Vec<GenerateRequest> = (0..b)
            .map(|s| {
                let ids = (0..n).map(|i| ((s * 7919 + i * 104_729 + 1) as u32) % vocab.max(1)).collect();
                GenerateRequest { ignore_eos: true, ..GenerateRequest::greedy(ids, a.new_tokens) }
            })
            .collect();
        let mut outs = Vec::with_capacity(3);
        for e in engines.iter_mut() {
            let gens = e.generate_batch(reqs.clone(), &mut |_, _| {})?;
            outs.push((decode_tok_s(&gens), gens.into_iter().map(|g| g.token_ids).collect::<Vec<_>>()));
        }
        let same = |ours: &[Vec<u32>], theirs: &[Vec<u32>]| match ours
            .iter()
            .zip(theirs)
            .enumerate()
            .find(|(_, (x, y))| x != y)
        {
            None => Ok(()),
            Some((s, (x, y))) => {
                let at = x.iter().zip(y).position(|(p, q)| p != q).unwrap_or(x.len().min(y.len()));
                Err(format!("sequence {s} parts at token {at}"))
            }
        };
        let row = AttentionRow {
            batch: b,
            native_tok_s: outs[0].0,
            paged_tok_s: outs[1].0,
            agree: same(&outs[0].1, &outs[1].1),
            graph_tok_s: outs[2].0,
            graph_agree: same(&outs[1].1, &outs[2].1),
        };
        let err = |a: &std::result::Result<(), String>| a.as_ref().err().map(|e| format!(" ({e})")).unwrap_or_default();
        progress(&format!(
            "attention batch {b}: native {:.1} tok/s, paged {:.1} tok/s{}, paged as graphs {:.1} tok/s{}",
            row.native_tok_s,
            row.paged_tok_s,
            err(&row.agree),
            row.graph_tok_s,
            err(&row.graph_agree)
        ));
        rows.push(row);
    }
    Ok(rows)
}

/// The decode steps behind `attention`.
pub fn render_attention_csv(r: &KernelBenchReport) -> String {
    let mut s = String::from(
        "sku,batch,native_tok_s,paged_tok_s,paged_over_native,same_tokens,graph_tok_s,graph_over_paged,graph_same_tokens\n",
    );
    for a in &r.attention {
        let _ = writeln!(
            s,
            "\"{}\",{},{:.2},{:.2},{:.4},\"{}\",{:.2},{:.4},\"{}\"",
            r.sku.as_str().replace('"', "'"),
            a.batch,
            a.native_tok_s,
            a.paged_tok_s,
            a.paged_tok_s / a.native_tok_s,
            a.same_tokens(),
            a.graph_tok_s,
            a.graph_tok_s / a.paged_tok_s,
            agreement(&a.graph_agree)
        );
    }
    s
}

fn write(path: &Path, text: &str) -> Result<()> {
    arqon_variants::catalog::write_atomic(path, text.as_bytes()).map_err(Error::from)
}

fn measure(opts: &KernelBenchOptions, progress: &mut dyn FnMut(&str)) -> Result<Vec<Measurement>> {
    let kernel_err = |e: arqon_kernels::KernelError| Error::InvalidRequest(e.to_string());
    match &opts.device {
        Device::Cpu => tune::measure_cpu(&opts.shape, &opts.tune, progress).map_err(kernel_err),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let k = arqon_kernels::cuda::CudaKernels::on_stream(d.cuda_stream()).map_err(kernel_err)?;
            arqon_kernels::cuda::tune::measure(&k, &opts.shape, &opts.tune, progress).map_err(kernel_err)
        }
        other => Err(Error::Device {
            device: crate::device::describe(other),
            reason: "this build has no kernels to measure on it".into(),
        }),
    }
}

/// One line per measurement.
pub fn render_csv(r: &KernelBenchReport) -> String {
    let mut s = String::from("sku,kernel,variant,case,batch,us_per_call,error\n");
    for m in &r.measurements {
        let (us, err) = match &m.seconds {
            Ok(t) => (format!("{:.3}", t * 1e6), String::new()),
            Err(e) => (String::new(), e.replace(['"', '\n'], "'")),
        };
        let _ = writeln!(
            s,
            "\"{}\",{},{},\"{}\",{},{us},\"{err}\"",
            r.sku.as_str().replace('"', "'"),
            m.kernel.name(),
            m.variant,
            m.case,
            m.batch
        );
    }
    s
}

/// The plan, per kernel why, and how to reproduce.
pub fn render_summary(r: &KernelBenchReport, opts: &KernelBenchOptions) -> String {
    let sh = &opts.shape;
    let mut s = format!("# Kernel plan for {}\n\n", r.sku);
    let _ = writeln!(s, "- Measured: {} on `{}`.", super::now_rfc3339(), crate::device::describe(&opts.device));
    let _ = writeln!(
        s,
        "- Shapes of `{}`: hidden {}, heads {}/{} of {}, MLP {}, vocabulary {}.",
        opts.model, sh.hidden, sh.q_heads, sh.kv_heads, sh.head_dim, sh.intermediate, sh.vocab
    );
    let _ = writeln!(
        s,
        "- Batches {:?}, contexts {:?} (attention kernels only), at least {} ms per measurement (median of the samples).",
        opts.tune.batches,
        opts.tune.contexts,
        opts.tune.min_seconds * 1e3
    );
    let args: Vec<String> = std::env::args().collect();
    let _ = writeln!(s, "- Command: `{}`", args.join(" "));
    let _ = writeln!(s, "\nPlan: `{}`\n", r.plan);
    s.push_str(
        "| kernel | chosen | default | speedup over the default | shapes | time over the best, per variant | rejected |\n",
    );
    s.push_str("|---|---|---|---|---|---|---|\n");
    for c in &r.choices {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.3}× | {} | {} | {} |",
            c.kernel.name(),
            c.variant,
            c.default,
            c.speedup_over_default,
            c.cases,
            c.scores.iter().map(|(v, r)| format!("{v} {r:.3}")).collect::<Vec<_>>().join(", "),
            if c.rejected.is_empty() { "-".to_string() } else { c.rejected.join(", ") }
        );
    }
    if !r.attention.is_empty() {
        let a = &opts.attention;
        let _ = writeln!(
            s,
            "\n`attention={}`, `decode={}`: greedy decode of {} prompt and {} new tokens per sequence, native \
             attention against our paged-attention op (`{}`), and the paged op's decode steps on fixed buffers \
             (CUDA graphs replayed on a GPU, run eagerly on the CPU):\n",
            r.plan.attention, r.plan.decode, a.prompt_tokens, a.new_tokens, r.plan.paged_attention
        );
        s.push_str(
            "| batch | native tok/s | paged tok/s | paged / native | same tokens | graph tok/s | graph / paged | same tokens |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
        for x in &r.attention {
            let _ = writeln!(
                s,
                "| {} | {:.1} | {:.1} | {:.3} | {} | {:.1} | {:.3} | {} |",
                x.batch,
                x.native_tok_s,
                x.paged_tok_s,
                x.paged_tok_s / x.native_tok_s,
                x.same_tokens(),
                x.graph_tok_s,
                x.graph_tok_s / x.paged_tok_s,
                agreement(&x.graph_agree)
            );
        }
    }
    if !r.sampling.is_empty() {
        let _ = writeln!(
            s,
            "\n`sampling={}`: each row's greedy id, top {SAMPLING_TOP_K} candidates and weights over random logits of the \
             {}-token vocabulary, picked on the device (`argmax={}`, `top_k_top_p={}`) against the rows copied to \
             the host:\n",
            r.plan.sampling, sh.vocab, r.plan.argmax, r.plan.top_k_top_p
        );
        s.push_str("| batch | host µs | device µs | host / device | same picks |\n|---|---|---|---|---|\n");
        for x in &r.sampling {
            let _ = writeln!(
                s,
                "| {} | {:.1} | {:.1} | {:.3} | {} |",
                x.batch,
                x.host_s * 1e6,
                x.device_s * 1e6,
                x.host_s / x.device_s,
                x.same_picks()
            );
        }
    }
    s.push_str(
        "\nTimes over the best and speedups are geometric means over the shapes. The chosen variant has the \
         lowest mean time over the best. A variant that failed or disagreed with the default anywhere is rejected. Every time is in \
         `kernels.csv`.\n",
    );
    s
}

/// Per kernel and shape, one bar per variant: its time over the best time
/// at that shape (1 = the fastest; a cross for a failure). Hand-written SVG,
/// as `variants.svg`.
pub fn render_svg(r: &KernelBenchReport) -> String {
    const COLOURS: [&str; 6] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"];
    let (label_w, bar_w, row_h) = (330.0, 360.0, 11.0);
    let max_ratio = 3.0;
    let mut body = String::new();
    let mut y = 40.0;
    for kernel in KernelPlan::KERNELS {
        let ms = tune::of_kernel(&r.measurements, kernel);
        if ms.is_empty() {
            continue;
        }
        let (variants, cases) = tune::variants_and_cases(&ms);
        let _ = writeln!(body, r#"<text x="8" y="{y}" font-size="13" font-weight="bold">{}</text>"#, kernel.name());
        let mut lx = label_w;
        for (i, v) in variants.iter().enumerate() {
            let c = COLOURS[i % COLOURS.len()];
            let _ = writeln!(body, r#"<rect x="{lx}" y="{}" width="10" height="10" fill="{c}"/>"#, y - 9.0);
            let _ = writeln!(body, r#"<text x="{}" y="{y}">{}</text>"#, lx + 14.0, xml_escape(v));
            lx += 14.0 + 7.0 * v.len() as f64 + 16.0;
        }
        y += 8.0;
        for case in &cases {
            let times: Vec<Option<f64>> = variants
                .iter()
                .map(|v| ms.iter().find(|m| m.variant == *v && m.case == *case).and_then(|m| m.seconds.clone().ok()))
                .collect();
            let best = times.iter().flatten().copied().fold(f64::INFINITY, f64::min);
            let _ = writeln!(
                body,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                label_w - 6.0,
                y + row_h * variants.len() as f64 / 2.0 + 4.0,
                xml_escape(case)
            );
            for (i, t) in times.iter().enumerate() {
                let c = COLOURS[i % COLOURS.len()];
                match t {
                    Some(t) => {
                        let ratio = t / best;
                        let w = (ratio.min(max_ratio) / max_ratio * bar_w).max(1.0);
                        let _ = writeln!(
                            body,
                            r#"<rect x="{label_w}" y="{y:.1}" width="{w:.1}" height="{}" fill="{c}"><title>{:.2} µs ({ratio:.2}× the best)</title></rect>"#,
                            row_h - 2.0,
                            t * 1e6
                        );
                    }
                    None => {
                        let _ = writeln!(
                            body,
                            r#"<text x="{label_w}" y="{:.1}" fill="{c}">✗ failed or disagreed</text>"#,
                            y + 9.0
                        );
                    }
                }
                y += row_h;
            }
            y += 4.0;
        }
        y += 18.0;
    }
    let (w, h) = (label_w + bar_w + 60.0, y + 30.0);
    let mut s = svg_open(w, h, 10);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="20" text-anchor="middle" font-size="14">Kernel variants on {}: time over the best at each shape (bar end = {max_ratio}×)</text>"#,
        w / 2.0,
        xml_escape(r.sku.as_str())
    );
    for i in 0..=3 {
        let x = label_w + bar_w * i as f64 / 3.0;
        let _ = writeln!(s, r##"<line x1="{x:.1}" y1="30" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/>"##, y);
        let _ = writeln!(s, r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{i}×</text>"#, y + 14.0);
    }
    s.push_str(&body);
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(batch: usize, native: f64, paged: f64, agree: bool) -> AttentionRow {
        let agree = if agree { Ok(()) } else { Err("sequence 0 parts at token 3".into()) };
        AttentionRow { batch, native_tok_s: native, paged_tok_s: paged, agree, graph_tok_s: paged, graph_agree: Ok(()) }
    }

    #[test]
    fn graphs_are_chosen_only_when_they_agree_everywhere_and_beat_the_chosen_attention() {
        let graph = |r: AttentionRow, tok_s: f64, agree: bool| AttentionRow {
            graph_tok_s: tok_s,
            graph_agree: if agree { Ok(()) } else { Err("sequence 1 parts at token 0".into()) },
            ..r
        };
        let rows = [graph(row(1, 100.0, 90.0, true), 400.0, true), graph(row(8, 500.0, 450.0, true), 900.0, true)];
        assert_eq!(decode_choice(&rows, AttentionVariant::Native), DecodeVariant::Graph);
        let slow = [graph(row(1, 100.0, 90.0, true), 95.0, true)];
        assert_eq!(decode_choice(&slow, AttentionVariant::Paged), DecodeVariant::Graph, "faster than paged");
        assert_eq!(decode_choice(&slow, AttentionVariant::Native), DecodeVariant::Eager, "not than native");
        let wrong = [graph(row(1, 100.0, 90.0, true), 400.0, true), graph(row(8, 500.0, 450.0, true), 900.0, false)];
        assert_eq!(decode_choice(&wrong, AttentionVariant::Native), DecodeVariant::Eager);
        let paged_wrong = [graph(row(1, 100.0, 90.0, false), 400.0, true)];
        assert_eq!(
            decode_choice(&paged_wrong, AttentionVariant::Native),
            DecodeVariant::Eager,
            "graphs run the paged op"
        );
        assert_eq!(decode_choice(&[], AttentionVariant::Native), DecodeVariant::Eager);
    }

    #[test]
    fn the_paged_op_is_chosen_only_when_it_agrees_everywhere_and_is_faster() {
        assert_eq!(
            attention_choice(&[row(1, 100.0, 120.0, true), row(8, 500.0, 490.0, true)]),
            AttentionVariant::Paged
        );
        assert_eq!(
            attention_choice(&[row(1, 100.0, 90.0, true), row(8, 500.0, 510.0, true)]),
            AttentionVariant::Native
        );
        assert_eq!(
            attention_choice(&[row(1, 100.0, 300.0, true), row(8, 500.0, 900.0, false)]),
            AttentionVariant::Native
        );
        assert_eq!(attention_choice(&[row(1, 100.0, 100.0, true)]), AttentionVariant::Native, "a tie keeps native");
        assert_eq!(attention_choice(&[]), AttentionVariant::Native);
    }

    #[test]
    fn sku_slugs_are_path_safe() {
        assert_eq!(slug("NVIDIA H100 80GB HBM3"), "NVIDIA-H100-80GB-HBM3");
        assert_eq!(slug("cpu-x86_64-avx512"), "cpu-x86-64-avx512");
        assert_eq!(slug("cuda:0 (unnamed)"), "cuda-0-unnamed");
    }
}
