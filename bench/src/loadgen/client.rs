//! One streamed request, measured: connect, send, read SSE frames as they arrive.
//!
//! Each request opens its own TCP connection (loopback connect costs tens of
//! microseconds) rather than sharing a pool: a pool would add its own queueing and
//! keep-alive policy between the clock and the server, and llama.cpp's server gives each
//! open connection a thread. The connect is inside the measured time, as for a client.
//!
//! Nothing a server sends can panic this module: every failure becomes a [`Failure`].

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;

use super::config::{Endpoint, RequestSpec, Target};
use super::sse::{parse_line, Event, LineSplitter};

/// Why a request failed. A closed set: each has a stable label for the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// TCP connect or HTTP handshake failed.
    Connect,
    /// The server answered with a status other than 200.
    Status(u16),
    /// The connection broke while reading the response.
    Transport,
    /// The request ran past its timeout.
    Timeout,
    /// The stream ended with neither `[DONE]` nor a finish reason.
    NoEnd,
    /// The stream ended properly but with fewer tokens than asked for.
    Short,
    /// The server sent an error object inside the stream.
    ServerError,
    /// A `data:` payload was not a chunk we understand.
    Malformed,
}

impl Failure {
    /// Stable label used as the key in the report's error counts.
    pub fn label(&self) -> String {
        match self {
            Failure::Connect => "connect".into(),
            Failure::Status(code) => format!("http_{code}"),
            Failure::Transport => "transport".into(),
            Failure::Timeout => "timeout".into(),
            Failure::NoEnd => "no_end".into(),
            Failure::Short => "short".into(),
            Failure::ServerError => "server_error".into(),
            Failure::Malformed => "malformed".into(),
        }
    }
}

/// The measurements of one request.
#[derive(Debug, Clone)]
pub struct Record {
    /// `None` when the request succeeded.
    pub failure: Option<Failure>,
    /// First failure detail, for the log.
    pub detail: Option<String>,
    /// Request start to the first chunk with generated text.
    pub ttft: Option<Duration>,
    /// Gaps between consecutive chunks with generated text.
    pub gaps: Vec<Duration>,
    /// Output tokens: the server's `usage.completion_tokens` if it sent it, else the
    /// number of chunks with generated text (one token per chunk on the servers we load).
    pub tokens: u32,
    /// Chunks with generated text.
    pub text_chunks: u32,
    /// Request start to the end of the response.
    pub e2e: Duration,
    /// When the response ended, measured from the start of the level.
    pub finished_at: Duration,
}

/// A request ready to send: its endpoint path, headers and body.
#[derive(Debug, Clone)]
pub struct Prepared {
    target: Target,
    path: String,
    api_key: Option<String>,
    body: Bytes,
    max_tokens: u32,
    allow_early_stop: bool,
}

impl Prepared {
    /// Builds the JSON body for request number `index` of `spec`.
    pub fn new(target: &Target, spec: &RequestSpec, index: u64) -> Self {
        let prompt =
            if spec.distinct_prompts { format!("Request {index}.\n{}", spec.prompt) } else { spec.prompt.clone() };
        let mut body = json!({
            "model": spec.model,
            "max_tokens": spec.max_tokens,
            "temperature": 0.0,
            "stream": true,
        });
        // `body` is a literal object above, so these inserts always find a map.
        if let Value::Object(map) = &mut body {
            match spec.endpoint {
                Endpoint::Completions => map.insert("prompt".into(), Value::String(prompt)),
                Endpoint::Chat => map.insert("messages".into(), json!([{"role": "user", "content": prompt}])),
            };
            if spec.ignore_eos {
                map.insert("ignore_eos".into(), Value::Bool(true));
            }
            if !spec.ban_tokens.is_empty() {
                let bias: serde_json::Map<String, Value> =
                    spec.ban_tokens.iter().map(|id| (id.to_string(), json!(-100))).collect();
                map.insert("logit_bias".into(), Value::Object(bias));
            }
            if spec.include_usage {
                map.insert("stream_options".into(), json!({"include_usage": true}));
            }
        }
        Self {
            target: target.clone(),
            path: format!("{}{}", target.base_path, spec.endpoint.path()),
            api_key: spec.api_key.clone(),
            body: Bytes::from(body.to_string()),
            max_tokens: spec.max_tokens,
            allow_early_stop: spec.allow_early_stop,
        }
    }
}

