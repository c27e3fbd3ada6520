//! A Server-Sent Events reader for tests: one GET over a plain HTTP/1.0
//! connection (the server then ends the body by closing), events parsed as
//! they arrive.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One SSE event: its `id:`, `event:` and `data:` (parsed as JSON).
#[derive(Clone, Debug)]
pub struct SseEvent {
    pub id: String,
    pub event: String,
    pub data: Value,
}

/// An open event stream.
pub struct SseStream {
    pub status: u16,
    sock: TcpStream,
    buf: String,
    closed: bool,
}

/// Open `path` with `bearer` and extra header lines (`"Last-Event-ID: x"`).
pub async fn open(port: u16, path: &str, bearer: Option<&str>, extra: &[&str]) -> SseStream {
    let mut sock = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut head =
        format!("GET {path} HTTP/1.0\r\nHost: localhost\r\nAccept: text/event-stream\r\n");
    if let Some(k) = bearer {
        head.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    for h in extra {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    sock.write_all(head.as_bytes()).await.expect("write");
    let mut s = SseStream {
        status: 0,
        sock,
        buf: String::new(),
        closed: false,
    };
    while !s.buf.contains("\r\n\r\n") && s.fill().await {}
    let (headers, rest) = s
        .buf
        .split_once("\r\n\r\n")
        .map(|(h, r)| (h.to_string(), r.to_string()))
        .unwrap_or_default();
    s.status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    s.buf = rest;
    s
}

impl SseStream {
    /// Read more; false once the server closed.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match self.sock.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                self.closed = true;
                false
            }
            Ok(n) => {
                self.buf.push_str(&String::from_utf8_lossy(&chunk[..n]));
                true
            }
        }
    }

    /// The next event (keep-alive comments skipped), None once the server
    /// closed the stream; panics after `limit`.
    pub async fn next(&mut self, limit: Duration) -> Option<SseEvent> {
        tokio::time::timeout(limit, self.next_event())
            .await
            .expect("an SSE event in time")
    }

    /// The rest of the body until the server closes it (the stream must
    /// end within `limit`).
    pub async fn rest(&mut self, limit: Duration) -> String {
        tokio::time::timeout(limit, async { while self.fill().await {} })
            .await
            .expect("the stream to end in time");
        std::mem::take(&mut self.buf)
    }

    async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let frame: String = self.buf.drain(..end + 2).collect();
                if let Some(e) = parse(&frame) {
                    return Some(e);
                }
                continue;
            }
            if self.closed || !self.fill().await {
                return None;
            }
        }
    }
}

fn parse(frame: &str) -> Option<SseEvent> {
    let (mut id, mut event, mut data) = (String::new(), String::new(), String::new());
    for line in frame.lines() {
        if let Some(v) = line.strip_prefix("id:") {
            id = v.trim().to_string();
        } else if let Some(v) = line.strip_prefix("event:") {
            event = v.trim().to_string();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.trim_start());
        }
    }
    if data.is_empty() {
        return None; // a keep-alive comment
    }
    Some(SseEvent {
        id,
        event,
        data: serde_json::from_str(&data).unwrap_or(Value::String(data)),
    })
}
