//! The native part's logs, for Python's logging: `tracing` events become records in the inbox
//! (tokio never calls into Python), and Python logs them under `rnnserve.native` at its next
//! take.

use std::fmt::Write;
use std::sync::{Arc, RwLock, Weak};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

use crate::queue::{Inbox, LogRecord};

static SINK: RwLock<Option<Weak<dyn Sink>>> = RwLock::new(None);

/// Where log records go: the running server's inbox.
pub trait Sink: Send + Sync {
    fn log(&self, record: LogRecord);
}

impl Sink for Inbox {
    fn log(&self, record: LogRecord) {
        Inbox::log(self, record);
    }
}

/// Send this process's native log records to `sink` from now on (the server that started
/// last); installs the bridge the first time.
pub fn route_to(sink: &Arc<dyn Sink>) {
    *SINK.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::downgrade(sink));
    use tracing_subscriber::layer::SubscriberExt;
    // Only the first call installs it; later ones find it there (the error says so).
    let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Bridge));
}

struct Bridge;

/// Python's logging level of a tracing level.
fn python_level(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 40,
        Level::WARN => 30,
        Level::INFO => 20,
        _ => 10,
    }
}

/// This crate's events from INFO, the libraries' (hyper, h2, rustls) from WARN: their
/// connection-level chatter at a busy server would flood the log.
fn wanted(metadata: &Metadata<'_>) -> bool {
    let ours = metadata.target().starts_with("rnnserve_native");
    let level = *metadata.level();
    level <= Level::WARN || (ours && level <= Level::INFO)
}

impl<S: Subscriber> Layer<S> for Bridge {
    fn enabled(&self, metadata: &Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        wanted(metadata)
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let sink = SINK.read().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(sink) = sink.and_then(|weak| weak.upgrade()) else {
            return;
        };
        let mut message = Message(String::new());
        event.record(&mut message);
        let target = event.metadata().target();
        let text = if target.starts_with("rnnserve_native") {
            message.0
        } else {
            format!("{target}: {}", message.0)
        };
        sink.log(LogRecord {
            level: python_level(event.metadata().level()),
            message: text,
        });
    }
}

struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}
