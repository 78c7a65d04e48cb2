//! Progress events an operation streams to its caller before its result.

use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;

/// Where an operation sends progress; cheap to clone, usable from blocking code.
#[derive(Clone, Default)]
pub struct Events {
    tx: Option<UnboundedSender<serde_json::Value>>,
}

impl Events {
    pub fn new(tx: UnboundedSender<serde_json::Value>) -> Events {
        Events { tx: Some(tx) }
    }

    /// Drops events: for callers that only want the result.
    pub fn none() -> Events {
        Events { tx: None }
    }

    pub fn emit(&self, event: &impl Serialize) {
        if let Some(tx) = &self.tx {
            // A caller that hung up does not stop the work.
            let _ = tx.send(serde_json::to_value(event).expect("events serialise"));
        }
    }
}