/// What the stream has told us so far.
#[derive(Debug, Default)]
struct StreamState {
    ttft: Option<Duration>,
    last_text_at: Option<Instant>,
    gaps: Vec<Duration>,
    text_chunks: u32,
    usage_tokens: Option<u32>,
    finish_reason: Option<String>,
    done: bool,
    failure: Option<(Failure, String)>,
}

impl StreamState {
    fn on_event(&mut self, event: Event, started: Instant, now: Instant) {
        match event {
            Event::Ignore => {}
            Event::Done => self.done = true,
            Event::ServerError(message) => self.fail(Failure::ServerError, message),
            Event::Malformed(message) => self.fail(Failure::Malformed, message),
            Event::Chunk(chunk) => {
                if !chunk.text.is_empty() {
                    self.text_chunks += 1;
                    match self.last_text_at {
                        None => self.ttft = Some(now - started),
                        Some(previous) => self.gaps.push(now - previous),
                    }
                    self.last_text_at = Some(now);
                }
                if chunk.completion_tokens.is_some() {
                    self.usage_tokens = chunk.completion_tokens;
                }
                if chunk.finish_reason.is_some() {
                    self.finish_reason = chunk.finish_reason;
                }
            }
        }
    }

    fn fail(&mut self, failure: Failure, detail: String) {
        if self.failure.is_none() {
            self.failure = Some((failure, detail));
        }
    }

    fn tokens(&self) -> u32 {
        self.usage_tokens.unwrap_or(self.text_chunks)
    }

    /// Judges a stream that has ended: the checks that need the whole stream.
    fn finish(&mut self, max_tokens: u32, allow_early_stop: bool) {
        if !self.done && self.finish_reason.is_none() {
            self.fail(Failure::NoEnd, "stream ended without [DONE] or finish_reason".into());
        }
        let tokens = self.tokens();
        let early_stop_ok = allow_early_stop && self.finish_reason.as_deref() == Some("stop");
        if tokens < max_tokens && !early_stop_ok {
            let reason = self.finish_reason.as_deref().unwrap_or("none");
            self.fail(Failure::Short, format!("{tokens} of {max_tokens} tokens, finish_reason {reason}"));
        }
    }
}

/// Sends `request`, reads its stream to the end or to `timeout`, and measures it.
/// `level_start` anchors [`Record::finished_at`].
pub async fn send(request: &Prepared, timeout: Duration, level_start: Instant) -> Record {
    let started = Instant::now();
    let mut state = StreamState::default();
    let result = tokio::time::timeout(timeout, exchange(request, started, &mut state)).await;
    match result {
        Err(_elapsed) => state.fail(Failure::Timeout, format!("no end after {timeout:?}")),
        Ok(Err((failure, detail))) => state.fail(failure, detail),
        Ok(Ok(())) => state.finish(request.max_tokens, request.allow_early_stop),
    }
    let ended = Instant::now();
    let tokens = state.tokens();
    let (failure, detail) = state.failure.map_or((None, None), |(f, d)| (Some(f), Some(d)));
    Record {
        failure,
        detail,
        ttft: state.ttft,
        gaps: state.gaps,
        tokens,
        text_chunks: state.text_chunks,
        e2e: ended - started,
        finished_at: ended - level_start,
    }
}

/// Connects, sends, and feeds the stream to `state`. Returns when the body ends.
/// Cancel-safe in the sense the timeout needs: dropping it drops the connection, and
/// `state` holds whatever arrived before.
async fn exchange(request: &Prepared, started: Instant, state: &mut StreamState) -> Result<(), (Failure, String)> {
    let stream = TcpStream::connect(request.target.addr)
        .await
        .map_err(|e| (Failure::Connect, format!("connect {}: {e}", request.target.addr)))?;
    // Small SSE frames must not wait for Nagle's algorithm (the request is one write anyway).
    stream.set_nodelay(true).map_err(|e| (Failure::Connect, format!("set_nodelay: {e}")))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| (Failure::Connect, format!("handshake: {e}")))?;
    // The connection future drives the socket; it ends when the response does or the
    // task is dropped with this request.
    let driver = tokio::spawn(connection);
    let outcome = read_response(request, started, state, &mut sender).await;
    driver.abort();
    outcome
}

