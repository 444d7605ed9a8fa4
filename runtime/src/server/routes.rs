//! The routes: OpenAI's `/v1/*`, and `/health`, `/ready`, `/metrics`,
//! `/openapi.json`. One middleware checks the API key on `/v1/*` and counts
//! every answer by status.
//!
//! A generation request goes: draining? (503) → body within the limit (413) →
//! [`validate::parse`] (400/404) → tokenize and check on a blocking thread
//! ([`ValidRequest::prepare`], 400) → [`SchedulerHandle::submit`] (429 at once
//! when the queue is full) → events back, as one JSON body or as SSE.
//! `"model": "base:NAME"` takes the loaded adapter NAME's `Arc` before
//! tokenizing (404 `model_not_found` when none is loaded by that name).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::api::{self, Choice, ResponseMeta, Usage};
use super::errors::ApiError;
use super::scheduler::Event;
use super::validate::{self, Endpoint, ValidRequest};
use super::{admin, openapi, sse, tokenize, AppState, Serving};
use crate::control::governor::Verb;

type App = Arc<AppState>;

/// The router with every route and the middleware.
pub fn router(app: App) -> Router {
    let limit = app.body_limit;
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/v1/variants", get(admin::list))
        .route("/admin/variants/{id}/activate", post(admin::activate))
        .route("/admin/executor", get(admin::executor))
        .route("/admin/adapters", post(admin::load_adapter))
        .route("/admin/adapters/{name}", axum::routing::delete(admin::unload_adapter))
        .route("/admin/kill", post(|s| admin::operator(s, Verb::Kill)))
        .route("/admin/resume", post(|s| admin::operator(s, Verb::Resume)))
        .route("/admin/abort", post(|s| admin::operator(s, Verb::Abort)))
        .route("/admin/baseline", post(|s| admin::operator(s, Verb::SetBaseline)))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(|| async { Json(openapi::spec()) }))
        .fallback(|uri: Uri| async move { ApiError::RouteNotFound(uri.path().to_string()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(app.clone(), auth_and_count))
        .with_state(app)
}

/// 200 while the server can serve; 503 once its device is lost (it is
/// then draining to exit), as a supervisor's liveness probe wants.
async fn health(State(app): State<App>) -> Response {
    match app.metrics.device_lost.get() {
        None => Json(serde_json::json!({"status": "ok"})).into_response(),
        Some(why) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "device lost", "reason": why})),
        )
            .into_response(),
    }
}

async fn auth_and_count(State(app): State<App>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let resp = if path.starts_with("/v1/") && !bearer_matches(app.api_key.as_deref(), req.headers()) {
        ApiError::Unauthorized.into_response()
    } else if path.starts_with("/admin/") && app.admin_token.is_none() {
        ApiError::AdminDisabled.into_response()
    } else if path.starts_with("/admin/") && !bearer_matches(app.admin_token.as_deref(), req.headers()) {
        ApiError::AdminUnauthorized.into_response()
    } else {
        next.run(req).await
    };
    app.metrics.request(resp.status().as_u16());
    resp
}

/// Whether the bearer token equals `key` (any request passes when `key` is
/// `None`); compares in time independent of where the token differs.
fn bearer_matches(key: Option<&str>, headers: &HeaderMap) -> bool {
    let Some(key) = key else { return true };
    let got = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match got {
        Some(g) if g.len() == key.len() => g.bytes().zip(key.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0,
        _ => false,
    }
}

async fn models(State(app): State<App>) -> Json<serde_json::Value> {
    let adapters = app.serving.get().map(|s| s.adapters.list()).unwrap_or_default();
    Json(api::models(&app.model_id, app.created, &adapters))
}

async fn ready(State(app): State<App>) -> Response {
    if app.draining.load(Ordering::Relaxed) {
        return ApiError::ShuttingDown.into_response();
    }
    match app.serving.get() {
        Some(_) => Json(serde_json::json!({"status": "ready", "model": app.model_id})).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"status": "loading"}))).into_response(),
    }
}

