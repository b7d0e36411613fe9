//! ModelStreamInfer: one stream's requests handed over as they arrive, its answers written in
//! the order they are ready, and what the stream may hold bounded.
//!
//! A stream holds the bytes of its requests read and not answered, and of its answers not yet
//! taken by the connection. While it holds more than the server's largest message, or
//! [`MAX_OUTSTANDING`] requests, its next request is not read: HTTP/2's flow control then holds
//! the client back, and memory stays bounded whatever the client sends or fails to read (one
//! message over the bound still goes through). A stream with more than [`SHALLOW`] requests
//! outstanding also reserves, for each further request, the bytes its answer will take (an
//! answer may be thousands of times its request). Python knows that figure only once it has
//! decoded the request, so until its exact reservation comes back (with the next answers) the
//! request holds a provisional one: the linear bound [`AnswerBound`] that Python sets from the
//! loaded models' signatures, never below the answer. The rule is the Python transport's
//! (`rnnserve.api.servicer._Outbox`), decided here for this transport.
//!
//! A stream whose client half-closes gets every answer, then ends OK; one that ends otherwise
//! (cancelled, reset, disconnected, past its deadline) drops its requests that have not run.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context as TaskContext, Poll};

use bytes::Bytes;
use futures_core::Stream;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tonic::{Status, Streaming};

use crate::queue::{Arrival, Gone, Principal, Protocol, Reply, Waiter, monotonic_s};
use crate::service::{Context, message_too_large};

/// Requests one stream may have read and not answered before it stops being read.
pub const MAX_OUTSTANDING: usize = 1024;
/// Outstanding requests of a stream whose answers are not reserved ahead (a stream's usual
/// one, or a few pipelined).
pub const SHALLOW: usize = 4;

/// The most bytes an answer takes on the wire, as a linear function of its request's bytes:
/// `per_request_byte * request + fixed`, never more than the largest message.
#[derive(Debug)]
pub struct AnswerBound {
    per_request_byte: AtomicU64,
    fixed: AtomicU64,
}

impl AnswerBound {
    pub fn new(per_request_byte: f64, fixed: u64) -> Self {
        Self {
            per_request_byte: AtomicU64::new(per_request_byte.to_bits()),
            fixed: AtomicU64::new(fixed),
        }
    }

    pub fn set(&self, per_request_byte: f64, fixed: u64) {
        self.per_request_byte
            .store(per_request_byte.to_bits(), Ordering::Relaxed);
        self.fixed.store(fixed, Ordering::Relaxed);
    }

    /// The bytes to reserve for the answer to a request of `request` bytes.
    pub fn reserve(&self, request: usize, largest: usize) -> usize {
        let factor = f64::from_bits(self.per_request_byte.load(Ordering::Relaxed));
        let fixed = self.fixed.load(Ordering::Relaxed) as f64;
        let bound = factor * request as f64 + fixed;
        if bound >= largest as f64 {
            largest
        } else {
            bound.ceil() as usize
        }
    }
}

/// What one stream may hold: its bound in bytes and its answers' size bound.
#[derive(Debug)]
pub struct StreamLimits {
    pub max_held: usize,
    pub answers: AnswerBound,
}

struct State {
    /// Bytes of requests read and not answered (with their answers' reservations) and of
    /// answers not yet taken by the connection.
    held: usize,
    /// The requests read and not answered: their keys and what each holds.
    outstanding: HashMap<u64, Held>,
    /// The client half-closed: end once every answer is out.
    requests_done: bool,
    /// Where answers go; None once the stream has ended (or is ending) its answers.
    answers: Option<mpsc::UnboundedSender<Reply>>,
}

/// What one outstanding request holds of its stream's allowance.
#[derive(Debug, Clone, Copy)]
struct Held {
    request: usize,
    /// Bytes reserved for its answer (0 in a shallow stream).
    reserved: usize,
}

/// One stream's state, shared by its reader task, its answers and Python's replies.
pub struct StreamShared {
    state: Mutex<State>,
    room: Notify,
    gone: Gone,
}

