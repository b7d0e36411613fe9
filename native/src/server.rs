//! The transport's runtime: tokio threads, the listener, TLS handshakes, HTTP/2 connections
//! (hyper) and the services behind them (tonic), and a graceful stop.
//!
//! Every call passes the same layers before its service: its deadline (`deadline`), the
//! answer to an oversized message (`service::MessageLimitLayer`) and authentication (`auth`).

use std::collections::HashSet;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::Status;
use tonic::body::Body;
use tonic::service::Routes;
use tower::{ServiceBuilder, ServiceExt};

use crate::auth::{AuthLayer, Authenticator};
use crate::deadline::DeadlineLayer;
use crate::health::{Health, HealthService};
use crate::queue::{Inbox, Pending};
use crate::rest_server::{self, HttpFront};
use crate::service::{Context, InferenceService, MessageLimitLayer};
use crate::stream::{AnswerBound, OpenStreams, StreamLimits};
use crate::tls::{Conn, TlsError, TlsFiles, TlsSource};

/// Streams one connection may have open at once (gRPC's own server has no limit; hyper's
/// default, 200, would queue a client library's sequences behind each other). What each
/// holds is bounded by its flow control.
const MAX_CONCURRENT_STREAMS: u32 = 65_536;
/// Connections waiting to be accepted (the kernel caps it at net.core.somaxconn).
const BACKLOG: u32 = 4096;
/// A TLS handshake not done by then is dropped: a client that connects and says nothing
/// holds no task for long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long connections get to carry the statuses of the calls a stop ended.
const CLOSING: Duration = Duration::from_secs(1);

/// What the transport is started with.
pub struct Settings {
    pub host: String,
    pub port: u16,
    /// The HTTP port (the KServe v2 REST protocol), or None for none.
    pub http_port: Option<u16>,
    /// Tokio's worker threads.
    pub threads: usize,
    pub max_message_bytes: usize,
    pub tls: Option<TlsFiles>,
    /// Callers present bearer tokens (their digests come through `set_tokens`).
    pub tokens: bool,
    /// What a call refused authentication is told.
    pub auth_message: String,
    /// The inference service's unary methods Python answers besides ModelInfer.
    pub cold_methods: Vec<String>,
    /// An encoded FileDescriptorSet of the served services, for reflection.
    pub descriptors: Vec<u8>,
    /// How long a lone call spins for its answer before it sleeps (`spin`; zero: never).
    pub spin: Duration,
    /// How long the HTTP port waits for a request's headers and for its body.
    pub http_timeouts: rest_server::Timeouts,
}

/// Why the transport could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {address}: {source}")]
    Bind { address: String, source: io::Error },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("the reflection service's descriptors do not load: {0}")]
    Reflection(String),
    #[error("cannot start the transport's threads: {0}")]
    Runtime(io::Error),
}

/// A started transport.
pub struct Running {
    runtime: Runtime,
    pub port: u16,
    pub http_port: Option<u16>,
    pub context: Arc<Context>,
    pub health: Arc<Health>,
    pub authenticator: Arc<Authenticator>,
    stop: watch::Sender<bool>,
    served: Mutex<Option<JoinHandle<()>>>,
}

fn address(host: &str, port: u16) -> io::Result<SocketAddr> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    (bare, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the host resolves to nothing"))
}

fn listen(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(BACKLOG)
}

