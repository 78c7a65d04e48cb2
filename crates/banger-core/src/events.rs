//! Progress events an operation streams to its caller before its result.

use std::marker::PhantomData;

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

/// Where an operation sends progress of type `E` (its method's
/// `Method::Event`); cheap to clone, usable from blocking code.
pub struct Events<E> {
    tx: Option<UnboundedSender<Emitted>>,
    kind: PhantomData<fn(&E)>,
}

impl<E> Clone for Events<E> {
    fn clone(&self) -> Self {
        Events {
            tx: self.tx.clone(),
            kind: PhantomData,
        }
    }
}

impl<E> Default for Events<E> {
    fn default() -> Self {
        Events {
            tx: None,
            kind: PhantomData,
        }
    }
}

impl<E: Serialize> Events<E> {
    pub fn new(tx: UnboundedSender<Emitted>) -> Events<E> {
        Events {
            tx: Some(tx),
            kind: PhantomData,
        }
    }

    /// Drops events: for callers that only want the result.
    pub fn none() -> Events<E> {
        Events::default()
    }

    /// The same channel carrying another method's events: for an operation
    /// that runs another as one of its parts (a kernel pull's image pull).
    pub fn retyped<F: Serialize>(&self) -> Events<F> {
        Events {
            tx: self.tx.clone(),
            kind: PhantomData,
        }
    }

    /// Like [`emit`](Self::emit); the answer resolves (Ok or Err alike)
    /// once the event was written to the caller or dropped.
    pub fn emit_tracked(&self, event: &E) -> oneshot::Receiver<()> {
        let (done, rx) = oneshot::channel();
        if let Some(tx) = &self.tx {
            let _ = tx.send(Emitted {
                value: serde_json::to_value(event).expect("events serialise"),
                delivered: Some(done),
            });
        }
        rx
    }

    pub fn emit(&self, event: &E) {
        if let Some(tx) = &self.tx {
            // A caller that hung up does not stop the work.
            let _ = tx.send(Emitted {
                value: serde_json::to_value(event).expect("events serialise"),
                delivered: None,
            });
        }
    }
}