impl StreamShared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn full(state: &State, limits: &StreamLimits) -> bool {
        state.held > limits.max_held || state.outstanding.len() >= MAX_OUTSTANDING
    }

    /// Return once the stream may read its next request.
    async fn room(&self, limits: &StreamLimits) {
        loop {
            let notified = self.room.notified();
            if !Self::full(&self.lock(), limits) {
                return;
            }
            notified.await;
        }
    }

    /// Count a request of `nbytes` read as `key`, with a provisional reservation for its
    /// answer when the stream is deep; whether it took one.
    fn admit(&self, key: u64, nbytes: usize, limits: &StreamLimits, largest: usize) -> bool {
        let mut state = self.lock();
        let reserved = if state.outstanding.len() >= SHALLOW {
            limits.answers.reserve(nbytes, largest)
        } else {
            0
        };
        state.outstanding.insert(
            key,
            Held {
                request: nbytes,
                reserved,
            },
        );
        state.held += nbytes + reserved;
        reserved > 0
    }

    /// Request `key`'s answer takes `nbytes` (Python decoded it): its reservation, if it
    /// holds one, becomes that.
    pub fn reserve(&self, key: u64, nbytes: usize) {
        let mut state = self.lock();
        let Some(held) = state.outstanding.get_mut(&key) else {
            return;
        };
        if held.reserved == 0 {
            return;
        }
        let before = std::mem::replace(&mut held.reserved, nbytes.max(1));
        state.held = state.held - before + nbytes.max(1);
        drop(state);
        self.room.notify_one();
    }

    /// The answer to request `key`: queue it for the connection; an error status ends the
    /// stream with it.
    pub fn deliver(&self, key: u64, reply: Reply) {
        let mut state = self.lock();
        let Some(held) = state.outstanding.remove(&key) else {
            return;
        };
        state.held -= held.request + held.reserved;
        match (reply, &state.answers) {
            (Ok(bytes), Some(answers)) => {
                let size = bytes.len();
                if answers.send(Ok(bytes)).is_ok() {
                    state.held += size;
                }
            }
            (Err(status), Some(answers)) => {
                let _ = answers.send(Err(status));
                state.answers = None;
            }
            (_, None) => {}
        }
        if state.requests_done && state.outstanding.is_empty() {
            state.answers = None; // every answer is out: the stream ends OK
        }
        drop(state);
        self.room.notify_one();
    }

    /// The connection took an answer of `nbytes`.
    fn sent(&self, nbytes: usize) {
        let mut state = self.lock();
        state.held = state.held.saturating_sub(nbytes);
        drop(state);
        self.room.notify_one();
    }

    /// The client half-closed.
    fn requests_done(&self) {
        let mut state = self.lock();
        state.requests_done = true;
        if state.outstanding.is_empty() {
            state.answers = None;
        }
    }

    /// End the stream with `status` (its requests could not be read).
    fn fail(&self, status: Status) {
        let mut state = self.lock();
        if let Some(answers) = state.answers.take() {
            let _ = answers.send(Err(status));
        }
    }

    /// No one reads the answers any more: the keys of the requests still outstanding.
    fn close(&self) -> Vec<u64> {
        self.gone.store(true, Ordering::Release);
        let mut state = self.lock();
        state.answers = None;
        state.outstanding.drain().map(|(key, _)| key).collect()
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.lock().held
    }
}

/// ModelStreamInfer's response: the stream's answers as they are ready. Dropping it (the call
/// ended, however) stops the reader and drops the requests that have not run.
pub struct Answers {
    answers: mpsc::UnboundedReceiver<Reply>,
    shared: Arc<StreamShared>,
    reader: JoinHandle<()>,
    context: Arc<Context>,
    /// Its key among the open streams (`OpenStreams`).
    id: u64,
}

/// The streams open now, so that a stop can end each with a status rather than a reset.
#[derive(Default)]
pub struct OpenStreams {
    streams: Mutex<HashMap<u64, Weak<StreamShared>>>,
}

