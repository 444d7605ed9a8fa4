//! Crash and corruption tests of the audit log, and replay through the driver.

use std::fs;
use std::path::Path;

use arqon_tuner::audit::{self, AuditLog, FsyncPolicy, Record};
use arqon_tuner::error::CorruptReason;
use arqon_tuner::executor::{Driver, Executor, GuardConfig, Phase, RollbackReason, Slo, Verdict};
use arqon_tuner::governance::{ChangeKind, Governance, OperatorId, Proposal, Scope, TargetId, TraceId};
use arqon_tuner::knobs::{Config, KnobId, KnobSpace, KnobValue, Patch, VariantId};
use arqon_tuner::sim::{LoadProfile, ServingModel, SimRuntime};
use arqon_tuner::summary::{CohortHealth, HealthSummary};
use arqon_tuner::units::{Micros, Permille, Tick};
use arqon_tuner::{Input, TunerError};

const SEC: u64 = 1_000_000;

fn guard() -> GuardConfig {
    let slo = Slo {
        ttft_p99: Micros::from_millis(400),
        itl_p99: Micros::from_millis(80),
        max_error_rate: Permille::new(20).unwrap(),
        max_mem: Permille::new(950).unwrap(),
    };
    let mut g = GuardConfig::new(Scope::Prod, TargetId(1), KnobSpace::unit_cube(2).unwrap(), slo);
    g.variants = vec![VariantId(0), VariantId(2), VariantId(3)];
    g.canary.min_windows = 1;
    g.canary.min_samples = 10;
    g
}

fn runtime(initial: Config) -> SimRuntime {
    SimRuntime::new(ServingModel::catalog(), LoadProfile::constant(0.3), initial, None, 1)
}

fn healthy(s: u64) -> Input {
    let c =
        CohortHealth { requests: 200, errors: 0, ttft_p99: Micros::from_millis(100), itl_p99: Micros::from_millis(20) };
    Input::Telemetry(HealthSummary {
        start: Tick(s * SEC),
        end: Tick((s + 1) * SEC),
        control: c,
        canary: c,
        mem_share: Permille::new(500).unwrap(),
        device_samples: 1,
        dropped: 0,
    })
}

fn propose(trace: u64, patch: Patch, kind: ChangeKind) -> Input {
    Input::Propose(Proposal {
        meta: Governance::tier2(OperatorId { id: 1, version: 1 }, Scope::Prod, TargetId(1), kind, TraceId(trace)),
        patch,
    })
}

/// Writes a log with a promotion, a rejection and a canary left in flight.
fn write_log(path: &Path) -> Driver<SimRuntime> {
    let g = guard();
    let initial = Config::defaults(&g.space, VariantId(0));
    let exec = Executor::new(g, initial, Tick(0)).unwrap();
    let log = AuditLog::open(path, FsyncPolicy::EveryRecord).unwrap();
    let mut d = Driver::new(exec, runtime(initial), Some(log)).unwrap();
    d.handle(Tick(SEC), healthy(0)).unwrap();
    d.handle(Tick(SEC), propose(1, Patch::knob(KnobId(0), KnobValue::Continuous(0.55)), ChangeKind::Knob)).unwrap();
    for s in 1..12 {
        d.handle(Tick((s + 1) * SEC), healthy(s)).unwrap();
    }
    assert_eq!(d.executor().state().counters.promotions, 1);
    d.handle(Tick(13 * SEC), propose(2, Patch::variant(VariantId(1)), ChangeKind::Structure)).unwrap();
    d.handle(Tick(13 * SEC), propose(3, Patch::variant(VariantId(2)), ChangeKind::Structure)).unwrap();
    d.handle(Tick(14 * SEC), healthy(13)).unwrap();
    assert!(matches!(d.executor().state().phase, Phase::Canary { .. }));
    d
}

fn line_starts(bytes: &[u8]) -> Vec<usize> {
    let mut starts = vec![0];
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'\n' && i + 1 < bytes.len() {
            starts.push(i + 1);
        }
    }
    starts
}

#[test]
fn replay_rebuilds_the_live_executor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    let d = write_log(&path);
    let (records, report) = audit::recover(&path).unwrap();
    assert!(report.torn.is_none());
    assert_eq!(report.records, d.log().unwrap().next_seq().0);
    assert!(matches!(records[0], Record::Genesis { .. }));
    assert_eq!(&Executor::replay(&records).unwrap(), d.executor());
}

#[test]
fn truncation_at_every_offset_of_the_last_record_keeps_every_complete_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    drop(write_log(&path));
    let full = fs::read(&path).unwrap();
    let (all, _) = audit::recover(&path).unwrap();
    let last_start = *line_starts(&full).last().unwrap();
    let cut = dir.path().join("cut.jsonl");
    for len in last_start..=full.len() {
        fs::write(&cut, &full[..len]).unwrap();
        let (records, report) = audit::recover(&cut).unwrap();
        // The last record survives only if its JSON is complete (with or
        // without the newline); everything before it always survives.
        let complete = len >= full.len() - 1;
        let expect = if complete { all.len() } else { all.len() - 1 };
        assert_eq!(records.len(), expect, "cut at {len}");
        assert_eq!(&records[..], &all[..expect]);
        assert_eq!(report.torn.is_some(), !complete && len > last_start, "cut at {len}");
        assert_eq!(report.valid_len as usize, if complete { len } else { last_start });
        assert_eq!(report.unterminated_last, len == full.len() - 1);
    }
}

