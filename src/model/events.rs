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

#[cfg(test)]
mod tests {
    use super::QueueEvent;

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
