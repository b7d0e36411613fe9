//! rnnserve's native data plane: the gRPC transport in Rust (tonic on tokio), handing the
//! Python engine its requests in batches.
//!
//! Rust is the transport, Python the engine: this crate knows HTTP/2, TLS, framing, flow
//! control and who is calling; it never decides what a request means, when a batch runs or
//! what an error says. Requests cross as wire bytes, many per crossing, and so do answers
//! (`queue`). This file only binds: the Python class [`Transport`] over `server`.

mod auth;
mod codec;
mod deadline;
mod health;
mod log;
mod queue;
mod rest;
mod rest_server;
mod server;
mod service;
mod spin;
mod stream;
mod tls;
mod websocket;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use tonic::{Code, Status};

use crate::auth::Authenticator;
use crate::health::{Health, NOT_SERVING, SERVING};
use crate::queue::{Inbox, LogRecord, Reply};
use crate::server::{Running, Settings, StartError};
use crate::service::Context;
use crate::tls::TlsFiles;

impl log::Sink for Context {
    fn log(&self, record: LogRecord) {
        self.inbox.log(record);
    }
}

struct Handles {
    context: Arc<Context>,
    health: Arc<Health>,
    authenticator: Arc<Authenticator>,
}

/// An arrival as Python takes it: (key, on a stream, holding a provisional reservation, request
/// bytes, principal, arrived).
type PyArrival<'py> = (u64, bool, bool, Bound<'py, PyBytes>, Option<String>, f64);
/// A call as Python takes it: (key, method, request bytes, principal).
type PyCall<'py> = (u64, String, Bound<'py, PyBytes>, Option<String>);
/// One take: arrivals, calls, cancelled keys, log records, refusals by reason, inference
/// requests by protocol, stopped.
type PyTaken<'py> = (
    Vec<PyArrival<'py>>,
    Vec<PyCall<'py>>,
    Vec<u64>,
    Vec<(u8, String)>,
    (u64, u64, u64),
    (u64, u64, u64),
    bool,
);

/// The gRPC transport: started once, fed answers, stopped once (see rnnserve_native.pyi).
#[pyclass(module = "rnnserve_native", frozen)]
pub struct Transport {
    settings: Mutex<Option<Settings>>,
    wake_reader: UnixStream,
    wake_writer: Mutex<Option<UnixStream>>,
    handles: OnceLock<Handles>,
    running: Mutex<Option<Running>>,
}

impl Transport {
    fn handles(&self) -> PyResult<&Handles> {
        self.handles
            .get()
            .ok_or_else(|| PyRuntimeError::new_err("the transport has not started"))
    }
}