async fn metrics(State(app): State<App>) -> Response {
    let depth = app.serving.get().map_or(0, |s| s.scheduler.queue_depth());
    let mut text = app.metrics.render(depth);
    admin::render_metrics(&app, &mut text);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn completions(State(app): State<App>, body: Result<Bytes, BytesRejection>) -> Response {
    generate(app, Endpoint::Completion, body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn chat_completions(State(app): State<App>, body: Result<Bytes, BytesRejection>) -> Response {
    generate(app, Endpoint::Chat, body).await.unwrap_or_else(IntoResponse::into_response)
}

/// The serving state and the body of a request that needs the model: 503
/// while draining or loading, 413 past the body limit.
pub(super) fn serving_and_body(app: &App, body: Result<Bytes, BytesRejection>) -> Result<(Serving, Bytes), ApiError> {
    if app.draining.load(Ordering::Relaxed) {
        return Err(ApiError::ShuttingDown);
    }
    let serving = app.serving.get().ok_or(ApiError::Loading)?.clone();
    let body = body.map_err(|r| match r.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(app.body_limit),
        _ => ApiError::BadRequest { message: r.body_text(), param: None, code: None },
    })?;
    Ok((serving, body))
}

async fn generate(app: App, endpoint: Endpoint, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let (serving, body) = serving_and_body(&app, body)?;
    let req: ValidRequest = validate::parse(endpoint, &body, &app.model_id)?;
    // The request holds its adapter from here on: unloading it later does not
    // affect this request.
    let adapter = match &req.adapter {
        None => None,
        Some(name) => Some(serving.adapters.get(name).ok_or_else(|| ApiError::ModelNotFound(req.model.clone()))?),
    };
    let (pre, cap) = (serving.pre.clone(), serving.cap.clone());
    let prepared = {
        let req = req.clone();
        tokio::task::spawn_blocking(move || req.prepare(&pre, &cap, adapter))
            .await
            .map_err(|e| ApiError::Internal(format!("tokenizer task: {e}")))??
    };
    let choices = prepared.choices();
    let usage = Usage { prompt_tokens: prepared.prompt_tokens(req.n), completion_tokens: 0 };
    let in_flight = app.in_flight();
    let rx = serving.scheduler.submit(prepared)?;
    let id = app.next_id.fetch_add(1, Ordering::Relaxed);
    let meta = ResponseMeta {
        id: match endpoint {
            Endpoint::Completion => format!("cmpl-{:x}{id:08x}", app.created),
            Endpoint::Chat => format!("chatcmpl-{:x}{id:08x}", app.created),
        },
        created: unix_now(),
        model: req.model.clone(),
        endpoint,
    };
    if req.stream {
        return Ok(sse::respond(rx, meta, choices, usage.prompt_tokens, req.include_usage, in_flight));
    }
    collect(rx, meta, choices, usage, req.logprobs.is_some()).await
}

/// Waits for every choice and builds the one JSON body. Dropping this future
/// (client gone) drops `rx`, which cancels the job.
async fn collect(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    meta: ResponseMeta,
    n: usize,
    mut usage: Usage,
    logprobs: bool,
) -> Result<Response, ApiError> {
    let mut choices: Vec<Choice> =
        (0..n).map(|_| Choice { logprobs: logprobs.then(Vec::new), ..Default::default() }).collect();
    let mut open = n;
    while open > 0 {
        match rx.recv().await.ok_or_else(|| ApiError::Internal("the engine stopped".into()))? {
            Event::Token { choice, text, logprobs } => {
                let c = &mut choices[choice];
                c.text.push_str(&text);
                if let (Some(all), Some(l)) = (c.logprobs.as_mut(), logprobs) {
                    all.push(l);
                }
            }
            Event::Done { choice, finish, completion_tokens } => {
                choices[choice].finish = Some(finish);
                choices[choice].completion_tokens = completion_tokens;
                usage.completion_tokens += completion_tokens;
                open -= 1;
            }
            Event::Failed(e) => return Err(e),
        }
    }
    Ok(Json(api::response(&meta, &choices, usage)).into_response())
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
