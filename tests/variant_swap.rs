//! The live variant swap under load, through the real `arqon serve` and its
//! admin API: 32 concurrent streaming clients while 100 activations go
//! through the guardrail executor. No request fails, every response is the
//! greedy output of one variant (a request never mixes two), and the audit
//! log replays to what the server did. Also: a variant that fails to load
//! (wrong hash) or does not fit the memory budget is refused and serving
//! carries on, on what it served before.

mod common;
mod server_support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arqon_runtime::variants::{build_variants, BuildOptions};
use arqon_runtime::{engine, Engine, GenerateRequest};
use arqon_tuner::audit;
use arqon_tuner::Executor;
use arqon_variants::{Catalog, DepthProfile, Quantization, Status};
use serde_json::{json, Value};
use server_support::{stream_texts, Server};

const TOKEN: &str = "swap-admin";
const MAX_TOKENS: usize = 10;
const PROMPTS: [&str; 6] = [
    "The capital of France is",
    "def add(a, b):",
    "Once upon a time, in a small village, there lived",
    "The three primary colours are",
    "Water boils at",
    "My favourite programming language is",
];
/// The served variants: the shipped Q4_1 base, its Q8_0 build, and a static
/// early exit of the base (its own artifact, a different output).
const VARIANTS: [&str; 3] = ["q4_1", "q8_0", "q4_1-exit24"];

/// A catalog of the default model with q8_0 built and an early-exit entry,
/// once per test binary. Quality is measured on few tokens and every entry
/// approved: what is under test here is serving, not the floor
/// (`variants_catalog` tests that).
fn catalog() -> &'static (tempfile::TempDir, Catalog) {
    static C: OnceLock<(tempfile::TempDir, Catalog)> = OnceLock::new();
    C.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let opts = BuildOptions {
            base: common::default_model().to_path_buf(),
            model_name: "smollm2-135m-instruct".into(),
            out: dir.path().to_path_buf(),
            formats: vec![Quantization::Q8_0],
            target_tokens: 4,
            floor: 0.0,
        };
        let mut c = build_variants(&opts, &mut |m| eprintln!("{m}")).expect("build variants");
        let mut exit = c.get("q4_1").unwrap().clone();
        exit.id = VARIANTS[2].into();
        exit.depth = DepthProfile::Static { layers: 24 };
        c.upsert(exit);
        for v in &mut c.variants {
            v.status = Status::Approved;
        }
        c.default_variant = Some("q4_1".into());
        c.save(dir.path()).unwrap();
        (dir, c)
    })
}

/// Each variant's greedy text for each prompt, computed in process.
fn references(dir: &Path, c: &Catalog) -> Vec<Vec<String>> {
    VARIANTS
        .iter()
        .map(|id| {
            let entry = c.get(id).unwrap();
            let mut e = Engine::new(engine::load(&dir.join(&entry.artifact.path)).unwrap());
            e.set_depth(entry.depth).unwrap();
            PROMPTS
                .iter()
                .map(|p| {
                    let ids = e.encode_prompt(p).unwrap();
                    e.generate(GenerateRequest::greedy(ids, MAX_TOKENS), &mut |_| {}).unwrap().text
                })
                .collect()
        })
        .collect()
}

fn admin(s: &Server, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    s.admin(TOKEN, method, path, body)
}

fn serve(dir: &Path, extra: &[&str]) -> Server {
    let mut args = vec![
        "--catalog",
        dir.to_str().unwrap(),
        "--served-model-name",
        "smol",
        "--admin-token",
        TOKEN,
        // One-step canary (allowed outside prod) so each activation takes a
        // window or two; the SLOs are loose: this test is about the swap.
        "--tuner-scope",
        "staging",
        "--canary-steps",
        "1000",
        "--canary-min-windows",
        "1",
        "--canary-min-samples",
        "0",
        "--telemetry-window-ms",
        "50",
        "--slo-ttft-p99-ms",
        "600000",
        "--slo-itl-p99-ms",
        "600000",
    ];
    args.extend_from_slice(extra);
    let s = Server::start(&args);
    s.wait_for_telemetry(TOKEN);
    s
}

