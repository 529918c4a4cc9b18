//! Network faults between a client and its server, for tests: a TCP proxy
//! on loopback that forwards every connection to the server and can cut
//! them all at once, the way a lost network path or a crashed middlebox
//! does. A request the proxy had already forwarded when it cut may have
//! been applied, and its answer is lost: the ambiguous outcome a client
//! (and a retry layer) must not turn into a wrong answer.
//!
//! ```no_run
//! # async fn example() -> std::io::Result<()> {
//! use dprim_conformance::faults::TcpProxy;
//! let proxy = TcpProxy::start("127.0.0.1:2379".parse().unwrap()).await?;
//! // point the client at proxy.addr(), then, while it works:
//! proxy.cut();
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP proxy from a loopback port of its own to one server.
pub struct TcpProxy {
    addr: SocketAddr,
    /// Bumped on every cut; each connection ends when it changes.
    cuts: watch::Sender<u64>,
    accept: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Starts forwarding from a free port on 127.0.0.1 to `server`.
    pub async fn start(server: SocketAddr) -> std::io::Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cuts, _) = watch::channel(0u64);
        let on_cut = cuts.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    // Out of file descriptors and the like: try again shortly.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let cut = on_cut.subscribe();
                tokio::spawn(forward(client, server, cut));
            }
        });
        Ok(TcpProxy { addr, cuts, accept })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Ends every connection open now, abruptly (a reset, not a close),
    /// in both directions; new connections are accepted as before.
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn forward(mut client: TcpStream, server: SocketAddr, mut cut: watch::Receiver<u64>) {
    cut.mark_unchanged();
    let Ok(mut upstream) = TcpStream::connect(server).await else {
        reset(&client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            let _ = client.shutdown().await;
            let _ = upstream.shutdown().await;
        }
        _ = cut.changed() => {
            reset(&client);
            reset(&upstream);
        }
    }
}

/// Makes the coming drop of `stream` send a reset instead of a close.
fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}
