//! Compiles `cuda/*.cu` with nvcc when, and only when, the `cuda` feature is on.
//!
//! Without the feature this script does nothing (not even look for nvcc), so
//! the default build needs no CUDA toolkit. With it, every source becomes one
//! cubin per supported SKU architecture plus `compute_80` PTX, which the driver
//! JIT-compiles on any newer GPU; `src/cuda/images.rs` embeds them all.
//! Build scripts read their environment directly: cargo hands them their
//! configuration that way (the house rule on `std::env::var` is for the crates).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Cubin targets: A100 (8.0), A10/RTX 30 (8.6), L4/L40S/RTX 40 (8.9), H100/H200 (9.0).
const CUBIN_ARCHES: [&str; 4] = ["sm_80", "sm_86", "sm_89", "sm_90"];
/// The portable fallback, loaded through the driver's JIT.
const PTX_ARCH: &str = "compute_80";
/// nvcc processes at once: the build machines have two cores.
const JOBS: usize = 2;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=PATH");
    let nvcc = find_nvcc().unwrap_or_else(|| {
        fail("nvcc not found: set CUDA_HOME (nvcc at $CUDA_HOME/bin/nvcc) or put nvcc on PATH; on a machine without CUDA run /work/shared/gpu/setup-host.sh and source env.sh")
    });
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let src_dir = Path::new("cuda");
    println!("cargo:rerun-if-changed=cuda");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(src_dir)
        .unwrap_or_else(|e| fail(&format!("reading kernels/cuda: {e}")))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("cu" | "cuh")))
        .collect();
    sources.sort();
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }
    // One job per (source, target); headers are included, not compiled.
    let mut jobs = Vec::new();
    for s in sources.iter().filter(|p| p.extension().is_some_and(|e| e == "cu")) {
        let stem = s.file_stem().and_then(|s| s.to_str()).expect("utf-8 file name");
        // RoPE rounds each product and sum to T, as candle's RoPE and our reference do, so that the
        // fused step gives the unfused one's numbers: no contraction into FMAs there (nvcc contracts
        // f32 and f16 multiply-adds by default, and hands the flag to ptxas for the cubins; the PTX keeps
        // f32's rounding in the instructions, but a driver's JIT may still fuse f16 there).
        let fmad = if stem == "rope_kv" { "-fmad=false" } else { "-fmad=true" };
        for arch in CUBIN_ARCHES {
            jobs.push((
                s.clone(),
                vec!["--cubin".to_string(), format!("-arch={arch}"), fmad.to_string()],
                out.join(format!("{stem}.{arch}.cubin")),
            ));
        }
        jobs.push((
            s.clone(),
            vec!["--ptx".to_string(), format!("-arch={PTX_ARCH}"), fmad.to_string()],
            out.join(format!("{stem}.{PTX_ARCH}.ptx")),
        ));
    }
    let next = AtomicUsize::new(0);
    let errors = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..JOBS {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((src, mode, dst)) = jobs.get(i) else { break };
                let result = Command::new(&nvcc)
                    .args(mode)
                    .args(["-O3", "-std=c++17", "-Icuda", "-o"])
                    .arg(dst)
                    .arg(src)
                    .output();
                match result {
                    Ok(o) if o.status.success() => {}
                    Ok(o) => errors.lock().unwrap().push(format!(
                        "nvcc {} {}: {}\n{}",
                        mode.join(" "),
                        src.display(),
                        o.status,
                        String::from_utf8_lossy(&o.stderr)
                    )),
                    Err(e) => errors.lock().unwrap().push(format!("running {}: {e}", nvcc.display())),
                }
            });
        }
    });
    let errors = errors.into_inner().unwrap();
    if !errors.is_empty() {
        fail(&errors.join("\n"));
    }
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        let p = Path::new(&home).join("bin").join("nvcc");
        if p.is_file() {
            return Some(p);
        }
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("nvcc")).find(|p| p.is_file())
}

fn fail(message: &str) -> ! {
    eprintln!("error: arqon-kernels (feature `cuda`): {message}");
    std::process::exit(1);
}
