//! Kubernetes label syntax: the configuration checks the label key it is
//! given, the Agones backend makes label values, and neither should need the
//! other for it.

/// The longest label value (and name part of a key).
pub const MAX_VALUE: usize = 63;

/// `(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?`, at most 63 characters.
pub fn is_valid_value(value: &str) -> bool {
    if value.len() > MAX_VALUE {
        return false;
    }
    if value.is_empty() {
        return true;
    }
    let bytes = value.as_bytes();
    let alnum = |b: u8| b.is_ascii_alphanumeric();
    alnum(bytes[0])
        && alnum(bytes[bytes.len() - 1])
        && bytes.iter().all(|&b| alnum(b) || matches!(b, b'-' | b'_' | b'.'))
}

/// Checks a label key (`[prefix/]name`), returning why it is invalid.
pub fn check_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if name.is_empty() || !is_valid_value(name) {
        return Err(format!(
            "{key:?}: the name part must be 1-63 characters of letters, digits, '-', '_', '.', starting and ending with a letter or digit"
        ));
    }
    if let Some(prefix) = prefix {
        let valid_dns = !prefix.is_empty()
            && prefix.len() <= 253
            && prefix.split('.').all(|part| {
                !part.is_empty()
                    && part.len() <= 63
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !valid_dns {
            return Err(format!(
                "{key:?}: the prefix must be a lower-case DNS subdomain such as \"example.com\""
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_keys_are_checked_like_kubernetes_does() {
        assert!(check_key("user").is_ok());
        assert!(check_key("session-router.dev/user").is_ok());
        assert!(check_key("").is_err());
        assert!(check_key("user name").is_err());
        assert!(check_key("Bad_Prefix/user").is_err());
        assert!(check_key(&"a".repeat(64)).is_err());
    }
}
