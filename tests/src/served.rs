//! An axum app served on a free loopback port for as long as its handle
//! lives: what every hand-written test upstream stands on.

use std::net::SocketAddr;

use tokio::sync::oneshot;

/// Stops accepting when dropped and finishes the requests in flight.
pub struct Served {
    addr: SocketAddr,
    /// Dropping it resolves the server's shutdown future.
    _stop: oneshot::Sender<()>,
}

impl Served {
    pub async fn start(app: axum::Router) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self { addr, _stop: stop }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}