impl OpenStreams {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Weak<StreamShared>>> {
        self.streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// End every open stream with `status` (the transport stops: no answer will come).
    pub fn end_all(&self, status: &Status) {
        let open: Vec<Arc<StreamShared>> = self.lock().values().filter_map(Weak::upgrade).collect();
        for stream in open {
            stream.fail(Status::new(status.code(), status.message()));
        }
    }

    /// How many streams are open.
    pub fn count(&self) -> usize {
        self.lock().len()
    }
}

impl Stream for Answers {
    type Item = Reply;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Reply>> {
        let polled = self.answers.poll_recv(cx);
        if let Poll::Ready(Some(Ok(bytes))) = &polled {
            self.shared.sent(bytes.len());
        }
        polled
    }
}

impl Drop for Answers {
    fn drop(&mut self) {
        self.context.streams.lock().remove(&self.id);
        self.reader.abort();
        let keys = self.shared.close();
        if !keys.is_empty() {
            self.context.pending.remove_all(&keys);
            self.context.inbox.cancel(keys);
        }
    }
}

/// Where a stream's requests come from: a ModelStreamInfer call's messages, or a WebSocket's
/// (`websocket`), each a ModelInferRequest's wire bytes.
pub trait Requests: Send + 'static {
    /// The next request; None once the client has sent its last; an error ends the stream.
    fn next(&mut self) -> impl Future<Output = Result<Option<Bytes>, Status>> + Send;
}

impl Requests for Streaming<Bytes> {
    async fn next(&mut self) -> Result<Option<Bytes>, Status> {
        self.message().await
    }
}

/// Serve one stream of `principal` (a ModelStreamInfer call, or a WebSocket): read its
/// requests as there is room, hand each to Python, and answer in the order answers are ready.
pub fn serve(
    context: Arc<Context>,
    requests: impl Requests,
    principal: Principal,
    protocol: Protocol,
) -> Answers {
    let (sender, answers) = mpsc::unbounded_channel();
    let shared = Arc::new(StreamShared {
        state: Mutex::new(State {
            held: 0,
            outstanding: HashMap::new(),
            requests_done: false,
            answers: Some(sender),
        }),
        room: Notify::new(),
        gone: Arc::new(AtomicBool::new(false)),
    });
    let id = context.inbox.next_key();
    context.streams.lock().insert(id, Arc::downgrade(&shared));
    let reader = tokio::spawn(read(
        context.clone(),
        requests,
        shared.clone(),
        principal,
        protocol,
    ));
    Answers {
        answers,
        shared,
        reader,
        context,
        id,
    }
}

