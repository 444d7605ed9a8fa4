//! OpenAI's response shapes: completion and chat completion objects, their
//! streaming chunks, usage, and log-probabilities in each route's own format
//! (`/v1/completions`: `tokens`/`token_logprobs`/`top_logprobs`/`text_offset`;
//! `/v1/chat/completions`: `content: [{token, logprob, bytes, top_logprobs}]`).

use serde_json::{json, Map, Value};

use super::scheduler::{Logprobs, TokenLogprob};
use super::validate::Endpoint;
use crate::engine::FinishReason;

/// Identity shared by every object of one response.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    /// `cmpl-…` or `chatcmpl-…`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The model id.
    pub model: String,
    /// The route.
    pub endpoint: Endpoint,
}

/// `usage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens (once per prompt).
    pub prompt_tokens: usize,
    /// Generated tokens over all choices.
    pub completion_tokens: usize,
}

impl Usage {
    /// As JSON.
    pub fn json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }
}

fn finish_str(f: Option<FinishReason>) -> Value {
    match f {
        Some(FinishReason::Stop) => "stop".into(),
        Some(FinishReason::Length) => "length".into(),
        None => Value::Null,
    }
}

fn chat_token(t: &TokenLogprob) -> Value {
    json!({"token": t.text, "logprob": t.logprob, "bytes": t.text.as_bytes()})
}

/// Log-probabilities of some consecutive tokens, in the route's format;
/// `offset` is the text offset of the first one (completions only).
pub fn logprobs_json(endpoint: Endpoint, lps: &[Logprobs], mut offset: usize) -> Value {
    match endpoint {
        Endpoint::Chat => json!({"content": lps.iter().map(|l| {
            let mut v = chat_token(&l.chosen);
            v["top_logprobs"] = l.top.iter().map(chat_token).collect();
            v
        }).collect::<Vec<_>>()}),
        Endpoint::Completion => {
            let mut offsets = Vec::with_capacity(lps.len());
            for l in lps {
                offsets.push(offset);
                offset += l.chosen.text.len();
            }
            json!({
                "tokens": lps.iter().map(|l| l.chosen.text.clone()).collect::<Vec<_>>(),
                "token_logprobs": lps.iter().map(|l| l.chosen.logprob).collect::<Vec<_>>(),
                "top_logprobs": lps.iter().map(|l| {
                    l.top.iter().map(|t| (t.text.clone(), Value::from(t.logprob))).collect::<Map<_, _>>()
                }).collect::<Vec<_>>(),
                "text_offset": offsets,
            })
        }
    }
}

/// One finished choice of a non-streaming response.
#[derive(Debug, Clone, Default)]
pub struct Choice {
    /// All its text.
    pub text: String,
    /// Per-token log-probabilities, when asked for.
    pub logprobs: Option<Vec<Logprobs>>,
    /// Why it ended.
    pub finish: Option<FinishReason>,
    /// Tokens generated.
    pub completion_tokens: usize,
}

/// The whole non-streaming response object.
pub fn response(meta: &ResponseMeta, choices: &[Choice], usage: Usage) -> Value {
    let choices: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let lp = c.logprobs.as_ref().map_or(Value::Null, |l| logprobs_json(meta.endpoint, l, 0));
            match meta.endpoint {
                Endpoint::Completion => {
                    json!({"index": i, "text": c.text, "logprobs": lp, "finish_reason": finish_str(c.finish)})
                }
                Endpoint::Chat => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": lp,
                    "finish_reason": finish_str(c.finish),
                }),
            }
        })
        .collect();
    let object = match meta.endpoint {
        Endpoint::Completion => "text_completion",
        Endpoint::Chat => "chat.completion",
    };
    json!({
        "id": meta.id, "object": object, "created": meta.created, "model": meta.model,
        "choices": choices, "usage": usage.json(),
    })
}

/// What one streaming chunk carries for one choice.
#[derive(Debug, Clone)]
pub enum Delta<'a> {
    /// Chat only: the opening `{"role": "assistant", "content": ""}`.
    Role,
    /// New text (and its tokens' log-probabilities; `offset` is the text offset).
    Text {
        /// The text.
        text: &'a str,
        /// Log-probabilities of the tokens behind it.
        logprobs: Option<&'a Logprobs>,
        /// Text offset of the first token (completions' `text_offset`).
        offset: usize,
    },
    /// The end, with its reason.
    Finish(FinishReason),
}

/// One streaming chunk for one choice; `with_usage` adds `"usage": null`
/// (what OpenAI sends when `stream_options.include_usage` is set).
pub fn chunk(meta: &ResponseMeta, index: usize, delta: Delta<'_>, with_usage: bool) -> Value {
    let (text, lp, finish) = match &delta {
        Delta::Role => ("", Value::Null, None),
        Delta::Text { text, logprobs, offset } => (
            *text,
            logprobs.map_or(Value::Null, |l| logprobs_json(meta.endpoint, std::slice::from_ref(l), *offset)),
            None,
        ),
        Delta::Finish(f) => ("", Value::Null, Some(*f)),
    };
    let choice = match meta.endpoint {
        Endpoint::Completion => {
            json!({"index": index, "text": text, "logprobs": lp, "finish_reason": finish_str(finish)})
        }
        Endpoint::Chat => {
            let d = match delta {
                Delta::Role => json!({"role": "assistant", "content": ""}),
                Delta::Text { .. } => json!({"content": text}),
                Delta::Finish(_) => json!({}),
            };
            json!({"index": index, "delta": d, "logprobs": lp, "finish_reason": finish_str(finish)})
        }
    };
    let mut v = json!({
        "id": meta.id, "object": chunk_object(meta.endpoint), "created": meta.created,
        "model": meta.model, "choices": [choice],
    });
    if with_usage {
        v["usage"] = Value::Null;
    }
    v
}

/// The last chunk when `include_usage` is set: no choices, only usage.
pub fn usage_chunk(meta: &ResponseMeta, usage: Usage) -> Value {
    json!({
        "id": meta.id, "object": chunk_object(meta.endpoint), "created": meta.created,
        "model": meta.model, "choices": [], "usage": usage.json(),
    })
}

fn chunk_object(e: Endpoint) -> &'static str {
    match e {
        Endpoint::Completion => "text_completion",
        Endpoint::Chat => "chat.completion.chunk",
    }
}

/// `GET /v1/models`: the base model, then each loaded adapter as `base:NAME`
/// (with `parent`, as vLLM lists LoRA modules).
pub fn models(model_id: &str, created: u64, adapters: &[String]) -> Value {
    let mut data = vec![json!({"id": model_id, "object": "model", "created": created, "owned_by": "arqon"})];
    data.extend(adapters.iter().map(|a| {
        json!({"id": format!("{model_id}:{a}"), "object": "model", "created": created, "owned_by": "arqon",
               "parent": model_id})
    }));
    json!({"object": "list", "data": data})
}
