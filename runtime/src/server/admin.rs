//! The variant and admin routes.
//!
//! - `GET /v1/variants` (API key): every servable variant with its catalog
//!   entry, which one is active (and which is on canary), and live counters;
//! - `POST /admin/variants/{id}/activate` (admin token): an operator
//!   proposal to serve `id`. It goes through the guardrail executor like any
//!   other proposal (allowlist, rate limit, one experiment at a time, fresh
//!   telemetry), is staged (loaded off the hot path), ramped through the
//!   canary and promoted, or rolled back on a breach; every step lands in the
//!   audit log. The call waits up to `wait_s` (body `{"wait_s": N}`, default
//!   30, 0 to return at once) for the outcome: 200 promoted, 409 rejected,
//!   422 rolled back (the variant failed to load or breached an SLO; serving
//!   continues on what it served before), 202 still ramping;
//! - `POST /admin/kill`, `/admin/resume`, `/admin/abort`, `/admin/baseline`:
//!   operator commands; `GET /admin/executor`: the executor's state, recent
//!   decisions, outcomes, audit log path.
//!
//! `/admin` routes need `Authorization: Bearer ADMIN_TOKEN` (`--admin-token`,
//! distinct from `--api-key`); without a configured token they answer 403.
//!
//! Cancel safety: a client that goes away mid-activation does not cancel it;
//! the command was already handed to the governor, and its outcome shows in
//! `GET /admin/executor`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::errors::ApiError;
use super::AppState;
use crate::control::governor::{Command, CommandOutcome, GovernorHandle, Verb};
use arqon_tuner::executor::Verdict;

type App = Arc<AppState>;

fn governor(app: &AppState) -> Result<GovernorHandle, ApiError> {
    Ok(app.serving.get().ok_or(ApiError::Loading)?.governor.clone())
}

/// `GET /v1/variants`.
pub async fn list(State(app): State<App>) -> Result<Response, ApiError> {
    let v = governor(&app)?.view();
    Ok(Json(json!({
        "object": "list",
        "data": v.variants,
        "active": v.active,
        "baseline": v.baseline,
        "phase": v.phase,
        "experiment": v.experiment,
        "swaps": v.swaps,
        "live_bytes": v.live_bytes,
        "budget_bytes": v.budget_bytes,
    }))
    .into_response())
}

/// `GET /admin/executor`.
pub async fn executor(State(app): State<App>) -> Result<Response, ApiError> {
    Ok(Json(&*governor(&app)?.view()).into_response())
}

