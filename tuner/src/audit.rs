//! The event-sourced audit log: every executor input and decision as a
//! hash-chained JSON line.
//!
//! Purpose: an append-only record from which [`crate::Executor::replay`]
//! rebuilds the executor's state exactly, and from which an auditor can
//! prove nothing was edited: line *n* carries `seq = n`, the previous line's
//! hash, and `hash = SHA-256("{seq}:{prev}:{record}")` over the exact record
//! text written.
//!
//! Line format (one per record, `\n`-terminated):
//! `{"seq":N,"prev":"<64 hex>","hash":"<64 hex>","record":{...}}`.
//! The first record is [`Record::Genesis`] (the guard and initial config);
//! the chain starts from 64 zeros.
//!
//! Durability ([`FsyncPolicy`]): each record is written with one `write_all`
//! of the whole line. `append` returns — *acknowledges* — only after that
//! write and, under [`FsyncPolicy::EveryRecord`], after `sync_data`, so an
//! acknowledged record survives a process crash *and* power loss. Under
//! `EveryN(n)` up to `n - 1` acknowledged records may be lost on power loss
//! (never on a process crash: they are in the page cache); under `Never`
//! durability is the operating system's. Creating a log also syncs its
//! directory so the file itself survives.
//!
//! Recovery ([`recover`]): a crash can only tear the *last* line. A last line
//! that is incomplete or does not verify is dropped and reported in the
//! [`RecoveryReport`] (it was never acknowledged under `EveryRecord`); a last
//! line that is complete but lacks its `\n` is kept. Any bad line *before*
//! the last is corruption, not a crash: it is an error naming the line, never
//! skipped. [`AuditLog::open`] truncates a torn tail before appending.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::error::{AuditError, CorruptReason, TunerError};
use crate::executor::{Decision, GuardConfig, Input};
use crate::knobs::Config;
use crate::units::Tick;

/// What a line holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Record {
    /// First record: how the executor was built.
    Genesis {
        /// Creation time.
        at: Tick,
        /// The rules.
        guard: GuardConfig,
        /// The initial (baseline) configuration.
        initial: Config,
    },
    /// An input, logged before it is applied.
    Input {
        /// Its time.
        at: Tick,
        /// The input.
        input: Input,
    },
    /// The decision the preceding input produced.
    Decision(Decision),
}

/// A record's sequence number (0-based line index).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Seq(pub u64);

/// When `append` syncs to stable storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FsyncPolicy {
    /// `sync_data` before every acknowledgement: nothing acknowledged is lost.
    EveryRecord,
    /// `sync_data` every `n`th record (and on [`AuditLog::sync`]).
    EveryN(u32),
    /// Never sync explicitly (tests, benchmarks).
    Never,
}

/// A dropped torn tail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TornTail {
    /// 1-based line number of the dropped line.
    pub line: u64,
    /// Its length in bytes.
    pub bytes: u64,
    /// Why it did not verify.
    pub reason: String,
}

/// What recovery found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryReport {
    /// Complete, verified records.
    pub records: u64,
    /// Byte length of the verified prefix (where appending resumes).
    pub valid_len: u64,
    /// The torn last line, if one was dropped.
    pub torn: Option<TornTail>,
    /// The last kept line was complete but missing its newline.
    pub unterminated_last: bool,
    /// Hash of the last kept record (64 zeros if none).
    pub last_hash: String,
}

const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Deserialize)]
struct Envelope<'a> {
    seq: u64,
    prev: &'a str,
    hash: &'a str,
    #[serde(borrow)]
    record: &'a RawValue,
}

fn line_hash(seq: u64, prev: &str, record: &str) -> String {
    let mut h = Sha256::new();
    h.update(seq.to_string().as_bytes());
    h.update(b":");
    h.update(prev.as_bytes());
    h.update(b":");
    h.update(record.as_bytes());
    hex::encode(h.finalize())
}

fn verify(line: &[u8], seq: u64, prev: &str) -> Result<(Record, String), CorruptReason> {
    let text = std::str::from_utf8(line).map_err(|_| CorruptReason::BadJson)?;
    let env: Envelope<'_> = serde_json::from_str(text).map_err(|_| CorruptReason::BadJson)?;
    if env.seq != seq {
        return Err(CorruptReason::BadSequence);
    }
    if env.prev != prev {
        return Err(CorruptReason::BrokenChain);
    }
    let hash = line_hash(env.seq, env.prev, env.record.get());
    if hash != env.hash {
        return Err(CorruptReason::BadHash);
    }
    let record: Record = serde_json::from_str(env.record.get()).map_err(|_| CorruptReason::BadRecord)?;
    Ok((record, hash))
}

fn io_err(path: &Path, source: std::io::Error) -> TunerError {
    TunerError::AuditIo { path: path.to_path_buf(), source }
}

