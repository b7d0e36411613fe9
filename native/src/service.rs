//! inference.GRPCInferenceService on the native transport: every method's request goes to
//! Python as wire bytes and its answer comes back encoded; only the transport is decided here.
//!
//! ModelInfer and ModelStreamInfer are the hot methods (see `stream` for the latter); the
//! others (metadata, readiness, repository, statistics, ...) are cold and handed over as calls
//! of their own, run by the same servicer the Python transport runs.

use std::collections::HashSet;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tonic::body::Body;
use tonic::server::{Grpc, NamedService, StreamingService, UnaryService};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::auth::Authenticated;
use crate::codec::RawCodec;
use crate::queue::{Arrival, Call, Gone, Inbox, Pending, Principal, Protocol, Waiter, monotonic_s};
use crate::spin;
use crate::stream::{self, Answers, OpenStreams, StreamLimits};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What every call of the service shares: the hand-off and the transport's limits.
pub struct Context {
    pub inbox: Inbox,
    pub pending: Pending,
    pub streams: OpenStreams,
    pub stream_limits: StreamLimits,
    /// The largest message either way (--max-message-bytes).
    pub max_message_bytes: usize,
    /// The service's unary methods other than ModelInfer, which Python answers.
    pub cold_methods: HashSet<String>,
    /// How long a lone call spins for its answer before it sleeps (`crate::spin`).
    pub spin: Duration,
}

impl Context {
    fn grpc(&self) -> Grpc<RawCodec> {
        Grpc::new(RawCodec)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes)
    }

    /// The answer of a lone call, if it comes within `spin`: while it is the only call
    /// waiting for Python, its task polls for the answer (yielding to tokio's other work and
    /// I/O between polls) rather than sleep, which saves Python's answer a wake-up of this
    /// thread. Anything else (more calls, a slow answer) sleeps as usual.
    async fn spun(
        &self,
        reply: &mut oneshot::Receiver<Result<Bytes, Status>>,
    ) -> Option<Result<Bytes, Status>> {
        if self.spin.is_zero() || self.pending.waiting() != 1 {
            return None;
        }
        spin::poll_until(self.spin, || match reply.try_recv() {
            Ok(reply) => Some(Some(reply)),
            Err(oneshot::error::TryRecvError::Closed) => Some(None),
            Err(oneshot::error::TryRecvError::Empty) if self.pending.waiting() != 1 => Some(None),
            Err(oneshot::error::TryRecvError::Empty) => None,
        })
        .await
        .flatten()
    }

    /// Hand a unary request to Python and await its answer. The call ending first (cancelled,
    /// disconnected, past its deadline) drops the request if it has not run.
    pub async fn round_trip(self: Arc<Self>, handed: Handed) -> Result<Bytes, Status> {
        let key = self.inbox.next_key();
        let (sender, reply) = oneshot::channel();
        self.pending.insert(key, Waiter::Unary(sender));
        let gone = Gone::default();
        let mut guard = CancelOnDrop {
            key,
            gone: gone.clone(),
            context: self.clone(),
            answered: false,
        };
        match handed {
            Handed::Infer {
                data,
                principal,
                protocol,
            } => self.inbox.arrive(Arrival {
                protocol,
                key,
                stream: false,
                reserved: false,
                data,
                principal,
                arrived: monotonic_s(),
                gone,
            }),
            Handed::Call {
                method,
                data,
                principal,
            } => self.inbox.call(Call {
                key,
                method,
                data,
                principal,
                gone,
            }),
        }
        let mut reply = reply;
        let answer = match self.spun(&mut reply).await {
            Some(answer) => Ok(answer),
            None => reply.await,
        };
        guard.answered = true;
        answer.unwrap_or_else(|_| Err(Status::unavailable("the server stopped before answering")))
    }
}

/// What a call hands to Python: an inference request, or a call of another method.
pub enum Handed {
    Infer {
        data: Bytes,
        principal: Principal,
        protocol: Protocol,
    },
    Call {
        method: String,
        data: Bytes,
        principal: Principal,
    },
}

/// Drops a unary request whose call ended before its answer came.
struct CancelOnDrop {
    key: u64,
    gone: Gone,
    context: Arc<Context>,
    answered: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        self.gone.store(true, Ordering::Release);
        if self.context.pending.remove(self.key) {
            self.context.inbox.cancel([self.key]);
        }
    }
}

fn principal_of<T>(request: &Request<T>) -> Principal {
    request
        .extensions()
        .get::<Authenticated>()
        .and_then(|a| a.0.clone())
}

/// The service, routing each method by name.
#[derive(Clone)]
pub struct InferenceService {
    context: Arc<Context>,
}

impl InferenceService {
    pub fn new(context: Arc<Context>) -> Self {
        Self { context }
    }
}

impl NamedService for InferenceService {
    const NAME: &'static str = "inference.GRPCInferenceService";
}

