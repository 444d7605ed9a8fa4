//! Helpers for the `arqon serve` end-to-end tests: start the real binary on an
//! ephemeral port, and a tiny HTTP/1.1 client over `std::net::TcpStream`.
//!
//! The client is hand-written (about 150 lines) rather than a dev-dependency:
//! the tests need exact control of the socket (reading a stream a few events
//! at a time, then dropping the connection mid-stream), and it keeps the
//! dependency list lean. Every read has a timeout, so no test can hang.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The tiny Hugging Face fixture (loads in milliseconds).
pub fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama")
}

/// A running `arqon serve`.
pub struct Server {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// Everything it printed on stderr so far.
    pub stderr: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `arqon serve --host 127.0.0.1 --port 0 ARGS` and waits until `/ready` is 200.
    pub fn start(args: &[&str]) -> Server {
        Self::start_with_env(args, &[])
    }

    /// [`Server::start`] with these environment variables set.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_arqon"))
            .args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .env_remove("ARQON_API_KEY")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start arqon serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        {
            let stderr = stderr.clone();
            let pipe = child.stderr.take().expect("stderr piped");
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Some(a) = line.strip_prefix("arqon: listening on http://") {
                        let _ = tx.send(a.trim().to_string());
                    }
                    stderr.lock().unwrap().push_str(&(line + "\n"));
                }
            });
        }
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("arqon serve did not print its address; stderr:\n{}", stderr.lock().unwrap());
            }
        };
        let s = Server { child, addr, stderr };
        let t0 = Instant::now();
        loop {
            if let Ok(r) = s.try_request("GET", "/ready", &[], None) {
                if r.status == 200 {
                    break;
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(180), "not ready; stderr:\n{}", s.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    /// The server's stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let ok = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().expect("run kill");
        assert!(ok.success());
    }

    /// Waits up to `limit` for the process to exit and returns its code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// One request; panics on transport errors.
    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Response {
        self.try_request(method, path, headers, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// One request.
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> std::io::Result<Response> {
        let mut r = self.open(method, path, headers, body)?;
        let mut body = Vec::new();
        r.body.read_to_end(&mut body)?;
        Ok(Response { status: r.status, headers: r.headers, body })
    }

    /// POSTs JSON and returns status and parsed body.
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self.request("POST", path, &[("content-type", "application/json")], Some(body.to_string().as_bytes()));
        (r.status, r.json())
    }

    /// An `/admin` request with the bearer `token`; status and parsed body.
    pub fn admin(&self, token: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let auth = format!("Bearer {token}");
        let body = body.map(|b| b.to_string());
        let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
        let r = self.request(method, path, &headers, body.as_deref().map(str::as_bytes));
        (r.status, r.json())
    }

    /// Waits until the executor has fresh telemetry (it rejects proposals
    /// with `NoTelemetry` until the first telemetry window closes).
    pub fn wait_for_telemetry(&self, token: &str) {
        let t0 = Instant::now();
        while self.admin(token, "GET", "/admin/executor", None).1["telemetry_fresh"] != true {
            assert!(t0.elapsed() < Duration::from_secs(30), "no telemetry window reached the executor");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET, body as text.
    pub fn get(&self, path: &str) -> (u16, String) {
        let r = self.request("GET", path, &[], None);
        (r.status, String::from_utf8_lossy(&r.body).into_owned())
    }

    /// Sends a request and returns once the headers are read; the body is read lazily.
    pub fn open(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> std::io::Result<OpenResponse> {
        let mut s = TcpStream::connect(&self.addr)?;
        s.set_read_timeout(Some(Duration::from_secs(300)))?;
        let body = body.unwrap_or_default();
        let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n", self.addr);
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
        s.write_all(head.as_bytes())?;
        s.write_all(body)?;
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        let body = Body { reader, chunked, left_in_chunk: 0, eof: false };
        Ok(OpenResponse { status, headers, body })
    }

    /// Opens a streaming request; returns the status and an event reader.
    pub fn stream(&self, path: &str, body: &Value) -> OpenResponse {
        self.open("POST", path, &[("content-type", "application/json")], Some(body.to_string().as_bytes()))
            .expect("open stream")
    }

    /// One metric's value from `/metrics` (first sample whose line starts with `name`).
    pub fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing in:\n{text}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A complete response.
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Lower-cased header names.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// The body as JSON (panics with the body if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// A response whose body is read as it arrives.
pub struct OpenResponse {
    /// Status code.
    pub status: u16,
    /// Lower-cased header names.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Body,
}

impl OpenResponse {
    /// The next SSE `data:` payload, or `None` at the end of the body.
    pub fn next_data(&mut self) -> Option<String> {
        let mut line = String::new();
        loop {
            line.clear();
            let mut buf = [0u8; 1];
            // Byte at a time through the chunk decoder: simple, and fast enough for tests.
            loop {
                match self.body.read(&mut buf) {
                    Ok(0) => return None,
                    Ok(_) => {
                        if buf[0] == b'\n' {
                            break;
                        }
                        line.push(buf[0] as char);
                    }
                    Err(e) => panic!("reading the stream: {e}"),
                }
            }
            if let Some(d) = line.strip_prefix("data:") {
                // Bytes were pushed as chars; re-decode as UTF-8.
                let bytes: Vec<u8> = d.trim_start().chars().map(|c| c as u8).collect();
                return Some(String::from_utf8(bytes).expect("UTF-8 data"));
            }
        }
    }

    /// Reads every `data:` payload to the end: the JSON chunks, and whether `[DONE]` came last.
    pub fn collect(mut self) -> (Vec<Value>, bool) {
        let mut out = Vec::new();
        let mut done = false;
        while let Some(d) = self.next_data() {
            if d == "[DONE]" {
                done = true;
            } else {
                assert!(!done, "data after [DONE]");
                out.push(serde_json::from_str(&d).unwrap_or_else(|e| panic!("bad chunk {d:?}: {e}")));
            }
        }
        (out, done)
    }
}

/// A response body: plain until EOF, or chunked.
pub struct Body {
    reader: BufReader<TcpStream>,
    chunked: bool,
    left_in_chunk: usize,
    eof: bool,
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.eof {
            return Ok(0);
        }
        if !self.chunked {
            return self.reader.read(buf);
        }
        if self.left_in_chunk == 0 {
            let mut line = String::new();
            self.reader.read_line(&mut line)?;
            if line.trim().is_empty() {
                line.clear();
                self.reader.read_line(&mut line)?; // CRLF after the previous chunk
            }
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                self.eof = true;
                return Ok(0);
            }
            self.left_in_chunk = size;
        }
        let n = buf.len().min(self.left_in_chunk);
        let got = self.reader.read(&mut buf[..n])?;
        if got == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed mid-chunk"));
        }
        self.left_in_chunk -= got;
        Ok(got)
    }
}

/// The concatenated text of streamed chunks, per choice index.
pub fn stream_texts(chunks: &[Value], n: usize) -> Vec<String> {
    let mut out = vec![String::new(); n];
    for c in chunks {
        for ch in c["choices"].as_array().expect("choices") {
            let i = ch["index"].as_u64().unwrap() as usize;
            let t = ch["text"].as_str().or_else(|| ch["delta"]["content"].as_str()).unwrap_or("");
            out[i].push_str(t);
        }
    }
    out
}
