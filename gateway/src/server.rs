//! Running the Pingora server inside a process that also does other things
//! (the launcher, tests): it gets its own thread and a stop channel instead of
//! Unix signals.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::apps::HttpServerOptions;
use pingora_core::listeners::tls::TlsSettings;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora_core::services::background::background_service;
use pingora_core::services::listening::Service as ListeningService;
use pingora_proxy::http_proxy_service_with_name;
use tokio::sync::oneshot;

use crate::admin::Admin;
use crate::config::Config;
use crate::discovery::Discovery;
use crate::error::Error;
use crate::health::HealthChecker;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::regions::Regions;

/// How long [`Gateway::start`] waits for the listener to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running gateway. Dropping it stops it at once; [`Gateway::shutdown`]
/// lets in-flight requests finish first.
pub struct Gateway {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<Stop>>,
    thread: Option<JoinHandle<()>>,
    tracer: meridian_mesh::Tracer,
}

#[derive(Debug, Clone, Copy)]
enum Stop {
    Graceful,
    Fast,
}

struct StopSignal(std::sync::Mutex<Option<oneshot::Receiver<Stop>>>);

#[async_trait]
impl ShutdownSignalWatch for StopSignal {
    async fn recv(&self) -> ShutdownSignal {
        let rx = self.0.lock().expect("stop signal lock").take();
        // A dropped sender (the handle went away) also means stop.
        let stop = match rx {
            Some(rx) => rx.await.unwrap_or(Stop::Fast),
            None => Stop::Fast,
        };
        match stop {
            Stop::Graceful => ShutdownSignal::GracefulTerminate,
            Stop::Fast => ShutdownSignal::FastShutdown,
        }
    }
}

impl Gateway {
    /// Starts the proxy on its own thread and waits until it accepts
    /// connections. Fails with the cause when the address is taken.
    pub fn start(config: Config) -> Result<Self, Error> {
        // Pingora panics on its own thread when it cannot bind; probing first
        // turns the common case (port taken) into a clear error.
        drop(
            TcpListener::bind(config.listen).map_err(|source| Error::Listen {
                addr: config.listen,
                source,
            })?,
        );

        let conf = ServerConf {
            threads: config.threads,
            grace_period_seconds: Some(config.shutdown_grace.as_secs()),
            graceful_shutdown_timeout_seconds: Some(1),
            // Each gateway gets its own paths so several can share a host.
            pid_file: format!("/tmp/meridian-gateway-{}.pid", config.listen.port()),
            upgrade_sock: format!("/tmp/meridian-gateway-{}.sock", config.listen.port()),
            ..ServerConf::default()
        };
        let tracer = meridian_mesh::Tracer::start(&config.tracing, "meridian-gateway", vec![])
            .map_err(|message| Error::Config {
                origin: "tracing".into(),
                message,
            })?;
        let mut server = Server::new_with_opt_and_conf(None, conf);
        let regions = Arc::new(Regions::new(&config));
        let metrics = Arc::new(Metrics::new());
        let mesh = crate::mesh::Upstream::start(&config.mesh).map_err(|message| Error::Config {
            origin: "mesh".into(),
            message,
        })?;
        let proxy = Proxy::new(
            &config,
            regions.clone(),
            metrics.clone(),
            mesh.clone(),
            tracer.clone(),
        )
        .map_err(|message| Error::Config {
            origin: "gateway config".into(),
            message,
        })?;
        let key_loader = proxy
            .gate
            .key_loader()
            .map(|loader| loader.with_regions(regions.clone()));
        let mut service =
            http_proxy_service_with_name(&server.configuration, proxy, "meridian gateway");
        let mut options = HttpServerOptions::default();
        // Cleartext HTTP/2 (gRPC with prior knowledge) next to HTTP/1.1 on
        // one port: Pingora tells them apart by the connection preface.
        options.h2c = true;
        if let Some(app) = service.app_logic_mut() {
            app.server_options = Some(options);
        }
        service.add_tcp(&config.listen.to_string());
        if let Some(tls) = &config.tls {
            drop(
                TcpListener::bind(tls.listen).map_err(|source| Error::Listen {
                    addr: tls.listen,
                    source,
                })?,
            );
            let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
            let mut settings =
                TlsSettings::intermediate(&path(&tls.cert_path), &path(&tls.key_path)).map_err(
                    |e| Error::Config {
                        origin: "server.tls".into(),
                        message: format!("cannot load the certificate or key: {e}"),
                    },
                )?;
            settings.enable_h2();
            service.add_tls_with_settings(&tls.listen.to_string(), None, settings);
        }
        server.add_service(service);
        if let Some(loader) = key_loader {
            server.add_service(background_service("api keys", loader));
        }
        let discovery =
            Discovery::new(&config, regions.clone(), metrics.clone()).map_err(|message| {
                Error::Config {
                    origin: "discovery".into(),
                    message,
                }
            })?;
        if let Some(discovery) = discovery {
            server.add_service(background_service("region discovery", discovery));
        }
        server.add_service(background_service(
            "region health",
            HealthChecker::new(
                regions.clone(),
                config.health.clone(),
                metrics.clone(),
                mesh,
            ),
        ));
        if let Some(admin_addr) = config.admin_listen {
            drop(
                TcpListener::bind(admin_addr).map_err(|source| Error::Listen {
                    addr: admin_addr,
                    source,
                })?,
            );
            let mut admin = ListeningService::new(
                "meridian gateway admin".to_string(),
                Admin {
                    regions: regions.clone(),
                    metrics: metrics.clone(),
                    token: config.admin_token.clone(),
                },
            );
            admin.add_tcp(&admin_addr.to_string());
            server.add_service(admin);
        }

        let (stop, rx) = oneshot::channel();
        let signal = StopSignal(std::sync::Mutex::new(Some(rx)));
        let thread = std::thread::Builder::new()
            .name("meridian-gateway".into())
            .spawn(move || {
                server.run(RunArgs {
                    shutdown_signal: Box::new(signal),
                });
            })?;
        let gateway = Self {
            addr: config.listen,
            admin_addr: config.admin_listen,
            stop: Some(stop),
            thread: Some(thread),
            tracer,
        };
        gateway.wait_ready()?;
        tracing::info!(addr = %gateway.addr, regions = config.regions.len(), "gateway serving");
        Ok(gateway)
    }

    fn wait_ready(&self) -> Result<(), Error> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(Error::NotReady(self.addr))
    }

    /// The client-facing address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin endpoints' address, when configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// This gateway's tracer, to flush its spans (tests do, before they
    /// look at a collector).
    pub fn tracer(&self) -> &meridian_mesh::Tracer {
        &self.tracer
    }

    /// Stops accepting, gives in-flight requests the configured grace
    /// period, and waits for the proxy thread to end; then exports the
    /// last spans (blocking, like the rest of this call).
    pub fn shutdown(mut self) {
        self.stop_with(Stop::Graceful);
        self.tracer.shutdown();
    }

    fn stop_with(&mut self, how: Stop) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(how);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop_with(Stop::Fast);
    }
}
