//! Server-sent events as OpenAI-compatible servers stream them: `data: {json}` lines,
//! blank lines between events, and `data: [DONE]` at the end.
//!
//! Usage: feed body bytes to [`LineSplitter::push`] as they arrive, hand every complete
//! line to [`parse_line`], and act on the [`Event`] it returns.
//!
//! Invariants: a line is only parsed once its `\n` has arrived, so a JSON chunk split
//! across two TCP reads is never half-parsed; `\r\n` and `\n` endings are both accepted.
//! Every server we measure (llama-server, llama-cpp-python, `arqon serve`) puts one whole
//! JSON object on one `data:` line, so multi-line `data:` events (legal SSE, unused by
//! them) are treated as separate payloads, and a partial one fails to parse visibly
//! ([`Event::Malformed`]) rather than being glued together by guesswork.

use serde_json::Value;

/// Splits a byte stream into lines, keeping the incomplete tail for the next push.
#[derive(Debug, Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Appends `bytes` and calls `on_line` with each complete line (without its ending).
    pub fn push(&mut self, bytes: &[u8], mut on_line: impl FnMut(&[u8])) {
        self.pending.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(offset) = self.pending[start..].iter().position(|&b| b == b'\n') {
            let end = start + offset;
            let line = &self.pending[start..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            on_line(line);
            start = end + 1;
        }
        self.pending.drain(..start);
    }

    /// Bytes received after the last line ending (a stream cut mid-line leaves some).
    pub fn leftover(&self) -> usize {
        self.pending.len()
    }
}

/// What one SSE line means for the request that received it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Blank line, comment (`: ping`), or a field other than `data` (`event:`, `id:`).
    Ignore,
    /// `data: [DONE]`: the server says the stream is complete.
    Done,
    /// One JSON chunk.
    Chunk(Chunk),
    /// `data: {"error": ...}`: the server failed after it had sent HTTP 200.
    ServerError(String),
    /// A `data:` payload that is not JSON, or JSON without `choices`/`usage`/`error`.
    Malformed(String),
}

/// The parts of a completion or chat-completion chunk the load generator measures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Chunk {
    /// Generated text in this chunk (`choices[0].text` or `choices[0].delta.content`);
    /// empty when the chunk carries only a role, a finish reason or usage.
    pub text: String,
    /// `choices[0].finish_reason` when the server set it.
    pub finish_reason: Option<String>,
    /// `usage.completion_tokens` when the server reports usage in the stream.
    pub completion_tokens: Option<u32>,
}

/// Parses one line (without its line ending).
pub fn parse_line(line: &[u8]) -> Event {
    let Some(payload) = line.strip_prefix(b"data:") else {
        return Event::Ignore;
    };
    let payload = payload.strip_prefix(b" ").unwrap_or(payload);
    if payload == b"[DONE]" {
        return Event::Done;
    }
    let value: Value = match serde_json::from_slice(payload) {
        Ok(value) => value,
        Err(err) => return Event::Malformed(format!("{err}: {}", preview(payload))),
    };
    if let Some(error) = value.get("error") {
        let message = error.get("message").and_then(Value::as_str).map_or_else(|| error.to_string(), str::to_owned);
        return Event::ServerError(message);
    }
    let usage = value
        .get("usage")
        .and_then(|u| u.get("completion_tokens"))
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok());
    let choice = value.get("choices").and_then(Value::as_array).and_then(|c| c.first());
    let Some(choice) = choice else {
        // The final usage-only chunk (`stream_options.include_usage`) has `choices: []`.
        return match usage {
            Some(_) => Event::Chunk(Chunk { completion_tokens: usage, ..Chunk::default() }),
            None if value.get("choices").is_some() => Event::Chunk(Chunk::default()),
            None => Event::Malformed(format!("no choices: {}", preview(payload))),
        };
    };
    let text = choice
        .get("text")
        .or_else(|| choice.get("delta").and_then(|d| d.get("content")))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let finish_reason = choice.get("finish_reason").and_then(Value::as_str).map(str::to_owned);
    Event::Chunk(Chunk { text, finish_reason, completion_tokens: usage })
}

/// The first 120 bytes of a payload, for error messages.
fn preview(payload: &[u8]) -> String {
    let cut = payload.len().min(120);
    String::from_utf8_lossy(&payload[..cut]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(splitter: &mut LineSplitter, bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        splitter.push(bytes, |l| out.push(l.to_vec()));
        out
    }

    #[test]
    fn splitter_keeps_partial_lines_across_pushes() {
        let mut s = LineSplitter::default();
        assert_eq!(lines(&mut s, b"data: {\"a\""), Vec::<Vec<u8>>::new());
        assert_eq!(s.leftover(), 10);
        assert_eq!(lines(&mut s, b":1}\r\n\r\ndata: [DO"), vec![b"data: {\"a\":1}".to_vec(), vec![]]);
        assert_eq!(lines(&mut s, b"NE]\n"), vec![b"data: [DONE]".to_vec()]);
        assert_eq!(s.leftover(), 0);
    }

    #[test]
    fn completion_chunk() {
        let line = br#"data: {"choices":[{"text":" 7","index":0,"finish_reason":null}]}"#;
        let want = Chunk { text: " 7".into(), finish_reason: None, completion_tokens: None };
        assert_eq!(parse_line(line), Event::Chunk(want));
    }

    #[test]
    fn chat_chunk_with_finish_and_usage() {
        let line = br#"data:{"choices":[{"delta":{},"finish_reason":"length"}],"usage":{"completion_tokens":64}}"#;
        let want = Chunk { text: String::new(), finish_reason: Some("length".into()), completion_tokens: Some(64) };
        assert_eq!(parse_line(line), Event::Chunk(want));
        let line = br#"data: {"choices":[{"delta":{"content":"hi"}}]}"#;
        assert!(matches!(parse_line(line), Event::Chunk(c) if c.text == "hi"));
    }

    #[test]
    fn usage_only_chunk_done_error_and_junk() {
        let line = br#"data: {"choices":[],"usage":{"completion_tokens":3}}"#;
        assert!(matches!(parse_line(line), Event::Chunk(c) if c.completion_tokens == Some(3)));
        assert_eq!(parse_line(b"data: [DONE]"), Event::Done);
        assert_eq!(parse_line(b": ping"), Event::Ignore);
        assert_eq!(parse_line(b""), Event::Ignore);
        let err = br#"data: {"error":{"message":"context full","type":"server_error"}}"#;
        assert_eq!(parse_line(err), Event::ServerError("context full".into()));
        assert!(matches!(parse_line(b"data: {oops"), Event::Malformed(_)));
        assert!(matches!(parse_line(br#"data: {"x":1}"#), Event::Malformed(_)));
    }
}
