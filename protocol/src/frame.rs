//! LSP base-protocol framing (`Content-Length: N\r\n\r\n` + N bytes of JSON),
//! as a sans-IO decoder: feed it bytes, take whole frames out.

/// Largest header block we read before giving up on a peer.
pub const HEADER_BYTES_MAX: usize = 8 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame header is longer than {HEADER_BYTES_MAX} bytes")]
    HeaderTooLong,
    #[error("malformed frame header: {0}")]
    BadHeader(String),
    #[error("frame header has no Content-Length")]
    MissingContentLength,
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: usize },
}

/// Accumulates bytes from a stream and yields complete frame bodies.
///
/// After an error the stream can no longer be trusted to be in sync, so the
/// caller answers once and closes the connection.
pub struct FrameDecoder {
    buffer: Vec<u8>,
    /// Body length of the frame whose header has been parsed, if any.
    pending_body: Option<usize>,
    frame_bytes_max: usize,
}

impl FrameDecoder {
    pub fn new(frame_bytes_max: usize) -> FrameDecoder {
        FrameDecoder {
            buffer: Vec::new(),
            pending_body: None,
            frame_bytes_max,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// True if bytes of an unfinished frame are buffered.
    pub fn is_mid_frame(&self) -> bool {
        !self.buffer.is_empty() || self.pending_body.is_some()
    }

    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if self.pending_body.is_none() {
            let Some(end) = find(&self.buffer, b"\r\n\r\n") else {
                if self.buffer.len() > HEADER_BYTES_MAX {
                    return Err(FrameError::HeaderTooLong);
                }
                return Ok(None);
            };
            if end > HEADER_BYTES_MAX {
                return Err(FrameError::HeaderTooLong);
            }
            let len = parse_header(&self.buffer[..end], self.frame_bytes_max)?;
            self.buffer.drain(..end + 4);
            self.pending_body = Some(len);
        }
        let len = self.pending_body.expect("header parsed above");
        if self.buffer.len() < len {
            return Ok(None);
        }
        let rest = self.buffer.split_off(len);
        let body = std::mem::replace(&mut self.buffer, rest);
        self.pending_body = None;
        Ok(Some(body))
    }
}

fn parse_header(header: &[u8], frame_bytes_max: usize) -> Result<usize, FrameError> {
    let text = std::str::from_utf8(header)
        .map_err(|_| FrameError::BadHeader("header is not ASCII".into()))?;
    let mut length = None;
    for line in text.split("\r\n") {
        let (name, value) = line.split_once(':').ok_or_else(|| {
            FrameError::BadHeader(format!("expected 'Name: value', got {line:?}"))
        })?;
        if name.trim().eq_ignore_ascii_case("content-length") {
            let len: u64 = value
                .trim()
                .parse()
                .map_err(|_| FrameError::BadHeader(format!("bad Content-Length {value:?}")))?;
            if len > frame_bytes_max as u64 {
                return Err(FrameError::TooLarge {
                    len,
                    max: frame_bytes_max,
                });
            }
            length = Some(len as usize);
        }
    }
    length.ok_or(FrameError::MissingContentLength)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

pub fn encode_frame(body: &[u8]) -> Vec<u8> {
    let mut out = format!("Content-Length: {}\r\n\r\n", body.len()).into_bytes();
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_frames_split_anywhere() {
        let mut wire = encode_frame(b"{\"a\":1}");
        wire.extend(encode_frame(b"[]"));
        for split in 0..wire.len() {
            let mut decoder = FrameDecoder::new(1024);
            let mut frames = Vec::new();
            for part in [&wire[..split], &wire[split..]] {
                decoder.push(part);
                while let Some(frame) = decoder.next_frame().unwrap() {
                    frames.push(frame);
                }
            }
            assert_eq!(frames, vec![b"{\"a\":1}".to_vec(), b"[]".to_vec()]);
            assert!(!decoder.is_mid_frame());
        }
    }

    #[test]
    fn refuses_oversized_and_malformed_headers() {
        let mut decoder = FrameDecoder::new(1024);
        decoder.push(b"Content-Length: 104857600\r\n\r\n");
        assert_eq!(
            decoder.next_frame(),
            Err(FrameError::TooLarge {
                len: 104857600,
                max: 1024
            })
        );

        let mut decoder = FrameDecoder::new(1024);
        decoder.push(b"Content-Type: x\r\n\r\n");
        assert_eq!(decoder.next_frame(), Err(FrameError::MissingContentLength));

        let mut decoder = FrameDecoder::new(1024);
        decoder.push(&[b'x'; HEADER_BYTES_MAX + 1]);
        assert_eq!(decoder.next_frame(), Err(FrameError::HeaderTooLong));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let mut decoder = FrameDecoder::new(256);
            decoder.push(&bytes);
            while let Ok(Some(_)) = decoder.next_frame() {}
        }
    }
}
