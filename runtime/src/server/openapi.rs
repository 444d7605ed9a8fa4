//! `GET /openapi.json`: an OpenAPI 3.1 description of every route, written by
//! hand (a derive-based generator would add a macro crate for ~100 lines).
//! `tests/server_protocol.rs` checks that every routed path is described.

use serde_json::{json, Value};

fn error_responses() -> Value {
    let e = json!({"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let mut r = serde_json::Map::new();
    for (code, what) in [
        ("400", "Malformed JSON, a wrong field type or value, a prompt plus max_tokens over the context"),
        ("401", "Missing or wrong API key (when the server has one)"),
        ("404", "Unknown model or adapter"),
        ("413", "Body over the size limit"),
        ("429", "Admission queue full; see Retry-After"),
        ("503", "Model loading, or the server is shutting down"),
    ] {
        let mut v = e.clone();
        v["description"] = what.into();
        r.insert(code.into(), v);
    }
    Value::Object(r)
}

fn generation(summary: &str, request: &str, response: &str) -> Value {
    let mut responses = error_responses();
    responses["200"] = json!({
        "description": "The completion; with `stream: true`, server-sent events `data: {chunk}` … `data: [DONE]`",
        "content": {
            "application/json": {"schema": {"$ref": format!("#/components/schemas/{response}")}},
            "text/event-stream": {"schema": {"type": "string"}}
        }
    });
    json!({"post": {
        "summary": summary,
        "security": [{"bearer": []}],
        "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{request}")}}}},
        "responses": responses,
    }})
}

fn plain(summary: &str, content_type: &str) -> Value {
    json!({"get": {"summary": summary, "responses": {"200": {"description": "OK", "content": {content_type: {}}}}}})
}

/// The OpenAPI document.
pub fn spec() -> Value {
    let sampling = json!({
        "model": {"type": "string", "description": "The served model id, or `<id>:<adapter>` for a loaded LoRA adapter"},
        "max_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2, "default": 1},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "description": "vLLM extension; 0 or -1 is off"},
        "min_p": {"type": "number"},
        "repetition_penalty": {"type": "number"},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "seed": {"type": "integer"},
        "n": {"type": "integer", "minimum": 1, "maximum": 16},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "ignore_eos": {"type": "boolean"},
        "stop_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0},
                           "description": "vLLM extension; token ids that end a choice"},
        "min_tokens": {"type": "integer", "minimum": 0, "description": "vLLM extension; no stop before this many tokens"},
        "logit_bias": {"type": "object", "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                       "description": "Token id (as a string) to a bias added to its logit"},
        "user": {"type": "string"}
    });
    let mut completion = sampling.clone();
    completion["prompt"] = json!({"oneOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "string"}},
        {"type": "array", "items": {"type": "integer"}}, {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}
    ]});
    completion["logprobs"] = json!({"type": "integer", "minimum": 0, "maximum": 20});
    let mut chat = sampling;
    chat["messages"] = json!({"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role"], "properties": {
        "role": {"type": "string"},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]}
    }}});
    chat["max_completion_tokens"] = json!({"type": "integer", "minimum": 1});
    chat["logprobs"] = json!({"type": "boolean"});
    chat["top_logprobs"] = json!({"type": "integer", "minimum": 0, "maximum": 20});
    let usage = json!({"type": "object", "properties": {
        "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}}});
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Arqon Serve", "version": env!("CARGO_PKG_VERSION"),
                 "description": "OpenAI-compatible completions and chat completions with continuous batching."},
        "paths": {
            "/v1/completions": generation("Text completion", "CompletionRequest", "Completion"),
            "/v1/chat/completions": generation("Chat completion (the model's chat template)", "ChatCompletionRequest", "ChatCompletion"),
            "/v1/models": {"get": {"summary": "The served model and its loaded LoRA adapters", "security": [{"bearer": []}],
                                   "responses": {"200": {"description": "The model, then one `<id>:<adapter>` entry per loaded adapter"}, "401": {"description": "Bad API key"}}}},
            "/tokenize": {"post": {"summary": "vLLM's: token ids of `prompt` (add_special_tokens, default true) or of `messages` through the chat template (add_generation_prompt, default true)",
                                   "requestBody": {"content": {"application/json": {}}},
                                   "responses": {"200": {"description": "{count, max_model_len, tokens}"}, "400": {"description": "Bad input"}}}},
            "/detokenize": {"post": {"summary": "vLLM's: the text of `tokens`",
                                     "requestBody": {"content": {"application/json": {}}},
                                     "responses": {"200": {"description": "{prompt}"}, "400": {"description": "Bad input"}}}},
            "/health": plain("Liveness: 200 while the process serves HTTP", "application/json"),
            "/ready": {"get": {"summary": "Readiness: 200 once the model is loaded, 503 while loading or draining",
                               "responses": {"200": {"description": "Ready"}, "503": {"description": "Loading or shutting down"}}}},
            "/metrics": plain("Prometheus metrics (text format 0.0.4)", "text/plain"),
            "/openapi.json": plain("This document", "application/json"),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "CompletionRequest": {"type": "object", "required": ["model", "prompt"], "properties": completion},
                "ChatCompletionRequest": {"type": "object", "required": ["model", "messages"], "properties": chat},
                "Completion": {"type": "object", "properties": {
                    "id": {"type": "string"}, "object": {"const": "text_completion"}, "created": {"type": "integer"},
                    "model": {"type": "string"}, "usage": usage,
                    "choices": {"type": "array", "items": {"type": "object", "properties": {
                        "index": {"type": "integer"}, "text": {"type": "string"}, "logprobs": {},
                        "finish_reason": {"enum": ["stop", "length"]}}}}}},
                "ChatCompletion": {"type": "object", "properties": {
                    "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"},
                    "model": {"type": "string"}, "usage": usage,
                    "choices": {"type": "array", "items": {"type": "object", "properties": {
                        "index": {"type": "integer"}, "message": {"type": "object"}, "logprobs": {},
                        "finish_reason": {"enum": ["stop", "length"]}}}}}},
                "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                    "message": {"type": "string"}, "type": {"type": "string"},
                    "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
            }
        }
    })
}
