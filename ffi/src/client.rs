//! A blocking JSON-RPC client over the daemon's local socket.

use std::io::{Read, Write};

use interprocess::local_socket::{GenericFilePath, Stream, prelude::*};
use mariesync_protocol::frame::{FrameDecoder, FrameError, encode_frame};
use mariesync_protocol::ipc::{FRAME_BYTES_MAX, Notification, Request, Response, RpcError};
use serde_json::Value;

use crate::HomePaths;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no daemon is running for {home}; start one with `{command}`")]
    NoDaemon { home: String, command: String },
    #[error("lost the connection to the daemon: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon sent a malformed frame: {0}")]
    Frame(#[from] FrameError),
    #[error("the daemon sent malformed JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the daemon closed the connection")]
    Closed,
    #[error("{0}")]
    Rpc(RpcError),
}

pub struct Client {
    stream: Stream,
    decoder: FrameDecoder,
    next_id: u64,
    /// Notifications that arrived while waiting for a response.
    pending: std::collections::VecDeque<Notification>,
    /// Where reads land: it starts small and doubles while reads fill it,
    /// up to [`READ_BUFFER_MAX`]. A whole 64 KiB from the start cost a
    /// short command 16 page faults, a tenth of a millisecond.
    read_buffer: Vec<u8>,
}

const READ_BUFFER_MIN: usize = 4 * 1024;
const READ_BUFFER_MAX: usize = 64 * 1024;

impl Client {
    pub fn connect(paths: &HomePaths) -> Result<Client, ClientError> {
        let socket = paths.socket();
        let no_daemon = || ClientError::NoDaemon {
            home: paths.home.display().to_string(),
            command: paths.daemon_command(),
        };
        let name = socket
            .as_os_str()
            .to_fs_name::<GenericFilePath>()
            .map_err(|_| no_daemon())?;
        let stream = Stream::connect(name).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => no_daemon(),
            _ => ClientError::Io(e),
        })?;
        Ok(Client {
            stream,
            decoder: FrameDecoder::new(FRAME_BYTES_MAX),
            read_buffer: Vec::new(),
            next_id: 1,
            pending: Default::default(),
        })
    }

    /// Sends one request and waits for its response. Notifications that
    /// arrive meanwhile are kept for [`Client::next_notification`].
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let request = Request {
            jsonrpc: "2.0".into(),
            id: Some(Value::from(id)),
            method: method.into(),
            params: Some(params),
        };
        self.send_raw(&serde_json::to_vec(&request)?)?;
        loop {
            let message = self.read_message()?;
            if message.get("method").is_some() && message.get("id").is_none() {
                self.pending.push_back(serde_json::from_value(message)?);
                continue;
            }
            let response: Response = serde_json::from_value(message)?;
            if response.id != id {
                continue;
            }
            return match (response.result, response.error) {
                (_, Some(error)) => Err(ClientError::Rpc(error)),
                (Some(result), None) => Ok(result),
                (None, None) => Ok(Value::Null),
            };
        }
    }

    /// Blocks until the daemon sends a notification (after `events.subscribe`).
    pub fn next_notification(&mut self) -> Result<Notification, ClientError> {
        if let Some(notification) = self.pending.pop_front() {
            return Ok(notification);
        }
        loop {
            let message = self.read_message()?;
            if message.get("id").is_none() {
                return Ok(serde_json::from_value(message)?);
            }
        }
    }

    /// Writes one frame with this body, whatever it holds.
    pub fn send_raw(&mut self, body: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(&encode_frame(body))?;
        Ok(())
    }

    /// Reads the next whole message the daemon sends.
    pub fn read_message(&mut self) -> Result<Value, ClientError> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(serde_json::from_slice(&frame)?);
            }
            let buffer = &mut self.read_buffer;
            if buffer.is_empty() {
                buffer.resize(READ_BUFFER_MIN, 0);
            }
            let n = self.stream.read(buffer)?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            self.decoder.push(&buffer[..n]);
            if n == buffer.len() && buffer.len() < READ_BUFFER_MAX {
                buffer.resize(buffer.len() * 2, 0);
            }
        }
    }

    /// The underlying stream, for callers that proxy bytes.
    pub fn into_stream(self) -> Stream {
        self.stream
    }
}
