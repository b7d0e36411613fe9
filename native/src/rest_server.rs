//! The HTTP port: the KServe v2 REST protocol as Triton serves it (HTTP/1.1, and HTTP/2
//! without or with TLS), feeding the same engine the same requests as the gRPC port.
//!
//! An inference request is translated to the ModelInferRequest it means (`rest`) and handed to
//! Python exactly as a gRPC ModelInfer is, so its requests batch with the gRPC port's and one
//! codec decides what each means; its answer is translated back. Every other endpoint is a
//! call of the inference service's method of the same meaning, which Python answers as JSON.
//! Liveness is answered here. Errors carry the HTTP status Triton gives for the same gRPC
//! status (its `HttpCodeFromError`: INVALID_ARGUMENT 400, NOT_FOUND 404, UNAVAILABLE 503,
//! INTERNAL 500, UNIMPLEMENTED 501) and a `{"error": "..."}` body; the codes Triton never
//! answers take the usual HTTP meaning (429 for a limit, 409 for a lost race, 401, 403, 504).

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prost::Message;
use tokio::sync::{Semaphore, mpsc, watch};
use tonic::Code;

use crate::auth::Authenticator;
use crate::queue::{Principal, Protocol};
use crate::rest;
use crate::service::{Context, Handed};
use crate::tls::{Conn, Peer};
use crate::websocket;
use hyper::upgrade::OnUpgrade;

/// Connections the port holds at once; one more is closed as it is accepted. Each costs a
/// task and its buffers, so a client opening connections without end meets a bound.
pub const MAX_CONNECTIONS: usize = 4096;
/// How long a slow client may hold a connection with a request that has not all come.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// A connection whose request's headers have not all come by then is closed, unanswered
    /// (hyper's header read timeout; --http-header-timeout-s).
    pub header: Duration,
    /// A body not all come by then is answered 408 (--http-body-timeout-s).
    pub body: Duration,
}
/// The most bytes of request line and headers a connection buffers (hyper answers 431 past it).
const MAX_HEADER_BYTES: usize = 64 * 1024;

type Answer = Response<Full<Bytes>>;

/// What the HTTP port's requests share.
pub struct HttpFront {
    pub context: Arc<Context>,
    pub authenticator: Arc<Authenticator>,
    /// Turns true when the transport stops: WebSockets then read no more.
    pub stopping: watch::Receiver<bool>,
    pub timeouts: Timeouts,
}

/// Serve each connection from `incoming` until `stopping`; then end every connection
/// gracefully (requests in flight finish, idle connections close) and return once all have.
pub async fn serve(
    front: Arc<HttpFront>,
    mut incoming: mpsc::Receiver<io::Result<Conn>>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(front.timeouts.header)
        // A client that sends its request and shuts its side (as `curl -T` and simple
        // clients do) still gets the answer.
        .half_close(true)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(1024);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!("an HTTP connection was refused: {MAX_CONNECTIONS} are open already");
            continue;
        };
        let peer = conn.peer();
        let front = front.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let front = front.clone();
            let peer = peer.clone();
            async move { Ok::<_, Infallible>(handle(front, peer, request).await) }
        });
        let builder = builder.clone();
        let mut watcher = watcher.clone();
        tokio::spawn(async move {
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(conn), service);
            tokio::pin!(connection);
            tokio::select! {
                served = connection.as_mut() => {
                    if let Err(error) = served {
                        tracing::debug!("HTTP connection ended: {error}");
                    }
                    drop(slot);
                    return;
                }
                _ = watcher.changed() => connection.as_mut().graceful_shutdown(),
            }
            let _ = connection.await;
            drop((watcher, slot));
        });
    }
    drop(watcher);
    let _ = graceful.send(());
    graceful.closed().await;
}