/// `POST /admin/variants/{id}/activate`.
pub async fn activate(State(app): State<App>, Path(id): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    let wait = wait_from(&body)?;
    let g = governor(&app)?;
    if !g.view().variants.iter().any(|v| v.id == id) {
        let known: Vec<String> = g.view().variants.iter().map(|v| v.id.clone()).collect();
        return Err(ApiError::VariantNotFound(format!(
            "no servable variant {id:?} (approved for this SKU); GET /v1/variants lists them: {}",
            known.join(", ")
        )));
    }
    let out = g.command(Command::Activate(id.clone())).await.map_err(ApiError::Internal)?;
    if let Some(reason) = rejection(&out) {
        return Err(ApiError::Conflict {
            message: format!("the executor rejected activating {id:?}: {reason}"),
            code: "proposal_rejected",
        });
    }
    let trace = out.trace.unwrap_or(0);
    let deadline = Instant::now() + wait;
    loop {
        let view = g.view();
        if let Some(o) = view.outcomes.iter().rev().find(|o| o.trace == trace) {
            return match o.result {
                "promoted" => Ok(Json(json!({"status": "promoted", "variant": id, "trace": trace})).into_response()),
                "rejected" => Err(ApiError::Conflict {
                    message: format!(
                        "the executor rejected activating {id:?}: {}",
                        o.reason.clone().unwrap_or_default()
                    ),
                    code: "proposal_rejected",
                }),
                _ => Err(ApiError::Unprocessable {
                    message: format!(
                        "activating {id:?} was rolled back; still serving {:?}: {}",
                        view.active,
                        o.reason.clone().unwrap_or_default()
                    ),
                    code: "variant_rolled_back",
                }),
            };
        }
        if Instant::now() >= deadline {
            let body = json!({"status": "in_progress", "variant": id, "trace": trace, "phase": view.phase});
            return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `POST /admin/adapters` with `{"name": NAME, "path": DIR}`: loads (or
/// replaces) a PEFT LoRA adapter, which requests then name as
/// `"model": "<served model>:NAME"`. No restart; requests already running
/// keep the adapter they were admitted with.
pub async fn load_adapter(State(app): State<App>, body: Bytes) -> Result<Response, ApiError> {
    let serving = app.serving.get().ok_or(ApiError::Loading)?.clone();
    let v: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad("body", format!("the body must be JSON: {e}")))?;
    let text = |k: &str| -> Result<String, ApiError> {
        v.get(k)
            .and_then(|x| x.as_str())
            .map(str::to_string)
            .ok_or_else(|| ApiError::bad(k, format!("`{k}` (a string) is required")))
    };
    let (name, path) = (text("name")?, text("path")?);
    let registry = serving.adapters.clone();
    let loaded = {
        let name = name.clone();
        tokio::task::spawn_blocking(move || registry.load(&name, std::path::Path::new(&path)))
            .await
            .map_err(|e| ApiError::Internal(format!("adapter loader: {e}")))?
    };
    let adapter = loaded.map_err(|e| ApiError::Unprocessable { message: e.to_string(), code: "adapter_refused" })?;
    Ok(Json(json!({
        "loaded": name,
        "model": format!("{}:{name}", app.model_id),
        "rank": adapter.config().r,
        "targets": adapter.targets().iter().map(|t| format!("{t:?}")).collect::<Vec<_>>(),
    }))
    .into_response())
}

/// `DELETE /admin/adapters/{name}`: unloads an adapter; requests running on
/// it finish on it, new ones naming it get 404.
pub async fn unload_adapter(State(app): State<App>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let serving = app.serving.get().ok_or(ApiError::Loading)?;
    serving.adapters.unload(&name).map_err(|_| ApiError::ModelNotFound(format!("{}:{name}", app.model_id)))?;
    Ok(Json(json!({"unloaded": name, "adapters": serving.adapters.list()})).into_response())
}

/// `POST /admin/{kill,resume,abort,baseline}`.
pub async fn operator(State(app): State<App>, verb: Verb) -> Result<Response, ApiError> {
    let g = governor(&app)?;
    let out = g.command(Command::Operator(verb)).await.map_err(ApiError::Internal)?;
    if let Some(reason) = rejection(&out) {
        return Err(ApiError::Conflict {
            message: format!("the executor refused {verb:?}: {reason}"),
            code: "rejected",
        });
    }
    let view = g.view();
    Ok(Json(json!({"decisions": out.decisions, "phase": view.phase, "active": view.active})).into_response())
}

/// The first rejection among a command's decisions.
fn rejection(out: &CommandOutcome) -> Option<String> {
    out.decisions.iter().find_map(|d| match d.verdict {
        Verdict::Rejected(r) => Some(format!("{r:?}")),
        _ => None,
    })
}

fn wait_from(body: &[u8]) -> Result<Duration, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Duration::from_secs(30));
    }
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ApiError::bad("body", format!("the body must be JSON: {e}")))?;
    match v.get("wait_s") {
        None | Some(serde_json::Value::Null) => Ok(Duration::from_secs(30)),
        Some(w) => match w.as_f64() {
            Some(s) if (0.0..=600.0).contains(&s) => Ok(Duration::from_secs_f64(s)),
            _ => Err(ApiError::bad("wait_s", "`wait_s` must be a number of seconds between 0 and 600")),
        },
    }
}

/// The variant and executor metrics, appended to `/metrics` (Prometheus text).
pub fn render_metrics(app: &AppState, out: &mut String) {
    use std::fmt::Write;
    let Some(serving) = app.serving.get() else { return };
    let v = serving.governor.view();
    type Metric = (&'static str, &'static str, &'static str, fn(&crate::control::governor::VariantView) -> u64);
    let per_variant: [Metric; 5] = [
        ("arqon_variant_requests_total", "counter", "Jobs admitted on a variant.", |x| x.requests),
        ("arqon_variant_generation_tokens_total", "counter", "Tokens a variant generated.", |x| x.tokens),
        ("arqon_variant_running", "gauge", "Sequences running on a variant.", |x| x.running),
        ("arqon_variant_resident", "gauge", "1 if a variant is loaded.", |x| u64::from(x.resident)),
        ("arqon_variant_active", "gauge", "1 for the variant serving the control share.", |x| u64::from(x.active)),
    ];
    for (name, kind, help, get) in per_variant {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for x in &v.variants {
            let _ = writeln!(out, "{name}{{variant=\"{}\"}} {}", x.id, get(x));
        }
    }
    let c = &v.counters;
    let scalars: [(&str, &str, &str, u64); 8] = [
        ("arqon_variant_swaps_total", "counter", "Stores into the variant slot.", v.swaps),
        ("arqon_variant_live_bytes", "gauge", "Weight bytes of loaded variants (resident or draining).", v.live_bytes),
        ("arqon_variant_budget_bytes", "gauge", "The variant memory budget.", v.budget_bytes),
        ("arqon_executor_proposals_total", "counter", "Proposals the executor received.", c.proposals),
        ("arqon_executor_promotions_total", "counter", "Canaries promoted.", c.promotions),
        ("arqon_executor_rollbacks_total", "counter", "Rollbacks started.", c.rollbacks),
        ("arqon_executor_breaches_total", "counter", "Telemetry windows that breached the SLO.", c.breaches),
        ("arqon_telemetry_dropped_total", "counter", "Telemetry events dropped (ring full).", v.telemetry.dropped),
    ];
    for (name, kind, help, value) in scalars {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    }
}
