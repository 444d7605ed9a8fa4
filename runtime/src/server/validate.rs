//! Parse, don't validate: an HTTP body becomes a [`ValidRequest`] (every field
//! type- and range-checked, unknown fields ignored as OpenAI does), and a
//! `ValidRequest` plus the tokenizer becomes a [`JobSpec`], the only thing the
//! scheduler accepts. A `JobSpec` has been checked against the context length,
//! the batch size and the KV-cache budget, so admission can never fail on it.
//!
//! Fields are read one by one from the JSON object (rather than through one
//! derived struct) so that every type error names its field in `param`.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::config::{Limits, MAX_N};
use super::errors::ApiError;
use crate::chat::{ChatTemplate, Message};
use crate::engine::GenerateRequest;
use crate::error::Error;
use crate::model::kv::KvShape;
use crate::model::LoraAdapter;
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;

/// Which OpenAI route a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/completions`.
    Completion,
    /// `POST /v1/chat/completions`.
    Chat,
}

/// One prompt of a completion request.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// Text, tokenized with BOS.
    Text(String),
    /// Token ids, used as given.
    Ids(Vec<u32>),
}

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Completion prompts (one or more).
    Prompts(Vec<PromptInput>),
    /// A chat, rendered with the model's template.
    Chat(Vec<Message>),
}

/// A request whose every field has the right type and range.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    /// The route.
    pub endpoint: Endpoint,
    /// The model id as the client sent it (echoed in responses).
    pub model: String,
    /// The adapter of `"model": "base:NAME"`: `Some(NAME)`.
    pub adapter: Option<String>,
    /// The prompt(s) or messages.
    pub input: Input,
    /// New tokens per choice; `None` takes the route's default.
    pub max_tokens: Option<usize>,
    /// Choices per prompt.
    pub n: usize,
    /// Sampling parameters (validated).
    pub sampling: SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Server-sent events instead of one JSON body.
    pub stream: bool,
    /// Send a final usage chunk when streaming.
    pub include_usage: bool,
    /// Log-probabilities: `Some(k)` returns the chosen token's and the top `k`.
    pub logprobs: Option<usize>,
    /// Keep going past end-of-generation tokens (vLLM's extension).
    pub ignore_eos: bool,
    /// More token ids that end a choice, as end-of-generation does (vLLM's).
    pub stop_token_ids: Vec<u32>,
    /// No stop before this many new tokens (vLLM's).
    pub min_tokens: usize,
}

/// Reads `name`; absent and `null` are `None`; a wrong type names the field.
pub(crate) fn field<T: DeserializeOwned>(
    obj: &Map<String, Value>,
    name: &str,
    what: &str,
) -> Result<Option<T>, ApiError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            T::deserialize(v).map(Some).map_err(|e| ApiError::bad(name, format!("`{name}` must be {what}: {e}")))
        }
    }
}

/// The body as a JSON object.
pub(crate) fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| ApiError::BadRequest {
        message: format!("the body is not valid JSON: {e}"),
        param: None,
        code: Some("invalid_json"),
    })?;
    let Value::Object(obj) = v else {
        return Err(ApiError::BadRequest { message: "the body must be a JSON object".into(), param: None, code: None });
    };
    Ok(obj)
}

/// OpenAI fields this server does not implement are refused when they ask
/// for something (a client would otherwise get an answer that silently
/// ignores them), and accepted at their do-nothing values, which SDKs and
/// frameworks often send: `response_format` `{"type": "text"}`, empty
/// `tools`, `tool_choice` `"none"`, `best_of` equal to `n`, an empty
/// `suffix`.
fn refuse_unsupported(obj: &Map<String, Value>, n: i64) -> Result<(), ApiError> {
    let inert = |name: &str, v: &Value| match name {
        "response_format" => v.get("type").and_then(Value::as_str) == Some("text"),
        "tools" | "functions" => v.as_array().is_some_and(Vec::is_empty),
        "tool_choice" | "function_call" => v.as_str() == Some("none"),
        "best_of" => v.as_i64() == Some(n),
        "suffix" => v.as_str() == Some(""),
        _ => false,
    };
    for name in ["response_format", "tools", "functions", "tool_choice", "function_call", "best_of", "suffix"] {
        match obj.get(name) {
            None | Some(Value::Null) => {}
            Some(v) if inert(name, v) => {}
            Some(v) => return Err(ApiError::bad(name, format!("`{name}` {v} is not supported by this server"))),
        }
    }
    Ok(())
}

