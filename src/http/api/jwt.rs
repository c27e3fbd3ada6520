//! JWT sign-in for the HTTP API: `Authorization: Bearer <JWT>` signed RS256
//! or ES256 by an identity provider, verified against its JWKS (a file, or
//! a URL fetched over HTTP(S)), as an alternative to `aq_...` API keys.
//!
//! - **Shape**: an API key is `aq_<8 hex>_<64 hex>` ([`keys::parse`]); a
//!   JWT is three base64url segments joined by dots ([`looks_like_jwt`]).
//! - **Algorithms**: RS256 and ES256 (P-256) only. `none`, `HS*` and every
//!   other `alg` are refused (`jwt_alg_not_allowed`) before any key is
//!   looked at; the token's `alg` must also be the algorithm of the JWKS
//!   key its `kid` names (`jwt_alg_mismatch`). A token must carry a `kid`
//!   (`jwt_no_kid`).
//! - **Claims**: `iss` must equal [`JwtConfig::issuer`], `aud` must be or
//!   contain [`JwtConfig::audience`], `exp` is required and `nbf` checked
//!   when present, both with [`JwtConfig::leeway`] (30 s) for clock skew.
//! - **Tenant**: the claim named [`JwtConfig::tenant_claim`] (default
//!   `tenant`): a top-level claim of exactly that name if there is one, else
//!   a dotted path into nested objects (`org.id`). It must be a string that
//!   is a valid tenant name (`jwt_no_tenant` otherwise).
//! - **Narrowing**: optional `queues` and `kinds` claims (arrays of
//!   strings) narrow what the token may enqueue, on top of the tenant's own
//!   restrictions (see `super::allowed`).
//! - **Keys**: read at start (a file that cannot be read, or a URL that
//!   cannot be fetched, stops `agentq serve` from starting), re-read every
//!   [`JwtConfig::refresh`] (5 min; a failed read keeps the keys held), and
//!   re-read at once for a token whose `kid` is unknown, but at most once
//!   per [`JwtConfig::min_refetch`] (30 s), so a flood of made-up `kid`s
//!   cannot make serve hammer the identity provider. Fetches are
//!   single-flight.
//!
//! Built like a duty (see `crate::duties`): a config with documented
//! defaults and `validate()`, [`Jwt::run_once`] (which tests call) and
//! [`Jwt::run`], the loop `agentq serve` spawns.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Where the JWKS comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JwksSource {
    /// A JSON file (`--jwks-file`).
    File(PathBuf),
    /// An `http://` or `https://` URL (`--jwks-url`).
    Url(String),
}

/// How JWTs are checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtConfig {
    /// The JWKS.
    pub source: JwksSource,
    /// Required `iss` (exact match).
    pub issuer: String,
    /// Required `aud` (the claim is this string or an array containing it).
    pub audience: String,
    /// Claim holding the tenant (default `tenant`; a dotted path such as
    /// `org.id` reaches into nested objects when no top-level claim has
    /// that exact name).
    pub tenant_claim: String,
    /// Clock skew allowed on `exp` and `nbf` (default 30 s).
    pub leeway: Duration,
    /// How often the JWKS is re-read (default 5 min).
    pub refresh: Duration,
    /// Least time between two reads of the JWKS caused by unknown `kid`s
    /// (default 30 s).
    pub min_refetch: Duration,
    /// Longest a fetch of a JWKS URL may take (default 5 s).
    pub fetch_timeout: Duration,
    /// Largest JWKS accepted (default 1 MiB).
    pub max_jwks_bytes: usize,
}

impl JwtConfig {
    /// The defaults for a source, issuer and audience.
    pub fn new(source: JwksSource, issuer: &str, audience: &str) -> JwtConfig {
        JwtConfig {
            source,
            issuer: issuer.to_string(),
            audience: audience.to_string(),
            tenant_claim: "tenant".into(),
            leeway: Duration::from_secs(30),
            refresh: Duration::from_secs(300),
            min_refetch: Duration::from_secs(30),
            fetch_timeout: Duration::from_secs(5),
            max_jwks_bytes: 1 << 20,
        }
    }

