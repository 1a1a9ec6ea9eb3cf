//! `registrar docker` (in progress, issue #16): registering containers that carry no
//! registrar from the Docker engine's view of them. So far: what the labels mean
//! ([`labels`]); the engine client, events, lease and sync are still to come.

pub mod labels;
