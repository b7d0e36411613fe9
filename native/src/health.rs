//! grpc.health.v1.Health on the native transport, with the service names it is asked about
//! bounded: a Watch keeps its name for as long as the stream lives, so a name as long as the
//! largest message would let anyone who reaches the port hold that much memory per stream
//! (the Python transport's rule, `rnnserve.api.health`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

use futures_core::Stream;
use tokio::sync::watch;
use tonic::body::Body;
use tonic::server::{Grpc, NamedService, ServerStreamingService, UnaryService};
use tonic::{Request, Response, Status};

use crate::codec::MessageCodec;

/// The longest service name asked about: far beyond any gRPC service's full name.
pub const MAX_SERVICE_NAME_CHARS: usize = 1024;

pub const SERVING: i32 = 1;
pub const NOT_SERVING: i32 = 2;
pub const SERVICE_UNKNOWN: i32 = 3;

#[derive(Clone, PartialEq, prost::Message)]
pub struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    pub service: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    pub status: i32,
}

#[derive(Default)]
struct Statuses {
    by_service: HashMap<String, i32>,
    /// Set for good by a graceful shutdown: every service NOT_SERVING, later sets ignored.
    shutting_down: bool,
}

/// The served services' statuses, set by Python; watchers hear each change.
pub struct Health {
    statuses: Mutex<Statuses>,
    changed: watch::Sender<u64>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            statuses: Mutex::default(),
            changed: watch::channel(0).0,
        }
    }
}

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, Statuses> {
        self.statuses
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Set `service`'s status (ignored once shutting down).
    pub fn set(&self, service: &str, status: i32) {
        let mut statuses = self.lock();
        if statuses.shutting_down {
            return;
        }
        statuses.by_service.insert(service.to_owned(), status);
        drop(statuses);
        self.changed.send_modify(|version| *version += 1);
    }

    /// Every service NOT_SERVING, for good (a drain has begun).
    pub fn enter_graceful_shutdown(&self) {
        let mut statuses = self.lock();
        statuses.shutting_down = true;
        for status in statuses.by_service.values_mut() {
            *status = NOT_SERVING;
        }
        drop(statuses);
        self.changed.send_modify(|version| *version += 1);
    }

    fn status(&self, service: &str) -> Option<i32> {
        self.lock().by_service.get(service).copied()
    }
}

fn check_name(service: &str) -> Result<(), Status> {
    let length = service.chars().count();
    if length <= MAX_SERVICE_NAME_CHARS {
        return Ok(());
    }
    Err(Status::invalid_argument(format!(
        "the service name is {} characters long; health names a service by its full name (at \
         most {} characters), or the server by ''",
        thousands(length),
        thousands(MAX_SERVICE_NAME_CHARS)
    )))
}

/// `n` with a comma between each group of three digits, as Python's `{:,}` writes it.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
type Codec = MessageCodec<HealthCheckResponse, HealthCheckRequest>;

/// The service, routing Check and Watch; requests up to the largest message are read (and
/// names over the bound refused), as on the Python transport.
#[derive(Clone)]
pub struct HealthService {
    pub health: Arc<Health>,
    pub max_message_bytes: usize,
}

impl NamedService for HealthService {
    const NAME: &'static str = "grpc.health.v1.Health";
}

impl tower::Service<http::Request<Body>> for HealthService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let health = self.health.clone();
        let max_message_bytes = self.max_message_bytes;
        Box::pin(async move {
            let mut grpc = Grpc::new(Codec::default())
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes);
            Ok(match request.uri().path() {
                "/grpc.health.v1.Health/Check" => grpc.unary(Check(health), request).await,
                "/grpc.health.v1.Health/Watch" => {
                    grpc.server_streaming(Watch(health), request).await
                }
                other => Status::unimplemented(format!("no method {other}")).into_http(),
            })
        })
    }
}

struct Check(Arc<Health>);

impl UnaryService<HealthCheckRequest> for Check {
    type Response = HealthCheckResponse;
    type Future = BoxFuture<Result<Response<HealthCheckResponse>, Status>>;

    fn call(&mut self, request: Request<HealthCheckRequest>) -> Self::Future {
        let health = self.0.clone();
        Box::pin(async move {
            let service = request.into_inner().service;
            check_name(&service)?;
            match health.status(&service) {
                Some(status) => Ok(Response::new(HealthCheckResponse { status })),
                None => Err(Status::not_found("")),
            }
        })
    }
}

struct Watch(Arc<Health>);

/// A Watch's answers: the status now, then each change.
pub struct WatchStream {
    health: Arc<Health>,
    service: String,
    changes: watch::Receiver<u64>,
    last: Option<i32>,
    waiting: Option<Pin<Box<dyn Future<Output = bool> + Send>>>,
}

impl Stream for WatchStream {
    type Item = Result<HealthCheckResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let status = self.health.status(&self.service).unwrap_or(SERVICE_UNKNOWN);
            if self.last != Some(status) {
                self.last = Some(status);
                return Poll::Ready(Some(Ok(HealthCheckResponse { status })));
            }
            if self.waiting.is_none() {
                let mut changes = self.changes.clone();
                changes.mark_unchanged();
                self.waiting = Some(Box::pin(async move { changes.changed().await.is_ok() }));
            }
            let waiting = self.waiting.as_mut().expect("set above");
            match waiting.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(alive) => {
                    self.waiting = None;
                    if !alive {
                        return Poll::Ready(None);
                    }
                }
            }
        }
    }
}

impl ServerStreamingService<HealthCheckRequest> for Watch {
    type Response = HealthCheckResponse;
    type ResponseStream = WatchStream;
    type Future = BoxFuture<Result<Response<WatchStream>, Status>>;

    fn call(&mut self, request: Request<HealthCheckRequest>) -> Self::Future {
        let health = self.0.clone();
        Box::pin(async move {
            let service = request.into_inner().service;
            check_name(&service)?;
            let changes = health.changed.subscribe();
            Ok(Response::new(WatchStream {
                health,
                service,
                changes,
                last: None,
                waiting: None,
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped_as_python_groups_them() {
        assert_eq!(thousands(7), "7");
        assert_eq!(thousands(1024), "1,024");
        assert_eq!(thousands(67_108_864), "67,108,864");
    }

    #[test]
    fn names_past_the_bound_are_refused() {
        assert!(check_name(&"x".repeat(MAX_SERVICE_NAME_CHARS)).is_ok());
        let refused = check_name(&"x".repeat(MAX_SERVICE_NAME_CHARS + 1)).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().contains("1,025 characters"));
    }

    #[test]
    fn a_graceful_shutdown_turns_every_service_not_serving_for_good() {
        let health = Health::default();
        health.set("", SERVING);
        health.set("inference.GRPCInferenceService", SERVING);
        health.enter_graceful_shutdown();
        health.set("", SERVING);
        assert_eq!(health.status(""), Some(NOT_SERVING));
        assert_eq!(
            health.status("inference.GRPCInferenceService"),
            Some(NOT_SERVING)
        );
    }
}
