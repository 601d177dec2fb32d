//! Frames between the workmanager and a worker host process: a 4-byte
//! big-endian length, then UTF-8 JSON with a `type` — the same framing as
//! the Python engine's (`ready`, `process`, `result`, `ping`, `pong`,
//! `shutdown`, `error`), plus `log` and `gateway`/`gateway_result` for the
//! C ABI's callbacks. Events are the runtime's CloudEvent-shaped dicts.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Frame {
    /// Host → workmanager: the library loaded.
    Ready,
    /// Workmanager → host: run `Process` on `event`.
    Process {
        event: Value,
    },
    /// Host → workmanager: `Process`'s answer (`null`: none).
    Result {
        event: Value,
        /// `WorkerResponse.error_message` set beside an event.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error_message: Option<String>,
    },
    Ping,
    Pong,
    Shutdown,
    /// Host → workmanager: loading or processing failed.
    Error {
        error_type: String,
        message: String,
    },
    /// Host → workmanager: the worker's `log` callback.
    Log {
        level: i32,
        message: String,
    },
    /// Host → workmanager: the worker's `gateway_call`; answered by one
    /// `gateway_result` before anything else is sent to the host.
    Gateway {
        service: String,
        method: String,
        request: String,
    },
    /// Workmanager → host: the Gateway's JSON answer, or why it failed.
    GatewayResult {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        response: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

impl Frame {
    pub fn to_bytes(&self) -> Vec<u8> {
        // A Frame holds only strings, numbers and JSON values: it always
        // serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(b)
    }
}

/// Reads one frame from a blocking stream; frames over `max` bytes are
/// refused.
pub fn read(r: &mut impl Read, max: usize) -> io::Result<Frame> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes; the limit is {max}"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Frame::from_bytes(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Writes one frame to a blocking stream.
pub fn write(w: &mut impl Write, f: &Frame) -> io::Result<()> {
    let body = f.to_bytes();
    let len = u32::try_from(body.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf)?;
    w.flush()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn frames_use_the_python_engines_shape() {
        assert_eq!(Frame::Ping.to_bytes(), br#"{"type":"ping"}"#);
        let f = Frame::from_bytes(br#"{"type":"result","event":null}"#).unwrap();
        assert_eq!(
            f,
            Frame::Result {
                event: Value::Null,
                error_message: None
            }
        );
        let mut buf = Vec::new();
        write(&mut buf, &Frame::Pong).unwrap();
        assert_eq!(&buf[..4], &15u32.to_be_bytes());
        assert_eq!(read(&mut &buf[..], 1024).unwrap(), Frame::Pong);
        assert!(read(&mut &buf[..], 4).is_err());
    }
}
