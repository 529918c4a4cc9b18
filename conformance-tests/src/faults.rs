//! Network faults between a client and its server, for tests: a TCP proxy
//! on loopback that forwards every connection to the server and can cut
//! them all at once, the way a crashed middlebox does, or isolate the
//! client for a while, the way a partition does (nothing gets through and
//! nothing says so; the client learns only from its timeouts). A request
//! the proxy had already forwarded may have been applied with its answer
//! lost: the ambiguous outcome a client (and a retry layer) must not turn
//! into a wrong answer.
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
    /// Whether the client is cut off from the server (see `isolate`).
    isolated: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Starts forwarding from a free port on 127.0.0.1 to `server`.
    pub async fn start(server: SocketAddr) -> std::io::Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cuts, _) = watch::channel(0u64);
        let (isolated, _) = watch::channel(false);
        let on_cut = cuts.clone();
        let on_isolate = isolated.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    // Out of file descriptors and the like: try again shortly.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let cut = on_cut.subscribe();
                let isolated = on_isolate.subscribe();
                tokio::spawn(forward(client, server, cut, isolated));
            }
        });
        Ok(TcpProxy {
            addr,
            cuts,
            isolated,
            accept,
        })
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

    /// Cuts the client off from the server until [`TcpProxy::heal`]: from
    /// now on nothing passes in either direction, on open connections or
    /// new ones, and nothing tells the client so (no reset, no close). At
    /// the heal every connection made or open meanwhile is reset, as a
    /// real one would by then have timed out, and new ones work again.
    pub fn isolate(&self) {
        self.isolated.send_replace(true);
    }

    /// Ends an isolation (see [`TcpProxy::isolate`]).
    pub fn heal(&self) {
        self.isolated.send_replace(false);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn forward(
    mut client: TcpStream,
    server: SocketAddr,
    mut cut: watch::Receiver<u64>,
    mut isolated: watch::Receiver<bool>,
) {
    cut.mark_unchanged();
    let isolated_now = *isolated.borrow_and_update();
    if isolated_now {
        // Accepted (as by a kernel's backlog) but never answered.
        let _ = isolated.wait_for(|i| !*i).await;
        reset(&client);
        return;
    }
    let Ok(mut upstream) = TcpStream::connect(server).await else {
        reset(&client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let partitioned = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => None,
        _ = cut.changed() => Some(false),
        _ = async { let _ = isolated.wait_for(|i| *i).await; } => Some(true),
    };
    let Some(partitioned) = partitioned else {
        let _ = client.shutdown().await;
        let _ = upstream.shutdown().await;
        return;
    };
    if partitioned {
        // Forward nothing more, and say nothing, until the heal.
        let _ = isolated.wait_for(|i| !*i).await;
    }
    reset(&client);
    reset(&upstream);
}

/// Makes the coming drop of `stream` send a reset instead of a close.
fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}
