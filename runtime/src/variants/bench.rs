//! `arqon bench variants`: speed of every approved variant of this SKU, with
//! its memory and quality, written back into the catalog and reported as a
//! table, a CSV, an SVG chart of speed against quality and a summary with the
//! setup (a `bench/runs/<date>-<sku>-variants/` folder by default).
//!
//! Speed at batch `b` and prompt length `p`: `b` copies of a fixed prompt (the
//! quality text's first `p` tokens, 128 by default) run through [`Engine::generate_batch`] greedily for
//! a fixed number of new tokens past end-of-generation. Prefill tokens/s is
//! `b × prompt` over the prefill step's time; decode tokens/s is every
//! sequence's tokens after the first (which comes from prefill) over the
//! decode steps' time, summed over the batch.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use arqon_variants::{Catalog, Figures, Quality, Quantization, SpeedPoint};
use candle_core::Device;

use super::load::{load_variant_with, LoadPolicy};
use super::quality::{self, Targets};
use crate::engine::{Engine, GenerateRequest};
use crate::error::{Error, Result};

/// What `arqon bench variants` does.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The catalog's folder.
    pub catalog_dir: PathBuf,
    /// Batch sizes to time.
    pub batches: Vec<u32>,
    /// Where the CSV and SVG go.
    pub out: PathBuf,
    /// Prompt lengths to time (tokens per sequence), each at every batch size.
    pub prompt_tokens: Vec<usize>,
    /// New tokens per sequence.
    pub new_tokens: usize,
    /// Tokens the reference generates per quality prompt.
    pub target_tokens: usize,
    /// Where the variants (and the quality reference) run; the SKU whose
    /// approved entries are measured is this device's.
    pub device: Device,
}

/// One variant's measured figures.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRow {
    /// The entry's id.
    pub id: String,
    /// Its quantization.
    pub quantization: Quantization,
    /// Resident bytes of its weights.
    pub weight_bytes: u64,
    /// Speed per batch size.
    pub speed: Vec<SpeedPoint>,
    /// Quality proxy.
    pub quality: Quality,
}

/// The quality reference of a catalog: the one its entries name, else `f32`,
/// else the default variant.
pub fn reference_id(catalog: &Catalog) -> Option<String> {
    let named = catalog.variants.iter().find_map(|v| v.figures.as_ref()?.quality.as_ref().map(|q| q.reference.clone()));
    named
        .filter(|id| catalog.get(id).is_ok())
        .or_else(|| catalog.get(super::build::REFERENCE_ID).ok().map(|v| v.id.clone()))
        .or_else(|| catalog.default_variant.clone())
}

/// Measures every approved entry of the detected SKU, saves the figures into
/// the catalog, and writes `variants.csv` and `variants.svg` into `opts.out`.
pub fn bench_variants(opts: &BenchOptions, progress: &mut dyn FnMut(&str)) -> Result<Vec<BenchRow>> {
    if opts.batches.is_empty() || opts.batches.contains(&0) {
        return Err(Error::InvalidRequest("--batches needs batch sizes of at least 1".into()));
    }
    if opts.prompt_tokens.is_empty() || opts.prompt_tokens.contains(&0) {
        return Err(Error::InvalidRequest("--prompt-tokens needs prompt lengths of at least 1".into()));
    }
    let dir = &opts.catalog_dir;
    let mut catalog = Catalog::load(dir)?;
    let sku = crate::device::sku(&opts.device);
    let ids: Vec<String> = catalog.approved_for(&sku).map(|v| v.id.clone()).collect();
    if ids.is_empty() {
        return Err(Error::InvalidRequest(format!(
            "{}: no approved variant for this machine's SKU {sku}",
            dir.display()
        )));
    }
    let reference = reference_id(&catalog)
        .ok_or_else(|| Error::InvalidRequest(format!("{}: the catalog names no quality reference", dir.display())))?;
    let targets = {
        let policy = LoadPolicy { device: opts.device.clone(), ..LoadPolicy::offline() };
        let r = load_variant_with(&catalog, dir, &reference, &policy)?;
        quality::reference_targets(&mut Engine::new(r.loaded), &quality::prompts(), opts.target_tokens)?
    };
    let mut rows = Vec::with_capacity(ids.len());
    for id in &ids {
        let row = bench_one(&catalog, id, &reference, &targets, opts, progress)?;
        let e = catalog.get_mut(id)?;
        e.memory_bytes = row.weight_bytes;
        e.figures = Some(Figures {
            measured_at: super::now_rfc3339(),
            speed: row.speed.clone(),
            quality: Some(row.quality.clone()),
        });
        rows.push(row);
    }
    catalog.sku = sku;
    catalog.save(dir)?;
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::Write { path: opts.out.clone(), message: e.to_string() })?;
    write_report(&opts.out.join("variants.csv"), &render_csv(&rows))?;
    write_report(&opts.out.join("variants.svg"), &render_svg(&rows))?;
    write_report(&opts.out.join("summary.md"), &render_summary(&rows, opts, &catalog.sku))?;
    Ok(rows)
}

