//! A TCP forwarder the test can close and open: put in front of a node's
//! cluster port, it holds back the Raft traffic other nodes send it (the
//! bytes wait, connections stay open) while the node's HTTP API still
//! answers, so a follower that has not yet applied a write can be read
//! deterministically.
#![allow(dead_code)]

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Gate {
    pub port: u16,
    open: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    /// Listen on a free port and forward every connection to `target`.
    pub async fn start(target: u16) -> Gate {
        let listener = TcpListener::bind(("127.0.0.1", super::free_port())).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(watch::channel(true).0);
        let rx = open.subscribe();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else { continue };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, rx.clone()));
                tokio::spawn(pump(sr, cw, rx.clone()));
            }
        });
        Gate { port, open, task }
    }

    /// Hold back every byte in both directions until [`Gate::open`].
    pub fn close(&self) {
        self.open.send_replace(false);
    }

    pub fn open(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin,
    mut open: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if open.wait_for(|o| *o).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