/// Parses a JSON body for `endpoint`; `model_id` is the one model served.
pub fn parse(endpoint: Endpoint, body: &[u8], model_id: &str) -> Result<ValidRequest, ApiError> {
    let obj = object(body)?;
    let model: String =
        field(&obj, "model", "a string")?.ok_or_else(|| ApiError::bad("model", "`model` is required"))?;
    // `base` or `base:adapter` (the vLLM/LoRAX convention); the adapter is
    // resolved against the registry by the handler.
    let adapter = match model.strip_prefix(model_id) {
        Some("") => None,
        Some(rest) => match rest.strip_prefix(':') {
            Some(name) if !name.is_empty() => Some(name.to_string()),
            _ => return Err(ApiError::ModelNotFound(model)),
        },
        None => return Err(ApiError::ModelNotFound(model)),
    };
    let input = match endpoint {
        Endpoint::Completion => Input::Prompts(parse_prompt(&obj)?),
        Endpoint::Chat => Input::Chat(parse_messages(&obj)?),
    };
    let max_tokens: Option<i64> = match endpoint {
        Endpoint::Chat => match field(&obj, "max_completion_tokens", "an integer")? {
            Some(m) => Some(m),
            None => field(&obj, "max_tokens", "an integer")?,
        },
        Endpoint::Completion => field(&obj, "max_tokens", "an integer")?,
    };
    let max_tokens = match max_tokens {
        Some(m) if m < 1 => return Err(ApiError::bad("max_tokens", format!("max_tokens must be at least 1, got {m}"))),
        Some(m) => Some(usize::try_from(m).unwrap_or(usize::MAX)),
        None => None,
    };
    let n: i64 = field(&obj, "n", "an integer")?.unwrap_or(1);
    if !(1..=MAX_N as i64).contains(&n) {
        return Err(ApiError::bad("n", format!("n must be between 1 and {MAX_N}, got {n}")));
    }
    let defaults = SamplingParams::default();
    let top_k: i64 = field(&obj, "top_k", "an integer")?.unwrap_or(0);
    // OpenAI's `{"token id": bias}`; ids are checked against the vocabulary with the prompt.
    let logit_bias = field::<BTreeMap<String, f32>>(&obj, "logit_bias", "an object of token ids to numbers")?
        .unwrap_or_default()
        .into_iter()
        .map(|(k, b)| match k.parse::<u32>() {
            Ok(id) => Ok((id, b)),
            Err(_) => Err(ApiError::bad("logit_bias", format!("logit_bias key {k:?} is not a token id"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let sampling = SamplingParams {
        temperature: field(&obj, "temperature", "a number")?.unwrap_or(1.0),
        top_k: usize::try_from(top_k).unwrap_or(0), // -1 (vLLM) and 0 both mean off
        top_p: field(&obj, "top_p", "a number")?.unwrap_or(defaults.top_p),
        min_p: field(&obj, "min_p", "a number")?.unwrap_or(defaults.min_p),
        repetition_penalty: field(&obj, "repetition_penalty", "a number")?.unwrap_or(defaults.repetition_penalty),
        frequency_penalty: field(&obj, "frequency_penalty", "a number")?.unwrap_or(0.0),
        presence_penalty: field(&obj, "presence_penalty", "a number")?.unwrap_or(0.0),
        seed: field::<i64>(&obj, "seed", "an integer")?.map(|s| s as u64),
        logit_bias,
    };
    if sampling.temperature > 2.0 {
        return Err(ApiError::bad("temperature", "temperature must be between 0 and 2"));
    }
    if let Some((id, b)) = sampling.logit_bias.iter().find(|(_, b)| !(-100.0..=100.0).contains(b)) {
        return Err(ApiError::bad(
            "logit_bias",
            format!("logit_bias of token {id} must be between -100 and 100, got {b}"),
        ));
    }
    sampling.validate().map_err(|e| ApiError::BadRequest { message: e.to_string(), param: None, code: None })?;
    let stop = match obj.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(_) => field::<Vec<String>>(&obj, "stop", "a string or a list of strings")?.unwrap_or_default(),
    };
    if stop.len() > 16 {
        return Err(ApiError::bad("stop", "at most 16 stop strings"));
    }
    let stream: bool = field(&obj, "stream", "a boolean")?.unwrap_or(false);
    #[derive(Deserialize)]
    struct StreamOptions {
        #[serde(default)]
        include_usage: bool,
    }
    let include_usage = field::<StreamOptions>(&obj, "stream_options", "an object {include_usage: bool}")?
        .is_some_and(|o| o.include_usage);
    let logprobs = match endpoint {
        Endpoint::Completion => match field::<i64>(&obj, "logprobs", "an integer")? {
            Some(k) if !(0..=20).contains(&k) => return Err(ApiError::bad("logprobs", "logprobs must be 0..=20")),
            k => k.map(|k| k as usize),
        },
        Endpoint::Chat => {
            let on: bool = field(&obj, "logprobs", "a boolean")?.unwrap_or(false);
            let top: i64 = field(&obj, "top_logprobs", "an integer")?.unwrap_or(0);
            if !(0..=20).contains(&top) {
                return Err(ApiError::bad("top_logprobs", "top_logprobs must be 0..=20"));
            }
            if top > 0 && !on {
                return Err(ApiError::bad("top_logprobs", "top_logprobs needs logprobs: true"));
            }
            on.then_some(top as usize)
        }
    };
    if field::<bool>(&obj, "echo", "a boolean")?.unwrap_or(false) {
        return Err(ApiError::bad("echo", "echo is not supported"));
    }
    refuse_unsupported(&obj, n)?;
    let _user: Option<String> = field(&obj, "user", "a string")?;
    let ignore_eos = field(&obj, "ignore_eos", "a boolean")?.unwrap_or(false);
    let stop_token_ids: Vec<u32> = field(&obj, "stop_token_ids", "a list of token ids")?.unwrap_or_default();
    let min_tokens: usize = field(&obj, "min_tokens", "a non-negative integer")?.unwrap_or(0);
    Ok(ValidRequest {
        endpoint,
        model,
        adapter,
        input,
        max_tokens,
        n: n as usize,
        sampling,
        stop,
        stream,
        include_usage,
        logprobs,
        ignore_eos,
        stop_token_ids,
        min_tokens,
    })
}

fn parse_prompt(obj: &Map<String, Value>) -> Result<Vec<PromptInput>, ApiError> {
    let bad = || ApiError::bad("prompt", "`prompt` must be a string, a list of strings, or a list of token ids");
    let ids = |v: &[Value]| -> Result<Vec<u32>, ApiError> {
        v.iter().map(|x| x.as_u64().and_then(|i| u32::try_from(i).ok()).ok_or_else(bad)).collect()
    };
    let prompts = match obj.get("prompt") {
        None | Some(Value::Null) => return Err(ApiError::bad("prompt", "`prompt` is required")),
        Some(Value::String(s)) => vec![PromptInput::Text(s.clone())],
        Some(Value::Array(a)) if a.is_empty() => return Err(ApiError::bad("prompt", "`prompt` must not be empty")),
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            a.iter().map(|s| PromptInput::Text(s.as_str().unwrap_or_default().to_string())).collect()
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_number) => vec![PromptInput::Ids(ids(a)?)],
        Some(Value::Array(a)) => a
            .iter()
            .map(|p| match p {
                Value::Array(inner) => Ok(PromptInput::Ids(ids(inner)?)),
                _ => Err(bad()),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad()),
    };
    Ok(prompts)
}

pub(crate) fn parse_messages(obj: &Map<String, Value>) -> Result<Vec<Message>, ApiError> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Content {
        Text(String),
        Parts(Vec<Part>),
    }
    #[derive(Deserialize)]
    struct Part {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        text: Option<String>,
    }
    #[derive(Deserialize)]
    struct Msg {
        role: String,
        #[serde(default)]
        content: Option<Content>,
    }
    let msgs: Vec<Msg> = field(obj, "messages", "a list of {role, content} objects")?
        .ok_or_else(|| ApiError::bad("messages", "`messages` is required"))?;
    if msgs.is_empty() {
        return Err(ApiError::bad("messages", "`messages` must not be empty"));
    }
    msgs.into_iter()
        .map(|m| {
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        if p.kind != "text" {
                            return Err(ApiError::bad(
                                "messages",
                                format!("content parts of type {:?} are not supported", p.kind),
                            ));
                        }
                        s.push_str(&p.text.unwrap_or_default());
                    }
                    s
                }
            };
            Ok(Message { role: m.role, content })
        })
        .collect()
}

