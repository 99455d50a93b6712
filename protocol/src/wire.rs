//! Messages between devices, and their framing: a 4-byte little-endian
//! length, then a postcard-encoded message. Every frame has a size limit
//! checked before its bytes are read.

use serde::{Deserialize, Serialize};

/// The libp2p protocol name of MarieSync's sync protocol.
pub const SYNC_PROTOCOL: &str = "/mariesync/sync/1";
/// Version of the messages below; a peer with another answers with an error.
pub const PROTOCOL_VERSION: u32 = 1;
/// No frame from a peer may be larger (before any decompression).
pub const WIRE_FRAME_BYTES_MAX: usize = 8 * 1024 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// The first message on a new connection: who we are.
    Hello {
        protocol_version: u32,
        device_name: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Hello {
        protocol_version: u32,
        device_name: String,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the limit of {WIRE_FRAME_BYTES_MAX}")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(String),
}

pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, WireError> {
    let body = postcard::to_stdvec(message).map_err(|e| WireError::Malformed(e.to_string()))?;
    if body.len() > WIRE_FRAME_BYTES_MAX {
        return Err(WireError::TooLarge(body.len()));
    }
    let mut frame = Vec::with_capacity(body.len() + 4);
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Checks a frame's announced length before its body is read.
pub fn check_length(prefix: [u8; 4]) -> Result<usize, WireError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > WIRE_FRAME_BYTES_MAX {
        return Err(WireError::TooLarge(len));
    }
    Ok(len)
}

pub fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, WireError> {
    postcard::from_bytes(body).map_err(|e| WireError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_limits() {
        let hello = Request::Hello {
            protocol_version: PROTOCOL_VERSION,
            device_name: "laptop".into(),
        };
        let frame = encode(&hello).unwrap();
        let len = check_length(frame[..4].try_into().unwrap()).unwrap();
        assert_eq!(decode::<Request>(&frame[4..4 + len]).unwrap(), hello);
        assert_eq!(
            check_length(u32::MAX.to_le_bytes()),
            Err(WireError::TooLarge(u32::MAX as usize))
        );
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<Request>(&bytes);
            let _ = decode::<Response>(&bytes);
        }
    }
}
