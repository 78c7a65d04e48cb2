//! What a caller sends after its request (exec stdin, signals, resizes),
//! and whether it is still there. The lines come through a small bounded
//! queue, so a command that does not read its stdin slows the caller down
//! instead of filling the daemon's memory; hanging up is told apart, so it
//! is noticed even while that queue is full.

use serde_json::Value;
use tokio::sync::{mpsc, watch};

/// Lines queued between the caller's socket and the operation.
pub const QUEUED_LINES: usize = 4;

pub struct CallerInput {
    pub lines: mpsc::Receiver<Value>,
    gone: watch::Receiver<bool>,
}

/// The transport's end: where lines go, and how it says the caller left.
pub struct CallerFeed {
    pub lines: mpsc::Sender<Value>,
    gone: watch::Sender<bool>,
}

impl CallerFeed {
    /// The caller hung up (its socket closed).
    pub fn hang_up(&self) {
        let _ = self.gone.send(true);
    }

    /// Resolves when the caller has hung up.
    pub async fn hung_up(&self) {
        let mut gone = self.gone.subscribe();
        let _ = gone.wait_for(|g| *g).await;
    }
}

/// A connected pair.
pub fn channel() -> (CallerFeed, CallerInput) {
    let (lines_tx, lines_rx) = mpsc::channel(QUEUED_LINES);
    let (gone_tx, gone_rx) = watch::channel(false);
    (
        CallerFeed {
            lines: lines_tx,
            gone: gone_tx,
        },
        CallerInput {
            lines: lines_rx,
            gone: gone_rx,
        },
    )
}

impl CallerInput {
    /// A watch that turns true when the caller hangs up.
    pub fn gone(&self) -> watch::Receiver<bool> {
        self.gone.clone()
    }

    /// Resolves when the caller hangs up (or its feed is dropped).
    pub async fn hung_up(&self) {
        let mut gone = self.gone.clone();
        let _ = gone.wait_for(|g| *g).await;
    }
}
