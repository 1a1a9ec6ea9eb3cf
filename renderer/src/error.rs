//! The renderer's fatal failures and their exit codes.

use thiserror::Error;

use crate::{haproxy, render};

/// Fatal failures of [`crate::run`].
#[derive(Debug, Error)]
pub enum Error {
    /// A template that does not load or compile: fix it before starting.
    #[error(transparent)]
    Template(#[from] render::RenderFailure),
    /// etcd setup that retrying cannot fix (credentials, certificates, flags).
    #[error("{0}")]
    EtcdSetup(String),
    /// etcd unreachable in --once / --dry-run mode.
    #[error("{0}")]
    EtcdUnavailable(String),
    /// HAProxy could not be started (exec mode).
    #[error(transparent)]
    Haproxy(#[from] haproxy::HaproxyError),
    /// A local file or directory the run needs (e.g. `renderer check`'s scratch directory).
    #[error("{0}")]
    Io(String),
    /// --once: something failed.
    #[error("{0} failure(s) while applying; see the log")]
    Apply(usize),
}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Template(_) | Error::EtcdSetup(_) => 64,
            _ => 1,
        }
    }
}