/// What a request asks for, by its method and path.
#[derive(Debug, PartialEq)]
enum Route {
    Live,
    /// A method of the inference service, its request message, and whether only its
    /// status matters (readiness: 200 or 400, no body).
    Call(&'static str, Vec<u8>),
    Infer {
        model: String,
        version: String,
    },
    /// A WebSocket of streamed requests (`websocket`).
    Stream {
        model: String,
        version: String,
    },
    NotFound,
    MethodNotAllowed,
}

#[derive(Clone, PartialEq, prost::Message)]
struct NameVersion {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RepositoryIndex {
    #[prost(string, tag = "1")]
    repository_name: String,
    #[prost(bool, tag = "2")]
    ready: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RepositoryModel {
    #[prost(string, tag = "1")]
    repository_name: String,
    #[prost(string, tag = "2")]
    model_name: String,
}

fn name_version(name: &str, version: &str) -> Vec<u8> {
    NameVersion {
        name: name.to_owned(),
        version: version.to_owned(),
    }
    .encode_to_vec()
}

/// The route of `method` and `path` (its segments percent-decoded). The routes are Triton's
/// (docs/protocol: the KServe v2 HTTP endpoints and Triton's extensions of them).
fn route(method: &Method, path: &str, body: &[u8]) -> Result<Route, rest::RestError> {
    let segments: Vec<String> = path
        .trim_end_matches('/')
        .split('/')
        .skip(1)
        .map(percent_decode)
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let get = method == Method::GET || method == Method::HEAD;
    let post = method == Method::POST;
    let only = |allowed: bool, route: Route| {
        if allowed {
            route
        } else {
            Route::MethodNotAllowed
        }
    };
    let Some((&"v2", rest)) = segments.split_first() else {
        return Ok(Route::NotFound);
    };
    Ok(match rest {
        [] => only(get, Route::Call("ServerMetadata", Vec::new())),
        ["health", "live"] => only(get, Route::Live),
        ["health", "ready"] => only(get, Route::Call("ServerReady", Vec::new())),
        ["models", "stats"] => only(get, Route::Call("ModelStatistics", Vec::new())),
        ["repository", "index"] => {
            let ready = match rest::optional_object(body)?.get("ready") {
                None => false,
                Some(serde_json::Value::Bool(b)) => *b,
                Some(_) => return Err(rest::RestError("'ready' must be true or false".into())),
            };
            let message = RepositoryIndex {
                repository_name: String::new(),
                ready,
            };
            only(
                post,
                Route::Call("RepositoryIndex", message.encode_to_vec()),
            )
        }
        ["repository", "models", model, action @ ("load" | "unload")] => {
            rest::optional_object(body)?;
            let message = RepositoryModel {
                repository_name: String::new(),
                model_name: (*model).to_owned(),
            }
            .encode_to_vec();
            let method = if *action == "load" {
                "RepositoryModelLoad"
            } else {
                "RepositoryModelUnload"
            };
            only(post, Route::Call(method, message))
        }
        ["models", model, tail @ ..] => {
            let (version, tail) = match tail {
                ["versions", version, tail @ ..] => (*version, tail),
                tail => ("", tail),
            };
            match tail {
                [] => only(
                    get,
                    Route::Call("ModelMetadata", name_version(model, version)),
                ),
                ["ready"] => only(get, Route::Call("ModelReady", name_version(model, version))),
                ["config"] => only(
                    get,
                    Route::Call("ModelConfig", name_version(model, version)),
                ),
                ["stats"] => only(
                    get,
                    Route::Call("ModelStatistics", name_version(model, version)),
                ),
                ["infer"] => only(
                    post,
                    Route::Infer {
                        model: (*model).to_owned(),
                        version: version.to_owned(),
                    },
                ),
                ["stream"] => only(
                    method == Method::GET,
                    Route::Stream {
                        model: (*model).to_owned(),
                        version: version.to_owned(),
                    },
                ),
                _ => Route::NotFound,
            }
        }
        [
            kind @ ("systemsharedmemory" | "cudasharedmemory"),
            tail @ ..,
        ] => {
            let (region, tail) = match tail {
                ["region", region, tail @ ..] => (*region, tail),
                tail => ("", tail),
            };
            let system = *kind == "systemsharedmemory";
            match tail {
                ["status"] => only(
                    get,
                    Route::Call(
                        if system {
                            "SystemSharedMemoryStatus"
                        } else {
                            "CudaSharedMemoryStatus"
                        },
                        name_version(region, ""),
                    ),
                ),
                ["unregister"] => only(
                    post,
                    Route::Call(
                        if system {
                            "SystemSharedMemoryUnregister"
                        } else {
                            "CudaSharedMemoryUnregister"
                        },
                        name_version(region, ""),
                    ),
                ),
                _ => Route::NotFound,
            }
        }
        _ => Route::NotFound,
    })
}

/// Whether a route is open to callers without credentials (probes and load balancers).
fn open(route: &Route) -> bool {
    matches!(route, Route::Live | Route::Call("ServerReady", _))
}

async fn handle(front: Arc<HttpFront>, peer: Peer, request: Request<Incoming>) -> Answer {
    let (mut parts, body) = request.into_parts();
    if let Some(encoding) = parts.headers.get(header::CONTENT_ENCODING)
        && !encoding.as_bytes().eq_ignore_ascii_case(b"identity")
    {
        let encoding = String::from_utf8_lossy(encoding.as_bytes());
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            &format!("Content-Encoding {encoding} is not supported: send the body uncompressed"),
        );
    }
    let max = front.context.max_message_bytes;
    let too_large = |n: u64| {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!(
                "the request takes {n} bytes, over this server's largest message of {max} bytes \
                 (--max-message-bytes); send fewer time steps or batch rows per request"
            ),
        )
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared
        && n > max as u64
    {
        return too_large(n);
    }
    // Who is calling is known before the body is read: a caller refused authentication
    // makes the server hold nothing of what it sends.
    let route = match route(&parts.method, parts.uri.path(), b"") {
        Ok(route) => route,
        Err(refused) => return error(StatusCode::BAD_REQUEST, &refused.0),
    };
    let principal = if open(&route) {
        None
    } else {
        // A browser cannot set headers on a WebSocket: its token may come as the URI query
        // parameter `access_token` (RFC 6750 section 2.3), on that endpoint only.
        let from_query = matches!(route, Route::Stream { .. })
            .then(|| query_value(parts.uri.query(), "access_token"))
            .flatten()
            .map(|token| format!("Bearer {token}"));
        let authorization = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .or(from_query.as_deref());
        match front
            .authenticator
            .principal(parts.uri.path(), authorization, &peer.principal)
        {
            Ok(principal) => principal,
            Err(why) => {
                front.context.inbox.refused(why);
                let mut answer = error(StatusCode::UNAUTHORIZED, front.authenticator.message());
                answer
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return answer;
            }
        }
    };
    let patience = front.timeouts.body;
    let body = match tokio::time::timeout(patience, Limited::new(body, max).collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(failure)) => {
            if failure
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return too_large(max as u64 + 1);
            }
            return error(
                StatusCode::BAD_REQUEST,
                &format!("the body could not be read: {failure}"),
            );
        }
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                &format!(
                    "the body did not arrive within {} s",
                    patience.as_secs_f64()
                ),
            );
        }
    };
    // The routes whose request message comes from the body (the repository's) read it now.
    let route = match route {
        Route::Call(_, _) if !body.is_empty() => {
            match self::route(&parts.method, parts.uri.path(), &body) {
                Ok(route) => route,
                Err(refused) => return error(StatusCode::BAD_REQUEST, &refused.0),
            }
        }
        route => route,
    };
    let head = parts.method == Method::HEAD;
    let mut answer = match route {
        Route::Live => empty(StatusCode::OK),
        Route::NotFound => error(StatusCode::NOT_FOUND, "Not Found"),
        Route::MethodNotAllowed => error(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed"),
        Route::Call(method, data) => call(&front, method, data, principal).await,
        Route::Infer { model, version } => {
            let header_length = parts
                .headers
                .get("inference-header-content-length")
                .map(|v| v.to_str().ok().and_then(|v| v.trim().parse::<usize>().ok()));
            let header_length = match header_length {
                Some(None) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "Inference-Header-Content-Length must be a number of bytes",
                    );
                }
                Some(Some(n)) => Some(n),
                None => None,
            };
            infer(&front, &model, &version, body, header_length, principal).await
        }
        Route::Stream { model, version } => {
            let accept = match websocket::accept_key(&parts.headers) {
                Ok(accept) => accept,
                Err(why) => return error(StatusCode::BAD_REQUEST, &why),
            };
            let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "a WebSocket needs HTTP/1.1 (its Upgrade handshake)",
                );
            };
            let binary_answers =
                query_value(parts.uri.query(), "binary_data_output").is_some_and(|v| v == "true");
            let opened = websocket::Opened {
                model,
                version,
                principal,
                binary_answers,
            };
            websocket::upgrade(
                front.context.clone(),
                front.stopping.clone(),
                on_upgrade,
                accept,
                opened,
            )
        }
    };
    if head {
        *answer.body_mut() = Full::new(Bytes::new());
    }
    answer
}

