//! Outbound HTTP/1.1 requests with the HTTP stack already in the tree
//! (hyper's client connection, rustls with ring for https), for the two
//! places agentq calls out: JWKS fetches (`http::api::jwt`) and tenant
//! webhook deliveries (`duties::webhooks`). One request per connection; the
//! caller bounds the time (`tokio::time::timeout`), the response body is
//! read up to a limit.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;

/// One request.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    /// `GET`, `POST`, ...
    pub method: &'a str,
    /// `http://` or `https://` URL.
    pub url: &'a str,
    /// Extra headers (Host is set from the URL).
    pub headers: Vec<(&'a str, String)>,
    /// The body (empty for a GET).
    pub body: Vec<u8>,
    /// Read at most this many bytes of the response body; a longer body is
    /// an error when `fail_on_long_body`, else cut.
    pub max_body: usize,
    /// Whether a body over `max_body` is an error (JWKS) or cut (webhooks,
    /// which only look at the status).
    pub fail_on_long_body: bool,
    /// Refuse to connect to loopback, private, link-local and other
    /// non-public addresses (checked on the resolved address, which is the
    /// one connected to).
    pub public_only: bool,
}

/// A response: status and (possibly cut) body.
#[derive(Clone, Debug)]
pub struct Response {
    /// The HTTP status.
    pub status: u16,
    /// Up to `max_body` bytes of the body.
    pub body: Vec<u8>,
}

/// Whether `url` is an absolute http(s) URL with a host (the check both
/// callers make before storing or using one).
pub fn check_url(url: &str) -> Result<(), String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("invalid URL: {e}"))?;
    match uri.scheme_str() {
        Some("https") | Some("http") => {}
        _ => return Err("the URL must be http:// or https://".into()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("the URL has no host".into());
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err("the URL must not carry a user or password".into());
    }
    Ok(())
}

/// Whether `ip` is a public unicast address (not loopback, private,
/// link-local, CGNAT, unspecified, multicast, documentation or reserved).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8))
        }
    }
}

/// Send `req`; any status is a response (the caller decides), a connection,
/// TLS or protocol failure is an error. HTTPS checks the server against the
/// system's root certificates.
pub async fn send(req: Request<'_>) -> Result<Response, String> {
    check_url(req.url)?;
    let uri: hyper::Uri = req.url.parse().map_err(|e| format!("invalid URL: {e}"))?;
    let https = uri.scheme_str() == Some("https");
    let host = uri.host().ok_or("the URL has no host")?.to_string();
    let bare = host.trim_matches(['[', ']']).to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare.as_str(), port))
        .await
        .map_err(|e| format!("cannot resolve {bare}: {e}"))?
        .collect();
    let addr = if req.public_only {
        addrs
            .iter()
            .copied()
            .find(|a| is_public(a.ip()))
            .ok_or_else(|| {
                format!("{bare} resolves to no public address (non-public addresses are refused)")
            })?
    } else {
        *addrs
            .first()
            .ok_or_else(|| format!("{bare} resolves to no address"))?
    };
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let authority = uri
        .authority()
        .map_or(host.clone(), |a| a.as_str().to_string());
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let mut builder = hyper::Request::builder()
        .method(req.method)
        .uri(path)
        .header(hyper::header::HOST, authority);
    for (name, value) in &req.headers {
        builder = builder.header(*name, value.as_str());
    }
    let request = builder
        .body(Full::new(Bytes::from(req.body)))
        .map_err(|e| e.to_string())?;
    let resp = if https {
        let mut roots = tokio_rustls::rustls::RootCertStore::empty();
        for c in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(c);
        }
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let tls = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from(bare)
            .map_err(|e| e.to_string())?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        exchange(hyper_util::rt::TokioIo::new(stream), request).await?
    } else {
        exchange(hyper_util::rt::TokioIo::new(tcp), request).await?
    };
    let status = resp.status().as_u16();
    let body = if req.fail_on_long_body {
        Limited::new(resp.into_body(), req.max_body)
            .collect()
            .await
            .map_err(|e| format!("reading the body: {e}"))?
            .to_bytes()
            .to_vec()
    } else {
        read_cut(resp.into_body(), req.max_body).await
    };
    Ok(Response { status, body })
}

/// Up to `max` bytes of `body`; the rest is not read (the connection is
/// dropped with it).
async fn read_cut(mut body: hyper::body::Incoming, max: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < max {
        match body.frame().await {
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data() {
                    let room = max - out.len();
                    out.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            _ => break,
        }
    }
    out
}

async fn exchange<T>(
    io: hyper_util::rt::TokioIo<T>,
    req: hyper::Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(req).await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_addresses() {
        assert!(check_url("https://example.com/hook").is_ok());
        assert!(check_url("http://127.0.0.1:9/x").is_ok());
        assert!(check_url("ftp://example.com/").is_err());
        assert!(check_url("example.com/hook").is_err());
        assert!(check_url("https://u:p@example.com/").is_err());
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "169.254.169.254",
            "::1",
            "fd00::1",
            "100.64.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["93.184.216.34", "2606:4700::1111"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }
}
