//! Progress events an operation streams to its caller before its result.

use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

/// One event on its way to the caller.
pub struct Emitted {
    pub value: serde_json::Value,
    /// Told (or dropped) once the event has left for the caller, or will
    /// never: how a stream of output knows its reader keeps up.
    pub delivered: Option<oneshot::Sender<()>>,
}

/// Where an operation sends progress; cheap to clone, usable from blocking code.
#[derive(Clone, Default)]
pub struct Events {
    tx: Option<UnboundedSender<Emitted>>,
}

impl Events {
    pub fn new(tx: UnboundedSender<Emitted>) -> Events {
        Events { tx: Some(tx) }
    }

    /// Like [`emit`](Self::emit); the answer resolves (Ok or Err alike)
    /// once the event was written to the caller or dropped.
    pub fn emit_tracked(&self, event: &impl Serialize) -> oneshot::Receiver<()> {
        let (done, rx) = oneshot::channel();
        if let Some(tx) = &self.tx {
            let _ = tx.send(Emitted {
                value: serde_json::to_value(event).expect("events serialise"),
                delivered: Some(done),
            });
        }
        rx
    }

    /// Drops events: for callers that only want the result.
    pub fn none() -> Events {
        Events { tx: None }
    }

    pub fn emit(&self, event: &impl Serialize) {
        if let Some(tx) = &self.tx {
            // A caller that hung up does not stop the work.
            let _ = tx.send(Emitted {
                value: serde_json::to_value(event).expect("events serialise"),
                delivered: None,
            });
        }
    }
}