/// What the HTTP side needs to tokenize: a copy of the tokenizer and chat
/// template, used on blocking threads, never on the async runtime or the engine thread.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    /// The model's tokenizer.
    pub tokenizer: Tokenizer,
    /// The model's chat template.
    pub chat: ChatTemplate,
}

/// Model-derived admission facts.
#[derive(Debug, Clone)]
pub struct Capacity {
    /// Effective context: the model's, capped by `--max-context`.
    pub context: usize,
    /// KV-cache shape (bytes per block).
    pub kv: KvShape,
    /// Blocks in the server's paged KV cache. A request whose choices'
    /// worst cases ([`JobSpec::choice_blocks`] each) exceed it is refused:
    /// it could not finish even alone. Admission takes only the prompts'
    /// blocks ([`JobSpec::prompt_blocks`]); the scheduler preempts when the
    /// running sequences outgrow the cache.
    pub kv_blocks: usize,
    /// Vocabulary size (token-id prompts are checked against it).
    pub vocab: usize,
    /// The limits from the configuration.
    pub limits: Limits,
}

/// A tokenized, fully checked request: the scheduler's only input.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// One generation per choice, in choice order (prompt-major, then `n`).
    pub(crate) seqs: Vec<GenerateRequest>,
    /// Per choice: it forks from the first choice of its prompt once that
    /// has prefilled, instead of computing the prompt again (choices
    /// `1..n` of each prompt).
    pub(crate) forks: Vec<bool>,
    /// Log-probabilities wanted (top-k count).
    pub(crate) logprobs: Option<usize>,
}

