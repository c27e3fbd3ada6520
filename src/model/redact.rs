//! Secrets out of URLs before they reach a log line or an error message.
//!
//! Property: [`redact_url`] never returns a password of the user info or
//! the value of a query parameter named like a secret; everything else of
//! the URL (scheme, user, host, path, other parameters) is kept, so the
//! message still says where agentq tried to connect.

/// A URL with its secrets replaced by `***`, for logs and messages: the
/// password of the user info (`scheme://user:***@host`) and the values of
/// query parameters that carry one (`password`, `sslpassword`,
/// `sentinelPassword`, `pass`,
/// `passwd`, `secret`, `token`, any case).
pub fn redact_url(url: &str) -> String {
    // The query starts at the first '?' after the user info, whose '@' is
    // the last one before any '=' (a password may itself contain '?').
    let before_values = url.find('=').map_or(url, |i| &url[..i]);
    let search_from = before_values.rfind('@').unwrap_or(0);
    let (main, query) = match url[search_from..].find('?') {
        Some(i) => (&url[..search_from + i], Some(&url[search_from + i + 1..])),
        None => (url, None),
    };
    let mut out = redact_user_info(main);
    if let Some(q) = query {
        out.push('?');
        out.push_str(&redact_query(q));
    }
    out
}

fn redact_user_info(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((auth, host)) = rest.rsplit_once('@') else {
        return url.to_string();
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

fn redact_query(query: &str) -> String {
    const SECRET_KEYS: [&str; 7] = [
        "password",
        "sslpassword",
        "sentinelpassword",
        "pass",
        "passwd",
        "secret",
        "token",
    ];
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if SECRET_KEYS.iter().any(|s| s.eq_ignore_ascii_case(k)) => {
                format!("{k}=***")
            }
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("redis-sentinel://:pw@s1:26379?sentinelServiceName=m&sentinelPassword=sp"),
            "redis-sentinel://:***@s1:26379?sentinelServiceName=m&sentinelPassword=***"
        );
        assert_eq!(redact_url("redis://:secret@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact_url("postgres://u:p@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
        assert_eq!(
            redact_url("postgres://u@h/db?sslmode=require&password=p@ss&PassWord=x"),
            "postgres://u@h/db?sslmode=require&password=***&PassWord=***"
        );
        assert_eq!(
            redact_url("postgres://u:a@b@h/db?sslrootcert=/ca.pem"),
            "postgres://u:***@h/db?sslrootcert=/ca.pem"
        );
        assert_eq!(
            redact_url("rediss://:pw@h:6380/0"),
            "rediss://:***@h:6380/0"
        );
        assert_eq!(redact_url("redis://:pa?ss@h:1"), "redis://:***@h:1");
        assert_eq!(
            redact_url("postgres://u:p?w@h/db?sslmode=require"),
            "postgres://u:***@h/db?sslmode=require"
        );
    }
}