#[test]
fn a_hundred_swaps_under_32_streams_fail_nothing_and_each_response_is_one_variant() {
    let (dir, c) = catalog();
    let refs = references(dir.path(), c);
    let distinct: Vec<bool> = (0..PROMPTS.len())
        .map(|p| refs[0][p] != refs[1][p] && refs[1][p] != refs[2][p] && refs[0][p] != refs[2][p])
        .collect();
    assert!(distinct.iter().filter(|d| **d).count() >= 2, "too few prompts tell the variants apart: {refs:?}");

    let s = Arc::new(serve(dir.path(), &["--max-batch", "32"]));
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let results = Arc::new(Mutex::new(Vec::<(usize, String)>::new()));
    let started = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..32)
        .map(|c| {
            let (s, stop, failures, results, started) =
                (s.clone(), stop.clone(), failures.clone(), results.clone(), started.clone());
            std::thread::spawn(move || {
                let mut i = c;
                while !stop.load(Ordering::SeqCst) {
                    let p = i % PROMPTS.len();
                    i += 1;
                    started.fetch_add(1, Ordering::SeqCst);
                    let body = json!({"model": "smol", "prompt": PROMPTS[p], "max_tokens": MAX_TOKENS,
                                      "temperature": 0, "stream": true});
                    let r = s.open(
                        "POST",
                        "/v1/completions",
                        &[("content-type", "application/json")],
                        Some(body.to_string().as_bytes()),
                    );
                    match r {
                        Ok(r) if r.status == 200 => {
                            let (chunks, done) = r.collect();
                            if !done {
                                failures.lock().unwrap().push(format!("stream for prompt {p} ended early"));
                            } else {
                                results.lock().unwrap().push((p, stream_texts(&chunks, 1).remove(0)));
                            }
                        }
                        Ok(r) => failures.lock().unwrap().push(format!("status {}", r.status)),
                        Err(e) => failures.lock().unwrap().push(format!("transport: {e}")),
                    }
                }
            })
        })
        .collect();

    // 100 activations, cycling through the variants, each through the executor.
    let t0 = Instant::now();
    let mut activated = Vec::new();
    let admitted = |id: &str| -> u64 {
        let (_, list) = s.get("/v1/variants");
        let list: Value = serde_json::from_str(&list).unwrap();
        list["data"].as_array().unwrap().iter().find(|v| v["id"] == id).map_or(0, |v| v["requests"].as_u64().unwrap())
    };
    for k in 0..100 {
        let id = VARIANTS[(k + 1) % VARIANTS.len()];
        let before = admitted(id);
        let (st, b) = admin(&s, "POST", &format!("/admin/variants/{id}/activate"), Some(&json!({"wait_s": 60})));
        assert_eq!(st, 200, "activation {k} of {id}: {b}\n{}", s.stderr());
        assert_eq!(b["status"], "promoted");
        activated.push(id);
        // Let the new variant admit a request before the next swap: the
        // scheduler admits only at step boundaries, and with swaps faster
        // than steps one variant could otherwise be skipped every time.
        let t = Instant::now();
        while admitted(id) == before && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let swap_time = t0.elapsed();
    // Let the last variant serve for a moment too, then stop the clients.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }

    let failures = failures.lock().unwrap();
    assert!(failures.is_empty(), "{} failed requests: {:?}", failures.len(), &failures[..failures.len().min(5)]);
    let results = results.lock().unwrap();
    let mut served = [0usize; 3];
    for (p, text) in results.iter() {
        let matches: Vec<usize> = (0..3).filter(|v| refs[*v][*p] == *text).collect();
        assert!(
            !matches.is_empty(),
            "prompt {p}: {text:?} is no variant's greedy output: {:?}",
            refs.iter().map(|r| &r[*p]).collect::<Vec<_>>()
        );
        if distinct[*p] {
            assert_eq!(matches.len(), 1);
            served[matches[0]] += 1;
        }
    }
    assert!(served.iter().all(|n| *n > 0), "every variant served some request: {served:?}");
    eprintln!(
        "{} requests during 100 swaps in {:.1}s; on prompts that tell them apart: {served:?} by {VARIANTS:?}",
        results.len(),
        swap_time.as_secs_f64()
    );

    // What the server reports, and what its audit log rebuilds.
    let (_, v) = admin(&s, "GET", "/admin/executor", None);
    assert_eq!(v["counters"]["promotions"], 100, "{v}");
    assert_eq!(v["active"], *activated.last().unwrap());
    assert_eq!(v["counters"]["rollbacks"], 0, "{v}");
    let log = std::path::PathBuf::from(v["audit_log"].as_str().unwrap());
    let (_, list) = s.get("/v1/variants");
    let list: Value = serde_json::from_str(&list).unwrap();
    let total: u64 = list["data"].as_array().unwrap().iter().map(|x| x["requests"].as_u64().unwrap()).sum();
    assert!(total as usize >= results.len(), "{list}");
    let mut s = Arc::try_unwrap(s).ok().expect("clients are done");
    s.sigterm();
    assert_eq!(s.wait_exit(Duration::from_secs(30)), Some(0));
    let (records, _) = audit::recover(&log).unwrap();
    let exec = Executor::replay(&records).unwrap();
    assert_eq!(exec.state().counters.promotions, 100);
    let last =
        c.variants.iter().filter(|e| e.status == Status::Approved).position(|e| e.id == *activated.last().unwrap());
    assert_eq!(Some(exec.active().variant.0 as usize), last);
    let _ = std::fs::remove_file(log);
}

