//! The registry contract: everything the registrar (writer) and the renderer (reader)
//! must agree on, and nothing else.
//!
//! * [`key`]: the key layout `<prefix>/<service>/<id>`.
//! * [`instance`]: the JSON record stored under a key, with its schema version.
//! * [`admin`]: an operator's controls for one instance (`<prefix>/_admin/<service>/<id>`).
//! * [`validate`]: the one validation both sides use (the registrar refuses, the renderer skips).
//! * [`etcd`]: etcd connection flags in etcdctl's vocabulary, turned into a checked client.
//! * [`duration`]: human durations (`3s`, `500ms`, bare number = seconds) for CLI flags.
#![forbid(unsafe_code)]

pub mod admin;
pub mod duration;
pub mod etcd;
pub mod instance;
pub mod key;
pub mod validate;

pub use admin::{admin_key, classify, Admin, AdminState, KeyKind};
pub use instance::{DecodeError, Instance, RecordState, SCHEMA_VERSION};
pub use key::{instance_key, parse_key, service_prefix, DEFAULT_PREFIX};
