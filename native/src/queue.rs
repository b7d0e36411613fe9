//! The hand-off between the transport (tokio) and the Python engine.
//!
//! What arrives waits in the [`Inbox`] until Python takes all of it in one call; the first
//! arrival after a take writes one byte to a socket Python's event loop watches, so Python
//! sleeps in its event loop (the GIL released) while nothing arrives, and one wake-up carries
//! however much arrived meanwhile. Python's answers come back in one call too, and find the
//! call waiting for each through [`Pending`]. Tokio tasks never touch Python: they push into
//! the inbox and await their answer; Python only ever takes and answers.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::oneshot;
use tonic::Status;

use crate::stream::StreamShared;

/// Who is calling, as authentication named them; None when the server authenticates no one.
pub type Principal = Option<Arc<str>>;

/// A call's answer: the response's wire bytes, or the status that ends the call.
pub type Reply = Result<Bytes, Status>;

/// Whether the call a queued request belongs to has ended (cancelled, disconnected, past its
/// deadline): a request whose call is gone is dropped at the next take, never handed over.
pub type Gone = Arc<AtomicBool>;

/// Which protocol carried an inference request, in the order of the counts in [`Taken`] (the
/// labels of `rnnserve_requests_by_protocol_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc = 0,
    Http = 1,
    WebSocket = 2,
}

/// An inference request (ModelInfer, or one request of a ModelStreamInfer stream).
#[derive(Debug)]
pub struct Arrival {
    /// What carried it (counted, never handed over one by one).
    pub protocol: Protocol,
    /// The request's key: its answer names it.
    pub key: u64,
    /// Whether it came on a stream (errors are then answered in-band).
    pub stream: bool,
    /// Whether it holds a provisional reservation for its answer (a deep stream's request),
    /// which Python replaces with the answer's size once it decoded it.
    pub reserved: bool,
    /// The request message's wire bytes.
    pub data: Bytes,
    pub principal: Principal,
    /// When it arrived (seconds on CLOCK_MONOTONIC, Python's `time.perf_counter()` clock).
    pub arrived: f64,
    pub gone: Gone,
}

/// A call of one of the service's other methods (metadata, repository, statistics...).
#[derive(Debug)]
pub struct Call {
    pub key: u64,
    /// The method's name within the inference service (`ModelMetadata`, ...).
    pub method: String,
    pub data: Bytes,
    pub principal: Principal,
    pub gone: Gone,
}

/// Why a call was refused authentication, in the order of the counts in [`Taken`] (the
/// labels of Python's `rnnserve.auth.Refusal`: missing, malformed, unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Missing = 0,
    Malformed = 1,
    Unknown = 2,
}

/// A log record of the native part, for Python's logging.
#[derive(Debug)]
pub struct LogRecord {
    /// Python's logging level (10 DEBUG .. 40 ERROR).
    pub level: u8,
    pub message: String,
}

/// Everything one take hands to Python.
#[derive(Debug, Default)]
pub struct Taken {
    pub arrivals: Vec<Arrival>,
    pub calls: Vec<Call>,
    /// Keys of requests handed over before whose calls ended: drop them if they have not run.
    pub cancelled: Vec<u64>,
    pub logs: Vec<LogRecord>,
    /// Authentication refusals since the last take, by [`Refusal`].
    pub refusals: [u64; 3],
    /// Inference requests since the last take, by the [`Protocol`] that carried them.
    pub protocols: [u64; 3],
    /// The transport has stopped: nothing more will arrive.
    pub stopped: bool,
}

/// Logs kept for Python at most between two takes; more are counted and dropped.
const MAX_PENDING_LOGS: usize = 1000;

#[derive(Default)]
struct State {
    taken: Taken,
    dropped_logs: u64,
    /// A byte was written since the last take: the next arrival need not write another.
    signalled: bool,
}

/// What has arrived for Python and not yet been taken.
pub struct Inbox {
    state: Mutex<State>,
    /// `State::signalled`, readable without the lock: what a spinning taker watches.
    waiting: AtomicBool,
    wake: UnixStream,
    keys: AtomicU64,
}

impl Inbox {
    /// An inbox that wakes Python by writing to `wake` (its other end is Python's to watch).
    pub fn new(wake: UnixStream) -> std::io::Result<Self> {
        wake.set_nonblocking(true)?;
        Ok(Self {
            state: Mutex::new(State::default()),
            waiting: AtomicBool::new(false),
            wake,
            keys: AtomicU64::new(1),
        })
    }

