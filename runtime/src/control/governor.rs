//! The governor: the control thread that runs the tuner's guardrail executor
//! for `arqon serve`.
//!
//! Purpose: every change to what serves traffic goes through here. Operator
//! commands from the admin API ([`Command`]) become executor inputs (an
//! activation is a tier-1 operator *proposal*, validated like any other);
//! telemetry the scheduler pushes into the lock-free ring is folded into
//! windows whose health summaries drive the canary ramp and automatic
//! rollback; the `Driver` carries decisions out through [`SlotControl`] and
//! appends every input and decision to the hash-chained audit log, so
//! `Executor::replay` of the log rebuilds the executor's state.
//!
//! Usage: [`spawn`] returns a [`GovernorHandle`]; handlers call
//! [`GovernorHandle::command`] and read [`GovernorHandle::view`] (a snapshot
//! republished after every input, through an `ArcSwap`).
//!
//! The thread never runs on the hot path: the scheduler only pushes
//! telemetry (`try_push`, never blocks) and reads the slot.
//!
//! Device telemetry arrives in the same ring from the sampler thread of
//! [`super::telemetry`] (host memory on the CPU, NVML on a GPU, every half
//! window). If sampling fails, no sample is sent and the executor's
//! missing-telemetry rules apply.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use arqon_tuner::audit::{AuditLog, FsyncPolicy};
use arqon_tuner::executor::{
    Counters, Driver, GuardConfig, OperatorAction, OperatorCommand, Phase, ServingControl, Verdict,
};
use arqon_tuner::governance::{
    ChangeKind, Constraints, ExpectedImpact, Governance, OperatorId, Proposal, Risk, RollbackPlan, Tier, TraceId,
};
use arqon_tuner::summary::Summarizer;
use arqon_tuner::telemetry::{RingStats, TelemetryRing};
use arqon_tuner::units::{Micros, Probability, Tick};
use arqon_tuner::{Decision, Executor, Input, Patch, VariantId};
use serde::Serialize;
use tokio::sync::oneshot;

use super::set::VariantInfo;
use super::slot::SlotControl;
use super::{VariantPin, VariantStats};
use crate::error::{Error, Result};

/// The operator id the admin API proposes as.
pub const ADMIN_OPERATOR: OperatorId = OperatorId { id: 1, version: 1 };

/// What the governor is configured with.
#[derive(Debug, Clone)]
pub struct GovernorSettings {
    /// The executor's rules.
    pub guard: GuardConfig,
    /// Telemetry window.
    pub window: Micros,
    /// The audit log (created if missing; an existing log is recovered).
    pub audit_log: PathBuf,
    /// When the log syncs.
    pub fsync: FsyncPolicy,
}

/// An operator verb without payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verb {
    /// Kill switch: freeze adaptation and return to the baseline.
    Kill,
    /// Lift the kill switch.
    Resume,
    /// Abort the running experiment.
    Abort,
    /// Make the active configuration the baseline.
    SetBaseline,
}

/// A request to the governor.
#[derive(Debug)]
pub enum Command {
    /// Propose serving the named variant.
    Activate(String),
    /// An operator command.
    Operator(Verb),
}

/// What one command did.
#[derive(Debug, Clone, Serialize)]
pub struct CommandOutcome {
    /// The proposal's trace, for activations.
    pub trace: Option<u64>,
    /// The executor's decisions, in order.
    pub decisions: Vec<Decision>,
}

/// How an experiment ended.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Outcome {
    /// The proposal's trace.
    pub trace: u64,
    /// `promoted`, `rejected` or `rolled_back`.
    pub result: &'static str,
    /// Why, for rejections and rollbacks.
    pub reason: Option<String>,
}

/// One variant as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct VariantView {
    /// Catalog id.
    pub id: String,
    /// Number in the tuner's space.
    pub vid: u16,
    /// Quantization.
    pub quantization: String,
    /// Depth profile.
    pub depth: arqon_variants::DepthProfile,
    /// Loaded now.
    pub resident: bool,
    /// Serving the control share.
    pub active: bool,
    /// Share of new requests as canary, ‰.
    pub canary_permille: Option<u16>,
    /// Live counters (resident variants only; zero otherwise).
    pub requests: u64,
    /// Tokens generated.
    pub tokens: u64,
    /// Sequences running on it.
    pub running: u64,
    /// Weight bytes.
    pub weight_bytes: u64,
    /// The catalog entry.
    pub catalog: serde_json::Value,
}

