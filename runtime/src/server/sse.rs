//! Streaming responses: a job's engine events become server-sent events,
//! `data: {chunk}` per piece of text, then the usage chunk if asked, then
//! `data: [DONE]`.
//!
//! Cancel-safety: the stream owns the job's event receiver. When the client
//! disconnects, hyper drops the response body and with it this stream and the
//! receiver; the engine thread sees the closed channel and frees the job's
//! sequences at its next step.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use tokio::sync::mpsc::UnboundedReceiver;

use super::api::{self, Delta, ResponseMeta, Usage};
use super::errors::ApiError;
use super::scheduler::Event;
use super::validate::Endpoint;
use super::InFlight;

struct StreamState {
    rx: UnboundedReceiver<Event>,
    meta: ResponseMeta,
    include_usage: bool,
    usage: Usage,
    /// Text offset per choice (completions' logprobs `text_offset`).
    offsets: Vec<usize>,
    open_choices: usize,
    pending: VecDeque<SseEvent>,
    finished: bool,
    _in_flight: InFlight,
}

fn data(v: &serde_json::Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

impl StreamState {
    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Token { choice, text, logprobs } => {
                let offset = self.offsets[choice];
                self.offsets[choice] += logprobs.as_ref().map_or(text.len(), |l| l.chosen.text.len());
                let delta = Delta::Text { text: &text, logprobs: logprobs.as_ref(), offset };
                self.pending.push_back(data(&api::chunk(&self.meta, choice, delta, self.include_usage)));
            }
            Event::Done { choice, finish, completion_tokens } => {
                self.usage.completion_tokens += completion_tokens;
                let c = api::chunk(&self.meta, choice, Delta::Finish(finish), self.include_usage);
                self.pending.push_back(data(&c));
                self.open_choices -= 1;
                if self.open_choices == 0 {
                    self.end();
                }
            }
            Event::Failed(e) => {
                self.pending.push_back(data(&e.body()));
                self.end();
            }
        }
    }

    fn end(&mut self) {
        if self.include_usage {
            self.pending.push_back(data(&api::usage_chunk(&self.meta, self.usage)));
        }
        self.pending.push_back(SseEvent::default().data("[DONE]"));
        self.finished = true;
    }
}

/// The streaming response for a submitted job of `choices` choices.
pub fn respond(
    rx: UnboundedReceiver<Event>,
    meta: ResponseMeta,
    choices: usize,
    prompt_tokens: usize,
    include_usage: bool,
    in_flight: InFlight,
) -> Response {
    let mut pending = VecDeque::new();
    if meta.endpoint == Endpoint::Chat {
        for i in 0..choices {
            pending.push_back(data(&api::chunk(&meta, i, Delta::Role, include_usage)));
        }
    }
    let state = StreamState {
        rx,
        meta,
        include_usage,
        usage: Usage { prompt_tokens, completion_tokens: 0 },
        offsets: vec![0; choices],
        open_choices: choices,
        pending,
        finished: false,
        _in_flight: in_flight,
    };
    let events = stream::unfold(state, |mut s| async move {
        loop {
            if let Some(e) = s.pending.pop_front() {
                return Some((Ok::<_, Infallible>(e), s));
            }
            if s.finished {
                return None;
            }
            match s.rx.recv().await {
                Some(ev) => s.on_event(ev),
                None => s.on_event(Event::Failed(ApiError::Internal("the engine stopped".into()))),
            }
        }
    });
    Sse::new(events).into_response()
}
