//! The node's accept loop, in place of `axum::serve`: the same HTTP/1.1 +
//! HTTP/2 auto-detection and graceful shutdown, with an optional mTLS
//! handshake first whose verified identity rides on every request.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use meridian_mesh::{ArcSwap, rustls::ServerConfig, tokio_rustls::TlsAcceptor};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::policy::Peer;

/// Longest a client may take to finish the TLS handshake; a slow or silent
/// client must not hold a task and a socket for ever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `shutdown`, then stops accepting, asks
/// every connection to finish (HTTP/2 GOAWAY, HTTP/1.1 close after the
/// current response) and returns once they have; the caller bounds that
/// with its grace period, as it did around `axum::serve`.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<ArcSwap<ServerConfig>>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    // Every connection task holds a receiver; the loop waits for all of
    // them to be dropped.
    let (close_tx, close_rx) = watch::channel(());
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause, as axum does.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = tcp.set_nodelay(true);
        let (app, tls, shutdown, close_rx) =
            (app.clone(), tls.clone(), shutdown.clone(), close_rx.clone());
        tokio::spawn(async move {
            match tls {
                None => serve_connection(tcp, app, remote, None, &shutdown).await,
                Some(tls) => {
                    let acceptor = TlsAcceptor::from(tls.load_full());
                    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
                    let stream = tokio::select! {
                        r = handshake => r,
                        () = shutdown.cancelled() => return,
                    };
                    let stream = match stream {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::info!(%remote, error = %e, "mesh TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(%remote, "mesh TLS handshake timed out");
                            return;
                        }
                    };
                    match meridian_mesh::peer_identity(stream.get_ref().1.peer_certificates()) {
                        Ok(identity) => {
                            let peer = Peer(Arc::new(identity));
                            serve_connection(stream, app, remote, Some(peer), &shutdown).await;
                        }
                        // Signed by our CA but naming no Meridian identity:
                        // nothing in the policy could allow it.
                        Err(e) => tracing::warn!(%remote, error = %e, "mesh peer refused"),
                    }
                }
            }
            drop(close_rx);
        });
    }
    drop(close_rx);
    drop(listener);
    close_tx.closed().await;
    Ok(())
}

async fn serve_connection<IO>(
    io: IO,
    app: Router,
    remote: std::net::SocketAddr,
    peer: Option<Peer>,
    shutdown: &CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = app.map_request(move |req: axum::http::Request<Incoming>| {
        let mut req = req.map(Body::new);
        // Where the caller connected from, for the audit log.
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(remote));
        if let Some(peer) = &peer {
            req.extensions_mut().insert(peer.clone());
        }
        req
    });
    let mut builder = Builder::new(TokioExecutor::new());
    // As axum::serve: the CONNECT protocol, for HTTP/2 websockets.
    builder.http2().enable_connect_protocol();
    let conn =
        builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service));
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::trace!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}