/// The governor's published state.
#[derive(Debug, Clone, Serialize)]
pub struct GovernorView {
    /// The executor's phase.
    pub phase: Phase,
    /// Active variant id.
    pub active: String,
    /// Baseline variant id.
    pub baseline: String,
    /// The running experiment's trace.
    pub experiment: Option<u64>,
    /// Executor counters.
    pub counters: Counters,
    /// Stores into the slot.
    pub swaps: u64,
    /// The last decisions, oldest first.
    pub recent: Vec<Decision>,
    /// How recent experiments ended, oldest first.
    pub outcomes: Vec<Outcome>,
    /// Every servable variant.
    pub variants: Vec<VariantView>,
    /// Bytes of loaded variants (resident or draining).
    pub live_bytes: u64,
    /// The variant memory budget.
    pub budget_bytes: u64,
    /// The audit log.
    pub audit_log: PathBuf,
    /// Audit records written.
    pub audit_records: u64,
    /// Telemetry ring counters.
    pub telemetry: RingStats,
    /// The last error the governor met (audit log, runtime), if any.
    pub last_error: Option<String>,
    /// Whether the executor has fresh telemetry (proposals before the first
    /// telemetry window are rejected with `NoTelemetry`).
    pub telemetry_fresh: bool,
}

type Reply = oneshot::Sender<std::result::Result<CommandOutcome, String>>;

/// The handlers' side of the governor.
#[derive(Debug, Clone)]
pub struct GovernorHandle {
    tx: std_mpsc::Sender<(Command, Reply)>,
    view: Arc<ArcSwap<GovernorView>>,
}

impl GovernorHandle {
    /// Sends a command and waits for what it did. `Err` carries a message
    /// for the client (unknown variant, governor stopped).
    pub async fn command(&self, cmd: Command) -> std::result::Result<CommandOutcome, String> {
        let (tx, rx) = oneshot::channel();
        self.tx.send((cmd, tx)).map_err(|_| "the governor has stopped".to_string())?;
        rx.await.map_err(|_| "the governor has stopped".to_string())?
    }

    /// The latest published state.
    pub fn view(&self) -> Arc<GovernorView> {
        self.view.load_full()
    }
}

/// Microseconds since the Unix epoch: ticks stay monotone across restarts,
/// so a recovered audit log continues in order.
pub fn now_tick() -> Tick {
    Tick(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64))
}

struct Governor {
    driver: Driver<SlotControl>,
    ring: Arc<TelemetryRing>,
    summarizer: Summarizer,
    window: Micros,
    view: Arc<ArcSwap<GovernorView>>,
    recent: VecDeque<Decision>,
    outcomes: VecDeque<Outcome>,
    last_error: Option<String>,
    next_trace: u64,
    last_input: Tick,
}

const RECENT: usize = 64;

/// Starts the governor thread over `control`, reading telemetry from `ring`.
pub fn spawn(settings: GovernorSettings, control: SlotControl, ring: Arc<TelemetryRing>) -> Result<GovernorHandle> {
    let at = now_tick();
    let err = |e: arqon_tuner::TunerError| Error::Server(format!("tuner: {e}"));
    let has_log = std::fs::metadata(&settings.audit_log).is_ok_and(|m| m.len() > 0);
    if let Some(dir) = settings.audit_log.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::load(dir, format!("cannot create the audit log folder: {e}")))?;
    }
    let driver = if has_log {
        let (d, report) = Driver::recover(&settings.audit_log, settings.fsync, control, at).map_err(err)?;
        eprintln!("arqon: recovered the audit log {} ({report:?})", settings.audit_log.display());
        d
    } else {
        let active = control.active();
        let exec = Executor::new(settings.guard.clone(), active, at).map_err(err)?;
        let log = AuditLog::open(&settings.audit_log, settings.fsync).map_err(err)?;
        Driver::new(exec, control, Some(log)).map_err(err)?
    };
    let summarizer = Summarizer::new(settings.window).map_err(err)?;
    let (tx, rx) = std_mpsc::channel::<(Command, Reply)>();
    let g = Governor {
        driver,
        ring,
        summarizer,
        window: settings.window,
        view: Arc::new(ArcSwap::from_pointee(placeholder_view(&settings))),
        recent: VecDeque::with_capacity(RECENT),
        outcomes: VecDeque::with_capacity(RECENT),
        last_error: None,
        next_trace: at.0,
        last_input: at,
    };
    g.publish();
    let handle = GovernorHandle { tx, view: g.view.clone() };
    std::thread::Builder::new()
        .name("arqon-governor".into())
        .spawn(move || g.run(rx))
        .map_err(|e| Error::Server(format!("cannot start the governor thread: {e}")))?;
    Ok(handle)
}