#[pymethods]
impl Transport {
    #[new]
    #[pyo3(signature = (
        *, host, port, threads, max_message_bytes, http_port=None, tls_cert=None, tls_key=None,
        tls_client_ca=None, tokens=false, auth_message=String::new(), cold_methods=Vec::new(),
        descriptors=Vec::new(), spin_us=0, http_header_timeout_s=10.0, http_body_timeout_s=60.0
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        host: String,
        port: u16,
        threads: usize,
        max_message_bytes: usize,
        http_port: Option<u16>,
        tls_cert: Option<PathBuf>,
        tls_key: Option<PathBuf>,
        tls_client_ca: Option<PathBuf>,
        tokens: bool,
        auth_message: String,
        cold_methods: Vec<String>,
        descriptors: Vec<u8>,
        spin_us: u64,
        http_header_timeout_s: f64,
        http_body_timeout_s: f64,
    ) -> PyResult<Self> {
        let timeout = |seconds: f64, what: &str| {
            Duration::try_from_secs_f64(seconds)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| PyValueError::new_err(format!("{what} must be positive")))
        };
        let http_timeouts = rest_server::Timeouts {
            header: timeout(http_header_timeout_s, "http_header_timeout_s")?,
            body: timeout(http_body_timeout_s, "http_body_timeout_s")?,
        };
        let tls = match (tls_cert, tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert,
                key,
                client_ca: tls_client_ca,
            }),
            (None, None) => None,
            _ => {
                return Err(PyValueError::new_err(
                    "TLS needs both a certificate and a key",
                ));
            }
        };
        let (wake_reader, wake_writer) = UnixStream::pair()?;
        wake_reader.set_nonblocking(true)?;
        Ok(Self {
            settings: Mutex::new(Some(Settings {
                host,
                port,
                http_port,
                threads,
                max_message_bytes,
                tls,
                tokens,
                auth_message,
                cold_methods,
                descriptors,
                spin: Duration::from_micros(spin_us),
                http_timeouts,
            })),
            wake_reader,
            wake_writer: Mutex::new(Some(wake_writer)),
            handles: OnceLock::new(),
            running: Mutex::new(None),
        })
    }

    /// Bind and start serving; the port bound. OSError when the address cannot be bound,
    /// ValueError when a TLS file cannot be used (the message names it).
    fn start(&self, py: Python<'_>) -> PyResult<u16> {
        let settings = self
            .settings
            .lock()
            .map_err(|_| PyRuntimeError::new_err("poisoned"))?
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("the transport was started already"))?;
        let writer = self
            .wake_writer
            .lock()
            .map_err(|_| PyRuntimeError::new_err("poisoned"))?
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("the transport was started already"))?;
        let inbox = Inbox::new(writer)?;
        let running =
            py.detach(|| server::start(settings, inbox))
                .map_err(|error| match error {
                    StartError::Bind { .. } => PyOSError::new_err(error.to_string()),
                    StartError::Tls(_) => PyValueError::new_err(error.to_string()),
                    _ => PyRuntimeError::new_err(error.to_string()),
                })?;
        let port = running.port;
        let sink: Arc<dyn log::Sink> = running.context.clone();
        log::route_to(&sink);
        let _ = self.handles.set(Handles {
            context: running.context.clone(),
            health: running.health.clone(),
            authenticator: running.authenticator.clone(),
        });
        *self
            .running
            .lock()
            .map_err(|_| PyRuntimeError::new_err("poisoned"))? = Some(running);
        Ok(port)
    }

    /// The HTTP port bound, or None when the transport serves no HTTP port.
    fn http_port(&self) -> PyResult<Option<u16>> {
        let running = self
            .running
            .lock()
            .map_err(|_| PyRuntimeError::new_err("poisoned"))?;
        running
            .as_ref()
            .map(|r| r.http_port)
            .ok_or_else(|| PyRuntimeError::new_err("the transport has not started"))
    }

    /// Wait up to `max_us` microseconds, spinning with the GIL released, for something to
    /// take; whether something came (`spin`: a lone sequence's next request is near).
    fn spin_for_arrivals(&self, py: Python<'_>, max_us: u64) -> PyResult<bool> {
        let context = self.handles()?.context.clone();
        let limit = Duration::from_micros(max_us);
        Ok(py.detach(|| spin::spin_until(limit, || context.inbox.has_waiting())))
    }

    /// The descriptor that becomes readable when there is something to take.
    fn wake_fd(&self) -> i32 {
        self.wake_reader.as_raw_fd()
    }

    /// Everything that arrived since the last take (see `PyTaken`); drains the wake-up
    /// descriptor first, so a wake-up is never lost.
    fn take<'py>(&self, py: Python<'py>) -> PyResult<PyTaken<'py>> {
        use std::io::Read;
        let mut drained = [0u8; 256];
        while matches!((&self.wake_reader).read(&mut drained), Ok(n) if n > 0) {}
        let taken = self.handles()?.context.inbox.take();
        let principal = |p: &queue::Principal| p.as_deref().map(str::to_owned);
        let arrivals = taken
            .arrivals
            .iter()
            .map(|a| {
                (
                    a.key,
                    a.stream,
                    a.reserved,
                    PyBytes::new(py, &a.data),
                    principal(&a.principal),
                    a.arrived,
                )
            })
            .collect();
        let calls = taken
            .calls
            .iter()
            .map(|c| {
                (
                    c.key,
                    c.method.clone(),
                    PyBytes::new(py, &c.data),
                    principal(&c.principal),
                )
            })
            .collect();
        let logs = taken
            .logs
            .into_iter()
            .map(|l| (l.level, l.message))
            .collect();
        let [missing, malformed, unknown] = taken.refusals;
        let [grpc, http, websocket] = taken.protocols;
        Ok((
            arrivals,
            calls,
            taken.cancelled,
            logs,
            (missing, malformed, unknown),
            (grpc, http, websocket),
            taken.stopped,
        ))
    }

    /// Answer requests and calls: `ok` as (key, response bytes), `failed` as (key, gRPC
    /// status code, message); `reserved`: (key, bytes its answer will take) of stream requests
    /// decoded meanwhile. Answers to calls that have ended are dropped.
    fn answer(
        &self,
        py: Python<'_>,
        ok: Vec<(u64, Bound<'_, PyBytes>)>,
        failed: Vec<(u64, i32, String, f64)>,
        reserved: Vec<(u64, usize)>,
    ) -> PyResult<()> {
        let context = self.handles()?.context.clone();
        let mut replies: Vec<(u64, Reply)> = Vec::with_capacity(ok.len() + failed.len());
        replies.extend(
            ok.iter()
                .map(|(key, data)| (*key, Ok(Bytes::copy_from_slice(data.as_bytes())))),
        );
        replies.extend(
            failed
                .into_iter()
                .map(|(key, code, message, retry_after_s)| {
                    (key, Err(status(code, message, retry_after_s)))
                }),
        );
        // With the GIL held: these take short locks that tokio threads hold as briefly, and
        // queue each answer without waiting on anything; no other Python thread needs the GIL
        // meanwhile, so releasing it around them would buy nothing.
        let _ = py;
        context.pending.reserve(&reserved);
        context.pending.answer(replies);
        Ok(())
    }

    /// Set a service's health (`""` is the server): SERVING or NOT_SERVING.
    fn set_health(&self, service: &str, serving: bool) -> PyResult<()> {
        let status = if serving { SERVING } else { NOT_SERVING };
        self.handles()?.health.set(service, status);
        Ok(())
    }

    /// Every service NOT_SERVING, for good: a drain has begun.
    fn enter_graceful_shutdown(&self) -> PyResult<()> {
        self.handles()?.health.enter_graceful_shutdown();
        Ok(())
    }

    /// The bearer tokens callers may present: (SHA-256 digest of the token, principal) pairs.
    fn set_tokens(&self, tokens: Vec<(Vec<u8>, String)>) -> PyResult<()> {
        let mut known = Vec::with_capacity(tokens.len());
        for (digest, principal) in tokens {
            let digest: [u8; 32] = digest
                .try_into()
                .map_err(|_| PyValueError::new_err("a token digest is 32 bytes (SHA-256)"))?;
            known.push((digest, Arc::from(principal)));
        }
        self.handles()?.authenticator.set_tokens(known);
        Ok(())
    }

    /// The most bytes an answer takes, as `per_request_byte` * its request's bytes + `fixed`:
    /// what a deep stream reserves for each answer it owes.
    fn set_answer_bound(&self, per_request_byte: f64, fixed: u64) -> PyResult<()> {
        self.handles()?
            .context
            .stream_limits
            .answers
            .set(per_request_byte, fixed);
        Ok(())
    }

    /// Requests handed over (or queued for Python) and not answered.
    fn outstanding(&self) -> PyResult<usize> {
        Ok(self.handles()?.context.pending.waiting())
    }

    /// Stop taking connections and calls; calls in flight get `grace_s` seconds, then what is
    /// left is answered UNAVAILABLE and a take reports the transport stopped.
    fn stop(&self, grace_s: f64) -> PyResult<()> {
        let running = self
            .running
            .lock()
            .map_err(|_| PyRuntimeError::new_err("poisoned"))?;
        if let Some(running) = running.as_ref() {
            running.stop(Duration::from_secs_f64(grace_s.max(0.0)));
        }
        Ok(())
    }

    /// End the transport's threads and whatever connections they still hold.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let running = self
            .running
            .lock()
            .map_err(|_| PyRuntimeError::new_err("poisoned"))?
            .take();
        if let Some(running) = running {
            py.detach(|| running.close());
        }
        Ok(())
    }
}

/// A failed request's status; `retry_after_s` > 0 (when a retry can succeed) travels as its
/// `retry-after` metadata, whole seconds rounded up (the HTTP port's Retry-After header).
fn status(code: i32, message: String, retry_after_s: f64) -> Status {
    let mut status = Status::new(Code::from(code), message);
    if retry_after_s > 0.0 && retry_after_s.is_finite() {
        let seconds = retry_after_s.ceil().min(86_400.0) as u64;
        status
            .metadata_mut()
            .insert("retry-after", tonic::metadata::MetadataValue::from(seconds));
    }
    status
}

#[pymodule]
fn rnnserve_native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<Transport>()?;
    module.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