async fn read_response(
    request: &Prepared,
    started: Instant,
    state: &mut StreamState,
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
) -> Result<(), (Failure, String)> {
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(request.path.as_str())
        .header(HOST, request.target.authority.as_str())
        .header(CONTENT_TYPE, "application/json")
        .header(ACCEPT, "text/event-stream");
    if let Some(key) = &request.api_key {
        builder = builder.header(AUTHORIZATION, format!("Bearer {key}"));
    }
    let http_request = builder
        .body(Full::new(request.body.clone()))
        .map_err(|e| (Failure::Connect, format!("building the request: {e}")))?;
    let response =
        sender.send_request(http_request).await.map_err(|e| (Failure::Transport, format!("sending: {e}")))?;
    let status = response.status();
    let mut body = response.into_body();
    if status != StatusCode::OK {
        // Keep a little of the body for the log; a broken body here changes nothing.
        let mut text = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                text.extend_from_slice(&data);
            }
            if text.len() > 300 {
                break;
            }
        }
        let preview = String::from_utf8_lossy(&text[..text.len().min(300)]).into_owned();
        return Err((Failure::Status(status.as_u16()), preview));
    }
    let mut lines = LineSplitter::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| (Failure::Transport, format!("reading: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        let now = Instant::now();
        lines.push(&data, |line| state.on_event(parse_line(line), started, now));
    }
    if lines.leftover() > 0 {
        // A final line without its newline: parse it rather than lose a [DONE].
        let now = Instant::now();
        lines.push(b"\n", |line| state.on_event(parse_line(line), started, now));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::sse::Chunk;

    fn text(t: &str) -> Event {
        Event::Chunk(Chunk { text: t.into(), ..Chunk::default() })
    }

    #[test]
    fn measures_ttft_and_gaps_from_text_chunks_only() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut s = StreamState::default();
        s.on_event(Event::Chunk(Chunk::default()), t0, ms(5)); // role-only chunk
        s.on_event(text("1"), t0, ms(20));
        s.on_event(text("2"), t0, ms(30));
        s.on_event(text("3"), t0, ms(45));
        s.on_event(Event::Chunk(Chunk { finish_reason: Some("length".into()), ..Chunk::default() }), t0, ms(46));
        s.on_event(Event::Done, t0, ms(47));
        s.finish(3, false);
        assert_eq!(s.ttft, Some(Duration::from_millis(20)));
        assert_eq!(s.gaps, vec![Duration::from_millis(10), Duration::from_millis(15)]);
        assert_eq!((s.tokens(), s.failure.is_none()), (3, true));
    }

    #[test]
    fn early_end_with_http_200_is_a_failure() {
        let t0 = Instant::now();
        let mut s = StreamState::default();
        s.on_event(text("1"), t0, t0);
        s.on_event(Event::Done, t0, t0);
        s.finish(64, false);
        assert_eq!(s.failure.map(|f| f.0), Some(Failure::Short));

        let mut s = StreamState::default();
        s.on_event(text("1"), t0, t0);
        s.finish(1, false);
        assert_eq!(s.failure.map(|f| f.0), Some(Failure::NoEnd));
    }

    #[test]
    fn usage_overrides_chunk_count_and_early_stop_can_be_allowed() {
        let t0 = Instant::now();
        let mut s = StreamState::default();
        s.on_event(text("ab"), t0, t0);
        let last = Chunk { finish_reason: Some("stop".into()), completion_tokens: Some(2), ..Chunk::default() };
        s.on_event(Event::Chunk(last), t0, t0);
        s.finish(8, true);
        assert_eq!((s.tokens(), s.failure.is_none()), (2, true));
    }

    #[test]
    fn first_failure_wins() {
        let mut s = StreamState::default();
        let t0 = Instant::now();
        s.on_event(Event::ServerError("boom".into()), t0, t0);
        s.on_event(Event::Malformed("junk".into()), t0, t0);
        s.finish(4, false);
        assert_eq!(s.failure, Some((Failure::ServerError, "boom".into())));
    }

    #[test]
    fn body_asks_for_what_the_spec_says() {
        let target = Target::parse("http://127.0.0.1:1").unwrap();
        let spec = RequestSpec {
            endpoint: Endpoint::Chat,
            model: "m".into(),
            prompt: "p".into(),
            distinct_prompts: true,
            max_tokens: 7,
            ignore_eos: true,
            include_usage: false,
            ban_tokens: vec![0, 2],
            allow_early_stop: false,
            api_key: None,
        };
        let p = Prepared::new(&target, &spec, 3);
        let body: Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(p.path, "/v1/chat/completions");
        assert_eq!(body["messages"][0]["content"], "Request 3.\np");
        assert_eq!((body["max_tokens"].as_u64(), body["ignore_eos"].as_bool()), (Some(7), Some(true)));
        assert!(body.get("stream_options").is_none() && body["stream"] == true);
        assert_eq!(body["logit_bias"], json!({"0": -100, "2": -100}));
    }
}
