//! Streaming sequences over WebSocket (RFC 6455) on the HTTP port, for browsers and
//! dashboards: `GET /v2/models/{name}[/versions/{v}]/stream` upgraded, then one socket carries
//! one or more sequences, as one ModelStreamInfer call does.
//!
//! Each message in is one step: a text frame holds a v2 inference request's JSON, exactly as
//! `POST .../infer` takes it; a binary frame holds the length of its JSON header (4 bytes,
//! little-endian), the header, then binary tensor data (Triton's binary tensor data extension,
//! as after `Inference-Header-Content-Length`). Each answer out is the v2 inference response's
//! JSON in a text frame (with `binary_data_output=true` in the URL's query, a binary frame
//! laid out as the binary requests), or, for a request refused, `{"id", "model_name",
//! "model_version", "error": "[CODE] message"}`; the socket stays open, as a gRPC stream does.
//!
//! Everything but the framing is the gRPC stream's: each request becomes the ModelInferRequest
//! it means (`rest`) and goes through `stream::serve`, so its sequence semantics, its limits
//! (what a socket holds unanswered is bounded; while it is full, its next message is not
//! read and TCP holds the client back), the order of its answers and what a closed socket does
//! to its requests not yet run (dropped) are the same.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Message, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Utf8Bytes};
use tonic::Status;

use crate::queue::{Principal, Protocol};
use crate::rest::{self, BinaryOutputs};
use crate::service::{Context, message_too_large};
use crate::stream::{self, Requests};

type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// What a socket serves: whose requests to which model, and how its answers look.
pub struct Opened {
    pub model: String,
    /// "" for the server's choice.
    pub version: String,
    pub principal: Principal,
    /// Answers as binary frames with binary data, rather than JSON text frames.
    pub binary_answers: bool,
}

/// The request's `Sec-WebSocket-Accept`, when it asks for a WebSocket as RFC 6455 section 4.2.1
/// says (GET, `Upgrade: websocket`, `Connection: upgrade`, version 13, a key); why not else.
pub fn accept_key(headers: &http::HeaderMap) -> Result<String, String> {
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    if !has(header::UPGRADE, "websocket") || !has(header::CONNECTION, "upgrade") {
        return Err(
            "this endpoint streams over WebSocket: connect with `Upgrade: websocket` \
             (ws://host:port/v2/models/{name}/stream)"
                .into(),
        );
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err("Sec-WebSocket-Version must be 13 (RFC 6455)".into());
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or("a WebSocket handshake needs Sec-WebSocket-Key")?;
    Ok(derive_accept_key(key.as_bytes()))
}

/// Answer the handshake (101) and serve the socket once the connection is upgraded.
pub fn upgrade(
    context: Arc<Context>,
    stopping: watch::Receiver<bool>,
    on_upgrade: OnUpgrade,
    accept: String,
    opened: Opened,
) -> Response<Full<Bytes>> {
    let max = context.max_message_bytes;
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                tracing::debug!("a WebSocket upgrade failed: {error}");
                return;
            }
        };
        let config = WebSocketConfig::default()
            .max_message_size(Some(max))
            .max_frame_size(Some(max));
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        serve(context, stopping, socket, opened).await;
    });
    let mut answer = Response::new(Full::new(Bytes::new()));
    *answer.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = answer.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64"),
    );
    answer
}

/// A socket's messages as ModelInferRequests; a message that does not parse is answered
/// in-band through `refusals`, and reading goes on.
struct SocketRequests {
    source: futures_util::stream::SplitStream<Socket>,
    /// On a stop, no more is read: what was read is answered, then the socket closes.
    stopping: watch::Receiver<bool>,
    model: String,
    version: String,
    refusals: mpsc::UnboundedSender<Bytes>,
    max_message_bytes: usize,
}