fn write_report(path: &Path, text: &str) -> Result<()> {
    arqon_variants::catalog::write_atomic(path, text.as_bytes()).map_err(Error::from)
}

fn bench_one(
    catalog: &Catalog,
    id: &str,
    reference: &str,
    targets: &Targets,
    opts: &BenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<BenchRow> {
    let v = load_variant_with(catalog, &opts.catalog_dir, id, &LoadPolicy::serving_on(opts.device.clone()))?;
    let (quantization, weight_bytes) = (v.entry.quantization, v.weight_bytes);
    let mut e = Engine::new(v.loaded);
    let quality = quality::measure(&mut e, targets, reference)?;
    let mut speed = Vec::with_capacity(opts.batches.len() * opts.prompt_tokens.len());
    for (&n, &b) in opts.prompt_tokens.iter().flat_map(|n| opts.batches.iter().map(move |b| (n, b))) {
        let prompt = bench_prompt(&e, n, opts.new_tokens)?;
        let req = GenerateRequest { ignore_eos: true, ..GenerateRequest::greedy(prompt.clone(), opts.new_tokens) };
        let gens = e.generate_batch(vec![req; b as usize], &mut |_, _| {})?;
        let prefill_s = gens[0].timings.prefill_s;
        let p = SpeedPoint {
            batch: b,
            prompt_tokens: Some(prompt.len() as u32),
            prefill_tok_s: if prefill_s > 0.0 { (prompt.len() * b as usize) as f64 / prefill_s } else { 0.0 },
            decode_tok_s: decode_tok_s(&gens),
        };
        progress(&format!(
            "{id}: batch {b}, prompt {}: prefill {:.1} tok/s, decode {:.1} tok/s",
            prompt.len(),
            p.prefill_tok_s,
            p.decode_tok_s
        ));
        speed.push(p);
    }
    Ok(BenchRow { id: id.to_string(), quantization, weight_bytes, speed, quality })
}

/// The fixed text's first `n` tokens, repeated if short, fitted to the context.
fn bench_prompt(e: &Engine, n: usize, new_tokens: usize) -> Result<Vec<u32>> {
    let ids = e.encode_prompt(quality::TEXT)?;
    let n = n.min(e.context_len().saturating_sub(new_tokens)).max(1);
    Ok(ids.iter().copied().cycle().take(n).collect())
}

/// Decode speed at `batch`, at the first prompt length timed.
fn decode_at(row: &BenchRow, batch: u32) -> Option<f64> {
    row.speed.iter().find(|p| p.batch == batch).map(|p| p.decode_tok_s)
}

/// The figures as a text table.
pub fn render_table(rows: &[BenchRow]) -> String {
    let points: Vec<&SpeedPoint> = rows.first().map(|r| r.speed.iter().collect()).unwrap_or_default();
    let lengths = {
        let mut l: Vec<Option<u32>> = points.iter().map(|p| p.prompt_tokens).collect();
        l.dedup();
        l.len()
    };
    let mut s = format!("{:<10} {:>6} {:>10} {:>9} {:>8}", "variant", "format", "MiB", "agree", "ppl");
    for p in &points {
        // `@batch`, or `@batch/prompt` when several prompt lengths were timed.
        let at = match p.prompt_tokens.filter(|_| lengths > 1) {
            Some(n) => format!("{}/{n}", p.batch),
            None => p.batch.to_string(),
        };
        let _ = write!(s, " {:>13} {:>12}", format!("prefill@{at}"), format!("decode@{at}"));
    }
    s.push('\n');
    for r in rows {
        let _ = write!(
            s,
            "{:<10} {:>6} {:>10.1} {:>9.3} {:>8.2}",
            r.id,
            r.quantization.as_str(),
            r.weight_bytes as f64 / (1 << 20) as f64,
            r.quality.top1_agreement,
            r.quality.perplexity
        );
        for p in &r.speed {
            let _ = write!(s, " {:>13.1} {:>12.1}", p.prefill_tok_s, p.decode_tok_s);
        }
        s.push('\n');
    }
    s
}

/// Setup notes and the table, for a `bench/runs/` folder.
pub fn render_summary(rows: &[BenchRow], opts: &BenchOptions, sku: &arqon_variants::Sku) -> String {
    let mut s = format!("# Variants on {sku}\n\n");
    let _ = writeln!(s, "- Measured: {} on `{}`.", super::now_rfc3339(), crate::device::describe(&opts.device));
    let _ = writeln!(s, "- Catalog: `{}`.", opts.catalog_dir.display());
    let _ = writeln!(
        s,
        "- Batches {:?}, prompt lengths {:?}, {} new tokens per sequence (greedy, past end-of-generation).",
        opts.batches, opts.prompt_tokens, opts.new_tokens
    );
    let args: Vec<String> = std::env::args().collect();
    let _ = writeln!(s, "- Command: `{}`", args.join(" "));
    s.push_str(
        "- Prefill tok/s: the batch's prompt tokens over the prefill step; decode tok/s: every token after \
         the first, summed over the batch, over the decode steps. Quality: top-1 agreement with the \
         reference's greedy tokens and perplexity on a fixed text.\n\n```text\n",
    );
    s.push_str(&render_table(rows));
    s.push_str("```\n\nEvery figure is in `variants.csv`; `variants.svg` draws speed against quality.\n");
    s
}

/// The figures as CSV, one line per variant and batch size.
pub fn render_csv(rows: &[BenchRow]) -> String {
    let mut s = String::from(
        "variant,quantization,weight_bytes,top1_agreement,perplexity,batch,prompt_tokens,prefill_tok_s,decode_tok_s\n",
    );
    for r in rows {
        for p in &r.speed {
            let _ = writeln!(
                s,
                "{},{},{},{:.4},{:.3},{},{},{:.2},{:.2}",
                r.id,
                r.quantization,
                r.weight_bytes,
                r.quality.top1_agreement,
                r.quality.perplexity,
                p.batch,
                p.prompt_tokens.map(|n| n.to_string()).unwrap_or_default(),
                p.prefill_tok_s,
                p.decode_tok_s
            );
        }
    }
    s
}

/// `s` safe inside SVG text and attributes.
pub(super) fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// An SVG document's opening tag, `w` × `h` on white, in `font_size` px sans-serif.
pub(super) fn svg_open(w: f64, h: f64, font_size: u32) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         font-family=\"sans-serif\" font-size=\"{font_size}\">\n<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n"
    )
}