/// Start serving `settings` on new tokio threads, handing work to Python through `inbox`.
pub fn start(settings: Settings, inbox: Inbox) -> Result<Running, StartError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.threads.max(1))
        .thread_name("rnnserve-io")
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    let shown = format!("{}:{}", settings.host, settings.port);
    let bind = |source| StartError::Bind {
        address: shown.clone(),
        source,
    };
    let address = address(&settings.host, settings.port).map_err(bind)?;
    let listener = {
        let _entered = runtime.enter();
        listen(address).map_err(bind)?
    };
    let port = listener.local_addr().map_err(bind)?.port();
    let http_listener = match settings.http_port {
        None => None,
        Some(http_port) => {
            let shown = format!("{}:{}", settings.host, http_port);
            let bind = |source| StartError::Bind {
                address: shown.clone(),
                source,
            };
            let address = self::address(&settings.host, http_port).map_err(bind)?;
            let _entered = runtime.enter();
            let listener = listen(address).map_err(bind)?;
            let bound = listener.local_addr().map_err(bind)?.port();
            Some((listener, bound))
        }
    };
    let http_port = http_listener.as_ref().map(|(_, bound)| *bound);
    let tls = match settings.tls {
        Some(files) => Some(Arc::new(TlsSource::new(files)?)),
        None => None,
    };
    let certificates = tls.as_ref().is_some_and(|t| t.mutual());
    let context = Arc::new(Context {
        inbox,
        pending: Pending::default(),
        streams: OpenStreams::default(),
        stream_limits: StreamLimits {
            max_held: settings.max_message_bytes,
            // Until Python sets it from the models: a conservative bound.
            answers: AnswerBound::new(64.0, 64 * 1024),
        },
        max_message_bytes: settings.max_message_bytes,
        cold_methods: settings.cold_methods.into_iter().collect::<HashSet<_>>(),
        spin: settings.spin,
    });
    let authenticator = Arc::new(Authenticator::new(
        settings.tokens,
        certificates,
        settings.auth_message,
    ));
    let health = Arc::new(Health::default());
    let reflection = |alpha: bool| {
        let builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(&settings.descriptors);
        let size = settings.max_message_bytes;
        if alpha {
            builder.build_v1alpha().map(|s| {
                let s = s.max_decoding_message_size(size);
                (None, Some(s.max_encoding_message_size(size)))
            })
        } else {
            builder.build_v1().map(|s| {
                let s = s.max_decoding_message_size(size);
                (Some(s.max_encoding_message_size(size)), None)
            })
        }
        .map_err(|e| StartError::Reflection(e.to_string()))
    };
    let v1 = reflection(false)?.0.expect("built above");
    let v1alpha = reflection(true)?.1.expect("built above");
    let (stop, stopping) = watch::channel(false);
    let (connections, incoming) = mpsc::channel(1024);
    runtime.spawn(accept(
        listener,
        tls.clone(),
        H2,
        connections,
        stopping.clone(),
    ));
    let http_served = http_listener.map(|(listener, _)| {
        let (connections, incoming) = mpsc::channel(1024);
        runtime.spawn(accept(listener, tls, HTTP, connections, stopping.clone()));
        let front = Arc::new(HttpFront {
            context: context.clone(),
            authenticator: authenticator.clone(),
            stopping: stopping.clone(),
            timeouts: settings.http_timeouts,
        });
        runtime.spawn(rest_server::serve(front, incoming, stopping.clone()))
    });
    let routes = Routes::new(InferenceService::new(context.clone()))
        .add_service(HealthService {
            health: health.clone(),
            max_message_bytes: settings.max_message_bytes,
        })
        .add_service(v1)
        .add_service(v1alpha)
        .prepare();
    let stack = ServiceBuilder::new()
        .layer(DeadlineLayer)
        .layer(MessageLimitLayer {
            max_message_bytes: settings.max_message_bytes,
        })
        .layer(AuthLayer {
            authenticator: authenticator.clone(),
            context: context.clone(),
        })
        .service(routes);
    let grpc_served = runtime.spawn(serve(stack, incoming, stopping));
    let sockets = context.clone();
    let served = runtime.spawn(async move {
        let _ = grpc_served.await;
        if let Some(http_served) = http_served {
            let _ = http_served.await;
        }
        // WebSockets outlive their HTTP connection's task: each ends once it has answered
        // what it read before the stop.
        while sockets.streams.count() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    Ok(Running {
        runtime,
        port,
        http_port,
        context,
        health,
        authenticator,
        stop,
        served: Mutex::new(Some(served)),
    })
}

/// Serve each connection that comes from `incoming` with `stack` until `stopping`; then let
/// every connection end gracefully (GOAWAY: no new calls, those in flight finish) and return
/// once all have closed.
async fn serve<S>(
    stack: S,
    mut incoming: mpsc::Receiver<io::Result<Conn>>,
    mut stopping: watch::Receiver<bool>,
) where
    S: tower::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    let (graceful, watcher) = watch::channel(());
    loop {
        let conn = tokio::select! {
            _ = stopping.wait_for(|stop| *stop) => break,
            conn = incoming.recv() => match conn {
                Some(Ok(conn)) => conn,
                Some(Err(_)) => continue,
                None => break,
            },
        };
        let peer = conn.peer();
        let stack = stack.clone();
        let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
            let mut request = request.map(Body::new);
            request.extensions_mut().insert(peer.clone());
            stack.clone().oneshot(request)
        });
        let connection = builder.serve_connection(TokioIo::new(conn), service);
        let mut watcher = watcher.clone();
        tokio::spawn(async move {
            tokio::pin!(connection);
            tokio::select! {
                served = connection.as_mut() => {
                    if let Err(error) = served {
                        tracing::debug!("connection ended: {error}");
                    }
                    return;
                }
                _ = watcher.changed() => connection.as_mut().graceful_shutdown(),
            }
            let _ = connection.await;
            drop(watcher);
        });
    }
    drop(watcher);
    let _ = graceful.send(());
    graceful.closed().await;
}