/// Reads and verifies the log at `path`. A torn last line is dropped and
/// reported; a bad line before the last is [`TunerError::AuditCorrupt`].
/// A missing file is an empty log.
pub fn recover(path: &Path) -> Result<(Vec<Record>, RecoveryReport), AuditError> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes).map_err(|e| io_err(path, e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(path, e)),
    }
    let mut records = Vec::new();
    let mut report = RecoveryReport { last_hash: ZERO_HASH.to_owned(), ..RecoveryReport::default() };
    let mut offset = 0usize;
    let mut line_no = 0u64;
    while offset < bytes.len() {
        line_no += 1;
        let rest = &bytes[offset..];
        let (line, terminated) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], true),
            None => (rest, false),
        };
        let consumed = line.len() + usize::from(terminated);
        let is_last = offset + consumed >= bytes.len();
        match verify(line, records.len() as u64, &report.last_hash) {
            Ok((record, hash)) => {
                records.push(record);
                report.last_hash = hash;
                offset += consumed;
                report.valid_len = offset as u64;
                report.unterminated_last = !terminated;
            }
            Err(reason) if is_last => {
                report.torn = Some(TornTail { line: line_no, bytes: line.len() as u64, reason: reason.to_string() });
                break;
            }
            Err(reason) => return Err(TunerError::AuditCorrupt { path: path.to_path_buf(), line: line_no, reason }),
        }
    }
    report.records = records.len() as u64;
    Ok((records, report))
}

/// An open, append-only, hash-chained log.
#[derive(Debug)]
pub struct AuditLog {
    file: File,
    path: PathBuf,
    next: u64,
    prev: String,
    policy: FsyncPolicy,
    unsynced: u32,
    line: Vec<u8>,
    recovery: RecoveryReport,
    poisoned: bool,
}

impl AuditLog {
    /// Opens (creating if needed) the log at `path`. An existing log is
    /// verified first: a torn tail is truncated away, a missing final newline
    /// restored, and a corrupt middle line refuses the open.
    pub fn open(path: &Path, policy: FsyncPolicy) -> Result<AuditLog, AuditError> {
        let existed = path.exists();
        let (_, recovery) = recover(path)?;
        let mut file =
            OpenOptions::new().create(true).read(true).append(true).open(path).map_err(|e| io_err(path, e))?;
        if existed {
            let len = file.metadata().map_err(|e| io_err(path, e))?.len();
            if len != recovery.valid_len {
                file.set_len(recovery.valid_len).map_err(|e| io_err(path, e))?;
            }
            if recovery.unterminated_last {
                file.write_all(b"\n").map_err(|e| io_err(path, e))?;
            }
            file.sync_all().map_err(|e| io_err(path, e))?;
        } else {
            file.sync_all().map_err(|e| io_err(path, e))?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                // Make the new directory entry durable too (best effort on
                // platforms that cannot open directories).
                if let Ok(d) = File::open(dir) {
                    let _ = d.sync_all();
                }
            }
        }
        Ok(AuditLog {
            file,
            path: path.to_path_buf(),
            next: recovery.records,
            prev: recovery.last_hash.clone(),
            policy,
            unsynced: 0,
            line: Vec::with_capacity(1024),
            recovery,
            poisoned: false,
        })
    }

    /// What `open` found in an existing log.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// The sequence number the next record will get.
    pub fn next_seq(&self) -> Seq {
        Seq(self.next)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `record`; returns its sequence number once acknowledged
    /// (written, and synced per the policy). After an I/O failure the log
    /// refuses further appends (the file may end in a torn line; reopen it
    /// to recover).
    pub fn append(&mut self, record: &Record) -> Result<Seq, AuditError> {
        if self.poisoned {
            return Err(io_err(&self.path, std::io::Error::other("audit log poisoned by an earlier I/O failure")));
        }
        let body = serde_json::to_string(record)?;
        let seq = self.next;
        let hash = line_hash(seq, &self.prev, &body);
        self.line.clear();
        writeln!(self.line, "{{\"seq\":{seq},\"prev\":\"{}\",\"hash\":\"{hash}\",\"record\":{body}}}", self.prev)
            .map_err(|e| io_err(&self.path, e))?;
        if let Err(e) = self.file.write_all(&self.line) {
            self.poisoned = true;
            return Err(io_err(&self.path, e));
        }
        self.unsynced += 1;
        let sync = match self.policy {
            FsyncPolicy::EveryRecord => true,
            FsyncPolicy::EveryN(n) => self.unsynced >= n.max(1),
            FsyncPolicy::Never => false,
        };
        if sync {
            if let Err(e) = self.sync() {
                self.poisoned = true;
                return Err(e);
            }
        }
        self.prev = hash;
        self.next += 1;
        Ok(Seq(seq))
    }

    /// Syncs everything written so far.
    pub fn sync(&mut self) -> Result<(), AuditError> {
        self.file.sync_data().map_err(|e| io_err(&self.path, e))?;
        self.unsynced = 0;
        Ok(())
    }
}
