//! A cuttable TCP link on loopback: a proxy from a free port to a target port that can drop
//! every connection at once and refuse new ones (a client cut off from etcd while etcd
//! itself keeps serving everyone else), then open again.

use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::free_port;

/// Forwards 127.0.0.1:`port` → 127.0.0.1:`target` while open. Stops on drop.
pub struct Gate {
    pub port: u16,
    open: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    pub async fn start(target: u16) -> Gate {
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind gate port");
        let open = Arc::new(watch::channel(true).0);
        let state = open.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !*state.borrow() {
                    drop(client); // refused while cut
                    continue;
                }
                tokio::spawn(pipe(client, target, state.subscribe()));
            }
        });
        Gate { port, open, task }
    }

    /// Drops every connection through the gate and refuses new ones.
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Lets connections through again.
    pub fn open(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.open.send_replace(false);
        self.task.abort();
    }
}

async fn pipe(mut client: TcpStream, target: u16, mut open: watch::Receiver<bool>) {
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", target)).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = open.wait_for(|o| !*o) => {}
    }
}