impl Requests for SocketRequests {
    async fn next(&mut self) -> Result<Option<Bytes>, Status> {
        loop {
            let message = tokio::select! {
                _ = self.stopping.wait_for(|stop| *stop) => return Ok(None),
                message = self.source.next() => message,
            };
            let (body, header_length) = match message {
                None | Some(Ok(Message::Close(_))) => return Ok(None),
                Some(Ok(Message::Text(text))) => (Bytes::from(text), None),
                Some(Ok(Message::Binary(data))) => {
                    if data.len() < 4 {
                        let _ = self.refusals.send(rest::stream_refusal(
                            None,
                            &self.model,
                            &self.version,
                            "a binary message starts with its JSON header's length (4 bytes, \
                             little-endian)",
                        ));
                        continue;
                    }
                    let n = u32::from_le_bytes(data[..4].try_into().expect("4")) as usize;
                    (data.slice(4..), Some(n))
                }
                Some(Ok(_)) => continue, // ping, pong: tungstenite answers pings itself
                Some(Err(tungstenite::Error::Capacity(error))) => {
                    let status = Status::out_of_range(format!("found {error}"));
                    return Err(message_too_large(status, self.max_message_bytes));
                }
                Some(Err(
                    tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed,
                )) => return Ok(None),
                Some(Err(error)) => {
                    return Err(Status::cancelled(format!("the WebSocket failed: {error}")));
                }
            };
            match rest::decode_request(&self.model, &self.version, &body, header_length) {
                Ok((data, _)) => return Ok(Some(data)),
                Err(refused) => {
                    let json_end = header_length.unwrap_or(body.len()).min(body.len());
                    let id = rest::request_id(&body[..json_end]);
                    let refusal =
                        rest::stream_refusal(id.as_deref(), &self.model, &self.version, &refused.0);
                    let _ = self.refusals.send(refusal);
                }
            }
        }
    }
}

async fn serve(
    context: Arc<Context>,
    stopping: watch::Receiver<bool>,
    socket: Socket,
    opened: Opened,
) {
    let (mut sink, source) = socket.split();
    let stopped = stopping.clone();
    let (refusals, mut refused) = mpsc::unbounded_channel();
    let requests = SocketRequests {
        source,
        stopping,
        model: opened.model,
        version: opened.version,
        refusals,
        max_message_bytes: context.max_message_bytes,
    };
    let mut answers = stream::serve(context, requests, opened.principal, Protocol::WebSocket);
    let outputs = BinaryOutputs::all(opened.binary_answers);
    loop {
        let frame = tokio::select! {
            biased;
            Some(refusal) = refused.recv() => text(refusal),
            answer = answers.next() => match answer {
                None => break,
                Some(Ok(wire)) => match rest::encode_stream_response(&wire, &outputs) {
                    Ok(encoded) => match encoded.header_length {
                        None => text(encoded.body),
                        Some(n) => {
                            let mut framed = Vec::with_capacity(4 + encoded.body.len());
                            framed.extend_from_slice(&(n as u32).to_le_bytes());
                            framed.extend_from_slice(&encoded.body);
                            Message::Binary(Bytes::from(framed))
                        }
                    },
                    Err(bug) => {
                        tracing::error!("a WebSocket answer could not be encoded: {bug}");
                        text(rest::error_body("[INTERNAL] internal error"))
                    }
                },
                Some(Err(status)) => {
                    // The stream ended (a message over the limit, the server stopping): say
                    // why, then close.
                    let message = format!("[{:?}] {}", status.code(), status.message());
                    let _ = sink.send(text(rest::error_body(&message))).await;
                    break;
                }
            },
        };
        if sink.send(frame).await.is_err() {
            // The client is gone: dropping `answers` drops its requests that have not run.
            return;
        }
    }
    while let Ok(refusal) = refused.try_recv() {
        let _ = sink.send(text(refusal)).await;
    }
    if *stopped.borrow() {
        // RFC 6455 section 7.4.1: 1001, going away; a client tells a drain from a fault and
        // connects again (to another replica).
        let frame = CloseFrame {
            code: CloseCode::Away,
            reason: Utf8Bytes::from_static("the server is shutting down"),
        };
        let _ = sink.send(Message::Close(Some(frame))).await;
    }
    let _ = sink.close().await;
}

fn text(body: Bytes) -> Message {
    match Utf8Bytes::try_from(body) {
        Ok(text) => Message::Text(text),
        Err(_) => Message::Text(Utf8Bytes::from_static(
            "{\"error\":\"an answer was not UTF-8\"}",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handshake_is_rfc_6455s() {
        let mut headers = http::HeaderMap::new();
        assert!(accept_key(&headers).unwrap_err().contains("WebSocket"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        headers.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        assert!(
            accept_key(&headers)
                .unwrap_err()
                .contains("Sec-WebSocket-Key")
        );
        // RFC 6455 section 1.3's example.
        headers.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        assert_eq!(
            accept_key(&headers).unwrap(),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
