//! Process signals: SIGTERM and SIGINT request a graceful stop; SIGHUP asks for the
//! templates to be read again (`systemctl reload`), never a restart of HAProxy.

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Cancels `shutdown` on the first SIGTERM or SIGINT; returns the receiver of SIGHUPs.
pub fn install(shutdown: CancellationToken) -> std::io::Result<mpsc::Receiver<()>> {
    observe::signal::stop_on_term(shutdown)?;
    observe::signal::hangups("reloading templates")
}