impl JobSpec {
    /// KV blocks one choice of `prompt` tokens and up to `max_tokens` new
    /// ones can come to hold: all of them, less the prompt's full blocks
    /// when it forks from the first choice (they are shared, held once).
    pub fn choice_blocks(prompt: usize, max_tokens: usize, forks: bool) -> usize {
        let shared = if forks { KvShape::full_blocks(prompt) } else { 0 };
        KvShape::blocks_for(prompt + max_tokens) - shared
    }

    /// KV blocks the job's prompts take to compute: each prompt's, and a
    /// copy of its partial last block for each choice forking from it.
    pub fn prompt_blocks(&self) -> usize {
        self.seqs
            .iter()
            .zip(&self.forks)
            .map(|(r, &forks)| match forks {
                true => KvShape::fork_copies(r.prompt_ids.len()),
                false => KvShape::blocks_for(r.prompt_ids.len()),
            })
            .sum()
    }

    /// Choices in this job.
    pub fn choices(&self) -> usize {
        self.seqs.len()
    }

    /// Prompt tokens, counted once per prompt (as OpenAI's `usage` does).
    pub fn prompt_tokens(&self, n: usize) -> usize {
        self.seqs.iter().step_by(n.max(1)).map(|s| s.prompt_ids.len()).sum()
    }
}