    /// Check the ranges.
    pub fn validate(&self) -> Result<(), crate::duties::ConfigError> {
        let bad = |problem: &str| {
            Err(crate::duties::ConfigError {
                duty: "jwt",
                problem: problem.into(),
            })
        };
        if self.issuer.is_empty() || self.audience.is_empty() {
            return bad("--jwt-issuer and --jwt-audience are required with a JWKS");
        }
        if self.tenant_claim.is_empty() {
            return bad("--jwt-tenant-claim must not be empty");
        }
        if self.leeway > Duration::from_secs(300) {
            return bad("leeway must be at most 5m");
        }
        if self.min_refetch < Duration::from_millis(100) || self.min_refetch > self.refresh {
            return bad("min_refetch must be between 100ms and refresh");
        }
        if self.fetch_timeout.is_zero() || self.max_jwks_bytes == 0 {
            return bad("fetch_timeout and max_jwks_bytes must be above zero");
        }
        if let JwksSource::Url(u) = &self.source
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            return bad("--jwks-url must start with http:// or https://");
        }
        Ok(())
    }
}

/// Why a JWT was refused (each is a 401 with [`JwtError::code`]), or could
/// not be checked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url segments with a JSON header.
    #[error("malformed JWT: {0}")]
    Malformed(String),
    /// `alg` is not RS256 or ES256.
    #[error("JWT algorithm {0:?} is not accepted: use RS256 or ES256")]
    AlgNotAllowed(String),
    /// No `kid` in the header.
    #[error("the JWT header has no kid")]
    NoKid,
    /// `kid` not in the JWKS (after a re-read if one was allowed).
    #[error("no key {0:?} in the JWKS")]
    UnknownKid(String),
    /// The key named by `kid` is not for the token's `alg`.
    #[error("key {0:?} is not a key for the JWT's algorithm")]
    AlgMismatch(String),
    /// The signature does not verify.
    #[error("the JWT signature does not verify")]
    BadSignature,
    /// Past `exp` (plus leeway).
    #[error("the JWT has expired")]
    Expired,
    /// Before `nbf` (minus leeway).
    #[error("the JWT is not valid yet (nbf)")]
    NotYetValid,
    /// `iss` is not the configured issuer.
    #[error("the JWT was issued by another issuer")]
    WrongIssuer,
    /// `aud` does not name the configured audience.
    #[error("the JWT is for another audience")]
    WrongAudience,
    /// A required claim is missing or has the wrong type.
    #[error("the JWT lacks a valid {0:?} claim")]
    MissingClaim(String),
    /// No valid tenant in the tenant claim.
    #[error("the JWT's {0:?} claim is not a tenant name")]
    NoTenant(String),
    /// This server was started without a JWKS.
    #[error("this server does not accept JWTs: send an API key (aq_...)")]
    NotAccepted,
    /// The JWKS has never been read (HTTP 503).
    #[error("the JWKS could not be read; retry later")]
    KeysUnavailable,
}

impl JwtError {
    /// The stable error code in API responses.
    pub fn code(&self) -> &'static str {
        match self {
            JwtError::Malformed(_) => "jwt_malformed",
            JwtError::AlgNotAllowed(_) => "jwt_alg_not_allowed",
            JwtError::NoKid => "jwt_no_kid",
            JwtError::UnknownKid(_) => "jwt_unknown_kid",
            JwtError::AlgMismatch(_) => "jwt_alg_mismatch",
            JwtError::BadSignature => "jwt_bad_signature",
            JwtError::Expired => "jwt_expired",
            JwtError::NotYetValid => "jwt_not_yet_valid",
            JwtError::WrongIssuer => "jwt_wrong_issuer",
            JwtError::WrongAudience => "jwt_wrong_audience",
            JwtError::MissingClaim(_) => "jwt_missing_claim",
            JwtError::NoTenant(_) => "jwt_no_tenant",
            JwtError::NotAccepted => "jwt_not_accepted",
            JwtError::KeysUnavailable => "auth_unavailable",
        }
    }
}

/// What a valid token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The tenant (from the tenant claim).
    pub tenant: String,
    /// The `queues` claim, if any: the token may enqueue only to these.
    pub queues: Option<Vec<String>>,
    /// The `kinds` claim, if any: the token may enqueue only these kinds.
    pub kinds: Option<Vec<String>>,
}