fn placeholder_view(s: &GovernorSettings) -> GovernorView {
    GovernorView {
        phase: Phase::Idle,
        active: String::new(),
        baseline: String::new(),
        experiment: None,
        counters: Counters::default(),
        swaps: 0,
        recent: Vec::new(),
        outcomes: Vec::new(),
        variants: Vec::new(),
        live_bytes: 0,
        budget_bytes: 0,
        audit_log: s.audit_log.clone(),
        audit_records: 0,
        telemetry: RingStats::default(),
        last_error: None,
        telemetry_fresh: false,
    }
}

impl Governor {
    fn run(mut self, rx: std_mpsc::Receiver<(Command, Reply)>) {
        let poll = Duration::from_micros((self.window.0 / 4).clamp(2_000, 250_000));
        let mut windows = Vec::new();
        loop {
            match rx.recv_timeout(poll) {
                Ok((cmd, reply)) => {
                    let out = self.command(cmd);
                    let _ = reply.send(out);
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            }
            let now = now_tick();
            if let Err(e) = self.summarizer.drain(&self.ring, &mut windows) {
                self.last_error = Some(format!("telemetry: {e}"));
            }
            self.summarizer.close_until(now, &mut windows);
            let closed = !windows.is_empty();
            for w in windows.drain(..) {
                self.input(now, Input::Telemetry(w.health()));
            }
            if !closed && now.since(self.last_input).0 >= self.window.0 {
                self.input(now, Input::Tick);
            }
            self.publish();
        }
    }

    fn command(&mut self, cmd: Command) -> std::result::Result<CommandOutcome, String> {
        let now = now_tick();
        let (trace, input) = match cmd {
            Command::Activate(name) => {
                let vid = self.driver.control().set().id_of(&name).ok_or_else(|| {
                    let known: Vec<&str> =
                        self.driver.control().set().infos().iter().map(|i| i.name.as_str()).collect();
                    format!("unknown variant {name:?}; servable variants: {}", known.join(", "))
                })?;
                self.next_trace = self.next_trace.max(now.0) + 1;
                let trace = self.next_trace;
                (Some(trace), Input::Propose(self.activation(vid, TraceId(trace))))
            }
            Command::Operator(v) => {
                let action = match v {
                    Verb::Kill => OperatorAction::Kill,
                    Verb::Resume => OperatorAction::Resume,
                    Verb::Abort => OperatorAction::Abort,
                    Verb::SetBaseline => OperatorAction::SetBaseline,
                };
                (None, Input::Operator(OperatorCommand { operator: ADMIN_OPERATOR, action }))
            }
        };
        let decisions = self.input(now, input);
        self.publish();
        Ok(CommandOutcome { trace, decisions })
    }

    /// An operator's proposal to serve `vid`: tier 1, low risk, roll back to
    /// the previous configuration on a breach.
    fn activation(&self, vid: VariantId, trace: TraceId) -> Proposal {
        let guard = self.driver.executor().guard();
        let meta = Governance {
            operator: ADMIN_OPERATOR,
            tier: Tier::One,
            risk: Risk::Low,
            scope: guard.scope,
            target: guard.target,
            kind: ChangeKind::Structure,
            constraints: Constraints::default(),
            expected: ExpectedImpact {
                reward_delta: 0.0,
                confidence: Probability::new(0.5).unwrap_or_else(|_| unreachable!("0.5 is a probability")),
            },
            rollback: RollbackPlan::Previous,
            approval_required: false,
            trace,
        };
        Proposal { meta, patch: Patch::variant(vid) }
    }

    /// Feeds one input through the driver; records decisions and outcomes.
    fn input(&mut self, at: Tick, input: Input) -> Vec<Decision> {
        self.last_input = at;
        let decisions = match self.driver.handle(at, input) {
            Ok(d) => d.to_vec(),
            Err(e) => {
                // The driver does not carry out an unlogged decision.
                tracing::error!(error = %e, "audit log write failed; the decision was not applied");
                self.last_error = Some(format!("audit log: {e}"));
                return Vec::new();
            }
        };
        for d in &decisions {
            if self.recent.len() == RECENT {
                self.recent.pop_front();
            }
            self.recent.push_back(*d);
            let Some(trace) = d.trace else { continue };
            let outcome = match d.verdict {
                Verdict::Promoted => Some(("promoted", None)),
                Verdict::Rejected(r) => Some(("rejected", Some(format!("{r:?}")))),
                Verdict::RollingBack(r) => {
                    let detail = self.driver.control_mut().take_error();
                    Some(("rolled_back", Some(detail.map_or(format!("{r:?}"), |e| format!("{r:?}: {e}")))))
                }
                _ => None,
            };
            if let Some((result, reason)) = outcome {
                if self.outcomes.len() == RECENT {
                    self.outcomes.pop_front();
                }
                self.outcomes.push_back(Outcome { trace: trace.0, result, reason });
            }
        }
        decisions
    }

    fn publish(&self) {
        let exec = self.driver.executor();
        let control = self.driver.control();
        let set = control.set();
        let routing = control.slot().load();
        let name = |v: VariantId| set.info(v).map_or_else(|_| format!("#{}", v.0), |i| i.name.clone());
        let variants = set
            .infos()
            .iter()
            .enumerate()
            .map(|(i, info)| {
                let vid = VariantId(i as u16);
                let canary = routing.canary.as_ref().filter(|(p, _)| p.vid == vid).map(|(_, f)| f.permille());
                variant_view(info, vid, set.resident(vid), routing.active.vid == vid, canary)
            })
            .collect();
        let experiment = match exec.state().phase {
            Phase::Staging { exp } | Phase::Canary { exp, .. } => Some(exp.meta.trace.0),
            _ => None,
        };
        self.view.store(Arc::new(GovernorView {
            phase: exec.state().phase,
            active: name(exec.active().variant),
            baseline: name(exec.baseline().variant),
            experiment,
            counters: exec.state().counters,
            swaps: control.swaps(),
            recent: self.recent.iter().copied().collect(),
            outcomes: self.outcomes.iter().cloned().collect(),
            variants,
            live_bytes: set.live_bytes(),
            budget_bytes: set.budget(),
            audit_log: self.driver.log().map(|l| l.path().to_path_buf()).unwrap_or_default(),
            audit_records: self.driver.log().map_or(0, |l| l.next_seq().0),
            telemetry: self.ring.stats(),
            last_error: self.last_error.clone(),
            telemetry_fresh: exec.state().last_telemetry.is_some() && !exec.state().stale,
        }));
    }
}

fn variant_view(
    info: &VariantInfo,
    vid: VariantId,
    pin: Option<VariantPin>,
    active: bool,
    canary_permille: Option<u16>,
) -> VariantView {
    let get = |f: fn(&VariantStats) -> &std::sync::atomic::AtomicU64| {
        pin.as_ref().map_or(0, |p| f(&p.stats).load(std::sync::atomic::Ordering::Relaxed))
    };
    VariantView {
        id: info.name.clone(),
        vid: vid.0,
        quantization: info.quantization.clone(),
        depth: info.depth,
        resident: pin.is_some(),
        active,
        canary_permille,
        requests: get(|s| &s.requests),
        tokens: get(|s| &s.tokens),
        running: get(|s| &s.running),
        weight_bytes: info.bytes,
        catalog: info.listing.clone(),
    }
}
