//! The instance record stored as JSON under `<prefix>/<service>/<id>`.
//!
//! ```json
//! {"id":"s1","service":"webapp","address":"192.168.42.11","port":3000,
//!  "tags":["v1"],"meta":{"zone":"a"},"weight":100,"schema":1}
//! ```
//!
//! `id`, `service`, `address` and `port` are required; `tags`, `meta`, `weight` default to
//! `[]`, `{}` and 100; `schema` defaults to 1. Unknown fields are ignored, so a newer
//! writer can add optional fields without breaking older readers; an incompatible change
//! bumps `schema`, and a reader skips records whose schema it does not know.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::validate::{self, ValidationError};

/// The schema version this crate writes and understands.
pub const SCHEMA_VERSION: u32 = 1;
/// Largest record a reader accepts; larger values are skipped without being parsed.
pub const MAX_RECORD_BYTES: usize = 16 * 1024;
/// Default weight when a record has none.
pub const DEFAULT_WEIGHT: u16 = 100;

/// One registered instance of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    pub service: String,
    pub address: String,
    pub port: u16,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    #[serde(default = "default_weight")]
    pub weight: u16,
    #[serde(default = "default_schema")]
    pub schema: u32,
    /// `"leaving"`: the instance is stopping on purpose (its registrar writes this just
    /// before it revokes the lease): load balancers drain it at once and do not take its
    /// departure for a lost lease. Absent while it serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<RecordState>,
}

/// The instance's own state, as its registrar writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordState {
    /// Stopping on purpose; the record goes away next.
    Leaving,
    /// A value from a newer writer: ignored (served as usual).
    #[serde(other)]
    Unknown,
}

fn default_weight() -> u16 {
    DEFAULT_WEIGHT
}

fn default_schema() -> u32 {
    SCHEMA_VERSION
}

/// Why a stored value could not be used. [`DecodeError::reason`] is a short stable label
/// for logs and metrics.
#[derive(Debug, Error)]
pub enum DecodeError {
    #[error("record is {0} bytes, larger than the {MAX_RECORD_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("not a valid instance record: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported schema version {0} (this build understands {SCHEMA_VERSION})")]
    Schema(u32),
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("record says {field} {value:?} but the key says {expected:?}")]
    KeyMismatch {
        field: &'static str,
        value: String,
        expected: String,
    },
}

impl DecodeError {
    /// Stable label: `too_large`, `json`, `schema`, `invalid`, `key_mismatch`.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::TooLarge(_) => "too_large",
            DecodeError::Json(_) => "json",
            DecodeError::Schema(_) => "schema",
            DecodeError::Invalid(_) => "invalid",
            DecodeError::KeyMismatch { .. } => "key_mismatch",
        }
    }
}

impl Instance {
    /// A new record with default tags, meta and weight.
    pub fn new(service: &str, id: &str, address: &str, port: u16) -> Self {
        Instance {
            id: id.to_string(),
            service: service.to_string(),
            address: address.to_string(),
            port,
            tags: Vec::new(),
            meta: BTreeMap::new(),
            weight: DEFAULT_WEIGHT,
            schema: SCHEMA_VERSION,
            state: None,
        }
    }

    /// Checks every field against the contract.
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate::name("service", &self.service)?;
        validate::name("id", &self.id)?;
        validate::address(&self.address)?;
        validate::port(self.port)?;
        validate::weight(self.weight)?;
        if self.tags.len() > validate::MAX_TAGS {
            return Err(ValidationError::TooMany {
                field: "tags",
                count: self.tags.len(),
                max: validate::MAX_TAGS,
            });
        }
        for tag in &self.tags {
            validate::word("tag", tag, validate::MAX_TAG_LEN, false)?;
        }
        if self.meta.len() > validate::MAX_META {
            return Err(ValidationError::TooMany {
                field: "meta",
                count: self.meta.len(),
                max: validate::MAX_META,
            });
        }
        for (k, v) in &self.meta {
            validate::word("meta key", k, validate::MAX_META_KEY_LEN, false)?;
            validate::word("meta value", v, validate::MAX_META_VALUE_LEN, true)?;
        }
        Ok(())
    }

    /// True when its registrar marked it as stopping on purpose.
    pub fn leaving(&self) -> bool {
        self.state == Some(RecordState::Leaving)
    }

    /// The JSON stored in etcd.
    pub fn encode(&self) -> String {
        // Serialising a struct of strings, integers and string maps cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Decodes and validates a stored value. `service` and `id` come from the key; the
    /// record must agree with them so a record cannot pose as another instance.
    pub fn decode(service: &str, id: &str, value: &[u8]) -> Result<Instance, DecodeError> {
        if value.len() > MAX_RECORD_BYTES {
            return Err(DecodeError::TooLarge(value.len()));
        }
        let inst: Instance = serde_json::from_slice(value)?;
        if inst.schema != SCHEMA_VERSION {
            return Err(DecodeError::Schema(inst.schema));
        }
        inst.validate()?;
        if inst.service != service {
            return Err(DecodeError::KeyMismatch {
                field: "service",
                value: inst.service,
                expected: service.to_string(),
            });
        }
        if inst.id != id {
            return Err(DecodeError::KeyMismatch {
                field: "id",
                value: inst.id,
                expected: id.to_string(),
            });
        }
        Ok(inst)
    }
}