/// A JWT by shape: three non-empty base64url segments (an API key is
/// `aq_<hex>_<hex>`, which has no dots).
pub fn looks_like_jwt(token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    parts.len() == 3
        && parts[..2].iter().all(|p| !p.is_empty())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'='))
}

/// One usable key of the JWKS.
struct Key {
    alg: Algorithm,
    key: DecodingKey,
}

/// The keys of a JWKS by `kid`: RSA keys (RS256) and P-256 EC keys (ES256)
/// with a `kid`; others (and keys whose `alg` or `use` says otherwise) are
/// left out. Errors only if the document is not a JWKS.
fn parse_jwks(text: &[u8]) -> Result<HashMap<String, Key>, String> {
    let doc: Value = serde_json::from_slice(text).map_err(|e| format!("not JSON: {e}"))?;
    let Some(list) = doc.get("keys").and_then(Value::as_array) else {
        return Err("no \"keys\" array".into());
    };
    let mut out = HashMap::new();
    for k in list {
        let s = |f: &str| k.get(f).and_then(Value::as_str);
        let Some(kid) = s("kid") else { continue };
        if s("use").is_some_and(|u| u != "sig") {
            continue;
        }
        let parsed = match (s("kty"), s("crv")) {
            (Some("RSA"), _) => match (s("n"), s("e")) {
                (Some(n), Some(e)) => DecodingKey::from_rsa_components(n, e)
                    .ok()
                    .map(|key| (Algorithm::RS256, key)),
                _ => None,
            },
            (Some("EC"), Some("P-256")) => match (s("x"), s("y")) {
                (Some(x), Some(y)) => DecodingKey::from_ec_components(x, y)
                    .ok()
                    .map(|key| (Algorithm::ES256, key)),
                _ => None,
            },
            _ => None,
        };
        let Some((alg, key)) = parsed else { continue };
        let named = s("alg");
        if named.is_some_and(|a| a != format!("{alg:?}")) {
            continue;
        }
        out.insert(kid.to_string(), Key { alg, key });
    }
    Ok(out)
}

/// The JWT checker of one `agentq serve`.
pub struct Jwt {
    cfg: JwtConfig,
    keys: RwLock<Option<Arc<HashMap<String, Key>>>>,
    /// When the JWKS was last read for an unknown `kid` (or at start).
    last_forced: Mutex<Option<Instant>>,
    fetching: tokio::sync::Mutex<()>,
    reads: AtomicU64,
}

impl std::fmt::Debug for Jwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwt")
            .field("cfg", &self.cfg)
            .field("keys", &self.kids())
            .finish()
    }
}

/// What one [`Jwt::run_once`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// Keys held after the read (None: the read failed, the old ones kept).
    pub keys: Option<usize>,
    /// What failed.
    pub error: Option<String>,
}

impl Jwt {
    /// A checker that reads its JWKS once now; an unreadable or invalid
    /// JWKS is an error (serve does not start with it).
    pub async fn start(cfg: JwtConfig) -> Result<Arc<Jwt>, String> {
        cfg.validate().map_err(|e| e.problem)?;
        let jwt = Arc::new(Jwt {
            cfg,
            keys: RwLock::new(None),
            last_forced: Mutex::new(Some(Instant::now())),
            fetching: tokio::sync::Mutex::new(()),
            reads: AtomicU64::new(0),
        });
        match jwt.run_once().await {
            Pass { error: None, .. } => Ok(jwt),
            Pass { error: Some(e), .. } => Err(e),
        }
    }

    /// The config.
    pub fn config(&self) -> &JwtConfig {
        &self.cfg
    }

