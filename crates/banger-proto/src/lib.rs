//! Wire types of the protocol the `banger` CLI speaks with the daemon.
//!
//! One request per connection, newline-delimited JSON frames. The client sends a
//! [`Request`]; the daemon answers with zero or more [`Frame::Event`]s (progress
//! of long work) and ends with exactly one [`Frame::Result`] or [`Frame::Error`].
//! `docs/rpc.md` documents every method listed in [`rpc::ALL`].

pub mod agent;
pub mod domain;
pub mod elf;
pub mod helper;
pub mod http1;
pub mod image;
pub mod jail;
pub mod kernel;
pub mod rpc;
pub mod status;
pub mod vm;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A DNS label: 1–63 of `a-z`, `0-9` and `-`, not starting or ending with
/// `-`. VM names, the VM domain and device-mapper names are all labels.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Bumped whenever a method's params or result change incompatibly.
pub const PROTOCOL_VERSION: u32 = 1;

pub use rpc::{Method, Request};

/// Machine-readable error classes; the CLI maps them to messages and exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request itself is malformed or names an unknown method.
    BadRequest,
    /// A parameter is invalid (bad name, bad reference, bad platform).
    InvalidParams,
    /// The named object does not exist.
    NotFound,
    /// The operation conflicts with existing state.
    Conflict,
    /// The registry refused or failed (auth, missing manifest, network).
    Registry,
    /// Image content is unusable or hostile (digest mismatch, unsafe path).
    BadContent,
    /// The caller is not allowed to talk to this daemon.
    PermissionDenied,
    /// Anything else: a bug or a host failure.
    Internal,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    /// The id of the operation, also present in every daemon log line of it.
    pub op_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Frame {
    Event(Value),
    Result(Value),
    Error(ErrorBody),
}

impl Frame {
    /// Serialises the frame as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("frames always serialise");
        line.push(b'\n');
        line
    }
}

/// Formats a byte count in binary units with one decimal: `1.2 GiB`, `512 B`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_uses_binary_units_with_one_decimal() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0 MiB");
        assert_eq!(human_bytes(1288490189), "1.2 GiB");
    }

    #[test]
    fn frames_round_trip_as_single_lines() {
        let frame = Frame::Error(ErrorBody {
            code: ErrorCode::NotFound,
            message: "no image `x`".into(),
            op_id: "op-1".into(),
        });
        let line = frame.to_line();
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        let back: Frame = serde_json::from_slice(&line).unwrap();
        match back {
            Frame::Error(body) => assert_eq!(body.code, ErrorCode::NotFound),
            other => panic!("unexpected {other:?}"),
        }
    }
}
