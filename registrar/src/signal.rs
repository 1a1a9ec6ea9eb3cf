//! Process signals: SIGTERM/SIGINT request a graceful stop (cancel the token, remember
//! which signal so it can be passed on); SIGHUP, SIGUSR1, SIGUSR2 and SIGQUIT are
//! forwarded to the app in exec mode (standalone, SIGHUP puts the record again and
//! re-runs the health check). `registrar docker`: SIGHUP syncs ([`install_daemon`]).

use nix::sys::signal::Signal;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Installs the handlers. Returns the receiver of signals to forward and the signal that
/// requested shutdown (set before `shutdown` is cancelled).
pub fn install(
    shutdown: CancellationToken,
) -> std::io::Result<(
    mpsc::UnboundedReceiver<Signal>,
    tokio::sync::watch::Receiver<Signal>,
)> {
    let (fwd_tx, fwd_rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(Signal::SIGTERM);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let forwarded = [
        (SignalKind::hangup(), Signal::SIGHUP),
        (SignalKind::user_defined1(), Signal::SIGUSR1),
        (SignalKind::user_defined2(), Signal::SIGUSR2),
        (SignalKind::quit(), Signal::SIGQUIT),
    ];
    for (kind, sig) in forwarded {
        let mut s = signal(kind)?;
        let tx = fwd_tx.clone();
        tokio::spawn(async move {
            while s.recv().await.is_some() {
                if tx.send(sig).is_err() {
                    return;
                }
            }
        });
    }
    tokio::spawn(async move {
        let sig = tokio::select! {
            _ = term.recv() => Signal::SIGTERM,
            _ = int.recv() => Signal::SIGINT,
        };
        tracing::info!(signal = %sig, "stopping");
        stop_tx.send_replace(sig);
        shutdown.cancel();
    });
    Ok((fwd_rx, stop_rx))
}

/// `registrar docker`: SIGTERM/SIGINT cancel `shutdown`; each SIGHUP arrives on the
/// returned receiver (a full sync).
pub fn install_daemon(shutdown: CancellationToken) -> std::io::Result<mpsc::Receiver<()>> {
    observe::signal::stop_on_term(shutdown)?;
    observe::signal::hangups("syncing with Docker and etcd")
}