impl tower::Service<http::Request<Body>> for InferenceService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let context = self.context.clone();
        let method = request
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        Box::pin(async move {
            let mut grpc = context.grpc();
            let response = match method.as_str() {
                "ModelInfer" => grpc.unary(Infer(context.clone()), request).await,
                "ModelStreamInfer" => grpc.streaming(StreamInfer(context.clone()), request).await,
                name if context.cold_methods.contains(name) => {
                    let cold = Cold(context.clone(), method.clone());
                    grpc.unary(cold, request).await
                }
                _ => Status::unimplemented(format!(
                    "inference.GRPCInferenceService has no method {method}"
                ))
                .into_http(),
            };
            Ok(response)
        })
    }
}

/// `status`, or RESOURCE_EXHAUSTED naming the flag when it says a request was larger than
/// the largest message, `max_message_bytes` (tonic says OUT_OF_RANGE; gRPC's own servers
/// RESOURCE_EXHAUSTED, and clients retry neither).
pub fn message_too_large(status: Status, max_message_bytes: usize) -> Status {
    if status.code() != Code::OutOfRange {
        return status;
    }
    let found = status
        .message()
        .split("found ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or("more");
    Status::resource_exhausted(format!(
        "the request takes {found} bytes, over this server's largest message of \
         {max_message_bytes} bytes (--max-message-bytes); send fewer time steps or batch rows \
         per request"
    ))
}

/// The layer that gives every service's oversized request the same answer
/// ([`message_too_large`]): tonic refuses such a request before the method runs, with a
/// trailers-only response, whose status is in its headers.
#[derive(Clone, Copy)]
pub struct MessageLimitLayer {
    pub max_message_bytes: usize,
}

impl<S> tower::Layer<S> for MessageLimitLayer {
    type Service = MessageLimit<S>;

    fn layer(&self, inner: S) -> MessageLimit<S> {
        MessageLimit {
            inner,
            max_message_bytes: self.max_message_bytes,
        }
    }
}

#[derive(Clone)]
pub struct MessageLimit<S> {
    inner: S,
    max_message_bytes: usize,
}

impl<S> tower::Service<http::Request<Body>> for MessageLimit<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let called = self.inner.call(request);
        let max_message_bytes = self.max_message_bytes;
        Box::pin(async move {
            let response = called.await?;
            let out_of_range = response
                .headers()
                .get("grpc-status")
                .is_some_and(|v| v.as_bytes() == b"11");
            if !out_of_range {
                return Ok(response);
            }
            let message = response
                .headers()
                .get("grpc-message")
                .and_then(|v| v.to_str().ok())
                .map(percent_decode)
                .unwrap_or_default();
            let status = message_too_large(Status::out_of_range(message), max_message_bytes);
            Ok(status.into_http())
        })
    }
}

/// gRPC's percent-encoding of grpc-message (the spec's "Percent-Encoded" rule).
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((high * 16 + low) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Infer(Arc<Context>);

impl UnaryService<Bytes> for Infer {
    type Response = Bytes;
    type Future = BoxFuture<Result<Response<Bytes>, Status>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let principal = principal_of(&request);
        let data = request.into_inner();
        let context = self.0.clone();
        Box::pin(async move {
            context
                .round_trip(Handed::Infer {
                    data,
                    principal,
                    protocol: Protocol::Grpc,
                })
                .await
                .map(Response::new)
        })
    }
}

struct Cold(Arc<Context>, String);

impl UnaryService<Bytes> for Cold {
    type Response = Bytes;
    type Future = BoxFuture<Result<Response<Bytes>, Status>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let principal = principal_of(&request);
        let data = request.into_inner();
        let context = self.0.clone();
        let method = self.1.clone();
        Box::pin(async move {
            context
                .round_trip(Handed::Call {
                    method,
                    data,
                    principal,
                })
                .await
                .map(Response::new)
        })
    }
}

struct StreamInfer(Arc<Context>);

impl StreamingService<Bytes> for StreamInfer {
    type Response = Bytes;
    type ResponseStream = Answers;
    type Future = BoxFuture<Result<Response<Answers>, Status>>;

    fn call(&mut self, request: Request<Streaming<Bytes>>) -> Self::Future {
        let principal = principal_of(&request);
        let context = self.0.clone();
        let requests = request.into_inner();
        Box::pin(async move {
            Ok(Response::new(stream::serve(
                context,
                requests,
                principal,
                Protocol::Grpc,
            )))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oversized_request_is_resource_exhausted_naming_the_flag() {
        let tonic_says = Status::out_of_range(
            "Error, decoded message length too large: found 16777222 bytes, the limit is: 4194304 bytes",
        );
        let answer = message_too_large(tonic_says, 4194304);
        assert_eq!(answer.code(), Code::ResourceExhausted);
        assert!(
            answer.message().contains("16777222 bytes"),
            "{}",
            answer.message()
        );
        assert!(answer.message().contains("--max-message-bytes"));
        let other = message_too_large(Status::cancelled("gone"), 1);
        assert_eq!(other.code(), Code::Cancelled);
    }

    #[test]
    fn percent_decoding_reads_grpc_message_encoding() {
        assert_eq!(percent_decode("a%20b%25"), "a b%");
        assert_eq!(percent_decode("caf%C3%A9"), "café");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4"), "%4");
    }
}
