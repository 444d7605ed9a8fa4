//! `arqon serve`: an OpenAI-compatible HTTP server with continuous batching.
//!
//! Layout, one concern per file:
//! - [`config`]: the flags (`ARQON_*` too) and the validated [`ServeConfig`];
//! - [`validate`]: HTTP JSON → `ValidRequest` → tokenized `JobSpec`;
//! - [`scheduler`]: the engine thread and its iteration-level scheduler;
//! - [`routes`], [`sse`], [`api`]: handlers, streaming, OpenAI's shapes;
//! - [`errors`]: the one mapping from errors to status and OpenAI error JSON;
//! - [`metrics`], [`openapi`]: `/metrics` and `/openapi.json`.
//!
//! Life cycle: bind and print `arqon: listening on http://ADDR` on stderr
//! (`/health` answers at once), load the model on a blocking thread (`/ready`
//! answers 200 once it is loaded; `/v1/*` answers 503 until then), serve, and
//! on SIGTERM/SIGINT stop admitting (503), let in-flight requests finish up to
//! the shutdown deadline, then exit. The same drain follows when the engine
//! finds its device lost ([`crate::device::lost`]: `/health` then answers
//! 503), and the exit is then an error, so that a supervisor restarts the
//! server.

pub mod admin;
pub mod api;
pub mod config;
pub mod errors;
pub mod metrics;
pub mod openapi;
pub mod routes;
pub mod scheduler;
pub mod sse;
pub mod tokenize;
pub mod tuning;
pub mod validate;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use config::{KvSizing, Limits};
pub use config::{ServeArgs, ServeConfig};

use arqon_tuner::audit::FsyncPolicy;
use arqon_tuner::serving::serving_space;
use arqon_tuner::telemetry::TelemetryRing;
use arqon_tuner::Config;
use arqon_variants::slot::Slot;
use candle_core::Device;

use crate::control::governor::{self, GovernorHandle, GovernorSettings};
use crate::control::set::{catalog_infos, disk_bytes, VariantInfo, VariantSet, VariantSource};
use crate::control::slot::SlotControl;
use crate::control::telemetry::{sampler_for, Sampling};
use crate::control::Routing;
use crate::error::{Error, Result};
use crate::model::kv::{KvShape, BLOCK_SIZE};
use crate::model::AdapterRegistry;
use crate::model::KvCache;
use crate::{config as paths, fetch};
use arqon_variants::Catalog;
use metrics::Metrics;
use scheduler::{EngineParts, SchedulerHandle};
use validate::{Capacity, Preprocessor};

/// What exists once the model is loaded.
#[derive(Debug, Clone)]
pub struct Serving {
    /// The engine thread's queue.
    pub scheduler: SchedulerHandle,
    /// Tokenizer and chat template for the handlers' blocking threads.
    pub pre: Arc<Preprocessor>,
    /// Admission facts.
    pub cap: Arc<Capacity>,
    /// The control thread: variants, executor, audit log.
    pub governor: GovernorHandle,
    /// LoRA adapters requests may name as `base:NAME` (hot load and unload).
    pub adapters: Arc<AdapterRegistry>,
}

/// State shared by every handler.
#[derive(Debug)]
pub struct AppState {
    /// The model id clients use.
    pub model_id: String,
    /// Server start, Unix seconds.
    pub created: u64,
    /// Required bearer token.
    pub api_key: Option<String>,
    /// Bearer token of the admin API (`None`: admin routes answer 403).
    pub admin_token: Option<String>,
    /// Largest body.
    pub body_limit: usize,
    /// Set once the model is loaded.
    pub serving: OnceLock<Serving>,
    /// Set on SIGTERM/SIGINT: new generation requests get 503.
    pub draining: AtomicBool,
    /// Generation requests not yet fully answered.
    in_flight: Arc<AtomicUsize>,
    /// Response ids.
    pub next_id: AtomicU64,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// Counts a generation request as in flight until dropped (with the
/// response, or with the stream for SSE).
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl AppState {
    /// Marks one more request in flight.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.in_flight.clone())
    }
}

