//! The signals every daemon here handles the same way: SIGTERM/SIGINT stop it gracefully,
//! SIGHUP asks it to reload (what that means is each daemon's own).

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Cancels `shutdown` on the first SIGTERM or SIGINT (logged).
pub fn stop_on_term(shutdown: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "stopping");
        shutdown.cancel();
    });
    Ok(())
}

/// SIGHUPs as messages (logged as `what`); several arriving before one is taken count once.
pub fn hangups(what: &'static str) -> std::io::Result<mpsc::Receiver<()>> {
    let mut hup = signal(SignalKind::hangup())?;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!(signal = "SIGHUP", "{what}");
            let _ = tx.try_send(());
        }
    });
    Ok(rx)
}