#[test]
fn reopening_a_torn_log_truncates_and_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    drop(write_log(&path));
    let full = fs::read(&path).unwrap();
    let last_start = *line_starts(&full).last().unwrap();
    fs::write(&path, &full[..last_start + 17]).unwrap();
    let (before, _) = audit::recover(&path).unwrap();
    let mut log = AuditLog::open(&path, FsyncPolicy::EveryRecord).unwrap();
    assert!(log.recovery().torn.is_some());
    assert_eq!(log.next_seq().0, before.len() as u64);
    log.append(&Record::Input { at: Tick(99 * SEC), input: Input::Tick }).unwrap();
    drop(log);
    let (after, report) = audit::recover(&path).unwrap();
    assert!(report.torn.is_none());
    assert_eq!(after.len(), before.len() + 1);
}

#[test]
fn unterminated_complete_last_line_is_kept_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    drop(write_log(&path));
    let full = fs::read(&path).unwrap();
    fs::write(&path, &full[..full.len() - 1]).unwrap();
    let n = audit::recover(&path).unwrap().0.len();
    let mut log = AuditLog::open(&path, FsyncPolicy::Never).unwrap();
    log.append(&Record::Input { at: Tick(99 * SEC), input: Input::Tick }).unwrap();
    drop(log);
    assert_eq!(audit::recover(&path).unwrap().0.len(), n + 1);
}

fn expect_corrupt(path: &Path, want_line: u64, want: CorruptReason) {
    match audit::recover(path) {
        Err(TunerError::AuditCorrupt { line, reason, .. }) => {
            assert_eq!((line, reason), (want_line, want));
        }
        other => panic!("expected corruption at line {want_line}, got {other:?}"),
    }
    assert!(AuditLog::open(path, FsyncPolicy::Never).is_err(), "a corrupt log must not be reopened");
}

#[test]
fn corrupt_middle_lines_are_reported_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    drop(write_log(&path));
    let full = fs::read(&path).unwrap();
    let starts = line_starts(&full);
    let bad = dir.path().join("bad.jsonl");

    // A flipped byte inside line 4's record: the hash no longer matches.
    let mut b = full.clone();
    let line = &full[starts[3]..starts[4]];
    let rec = line.windows(9).position(|w| w == b"\"record\":").unwrap();
    let i = starts[3] + rec + line[rec..].iter().position(|c| c.is_ascii_digit()).unwrap();
    b[i] = if b[i] == b'1' { b'2' } else { b'1' };
    fs::write(&bad, &b).unwrap();
    expect_corrupt(&bad, 4, CorruptReason::BadHash);

    // Line 3 deleted: line 4 arrives with the wrong sequence number.
    let mut b = full[..starts[2]].to_vec();
    b.extend_from_slice(&full[starts[3]..]);
    fs::write(&bad, &b).unwrap();
    expect_corrupt(&bad, 3, CorruptReason::BadSequence);

    // Garbage in the middle.
    let mut b = full[..starts[5]].to_vec();
    b.extend_from_slice(b"{not json}\n");
    b.extend_from_slice(&full[starts[5]..]);
    fs::write(&bad, &b).unwrap();
    expect_corrupt(&bad, 6, CorruptReason::BadJson);
}

#[test]
fn driver_recovers_and_rolls_back_the_in_flight_canary() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    let live = write_log(&path);
    let base = *live.executor().active();
    let runtime_state = live.control().clone();
    drop(live);
    // Crash mid-append of the next record.
    let mut f = fs::read(&path).unwrap();
    f.extend_from_slice(b"{\"seq\":999,\"prev\":\"00");
    fs::write(&path, &f).unwrap();
    let (d, report) = Driver::recover(&path, FsyncPolicy::EveryRecord, runtime_state, Tick(20 * SEC)).unwrap();
    assert!(report.torn.is_some());
    assert_eq!(d.executor().state().phase, Phase::Idle);
    assert_eq!(d.executor().active(), &base);
    assert_eq!(d.control().canary(), None);
    let c = d.executor().state().counters;
    assert_eq!(c.rollbacks, 1);
    // The recovery itself was logged: replay still matches.
    let (records, _) = audit::recover(&path).unwrap();
    let replayed = Executor::replay(&records).unwrap();
    assert_eq!(&replayed, d.executor());
    let recovered = records
        .iter()
        .any(|r| matches!(r, Record::Decision(dec) if dec.verdict == Verdict::RollingBack(RollbackReason::Recovery)));
    assert!(recovered);
}

#[test]
fn replay_detects_a_tampered_decision() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    drop(write_log(&path));
    let (mut records, _) = audit::recover(&path).unwrap();
    let i = records.iter().position(|r| matches!(r, Record::Decision(d) if d.verdict == Verdict::Promoted)).unwrap();
    if let Record::Decision(d) = &mut records[i] {
        d.verdict = Verdict::Noted;
    }
    assert!(matches!(Executor::replay(&records), Err(TunerError::ReplayDivergence { .. })));
    assert!(matches!(Executor::replay(&records[1..]), Err(TunerError::ReplayDivergence { index: 0, .. })));
}
