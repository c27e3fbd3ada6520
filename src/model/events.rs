//! What a script reports besides its answer: thresholds a tenant crossed.
//! The queue returns them typed; its caller counts and logs them
//! ([`crate::metrics::record_events`]). On the wire a script sends them as
//! one space-separated string of `kind:tenant` words (`quota_80:acme`).

/// One event a script reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueEvent {
    /// A tenant's usage this month crossed `percent` (80 or 100) of its quota.
    QuotaCrossed {
        /// The tenant.
        tenant: String,
        /// 80 or 100.
        percent: u8,
    },
    /// A tenant is starting jobs at twice its tier's expected rate.
    RateAlert {
        /// The tenant.
        tenant: String,
    },
    /// An event this version does not know (a newer script): logged as is.
    Other {
        /// Its kind as sent.
        kind: String,
        /// The tenant, if it named one.
        tenant: String,
    },
}

impl QueueEvent {
    /// Parse a script's event string (`"quota_80:acme rate_2x:beta"`).
    pub fn parse_all(text: &str) -> Vec<QueueEvent> {
        text.split_whitespace().map(QueueEvent::parse).collect()
    }

    fn parse(word: &str) -> QueueEvent {
        let (kind, tenant) = word.split_once(':').unwrap_or((word, ""));
        let tenant = tenant.to_string();
        match kind {
            "quota_80" => QueueEvent::QuotaCrossed {
                tenant,
                percent: 80,
            },
            "quota_100" => QueueEvent::QuotaCrossed {
                tenant,
                percent: 100,
            },
            "rate_2x" => QueueEvent::RateAlert { tenant },
            other => QueueEvent::Other {
                kind: other.to_string(),
                tenant,
            },
        }
    }
}

/// The alert groups a tenant's webhook can take (`--events`): each event
/// kind belongs to the group its name starts with (`quota_80` -> `quota`,
/// `spend_100` -> `spend`, `rate_2x` -> `rate`, `dead` -> `dead`).
pub const ALERT_GROUPS: [&str; 4] = ["quota", "spend", "rate", "dead"];

/// The group of an event kind: its name up to the first `_`.
pub fn alert_group(kind: &str) -> &str {
    kind.split('_').next().unwrap_or(kind)
}

/// Parse a webhook's `--events` list (`quota,spend`; `all` or empty: every
/// group) into the stored form, comma-separated in [`ALERT_GROUPS`] order.
pub fn parse_alert_groups(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text.is_empty() || text == "all" || text == "*" {
        return Ok(ALERT_GROUPS.join(","));
    }
    let mut out: Vec<&str> = Vec::new();
    for g in text.split(',').map(str::trim) {
        if !ALERT_GROUPS.contains(&g) {
            return Err(format!(
                "unknown alert kind {g:?}: give some of {} (comma-separated), or all",
                ALERT_GROUPS.join(",")
            ));
        }
        if !out.contains(&g) {
            out.push(g);
        }
    }
    out.sort_by_key(|g| ALERT_GROUPS.iter().position(|x| x == g));
    Ok(out.join(","))
}

/// The `Agentq-Signature` header of a webhook delivery: `t=<unix>,v1=<hex>`
/// with hex = HMAC-SHA256(secret, "<unix>.<body>") (Stripe's scheme: the
/// timestamp is signed too, so a captured request cannot be replayed later
/// than the receiver's tolerance).
pub fn webhook_signature(secret: &[u8], unix: i64, body: &[u8]) -> String {
    format!(
        "t={unix},v1={}",
        hex::encode(hmac_sha256(secret, unix, body))
    )
}

fn hmac_sha256(secret: &[u8], unix: i64, body: &[u8]) -> Vec<u8> {
    use hmac::{Hmac, KeyInit, Mac};
    // HMAC takes keys of any length: new_from_slice cannot fail.
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(unix.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
}

/// Check a delivery's `Agentq-Signature` header as a receiver should: the
/// timestamp within `tolerance_s` of `now_unix`, and one `v1=` value equal
/// to the HMAC of `"<t>.<body>"` (compared in constant time). Returns why
/// not.
pub fn verify_webhook_signature(
    header: &str,
    secret: &[u8],
    body: &[u8],
    now_unix: i64,
    tolerance_s: i64,
) -> Result<(), String> {
    use hmac::{Hmac, KeyInit, Mac};
    let mut t = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => sigs.push(v.to_string()),
            _ => {}
        }
    }
    let t = t.ok_or("no t= timestamp")?;
    if (now_unix - t).abs() > tolerance_s {
        return Err(format!(
            "timestamp {t} is more than {tolerance_s} s from now"
        ));
    }
    for s in sigs {
        let Ok(given) = hex::decode(&s) else { continue };
        let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(t.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        if mac.verify_slice(&given).is_ok() {
            return Ok(());
        }
    }
    Err("no v1 signature matches".into())
}

#[cfg(test)]
mod tests {
    use super::QueueEvent;

    #[test]
    fn signatures_verify_and_refuse_changes() {
        use super::{verify_webhook_signature as verify, webhook_signature};
        let h = webhook_signature(b"whsec_x", 1_700_000_000, b"{\"a\":1}");
        assert!(h.starts_with("t=1700000000,v1="));
        assert_eq!(
            verify(&h, b"whsec_x", b"{\"a\":1}", 1_700_000_100, 300),
            Ok(())
        );
        assert!(verify(&h, b"whsec_y", b"{\"a\":1}", 1_700_000_000, 300).is_err());
        assert!(verify(&h, b"whsec_x", b"{\"a\":2}", 1_700_000_000, 300).is_err());
        assert!(verify(&h, b"whsec_x", b"{\"a\":1}", 1_700_001_000, 300).is_err());
    }

    #[test]
    fn alert_groups() {
        use super::{alert_group, parse_alert_groups};
        assert_eq!(alert_group("quota_80"), "quota");
        assert_eq!(alert_group("spend_100"), "spend");
        assert_eq!(alert_group("dead"), "dead");
        assert_eq!(parse_alert_groups("all").unwrap(), "quota,spend,rate,dead");
        assert_eq!(parse_alert_groups("dead, rate,dead").unwrap(), "rate,dead");
        assert!(parse_alert_groups("quota,bogus").is_err());
    }

    #[test]
    fn event_words_parse() {
        assert_eq!(
            QueueEvent::parse_all(" quota_80:acme rate_2x:b new_kind "),
            vec![
                QueueEvent::QuotaCrossed {
                    tenant: "acme".into(),
                    percent: 80
                },
                QueueEvent::RateAlert { tenant: "b".into() },
                QueueEvent::Other {
                    kind: "new_kind".into(),
                    tenant: String::new()
                },
            ]
        );
        assert!(QueueEvent::parse_all("").is_empty());
    }
}