async fn call(
    front: &HttpFront,
    method: &'static str,
    data: Vec<u8>,
    principal: Principal,
) -> Answer {
    let handed = Handed::Call {
        method: format!("http:{method}"),
        data: Bytes::from(data),
        principal,
    };
    match front.context.clone().round_trip(handed).await {
        Ok(body) if body.is_empty() => empty(StatusCode::OK),
        Ok(body) => json(StatusCode::OK, body),
        Err(status) => failure(&status),
    }
}

async fn infer(
    front: &HttpFront,
    model: &str,
    version: &str,
    body: Bytes,
    header_length: Option<usize>,
    principal: Principal,
) -> Answer {
    let (data, outputs) = match rest::decode_request(model, version, &body, header_length) {
        Ok(decoded) => decoded,
        Err(refused) => return error(StatusCode::BAD_REQUEST, &refused.0),
    };
    drop(body);
    let answer = front
        .context
        .clone()
        .round_trip(Handed::Infer {
            data,
            principal,
            protocol: Protocol::Http,
        })
        .await;
    match answer {
        Ok(wire) => match rest::encode_response(&wire, &outputs) {
            Ok(encoded) => match encoded.header_length {
                None => json(StatusCode::OK, encoded.body),
                Some(n) => {
                    let mut answer = Response::new(Full::new(encoded.body));
                    let headers = answer.headers_mut();
                    headers.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/octet-stream"),
                    );
                    headers.insert("inference-header-content-length", HeaderValue::from(n));
                    answer
                }
            },
            Err(bug) => {
                tracing::error!("an HTTP answer could not be encoded: {bug}");
                error(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
            }
        },
        Err(status) => failure(&status),
    }
}

