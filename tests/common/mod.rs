//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use arqon_runtime::{config, engine, fetch, Engine};

/// The default model, fetched into the normal cache on first use (as a user's
/// first run would), once per test binary.
pub fn default_model() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        fetch::resolve(fetch::DEFAULT_MODEL, &config::fetch_options(None, true)).expect("fetch the default model")
    })
}

/// A fresh engine on the default model.
pub fn default_engine() -> Engine {
    Engine::new(engine::load(default_model()).expect("load the default model"))
}

/// The repository's top-level `tests/` folder.
pub fn tests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("tests")
}

/// `../shared/fixtures/` beside the checkout (CI clones with shared/ beside it).
pub fn shared_fixture(name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for dir in [root.join("shared/fixtures"), root.join("../shared/fixtures")] {
        let p = dir.join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("fixture {name} not found in shared/fixtures or ../shared/fixtures");
}

/// Runs the real `arqon` binary.
pub fn arqon(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_arqon")).args(args).output().expect("run arqon")
}

/// stdout and stderr of an output, as text.
pub fn texts(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}
