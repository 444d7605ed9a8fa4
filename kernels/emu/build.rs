//! Compiles the emulator's runtime and every `kernels/cuda/*.cu` as C++ into
//! shared objects in OUT_DIR: `libarqon_emu_rt.so` (the fiber scheduler and
//! device memory) and one `<stem>.so` per source, as nvcc makes one module per
//! source; the kernel entries are the modules' exported `extern "C"` symbols.
//! `tests/*.cu` (the emulator's own probes) become modules the same way.
//! The C++ compiler is the one the `cc` crate finds (CXX, else c++).
//! Build scripts read their environment directly: cargo hands them their
//! configuration that way (the house rule on `std::env::var` is for the crates).

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Compiler processes at once: the build machines have two cores.
const JOBS: usize = 2;

fn main() {
    let here = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let (include, cuda, runtime) = (here.join("include"), here.join("../cuda"), here.join("runtime"));
    for d in [&include, &cuda, &runtime, &here.join("tests")] {
        println!("cargo:rerun-if-changed={}", d.display());
    }
    let tool = cc::Build::new().cpp(true).get_compiler();
    let cxx = tool.path().to_path_buf();
    // -O1 keeps the compile short; _FORTIFY_SOURCE would reject the fibers' longjmps between stacks.
    let common: Vec<String> =
        ["-std=c++20", "-O1", "-g", "-fPIC", "-shared", "-U_FORTIFY_SOURCE", "-Wall", "-Wno-unknown-pragmas"]
            .iter()
            .map(|s| s.to_string())
            .chain([format!("-I{}", include.display())])
            .collect();
    let rt = out.join("libarqon_emu_rt.so");
    run(Command::new(&cxx)
        .args(&common)
        .arg("-Wl,-soname,libarqon_emu_rt.so")
        .arg("-o")
        .arg(&rt)
        .arg(runtime.join("runtime.cpp")));

    // Our kernels, and the emulator's own probes (tests/emulator.rs).
    let mut sources: Vec<PathBuf> = [&cuda, &here.join("tests")]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).unwrap_or_else(|e| fail(&format!("reading {}: {e}", d.display()))))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    let next = AtomicUsize::new(0);
    let errors = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..JOBS {
            scope.spawn(|| {
                while let Some(src) = sources.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let stem = src.file_stem().and_then(|s| s.to_str()).expect("utf-8 file name");
                    let mut c = Command::new(&cxx);
                    c.args(&common)
                        .args(["-fvisibility=hidden", "-include", "emu.h"])
                        .arg(format!("-I{}", cuda.display()))
                        .arg("-o")
                        .arg(out.join(format!("{stem}.so")))
                        .args(["-x", "c++"])
                        .arg(src)
                        .args(["-x", "none"])
                        .arg(&rt)
                        .arg(format!("-Wl,-rpath,{}", out.display()));
                    if let Err(e) = output(&mut c) {
                        errors.lock().unwrap_or_else(|p| p.into_inner()).push(e);
                    }
                }
            });
        }
    });
    let errors = errors.into_inner().unwrap_or_else(|p| p.into_inner());
    if !errors.is_empty() {
        fail(&errors.join("\n"));
    }
}

fn output(c: &mut Command) -> Result<(), String> {
    match c.output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!("{c:?}: {}\n{}", o.status, String::from_utf8_lossy(&o.stderr))),
        Err(e) => Err(format!("running {c:?}: {e}")),
    }
}

fn run(c: &mut Command) {
    output(c).unwrap_or_else(|e| fail(&e));
}

fn fail(message: &str) -> ! {
    eprintln!("error: arqon-kernels-emu: {message}");
    std::process::exit(1);
}
