//! The one validation of registry values, used by both sides: the registrar refuses to
//! start with an invalid value, the renderer skips a record that fails it.
//!
//! The rules are deliberately narrow. Every value here can end up as a word in
//! `haproxy.cfg`; anything that could split a word (whitespace), start a comment (`#`),
//! open a quote, an escape or an environment expansion (`"`, `'`, `\`, `$`), or end a line
//! is rejected, so no registry value can add a line, directive or comment to the config.

use std::net::IpAddr;

use thiserror::Error;

/// Maximum length of a service name or instance id.
pub const MAX_NAME_LEN: usize = 63;
/// Maximum number of tags on one instance.
pub const MAX_TAGS: usize = 32;
/// Maximum length of one tag.
pub const MAX_TAG_LEN: usize = 64;
/// Maximum number of meta entries on one instance.
pub const MAX_META: usize = 32;
/// Maximum length of a meta key.
pub const MAX_META_KEY_LEN: usize = 64;
/// Maximum length of a meta value.
pub const MAX_META_VALUE_LEN: usize = 256;
/// Maximum weight (HAProxy accepts 0..=256).
pub const MAX_WEIGHT: u16 = 256;

/// Why a value was refused. The message names the field and the rule.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ValidationError {
    #[error("{field} {value:?} is invalid: must match [A-Za-z0-9][A-Za-z0-9._-]{{0,62}}")]
    Name { field: &'static str, value: String },
    #[error(
        "address {0:?} is invalid: must be an IP address or a DNS hostname (no port; use --port)"
    )]
    Address(String),
    #[error("port 0 is invalid: must be 1-65535")]
    Port,
    #[error("weight {0} is invalid: must be 0-{MAX_WEIGHT}")]
    Weight(u16),
    #[error("too many {field}: {count} (max {max})")]
    TooMany {
        field: &'static str,
        count: usize,
        max: usize,
    },
    #[error(
        "{field} {value:?} is invalid: 1-{max} characters from A-Z a-z 0-9 . _ - : / = + @ , % ~"
    )]
    Word {
        field: &'static str,
        value: String,
        max: usize,
    },
}

/// Service names and instance ids: `[A-Za-z0-9][A-Za-z0-9._-]{0,62}`.
pub fn name(field: &'static str, value: &str) -> Result<(), ValidationError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_NAME_LEN
        && value.as_bytes()[0].is_ascii_alphanumeric()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ValidationError::Name {
            field,
            value: truncate(value),
        })
    }
}

/// An IP literal (v4 or v6) or a DNS hostname (RFC 1123 labels, at most 253 characters).
pub fn address(value: &str) -> Result<(), ValidationError> {
    if value.parse::<IpAddr>().is_ok() || is_hostname(value) {
        Ok(())
    } else {
        Err(ValidationError::Address(truncate(value)))
    }
}

fn is_hostname(value: &str) -> bool {
    let v = value.strip_suffix('.').unwrap_or(value);
    !v.is_empty()
        && v.len() <= 253
        && v.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        // An all-numeric dotted name is a malformed IP, not a hostname.
        && !v.split('.').all(|l| l.bytes().all(|b| b.is_ascii_digit()))
}

/// Port 1-65535 (the type already bounds the top).
pub fn port(value: u16) -> Result<(), ValidationError> {
    if value == 0 {
        Err(ValidationError::Port)
    } else {
        Ok(())
    }
}

/// Weight 0-256, HAProxy's range.
pub fn weight(value: u16) -> Result<(), ValidationError> {
    if value > MAX_WEIGHT {
        Err(ValidationError::Weight(value))
    } else {
        Ok(())
    }
}

/// A word that may appear in a config file: tags, meta keys (non-empty) and meta values
/// (may be empty).
pub fn word(
    field: &'static str,
    value: &str,
    max: usize,
    allow_empty: bool,
) -> Result<(), ValidationError> {
    let ok = (allow_empty || !value.is_empty())
        && value.len() <= max
        && value.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'.' | b'_' | b'-' | b':' | b'/' | b'=' | b'+' | b'@' | b',' | b'%' | b'~'
                )
        });
    if ok {
        Ok(())
    } else {
        Err(ValidationError::Word {
            field,
            value: truncate(value),
            max,
        })
    }
}

/// Keeps error messages (and logs) bounded when a hostile value is huge.
fn truncate(value: &str) -> String {
    const MAX: usize = 80;
    if value.len() <= MAX {
        return value.to_string();
    }
    let mut end = MAX;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &value[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["s1", "webapp", "a", "A.b_c-d", &"x".repeat(63)] {
            assert!(name("id", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            ".a",
            "a b",
            "a/b",
            "a\nb",
            "a#b",
            "a\"b",
            &"x".repeat(64),
            "é",
        ] {
            assert!(name("id", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn addresses() {
        for ok in [
            "192.168.42.11",
            "::1",
            "fe80::1",
            "web-1.example.com",
            "localhost",
            "a.",
        ] {
            assert!(address(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "10.0.0.1:3000",
            "host:80",
            "a b",
            "-a.com",
            "a..b",
            "999.1.1.1",
            "1.2.3",
            "x\nserver evil 1.2.3.4:80",
            "[::1]",
        ] {
            assert!(address(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn words() {
        assert!(word("tag", "v1", MAX_TAG_LEN, false).is_ok());
        assert!(word("meta value", "", MAX_META_VALUE_LEN, true).is_ok());
        assert!(word("tag", "", MAX_TAG_LEN, false).is_err());
        for bad in [
            "a b", "a#b", "a\"b", "a'b", "a\\b", "${X}", "a\tb", "a\nb", "a\rb",
        ] {
            assert!(word("tag", bad, MAX_TAG_LEN, false).is_err(), "{bad:?}");
        }
        assert!(word("tag", &"x".repeat(65), MAX_TAG_LEN, false).is_err());
    }

    #[test]
    fn ports_and_weights() {
        assert!(port(0).is_err());
        assert!(port(1).is_ok() && port(65535).is_ok());
        assert!(weight(256).is_ok() && weight(257).is_err());
    }

    #[test]
    fn hostile_values_are_truncated_in_errors() {
        let huge = "x ".repeat(10_000);
        let msg = name("id", &huge).unwrap_err().to_string();
        assert!(msg.len() < 300, "{}", msg.len());
    }
}