    /// How many times the JWKS has been read (for tests and logs).
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// The `kid`s held, sorted.
    pub fn kids(&self) -> Vec<String> {
        let held = self.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut v: Vec<String> = held
            .map(|k| k.keys().cloned().collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Read the JWKS now; on failure the keys held are kept.
    pub async fn run_once(&self) -> Pass {
        let _one = self.fetching.lock().await;
        self.read_now().await
    }

    async fn read_now(&self) -> Pass {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let text = match &self.cfg.source {
            JwksSource::File(p) => tokio::fs::read(p)
                .await
                .map_err(|e| format!("cannot read JWKS file {}: {e}", p.display())),
            JwksSource::Url(u) => {
                match tokio::time::timeout(
                    self.cfg.fetch_timeout,
                    fetch(u, self.cfg.max_jwks_bytes),
                )
                .await
                {
                    Ok(r) => r.map_err(|e| format!("cannot fetch JWKS {u}: {e}")),
                    Err(_) => Err(format!(
                        "cannot fetch JWKS {u}: no answer within {:?}",
                        self.cfg.fetch_timeout
                    )),
                }
            }
        };
        let parsed = text.and_then(|t| parse_jwks(&t).map_err(|e| format!("invalid JWKS: {e}")));
        match parsed {
            Ok(keys) => {
                let n = keys.len();
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(keys));
                Pass {
                    keys: Some(n),
                    error: None,
                }
            }
            Err(e) => Pass {
                keys: None,
                error: Some(e),
            },
        }
    }

    /// Loop [`run_once`](Self::run_once) every `refresh` until `shutdown`.
    pub async fn run(&self, shutdown: CancellationToken) {
        loop {
            if crate::duties::pause(self.cfg.refresh, &shutdown).await {
                return;
            }
            if let Some(e) = self.run_once().await.error {
                tracing::warn!(error = %e, "JWKS refresh failed; keeping the keys held");
            }
        }
    }

    /// Re-read the JWKS for an unknown `kid` unless one was read for that
    /// reason less than `min_refetch` ago. Single-flight: callers waiting
    /// on a read in progress do not start another.
    async fn refetch_for_unknown_kid(&self) {
        let allowed = |this: &Self| {
            this.last_forced
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_none_or(|t| t.elapsed() >= this.cfg.min_refetch)
        };
        if !allowed(self) {
            return;
        }
        let _one = self.fetching.lock().await;
        if !allowed(self) {
            return; // another request read it while this one waited
        }
        *self.last_forced.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        if let Some(e) = self.read_now().await.error {
            tracing::warn!(error = %e, "JWKS re-read for an unknown kid failed");
        }
    }

    fn key_for(&self, kid: &str) -> Result<Option<(Algorithm, DecodingKey)>, JwtError> {
        let held = self.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(held) = held else {
            return Err(JwtError::KeysUnavailable);
        };
        Ok(held.get(kid).map(|k| (k.alg, k.key.clone())))
    }

    /// Check `token`; the tenant and narrowing claims if it is valid.
    pub async fn verify(&self, token: &str) -> Result<Verified, JwtError> {
        let header = header_of(token)?;
        let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
        let alg = match alg {
            "RS256" => Algorithm::RS256,
            "ES256" => Algorithm::ES256,
            other => return Err(JwtError::AlgNotAllowed(other.to_string())),
        };
        let Some(kid) = header.get("kid").and_then(Value::as_str) else {
            return Err(JwtError::NoKid);
        };
        let found = match self.key_for(kid)? {
            Some(k) => Some(k),
            None => {
                self.refetch_for_unknown_kid().await;
                self.key_for(kid)?
            }
        };
        let Some((key_alg, key)) = found else {
            return Err(JwtError::UnknownKid(kid.to_string()));
        };
        if key_alg != alg {
            return Err(JwtError::AlgMismatch(kid.to_string()));
        }
        let mut v = Validation::new(alg);
        v.leeway = self.cfg.leeway.as_secs();
        v.validate_nbf = true;
        v.set_issuer(&[&self.cfg.issuer]);
        v.set_audience(&[&self.cfg.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<Value>(token, &key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::InvalidSignature => JwtError::BadSignature,
                K::ExpiredSignature => JwtError::Expired,
                K::ImmatureSignature => JwtError::NotYetValid,
                K::InvalidIssuer => JwtError::WrongIssuer,
                K::InvalidAudience => JwtError::WrongAudience,
                K::MissingRequiredClaim(c) | K::InvalidClaimFormat(c) => {
                    JwtError::MissingClaim(c.clone())
                }
                K::InvalidAlgorithm => JwtError::AlgMismatch(kid.to_string()),
                _ => JwtError::Malformed(e.to_string()),
            }
        })?;
        let claims = data.claims;
        let claim = &self.cfg.tenant_claim;
        let tenant = lookup(&claims, claim)
            .and_then(Value::as_str)
            .filter(|t| crate::model::names::validate_name("tenant", t).is_ok())
            .ok_or_else(|| JwtError::NoTenant(claim.clone()))?;
        let list = |name: &str| -> Result<Option<Vec<String>>, JwtError> {
            match claims.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|x| x.as_str().map(str::to_string))
                    .collect::<Option<Vec<String>>>()
                    .map(Some)
                    .ok_or_else(|| JwtError::MissingClaim(name.to_string())),
                Some(_) => Err(JwtError::MissingClaim(name.to_string())),
            }
        };
        Ok(Verified {
            tenant: tenant.to_string(),
            queues: list("queues")?,
            kinds: list("kinds")?,
        })
    }
}

