//! vLLM's `/tokenize` and `/detokenize`: the server's own tokenizer and chat
//! template, so a client can count a prompt's tokens against the context (or
//! read ids back) exactly as generation will. Like generation's, the work
//! runs on tokio's blocking threads.
//!
//! - `POST /tokenize` takes `prompt` (a string; `add_special_tokens`, default
//!   true, adds BOS as a completion does) or `messages` (rendered with the
//!   chat template; `add_generation_prompt`, default true), and answers
//!   `{"count", "max_model_len", "tokens"}`.
//! - `POST /detokenize` takes `tokens` and answers `{"prompt"}`.
//!
//! `model` is optional; when given it must be the served model (or one of its
//! `base:adapter` names, which share its tokenizer).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use serde_json::{json, Map, Value};

use super::errors::ApiError;
use super::routes::serving_and_body;
use super::validate::{field, object, parse_messages};
use super::{AppState, Serving};

type App = Arc<AppState>;

/// The body as a JSON object, with the served-model check; the serving state.
fn open(app: &App, body: Result<Bytes, BytesRejection>) -> Result<(Serving, Map<String, Value>), ApiError> {
    let (serving, body) = serving_and_body(app, body)?;
    let obj = object(&body)?;
    if let Some(model) = field::<String>(&obj, "model", "a string")? {
        let ours = model == app.model_id || model.strip_prefix(&app.model_id).is_some_and(|r| r.starts_with(':'));
        if !ours {
            return Err(ApiError::ModelNotFound(model));
        }
    }
    Ok((serving, obj))
}

/// Runs `f` on a blocking thread.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::Internal(format!("tokenizer task: {e}")))?
}

/// `POST /tokenize`.
pub async fn tokenize(State(app): State<App>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let (serving, obj) = open(&app, body)?;
    let context = serving.cap.context;
    let tokens = if obj.get("messages").is_some_and(|m| !m.is_null()) {
        if obj.get("prompt").is_some_and(|p| !p.is_null()) {
            return Err(ApiError::bad("messages", "give `prompt` or `messages`, not both"));
        }
        let messages = parse_messages(&obj)?;
        let generation_prompt = field(&obj, "add_generation_prompt", "a boolean")?.unwrap_or(true);
        let pre = serving.pre.clone();
        blocking(move || Ok(pre.tokenizer.encode(&pre.chat.render(&messages, generation_prompt)?, false)?)).await?
    } else {
        let prompt: String = field(&obj, "prompt", "a string")?
            .ok_or_else(|| ApiError::bad("prompt", "`prompt` (a string) or `messages` is required"))?;
        let special = field(&obj, "add_special_tokens", "a boolean")?.unwrap_or(true);
        let pre = serving.pre.clone();
        blocking(move || Ok(pre.tokenizer.encode(&prompt, special)?)).await?
    };
    Ok(Json(json!({"count": tokens.len(), "max_model_len": context, "tokens": tokens})))
}

/// `POST /detokenize`.
pub async fn detokenize(State(app): State<App>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let (serving, obj) = open(&app, body)?;
    let tokens: Vec<u32> =
        field(&obj, "tokens", "a list of token ids")?.ok_or_else(|| ApiError::bad("tokens", "`tokens` is required"))?;
    let vocab = serving.cap.vocab;
    if let Some(id) = tokens.iter().find(|&&id| id as usize >= vocab) {
        return Err(ApiError::bad("tokens", format!("token id {id} is outside the vocabulary of {vocab}")));
    }
    let pre = serving.pre.clone();
    let text = blocking(move || Ok(pre.tokenizer.decode(&tokens, false)?)).await?;
    Ok(Json(json!({"prompt": text})))
}