/// Decode tokens/s of one batch: every sequence's tokens after the first
/// (which prefill gave) over the decode steps' time.
pub(super) fn decode_tok_s(gens: &[crate::engine::Generation]) -> f64 {
    let decoded: usize = gens.iter().map(|g| g.token_ids.len().saturating_sub(1)).sum();
    let t = gens.first().map_or(0.0, |g| g.timings.decode_s);
    if t > 0.0 {
        decoded as f64 / t
    } else {
        0.0
    }
}

/// A scatter plot of decode tokens/s at the smallest batch (y) against top-1
/// agreement (x), one labelled point per variant. Hand-written SVG: a dozen
/// elements do not justify a plotting dependency.
pub fn render_svg(rows: &[BenchRow]) -> String {
    let (w, h, m) = (640.0, 420.0, 60.0);
    let batch = rows.iter().flat_map(|r| r.speed.iter().map(|p| p.batch)).min().unwrap_or(1);
    let pts: Vec<(&str, f64, f64)> =
        rows.iter().map(|r| (r.id.as_str(), r.quality.top1_agreement, decode_at(r, batch).unwrap_or(0.0))).collect();
    let x_min = pts.iter().map(|p| p.1).fold(1.0f64, f64::min).clamp(0.0, 0.9) - 0.02;
    let x_max = 1.0 + 0.01;
    let y_max = pts.iter().map(|p| p.2).fold(0.0f64, f64::max).max(1e-9) * 1.15;
    let sx = |x: f64| m + (x - x_min) / (x_max - x_min) * (w - 2.0 * m);
    let sy = |y: f64| h - m - y / y_max * (h - 2.0 * m);
    let prompt = rows
        .first()
        .and_then(|r| r.speed.iter().find(|p| p.batch == batch)?.prompt_tokens)
        .map(|n| format!(", prompt {n}"))
        .unwrap_or_default();
    let mut s = svg_open(w, h, 12);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="14">Variants: decode speed at batch {batch}{prompt} against quality</text>"#,
        w / 2.0
    );
    let _ = writeln!(s, r#"<line x1="{m}" y1="{0}" x2="{1}" y2="{0}" stroke="black"/>"#, h - m, w - m);
    let _ = writeln!(s, r#"<line x1="{m}" y1="{m}" x2="{m}" y2="{}" stroke="black"/>"#, h - m);
    for i in 0..=4 {
        let x = x_min + (x_max - x_min) * i as f64 / 4.0;
        let y = y_max * i as f64 / 4.0;
        let _ = writeln!(s, r#"<text x="{:.1}" y="{}" text-anchor="middle">{x:.2}</text>"#, sx(x), h - m + 18.0);
        let _ = writeln!(s, r#"<text x="{}" y="{:.1}" text-anchor="end">{y:.1}</text>"#, m - 6.0, sy(y) + 4.0);
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">top-1 agreement with the reference</text>"#,
        w / 2.0,
        h - 16.0
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">decode tokens/s (batch {batch})</text>"#,
        h / 2.0,
        h / 2.0
    );
    for (id, x, y) in &pts {
        let (cx, cy) = (sx(*x), sy(*y));
        let _ = writeln!(s, r##"<circle cx="{cx:.1}" cy="{cy:.1}" r="5" fill="#1f77b4"/>"##);
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}">{}</text>"#, cx + 8.0, cy - 6.0, xml_escape(id));
    }
    s.push_str("</svg>\n");
    s
}
