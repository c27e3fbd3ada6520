//! Names of tenants, queues, kinds and tiers: 1-64 of `[A-Za-z0-9_.-]`,
//! starting with a letter or digit. The enqueue script applies the same
//! rule (`name_ok`), and keys are built from names, so a name can never
//! hold a key separator, a brace (hash tag) or whitespace.

/// Input refused before anything was written; the text says what was
/// wrong and how to write it instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidInput(pub String);

/// Check a name; `what` names it in the error ("tenant", "queue", ...).
pub fn validate_name(what: &str, name: &str) -> Result<(), InvalidInput> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        let shown: String = name.chars().take(80).collect();
        Err(InvalidInput(format!(
            "{what} {shown:?} must be 1-64 characters of letters, digits, '_', '.' or '-', starting with a letter or digit"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::validate_name;

    #[test]
    fn names_follow_the_scripts_rule() {
        for ok in ["acme", "a", "Tenant_1.prod-2", &"x".repeat(64)] {
            assert!(validate_name("tenant", ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "_a", "a b", "a:b", "{a}", "é", &"x".repeat(65)] {
            assert!(validate_name("tenant", bad).is_err(), "{bad}");
        }
    }
}
