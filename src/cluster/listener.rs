//! The cluster port: one listener for everything members say to each
//! other. Each connection is authenticated first (mutual TLS against the
//! cluster CA, unless the cluster runs `insecure_cluster`), then told apart
//! by its first bytes: an HTTP/2 preface goes to the gRPC services (Raft,
//! write forwarding, read index, admin, blob copy requests), the
//! [`FORWARD_PREFACE`] to the API (an upload request a member passes on to
//! the session's owner, see `api::forward`), anything else to the
//! byte-stream handler that the blob transfer owns (see `blob::transfer`).
//! So no internal traffic uses the public API port, and a process without a
//! certificate from the cluster CA reaches none of them.
//!
//! Every step before a connection is handed on has a deadline and the
//! number of connections in those steps is bounded: a peer that opens
//! sockets and says nothing cannot use up the node.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::either::Either;

use super::tls::ClusterTls;
use crate::rewind::Rewind;

/// How long a new connection has to finish its TLS handshake and send its
/// first bytes.
pub const HANDSHAKE_WITHIN: Duration = Duration::from_secs(5);
/// Connections at most in their handshake at once; more are closed at once.
pub const MAX_HANDSHAKES: usize = 256;
/// The HTTP/2 client preface: a gRPC connection starts with it.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// What a connection carrying client API requests between members starts
/// with (HTTP/2 follows).
pub const FORWARD_PREFACE: &[u8; 24] = b"BERTH-FORWARD-HTTP/2\r\n\r\n";

type ServerIo = Either<TcpStream, Box<tokio_rustls::server::TlsStream<TcpStream>>>;
type ClientIo = Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// An accepted, authenticated cluster connection. The bytes read to tell
/// its kind are read again first.
pub struct Conn {
    io: Rewind<ServerIo>,
    remote: SocketAddr,
    local: Option<SocketAddr>,
}

impl Conn {
    /// The peer's address.
    pub fn remote(&self) -> SocketAddr {
        self.remote
    }

    /// The socket, when bytes on it are not encrypted by this process (so
    /// the kernel may send a file to it directly); None over TLS.
    pub fn plain_socket(&self) -> Option<&TcpStream> {
        match self.io.drained() {
            Some(Either::Left(s)) => Some(s),
            _ => None,
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo { local_addr: self.local, remote_addr: Some(self.remote) }
    }
}

/// Handles a connection that is not gRPC (the blob byte stream, or
/// forwarded API requests).
pub type StreamHandler = Arc<dyn Fn(Conn) + Send + Sync>;

/// Accept on `listener` until the returned stream is dropped: gRPC
/// connections come out of the stream (give it to tonic's
/// `serve_with_incoming`), forwarded API connections go to `on_forward`
/// (their preface consumed), every other authenticated connection goes to
/// `on_stream`.
pub fn serve(
    listener: TcpListener,
    tls: Option<ClusterTls>,
    on_stream: StreamHandler,
    on_forward: StreamHandler,
) -> impl Stream<Item = io::Result<Conn>> + Send + 'static {
    let (tx, rx) = mpsc::channel::<io::Result<Conn>>(64);
    tokio::spawn(async move {
        let pending = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = tx.closed() => return,
            };
            let (sock, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, say: wait, not spin.
                    tracing::warn!(error = %e, "accepting a cluster connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = pending.clone().try_acquire_owned() else {
                tracing::warn!(%remote, "too many cluster connections in their handshake; closing one");
                continue;
            };
            let (tx, tls, on_stream, on_forward) = (tx.clone(), tls.clone(), on_stream.clone(), on_forward.clone());
            tokio::spawn(async move {
                let opened = tokio::time::timeout(HANDSHAKE_WITHIN, open(sock, remote, tls.as_ref())).await;
                drop(permit);
                let conn = match opened {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => return tracing::debug!(%remote, error = %e, "cluster connection refused"),
                    Err(_) => return tracing::debug!(%remote, "cluster connection sent nothing in time"),
                };
                if conn.io.first() == H2_PREFACE {
                    let _ = tx.send(Ok(conn)).await;
                } else if conn.io.first() == FORWARD_PREFACE {
                    let mut conn = conn;
                    conn.io.skip_first();
                    on_forward(conn);
                } else {
                    on_stream(conn);
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn open(sock: TcpStream, remote: SocketAddr, tls: Option<&ClusterTls>) -> io::Result<Conn> {
    let _ = sock.set_nodelay(true);
    let local = sock.local_addr().ok();
    let mut io: ServerIo = match tls {
        Some(tls) => Either::Right(Box::new(tls.acceptor().accept(sock).await?)),
        None => Either::Left(sock),
    };
    let mut first = vec![0u8; H2_PREFACE.len()];
    io.read_exact(&mut first).await?;
    Ok(Conn { io: Rewind::new(io, first), remote, local })
}

/// A connection to a member's cluster port, over mutual TLS with `tls`.
/// The caller bounds the time it may take.
pub async fn connect(addr: &str, tls: Option<&ClusterTls>) -> io::Result<ClientIo> {
    let sock = TcpStream::connect(addr).await?;
    let _ = sock.set_nodelay(true);
    Ok(match tls {
        Some(tls) => Either::Right(Box::new(tls.connector().connect(ClusterTls::server_name(), sock).await?)),
        None => Either::Left(sock),
    })
}

/// A connection to a member's cluster port that carries API requests
/// (HTTP/2) to it: [`connect`], then the [`FORWARD_PREFACE`].
pub async fn connect_forward(addr: &str, tls: Option<&ClusterTls>) -> io::Result<ForwardIo> {
    use tokio::io::AsyncWriteExt;
    let mut io = connect(addr, tls).await?;
    io.write_all(FORWARD_PREFACE).await?;
    Ok(ForwardIo(io))
}

/// A client connection that carries forwarded API requests.
pub struct ForwardIo(ClientIo);

impl AsyncRead for ForwardIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for ForwardIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

impl hyper_util::client::legacy::connect::Connection for ForwardIo {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        hyper_util::client::legacy::connect::Connected::new()
    }
}

/// hyper's connector for forwarded API requests: [`connect_forward`] to
/// the URI's address, within `timeout`.
#[derive(Clone)]
pub struct ForwardConnector {
    pub tls: Option<ClusterTls>,
    pub timeout: Duration,
}

impl tower_service::Service<http::Uri> for ForwardConnector {
    type Response = hyper_util::rt::TokioIo<ForwardIo>;
    type Error = io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let (tls, timeout) = (self.tls.clone(), self.timeout);
        Box::pin(async move {
            let addr = uri
                .authority()
                .map(|a| a.to_string())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no address in {uri}")))?;
            let io = tokio::time::timeout(timeout, connect_forward(&addr, tls.as_ref()))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {addr}")))??;
            Ok(hyper_util::rt::TokioIo::new(io))
        })
    }
}

/// tonic's connector for channels to members: [`connect`] for the
/// address of the URI.
#[derive(Clone)]
pub struct Connector(pub Option<ClusterTls>);

impl tower_service::Service<http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<ClientIo>;
    type Error = io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let tls = self.0.clone();
        Box::pin(async move {
            let addr = uri
                .authority()
                .map(|a| a.to_string())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no address in {uri}")))?;
            Ok(hyper_util::rt::TokioIo::new(connect(&addr, tls.as_ref()).await?))
        })
    }
}