/// The decoded JSON header of a JWT-shaped token.
fn header_of(token: &str) -> Result<serde_json::Map<String, Value>, JwtError> {
    let head = token.split('.').next().unwrap_or("");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head.trim_end_matches('='))
        .map_err(|e| JwtError::Malformed(format!("header is not base64url: {e}")))?;
    match serde_json::from_slice(&raw) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(JwtError::Malformed("header is not a JSON object".into())),
    }
}

/// A claim by exact name, else by dotted path.
fn lookup<'a>(claims: &'a Value, name: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(name) {
        return Some(v);
    }
    name.split('.').try_fold(claims, |v, part| v.get(part))
}

/// GET `url` (http or https, HTTP/1.1, [`crate::net`]); the body of a 200,
/// at most `max` bytes. HTTPS checks the server against the system's root
/// certificates.
async fn fetch(url: &str, max: usize) -> Result<Vec<u8>, String> {
    let resp = crate::net::send(crate::net::Request {
        method: "GET",
        url,
        headers: vec![
            ("accept", "application/json".into()),
            ("user-agent", "agentq-serve".into()),
        ],
        body: Vec::new(),
        max_body: max,
        fail_on_long_body: true,
        public_only: false,
    })
    .await?;
    if resp.status != 200 {
        let status = hyper::StatusCode::from_u16(resp.status)
            .map_or_else(|_| resp.status.to_string(), |s| s.to_string());
        return Err(format!("HTTP {status}"));
    }
    Ok(resp.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_tell_keys_from_jwts() {
        let key = format!("aq_a1b2c3d4_{}", "0".repeat(64));
        assert!(!looks_like_jwt(&key));
        assert!(looks_like_jwt("eyJh.eyJz.c2ln"));
        assert!(looks_like_jwt("eyJh.eyJz.")); // alg none: no signature
        assert!(!looks_like_jwt("a.b"));
        assert!(!looks_like_jwt("a b.c.d"));
    }

    #[test]
    fn tenant_claims_by_name_then_dotted_path() {
        let c = serde_json::json!({"tenant": "a", "org": {"id": "b"}, "x.y": "c"});
        assert_eq!(lookup(&c, "tenant"), Some(&Value::from("a")));
        assert_eq!(lookup(&c, "org.id"), Some(&Value::from("b")));
        assert_eq!(lookup(&c, "x.y"), Some(&Value::from("c")));
        assert_eq!(lookup(&c, "org.none"), None);
    }

    #[test]
    fn defaults_are_valid() {
        let c = JwtConfig::new(JwksSource::File("/x".into()), "iss", "aud");
        assert!(c.validate().is_ok());
        let c = JwtConfig::new(JwksSource::Url("ftp://x".into()), "iss", "aud");
        assert!(c.validate().is_err());
    }

    #[test]
    fn jwks_keeps_only_usable_signing_keys() {
        let doc = serde_json::json!({"keys": [
            {"kty": "oct", "kid": "h", "k": "c2VjcmV0"},
            {"kty": "EC", "crv": "P-384", "kid": "p384", "x": "AA", "y": "AA"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"},
            {"kty": "RSA", "n": "AQAB", "e": "AQAB"},
        ]});
        let keys = parse_jwks(doc.to_string().as_bytes()).expect("a JWKS");
        assert!(keys.is_empty());
        assert!(parse_jwks(b"{}").is_err());
    }
}