impl ValidRequest {
    /// Tokenizes and checks against context, batch and KV budget; every
    /// sequence of the job runs with `adapter` (the one `self.adapter` names,
    /// resolved by the caller). Blocking: call it off the async runtime.
    pub fn prepare(
        &self,
        pre: &Preprocessor,
        cap: &Capacity,
        adapter: Option<Arc<LoraAdapter>>,
    ) -> Result<JobSpec, ApiError> {
        let prompts: Vec<Vec<u32>> = match &self.input {
            Input::Chat(msgs) => {
                let text = pre.chat.render(msgs, true)?;
                vec![pre.tokenizer.encode(&text, false)?]
            }
            Input::Prompts(ps) => ps
                .iter()
                .map(|p| match p {
                    PromptInput::Text(t) => Ok(pre.tokenizer.encode(t, true)?),
                    PromptInput::Ids(ids) => match ids.iter().find(|&&i| i as usize >= cap.vocab) {
                        Some(i) => Err(ApiError::bad(
                            "prompt",
                            format!("token id {i} is outside the vocabulary of {}", cap.vocab),
                        )),
                        None => Ok(ids.clone()),
                    },
                })
                .collect::<Result<_, _>>()?,
        };
        let outside = |param: &str, id: u32| {
            ApiError::bad(param, format!("{param}: token id {id} is outside the vocabulary of {}", cap.vocab))
        };
        if let Some(&(id, _)) = self.sampling.logit_bias.iter().find(|(id, _)| *id as usize >= cap.vocab) {
            return Err(outside("logit_bias", id));
        }
        if let Some(&id) = self.stop_token_ids.iter().find(|&&id| id as usize >= cap.vocab) {
            return Err(outside("stop_token_ids", id));
        }
        if prompts.len() * self.n > cap.limits.max_batch {
            return Err(ApiError::bad(
                "n",
                format!(
                    "{} choices in one request exceed the batch size {}",
                    prompts.len() * self.n,
                    cap.limits.max_batch
                ),
            ));
        }
        let mut seqs = Vec::with_capacity(prompts.len() * self.n);
        let mut forks = Vec::with_capacity(prompts.len() * self.n);
        let mut kv_blocks = 0usize;
        for ids in prompts {
            if ids.is_empty() {
                return Err(ApiError::bad("prompt", "the prompt is empty"));
            }
            let max_tokens = match (self.max_tokens, self.endpoint) {
                (Some(m), _) => m,
                (None, Endpoint::Completion) => 16,
                (None, Endpoint::Chat) => {
                    cap.limits.default_max_tokens.min(cap.context.saturating_sub(ids.len())).max(1)
                }
            };
            if self.min_tokens > max_tokens {
                return Err(ApiError::bad(
                    "min_tokens",
                    format!("min_tokens ({}) must not exceed max_tokens ({max_tokens})", self.min_tokens),
                ));
            }
            if ids.len().saturating_add(max_tokens) > cap.context {
                return Err(
                    Error::ContextOverflow { prompt_tokens: ids.len(), max_tokens, context: cap.context }.into()
                );
            }
            for i in 0..self.n {
                kv_blocks += JobSpec::choice_blocks(ids.len(), max_tokens, i > 0);
                forks.push(i > 0);
                let sampling = SamplingParams {
                    seed: self.sampling.seed.map(|s| s.wrapping_add(i as u64)),
                    ..self.sampling.clone()
                };
                seqs.push(GenerateRequest {
                    prompt_ids: ids.clone(),
                    max_tokens,
                    sampling,
                    stop: self.stop.clone(),
                    stop_token_ids: self.stop_token_ids.clone(),
                    ignore_eos: self.ignore_eos,
                    min_tokens: self.min_tokens,
                    adapter: adapter.clone(),
                });
            }
        }
        if kv_blocks > cap.kv_blocks {
            let mib = |blocks: usize| (blocks as u64 * cap.kv.block_bytes()).div_ceil(1 << 20);
            return Err(ApiError::BadRequest {
                message: format!(
                    "this request needs {kv_blocks} KV-cache blocks ({} MiB), more than the server's whole cache \
                     of {} blocks ({} MiB): lower max_tokens or n",
                    mib(kv_blocks),
                    cap.kv_blocks,
                    mib(cap.kv_blocks),
                ),
                param: Some("max_tokens".into()),
                code: Some("kv_cache_budget_exceeded"),
            });
        }
        Ok(JobSpec { seqs, forks, logprobs: self.logprobs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(body: &str) -> Result<ValidRequest, ApiError> {
        parse(Endpoint::Completion, body.as_bytes(), "m")
    }

    fn param(e: ApiError) -> Option<String> {
        e.body()["error"]["param"].as_str().map(str::to_string)
    }

    #[test]
    fn unknown_fields_are_ignored_and_defaults_apply() {
        let r = p(r#"{"model":"m","prompt":"hi","whatever":{"x":1}}"#).unwrap();
        assert_eq!(r.input, Input::Prompts(vec![PromptInput::Text("hi".into())]));
        assert_eq!((r.n, r.max_tokens, r.stream), (1, None, false));
        assert_eq!(r.sampling.temperature, 1.0);
    }

    #[test]
    fn wrong_types_name_the_field() {
        for (body, name) in [
            (r#"{"model":"m","prompt":"hi","max_tokens":"5"}"#, "max_tokens"),
            (r#"{"model":"m","prompt":"hi","temperature":"hot"}"#, "temperature"),
            (r#"{"model":"m","prompt":"hi","stream":"yes"}"#, "stream"),
            (r#"{"model":"m","prompt":"hi","stop":[1]}"#, "stop"),
            (r#"{"model":"m","prompt":{"a":1}}"#, "prompt"),
            (r#"{"model":"m","prompt":"hi","max_tokens":-3}"#, "max_tokens"),
            (r#"{"model":"m","prompt":"hi","n":0}"#, "n"),
            (r#"{"model":7,"prompt":"hi"}"#, "model"),
        ] {
            assert_eq!(param(p(body).unwrap_err()).as_deref(), Some(name), "{body}");
        }
    }

    #[test]
    fn base_colon_adapter_selects_an_adapter() {
        let r = p(r#"{"model":"m:fr-v2","prompt":"hi"}"#).unwrap();
        assert_eq!((r.model.as_str(), r.adapter.as_deref()), ("m:fr-v2", Some("fr-v2")));
        assert_eq!(p(r#"{"model":"m","prompt":"hi"}"#).unwrap().adapter, None);
        for m in ["m:", "mx", "x:m", "m-fr"] {
            let body = format!(r#"{{"model":"{m}","prompt":"hi"}}"#);
            assert_eq!(p(&body).unwrap_err(), ApiError::ModelNotFound(m.into()), "{m}");
        }
    }

    #[test]
    fn unknown_model_and_bad_json() {
        assert_eq!(p(r#"{"model":"x","prompt":"hi"}"#).unwrap_err(), ApiError::ModelNotFound("x".into()));
        assert_eq!(p("{not json").unwrap_err().status(), axum::http::StatusCode::BAD_REQUEST);
        assert!(p("[1,2]").is_err());
    }

    #[test]
    fn chat_messages_and_logprobs() {
        let c = |b: &str| parse(Endpoint::Chat, b.as_bytes(), "m");
        let r = c(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],"logprobs":true,"top_logprobs":2,"max_completion_tokens":3}"#).unwrap();
        assert_eq!(r.input, Input::Chat(vec![Message::new("user", "ab")]));
        assert_eq!((r.logprobs, r.max_tokens), (Some(2), Some(3)));
        assert_eq!(param(c(r#"{"model":"m","messages":[]}"#).unwrap_err()).as_deref(), Some("messages"));
        assert_eq!(param(c(r#"{"model":"m","messages":"hi"}"#).unwrap_err()).as_deref(), Some("messages"));
    }

    #[test]
    fn kv_reservations_are_whole_blocks() {
        let cap = Capacity {
            context: 256,
            kv: KvShape {
                layers: 2,
                q_heads: 2,
                kv_heads: 1,
                head_dim: 4,
                max_len: 200,
                dtype: candle_core::DType::F32,
            },
            kv_blocks: 10,
            vocab: 10,
            limits: super::super::config::ServeArgs::default_limits_for_tests(),
        };
        assert_eq!(KvShape::blocks_for(1), 1);
        assert_eq!(KvShape::blocks_for(16), 1);
        assert_eq!(KvShape::blocks_for(17), 2);
        assert_eq!(KvShape::blocks_for(190), 12);
        assert_eq!(cap.kv.block_bytes(), 2 * 2 * 16 * 4 * 4);
    }
}