async fn read(
    context: Arc<Context>,
    mut requests: impl Requests,
    shared: Arc<StreamShared>,
    principal: Principal,
    protocol: Protocol,
) {
    let limits = &context.stream_limits;
    loop {
        shared.room(limits).await;
        match requests.next().await {
            Ok(Some(data)) => {
                let arrived = monotonic_s();
                let key = context.inbox.next_key();
                let reserved = shared.admit(key, data.len(), limits, context.max_message_bytes);
                // Registered before it is handed over: Python may answer at once.
                context.pending.insert(key, Waiter::Stream(shared.clone()));
                context.inbox.arrive(Arrival {
                    protocol,
                    key,
                    stream: true,
                    reserved,
                    data,
                    principal: principal.clone(),
                    arrived,
                    gone: shared.gone.clone(),
                });
            }
            Ok(None) => {
                shared.requests_done();
                return;
            }
            Err(status) => {
                shared.fail(message_too_large(status, context.max_message_bytes));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> (Arc<StreamShared>, mpsc::UnboundedReceiver<Reply>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let shared = Arc::new(StreamShared {
            state: Mutex::new(State {
                held: 0,
                outstanding: HashMap::new(),
                requests_done: false,
                answers: Some(sender),
            }),
            room: Notify::new(),
            gone: Gone::default(),
        });
        (shared, receiver)
    }

    fn limits(max_held: usize) -> StreamLimits {
        StreamLimits {
            max_held,
            answers: AnswerBound::new(10.0, 100),
        }
    }

    #[test]
    fn a_shallow_stream_reserves_nothing_a_deep_one_its_answers_bound_until_told_exactly() {
        let (stream, _answers) = shared();
        let limits = limits(1 << 20);
        for key in 0..SHALLOW as u64 {
            stream.admit(key, 50, &limits, 1 << 20);
        }
        assert_eq!(stream.held(), SHALLOW * 50);
        stream.admit(99, 50, &limits, 1 << 20);
        assert_eq!(stream.held(), SHALLOW * 50 + 50 + 10 * 50 + 100);
        stream.reserve(99, 30);
        assert_eq!(stream.held(), SHALLOW * 50 + 50 + 30);
        stream.reserve(0, 1000);
        assert_eq!(
            stream.held(),
            SHALLOW * 50 + 50 + 30,
            "a shallow request holds no reservation"
        );
    }

    #[test]
    fn a_reservation_never_exceeds_the_largest_message() {
        let bound = AnswerBound::new(1e6, 0);
        assert_eq!(bound.reserve(1000, 4096), 4096);
    }

    #[test]
    fn held_bytes_follow_requests_answers_and_what_the_connection_took() {
        let (stream, mut answers) = shared();
        let limits = limits(1000);
        stream.admit(1, 400, &limits, 1000);
        assert_eq!(stream.held(), 400);
        stream.deliver(1, Ok(Bytes::from(vec![0u8; 700])));
        assert_eq!(
            stream.held(),
            700,
            "the answer is held until the connection takes it"
        );
        assert!(!StreamShared::full(&stream.lock(), &limits));
        stream.admit(2, 400, &limits, 1000);
        assert!(
            StreamShared::full(&stream.lock(), &limits),
            "1,100 bytes held over 1,000"
        );
        let answer = answers.try_recv().unwrap().unwrap();
        stream.sent(answer.len());
        assert_eq!(stream.held(), 400);
        assert!(!StreamShared::full(&stream.lock(), &limits));
    }

    #[test]
    fn a_stream_stops_being_read_at_its_outstanding_bound() {
        let (stream, _answers) = shared();
        let limits = limits(usize::MAX);
        for key in 0..MAX_OUTSTANDING as u64 {
            assert!(!StreamShared::full(&stream.lock(), &limits));
            stream.admit(key, 1, &limits, 1 << 20);
        }
        assert!(StreamShared::full(&stream.lock(), &limits));
    }

    #[test]
    fn a_half_closed_stream_ends_after_its_last_answer() {
        let (stream, mut answers) = shared();
        let limits = limits(1 << 20);
        stream.admit(1, 10, &limits, 1 << 20);
        stream.requests_done();
        assert!(answers.try_recv().is_err(), "still open: an answer is owed");
        stream.deliver(1, Ok(Bytes::from_static(b"answer")));
        assert!(answers.try_recv().unwrap().is_ok());
        assert!(matches!(
            answers.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
    }

    #[test]
    fn closing_hands_back_the_outstanding_keys_and_later_answers_are_dropped() {
        let (stream, mut answers) = shared();
        let limits = limits(1 << 20);
        stream.admit(1, 10, &limits, 1 << 20);
        stream.admit(2, 10, &limits, 1 << 20);
        let mut keys = stream.close();
        keys.sort();
        assert_eq!(keys, vec![1, 2]);
        stream.deliver(1, Ok(Bytes::from_static(b"late")));
        assert!(matches!(
            answers.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        assert!(stream.gone.load(Ordering::Acquire));
    }

    #[tokio::test]
    async fn room_returns_once_an_answer_is_taken() {
        let (stream, mut answers) = shared();
        let limits = Arc::new(limits(100));
        stream.admit(1, 150, &limits, 1000);
        let waiting = {
            let (stream, limits) = (stream.clone(), limits.clone());
            tokio::spawn(async move { stream.room(&limits).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        stream.deliver(1, Ok(Bytes::from_static(b"ok")));
        let answer = answers.recv().await.unwrap().unwrap();
        stream.sent(answer.len());
        waiting.await.unwrap();
    }
}
