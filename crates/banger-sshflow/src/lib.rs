//! Byte streams over SSH channels that keep to their reader's pace without
//! stalling the connection. russh reopens a channel's window on receipt and
//! delivers to each channel through a bounded queue, so a channel whose
//! reader stops stalls every channel of the connection. Here both ends
//! always drain the channel and grant credit themselves: a side sends at
//! most `window` bytes its peer has not acknowledged, and acknowledges what
//! it has written on (extended data of type [`FLOW_ACK`], a big-endian u32).
//! The daemon asks for this when it opens a forward ([`ORIGINATOR`]); plain
//! SSH clients never do.

use std::sync::Arc;

use russh::{Channel, ChannelId, ChannelMsg};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};

pub use banger_proto::agent::FLOW_ACK;

/// The originator address of a direct-tcpip channel that asks for flow
/// control; its originator port carries the window.
pub const ORIGINATOR: &str = "banger-flow";

/// Bytes one side may send ahead of its peer's acknowledgement.
pub const WINDOW: u32 = 1 << 20;

const CHUNK: usize = 32 * 1024;

/// The window a peer asked for, kept within sane bounds.
pub fn clamp_window(asked: u32) -> u32 {
    asked.clamp(64 * 1024, 64 << 20)
}

/// What one side may still send: `window` bytes, spent by [`take`] and
/// given back by the peer's acknowledgements ([`grant`]), never beyond the
/// window whatever a (hostile) peer's count says.
///
/// [`take`]: Credit::take
/// [`grant`]: Credit::grant
pub struct Credit {
    room: Semaphore,
    window: usize,
}

impl Credit {
    pub fn new(window: u32) -> Credit {
        Credit {
            room: Semaphore::new(window as usize),
            window: window as usize,
        }
    }

    /// Waits until `n` bytes may be sent, and spends them.
    pub async fn take(&self, n: usize) {
        if let Ok(permit) = self.room.acquire_many(n as u32).await {
            permit.forget();
        }
    }

    /// Gives back what an acknowledgement (a [`FLOW_ACK`] payload) counts.
    pub fn grant(&self, ack: &[u8]) {
        if let Ok(n) = <[u8; 4]>::try_from(ack) {
            let free = self.window.saturating_sub(self.room.available_permits());
            self.room
                .add_permits((u32::from_be_bytes(n) as usize).min(free));
        }
    }
}

/// The [`FLOW_ACK`] payload acknowledging `n` bytes.
pub fn ack(n: usize) -> Vec<u8> {
    (n as u32).to_be_bytes().to_vec()
}

/// Forwards between `channel` and `socket` until both directions end. A
/// peer that sends more than twice the window unacknowledged is cut off.
pub async fn forward<S, T>(channel: Channel<S>, socket: T, window: u32)
where
    S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut from_peer, to_peer) = channel.split();
    let to_peer = Arc::new(to_peer);
    let room = Arc::new(Credit::new(window));
    let (mut sock_read, mut sock_write) = tokio::io::split(socket);

    // Socket → channel, within the peer's credit.
    let up = {
        let (to_peer, room) = (to_peer.clone(), room.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = match sock_read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                room.take(n).await;
                if to_peer.data_bytes(buf[..n].to_vec()).await.is_err() {
                    return;
                }
            }
            let _ = to_peer.eof().await;
        })
    };

    // Channel → socket: drained at once into a queue the peer's credit
    // bounds; a writer takes it to the socket and acknowledges.
    let (queue, mut queued) = mpsc::unbounded_channel::<Vec<u8>>();
    let (wrote, mut written) = mpsc::unbounded_channel::<usize>();
    let down = {
        let to_peer = to_peer.clone();
        tokio::spawn(async move {
            while let Some(chunk) = queued.recv().await {
                if sock_write.write_all(&chunk).await.is_err() {
                    return;
                }
                let _ = wrote.send(chunk.len());
                let _ = to_peer
                    .extended_data_bytes(FLOW_ACK, ack(chunk.len()))
                    .await;
            }
            let _ = sock_write.shutdown().await;
        })
    };

    let mut queue = Some(queue);
    // Received and not yet written on: the peer's credit bounds it.
    let mut outstanding = 0usize;
    while let Some(msg) = from_peer.wait().await {
        while let Ok(n) = written.try_recv() {
            outstanding = outstanding.saturating_sub(n);
        }
        match msg {
            ChannelMsg::Data { data } => {
                outstanding += data.len();
                if outstanding > 2 * window as usize {
                    break; // The peer ignores its window.
                }
                if let Some(q) = &queue {
                    let _ = q.send(data.to_vec());
                }
            }
            ChannelMsg::ExtendedData { data, ext } if ext == FLOW_ACK => room.grant(&data),
            ChannelMsg::Eof => queue = None,
            _ => {}
        }
    }
    drop(queue);
    let _ = down.await;
    up.abort();
}
