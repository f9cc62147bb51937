//! The user label put on a user's GameServer (label syntax itself is
//! checked in `util::label`, which the configuration uses too).
//!
//! The default value is exactly what the original front end used, built from
//! the verified email: `accounts.google.com:alice@example.com` with `:` and
//! `@` turned into `.` → `accounts.google.com.alice.example.com`. The WebUI
//! image uses the value as the user's folder on shared storage, so existing
//! users keep their files. Emails that would not make a valid label value
//! (too long, odd characters) get a stable truncated form with a hash suffix.

use sha2::{Digest, Sha256};

use crate::util::label::{is_valid_value, MAX_VALUE};

const HASH_CHARS: usize = 10;
const IAP_PREFIX: &str = "accounts.google.com";

/// The label value for the user with this verified email. Always a valid
/// Kubernetes label value, and always the same for the same email.
pub fn user_label_value(email: &str) -> String {
    let original = format!("{IAP_PREFIX}.{}", email.replace([':', '@'], "."));
    if is_valid_value(&original) {
        return original;
    }
    let digest = Sha256::digest(email.as_bytes());
    let hash: String = digest.iter().map(|b| format!("{b:02x}")).collect::<String>()[..HASH_CHARS].to_string();
    let sanitized: String = original
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(MAX_VALUE - HASH_CHARS - 1)
        .collect();
    let stem = sanitized.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    format!("{stem}-{hash}")
}

/// A collision-free companion to [`user_label_value`]: that value maps
/// `alice.smith@example.com` and `alice@smith.example.com` alike (both `:`
/// and `@` become `.`), so allocation also matches on this hash of the
/// exact email. 40 hex characters: a valid label value.
pub fn user_hash(email: &str) -> String {
    Sha256::digest(email.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()[..40]
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_form_is_the_original_front_ends() {
        assert_eq!(
            user_label_value("alice@example.com"),
            "accounts.google.com.alice.example.com"
        );
    }

    #[test]
    fn long_and_odd_emails_give_valid_stable_distinct_values() {
        let long = format!("{}@example.com", "a".repeat(80));
        let odd = "o'brien+sd@example.com";
        for email in [
            long.as_str(),
            odd,
            "UPPER@Example.COM",
            "trailing-@x.io",
            "é@example.com",
        ] {
            let value = user_label_value(email);
            assert!(is_valid_value(&value), "{email} → {value}");
            assert_eq!(value, user_label_value(email), "unstable for {email}");
        }
        let other_long = format!("{}b@example.com", "a".repeat(79));
        assert_ne!(user_label_value(&long), user_label_value(&other_long));
        assert!(user_label_value(odd).starts_with("accounts.google.com.o-brien-sd.example.com-"));
    }

    #[test]
    fn emails_that_share_a_label_value_have_different_hashes() {
        let (a, b) = ("alice.smith@example.com", "alice@smith.example.com");
        assert_eq!(user_label_value(a), user_label_value(b));
        assert_ne!(user_hash(a), user_hash(b));
        assert!(is_valid_value(&user_hash(a)));
    }
}
