//! Plain HTTP/1.0 requests to an `agentq serve` under test: one fresh
//! connection per request, from a chosen loopback address (the server takes
//! the client address from the socket), the reply's JSON body parsed.

use std::net::Ipv4Addr;

use serde_json::Value;

/// A reply: status, lower-cased headers and body (JSON, or the raw text
/// as a JSON string when it is not JSON).
pub struct Reply {
    pub status: u16,
    pub headers: String,
    pub body: Value,
}

impl Reply {
    /// The error code of an error reply, or "".
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

/// One request from 127.0.0.1; `bearer` is an API key or a JWT.
pub async fn req(
    port: u16,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> Reply {
    req_from(Ipv4Addr::LOCALHOST, port, method, path, bearer, body).await
}

/// One request from loopback address `from`.
pub async fn req_from(
    from: Ipv4Addr,
    port: u16,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> Reply {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind((from, 0).into())
        .expect("bind a loopback address");
    let mut s = sock
        .connect((Ipv4Addr::LOCALHOST, port).into())
        .await
        .expect("connect");
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: localhost\r\n");
    if let Some(k) = bearer {
        head.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    let body = body.unwrap_or("");
    head.push_str(&format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    ));
    s.write_all(head.as_bytes()).await.expect("write");
    s.write_all(body.as_bytes()).await.expect("write body");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (headers, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Reply {
        status: headers
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0),
        headers: headers.to_lowercase(),
        body: serde_json::from_str(body).unwrap_or(Value::String(body.to_string())),
    }
}