/// The application protocols a port's TLS handshake offers (ALPN): the gRPC port's HTTP/2,
/// the HTTP port's HTTP/2 or HTTP/1.1.
const H2: &[&[u8]] = &[b"h2"];
const HTTP: &[&[u8]] = &[b"h2", b"http/1.1"];

async fn accept(
    listener: TcpListener,
    tls: Option<Arc<TlsSource>>,
    alpn: &'static [&'static [u8]],
    connections: mpsc::Sender<io::Result<Conn>>,
    mut stopping: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stopping.wait_for(|stop| *stop) => return,
            accepted = listener.accept() => accepted,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(error) => {
                // Out of descriptors, say: the connections already served go on meanwhile.
                tracing::warn!("accepting a connection failed: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        match &tls {
            None => {
                if connections.send(Ok(Conn::Plain(tcp))).await.is_err() {
                    return;
                }
            }
            Some(tls) => {
                let mut config = tls.config();
                if config
                    .alpn_protocols
                    .iter()
                    .map(Vec::as_slice)
                    .ne(alpn.iter().copied())
                {
                    let mut other = (*config).clone();
                    other.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
                    config = Arc::new(other);
                }
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                let connections = connections.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = connections.send(Ok(Conn::tls(stream))).await;
                        }
                        Ok(Err(error)) => tracing::debug!("TLS handshake failed: {error}"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                });
            }
        }
    }
}

impl Running {
    /// Stop taking connections and calls; let the calls in flight finish within `grace`; then
    /// end what is left UNAVAILABLE (as gRPC's own servers do), let the connections carry that
    /// out, and tell Python the transport has stopped.
    pub fn stop(&self, grace: Duration) {
        let _ = self.stop.send(true);
        let served = self.served.lock().unwrap_or_else(|p| p.into_inner()).take();
        let context = self.context.clone();
        self.runtime.spawn(async move {
            let Some(mut served) = served else {
                context.inbox.stopped();
                return;
            };
            if tokio::time::timeout(grace, &mut served).await.is_err() {
                let open = context.streams.count() + context.pending.waiting();
                tracing::info!("{open} calls still open after the grace period end UNAVAILABLE");
                let status = Status::unavailable("the server is shutting down");
                context.pending.fail_all(&status);
                context.streams.end_all(&status);
                // Their statuses go out as the connections close (each ends once its calls did).
                let _ = tokio::time::timeout(CLOSING, served).await;
            }
            context.inbox.stopped();
        });
    }

    /// End the transport's threads and every connection they still hold.
    pub fn close(self) {
        self.runtime.shutdown_timeout(Duration::from_millis(200));
    }
}