/// The answer to a request that failed with `status`, its `retry-after` a header.
fn failure(status: &tonic::Status) -> Answer {
    let mut answer = error(http_status(status.code()), status.message());
    if let Some(seconds) = status.metadata().get("retry-after") {
        answer.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from_bytes(seconds.as_bytes()).expect("digits"),
        );
    }
    answer
}

/// The HTTP status of a gRPC status code: Triton's for the codes it answers
/// (`HttpCodeFromError` in its http_server.cc), the usual HTTP meaning for the others.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Cancelled
        | Code::Unknown => StatusCode::BAD_REQUEST,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn json(status: StatusCode, body: Bytes) -> Answer {
    let mut answer = Response::new(Full::new(body));
    *answer.status_mut() = status;
    answer.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    answer
}

fn empty(status: StatusCode) -> Answer {
    let mut answer = Response::new(Full::new(Bytes::new()));
    *answer.status_mut() = status;
    answer
}

fn error(status: StatusCode, message: &str) -> Answer {
    json(status, rest::error_body(message))
}

/// The value of `name` in a URI query, percent-decoded; None when it is not there.
fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then(|| percent_decode(&value.replace('+', " ")))
    })
}

/// A path segment's percent-encoding undone (RFC 3986 section 2.1); a byte sequence that is
/// not UTF-8 is replaced, and never names a model.
fn percent_decode(segment: &str) -> String {
    if !segment.contains('%') {
        return segment.to_owned();
    }
    crate::service::percent_decode(segment)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(method: Method, path: &str) -> Route {
        route(&method, path, b"").unwrap()
    }

    #[test]
    fn routes_are_tritons() {
        assert_eq!(at(Method::GET, "/v2/health/live"), Route::Live);
        assert_eq!(
            at(Method::GET, "/v2"),
            Route::Call("ServerMetadata", vec![])
        );
        assert_eq!(
            at(Method::GET, "/v2/models/charlm_lstm/versions/2/config"),
            Route::Call("ModelConfig", name_version("charlm_lstm", "2"))
        );
        assert_eq!(
            at(Method::POST, "/v2/models/a%20b/infer"),
            Route::Infer {
                model: "a b".into(),
                version: String::new()
            }
        );
        assert_eq!(
            at(Method::GET, "/v2/models/m/infer"),
            Route::MethodNotAllowed
        );
        assert_eq!(at(Method::GET, "/v2/nothing"), Route::NotFound);
        assert_eq!(at(Method::GET, "/metrics"), Route::NotFound);
        assert_eq!(
            at(Method::POST, "/v2/repository/models/m/unload"),
            Route::Call(
                "RepositoryModelUnload",
                RepositoryModel {
                    repository_name: String::new(),
                    model_name: "m".into()
                }
                .encode_to_vec()
            )
        );
    }

    #[test]
    fn the_index_reads_its_optional_body() {
        let ready = route(&Method::POST, "/v2/repository/index", br#"{"ready":true}"#).unwrap();
        let Route::Call("RepositoryIndex", data) = ready else {
            panic!("{ready:?}")
        };
        assert!(RepositoryIndex::decode(&data[..]).unwrap().ready);
        assert!(route(&Method::POST, "/v2/repository/index", b"{").is_err());
    }

    #[test]
    fn statuses_are_tritons_where_it_answers_them() {
        assert_eq!(http_status(Code::InvalidArgument), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(
            http_status(Code::Unavailable),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            http_status(Code::Internal),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            http_status(Code::ResourceExhausted),
            StatusCode::TOO_MANY_REQUESTS
        );
    }
}