/// Runs `arqon serve` until SIGTERM/SIGINT. Blocks the calling thread.
pub fn run(args: ServeArgs) -> Result<()> {
    let cfg = args.into_config()?;
    // Before binding: a device that cannot be used is one error line, not a
    // server that listens and then fails to load.
    let device = crate::device::open(cfg.device)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("arqon-http")
        .build()
        .map_err(|e| Error::Server(format!("cannot start the async runtime: {e}")))?;
    let result = rt.block_on(serve(cfg, device));
    // Streams still open past the deadline are cut here.
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

/// What [`variant_infos`] found: the servable variants, the one to start on,
/// and the catalog's kernel plan for this SKU.
type Servable = (Vec<VariantInfo>, Option<String>, Option<arqon_kernels::KernelPlan>);

/// The servable variants: a catalog's approved entries for this SKU, or the
/// model given with `--model` as the one variant `base`; the one to start on;
/// and the kernel plan the catalog measured on this SKU, if any.
fn variant_infos(cfg: &ServeConfig, device: &Device) -> Result<Servable> {
    if let Some(file) = &cfg.tuning.catalog {
        let catalog = Arc::new(Catalog::load(file)?);
        let dir = file.parent().unwrap_or(std::path::Path::new(".")).to_path_buf();
        let sku = crate::device::sku(device);
        let infos = catalog_infos(catalog.clone(), &dir, &sku);
        if infos.is_empty() {
            return Err(Error::variant(
                "-",
                format!("{}: no approved variant for this machine's SKU {sku}", file.display()),
            ));
        }
        let first = cfg.tuning.variant.clone().or_else(|| catalog.default_variant.clone());
        return Ok((infos, first, catalog.kernel_plan_for(&sku)));
    }
    let path = fetch::resolve(&cfg.model, &paths::fetch_options(cfg.home.clone(), true))?;
    let base = VariantInfo {
        name: "base".into(),
        quantization: "as-file".into(),
        depth: cfg.tuning.depth,
        bytes: disk_bytes(&path),
        listing: serde_json::json!({"source": path}),
        source: VariantSource::Model(path),
    };
    Ok((vec![base], cfg.tuning.variant.clone(), None))
}

/// Sets the process's kernel plan: `--kernel-plan`, else the catalog's for
/// this SKU, else none (the built-in choices). A flag this machine cannot run
/// is an error; a catalog plan that cannot run here (a coarse CPU SKU name
/// shared by CPUs with different SIMD) is a warning, and the built-in choices
/// run. Returns the plan in force and where it came from.
fn apply_kernel_plan(
    flag: Option<arqon_kernels::KernelPlan>,
    catalog: Option<arqon_kernels::KernelPlan>,
) -> Result<(arqon_kernels::KernelPlan, &'static str)> {
    use crate::model::plan::set_kernel_plan;
    if let Some(p) = flag {
        set_kernel_plan(p)?;
        return Ok((p, "flag"));
    }
    if let Some(p) = catalog {
        match set_kernel_plan(p) {
            Ok(()) => return Ok((p, "catalog")),
            Err(e) => eprintln!(
                "arqon: warning: the catalog's kernel plan ({p}) cannot run here: {e}; running the built-in choices"
            ),
        }
    }
    Ok((arqon_kernels::KernelPlan::default(), "default"))
}

/// Loads the first variant onto `device`, starts the governor, the device
/// telemetry sampler and the engine thread.
fn load(cfg: &ServeConfig, device: &Device, metrics: Arc<Metrics>) -> Result<Serving> {
    let t0 = Instant::now();
    let (infos, first, catalog_plan) = variant_infos(cfg, device)?;
    let (plan, plan_source) = apply_kernel_plan(cfg.kernel_plan, catalog_plan)?;
    eprintln!("arqon: kernel plan {plan} ({plan_source})");
    let _ = metrics.kernel_plan.set((plan.to_string(), plan_source));
    let n = infos.len();
    let mut set = VariantSet::new(infos, cfg.tuning.memory_budget, device.clone())?;
    let first = match &first {
        Some(name) => set.id_of(name).ok_or_else(|| {
            let known: Vec<&str> = set.infos().iter().map(|i| i.name.as_str()).collect();
            Error::variant(name, format!("not servable here; servable variants: {}", known.join(", ")))
        })?,
        None => arqon_tuner::VariantId(0),
    };
    let (pin, parts) = set.load_first(first)?;
    let mc = pin.model.config().clone();
    let source = pin.source.clone();
    let pre = Preprocessor { tokenizer: parts.tokenizer.clone(), chat: parts.chat };
    let model_ctx = mc.max_position_embeddings;
    let context = cfg.limits.max_context.map_or(model_ctx, |c| c.min(model_ctx));
    // The cache outlives variant swaps: a variant in another dtype converts
    // its keys on the way in and out.
    let dtype = cfg.limits.kv_cache_dtype.resolve(&pin.model)?;
    let kv = KvShape {
        layers: mc.num_layers,
        q_heads: mc.num_heads,
        kv_heads: mc.num_kv_heads,
        head_dim: mc.head_dim,
        max_len: model_ctx,
        dtype,
    };
    let (kv_blocks, kv_how) = kv_pool_blocks(&cfg.limits, kv, context, device, pin.model.kv_in_tensors())?;
    let mut kv_cache = if pin.model.paged_attention() {
        KvCache::for_paged_op(kv, kv_blocks, device.clone())?
    } else {
        KvCache::new(kv, kv_blocks, device.clone())?
    };
    if cfg.limits.prefix_caching {
        kv_cache.enable_prefix_caching();
    }
    let cap = Capacity { context, kv, kv_blocks, vocab: pre.tokenizer.vocab_size(), limits: cfg.limits.clone() };
    metrics.kv_budget_bytes.set(kv_blocks as u64 * kv.block_bytes());
    metrics.kv_blocks_total.set(kv_blocks as u64);
    let adapters = Arc::new(AdapterRegistry::new(mc.clone(), device.clone()));
    for (name, dir) in &cfg.adapters {
        adapters.load(name, dir)?;
        eprintln!("arqon: adapter {name} loaded from {} (serve it as {}:{name})", dir.display(), cfg.model_id);
    }

    let initial = Config::defaults(&serving_space(), first);
    let slot = Arc::new(Slot::new(Routing { active: pin, canary: None, config: initial }));
    let telemetry = Arc::new(TelemetryRing::new(1 << 16).map_err(|e| Error::Server(format!("telemetry ring: {e}")))?);
    let home = cfg.home.clone().unwrap_or_else(paths::default_home);
    let audit_log = cfg.tuning.audit_log.clone().unwrap_or_else(|| {
        home.join("audit").join(format!("serve-{}-{}.jsonl", routes::unix_now(), std::process::id()))
    });
    let settings = GovernorSettings {
        guard: cfg.tuning.guard(n),
        window: cfg.tuning.window,
        audit_log,
        fsync: FsyncPolicy::EveryN(64),
    };
    let control = SlotControl::new(slot.clone(), set, initial);
    let governor = governor::spawn(settings, control, telemetry.clone())?;
    let sampling = match sampler_for(device) {
        Ok(s) => Sampling::new(s, telemetry.clone(), metrics.device.clone()),
        Err(why) => Sampling::missing(&why, telemetry.clone(), metrics.device.clone()),
    };
    sampling.spawn(cfg.tuning.window).map_err(|e| Error::Server(format!("cannot start the telemetry thread: {e}")))?;
    let parts = EngineParts { kv: kv_cache, tokenizer: parts.tokenizer, slot, telemetry };
    let (scheduler, _thread) = scheduler::spawn(parts, cap.clone(), metrics)
        .map_err(|e| Error::Server(format!("cannot start the engine thread: {e}")))?;
    eprintln!(
        "arqon: loaded {} on {} in {:.1}s (context {context}, max batch {}, KV cache {kv_blocks} blocks of {} tokens = \
         {} tokens in {} MiB of {}, {kv_how}; audit log {})",
        source.display(),
        crate::device::describe(device),
        t0.elapsed().as_secs_f64(),
        cfg.limits.max_batch,
        BLOCK_SIZE,
        kv_blocks * BLOCK_SIZE,
        (kv_blocks as u64 * kv.block_bytes()) >> 20,
        dtype.as_str(),
        governor.view().audit_log.display(),
    );
    Ok(Serving { scheduler, pre: Arc::new(pre), cap: Arc::new(cap), governor, adapters })
}

/// Blocks of the server's paged KV cache, and how their number was chosen
/// (for the start-up line): `--kv-cache-mb` exactly, or else a share of the
/// memory free now (the first variant loaded), capped at `max_batch` full
/// contexts, which is the most the batch could ever hold. Tensor pools keep
/// room for a step's rotated queries next to each layer's blocks
/// ([`KvShape::query_room_bytes`]); it comes out of the same bytes.
fn kv_pool_blocks(
    limits: &Limits,
    kv: KvShape,
    context: usize,
    device: &Device,
    tensor_pools: bool,
) -> Result<(usize, String)> {
    let block = kv.block_bytes();
    let room = if tensor_pools { kv.query_room_bytes() } else { 0 };
    let (bytes, mut how) = match limits.kv_cache {
        KvSizing::Fixed(b) => (b.0.saturating_sub(room), "--kv-cache-mb".to_string()),
        KvSizing::FreeShare(share) => {
            let share = share.unwrap_or_else(|| KvSizing::default_share(!device.is_cpu()));
            let free = crate::device::free_memory(device)?;
            let most = (limits.max_batch * KvShape::blocks_for(context)) as u64 * block;
            let bytes = ((free as f64 * share) as u64).saturating_sub(room).min(most);
            let capped = if bytes == most { ", capped at max batch × context" } else { "" };
            (bytes, format!("{share} of {} MiB free{capped}", free >> 20))
        }
    };
    if room > 0 {
        how.push_str(&format!(", {} KiB of it room for a step's queries", room.div_ceil(1024)));
    }
    let blocks = usize::try_from(bytes / block).unwrap_or(usize::MAX);
    if blocks == 0 {
        return Err(Error::InvalidRequest(format!(
            "a KV cache of {bytes} bytes ({how}) holds no block: one block of {BLOCK_SIZE} tokens takes {block} bytes"
        )));
    }
    Ok((blocks, how))
}

async fn serve(cfg: ServeConfig, device: Device) -> Result<()> {
    let device_name = crate::device::describe(&device);
    let server_err = |what: &str, e: std::io::Error| Error::Server(format!("{what}: {e}"));
    let listener = tokio::net::TcpListener::bind(cfg.addr).await.map_err(|e| server_err("cannot listen", e))?;
    let addr = listener.local_addr().map_err(|e| server_err("local address", e))?;
    let metrics = Arc::new(Metrics::default());
    let app = Arc::new(AppState {
        model_id: cfg.model_id.clone(),
        created: routes::unix_now(),
        api_key: cfg.api_key.clone(),
        admin_token: cfg.tuning.admin_token.clone(),
        body_limit: cfg.limits.max_body_bytes,
        serving: OnceLock::new(),
        draining: AtomicBool::new(false),
        in_flight: Arc::new(AtomicUsize::new(0)),
        next_id: AtomicU64::new(0),
        metrics: metrics.clone(),
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, routes::router(app.clone())).with_graceful_shutdown(async move {
        let _ = stop_rx.await;
    });
    let server = tokio::spawn(std::future::IntoFuture::into_future(server));
    eprintln!("arqon: listening on http://{addr}");

    let loading = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || load(&cfg, &device, metrics))
    };
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let mut device_lost = None;
    let loaded = tokio::select! {
        r = loading => Some(r.map_err(|e| Error::Server(format!("loader task: {e}")))?),
        _ = &mut signal => None,
    };
    match loaded {
        Some(Ok(serving)) => {
            let _ = app.serving.set(serving);
            eprintln!("arqon: ready");
            // Until a signal, or until the engine finds the device lost (nothing will run on it again).
            let lost = async {
                loop {
                    if let Some(why) = app.metrics.device_lost.get() {
                        break why.clone();
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            };
            tokio::select! {
                _ = &mut signal => {}
                why = lost => {
                    eprintln!("arqon: the device is lost ({why}): draining, then exiting with an error");
                    device_lost = Some(why);
                }
            }
        }
        Some(Err(e)) => {
            let _ = stop_tx.send(());
            return Err(e);
        }
        None => {}
    }

    // Drain: refuse new work, let in-flight requests finish up to the deadline.
    app.draining.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + cfg.shutdown_timeout;
    eprintln!(
        "arqon: shutting down: {} request(s) in flight, waiting up to {}s",
        app.in_flight.load(Ordering::SeqCst),
        cfg.shutdown_timeout.as_secs()
    );
    while app.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(());
    let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
    match tokio::time::timeout(left, server).await {
        Ok(Ok(Ok(()))) => eprintln!("arqon: stopped"),
        Ok(Ok(Err(e))) => return Err(server_err("server", e)),
        Ok(Err(e)) => return Err(Error::Server(format!("server task: {e}"))),
        Err(_) => eprintln!("arqon: stopped at the deadline with requests still open"),
    }
    match device_lost {
        Some(why) => Err(Error::Device { device: device_name, reason: format!("lost: {why}") }),
        None => Ok(()),
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