#[test]
fn a_variant_that_fails_to_load_or_fit_is_refused_and_serving_continues() {
    let (dir, c) = catalog();
    // A copy of the catalog with an entry whose artifact hash is wrong.
    let bad = tempfile::tempdir().unwrap();
    let mut c2 = c.clone();
    for v in &c2.variants {
        let dest = bad.path().join(&v.artifact.path);
        if !dest.exists() {
            std::fs::hard_link(dir.path().join(&v.artifact.path), dest).unwrap();
        }
    }
    let mut corrupt = c2.get("q8_0").unwrap().clone();
    corrupt.id = "q8_0-corrupt".into();
    corrupt.artifact.sha256 = "0".repeat(64);
    c2.upsert(corrupt);
    c2.save(bad.path()).unwrap();

    let s = serve(bad.path(), &[]);
    let ask = |s: &Server| {
        s.post("/v1/completions", &json!({"model": "smol", "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}))
    };
    assert_eq!(ask(&s).0, 200);

    let (st, b) = admin(&s, "POST", "/admin/variants/q8_0-corrupt/activate", None);
    assert_eq!(st, 422, "{b}");
    assert_eq!(b["error"]["code"], "variant_rolled_back");
    let msg = b["error"]["message"].as_str().unwrap();
    assert!(msg.contains("SHA-256") || msg.contains("sha256"), "{msg}");
    assert!(msg.contains("q4_1"), "names what still serves: {msg}");
    assert_eq!(ask(&s).0, 200);
    let (st, b) = admin(&s, "POST", "/admin/variants/q9_9/activate", None);
    assert_eq!(st, 404, "{b}");

    // Still on the base, still serving, nothing half-loaded left behind.
    let (_, v) = admin(&s, "GET", "/admin/executor", None);
    assert_eq!(v["active"], "q4_1", "{v}");
    assert_eq!(v["counters"]["promotions"], 0);
    let resident: Vec<&str> = v["variants"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["resident"] == true)
        .map(|x| x["id"].as_str().unwrap())
        .collect();
    assert_eq!(resident, ["q4_1"], "{v}");
    let (st, b) = ask(&s);
    assert_eq!(st, 200, "{b}");
    drop(s);

    // Budget: the active q4_1 fits, q4_1 and q8_0 together do not.
    let mib = |id: &str| c.get(id).unwrap().memory_bytes.div_ceil(1 << 20);
    let budget = (mib("q4_1") + mib("q8_0") / 2).to_string();
    let s = serve(bad.path(), &["--variant-memory-mb", &budget]);
    let (st, b) = admin(&s, "POST", "/admin/variants/q8_0/activate", None);
    assert_eq!(st, 422, "{b}");
    assert!(b["error"]["message"].as_str().unwrap().contains("budget"), "{b}");
    assert_eq!(ask(&s).0, 200);
}