    /// Whether something waits to be taken (a hint: read without the lock).
    pub fn has_waiting(&self) -> bool {
        self.waiting.load(Ordering::Acquire)
    }

    /// A key no request or call had before.
    pub fn next_key(&self) -> u64 {
        self.keys.fetch_add(1, Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind: go on with it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn push(&self, add: impl FnOnce(&mut Taken)) {
        let wake = {
            let mut state = self.lock();
            add(&mut state.taken);
            !std::mem::replace(&mut state.signalled, true)
        };
        self.waiting.store(true, Ordering::Release);
        if wake {
            // Full (WouldBlock) means a wake-up is pending already: nothing is lost.
            let _ = (&self.wake).write(&[1]);
        }
    }

    pub fn arrive(&self, arrival: Arrival) {
        self.push(|taken| {
            taken.protocols[arrival.protocol as usize] += 1;
            taken.arrivals.push(arrival);
        });
    }

    pub fn call(&self, call: Call) {
        self.push(|taken| taken.calls.push(call));
    }

    pub fn cancel(&self, keys: impl IntoIterator<Item = u64>) {
        self.push(|taken| taken.cancelled.extend(keys));
    }

    pub fn refused(&self, why: Refusal) {
        self.push(|taken| taken.refusals[why as usize] += 1);
    }

    pub fn stopped(&self) {
        self.push(|taken| taken.stopped = true);
    }

    pub fn log(&self, record: LogRecord) {
        let mut state = self.lock();
        if state.taken.logs.len() >= MAX_PENDING_LOGS {
            state.dropped_logs += 1;
            return;
        }
        state.taken.logs.push(record);
        let wake = !std::mem::replace(&mut state.signalled, true);
        drop(state);
        if wake {
            let _ = (&self.wake).write(&[1]);
        }
    }

    /// Everything that arrived since the last take, but requests and calls whose call is gone.
    pub fn take(&self) -> Taken {
        let (mut taken, dropped_logs) = {
            let mut state = self.lock();
            state.signalled = false;
            self.waiting.store(false, Ordering::Release);
            let stopped = state.taken.stopped;
            let taken = std::mem::take(&mut state.taken);
            state.taken.stopped = stopped;
            (taken, std::mem::take(&mut state.dropped_logs))
        };
        taken.arrivals.retain(|a| !a.gone.load(Ordering::Acquire));
        taken.calls.retain(|c| !c.gone.load(Ordering::Acquire));
        if dropped_logs > 0 {
            taken.logs.push(LogRecord {
                level: 30,
                message: format!("{dropped_logs} log records of the native transport dropped"),
            });
        }
        taken
    }
}

/// Where the answer to a request handed to Python goes.
pub enum Waiter {
    /// A unary call, awaiting its one reply.
    Unary(oneshot::Sender<Reply>),
    /// One request of a stream.
    Stream(Arc<StreamShared>),
}

/// The requests handed to Python (or queued for it) and not answered yet, by key.
#[derive(Default)]
pub struct Pending {
    waiters: Mutex<HashMap<u64, Waiter>>,
}

impl Pending {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Waiter>> {
        self.waiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn insert(&self, key: u64, waiter: Waiter) {
        self.lock().insert(key, waiter);
    }

    /// Forget `key` (its call ended); whether it was still waiting.
    pub fn remove(&self, key: u64) -> bool {
        self.lock().remove(&key).is_some()
    }

    /// Forget every key of `keys`.
    pub fn remove_all(&self, keys: &[u64]) {
        let mut waiters = self.lock();
        for key in keys {
            waiters.remove(key);
        }
    }

    /// Deliver each reply to the call waiting for it; replies to calls that ended are dropped.
    pub fn answer(&self, replies: Vec<(u64, Reply)>) {
        let waiters: Vec<(u64, Waiter, Reply)> = {
            let mut map = self.lock();
            replies
                .into_iter()
                .filter_map(|(key, reply)| map.remove(&key).map(|w| (key, w, reply)))
                .collect()
        };
        for (key, waiter, reply) in waiters {
            match waiter {
                Waiter::Unary(tx) => {
                    let _ = tx.send(reply);
                }
                Waiter::Stream(stream) => stream.deliver(key, reply),
            }
        }
    }

    /// Python decoded these stream requests: each (key, bytes its answer takes) replaces
    /// the provisional reservation of a deep stream's request.
    pub fn reserve(&self, reservations: &[(u64, usize)]) {
        let streams: Vec<(u64, usize, Arc<StreamShared>)> = {
            let map = self.lock();
            reservations
                .iter()
                .filter_map(|&(key, nbytes)| match map.get(&key) {
                    Some(Waiter::Stream(stream)) => Some((key, nbytes, stream.clone())),
                    _ => None,
                })
                .collect()
        };
        for (key, nbytes, stream) in streams {
            stream.reserve(key, nbytes);
        }
    }

    /// Every waiting call is answered `status` (the transport stops).
    pub fn fail_all(&self, status: &Status) {
        let waiters: Vec<(u64, Waiter)> = self.lock().drain().collect();
        for (key, waiter) in waiters {
            let reply = Err(Status::new(status.code(), status.message()));
            match waiter {
                Waiter::Unary(tx) => {
                    let _ = tx.send(reply);
                }
                Waiter::Stream(stream) => stream.deliver(key, reply),
            }
        }
    }

    /// How many requests wait for an answer.
    pub fn waiting(&self) -> usize {
        self.lock().len()
    }
}

/// Seconds on CLOCK_MONOTONIC: the clock of Python's `time.perf_counter()` and
/// `time.monotonic()` on Linux, so arrival times compare with the engine's.
pub fn monotonic_s() -> f64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer to a local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as f64 + now.tv_nsec as f64 * 1e-9
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn inbox() -> (Inbox, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        theirs.set_nonblocking(true).unwrap();
        (Inbox::new(ours).unwrap(), theirs)
    }

    fn arrival(inbox: &Inbox, gone: &Gone) -> Arrival {
        Arrival {
            protocol: Protocol::Grpc,
            key: inbox.next_key(),
            stream: false,
            reserved: false,
            data: Bytes::from_static(b"x"),
            principal: None,
            arrived: monotonic_s(),
            gone: gone.clone(),
        }
    }

    fn wakes(reader: &mut UnixStream) -> usize {
        let mut buffer = [0u8; 64];
        reader.read(&mut buffer).unwrap_or(0)
    }

    #[test]
    fn one_wake_up_carries_everything_that_arrived_until_the_take() {
        let (inbox, mut reader) = inbox();
        let gone = Gone::default();
        for _ in 0..5 {
            inbox.arrive(arrival(&inbox, &gone));
        }
        assert_eq!(wakes(&mut reader), 1);
        assert_eq!(inbox.take().arrivals.len(), 5);
        inbox.arrive(arrival(&inbox, &gone));
        assert_eq!(
            wakes(&mut reader),
            1,
            "the first arrival after a take wakes again"
        );
    }

    #[test]
    fn requests_of_calls_that_ended_are_never_handed_over() {
        let (inbox, _reader) = inbox();
        let (live, ended) = (Gone::default(), Gone::default());
        inbox.arrive(arrival(&inbox, &live));
        inbox.arrive(arrival(&inbox, &ended));
        ended.store(true, Ordering::Release);
        let taken = inbox.take();
        assert_eq!(taken.arrivals.len(), 1);
        assert!(!taken.arrivals[0].gone.load(Ordering::Acquire));
    }

    #[test]
    fn keys_are_never_reused() {
        let (inbox, _reader) = inbox();
        let keys: std::collections::HashSet<u64> = (0..1000).map(|_| inbox.next_key()).collect();
        assert_eq!(keys.len(), 1000);
    }

    #[test]
    fn stopped_stays_reported_once_set() {
        let (inbox, _reader) = inbox();
        inbox.stopped();
        assert!(inbox.take().stopped);
        assert!(inbox.take().stopped);
    }

    #[test]
    fn logs_beyond_the_bound_are_counted_not_kept() {
        let (inbox, _reader) = inbox();
        for i in 0..MAX_PENDING_LOGS + 7 {
            inbox.log(LogRecord {
                level: 20,
                message: i.to_string(),
            });
        }
        let logs = inbox.take().logs;
        assert_eq!(logs.len(), MAX_PENDING_LOGS + 1);
        assert!(logs.last().unwrap().message.starts_with("7 log records"));
    }

    #[tokio::test]
    async fn answers_reach_their_waiting_call_and_unknown_keys_are_ignored() {
        let pending = Pending::default();
        let (tx, rx) = oneshot::channel();
        pending.insert(7, Waiter::Unary(tx));
        pending.answer(vec![
            (8, Ok(Bytes::from_static(b"nobody"))),
            (7, Ok(Bytes::from_static(b"yes"))),
        ]);
        assert_eq!(rx.await.unwrap().unwrap(), Bytes::from_static(b"yes"));
        assert_eq!(pending.waiting(), 0);
    }
}
