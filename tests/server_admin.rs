//! The admin API and the guardrail executor behind `arqon serve`: the admin
//! token, operator commands, activation as an executor proposal, and the
//! audit log, whose replay rebuilds the executor the server ran.

mod common;
mod server_support;

use arqon_tuner::audit;
use arqon_tuner::Executor;
use serde_json::{json, Value};
use server_support::{tiny_model, Server};

const TOKEN: &str = "admin-secret";

fn admin(s: &Server, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    s.admin(TOKEN, method, path, body)
}

fn tiny_server(extra: &[&str]) -> Server {
    let model = tiny_model();
    let mut args = vec!["--model", model.to_str().unwrap(), "--served-model-name", "tiny"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

#[test]
fn admin_routes_need_their_own_token() {
    let s = tiny_server(&["--api-key", "user-key"]);
    // No admin token configured: the admin API is off, whatever is sent.
    let r = s.request("GET", "/admin/executor", &[("authorization", "Bearer user-key")], None);
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["code"], "admin_disabled");
    drop(s);

    let s = tiny_server(&["--api-key", "user-key", "--admin-token", TOKEN]);
    // The API key is not the admin token, and the admin token is not an API key.
    let r = s.request("POST", "/admin/kill", &[("authorization", "Bearer user-key")], None);
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_admin_token");
    let r = s.request("GET", "/v1/variants", &[("authorization", &format!("Bearer {TOKEN}"))], None);
    assert_eq!(r.status, 401);
    let r = s.request("GET", "/v1/variants", &[("authorization", "Bearer user-key")], None);
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["active"], "base");
    assert_eq!(v["data"][0]["id"], "base");
    assert_eq!(v["data"][0]["resident"], true);
    assert_eq!(v["data"][0]["active"], true);
}

#[test]
fn operator_commands_go_through_the_executor_and_the_audit_log_replays() {
    let s = tiny_server(&["--admin-token", TOKEN, "--telemetry-window-ms", "50"]);
    s.wait_for_telemetry(TOKEN);
    let complete = |s: &Server| {
        s.post("/v1/completions", &json!({"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0}))
    };
    assert_eq!(complete(&s).0, 200);

    // Unknown variant: 404, named.
    let (st, b) = admin(&s, "POST", "/admin/variants/nope/activate", None);
    assert_eq!(st, 404, "{b}");
    assert_eq!(b["error"]["code"], "variant_not_found");
    assert!(b["error"]["message"].as_str().unwrap().contains("base"), "{b}");

    // Activating what already serves is a no-op proposal: the executor rejects it.
    let (st, b) = admin(&s, "POST", "/admin/variants/base/activate", Some(&json!({"wait_s": 0})));
    assert_eq!(st, 409, "{b}");
    assert_eq!(b["error"]["code"], "proposal_rejected");
    assert!(b["error"]["message"].as_str().unwrap().contains("NoOp"), "{b}");

    // Kill switch: frozen; proposals are refused until resumed.
    let (st, b) = admin(&s, "POST", "/admin/kill", None);
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["phase"], json!("Frozen"));
    let (st, b) = admin(&s, "POST", "/admin/variants/base/activate", None);
    assert_eq!(st, 409, "{b}");
    assert!(b["error"]["message"].as_str().unwrap().contains("Frozen"), "{b}");
    let (st, b) = admin(&s, "POST", "/admin/resume", None);
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["phase"], json!("Idle"));
    let (st, b) = admin(&s, "POST", "/admin/variants/base/activate", Some(&json!({"wait_s": "soon"})));
    assert_eq!(st, 400, "{b}");
    assert_eq!(b["error"]["param"], "wait_s");

    // Serving carried on through all of it, and /metrics counts per variant.
    assert_eq!(complete(&s).0, 200);
    std::thread::sleep(std::time::Duration::from_millis(100)); // the governor republishes every window / 4
    assert_eq!(s.metric("arqon_variant_requests_total{variant=\"base\"}"), 2.0);
    assert_eq!(s.metric("arqon_variant_active{variant=\"base\"}"), 1.0);
    assert_eq!(s.metric("arqon_executor_proposals_total"), 2.0);

    // Telemetry windows reach the executor (the CPU host-memory samples keep
    // it fresh even when idle), and every input is in the audit log.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (st, view) = admin(&s, "GET", "/admin/executor", None);
    assert_eq!(st, 200);
    assert!(view["audit_records"].as_u64().unwrap() > 8, "{view}");
    assert_eq!(view["counters"]["proposals"], 2, "{view}");
    assert_eq!(view["counters"]["rejected"], 2, "{view}");
    assert!(view["telemetry"]["pushed"].as_u64().unwrap() > 0, "{view}");
    let log = std::path::PathBuf::from(view["audit_log"].as_str().unwrap());

    // Stop the server, then rebuild its executor from the log alone.
    let mut s = s;
    s.sigterm();
    assert_eq!(s.wait_exit(std::time::Duration::from_secs(30)), Some(0));
    let (records, report) = audit::recover(&log).unwrap();
    assert!(report.torn.is_none(), "{report:?}");
    let exec = Executor::replay(&records).unwrap();
    let c = exec.state().counters;
    assert_eq!((c.proposals, c.rejected), (2, 2));
    assert_eq!(format!("{:?}", exec.state().phase), "Idle");
    let _ = std::fs::remove_file(&log);
}

#[test]
fn adapters_hot_load_and_unload_without_restart() {
    let s = tiny_server(&["--admin-token", TOKEN]);
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-lora");
    let ask = |model: &str| {
        s.post("/v1/completions", &json!({"model": model, "prompt": "hello world", "max_tokens": 6, "temperature": 0}))
    };
    let (st, b) = ask("tiny:fr");
    assert_eq!(st, 404, "{b}");

    let (st, b) = admin(&s, "POST", "/admin/adapters", Some(&json!({"name": "fr", "path": fixture})));
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["model"], "tiny:fr");
    let (st, with) = ask("tiny:fr");
    assert_eq!(st, 200, "{with}");
    let (_, base) = ask("tiny");
    assert_ne!(with["choices"][0]["text"], base["choices"][0]["text"], "the adapter changes the output");
    let (_, models) = s.get("/v1/models");
    assert!(models.contains("tiny:fr"), "{models}");

    // A bad folder is refused; what was loaded stays.
    let (st, b) = admin(&s, "POST", "/admin/adapters", Some(&json!({"name": "bad", "path": "/nonexistent"})));
    assert_eq!(st, 422, "{b}");
    assert_eq!(b["error"]["code"], "adapter_refused");
    let (st, b) = admin(&s, "POST", "/admin/adapters", Some(&json!({"path": fixture})));
    assert_eq!((st, b["error"]["param"].clone()), (400, json!("name")), "{b}");

    let (st, b) = admin(&s, "DELETE", "/admin/adapters/fr", None);
    assert_eq!(st, 200, "{b}");
    assert_eq!(ask("tiny:fr").0, 404);
    assert_eq!(admin(&s, "DELETE", "/admin/adapters/fr", None).0, 404);
    assert_eq!(ask("tiny").0, 200);
}
