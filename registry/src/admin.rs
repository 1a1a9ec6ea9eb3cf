//! Operator controls: `<prefix>/_admin/<service>/<id>` holds what an operator wants of one
//! instance, apart from the instance's own record.
//!
//! ```json
//! {"state":"drain","weight":10,"reason":"disk swap, ticket 4711"}
//! ```
//!
//! Every field is optional: `state` is `ready`, `drain` (no new requests; sessions and
//! sticky clients finish) or `maint` (out of the load balancer); `weight` (0–256) overrides
//! the record's; `reason` (up to 200 printable ASCII characters) is shown by `renderer
//! status`, never written to a config. Unknown fields are ignored. The key is **not**
//! bound to a lease: the intent outlives the instance's restarts; deleting the key gives
//! the instance back to its own record. A leading underscore can never be a service name,
//! so `_admin` never collides with a service, and one watch of the prefix sees both.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::key::normalize_prefix;
use crate::validate::{self, ValidationError};

/// The path segment under the prefix that holds admin keys.
pub const ADMIN_SEGMENT: &str = "_admin";
/// Largest admin value a reader accepts.
pub const MAX_ADMIN_BYTES: usize = 4 * 1024;
/// Longest `reason`.
pub const MAX_REASON_LEN: usize = 200;

/// What an operator asks of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// Served as its record says.
    #[default]
    Ready,
    /// No new requests; sessions in flight and sticky clients finish.
    Drain,
    /// Out of the load balancer (HAProxy: maintenance), still in the config.
    Maint,
}

impl AdminState {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        }
    }
}

/// The value of an admin key.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Admin {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<AdminState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Why an admin value was skipped.
#[derive(Debug, Error)]
pub enum AdminError {
    #[error("admin value is {0} bytes, larger than the {MAX_ADMIN_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("not a valid admin value (fields: state \"ready\"|\"drain\"|\"maint\", weight 0-256, reason): {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("reason is invalid: 1-{MAX_REASON_LEN} printable ASCII characters")]
    Reason,
}

impl AdminError {
    /// Stable label, like [`crate::DecodeError::reason`].
    pub fn reason(&self) -> &'static str {
        match self {
            AdminError::TooLarge(_) => "too_large",
            AdminError::Json(_) => "json",
            AdminError::Invalid(_) | AdminError::Reason => "invalid",
        }
    }
}

impl Admin {
    /// Decodes and validates a stored admin value.
    pub fn decode(value: &[u8]) -> Result<Admin, AdminError> {
        if value.len() > MAX_ADMIN_BYTES {
            return Err(AdminError::TooLarge(value.len()));
        }
        // An object only (serde would also take `[]` for a struct of optional fields).
        let object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(value)?;
        let admin: Admin = serde_json::from_value(serde_json::Value::Object(object))?;
        if let Some(w) = admin.weight {
            validate::weight(w)?;
        }
        if let Some(r) = &admin.reason {
            let printable = r.bytes().all(|b| (0x20..0x7f).contains(&b));
            if r.is_empty() || r.len() > MAX_REASON_LEN || !printable {
                return Err(AdminError::Reason);
            }
        }
        Ok(admin)
    }

    /// The JSON stored in etcd.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The state asked for (`ready` when the key names none).
    pub fn state(&self) -> AdminState {
        self.state.unwrap_or_default()
    }
}

/// The prefix of every admin key: `<prefix>/_admin/`.
pub fn admin_root(prefix: &str) -> String {
    format!("{}/{ADMIN_SEGMENT}/", normalize_prefix(prefix))
}

/// The admin key of one instance: `<prefix>/_admin/<service>/<id>`.
pub fn admin_key(prefix: &str, service: &str, id: &str) -> String {
    format!("{}{service}/{id}", admin_root(prefix))
}

/// What a key under the prefix is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind<'a> {
    /// `<prefix>/<service>/<id>`: an instance's record.
    Instance { service: &'a str, id: &'a str },
    /// `<prefix>/_admin/<service>/<id>`: an operator's controls for that instance.
    Admin { service: &'a str, id: &'a str },
    /// Anything else.
    Other,
}

/// Classifies `key`: instance record, admin key, or neither.
pub fn classify<'a>(prefix: &str, key: &'a str) -> KeyKind<'a> {
    let admin = admin_root(prefix);
    if let Some(rest) = key.strip_prefix(admin.as_str()) {
        return match rest.split_once('/') {
            Some((service, id)) if !service.is_empty() && !id.is_empty() && !id.contains('/') => {
                KeyKind::Admin { service, id }
            }
            _ => KeyKind::Other,
        };
    }
    match crate::key::parse_key(prefix, key) {
        Some((service, id)) => KeyKind::Instance { service, id },
        None => KeyKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_is_optional_and_unknown_ones_are_ignored() {
        assert_eq!(Admin::decode(b"{}").unwrap(), Admin::default());
        let a = Admin::decode(br#"{"state":"drain","weight":10,"reason":"disk swap","by":"ops"}"#)
            .unwrap();
        assert_eq!(a.state(), AdminState::Drain);
        assert_eq!(a.weight, Some(10));
        assert_eq!(Admin::decode(a.encode().as_bytes()).unwrap(), a);
        assert_eq!(
            Admin::decode(br#"{"state":"maint"}"#).unwrap().state(),
            AdminState::Maint
        );
    }

    #[test]
    fn hostile_values_are_refused() {
        for bad in [
            &br#"{"state":"down"}"#[..],
            br#"{"weight":257}"#,
            br#"{"weight":-1}"#,
            br#"{"reason":"a\nserver evil 6.6.6.6:80"}"#,
            br#"{"reason":""}"#,
            b"not json",
            b"[]",
        ] {
            assert!(
                Admin::decode(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!(r#"{{"reason":"{}"}}"#, "x".repeat(MAX_REASON_LEN + 1));
        assert_eq!(
            Admin::decode(long.as_bytes()).unwrap_err().reason(),
            "invalid"
        );
        let huge = format!(r#"{{"pad":"{}"}}"#, "x".repeat(MAX_ADMIN_BYTES));
        assert_eq!(
            Admin::decode(huge.as_bytes()).unwrap_err().reason(),
            "too_large"
        );
    }

    #[test]
    fn keys_are_classified() {
        assert_eq!(
            classify("/services", "/services/_admin/webapp/s1"),
            KeyKind::Admin {
                service: "webapp",
                id: "s1"
            }
        );
        assert_eq!(
            classify("/services/", "/services/webapp/s1"),
            KeyKind::Instance {
                service: "webapp",
                id: "s1"
            }
        );
        for other in [
            "/services/_admin/webapp",
            "/services/_admin/webapp/s1/x",
            "/services/_admin//s1",
            "/services/webapp",
        ] {
            assert_eq!(classify("/services", other), KeyKind::Other, "{other}");
        }
        assert_eq!(
            admin_key("/services/", "webapp", "s1"),
            "/services/_admin/webapp/s1"
        );
    }
}