/// `value` (a stored record) with `"state":"leaving"`; `None` if it is not a JSON object.
/// Every other field is kept as written, including ones this build does not know.
pub fn leaving_value(value: &str) -> Option<String> {
    let mut record: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(value).ok()?;
    record.insert("state".into(), serde_json::Value::from("leaving"));
    serde_json::to_string(&record).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_defaults() {
        let v = br#"{"id":"s1","service":"webapp","address":"192.168.42.11","port":3000}"#;
        let i = Instance::decode("webapp", "s1", v).unwrap();
        assert_eq!(i.weight, 100);
        assert!(i.tags.is_empty() && i.meta.is_empty());
        let again = Instance::decode("webapp", "s1", i.encode().as_bytes()).unwrap();
        assert_eq!(i, again);
    }

    #[test]
    fn the_documented_example_decodes() {
        let v = br#"{"id":"s1","service":"webapp","address":"192.168.42.11","port":3000,"tags":["v1"],"meta":{"zone":"a"},"weight":100}"#;
        let i = Instance::decode("webapp", "s1", v).unwrap();
        assert_eq!(i.tags, vec!["v1"]);
        assert_eq!(i.meta["zone"], "a");
    }

    #[test]
    fn unknown_fields_are_ignored_unknown_schema_is_not() {
        let v = br#"{"id":"s1","service":"w","address":"::1","port":1,"future":true}"#;
        assert!(Instance::decode("w", "s1", v).is_ok());
        let v = br#"{"id":"s1","service":"w","address":"::1","port":1,"schema":2}"#;
        assert_eq!(
            Instance::decode("w", "s1", v).unwrap_err().reason(),
            "schema"
        );
    }

    #[test]
    fn leaving_is_read_and_other_states_are_ignored() {
        let v = br#"{"id":"s1","service":"w","address":"::1","port":1,"state":"leaving"}"#;
        let i = Instance::decode("w", "s1", v).unwrap();
        assert!(i.leaving());
        assert!(i.encode().contains(r#""state":"leaving""#));
        let v = br#"{"id":"s1","service":"w","address":"::1","port":1,"state":"resting"}"#;
        assert!(!Instance::decode("w", "s1", v).unwrap().leaving());
        let serving = Instance::new("w", "s1", "::1", 1).encode();
        assert!(!serving.contains("state"), "{serving}");
        let marked = leaving_value(&serving).unwrap();
        assert!(Instance::decode("w", "s1", marked.as_bytes())
            .unwrap()
            .leaving());
        assert_eq!(leaving_value("[1]"), None);
    }

    #[test]
    fn hostile_records_are_rejected() {
        let cases: &[&[u8]] = &[
            b"not json",
            br#"{"id":"s1","service":"w","address":"1.2.3.4\nserver evil 6.6.6.6:80","port":80}"#,
            br#"{"id":"s1","service":"w","address":"1.2.3.4","port":0}"#,
            br#"{"id":"s1","service":"w","address":"1.2.3.4","port":70000}"#,
            br#"{"id":"s1","service":"w","address":"1.2.3.4","port":80,"tags":["a b"]}"#,
            br#"{"id":"s1","service":"w","address":"1.2.3.4","port":80,"meta":{"k":"v # x"}}"#,
            br#"{"id":"s1","service":"w","address":"1.2.3.4","port":80,"weight":1000}"#,
            br#"{"id":"s2","service":"w","address":"1.2.3.4","port":80}"#,
            br#"{"id":"s1","service":"x","address":"1.2.3.4","port":80}"#,
        ];
        for c in cases {
            assert!(
                Instance::decode("w", "s1", c).is_err(),
                "{}",
                String::from_utf8_lossy(c)
            );
        }
        let huge = format!(
            r#"{{"id":"s1","service":"w","address":"1.2.3.4","port":80,"meta":{{"k":"{}"}}}}"#,
            "a".repeat(MAX_RECORD_BYTES)
        );
        assert_eq!(
            Instance::decode("w", "s1", huge.as_bytes())
                .unwrap_err()
                .reason(),
            "too_large"
        );
    }
}
